"""Shared fixtures: tiny datasets built in memory (tests never read ../shared/data)."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

os.environ.setdefault("IGKD_CACHE", os.path.join(os.environ.get("TMPDIR", "/tmp"), "igkd-test-cache"))
torch.set_num_threads(1)


def make_tiny_dataset(n_train: int = 64, n_test: int = 32, size: int = 16, classes: int = 4, seed: int = 0):
    """A learnable toy problem: class c has a bright square in quadrant c, plus noise."""
    from igkd.doctor import tiny_dataset

    return tiny_dataset(n_train, n_test, size, classes, seed)


@pytest.fixture
def tiny_dataset():
    return make_tiny_dataset()


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """``torch.set_default_dtype(dtype)`` inside the block, the previous default after it."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield dtype
    finally:
        torch.set_default_dtype(before)


@pytest.fixture
def float64():
    """Everything built while the test runs (models, the loop's batches, losses) is float64: two trainings that
    differ only in the order of their sums then agree to ~1e-11, on any CPU and thread count (float32 training
    amplifies rounding, which depends on the CPU's vector units, into differences of 1e-4 .. 1e-1)."""
    with default_dtype(torch.float64):
        yield torch.float64


def as_cohort_trainer(train_one):
    """A stand-in for ``igkd.distill.executor._train`` that trains each run of a cohort with
    ``train_one(config, dataset, out_dir, **kwargs)`` (tests that fake or count single runs)."""

    def train(cohort, dataset, inputs, **kwargs):
        return [train_one(run.config, dataset, run.out, **kwargs) for run in cohort]

    return train
