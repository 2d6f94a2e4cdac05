"""Atomic writes: a reader (or a run killed mid-write) never sees half a file or half a folder.

Every file or folder the project publishes (logs rewritten on resume, results, cache entries,
exported models, submission files) is written under a temporary sibling name and renamed into
place; a rename within one directory is atomic on POSIX filesystems.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` via a temporary sibling and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a written file to the disk (before the rename that publishes it)."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def staged_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary sibling folder of `target`; publish it as `target` on success.

    An existing `target` is first renamed aside and deleted after the new folder is in place, so
    `target` is always absent, the old folder or the new one, never partial. If another process
    publishes the same `target` at the same moment, its folder is kept and ours dropped: the
    callers (caches keyed by content) build equal folders. On an exception nothing is published
    and the temporary folder is removed.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        aside = None
        if target.exists():
            aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            try:
                os.rename(target, aside / target.name)
            except FileNotFoundError:  # removed meanwhile by a concurrent publisher
                pass
        try:
            os.rename(tmp, target)
        except OSError:  # a concurrent publisher won the race: its folder is equally valid
            pass
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
