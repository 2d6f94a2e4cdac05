"""Atomic writes: a file or folder is published whole or not at all."""

import os

import pytest

from pkd_jax import fsutil


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
