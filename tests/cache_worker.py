"""Builds the tokenised and teacher caches in forked children that die or wait at chosen file steps.

Used by tests/test_cache_crash.py: ``python tests/cache_worker.py PLAN.json``. The parent imports
everything and loads the tokenizer and the rows once, without starting JAX, then forks one child
per run (a fresh JAX backend each), so a dozen SIGKILLed builds cost one interpreter start-up.
A child counts the file-system steps of the caches (``Hooks``) and, at the named step, SIGKILLs
itself, waits for another child's signal file, or writes one. The parent writes
``{"runs": [...], "together": [...]}``: each child's exit code, negative for a signal as
``subprocess`` reports it.

Plan: ``{"tokenizer": dir, "glue": dir, "out": file, "runs": [run, ...], "together": [run, ...]}``:
``runs`` one after the other (the machine has two cores), then ``together`` all at once;
run: ``{"root": cache dir, "log": steps file, "result": json file, "kill": step, "pause": {step:
file to wait for}, "signal": {step: file to create}, "ready": file, "barrier": [files], "done":
file}``: a child creates ``ready``, waits for every ``barrier`` file, builds, writes ``result``
and creates ``done``.
A step is ``<cache>:<operation>:<name>:<when>``, e.g. ``tokenized:save:labels.npy:after``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pathlib
import re
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from pkd_jax import bert, checkpoints, data, fsutil, partitioning, steps, teacher_cache

ROWS, MAX_LEN, BATCH, LAYER_MAP = 256, 32, 64, (1, 2)  # 4 batches of 8 rows on each of 8 devices
WAIT_S = 300  # for another child to reach a step: generous, CI machines are shared


def sst2_rows(glue_dir):
    return data.load_split("sst2", "train", glue_dir).select(range(ROWS))


def tiny_teacher():
    """A random 2-layer BERT, hidden 32, with seeded numpy weights (no JAX computation to make)."""
    config = bert.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=64, max_position_embeddings=MAX_LEN)
    model = nnx.eval_shape(lambda: bert.BertForSequenceClassification(config, rngs=nnx.Rngs(0)))
    graphdef, shapes = nnx.split(model, nnx.Param)
    rng = np.random.default_rng(0)
    return graphdef, jax.tree.map(lambda s: rng.normal(0, 0.2, s.shape).astype(s.dtype), shapes)


def build(tokenizer, rows, root: Path):
    """Both caches under ``root``, as a run with ``PKD_JAX_CACHE=root`` builds them."""
    tok = data.tokenize(rows, tokenizer, MAX_LEN, cache_dir=root / "tokenized")
    cache = teacher_cache.build_or_load(*tiny_teacher(), tok, LAYER_MAP, mesh=partitioning.make_mesh(),
                                        batch_size=BATCH, cache_dir=root / "teacher", progress=False)
    return tok, cache


def digest(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).view(np.uint8).tobytes())
    return h.hexdigest()


class Hooks:
    """Wraps the calls the caches write with and names each step under ``root``."""

    def __init__(self, run: dict):
        self.root = Path(run["root"]).resolve()
        self.run, self.batches = run, 0
        self.real = {"save": np.save, "memmap": np.lib.format.open_memmap, "rename": os.rename,
                     "mkdtemp": tempfile.mkdtemp, "write": pathlib.Path.write_text,
                     "batch": steps.Precompiled.__call__}
        np.save, np.lib.format.open_memmap, os.rename = self.save, self.memmap, self.rename
        tempfile.mkdtemp = self.mkdtemp
        pathlib.Path.write_text = lambda path, *args, **kwargs: self.write(path, *args, **kwargs)
        steps.Precompiled.__call__ = lambda fn, *args: self.batch(fn, *args)  # the teacher's forward

    def _cache(self, path) -> str | None:
        path = Path(os.fspath(path)).resolve()
        if self.root in path.parents:
            return path.relative_to(self.root).parts[0]
        return None

    def step(self, cache: str, op: str, name: str, when: str) -> None:
        step = f"{cache}:{op}:{name}:{when}"
        with open(self.run["log"], "a") as f:
            f.write(step + "\n")
        if step in self.run.get("signal", {}):
            Path(self.run["signal"][step]).touch()
        if step in self.run.get("pause", {}):
            wait_for([self.run["pause"][step]])
        if step == self.run.get("kill"):
            os.kill(os.getpid(), signal.SIGKILL)

    def killing_inside(self, cache, op, name) -> bool:
        return self.run.get("kill") == f"{cache}:{op}:{name}:inside"

    def save(self, file, arr, *args, **kwargs):
        path = getattr(file, "name", file)
        cache, name = self._cache(path), Path(path).name
        if cache is None:
            return self.real["save"](file, arr, *args, **kwargs)
        self.step(cache, "save", name, "before")
        if self.killing_inside(cache, "save", name):  # what a kill mid-write leaves: half a file
            buf = io.BytesIO()
            self.real["save"](buf, arr, *args, **kwargs)
            file.write(buf.getvalue()[:len(buf.getvalue()) // 2])
            file.flush()
        self.step(cache, "save", name, "inside")
        self.real["save"](file, arr, *args, **kwargs)
        self.step(cache, "save", name, "after")

    def write(self, path, text, *args, **kwargs):
        cache = self._cache(path)
        if cache is None:
            return self.real["write"](path, text, *args, **kwargs)
        self.step(cache, "write", path.name, "before")
        if self.killing_inside(cache, "write", path.name):
            self.real["write"](path, text[:len(text) // 2], *args, **kwargs)
        self.step(cache, "write", path.name, "inside")
        out = self.real["write"](path, text, *args, **kwargs)
        self.step(cache, "write", path.name, "after")
        return out

    def memmap(self, filename, *args, **kwargs):
        out = self.real["memmap"](filename, *args, **kwargs)
        if (cache := self._cache(filename)) is not None:
            self.step(cache, "memmap", Path(filename).name, "after")
        return out

    def mkdtemp(self, *args, **kwargs):
        out = self.real["mkdtemp"](*args, **kwargs)
        if (cache := self._cache(out)) is not None:
            kind = re.search(r"\.(\w+)@[^@]*@\w+$", out).group(1)  # fsutil's .<entry>.tmp@<host>@*
            self.step(cache, "mkdtemp", kind, "after")
        return out

    def rename(self, src, dst, *args, **kwargs):
        cache = self._cache(dst)
        if cache is None:
            return self.real["rename"](src, dst, *args, **kwargs)
        name = "aside" if Path(dst).parent.name.startswith(".") else "publish"
        self.step(cache, "rename", name, "before")
        try:
            self.real["rename"](src, dst, *args, **kwargs)
        except OSError:
            self.step(cache, "rename", name, "failed")
            raise
        self.step(cache, "rename", name, "after")

    def batch(self, fn, *args):
        self.batches += 1
        self.step("teacher", "batch", str(self.batches), "before")
        return self.real["batch"](fn, *args)


def wait_for(paths) -> None:
    deadline = time.monotonic() + WAIT_S
    while not all(Path(p).exists() for p in paths):
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {WAIT_S} s for {paths}")
        time.sleep(0.01)


def child(run: dict, tokenizer, rows) -> None:
    Hooks(run)
    if "ready" in run:
        Path(run["ready"]).touch()
    wait_for(run.get("barrier", []))
    tok, cache = build(tokenizer, rows, Path(run["root"]))
    tok_manifest = Path(run["root"], "tokenized").glob(f"*-{tok.fingerprint}/manifest.json")
    result = {
        "reused": cache.reused, "path": str(cache.path),
        "tokenized": digest(tok.input_ids, tok.token_type_ids, tok.lengths, tok.labels, tok.idx),
        "teacher": digest(cache.logits, cache.features),
        "inodes": {"tokenized": os.stat(next(tok_manifest)).st_ino,
                   "teacher": os.stat(cache.path / "logits.npy").st_ino}}
    fsutil.write_text(run["result"], json.dumps(result))
    if "done" in run:
        Path(run["done"]).touch()


def fork(run: dict, tokenizer, rows) -> int:
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            child(run, tokenizer, rows)
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            sys.stderr.flush()
            os._exit(code)
    return pid


def status(pid: int) -> int:
    _, code = os.waitpid(pid, 0)
    return -os.WTERMSIG(code) if os.WIFSIGNALED(code) else os.WEXITSTATUS(code)


def main(plan_file: str) -> None:
    plan = json.loads(Path(plan_file).read_text())
    tokenizer = checkpoints.load_tokenizer(plan["tokenizer"])
    rows = sst2_rows(plan["glue"])
    codes = {"runs": [status(fork(run, tokenizer, rows)) for run in plan["runs"]]}
    pids = [fork(run, tokenizer, rows) for run in plan["together"]]
    codes["together"] = [status(pid) for pid in pids]
    fsutil.write_text(plan["out"], json.dumps(codes))


if __name__ == "__main__":
    main(sys.argv[1])
