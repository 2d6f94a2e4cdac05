"""Property-based tests of the local GLUE reader (pkd_jax.data.load_split with glue_dir).

Rows of hostile text are written as GLUE writes them (fields joined by tabs, lines by \\n; here
also CRLF, a BOM, no final newline). The reader must return exactly those rows or raise
GlueFormatError naming the first bad line: never a shifted, merged or dropped row. The expected
outcome is computed here, from the rows, without the reader's helpers. Normalisation (glue.py's
docstring): every \\r before a line's \\n is line ending, so the last column loses trailing \\r.
"""

import dataclasses
import re

import numpy as np
import pytest
from hypothesis import event, given, settings, strategies as st

from pkd_jax import data

# Text characters: quotes, a backslash, \r, Unicode line breaks that are not GLUE line breaks
# (U+2028, U+0085, U+000B, U+001E), a no-break space, a combining mark, an emoji, a stray BOM.
SAFE = list("ab .'\"\\\r") + ["\u2028", "\u0085", "\x0b", "\x1e", "\xa0", "\u0301", "\U0001F600",
                              "\ufeff"]
BREAKING = ["\t", "\n"]  # cannot be written in an unquoted TSV: the row must not read back silently
SETTINGS = settings(derandomize=True, deadline=None, max_examples=150, database=None)


@dataclasses.dataclass(frozen=True)
class Layout:
    task: str
    split: str
    path: str
    header: tuple[str, ...] | None  # None: CoLA's header-less train/dev files
    text_a: int
    text_b: int | None
    label: int | None  # None: a test file
    good_labels: tuple[str, ...]
    bad_labels: tuple[str, ...]
    index: int | None = None  # a test file's index column, which must be the row position


INT_BAD = ("2", "-1", "01", " 1", "1.0", "", "true", "1\r")  # "1\r" is good in the last column
LAYOUTS = {
    "sst2_train": Layout("sst2", "train", "SST-2/train.tsv", ("sentence", "label"), 0, None, 1,
                         ("0", "1"), INT_BAD),
    "rte_train": Layout("rte", "train", "RTE/train.tsv", ("index", "sentence1", "sentence2", "label"),
                        1, 2, 3, ("entailment", "not_entailment"),
                        ("neutral", "Entailment", "0", "", " entailment", "entailment\r")),
    "mrpc_train": Layout("mrpc", "train", "MRPC/train.tsv",
                         ("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"), 3, 4, 0,
                         ("0", "1"), INT_BAD),
    "stsb_dev": Layout("stsb", "validation", "STS-B/dev.tsv",
                       ("index", "genre", "filename", "year", "old_index", "source1", "source2",
                        "sentence1", "sentence2", "score"), 7, 8, 9,
                       ("0", "5", "5.000", "3.8", "0.25", ".5", "4.", "2.400"),
                       ("nan", "NaN", "inf", "-inf", "-Infinity", "Infinity", "5.001", "-0.5",
                        "1e0", " 3", "3_0", "\u0663", "+3", "", ".", "3.8\r")),
    "cola_train": Layout("cola", "train", "CoLA/train.tsv", None, 3, None, 1, ("0", "1"), INT_BAD),
    "sst2_test": Layout("sst2", "test", "SST-2/test.tsv", ("index", "sentence"), 1, None, None,
                        (), (), index=0),
}


def good_label(layout: Layout, value: str, last: bool) -> bool:
    """The task's label rules, restated: names or ids verbatim, STS-B a plain decimal in [0, 5]."""
    if last:
        value = value.rstrip("\r")
    if layout.task != "stsb":
        return value in (("entailment", "not_entailment") if layout.task == "rte" else ("0", "1"))
    digits = value.replace(".", "", 1)
    return (value not in ("", ".") and value.isascii() and digits.isdigit()
            and 0 <= float(value) <= 5)


def label_value(layout: Layout, value: str) -> float:
    value = value.rstrip("\r")
    if layout.task == "stsb":
        return float(np.float32(float(value)))
    return ("entailment", "not_entailment").index(value) if layout.task == "rte" else int(value)


@st.composite
def files(draw, layout: Layout):
    """(fields of each row, bytes of the file) for a layout. Half the files are well formed; the
    others have one kind of fault (blank or unwritable texts, bad labels, bad indices), so that a
    fault is rarely hidden behind an earlier one."""
    faults = ["texts"] + (["labels"] if layout.label is not None else []) + \
        (["index"] if layout.index is not None else [])
    fault = draw(st.sampled_from(["none"] * len(faults) + faults))
    safe = st.text(st.sampled_from(SAFE), max_size=8)
    # A letter somewhere keeps the text from being blank.
    text = st.builds(lambda x, c, y: x + c + y, safe, st.sampled_from("ab\U0001F600"), safe)
    if fault == "texts":
        text = st.one_of(text, safe, st.text(st.sampled_from(SAFE + BREAKING), max_size=8))
    label = st.sampled_from(layout.good_labels or ("",))
    n = draw(st.integers(0 if fault != "none" else 1, 8))
    faulty = draw(st.integers(0, max(n - 1, 0)))  # the row with the bad label or index
    width = len(layout.header) if layout.header else 4
    rows = []
    for i in range(n):
        fields = [str(i) if c == 0 else "x" for c in range(width)]  # ids, genres, ...
        if layout.header is None:
            fields[0], fields[2] = "gj04", draw(st.sampled_from(["", "*"]))
        for col in (layout.text_a, layout.text_b):
            if col is not None:
                fields[col] = draw(text)
        if layout.label is not None:
            bad = fault == "labels" and i == faulty
            fields[layout.label] = draw(st.sampled_from(layout.bad_labels) if bad else label)
        if fault == "index" and i == faulty:  # duplicated, skipped, ...
            fields[layout.index] = draw(st.sampled_from(["0", str(i + 1), str(i - 1), "", f"{i} "]))
        rows.append(fields)
    crlf, bom, final = draw(st.booleans()), draw(st.booleans()), draw(st.booleans())
    end = "\r\n" if crlf else "\n"
    lines = ([["\t".join(layout.header)]] if layout.header else []) + rows
    body = end.join("\t".join(fields) for fields in lines) + (end if final and lines else "")
    return rows, ("\ufeff" if bom else "").encode() + body.encode()


def expected(layout: Layout, rows: list[list[str]]):
    """("rows", text_a, text_b, labels) or ("line", n) or ("empty",), from the rows alone;
    None when a text holds a tab or newline (the bytes then say something else)."""
    if any("\t" in f or "\n" in f for fields in rows for f in fields):
        return None
    first = 2 if layout.header else 1
    last = (len(layout.header) if layout.header else 4) - 1  # the column that loses trailing \r
    a, b, labels = [], [], []
    for i, fields in enumerate(rows):
        texts = [fields[c] for c in (layout.text_a, layout.text_b) if c is not None]
        texts = [t.rstrip("\r") if c == last else t
                 for t, c in zip(texts, (layout.text_a, layout.text_b))]
        ok = all(t.strip() for t in texts)
        if layout.label is not None:
            ok = ok and good_label(layout, fields[layout.label], layout.label == last)
        if layout.index is not None:
            ok = ok and fields[layout.index] == str(i)
        if not ok:
            return ("line", first + i)
        a.append(texts[0])
        b.append(texts[1] if len(texts) > 1 else None)
        labels.append(label_value(layout, fields[layout.label]) if layout.label is not None else -1)
    return ("rows", a, b, labels) if rows else ("empty",)


def expected_from_bytes(layout: Layout, content: bytes):
    """The same outcome read from the bytes: one row per \\n-terminated line."""
    text = content.decode().removeprefix("\ufeff")
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()  # the final newline ends the last line
    if layout.header:
        lines = lines[1:]
    width = len(layout.header) if layout.header else 4
    rows = [line.rstrip("\r").split("\t") for line in lines]
    for i, fields in enumerate(rows):
        if len(fields) != width:
            return ("line", (2 if layout.header else 1) + i)
        outcome = expected(layout, rows[:i + 1])
        if outcome[0] == "line":
            return outcome
    return expected(layout, rows)


def outcome_of_reader(layout: Layout, root) -> tuple:
    path = root / layout.path
    try:
        got = data.load_split(layout.task, layout.split, root)[:]
    except data.GlueFormatError as err:
        message = str(err)
        if message.startswith(f"{path}: no rows"):
            return ("empty",)
        match = re.match(rf"{re.escape(str(path))}:(\d+): ", message)
        assert match, message
        return ("line", int(match.group(1)))
    assert got["idx"] == list(range(len(got["idx"])))
    return ("rows", got["text_a"], got["text_b"], got["label"])


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("glue_fuzz")


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_reader_returns_the_written_rows_or_names_the_first_bad_line(root, name):
    layout = LAYOUTS[name]

    @SETTINGS
    @given(files(layout))
    def check(case):
        rows, content = case
        path = root / layout.path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        want = expected(layout, rows)
        from_bytes = expected_from_bytes(layout, content)
        if want is None:
            # A tab or newline inside a text: the lines must still be read one row each. When
            # they happen to be well formed, they are other rows than those written.
            want = from_bytes
            event(f"unrepresentable text: {want[0]}")
        else:
            assert from_bytes == want  # the two statements of the format agree
            event(f"outcome: {want[0]}")
        assert outcome_of_reader(layout, root) == want

    check()


@pytest.mark.parametrize("name", sorted(n for n, layout in LAYOUTS.items() if layout.bad_labels))
def test_every_bad_label_is_named_on_its_line(root, name):
    """The generator above picks few of the bad labels; here each one, in the second of 3 rows."""
    layout = LAYOUTS[name]
    width = len(layout.header) if layout.header else 4
    for bad in layout.bad_labels:
        rows = []
        for i in range(3):
            fields = [str(i), "x", "", "a b"] if layout.header is None else ["a b"] * width
            fields[layout.label] = bad if i == 1 else layout.good_labels[i % 2]
            rows.append(fields)
        lines = ([layout.header] if layout.header else []) + rows
        path = root / layout.path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes("".join("\t".join(fields) + "\n" for fields in lines).encode())
        last = layout.label == width - 1
        want = expected(layout, rows)
        assert want[0] == ("rows" if last and bad.endswith("\r") else "line"), bad
        assert outcome_of_reader(layout, root) == want, bad


def test_a_text_holding_a_tab_and_newline_reads_as_the_rows_its_bytes_spell(root):
    """Without quoting, a text "a\\t0\\nb" is byte for byte a row ("a", 0) and a text "b": no
    reader can tell. The reader keeps one row per line; a column count or a test file's index
    that no longer fits is what reveals such a text."""
    path = root / "SST-2" / "train.tsv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"sentence\tlabel\n" + "a\t0\nb\t1\n".encode())  # row ("a\t0\nb", 1)
    assert data.load_split("sst2", "train", root)[:] == {
        "idx": [0, 1], "text_a": ["a", "b"], "text_b": [None, None], "label": [0, 1]}
    test = root / "SST-2" / "test.tsv"
    test.write_bytes(b"index\tsentence\n0\ta\n7\tb\n1\tc\n")  # rows "a\n7\tb", "c"
    with pytest.raises(data.GlueFormatError, match=re.escape(
            f"{test}:3: column 'index' is '7', expected the row position 1")):
        data.load_split("sst2", "test", root)
