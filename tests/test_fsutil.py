"""Atomic writes: a file or folder is published whole or not at all."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pkd_jax import fsutil

REPO = Path(__file__).resolve().parents[1]


def test_write_text_replaces_whole_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "results.json"
    fsutil.write_text(path, "one\n")
    fsutil.write_text(path, "two\n")
    assert path.read_text() == "two\n"
    assert os.listdir(path.parent) == ["results.json"]


def test_staged_dir_publishes_replaces_and_cleans_up(tmp_path):
    target = tmp_path / "entry"
    with fsutil.staged_dir(target) as tmp:
        assert not target.exists() and tmp.parent == tmp_path
        (tmp / "a.npy").write_text("first")
    assert (target / "a.npy").read_text() == "first"
    with fsutil.staged_dir(target) as tmp:
        (tmp / "b.npy").write_text("second")
        assert (target / "a.npy").exists()  # the old folder stays readable until the swap
    assert sorted(os.listdir(target)) == ["b.npy"]
    assert os.listdir(tmp_path) == ["entry"]  # no temporary or set-aside folder is left


def test_staged_dir_publishes_nothing_on_error(tmp_path):
    target = tmp_path / "model"
    with fsutil.staged_dir(target) as tmp:
        (tmp / "config.json").write_text("good")
    with pytest.raises(OSError, match="disk full"):
        with fsutil.staged_dir(target) as tmp:
            (tmp / "config.json").write_text("half")
            raise OSError("disk full")
    assert (target / "config.json").read_text() == "good"
    assert os.listdir(tmp_path) == ["model"]


def _complete(folder):
    return (folder / "manifest.json").exists()


def test_staged_dir_keeps_a_complete_target_published_meanwhile(tmp_path):
    """Two writers of one content-keyed entry: the later one drops its copy (renaming a folder
    onto a non-empty one fails on Linux) and the first one published stays untouched."""
    target = tmp_path / "entry"
    with fsutil.staged_dir(target, keep=_complete) as mine:
        (mine / "manifest.json").write_text("mine")
        with fsutil.staged_dir(target, keep=_complete) as theirs:  # finishes while we write
            (theirs / "manifest.json").write_text("theirs")
        published = os.stat(target / "manifest.json").st_ino
    assert (target / "manifest.json").read_text() == "theirs"
    assert os.stat(target / "manifest.json").st_ino == published  # never moved or rewritten
    assert os.listdir(tmp_path) == ["entry"]


def test_staged_dir_replaces_a_target_keep_rejects(tmp_path):
    target = tmp_path / "entry"
    target.mkdir()
    (target / "features.npy").write_text("half")  # a broken entry: no manifest
    with fsutil.staged_dir(target, keep=_complete) as tmp:
        assert not target.exists()  # discarded before the build, not raced over after it
        (tmp / "manifest.json").write_text("new")
    assert sorted(os.listdir(target)) == ["manifest.json"]
    assert os.listdir(tmp_path) == ["entry"]


def test_staged_dir_sweeps_dead_writers_temporaries_only(tmp_path):
    target = tmp_path / "entry"
    killed = subprocess.run(  # a writer SIGKILLed mid-write leaves its staged folder
        [sys.executable, "-c", "import os, sys; from pkd_jax import fsutil\n"
         "with fsutil.staged_dir(sys.argv[1]) as tmp:\n"
         "    (tmp / 'a.npy').write_text('half'); os.kill(os.getpid(), 9)", str(target)],
        cwd=REPO)
    assert killed.returncode == -signal.SIGKILL
    [dead] = os.listdir(tmp_path)
    assert dead.startswith(".entry.tmp@") and os.listdir(tmp_path / dead) == ["a.npy"]
    # Another host's writer may be alive although this host can lock its folder (host-local locks).
    (tmp_path / ".entry.tmp@other-host@abc").mkdir()
    with fsutil.staged_dir(target) as live:  # a live writer of the same entry...
        (live / "a.npy").write_text("live")
        with fsutil.staged_dir(target) as other:  # ...is left alone by the next; the dead one is not
            assert sorted(os.listdir(tmp_path)) == sorted([live.name, other.name,
                                                           ".entry.tmp@other-host@abc"])
        assert (live / "a.npy").read_text() == "live"
    assert sorted(os.listdir(tmp_path)) == [".entry.tmp@other-host@abc", "entry"]
