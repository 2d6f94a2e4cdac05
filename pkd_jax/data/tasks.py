"""The GLUE task registry: names, label sets, splits and metrics of the nine tasks.

Labels follow the HuggingFace ``glue`` ids (``TaskSpec.label_names[i]`` names class ``i``); STS-B
is a regression task with float scores.
"""

from __future__ import annotations

import dataclasses

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


def check_split(spec: TaskSpec, split: str) -> None:
    if split not in spec.splits:
        raise ValueError(
            f"unknown split {split!r} for task {spec.name!r}; "
            f"valid splits: {', '.join(spec.splits)}"
        )

