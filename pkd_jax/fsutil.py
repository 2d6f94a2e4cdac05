"""Atomic writes: a reader (or a run killed mid-write) never sees half a file or half a folder.

Every file or folder the project publishes (logs rewritten on resume, results, cache entries,
exported models, submission files) is written under a temporary sibling name and renamed into
place; a rename within one directory is atomic on POSIX filesystems.

A staged folder is locked (``flock``) by its writer while it is written. The kernel drops the lock
when the writer dies, even by SIGKILL, so the next ``staged_dir`` of the same target deletes the
temporaries nobody holds (a killed build's, possibly gigabytes) and leaves live writers' alone.
Only temporaries made on the same host are swept: a shared filesystem's locks may be local to
each host (Lustre ``localflock``, NFS ``local_lock``), and another host's writer may be alive.

A run's workdir is locked the same way by the process that writes it (``hold_workdir``), so a
second run started on it by mistake is refused instead of interleaving its checkpoints.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from pkd_jax.errors import WorkdirInUse

# rename(folder, target) fails with these when `target` exists (a non-empty folder or a file).
_EXISTS = (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR)
_HOST = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())  # "@" cannot occur in it


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


def _lock(folder: Path) -> int | None:
    """Lock `folder` for this process: the descriptor holding the lock, or None on a filesystem
    without locks (where nobody can lock it, so nobody sweeps it). Raises BlockingIOError if
    another process holds it, FileNotFoundError if it is gone."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if isinstance(e, BlockingIOError):
            raise
        return None
    return fd


_HELD: dict[str, int] = {}  # workdirs this process trains in -> the descriptors holding their locks


def hold_workdir(workdir: str | os.PathLike) -> None:
    """Lock `workdir` for this process until `release_workdir` (or its end: the kernel drops the lock
    of a killed process, so a crash never leaves a workdir locked). A second run started on the
    same workdir, which would interleave its checkpoints and logs with the first's, is refused.
    A filesystem without locks lets every run through."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    key = os.path.realpath(workdir)
    if key in _HELD:
        return
    try:
        fd = _lock(workdir)
    except BlockingIOError:
        raise WorkdirInUse(f"{workdir}: another process is training in this workdir (it holds the folder's "
                           "lock). Wait for it to finish or stop it, or give this run its own --workdir") from None
    if fd is not None:
        _HELD[key] = fd


def release_workdir(workdir: str | os.PathLike) -> None:
    fd = _HELD.pop(os.path.realpath(workdir), None)
    if fd is not None:
        os.close(fd)


def _temporary(target: Path, kind: str) -> tuple[Path, int | None]:
    """A new empty folder ``.<target name>.<kind>@<host>@*`` beside `target`, and its lock."""
    while True:
        folder = Path(tempfile.mkdtemp(prefix=_prefix(target, kind), dir=target.parent))
        try:
            fd = _lock(folder)
        except (BlockingIOError, FileNotFoundError):  # a sweeper got it before we locked it
            continue
        with contextlib.suppress(FileNotFoundError):
            if fd is None or os.path.samestat(os.fstat(fd), os.stat(folder)):
                return folder, fd  # not swept between mkdtemp and our lock
        os.close(fd)


def _prefix(target: Path, kind: str) -> str:
    return f".{target.name}.{kind}@{_HOST}@"


def _release(folder: Path, fd: int | None) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    if fd is not None:
        os.close(fd)


def _sweep(target: Path) -> None:
    """Delete this host's temporaries of `target` whose writers died (their locks died too)."""
    for kind in ("tmp", "old"):
        for folder in target.parent.glob(glob.escape(_prefix(target, kind)) + "*"):
            try:
                fd = _lock(folder)
            except OSError:  # a live writer's, or gone
                continue
            if fd is not None:
                _release(folder, fd)


def _discard(target: Path) -> None:
    """Rename `target` aside (readers see all of it or nothing), then delete it."""
    aside, fd = _temporary(target, "old")
    try:
        with contextlib.suppress(FileNotFoundError):  # another writer discarded it first
            os.rename(target, aside / target.name)
    finally:
        _release(aside, fd)


def _publish(tmp: Path, target: Path, keep: Callable[[Path], bool] | None) -> None:
    while True:
        try:
            os.rename(tmp, target)
            return
        except OSError as e:
            if e.errno not in _EXISTS:
                raise
        if keep is not None and keep(target):
            return  # an equal folder was published first: ours is dropped, theirs stays
        _discard(target)


@contextlib.contextmanager
def staged_dir(target: str | os.PathLike,
               keep: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Yield an empty temporary sibling folder of `target`; publish it as `target` on success.

    An existing `target` is replaced: renamed aside (then deleted) and the new folder renamed in,
    so `target` is always absent, the old folder or the new one, never partial. With `keep`
    (caches keyed by content, whose concurrent writers build equal folders), an existing
    `target` that `keep` accepts as complete stays and ours is dropped: a complete entry never
    vanishes under a reader, and two writers racing for a name both succeed (renaming a folder
    onto a non-empty one fails; the later writer then uses the earlier one's). One `keep`
    rejects is discarded before the body runs. On an exception nothing is published and
    the temporary folder is removed. Temporaries of `target` left by dead writers go first.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _sweep(target)
    if keep is not None and os.path.lexists(target) and not keep(target):
        _discard(target)  # broken: free its space now, and never race a writer over it later
    tmp, fd = _temporary(target, "tmp")
    try:
        yield tmp
        _publish(tmp, target, keep)
    finally:
        _release(tmp, fd)  # a no-op on the folder once it is published
