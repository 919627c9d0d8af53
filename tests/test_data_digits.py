"""The offline digits dataset, the dataset registry, and ``igkd data info``."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from igkd.cli import app, main
from igkd.data import DATASETS, load_dataset
from igkd.errors import IgkdError


def test_digits_shapes_split_and_upscaling():
    data = load_dataset("digits")
    assert data.classes == tuple("0123456789")
    assert (len(data.train), len(data.test)) == (1438, 359)
    assert data.train.images.shape[1:] == (3, 32, 32) and data.train.images.dtype == torch.uint8
    assert int(data.train.images.max()) == 255 and int(data.train.images.min()) == 0
    images = torch.cat([data.train.images, data.test.images])
    assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 0], images[:, 2])
    blocks = images[:, 0].reshape(-1, 8, 4, 8, 4)  # nearest upscaling: every 4x4 block is one source pixel
    assert torch.equal(blocks, blocks[:, :, :1, :, :1].expand_as(blocks))
    test_counts = data.test.per_class(10)
    assert min(test_counts) >= 35 and max(test_counts) <= 37  # stratified 20% of every class
    again = load_dataset("digits")
    assert again.fingerprint == data.fingerprint and torch.equal(again.test.labels, data.test.labels)


def test_unknown_name_lists_the_known_ones(capsys):
    with pytest.raises(IgkdError) as err:
        load_dataset("cifar100")
    assert all(name in str(err.value) for name in DATASETS)
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "info", "--dataset", "cifar100"])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown dataset 'cifar100'")
    with pytest.raises(IgkdError, match="ships with scikit-learn"):
        load_dataset("digits", "/some/where")


def test_data_info_json_and_table():
    runner = CliRunner()
    result = runner.invoke(app, ["data", "info", "--dataset", "digits", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert list(info) == ["dataset", "train", "test", "classes", "train_per_class", "test_per_class", "fingerprint"]
    assert info["dataset"] == "digits" and sum(info["train_per_class"]) == info["train"] == 1438
    table = runner.invoke(app, ["data", "info", "--dataset", "digits"])
    assert table.exit_code == 0 and info["fingerprint"] in table.stdout
