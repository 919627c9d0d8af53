"""CLI: ``igkd models`` lists the teacher and the student family."""

from __future__ import annotations

import json

import typer


def register(app: typer.Typer) -> None:
    @app.command("models")
    def models_command(
        as_json: bool = typer.Option(False, "--json", help="Print JSON only."),
        num_classes: int = typer.Option(10, help="Number of output classes."),
        width: float = typer.Option(1.0, help="Width multiplier."),
    ) -> None:
        """List teacher and students: name, k (removed modules), parameters, CF, MACs at 32x32."""
        from igkd.models.registry import family_table

        rows = family_table(num_classes=num_classes, width=width)
        if as_json:
            print(json.dumps(rows, indent=2))
            return
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"MobileNetV2-CIFAR family (width {width}, {num_classes} classes)")
        for column in ("name", "k", "params", "CF", "MACs (32x32)"):
            table.add_column(column, justify="left" if column == "name" else "right")
        for row in rows:
            table.add_row(row["name"], str(row["k"]), f"{row['params']:,}", f"{row['cf']:.2f}", f"{row['macs']:,}")
        Console().print(table)
