"""CLI: ``igkd models`` lists the teacher and the student family; ``igkd models layers`` lists a network's
named modules and their output shapes (the names ``--at-teacher-layer``/``--at-student-layer`` take)."""

from __future__ import annotations

import json
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    models = typer.Typer(name="models", help="The MobileNetV2-CIFAR family; 'layers' lists any network's modules.", invoke_without_command=True)

    @models.callback()
    def models_command(
        ctx: typer.Context,
        as_json: bool = typer.Option(False, "--json", help="Print JSON only."),
        num_classes: int = typer.Option(10, help="Number of output classes."),
        width: float = typer.Option(1.0, help="Width multiplier."),
    ) -> None:
        """List teacher and students: name, k (removed modules), parameters, CF, MACs at 32x32."""
        if ctx.invoked_subcommand is not None:
            return
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

    @models.command("layers")
    def layers_command(
        name: str = typer.Argument(..., help="A family name (teacher, k5 ...) or an external factory package.module:factory."),
        args: Optional[str] = typer.Option(None, "--args", help="Keyword arguments of the factory: key=value,... or a .yaml/.json file."),
        input_shape: str = typer.Option("3x32x32", "--input-shape", help="CxHxW of the dummy input."),
        num_classes: int = typer.Option(10, help="Number of output classes."),
        width: float = typer.Option(1.0, help="Width multiplier (family)."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON only."),
    ) -> None:
        """Named modules of a network and their output shapes, from one forward of a zero image (CPU, batch 1)."""
        from igkd.models.arch_options import parse_input_shape
        from igkd.models.external import REF_PATTERN, build_external, layer_shapes, parse_arch_args
        from igkd.models.registry import build_model

        shape = parse_input_shape(input_shape)
        if REF_PATTERN.fullmatch(name.strip()):
            model = build_external(name.strip(), parse_arch_args(args, "--args"), num_classes, input_shape=shape, where="igkd models layers")
        else:
            if args is not None:
                from igkd.errors import IgkdError

                raise IgkdError(f"--args is for an external factory (package.module:factory), not the family's {name!r}")
            model = build_model(name, num_classes=num_classes, width=width)
        rows = layer_shapes(model, shape)
        if as_json:
            print(json.dumps([{"name": n, "type": t, "output_shape": s} for n, t, s in rows], indent=2))
            return
        for n, t, s in rows:
            print(f"{n}\t{t}\t{'x'.join(map(str, s)) if isinstance(s, list) else s}")

    app.add_typer(models, name="models")
