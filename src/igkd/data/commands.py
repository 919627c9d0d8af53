"""CLI: ``igkd data ...`` (a sub-app, so later data commands join ``info``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

data_app = typer.Typer(name="data", help="Datasets: what igkd loads and from where.", no_args_is_help=True)


@data_app.command("info")
def info_command(
    dataset: str = typer.Option(..., "--dataset", "-d", help="cifar10, folder, digits or imagenet32-cifar."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Folder or archive holding the dataset."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Cache root (default $IGKD_CACHE or ~/.cache/igkd)."),
    download: bool = typer.Option(False, "--download", help="Download the dataset if it is not there (cifar10)."),
    url: Optional[str] = typer.Option(None, "--url", help="Download from this URL instead of the official one."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON only."),
) -> None:
    """Load a dataset and print its sizes, classes, per-class counts and content fingerprint."""
    from igkd.data import load_dataset

    data = load_dataset(dataset, data_dir, cache_dir=cache_dir, download=download, url=url)
    info = data.info()
    if as_json:
        print(json.dumps(info, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    height, width = data.image_size if len(data.train) else tuple(data.test.images.shape[-2:])
    console = Console()
    console.print(f"[bold]{info['dataset']}[/bold]: {info['train']:,} train + {info['test']:,} test images, {width}x{height}")
    console.print(f"source: {data.source}\nfingerprint: {info['fingerprint']}")
    table = Table()
    for column in ("label", "class", "train", "test"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for label, name in enumerate(info["classes"]):
        table.add_row(str(label), name, f"{info['train_per_class'][label]:,}", f"{info['test_per_class'][label]:,}")
    console.print(table)


def register(app: typer.Typer) -> None:
    """Add ``igkd data`` to the top-level app."""
    app.add_typer(data_app, name="data")
