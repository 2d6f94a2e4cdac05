"""Reading GLUE splits (a local folder in the official layout, the HuggingFace hub, TFDS) and
writing GLUE submission files.

``load_split`` returns a ``datasets.Dataset`` with columns ``idx``, ``text_a``, ``text_b``,
``label``; the three sources give identical output. Row order is the file's order and ``idx`` is
the row's position in its split, so predictions map back to GLUE's ``index`` column. Unlabeled
(test) rows have label -1. Malformed input raises ``GlueFormatError`` naming the file and line,
and so does a split without rows; ``check_trainable`` rejects a split a model cannot learn from.

Local files have no quoting: a line is one row, its fields split on tabs. Lines end at ``\n``
(other Unicode breaks such as U+2028 or U+0085 are text); every ``\r`` directly before it
belongs to the line ending, so a Windows (CRLF) copy of a file, or one where only some lines
were saved on Windows, reads exactly as the LF original. A consequence: the last column never
ends in ``\r`` (a text there written as ``"word\r"`` reads ``"word"``; tokenizers treat ``\r`` as
whitespace anyway), while a ``\r`` anywhere else is kept as text. A UTF-8 byte-order mark at the
start of a file is skipped (MRPC's train and dev files have one). A text that itself holds a tab
or a newline cannot be written in this format: its line has the wrong column count (reported)
or, rarely, reads as other rows that are well formed, which no reader can tell apart.
STS-B scores are plain decimals in [0, 5] (``"3.8"``, ``"4"``); ``nan``, ``inf`` and exponents
are rejected.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from pkd_jax import fsutil
from pkd_jax.errors import DataError
from pkd_jax.data.tasks import TaskSpec, check_split, get_task

# --------------------------------------------------------------------------------------------
# Loading: local GLUE folder
# --------------------------------------------------------------------------------------------


class GlueFormatError(DataError):
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
    check_split(spec, split)
    return Path(glue_dir) / spec.glue_name / _FILE_NAMES[split]


def _tsv_lines(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(1-based line number, fields) of a tab-separated file without quoting.

    Lines are split on ``\\n`` only: GLUE sentences may contain other Unicode line breaks.
    """
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith(_BOM):  # MRPC's files start with one
                raw = raw[len(_BOM):]
                if not raw:  # the file is only a BOM: no lines at all
                    return
            # Every \r before the \n is line ending (module docstring): CRLF reads as LF.
            raw = raw.removesuffix(b"\n").rstrip(b"\r")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise GlueFormatError(f"{path}:{lineno}: invalid UTF-8 ({err.reason})") from None
            yield lineno, line.split("\t")


# STS-B's files write scores as plain decimals; float() would also take "nan", "inf", " 3",
# "1_0" or Arabic-Indic digits, none of which is a score.
_SCORE = re.compile(r"[0-9]+(\.[0-9]*)?|\.[0-9]+")


def _parse_label(value: str, spec: TaskSpec, kind: str) -> int | float:
    if kind == "float":  # a ValueError is reported with the line by the caller
        if not _SCORE.fullmatch(value):
            raise ValueError(f"score {value!r} is not a decimal number such as 3.8")
        score = float(value)
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
    header_line = header is None
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
            raise GlueFormatError(
                f"{where}: column {header[col_index]!r} is {fields[col_index]!r}, expected the row "
                f"position {len(text_a)}: test rows are numbered 0, 1, 2, ... in file order, so a "
                "repeated, skipped or reordered index means a duplicated, lost or moved row")
        try:
            labels.append(_parse_label(fields[col_label], spec, layout.label_kind)
                          if col_label is not None else -1)
        except ValueError as err:
            raise GlueFormatError(f"{where}: {err}") from None
        text_a.append(fields[col_a])
        text_b.append(fields[col_b] if col_b is not None else None)
    if not text_a:
        found = "only a header line" if header_line else "the file is empty"
        raise GlueFormatError(f"{path}: no rows ({found}); a GLUE {task}/{split} file holds one "
                              "example per line: is it truncated, or the wrong file?")
    return {"idx": list(range(len(text_a))), "text_a": text_a, "text_b": text_b, "label": labels}


# --------------------------------------------------------------------------------------------
# Loading: HuggingFace hub and TFDS (same feature names: idx, label and the task's text features)
# --------------------------------------------------------------------------------------------


def _records_to_columns(task: str, columns: Mapping[str, Sequence], source: str) -> dict[str, list]:
    """Map HF/TFDS glue features to idx/text_a/text_b/label, in idx order, validated."""
    spec = get_task(task)
    feat_a, feat_b = spec.text_features
    if not any(len(values) for values in columns.values()):
        raise GlueFormatError(f"{source}: no records; a GLUE split needs at least one example")
    missing = [f for f in ("idx", "label", feat_a, feat_b) if f is not None and f not in columns]
    if missing:
        raise GlueFormatError(f"{source}: missing feature(s) {missing} for task {task!r}; "
                              f"found {sorted(columns)}")
    idx = _check_idx(columns["idx"], source)
    order = np.argsort(idx, kind="stable")  # TFDS stores examples shuffled

    def text(feature: str, i: int) -> str:
        value = columns[feature][i]
        value = value.decode("utf-8") if isinstance(value, bytes) else value
        if not isinstance(value, str) or not value.strip():
            raise GlueFormatError(f"{source}: idx {int(idx[i])}: empty or non-text {feature!r}: "
                                  f"{value!r}")
        return value

    def label(i: int) -> int | float:
        value = columns["label"][i]
        number = isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
        if number and value == -1:
            return -1.0 if spec.is_regression else -1
        if spec.is_regression:
            if not (number and 0.0 <= value <= 5.0):  # False for NaN
                raise GlueFormatError(f"{source}: idx {int(idx[i])}: score {value!r} is not a "
                                      "finite number in [0, 5] (or -1 for unlabeled)")
            return float(value)
        if not (number and value in range(spec.num_labels)):
            raise GlueFormatError(f"{source}: idx {int(idx[i])}: unknown label {value!r} "
                                  f"(expected 0..{spec.num_labels - 1}, or -1 for unlabeled)")
        return int(value)

    order_list = order.tolist()
    return {
        "idx": list(range(len(order_list))),
        "text_a": [text(feat_a, i) for i in order_list],
        "text_b": [text(feat_b, i) if feat_b else None for i in order_list],
        "label": [label(i) for i in order_list],
    }


def _check_idx(values: Sequence, source: str) -> np.ndarray:
    """The records' idx as int64, which must be 0..n-1 each once (any order); names a bad one."""
    idx = np.asarray(values)
    if idx.dtype.kind not in "iu":  # a float or text idx would be truncated or misread
        raise GlueFormatError(f"{source}: idx values must be integers, got {idx.dtype} "
                              f"(first: {list(values[:1])!r})")
    idx = idx.astype(np.int64)
    unique, counts = np.unique(idx, return_counts=True)
    if (counts > 1).any():
        value, count = int(unique[counts > 1][0]), int(counts[counts > 1][0])
        raise GlueFormatError(f"{source}: idx {value} occurs {count} times; each of the "
                              f"{len(idx)} records needs its own idx in 0..{len(idx) - 1} "
                              "(a record duplicated?)")
    outside = idx[(idx < 0) | (idx >= len(idx))]
    if outside.size:
        raise GlueFormatError(f"{source}: idx {int(outside[0])} is outside 0..{len(idx) - 1}, "
                              f"the idx values of {len(idx)} records (a record missing?)")
    return idx


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
        raise DataError(
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
    check_split(spec, split)
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


def check_trainable(dataset: datasets.Dataset, task: str, where: str) -> None:
    """Raise ``DataError`` unless a (subsampled) train or dev split can train and be scored.

    A split needs rows, and its labels must vary: two classes at least (one class trains a
    constant and leaves F1/MCC undefined), or two different STS-B scores (the Pearson
    correlation of constant scores is undefined). Unlabeled rows (label -1) are not checked, so
    a test split passes. ``where`` names the split in the message, e.g. ``"train (SST-2)"``.
    """
    spec = get_task(task)
    fix = "check the file, or raise train_examples / eval_examples"
    if len(dataset) == 0:
        raise DataError(f"{where}: no examples; training and the dev metric need some: {fix}")
    labels = [label for label in dataset["label"] if label != -1]
    if not labels or len(set(labels)) > 1:
        return
    if spec.is_regression:
        raise DataError(f"{where}: all {len(labels)} examples have score {labels[0]:g}; the "
                        f"Pearson correlation of constant scores is undefined: {fix}")
    name = spec.label_names[int(labels[0])]
    raise DataError(f"{where}: all {len(labels)} examples have label {name!r}; training and the "
                    f"dev metric need at least two classes: {fix}")


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
    check_split(spec, split)
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
    lines = ["index\tprediction"] + [f"{int(i)}\t{v}" for i, v in zip(idx[order], values)]
    return fsutil.write_text(path, "\n".join(lines) + "\n")
