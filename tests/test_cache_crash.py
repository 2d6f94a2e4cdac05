"""Crash consistency and concurrency of the tokenised and teacher caches, with real processes.

tests/cache_worker.py forks builds of both caches (256 real SST-2 rows, a random 2-layer BERT
teacher, 8 CPU devices) that SIGKILL themselves at a chosen file-system step, or race a second
build of the same entries. The next build here must reuse only what was published, rebuild the
rest bit for bit equal to an uninterrupted build, and leave no temporary folder behind.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests import cache_worker
from pkd_jax.data import tokenization

REPO = Path(__file__).resolve().parents[1]

# One child each, in build order: the tokenised cache's steps, then the teacher cache's.
KILLS = [
    "tokenized:mkdtemp:tmp:after",  # an empty staged folder
    "tokenized:save:input_ids.npy:inside",  # half of the first array
    "tokenized:save:labels.npy:after",  # some arrays, no manifest
    "tokenized:write:manifest.json:inside",  # every array, half a manifest
    "tokenized:rename:publish:before",  # complete, not yet renamed into place
    "tokenized:rename:publish:after",  # published: the next run reuses it
    "teacher:memmap:features.npy:after",  # both arrays allocated, no rows yet
    "teacher:batch:3:before",  # the first batch's rows written, the second's forward dispatched
    "teacher:write:manifest.json:inside",
    "teacher:rename:publish:before",
    "teacher:rename:publish:after",
]


def _launch(tmp: Path, runs: list[dict], together: list[dict], tokenizer_dir, glue_dir) -> dict:
    plan = {"tokenizer": str(tokenizer_dir), "glue": str(glue_dir), "runs": runs,
            "together": together, "out": str(tmp / "status.json")}
    (tmp / "plan.json").write_text(json.dumps(plan))
    # Compiled programs of any size go to the suite's cache: one child compiles, the rest load.
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "8",
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "cache_worker.py"),
                           str(tmp / "plan.json")], cwd=REPO, env=env, timeout=600,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.returncode == 0, proc.stdout[-5000:]
    return json.loads((tmp / "status.json").read_text())


def _race_runs(tmp: Path) -> list[dict]:
    """A and B build the same entries from a shared root. Each time, A stops mid-write until B
    has published (for the teacher: until B has loaded its entry and returned), and B starts
    writing only once A is mid-write, so both have missed the entry and A loses the race."""
    f = {k: str(tmp / k) for k in ("a_tok", "b_tok", "a_teacher", "b_done", "a_ready", "b_ready")}
    common = {"root": str(tmp / "shared"), "barrier": [f["a_ready"], f["b_ready"]]}
    a = {**common, "log": str(tmp / "a.log"), "result": str(tmp / "a.json"), "ready": f["a_ready"],
         "signal": {"tokenized:save:input_ids.npy:after": f["a_tok"],
                    "teacher:memmap:features.npy:after": f["a_teacher"]},
         "pause": {"tokenized:save:input_ids.npy:after": f["b_tok"],
                   "teacher:memmap:features.npy:after": f["b_done"]}}
    b = {**common, "log": str(tmp / "b.log"), "result": str(tmp / "b.json"), "ready": f["b_ready"],
         "done": f["b_done"], "signal": {"tokenized:rename:publish:after": f["b_tok"]},
         "pause": {"tokenized:mkdtemp:tmp:after": f["a_tok"],
                   "teacher:mkdtemp:tmp:after": f["a_teacher"]}}
    return [a, b]


@pytest.fixture(scope="module")
def sst2(glue_dir):
    return cache_worker.sst2_rows(glue_dir)


@pytest.fixture(scope="module")
def workers(tmp_path_factory, minilm_dir, glue_dir):
    """The killed builds, then the race, from one worker process: each run and its exit code."""
    tmp = tmp_path_factory.mktemp("workers")
    kills = [{"root": str(tmp / f"k{i}"), "log": str(tmp / f"k{i}.log"),
              "result": str(tmp / f"k{i}.json"), "kill": step} for i, step in enumerate(KILLS)]
    race = _race_runs(tmp)
    codes = _launch(tmp, kills, race, minilm_dir, glue_dir)
    return {"kills": list(zip(kills, codes["runs"])), "race": list(zip(race, codes["together"]))}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tokenizer, sst2):
    """Digests of both caches from one uninterrupted build in this process."""
    tok, cache = cache_worker.build(tokenizer, sst2, tmp_path_factory.mktemp("reference"))
    assert not cache.reused and np.ptp(cache.logits) > 0.1  # distinct outputs per example
    return _digests(tok, cache)


def _digests(tok, cache):
    return {"tokenized": cache_worker.digest(tok.input_ids, tok.token_type_ids, tok.lengths,
                                             tok.labels, tok.idx),
            "teacher": cache_worker.digest(cache.logits, cache.features)}


def _listing(root: Path) -> dict[str, list[str]]:
    return {d.name: sorted(os.listdir(d)) for d in sorted(root.iterdir())}


@pytest.mark.parametrize("step", KILLS)
def test_killed_build_is_not_trusted_and_rebuilds_bit_for_bit(step, workers, reference, tokenizer,
                                                              sst2, monkeypatch):
    run, code = next((run, code) for run, code in workers["kills"] if run["kill"] == step)
    assert code == -signal.SIGKILL
    assert Path(run["log"]).read_text().splitlines()[-1] == step  # it died exactly there
    root, killed_cache = Path(run["root"]), step.split(":")[0]
    published = step.endswith(":rename:publish:after")
    left = _listing(root)
    encodes = []
    real_encode = tokenization._encode
    monkeypatch.setattr(tokenization, "_encode", lambda *a: encodes.append(1) or real_encode(*a))
    tok, cache = cache_worker.build(tokenizer, sst2, root)
    tokenized_reused = not encodes
    assert tokenized_reused == (killed_cache == "teacher" or published)
    assert cache.reused == (killed_cache == "teacher" and published)
    assert _digests(tok, cache) == reference  # equal to an uninterrupted build, bit for bit
    if not published:  # the killed build's staged folder was left...
        assert any(".tmp@" in name for name in left[killed_cache]), left
    # ...and the rebuild deleted it: each cache holds its one entry.
    entries = {"teacher": [cache.path.name],
               "tokenized": [f"sst2-train-L{cache_worker.MAX_LEN}-{tok.fingerprint}"]}
    assert _listing(root) == entries


def test_two_runs_building_one_entry_at_once_both_succeed(workers, reference):
    (a, a_code), (b, b_code) = workers["race"]
    assert (a_code, b_code) == (0, 0)
    results = [json.loads(Path(r["result"]).read_text()) for r in (a, b)]
    for r in results:
        assert {k: r[k] for k in reference} == reference
        assert r["reused"] is False  # both ran the teacher (their entries were missing)
    a_steps, b_steps = (Path(r["log"]).read_text().splitlines() for r in (a, b))
    # A's renames onto B's published entries failed; A dropped its copies and loaded B's files,
    # B's entries were never moved (a complete entry is never replaced under a reader).
    for cache in ("tokenized", "teacher"):
        assert f"{cache}:rename:publish:failed" in a_steps
        assert f"{cache}:rename:publish:after" in b_steps
    assert not [s for s in a_steps + b_steps if ":rename:aside:" in s]
    root = Path(a["root"])
    on_disk = {"tokenized": os.stat(next((root / "tokenized").glob("[!.]*/manifest.json"))).st_ino,
               "teacher": os.stat(Path(results[1]["path"]) / "logits.npy").st_ino}
    assert results[0]["inodes"] == results[1]["inodes"] == on_disk
    assert all(len(names) == 1 and not names[0].startswith(".")
               for names in _listing(root).values())  # no temporary folder left
