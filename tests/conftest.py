"""Shared fixtures. Eight fake CPU devices so sharded steps are tested without hardware."""

import os
import tempfile
from pathlib import Path

import jax
import pytest

jax.config.update("jax_num_cpu_devices", 8)
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ["PKD_JAX_CACHE"] = tempfile.mkdtemp(prefix="pkd_jax_test_cache_")  # never ~/.cache
# Compiled programs are shared by the many small runs of the suite (and its subprocesses).
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(os.environ["PKD_JAX_CACHE"], "xla")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])

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
def tokenizer(minilm_dir):
    from pkd_jax import checkpoints

    return checkpoints.load_tokenizer(minilm_dir)
