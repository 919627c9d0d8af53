"""CLI commands of igkd.evaluate (registered by igkd.cli)."""

import typer


def register(app: typer.Typer) -> None:
    """Add this stage's commands to the top-level app."""
