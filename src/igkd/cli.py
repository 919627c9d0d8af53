"""The ``igkd`` command line. Each pipeline stage registers its own commands."""

from __future__ import annotations

import errno
import os
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
    "igkd.doctor",
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


INTERRUPTED = "interrupted: re-run the same command to continue (runs resume from their last checkpoint with --resume, studies and caches continue where they stopped)"

#: What to do about an operating-system error, by errno.
_OS_HINTS = {
    errno.ENOSPC: "the disk is full: free space and re-run the same command (runs resume from their last checkpoint)",
    errno.EDQUOT: "the disk quota is exceeded: free space and re-run the same command (runs resume from their last checkpoint)",
    errno.EACCES: "permission denied: choose a writable --out (or fix the permissions of that path)",
    errno.EPERM: "operation not permitted: choose a writable --out (or fix the permissions of that path)",
    errno.EROFS: "the file system is read-only: choose a writable --out",
    errno.EEXIST: "it exists and is a file, not a folder: choose another --out",
    errno.ENOTDIR: "a part of the path is a file, not a folder: choose another path",
    errno.EISDIR: "it is a folder, but a file is needed here: give a file path",
    errno.ENOENT: "no such file or folder: check the path",
    errno.ENAMETOOLONG: "the name is too long: choose a shorter path",
}


def os_error_message(err: OSError) -> str:
    """One line for an operating-system error: the path, what went wrong, what to do."""
    code = errno.errorcode.get(err.errno, str(err.errno)) if err.errno is not None else type(err).__name__
    reason = err.strerror or os.strerror(err.errno) if err.errno is not None else str(err)
    hint = _OS_HINTS.get(err.errno, "check the path, its permissions and the free disk space")
    where = err.filename if err.filename is not None else "a file"
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"disk full while writing {where} ({reason}, {code}): free space and re-run the same command (runs resume from their last checkpoint)"
    target = f"{where} -> {err.filename2}" if getattr(err, "filename2", None) else where
    return f"cannot use {target}: {reason} ({code}); {hint}"


def _interrupted(exc: BaseException | None) -> bool:
    """Whether an exception was caused by Ctrl-C (typer turns KeyboardInterrupt into a silent exit 130)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def main(argv: list[str] | None = None) -> None:
    try:
        app(args=argv, prog_name="igkd", standalone_mode=True)
    except IgkdError as err:
        fail(str(err))
    except KeyboardInterrupt:
        fail(INTERRUPTED, 130)
    except OSError as err:
        fail(os_error_message(err))
    except SystemExit as exit_:
        if exit_.code == 130 and _interrupted(exit_.__context__):
            fail(INTERRUPTED, 130)
        raise


if __name__ == "__main__":
    main()
