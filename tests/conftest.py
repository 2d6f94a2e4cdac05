"""Shared fixtures. Four fake CPU devices so sharded steps (data x fsdp meshes, 2 x 2) are tested
without hardware: each device holds its own copy of a replicated array and runs its own optimizer
update, so more fake devices cost memory and time (8 devices measured 12.9 GB peak for one file)."""

import atexit
import contextlib
import ctypes
import gc
import os
import shutil
import tempfile
from pathlib import Path

# LLVM at -O1 instead of -O2 for XLA:CPU's generated code, here and in every subprocess (they inherit
# the environment): much of the suite is compilation, and a MiniLM train step compiled in 4.1 s
# instead of 6.7 s and ran as fast (204 against 208 ms; the matmuls are library calls), and
# test_pipeline's teacher run took 117 s instead of 133 s. Users' runs and the benchmarks keep the default.
os.environ["XLA_FLAGS"] = " ".join(filter(None, (os.environ.get("XLA_FLAGS"), "--xla_backend_optimization_level=1")))

import jax  # noqa: E402  (after XLA_FLAGS: the backend reads them when it starts)
import pytest

jax.config.update("jax_num_cpu_devices", 4)
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ["PKD_JAX_CACHE"] = tempfile.mkdtemp(prefix="pkd_jax_test_cache_")  # never ~/.cache
atexit.register(shutil.rmtree, os.environ["PKD_JAX_CACHE"], ignore_errors=True)  # nor left in /tmp
# Compiled programs are shared by the many small runs of the suite (and its subprocesses).
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(os.environ["PKD_JAX_CACHE"], "xla")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])

# The slowest files, slowest first (durations of the suite on 2026-12-01, summed per file, less what
# 8883978 saved): they start first, so the two xdist workers end together. pytest collects a
# directory in name order whatever the command line's order is.
SLOW_FIRST = ("test_pipeline.py", "test_reliability.py", "test_multiprocess.py", "test_reproduce.py",
              "test_sweep.py", "test_steps.py", "test_accel_check.py", "test_multitask.py",
              "test_benchmarks.py", "test_bert.py", "test_objectives.py", "test_task_metrics_end_to_end.py",
              "test_checks.py", "test_losses.py", "test_loop.py", "test_partitioning.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))  # stable: file order kept


@pytest.fixture(autouse=True, scope="module")
def _release_memory_after_each_file():
    """An xdist worker runs file after file in one process: drop each file's compiled programs and
    return the freed heap to the system, or the worker's memory only grows (measured 12.5 GB)."""
    yield
    jax.clear_caches()
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc keeps freed memory otherwise
    except (OSError, AttributeError):
        pass  # not glibc: nothing to trim


@contextlib.contextmanager
def _first_device_only():
    from pkd_jax import partitioning

    make_mesh = partitioning.make_mesh
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(partitioning, "make_mesh",
                   lambda fsdp=1, devices=None: make_mesh(fsdp, jax.devices()[:1] if devices is None else devices))
        yield


@pytest.fixture(scope="session")
def one_device():
    """A context manager: runs started inside it (their mesh comes from `partitioning.make_mesh`) use
    the first fake device alone. For tests of what a run does, not of how it is sharded (test_steps,
    test_partitioning and test_sweep's vmapped step do that): each device applies the replicated
    optimizer update to its own copy, so four pay for it four times, and test_reliability took
    190 s instead of 245 s on one device (2026-12-01)."""
    return _first_device_only


REPO = Path(__file__).resolve().parents[1]
GLUE_DIR = REPO.parent / "shared" / "glue"


@pytest.fixture(scope="session")
def glue_dir() -> Path:
    assert (GLUE_DIR / "SST-2" / "train.tsv").exists(), f"real GLUE files expected at {GLUE_DIR}"
    return GLUE_DIR


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    from pkd_jax import checkpoints

    return checkpoints.resolve("minilm-l6")


@pytest.fixture(scope="session")
def sst2_teacher_dir(minilm_dir, tmp_path_factory) -> Path:
    """The MiniLM with a seeded, untrained SST-2 head: a teacher for tests of mechanics, not accuracy
    (a run refuses a teacher without a classifier)."""
    from pkd_jax import checkpoints

    model = checkpoints.load_pretrained(minilm_dir, num_labels=2, label_names=("negative", "positive"))
    return checkpoints.save_pretrained(model, tmp_path_factory.mktemp("sst2_teacher"),
                                       checkpoints.load_tokenizer(minilm_dir))


@pytest.fixture(scope="session")
def tokenizer(minilm_dir):
    from pkd_jax import checkpoints

    return checkpoints.load_tokenizer(minilm_dir)


@pytest.fixture(scope="session")
def stsb_teacher_dir(minilm_dir, tmp_path_factory) -> Path:
    """The MiniLM with a seeded, untrained one-output (regression) head: an STS-B teacher for tests
    of mechanics, like sst2_teacher_dir."""
    from pkd_jax import checkpoints

    model = checkpoints.load_pretrained(minilm_dir, num_labels=1)
    return checkpoints.save_pretrained(model, tmp_path_factory.mktemp("stsb_teacher"),
                                       checkpoints.load_tokenizer(minilm_dir))
