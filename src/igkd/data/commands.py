"""CLI commands of igkd.data (registered by igkd.cli)."""

import typer


def register(app: typer.Typer) -> None:
    """Add this stage's commands to the top-level app."""
