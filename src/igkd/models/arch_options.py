"""The command-line options that name an external architecture (:mod:`igkd.models.external`), shared by the
commands that train, load or list models: ``--student-arch``/``--teacher-arch`` with their ``-args``,
``--student-normalize`` and ``--trust-arch``."""

from __future__ import annotations

from typing import Optional

import typer

from igkd.errors import IgkdError

ARCH_HELP = "An architecture igkd does not define: package.module:factory (a function or class returning an nn.Module; the current folder is importable)."
ARGS_HELP = "Keyword arguments of the factory: key=value,key=value (YAML scalars) or a .yaml/.json file."
NORMALIZE_HELP = "Input normalisation of an external model: dataset (the training images' statistics, or the teacher's), model (it normalises itself) or MEAN/STD."
TRUST_HELP = "Rebuild an external model from the factory its file names (import that code) without naming it with --student-arch/--teacher-arch."


def student_arch() -> Optional[str]:
    return typer.Option(None, "--student-arch", help=ARCH_HELP)


def teacher_arch() -> Optional[str]:
    return typer.Option(None, "--teacher-arch", help=ARCH_HELP)


def student_arch_args() -> Optional[str]:
    return typer.Option(None, "--student-arch-args", help=ARGS_HELP)


def teacher_arch_args() -> Optional[str]:
    return typer.Option(None, "--teacher-arch-args", help=ARGS_HELP)


def student_normalize() -> Optional[str]:
    return typer.Option(None, "--student-normalize", help=NORMALIZE_HELP)


def trust_arch() -> bool:
    return typer.Option(False, "--trust-arch", help=TRUST_HELP)


def trusted(*refs: str | None, trust: bool = False):
    """What a command lets a model file be rebuilt by: ``True`` with ``--trust-arch``, else the references named."""
    return True if trust else [r for r in refs if r]


def arch_config(arch: str | None, args: str | None, normalize: str | None, option: str = "--student-arch") -> dict:
    """The config keys ``student_arch``, ``student_arch_args``, ``student_normalize`` of the options (None where
    not given, so a config file's values stay); ``-args``/``-normalize`` without ``-arch`` are refused."""
    from igkd.models.external import check_ref, normalize_setting, parse_arch_args, parse_normalize

    if arch is None:
        for value, name in ((args, f"{option}-args"), (normalize, option.replace("-arch", "-normalize"))):
            if value is not None:
                raise IgkdError(f"{name} applies to an external architecture: give {option} package.module:factory with it")
        return {}
    return {
        "student_arch": check_ref(arch, option),
        "student_arch_args": parse_arch_args(args, f"{option}-args") if args is not None else None,
        "student_normalize": normalize_setting(parse_normalize(normalize, option.replace("-arch", "-normalize"))) if normalize is not None else None,
    }


def parse_input_shape(text: str) -> tuple[int, int, int]:
    """``3x48x48`` (or ``48x48``: 3 channels) -> (C, H, W)."""
    parts = str(text).lower().replace("*", "x").split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) == 2:
        values = [3, *values]
    if len(values) != 3 or min(values) < 1:
        raise IgkdError(f"--input-shape {text!r}: write CxHxW such as 3x48x48 (or HxW for 3 channels)")
    return tuple(values)
