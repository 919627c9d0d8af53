"""CLI commands of igkd.report (registered by igkd.cli)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    """Add this stage's commands to the top-level app."""

    @app.command("report")
    def report_command(
        studies: list[Path] = typer.Argument(..., metavar="STUDY_DIR", help="Study folders (from igkd ablation / montecarlo / sweep-cf / tune)."),
        out: Path = typer.Option(..., help="Folder for report.md, report.json and the PNG figures (created)."),
        data_dir: Optional[Path] = typer.Option(None, help="Dataset folder or archive, for the IG and attention figures (skipped when the data cannot be loaded)."),
        latency: Optional[Path] = typer.Option(None, help="Latency JSON from 'igkd bench latency --json --out FILE': latency table and plot."),
        imagenet_eval: Optional[list[Path]] = typer.Option(
            None, "--imagenet-eval", help="JSON saved from 'igkd evaluate ... --dataset imagenet32-cifar --json' (repeat for several models)."
        ),
        device: str = typer.Option("cpu", help="Device for the attention-map figure."),
    ) -> None:
        """Markdown report of studies: provenance, accuracy tables, tests, agreement, robustness, latency, figures."""
        from igkd.report.build import build_report

        report = build_report(studies, out, data_dir=data_dir, latency=latency, evaluations=imagenet_eval or [], device=device)
        drawn = [f["file"] for s in report["studies"] for f in s["figures"].values() if "file" in f]
        drawn += [report["latency"]["figure"]["file"]] if report["latency"] else []
        skipped = sum("skipped" in f for s in report["studies"] for f in s["figures"].values())
        print(f"report: {out / 'report.md'} (numbers: {out / 'report.json'})")
        print(f"figures in {out}: {', '.join(drawn) or 'none'}" + (f"; {skipped} skipped (reasons in report.md)" if skipped else ""))
