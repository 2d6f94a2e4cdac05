"""Precomputed teacher outputs: one pass of the frozen teacher, memory-mapped for every student.

The original PKD code runs the fine-tuned teacher once over the training set and trains students
from the saved outputs. ``build_or_load`` does the same: it stores the teacher's logits and the
patient features of the mapped layers (their [CLS] vectors, or their means over the real tokens:
``bert.FEATURES``) as ``.npy`` files (never pickles) under a folder named by a fingerprint of
everything that determines them, and memory-maps them back. ``TeacherCache.add_to`` then fills a
host batch's ``teacher_logits`` [B, C] / ``teacher_features`` [B, M, H] by ``batch["index"]``, the
inputs of ``steps.make_distill_step``'s cached mode.

Entry layout (``<cache_dir>/<fingerprint>-<features dtype>/``): ``logits.npy`` float32 [N, C],
``features.npy`` [N, M, H] and ``manifest.json``, written into a temporary sibling folder and
renamed into place, so a killed build never leaves an entry that is later trusted (and the next
build deletes its leftovers: ``fsutil.staged_dir``). Runs sharing ``cache_dir`` may build the same
entry at once: the first complete one published stays, the others load it.

Precision: logits are kept in float32. Features are stored in float16 by default (half the
disk and host memory): round-to-nearest gives a relative error of at most 2^-11 ≈ 4.9e-4 per
value (BERT's LayerNorm outputs are far inside float16's ±65504 range), negligible next to the
patient loss, which compares L2-normalised vectors. Pass ``features_dtype=np.float32`` for exact values.

Multi-process runs: every process runs the teacher (the jitted forward is one global program),
outputs are gathered with ``process_allgather``, process 0 writes, and all processes load after a
barrier, so ``cache_dir`` must be on a filesystem every process can read.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from jax.typing import DTypeLike
from tqdm import tqdm

from pkd_jax import bert, data, evaluate, fsutil, partitioning, steps

FORMAT_VERSION = 3  # bump when the stored arrays' meaning changes (3: features of a chosen kind)
FEATURES_DTYPE = np.dtype(np.float16)  # the stored features' default dtype (Precision, above)
log = logging.getLogger(__name__)


# ============================================================================================
# Fingerprint
# ============================================================================================


def fingerprint(teacher_params: Any, tokenized: data.Tokenized, layer_map: Sequence[int],
                dtype: DTypeLike, architecture: str = "", features: str = "cls") -> str:
    """A key for the teacher outputs of ``tokenized``: changes with any of its inputs.

    Hashes every parameter's shape, dtype and bytes in pytree order (leaf by leaf, so host
    memory holds one leaf at a time; about a second per GB; an ``nnx.State`` and its pure dict
    agree), ``tokenized.fingerprint`` (data, tokenizer, max length), the token arrays the teacher
    reads (so a ``Tokenized`` sliced or built by hand under an old fingerprint cannot hit a stale
    entry; 0.4 GB for MNLI at length 128), the 1-indexed ``layer_map``, the compute dtype's name,
    ``architecture``, a text of the static settings that live in the graphdef, not the params
    (head count, activation, LayerNorm epsilon; e.g. ``repr(model.config)``), and the kind of
    ``features``.
    """
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps([FORMAT_VERSION, tokenized.fingerprint, [int(i) for i in layer_map],
                         jnp.dtype(dtype).name, architecture, features]).encode())
    for arr in (tokenized.input_ids, tokenized.token_type_ids, tokenized.lengths):
        arr = np.ascontiguousarray(arr, np.int32)
        h.update(json.dumps(arr.shape).encode())
        h.update(arr.reshape(-1).view(np.uint8))
    for leaf in jax.tree.leaves(teacher_params):  # dict keys are sorted: a stable order
        arr = np.ascontiguousarray(partitioning.to_host(leaf))
        h.update(json.dumps([arr.shape, arr.dtype.name]).encode())
        h.update(arr.reshape(-1).view(np.uint8))  # raw bytes, no copy
    return h.hexdigest()


# ============================================================================================
# The cache
# ============================================================================================


@dataclasses.dataclass(frozen=True, eq=False)
class TeacherCache:
    """Teacher outputs of every example, row i = example i of the ``Tokenized`` split.

    ``logits``: float32 [N, C]; ``features``: [N, M, H] in the stored dtype (both read-only
    memory maps). ``reused`` tells whether an existing entry was loaded instead of computed.
    """

    logits: np.ndarray
    features: np.ndarray
    fingerprint: str
    path: Path
    reused: bool

    def add_to(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """A copy of ``batch`` with the teacher outputs of its rows (by ``batch["index"]``).

        Meant for the host pipeline (e.g. a ``data.prefetch`` thread): shuffled or bucketed
        batches get exactly their own examples' outputs.
        """
        index = np.asarray(batch["index"])
        return {**batch,
                "teacher_logits": np.asarray(self.logits[index], np.float32),
                "teacher_features": np.asarray(self.features[index])}


def placeholder(num_labels: int, num_layers: int, hidden_size: int,
                features_dtype: DTypeLike = FEATURES_DTYPE) -> Callable[[Mapping[str, Any]], dict[str, Any]]:
    """An ``add_to`` that fills zeros of the shapes and dtypes ``TeacherCache.add_to`` gives: a
    cached step compiles for its batches before the teacher's pass has produced the outputs
    (a run compiles alongside the pass: ``Setup.teacher_pass``)."""
    features_dtype = np.dtype(features_dtype)

    def add_to(batch: Mapping[str, Any]) -> dict[str, Any]:
        rows = len(batch["index"])
        return {**batch, "teacher_logits": np.zeros((rows, num_labels), np.float32),
                "teacher_features": np.zeros((rows, num_layers, hidden_size), features_dtype)}

    return add_to


def _load(entry: Path, key: str, num_examples: int, layer_map: tuple[int, ...],
          features_dtype: np.dtype) -> TeacherCache | None:
    """The entry as memory maps if complete and matching, else None (the caller rebuilds)."""
    try:
        manifest = json.loads((entry / "manifest.json").read_text())
        if (manifest["format"] != FORMAT_VERSION or manifest["fingerprint"] != key
                or tuple(manifest["layer_map"]) != layer_map):
            return None
        c, hidden = manifest["num_labels"], manifest["hidden_size"]  # set by the teacher (key)
        expected = {"logits": ("float32", [num_examples, c]),
                    "features": (features_dtype.name, [num_examples, len(layer_map), hidden])}
        arrays = {}
        for name, (dtype, shape) in expected.items():
            # A truncated file fails here: its memory map would overrun the file.
            arr = np.load(entry / f"{name}.npy", mmap_mode="r", allow_pickle=False)
            if (arr.dtype.name, list(arr.shape)) != (dtype, shape):
                return None
            arrays[name] = arr
    except (OSError, ValueError, KeyError, TypeError):  # missing, garbled or truncated
        return None
    return TeacherCache(**arrays, fingerprint=key, path=entry, reused=True)


# ============================================================================================
# Building: one pass of the teacher
# ============================================================================================


def _teacher_outputs(graphdef, params, inputs, *, layer_map: tuple[int, ...], features: str,
                     features_dtype: np.dtype) -> tuple[jax.Array, jax.Array]:
    """float32 logits [B, C] and the mapped layers' features [B, M, H] in ``features_dtype``."""
    out = bert.apply(graphdef, params, inputs)
    mapped = out.features(features)[np.asarray(layer_map, np.int32) - 1]  # [l - 1] is after layer l
    # Cast on device: half the transfer for float16, and the same rounding as on the host.
    return out.logits.astype(jnp.float32), jnp.swapaxes(mapped, 0, 1).astype(features_dtype)


def _on_mesh(params: Any, mesh: Mesh) -> Any:
    """Replicate the params over the mesh, unless the caller already placed them there (FSDP)."""
    devices = set(mesh.devices.flat)
    replicated = partitioning.replicated(mesh)
    return jax.tree.map(
        lambda x: x if isinstance(x, jax.Array) and x.sharding.device_set == devices
        else jax.device_put(x, replicated), params)


def _open_arrays(folder: Path, shapes: Mapping[str, tuple[np.dtype, tuple[int, ...]]]
                 ) -> dict[str, np.ndarray]:
    """Writable .npy memory maps: MNLI-sized outputs never need to fit in host memory."""
    return {name: np.lib.format.open_memmap(folder / f"{name}.npy", mode="w+", dtype=dtype,
                                            shape=shape)
            for name, (dtype, shape) in shapes.items()}


def _compute(graphdef, params, tokenized: data.Tokenized, layer_map: tuple[int, ...], features: str,
             mesh: Mesh, batch_size: int, features_dtype: np.dtype, folder: Path | None,
             progress: bool) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """Run the teacher over every example; with ``folder``, write the rows there.

    Every process calls this (the forward is one global program); only the writer passes a
    folder. Returns the arrays' dtypes and shapes.
    """
    params = _on_mesh(params, mesh)
    jitted = jax.jit(functools.partial(_teacher_outputs, graphdef, layer_map=layer_map, features=features,
                                       features_dtype=features_dtype))
    spec = {k: jax.ShapeDtypeStruct((batch_size, tokenized.max_seq_length), jnp.int32)
            for k in data.MODEL_INPUTS}
    logits_spec, features_spec = jax.eval_shape(jitted, params, spec)
    # Every length bucket's program compiled side by side before the pass, not one after another
    # as the sorted batches reach each length (on a GPU each takes seconds, mostly on the host).
    run, start = steps.Precompiled(jitted, "teacher outputs"), time.perf_counter()
    compiled = steps.compile_all(evaluate.split_calls(run, params, tokenized, mesh, batch_size))
    log.info("compiled the teacher's forward for %d batch shape(s) in %.1f s", compiled, time.perf_counter() - start)
    n = len(tokenized)
    shapes = {"logits": (np.dtype(np.float32), (n, logits_spec.shape[1])),
              "features": (features_dtype, (n, *features_spec.shape[1:]))}
    arrays = _open_arrays(folder, shapes) if folder is not None else None
    filled = np.zeros(n, bool)

    def store(host: Mapping[str, np.ndarray], outputs: tuple[jax.Array, jax.Array]) -> None:
        logits, mapped = (partitioning.to_host(x) for x in outputs)  # blocks on this batch only
        real = host["weight"] > 0  # the last batch's filler rows point at row 0
        rows = host["index"][real]
        filled[rows] = True
        if arrays is not None:
            arrays["logits"][rows] = logits[real]
            arrays["features"][rows] = mapped[real]

    def split(batch: dict[str, np.ndarray]) -> tuple[dict, dict]:
        host = {k: batch[k] for k in ("index", "weight")}
        return host, partitioning.shard_batch({k: batch[k] for k in data.MODEL_INPUTS}, mesh)

    batches = data.prefetch(data.eval_batches(tokenized, batch_size, bucket=True), split)
    pending = None
    with batches, tqdm(total=math.ceil(n / batch_size), desc="teacher outputs", unit="batch",
                       disable=not progress or jax.process_index() != 0) as bar:
        for host, inputs in batches:
            outputs = run(params, inputs)  # dispatched asynchronously...
            if pending is not None:
                store(*pending)  # ...so the previous batch is copied out while this one runs
            pending = (host, outputs)
            bar.update()
        if pending is not None:
            store(*pending)
    if not filled.all():
        raise RuntimeError(f"teacher pass missed {int((~filled).sum())} of {n} examples")
    if arrays is not None:
        for name, arr in arrays.items():
            arr.flush()
            fsutil.fsync_file(folder / f"{name}.npy")
    return shapes


def _write_manifest(folder: Path, key: str, layer_map: tuple[int, ...], features: str, dtype_name: str,
                    shapes: Mapping[str, tuple[np.dtype, tuple[int, ...]]]) -> None:
    (n, c), (_, m, hidden) = shapes["logits"][1], shapes["features"][1]
    manifest = {
        "format": FORMAT_VERSION, "fingerprint": key, "num_examples": n, "num_labels": c,
        "num_layers": m, "hidden_size": hidden, "layer_map": list(layer_map), "features": features,
        "compute_dtype": dtype_name,
        "arrays": {name: [dtype.name, list(shape)] for name, (dtype, shape) in shapes.items()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    path = folder / "manifest.json"
    path.write_text(json.dumps(manifest, indent=1))
    fsutil.fsync_file(path)


def build_or_load(teacher_graphdef, teacher_params, tokenized: data.Tokenized,
                  layer_map: Sequence[int], *, mesh: Mesh, batch_size: int = 256,
                  cache_dir: str | os.PathLike | None = None, dtype_name: str = "float32",
                  architecture: str = "", features: str = "cls", features_dtype: DTypeLike = FEATURES_DTYPE,
                  progress: bool = True) -> TeacherCache:
    """The teacher's outputs on ``tokenized``: loaded if cached, else computed once and stored.

    ``layer_map``: 1-indexed teacher layers whose ``features`` ("cls" or "mean") are kept
    (``losses.layer_map``; empty for a 1-layer student: [N, 0, H]). ``dtype_name``: the
    teacher's compute dtype and ``architecture`` its static settings (``repr(model.config)``),
    both part of the fingerprint. ``cache_dir`` defaults to
    ``data.cache_root() / "teacher"``. ``batch_size`` must be a multiple of the mesh's devices.
    """
    layer_map = tuple(int(i) for i in layer_map)
    features_dtype = np.dtype(features_dtype)
    partitioning.check_batch_size(batch_size, mesh)
    key = fingerprint(teacher_params, tokenized, layer_map, dtype_name, architecture, features)
    root = Path(cache_dir) if cache_dir is not None else data.cache_root() / "teacher"
    entry = root / f"{key}-{features_dtype.name}"
    found = _load(entry, key, len(tokenized), layer_map, features_dtype)
    # Every process must take the same branch: the build below has collectives.
    if jax.process_count() > 1:
        found_everywhere = multihost_utils.process_allgather(np.int32(found is not None))
        if not found_everywhere.all():
            found = None
    if found is not None:
        log.info("teacher outputs reused from %s", entry)
        return found

    log.info("computing teacher outputs for %d examples into %s", len(tokenized), entry)
    if jax.process_index() == 0:  # the writer: a staged folder, published when complete
        # A concurrent run (a second student of the same teacher) may publish the entry first:
        # then ours is dropped and theirs, equal, is loaded; a complete entry is never replaced.
        def complete(path: Path) -> bool:
            return _load(path, key, len(tokenized), layer_map, features_dtype) is not None

        with fsutil.staged_dir(entry, keep=complete) as tmp:
            shapes = _compute(teacher_graphdef, teacher_params, tokenized, layer_map, features, mesh,
                              batch_size, features_dtype, tmp, progress)
            _write_manifest(tmp, key, layer_map, features, dtype_name, shapes)
    else:
        _compute(teacher_graphdef, teacher_params, tokenized, layer_map, features, mesh, batch_size,
                 features_dtype, None, progress)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"pkd_jax.teacher_cache:{key}")
    built = _load(entry, key, len(tokenized), layer_map, features_dtype)
    if built is None:
        raise RuntimeError(f"teacher cache entry {entry} unreadable after writing it; with "
                           "several processes, cache_dir must be on a shared filesystem")
    return dataclasses.replace(built, reused=False)
