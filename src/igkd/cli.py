"""The ``igkd`` command line. Each pipeline stage registers its own commands."""

from __future__ import annotations

import sys

import typer

from igkd.errors import IgkdError

app = typer.Typer(
    name="igkd",
    help="Compress CNNs by knowledge distillation guided by integrated gradients.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Order = the pipeline: data -> models -> attribution -> distill -> evaluate -> deploy -> experiments -> report.
_STAGES = (
    "igkd.data.commands",
    "igkd.models.commands",
    "igkd.attribution.commands",
    "igkd.distill.commands",
    "igkd.evaluate.commands",
    "igkd.deploy.commands",
    "igkd.experiments.commands",
    "igkd.experiments.reproduce",
    "igkd.report.commands",
    "igkd.demo",
)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", help="Print the igkd version and exit.", is_eager=True),
) -> None:
    """Compress CNNs by knowledge distillation guided by integrated gradients."""
    if version:
        from igkd import __version__

        print(__version__)
        raise typer.Exit()


def _register_all() -> None:
    import importlib

    for module in _STAGES:
        importlib.import_module(module).register(app)


_register_all()


def fail(message: str, code: int = 2) -> None:
    """Print one ``error:`` line to stderr and exit non-zero."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def main(argv: list[str] | None = None) -> None:
    try:
        app(args=argv, prog_name="igkd", standalone_mode=True)
    except IgkdError as err:
        fail(str(err))
    except KeyboardInterrupt:
        fail("interrupted (runs resume from their last checkpoint with --resume)", 130)


if __name__ == "__main__":
    main()
