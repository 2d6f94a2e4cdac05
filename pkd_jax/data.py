"""GLUE data: task registry, loading, tokenisation, batching and submission files.

The pipeline is ``load_split`` (a ``datasets.Dataset`` with columns ``idx``, ``text_a``,
``text_b``, ``label``, from a local GLUE folder, the HuggingFace hub or TFDS) -> ``tokenize``
(numpy arrays, cached on disk) -> ``train_batches`` / ``eval_batches`` (host batches of numpy
arrays) -> ``prefetch`` (placement on devices in a background thread).

Conventions: labels follow the HuggingFace ``glue`` ids (see ``TASKS``); STS-B labels are float
scores; unlabeled (test) rows have label -1. Row order is the file's order and ``idx`` is the
row's position in its split, so predictions map back to GLUE's ``index`` column.

This is the only module that imports ``datasets``, ``tensorflow_datasets`` and ``tokenizers``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import queue
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import tokenizers

# --------------------------------------------------------------------------------------------
# Task registry
# --------------------------------------------------------------------------------------------

_SPLITS = ("train", "validation", "test")
_MNLI_SPLITS = (
    "train",
    "validation_matched",
    "validation_mismatched",
    "test_matched",
    "test_mismatched",
)


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """One GLUE task.

    ``label_names[i]`` is the name of class id ``i`` (HuggingFace ``glue`` ids); empty for the
    regression task STS-B. ``text_features`` are the HF/TFDS feature names of text_a and text_b.
    """

    name: str
    glue_name: str
    label_names: tuple[str, ...]
    is_regression: bool
    splits: tuple[str, ...]
    metric_names: tuple[str, ...]
    text_features: tuple[str, str | None]

    @property
    def num_labels(self) -> int:
        """Model outputs: 1 for regression, else the number of classes."""
        return 1 if self.is_regression else len(self.label_names)

    @property
    def is_pair(self) -> bool:
        return self.text_features[1] is not None


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("cola", "CoLA", ("unacceptable", "acceptable"), False, _SPLITS,
                 ("matthews_correlation",), ("sentence", None)),
        TaskSpec("sst2", "SST-2", ("negative", "positive"), False, _SPLITS,
                 ("accuracy",), ("sentence", None)),
        TaskSpec("mrpc", "MRPC", ("not_equivalent", "equivalent"), False, _SPLITS,
                 ("accuracy", "f1"), ("sentence1", "sentence2")),
        TaskSpec("qqp", "QQP", ("not_duplicate", "duplicate"), False, _SPLITS,
                 ("accuracy", "f1"), ("question1", "question2")),
        TaskSpec("stsb", "STS-B", (), True, _SPLITS,
                 ("pearson", "spearmanr"), ("sentence1", "sentence2")),
        TaskSpec("mnli", "MNLI", ("entailment", "neutral", "contradiction"), False,
                 _MNLI_SPLITS, ("accuracy",), ("premise", "hypothesis")),
        TaskSpec("qnli", "QNLI", ("entailment", "not_entailment"), False, _SPLITS,
                 ("accuracy",), ("question", "sentence")),
        TaskSpec("rte", "RTE", ("entailment", "not_entailment"), False, _SPLITS,
                 ("accuracy",), ("sentence1", "sentence2")),
        TaskSpec("wnli", "WNLI", ("not_entailment", "entailment"), False, _SPLITS,
                 ("accuracy",), ("sentence1", "sentence2")),
    )
}


def get_task(name: str) -> TaskSpec:
    """The spec of a GLUE task by its lower-case name (``"rte"``, ``"sst2"``, ...)."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown GLUE task {name!r}; valid tasks: {', '.join(TASKS)}") from None


def dev_split(task: str) -> str:
    """The split a task is evaluated on: MNLI's matched dev set, every other task's dev set."""
    return "validation_matched" if task == "mnli" else "validation"


def _check_split(spec: TaskSpec, split: str) -> None:
    if split not in spec.splits:
        raise ValueError(
            f"unknown split {split!r} for task {spec.name!r}; "
            f"valid splits: {', '.join(spec.splits)}"
        )


# --------------------------------------------------------------------------------------------
# Loading: local GLUE folder
# --------------------------------------------------------------------------------------------


class GlueFormatError(ValueError):
    """A GLUE file (or hub/TFDS record) that cannot be read faithfully; names file and line."""


@dataclasses.dataclass(frozen=True)
class _TsvLayout:
    """Where a task's fields sit in the official GLUE TSV files (columns picked by header name)."""

    text_a: str
    text_b: str | None
    label: str
    label_kind: str  # "int" ("0"/"1"), "name" (label_names), "float" (STS-B score)
    test_index: str = "index"  # test files: this column must equal the row position
    # CoLA's train/dev files have no header line; this stands in for it.
    implicit_header: tuple[str, ...] | None = None


_LAYOUTS: dict[str, _TsvLayout] = {
    "cola": _TsvLayout("sentence", None, "label", "int",
                       implicit_header=("source", "label", "original_label", "sentence")),
    "sst2": _TsvLayout("sentence", None, "label", "int"),
    "mrpc": _TsvLayout("#1 String", "#2 String", "Quality", "int"),
    "qqp": _TsvLayout("question1", "question2", "is_duplicate", "int", test_index="id"),
    "stsb": _TsvLayout("sentence1", "sentence2", "score", "float"),
    "mnli": _TsvLayout("sentence1", "sentence2", "gold_label", "name"),
    "qnli": _TsvLayout("question", "sentence", "label", "name"),
    "rte": _TsvLayout("sentence1", "sentence2", "label", "name"),
    "wnli": _TsvLayout("sentence1", "sentence2", "label", "int"),
}

_FILE_NAMES = {
    "train": "train.tsv",
    "validation": "dev.tsv",
    "test": "test.tsv",
    "validation_matched": "dev_matched.tsv",
    "validation_mismatched": "dev_mismatched.tsv",
    "test_matched": "test_matched.tsv",
    "test_mismatched": "test_mismatched.tsv",
}

_BOM = b"\xef\xbb\xbf"


def glue_file(task: str, split: str, glue_dir: str | os.PathLike) -> Path:
    """Path of a split in the official GLUE download layout, e.g. ``<glue_dir>/RTE/dev.tsv``."""
    spec = get_task(task)
    _check_split(spec, split)
    return Path(glue_dir) / spec.glue_name / _FILE_NAMES[split]


def _tsv_lines(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(1-based line number, fields) of a tab-separated file without quoting.

    Lines are split on ``\\n`` only: GLUE sentences may contain other Unicode line breaks.
    """
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith(_BOM):  # MRPC's files start with one
                raw = raw[len(_BOM):]
            raw = raw.rstrip(b"\n").removesuffix(b"\r")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise GlueFormatError(f"{path}:{lineno}: invalid UTF-8 ({err.reason})") from None
            yield lineno, line.split("\t")


def _parse_label(value: str, spec: TaskSpec, kind: str) -> int | float:
    if kind == "float":
        score = float(value)  # ValueError is reported with the line by the caller
        if not 0.0 <= score <= 5.0:
            raise ValueError(f"score {value!r} outside [0, 5]")
        return score
    if kind == "name" and value in spec.label_names:
        return spec.label_names.index(value)
    if kind == "int" and value in {str(i) for i in range(spec.num_labels)}:
        return int(value)
    expected = spec.label_names if kind == "name" else tuple(range(spec.num_labels))
    raise ValueError(f"unknown label {value!r} (expected one of {expected})")


def _read_local(task: str, split: str, glue_dir: str | os.PathLike) -> dict[str, list]:
    spec, layout = get_task(task), _LAYOUTS[task]
    path = glue_file(task, split, glue_dir)
    if not path.is_file():
        raise GlueFormatError(
            f"{path}: missing GLUE file for {task}/{split} "
            f"(expected the official layout <glue_dir>/{spec.glue_name}/{path.name})"
        )
    labeled = not split.startswith("test")
    lines = _tsv_lines(path)
    header = layout.implicit_header if labeled else None
    if header is None:
        first = next(lines, None)
        if first is None:
            raise GlueFormatError(f"{path}:1: empty file, expected a header line")
        header = tuple(first[1])
    wanted = [layout.text_a, layout.text_b, layout.label if labeled else layout.test_index]
    missing = [name for name in wanted if name is not None and name not in header]
    if missing:
        raise GlueFormatError(f"{path}:1: header {list(header)} lacks column(s) {missing}")
    col_a = header.index(layout.text_a)
    col_b = header.index(layout.text_b) if layout.text_b else None
    col_label = header.index(layout.label) if labeled else None
    col_index = None if labeled else header.index(layout.test_index)

    text_a: list[str] = []
    text_b: list[str | None] = []
    labels: list[int | float] = []
    for lineno, fields in lines:
        where = f"{path}:{lineno}"
        if len(fields) != len(header):
            raise GlueFormatError(f"{where}: expected {len(header)} tab-separated columns, "
                                  f"found {len(fields)}")
        for col in (col_a, col_b):
            if col is not None and not fields[col].strip():
                raise GlueFormatError(f"{where}: empty text in column {header[col]!r}")
        if col_index is not None and fields[col_index] != str(len(text_a)):
            raise GlueFormatError(f"{where}: column {header[col_index]!r} is "
                                  f"{fields[col_index]!r}, expected the row position {len(text_a)}")
        try:
            labels.append(_parse_label(fields[col_label], spec, layout.label_kind)
                          if col_label is not None else -1)
        except ValueError as err:
            raise GlueFormatError(f"{where}: {err}") from None
        text_a.append(fields[col_a])
        text_b.append(fields[col_b] if col_b is not None else None)
    return {"idx": list(range(len(text_a))), "text_a": text_a, "text_b": text_b, "label": labels}


# --------------------------------------------------------------------------------------------
# Loading: HuggingFace hub and TFDS (same feature names: idx, label and the task's text features)
# --------------------------------------------------------------------------------------------


def _records_to_columns(task: str, columns: Mapping[str, Sequence], source: str) -> dict[str, list]:
    """Map HF/TFDS glue features to idx/text_a/text_b/label, in idx order, validated."""
    spec = get_task(task)
    feat_a, feat_b = spec.text_features
    missing = [f for f in ("idx", "label", feat_a, feat_b) if f is not None and f not in columns]
    if missing:
        raise GlueFormatError(f"{source}: missing feature(s) {missing} for task {task!r}; "
                              f"found {sorted(columns)}")
    idx = np.asarray(columns["idx"], dtype=np.int64)
    order = np.argsort(idx, kind="stable")  # TFDS stores examples shuffled
    if not np.array_equal(idx[order], np.arange(len(idx))):
        raise GlueFormatError(f"{source}: idx values are not a permutation of 0..{len(idx) - 1}")

    def text(feature: str, i: int) -> str:
        value = columns[feature][i]
        value = value.decode("utf-8") if isinstance(value, bytes) else value
        if not isinstance(value, str) or not value.strip():
            raise GlueFormatError(f"{source}: idx {int(idx[i])}: empty or non-text {feature!r}: "
                                  f"{value!r}")
        return value

    def label(i: int) -> int | float:
        value = columns["label"][i]
        if value == -1:
            return -1.0 if spec.is_regression else -1
        ok = (0.0 <= value <= 5.0) if spec.is_regression else value in range(spec.num_labels)
        if not ok:
            raise GlueFormatError(f"{source}: idx {int(idx[i])}: unknown label {value!r}")
        return float(value) if spec.is_regression else int(value)

    order_list = order.tolist()
    return {
        "idx": list(range(len(order_list))),
        "text_a": [text(feat_a, i) for i in order_list],
        "text_b": [text(feat_b, i) if feat_b else None for i in order_list],
        "label": [label(i) for i in order_list],
    }


def from_hf_glue(task: str, dataset: datasets.Dataset,
                 split: str | None = None) -> datasets.Dataset:
    """Convert a HuggingFace ``nyu-mll/glue`` split (its feature names) to this module's columns."""
    columns = dataset[:]  # dict of lists, one per HF feature
    source = f"hf nyu-mll/glue {task}/{split}"
    return _to_dataset(task, split, _records_to_columns(task, columns, source), "hf")


def from_tfds_glue(task: str, examples: Iterable[Mapping[str, Any]],
                   split: str | None = None) -> datasets.Dataset:
    """Convert TFDS ``glue/<task>`` examples (numpy dicts, bytes text) to this module's columns."""
    columns: dict[str, list] = {}
    for example in examples:
        for name, value in example.items():
            columns.setdefault(name, []).append(value.item() if isinstance(value, np.generic)
                                                else value)
    source = f"tfds glue/{task} {split}"
    return _to_dataset(task, split, _records_to_columns(task, columns, source), "tfds")


def _load_hf(task: str, split: str) -> datasets.Dataset:
    try:
        raw = datasets.load_dataset("nyu-mll/glue", task, split=split)
    except Exception as err:  # offline, hub down, cache miss: all need the same advice
        raise RuntimeError(
            f"could not load GLUE {task}/{split} from the HuggingFace hub (nyu-mll/glue): "
            f"{type(err).__name__}: {err}\nOffline? Pass glue_dir= (a local folder in the official "
            f"GLUE download layout, e.g. glue_dir='GLUE/' holding {get_task(task).glue_name}/...)."
        ) from err
    return from_hf_glue(task, raw, split)


def _load_tfds(task: str, split: str) -> datasets.Dataset:
    try:
        import tensorflow_datasets as tfds
    except ImportError as err:
        raise ImportError(
            "source='tfds' needs TensorFlow Datasets, which is optional: "
            "pip install tensorflow-datasets"
        ) from err
    return from_tfds_glue(task, tfds.as_numpy(tfds.load(f"glue/{task}", split=split)), split)


def _to_dataset(task: str, split: str | None, columns: dict[str, list],
                source: str) -> datasets.Dataset:
    spec = get_task(task)
    features = datasets.Features({
        "idx": datasets.Value("int32"),
        "text_a": datasets.Value("string"),
        "text_b": datasets.Value("string"),
        "label": datasets.Value("float32" if spec.is_regression else "int32"),
    })
    info = datasets.DatasetInfo(description=f"GLUE {task} {split} ({source})", config_name=task,
                                features=features)
    return datasets.Dataset.from_dict(columns, info=info, split=split)


def load_split(task: str, split: str, glue_dir: str | os.PathLike | None = None,
               source: str | None = None) -> datasets.Dataset:
    """One GLUE split as a ``datasets.Dataset`` with columns idx, text_a, text_b, label.

    ``source``: ``"local"`` (a folder in the official GLUE download layout, ``glue_dir``),
    ``"hf"`` (``datasets.load_dataset("nyu-mll/glue", task)``) or ``"tfds"`` (``glue/<task>``,
    needs tensorflow-datasets); ``None`` means local when ``glue_dir`` is given, else hf.
    ``text_b`` is None for single-sentence tasks; ``label`` is the HF glue class id (float for
    stsb), -1 for unlabeled test rows. Raises ``GlueFormatError`` (a ValueError naming file and
    line) on malformed input.
    """
    spec = get_task(task)
    _check_split(spec, split)
    source = source or ("local" if glue_dir is not None else "hf")
    if source == "local":
        if glue_dir is None:
            raise ValueError("source='local' needs glue_dir= (a folder in the GLUE layout)")
        return _to_dataset(task, split, _read_local(task, split, glue_dir), "local")
    if glue_dir is not None:
        raise ValueError(f"glue_dir= is only read with source='local', not source={source!r}")
    if source == "hf":
        return _load_hf(task, split)
    if source == "tfds":
        return _load_tfds(task, split)
    raise ValueError(f"unknown source {source!r}; valid sources: local, hf, tfds")


# --------------------------------------------------------------------------------------------
# Tokenisation (cached on disk)
# --------------------------------------------------------------------------------------------

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
    """Write into a temporary folder, then rename: readers never see a partial entry."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.tmp-", dir=entry.parent))
    try:
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
        if entry.exists():  # a stale or corrupt entry (a valid one was returned earlier)
            shutil.rmtree(entry, ignore_errors=True)
        try:
            os.rename(tmp, entry)
        except OSError:  # another process won the race; its entry is equally valid
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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


# --------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------

_BUCKET_WINDOW = 50  # batches per length-sorting window: similar lengths, still well mixed


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Full batches per epoch; the remainder is dropped (it is reshuffled in next epoch)."""
    return num_examples // batch_size


def bucket_sizes(max_seq_length: int, buckets: Sequence[int] | None = None) -> tuple[int, ...]:
    """The padded lengths batches may have: ``buckets`` (default multiples of 32) up to the max."""
    if buckets is None:
        buckets = range(32, max_seq_length, 32)
    if any(int(b) <= 0 for b in buckets):
        raise ValueError(f"bucket lengths must be positive, got {list(buckets)}")
    return tuple(sorted({int(b) for b in buckets if b < max_seq_length} | {max_seq_length}))


def _make_batch(tok: Tokenized, rows: np.ndarray, length: int,
                batch_size: int) -> dict[str, np.ndarray]:
    """Rows ``rows`` padded to ``length`` tokens; missing rows up to ``batch_size`` get weight 0."""
    n = len(rows)
    input_ids = np.full((batch_size, length), tok.pad_id, np.int32)
    input_ids[:n] = tok.input_ids[rows, :length]
    token_type_ids = np.zeros((batch_size, length), np.int32)
    token_type_ids[:n] = tok.token_type_ids[rows, :length]
    lengths = np.zeros(batch_size, np.int32)
    lengths[:n] = tok.lengths[rows]
    labels = np.zeros(batch_size, tok.labels.dtype)
    labels[:n] = tok.labels[rows]
    index = np.zeros(batch_size, np.int32)
    index[:n] = rows
    weight = np.zeros(batch_size, np.float32)
    weight[:n] = 1.0
    return {
        "input_ids": input_ids,
        "token_type_ids": token_type_ids,
        "attention_mask": (np.arange(length) < lengths[:, None]).astype(np.int32),
        "labels": labels,
        "index": index,
        "weight": weight,
    }


def _batch_length(tok: Tokenized, rows: np.ndarray, sizes: tuple[int, ...]) -> int:
    return sizes[int(np.searchsorted(sizes, tok.lengths[rows].max()))]


def _epoch_plan(lengths: np.ndarray, batch_size: int, seed: int, epoch: int,
                bucket: bool) -> np.ndarray:
    """Rows of every batch of one epoch, [steps_per_epoch, batch_size]; a function of its args."""
    rng = np.random.default_rng([seed, epoch])
    num_steps = steps_per_epoch(len(lengths), batch_size)
    order = rng.permutation(len(lengths))[: num_steps * batch_size]
    if not bucket:
        return order.reshape(num_steps, batch_size)
    window = _BUCKET_WINDOW * batch_size  # a multiple of batch_size: no batch spans two windows
    for start in range(0, len(order), window):
        chunk = order[start:start + window]
        order[start:start + window] = chunk[np.argsort(lengths[chunk], kind="stable")]
    return order.reshape(num_steps, batch_size)[rng.permutation(num_steps)]


def train_batches(tok: Tokenized, batch_size: int, seed: int, *, start_step: int = 0,
                  bucket: bool = True, buckets: Sequence[int] | None = None
                  ) -> Iterator[dict[str, np.ndarray]]:
    """Endless training batches; the batch of global step s depends only on (data, batch_size,
    seed, s), so resuming with ``start_step=s`` continues the same stream.

    Each epoch is a fresh seeded permutation (remainder dropped). With ``bucket``, examples are
    sorted by length inside windows of 50 batches, the batch order is shuffled, and each batch
    is padded to the smallest of ``bucket_sizes(max_seq_length, buckets)`` that fits it;
    otherwise every batch is [batch_size, max_seq_length].
    """
    num_steps = steps_per_epoch(len(tok), batch_size)
    if num_steps == 0:
        raise ValueError(f"batch_size={batch_size} exceeds the {len(tok)} examples")
    if seed < 0 or start_step < 0:
        raise ValueError(f"seed and start_step must be >= 0, got {seed}, {start_step}")
    sizes = bucket_sizes(tok.max_seq_length, buckets) if bucket else (tok.max_seq_length,)
    plan_epoch, plan = -1, np.empty(0)
    for step in itertools.count(start_step):
        epoch, pos = divmod(step, num_steps)
        if epoch != plan_epoch:
            plan_epoch, plan = epoch, _epoch_plan(tok.lengths, batch_size, seed, epoch, bucket)
        rows = plan[pos]
        yield _make_batch(tok, rows, _batch_length(tok, rows, sizes), batch_size)


def eval_batches(tok: Tokenized, batch_size: int, *, bucket: bool = True,
                 buckets: Sequence[int] | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Every example exactly once, in ``math.ceil(len(tok) / batch_size)`` batches.

    The last batch is filled up to ``batch_size`` with rows of weight 0 (all padding, index 0).
    With ``bucket`` the rows are ordered by length, so use ``batch["index"]`` to map outputs back.
    """
    sizes = bucket_sizes(tok.max_seq_length, buckets) if bucket else (tok.max_seq_length,)
    order = np.argsort(tok.lengths, kind="stable") if bucket else np.arange(len(tok))
    for start in range(0, len(tok), batch_size):
        rows = order[start:start + batch_size]
        yield _make_batch(tok, rows, _batch_length(tok, rows, sizes), batch_size)


# --------------------------------------------------------------------------------------------
# Prefetching
# --------------------------------------------------------------------------------------------

_ITEM, _END, _ERROR = range(3)


def _put(q: queue.Queue, item: tuple[int, Any], stop: threading.Event) -> bool:
    """Blocking put that gives up once ``stop`` is set; returns whether the item was queued."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.05)
            return True
        except queue.Full:
            continue
    return False


def _prefetch_worker(iterator: Iterator, place_fn: Callable | None, q: queue.Queue,
                     stop: threading.Event) -> None:
    # Holds no reference to the Prefetcher, so dropping the Prefetcher ends this thread.
    try:
        for item in iterator:
            if not _put(q, (_ITEM, place_fn(item) if place_fn else item), stop):
                return
        _put(q, (_END, None), stop)
    except BaseException as err:  # handed to the consumer, which re-raises it
        _put(q, (_ERROR, err), stop)


class Prefetcher(Iterator[Any]):
    """Iterates ``iterator`` in a background thread, ``size`` items (after ``place_fn``) ahead.

    Exceptions of the worker re-raise in the consumer; ``close()`` (or leaving a ``with``
    block, or dropping the object) stops the worker.
    """

    def __init__(self, iterator: Iterable, place_fn: Callable | None = None, size: int = 2):
        self._stop = threading.Event()  # first: __del__ needs it even if __init__ raises
        if size < 1:
            raise ValueError(f"prefetch size must be >= 1, got {size}")
        self._queue: queue.Queue = queue.Queue(maxsize=size)
        self._done = False
        self._thread = threading.Thread(
            target=_prefetch_worker, args=(iter(iterator), place_fn, self._queue, self._stop),
            name="pkd_jax-prefetch", daemon=True)
        self._thread.start()

    def __next__(self) -> Any:
        if self._done:
            raise StopIteration
        kind, value = self._queue.get()
        if kind == _ITEM:
            return value
        self.close()
        if kind == _ERROR:
            raise value
        raise StopIteration

    def close(self) -> None:
        self._done = True
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self._stop.set()


def prefetch(iterator: Iterable, place_fn: Callable | None = None, size: int = 2) -> Prefetcher:
    """Background prefetching of ``iterator``, applying ``place_fn`` (e.g. ``jax.device_put``)."""
    return Prefetcher(iterator, place_fn, size)


# --------------------------------------------------------------------------------------------
# GLUE submission files
# --------------------------------------------------------------------------------------------

_SUBMISSION_NAMES = {"test_matched": "MNLI-m", "test_mismatched": "MNLI-mm"}
_NAMED_PREDICTIONS = {"mnli", "qnli", "rte"}  # GLUE's server expects label names for these


def write_glue_predictions(task: str, predictions: Sequence | np.ndarray,
                           indices: Sequence | np.ndarray, out_dir: str | os.PathLike,
                           split: str | None = None) -> Path:
    """Write the GLUE server file ``<out_dir>/<Task>.tsv`` (``index\\tprediction``, sorted).

    ``predictions`` are class ids (scores for stsb, clipped to [0, 5]); ``indices`` the rows' idx.
    ``split`` defaults to ``test``; MNLI needs ``test_matched`` or ``test_mismatched``.
    """
    spec = get_task(task)
    split = split or "test"
    _check_split(spec, split)
    if not split.startswith("test"):
        raise ValueError(f"GLUE submissions are for test splits, got {split!r}")
    preds = np.asarray(predictions)
    idx = np.asarray(indices)
    if preds.shape != idx.shape or preds.ndim != 1:
        raise ValueError(f"predictions {preds.shape} and indices {idx.shape} "
                         "must be 1-D of equal length")
    if len(np.unique(idx)) != len(idx):
        raise ValueError("indices contain duplicates")
    order = np.argsort(idx, kind="stable")
    if spec.is_regression:
        if not np.all(np.isfinite(preds)):
            raise ValueError("stsb predictions contain NaN or infinity")
        values = [f"{v:.3f}" for v in np.clip(preds[order].astype(np.float64), 0.0, 5.0)]
    else:
        ids = preds[order]
        if not np.all(np.isin(ids, np.arange(spec.num_labels))):
            raise ValueError(f"predictions must be class ids in 0..{spec.num_labels - 1}")
        names = spec.label_names if task in _NAMED_PREDICTIONS else None
        values = [names[int(i)] if names else str(int(i)) for i in ids]
    path = Path(out_dir) / f"{_SUBMISSION_NAMES.get(split, spec.glue_name)}.tsv"
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["index\tprediction"] + [f"{int(i)}\t{v}" for i, v in zip(idx[order], values)]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path
