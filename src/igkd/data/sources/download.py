"""Download one file atomically, checking its md5 before it appears under its name."""

from __future__ import annotations

import hashlib
import urllib.error
import urllib.request
from pathlib import Path

from igkd.atomic import atomic_open
from igkd.progress import progress_bar
from igkd.errors import IgkdError


def download_file(url: str, dest: Path, *, md5: str | None = None, progress: bool = True, hint: str = "") -> Path:
    """Stream ``url`` to ``dest``; with ``md5`` a mismatching download is discarded and refused.

    The bytes go to a temporary sibling that is renamed onto ``dest`` only when
    complete and verified, so an interrupted or corrupt download never looks like
    a good file.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.md5(usedforsecurity=False)
    try:
        with urllib.request.urlopen(url, timeout=60) as response, atomic_open(dest, "wb") as handle:
            total = int(response.headers.get("Content-Length") or 0)
            with progress_bar(total, f"downloading {dest.name}", enabled=progress, unit="bytes") as bar:
                while block := response.read(1 << 20):
                    handle.write(block)
                    digest.update(block)
                    bar.advance(len(block))
            if md5 is not None and digest.hexdigest() != md5:
                raise IgkdError(
                    f"the download from {url} has md5 {digest.hexdigest()}, expected {md5}: "
                    f"it is corrupt or not the expected file, so it was not kept. {hint}".strip()
                )
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise IgkdError(f"cannot download {url} to {dest}: {reason}. {hint}".strip()) from None
    return dest
