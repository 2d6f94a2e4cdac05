"""Tokenisation of GLUE splits as BERT inputs, cached on disk as .npy arrays.

``tokenize`` turns a ``load_split`` dataset into a ``Tokenized`` split (int32 arrays padded to
``max_seq_length``), exactly as ``tokenizer(a, b, truncation=True, max_length=L)`` would, and keeps
it under ``$PKD_JAX_CACHE/tokenized`` keyed by a fingerprint of the tokenizer, the data and the
length: a second run (or a second student) loads it back. Entries are published whole
(``fsutil.staged_dir``): a killed run leaves none that is trusted, and runs tokenising the same
split at once both succeed, keeping the first entry published.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import tokenizers

from pkd_jax import fsutil

_CACHE_FORMAT = 1  # bump when the cached arrays' meaning changes
_ARRAYS = ("input_ids", "token_type_ids", "lengths", "labels", "idx")
_ENCODE_CHUNK = 8192  # rows per encode_batch call: bounds the memory of Encoding objects


@dataclasses.dataclass(frozen=True, eq=False)
class Tokenized:
    """A tokenised split: right-padded to ``max_seq_length`` (pad id ``pad_id``).

    ``input_ids``/``token_type_ids``: int32 [N, L]; ``lengths`` (real tokens incl. specials),
    ``idx``: int32 [N]; ``labels``: int32 [N] (float32 for regression, -1 when unlabeled).
    """

    input_ids: np.ndarray
    token_type_ids: np.ndarray
    lengths: np.ndarray
    labels: np.ndarray
    idx: np.ndarray
    num_truncated: int
    fingerprint: str
    pad_id: int

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def max_seq_length(self) -> int:
        return self.input_ids.shape[1]

    @property
    def is_regression(self) -> bool:
        return self.labels.dtype.kind == "f"


def cache_root() -> Path:
    """``$PKD_JAX_CACHE`` or ``~/.cache/pkd_jax``: tokenised splits and teacher outputs live here."""
    return Path(os.environ.get("PKD_JAX_CACHE") or Path.home() / ".cache" / "pkd_jax")


def default_cache_dir() -> Path:
    """``cache_root() / "tokenized"``."""
    return cache_root() / "tokenized"


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    # The backend JSON holds vocab, normalizer (lower-casing) and special-token template; its
    # truncation/padding entries are call state that transformers leaves behind, not content.
    config = json.loads(tokenizer.backend_tokenizer.to_str())
    config.pop("truncation", None)
    config.pop("padding", None)
    return hashlib.blake2b(json.dumps(config, sort_keys=True).encode(), digest_size=16).hexdigest()


def _fingerprint(columns: Mapping[str, list], tokenizer: Any, max_seq_length: int,
                 label_dtype: np.dtype) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps([_CACHE_FORMAT, _tokenizer_fingerprint(tokenizer), tokenizer.pad_token_id,
                         max_seq_length, str(label_dtype)]).encode())
    for name in ("text_a", "text_b"):
        h.update(json.dumps(columns[name], ensure_ascii=False).encode())
    h.update(np.asarray(columns["label"], label_dtype).tobytes())
    h.update(np.asarray(columns["idx"], np.int64).tobytes())
    return h.hexdigest()


def _encode(columns: Mapping[str, list], tokenizer: Any, max_seq_length: int) -> dict[str, Any]:
    # A private copy of the Rust tokenizer so the caller's truncation/padding state is untouched;
    # this is exactly what transformers' tokenizer(a, b, truncation=True, max_length=L) runs.
    backend = tokenizers.Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.no_padding()
    backend.enable_truncation(max_seq_length, strategy="longest_first")
    pair = any(b is not None for b in columns["text_b"])
    inputs = list(zip(columns["text_a"], columns["text_b"])) if pair else columns["text_a"]
    ids: list[list[int]] = []
    types: list[list[int]] = []
    num_truncated = 0
    for start in range(0, len(inputs), _ENCODE_CHUNK):
        chunk = inputs[start:start + _ENCODE_CHUNK]
        for enc in backend.encode_batch(chunk, add_special_tokens=True):
            ids.append(enc.ids)
            types.append(enc.type_ids)
            num_truncated += bool(enc.overflowing)
    lengths = np.fromiter(map(len, ids), np.int32, count=len(ids))
    mask = np.arange(max_seq_length) < lengths[:, None]  # row-major, so flat tokens fill in order
    input_ids = np.full((len(ids), max_seq_length), tokenizer.pad_token_id, np.int32)
    input_ids[mask] = np.fromiter(itertools.chain.from_iterable(ids), np.int32, count=mask.sum())
    token_type_ids = np.zeros((len(ids), max_seq_length), np.int32)
    token_type_ids[mask] = np.fromiter(itertools.chain.from_iterable(types), np.int32,
                                       count=mask.sum())
    return {"input_ids": input_ids, "token_type_ids": token_type_ids, "lengths": lengths,
            "num_truncated": num_truncated}


def _load_cached(entry: Path, fingerprint: str) -> Tokenized | None:
    """The cache entry if complete and matching, else None (the caller rebuilds it)."""
    try:
        manifest = json.loads((entry / "manifest.json").read_text())
        if manifest["fingerprint"] != fingerprint:
            return None
        arrays = {}
        for name in _ARRAYS:
            arr = np.load(entry / f"{name}.npy", allow_pickle=False)
            if [str(arr.dtype), list(arr.shape)] != manifest["arrays"][name]:
                return None
            arrays[name] = arr
        return Tokenized(**arrays, num_truncated=manifest["num_truncated"],
                         fingerprint=fingerprint, pad_id=manifest["pad_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_cache(entry: Path, tok: Tokenized, meta: Mapping[str, Any]) -> None:
    """Write the arrays and their manifest into a staged folder: readers never see a partial entry.

    If a concurrent run publishes the entry first, ours is dropped and theirs (equal) stays.
    """
    def complete(path: Path) -> bool:
        return _load_cached(path, tok.fingerprint) is not None

    with fsutil.staged_dir(entry, keep=complete) as tmp:
        for name in _ARRAYS:
            with open(tmp / f"{name}.npy", "wb") as f:
                np.save(f, getattr(tok, name), allow_pickle=False)
                f.flush()
                os.fsync(f.fileno())
        manifest = {**meta, "fingerprint": tok.fingerprint, "num_truncated": tok.num_truncated,
                    "pad_id": tok.pad_id, "num_rows": len(tok),
                    "arrays": {n: [str(getattr(tok, n).dtype), list(getattr(tok, n).shape)]
                               for n in _ARRAYS}}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))


def tokenize(dataset: datasets.Dataset, tokenizer: Any, max_seq_length: int,
             cache_dir: str | os.PathLike | None = None) -> Tokenized:
    """Tokenise a ``load_split`` dataset as BERT inputs, cached on disk.

    ``tokenizer`` is a fast transformers tokenizer. Single sentences become ``[CLS] a [SEP]``,
    pairs ``[CLS] a [SEP] b [SEP]`` with token_type_ids 0/1, truncated ``longest_first`` to
    ``max_seq_length`` (identical to ``tokenizer(a, b, truncation=True, max_length=L)``).
    The cache (``cache_dir``, default ``default_cache_dir()``) is keyed by a fingerprint of the
    tokenizer's content, the data's content (text, labels, idx) and ``max_seq_length``; entries
    are .npy arrays plus a JSON manifest, written atomically.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError("tokenize needs a fast (Rust-backed) transformers tokenizer")
    specials = tokenizer.num_special_tokens_to_add(pair=True)
    if max_seq_length <= specials:
        raise ValueError(f"max_seq_length={max_seq_length} leaves no room for text "
                         f"after {specials} special tokens")
    columns = dataset[:]
    label_dtype = np.dtype(np.float32 if dataset.features["label"].dtype.startswith("float")
                           else np.int32)
    fingerprint = _fingerprint(columns, tokenizer, max_seq_length, label_dtype)
    task, split = dataset.info.config_name or "data", dataset.split or "split"
    entry_name = f"{task}-{split}-L{max_seq_length}-{fingerprint}"
    entry = Path(cache_dir or default_cache_dir()) / entry_name
    cached = _load_cached(entry, fingerprint)
    if cached is not None:
        return cached
    encoded = _encode(columns, tokenizer, max_seq_length)
    tok = Tokenized(
        input_ids=encoded["input_ids"],
        token_type_ids=encoded["token_type_ids"],
        lengths=encoded["lengths"],
        labels=np.asarray(columns["label"], label_dtype),
        idx=np.asarray(columns["idx"], np.int32),
        num_truncated=encoded["num_truncated"],
        fingerprint=fingerprint,
        pad_id=int(tokenizer.pad_token_id),
    )
    _write_cache(entry, tok, {"format": _CACHE_FORMAT, "task": task, "split": str(split),
                              "max_seq_length": max_seq_length,
                              "tokenizer": str(getattr(tokenizer, "name_or_path", ""))})
    return tok

