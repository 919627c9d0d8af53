"""CLI commands of igkd.experiments (registered by igkd.cli)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer


def _number(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _pvalue(value: float | None) -> str:
    return "-" if value is None else f"{value:.2g}"


def _print_summary(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    level = f"{100 * summary['confidence']:g}%"
    methods = Table(title=f"Accuracy per method ({level} t-interval of the mean)")
    for column in ("method", "n", "mean", "sd", "min", "max", f"{level} CI"):
        methods.add_column(column, justify="left" if column == "method" else "right", no_wrap=column != "method", overflow="fold")
    for row in summary["methods"]:
        methods.add_row(
            row["method"], str(row["n"]), _number(row["mean"]), _number(row["sd"]), _number(row["min"]), _number(row["max"]),
            f"{_number(row['ci_low'])} .. {_number(row['ci_high'])}",
        )
    console.print(methods)
    console.print(f"[bold]{'paired' if summary['paired'] else 'unpaired'}[/bold]: {summary['pairing']}")
    console.print(f"test: {summary['test']}; effect size: {summary['effect_size']}")
    paired = summary["paired"]
    effect = "d_z" if paired else "g"
    for family in ("vs_baseline", "all_pairs"):
        comparisons = summary[family]
        if not comparisons:
            continue
        table = Table(title=f"{family}: b - a, Holm over {summary['holm_families'][family]}")
        with_a = family == "all_pairs"  # vs_baseline: a is always the baseline
        columns = (["a"] if with_a else []) + ["b", "b - a", f"{level} CI", "t", "df", "p", "p Holm", effect]
        if paired:
            columns += ["Wilcoxon p", "W p Holm"]
        for column in columns:
            table.add_column(column, justify="left" if column in ("a", "b") else "right", no_wrap=column not in ("a", "b"), overflow="fold")
        for c in comparisons:
            cells = ([c["a"]] if with_a else []) + [
                c["b"], _number(c["mean_difference"]), f"{_number(c['ci_low'])} .. {_number(c['ci_high'])}",
                _number(c["t"], 2), _number(c["df"], 1), _pvalue(c["p"]), _pvalue(c["p_holm"]), _number(c["effect_size"]["value"], 2),
            ]
            if paired:
                cells += [_pvalue(c["wilcoxon"]["p"]), _pvalue(c["wilcoxon"]["p_holm"])]
            table.add_row(*cells)
        console.print(table)
    notes = {c.get("reason") for c in summary["all_pairs"]} | {c.get("wilcoxon", {}).get("reason") for c in summary["all_pairs"]}
    for note in sorted(n for n in notes if n):
        console.print(f"note: some tests gave no p-value: {note}")


def register(app: typer.Typer) -> None:
    """Add this stage's commands to the top-level app."""

    @app.command("stats")
    def stats_command(
        csv_path: Path = typer.Option(..., "--csv", help="CSV with header method,run,accuracy (extra columns ignored)."),
        baseline: str = typer.Option("student", help="Method the others are compared with (case-insensitive)."),
        paired: Optional[bool] = typer.Option(
            None,
            "--paired/--unpaired",
            help="Runs with the same id share seed and subset (paired t-test, Wilcoxon) or not (Welch). "
            "Default: paired iff every method has the same run ids.",
        ),
        confidence: float = typer.Option(0.95, help="Confidence level of the intervals."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON only."),
    ) -> None:
        """Summarise Monte Carlo accuracies per method and test the differences between methods."""
        from igkd.experiments.statistics import read_accuracy_csv, summarize

        summary = summarize(read_accuracy_csv(csv_path), baseline=baseline, paired=paired, confidence=confidence)
        if as_json:
            print(json.dumps(summary, indent=2))
        else:
            _print_summary(summary)
