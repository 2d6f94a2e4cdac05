"""Every check of a run's inputs, in one place, before any compute: config values and their ranges,
the teacher, student and task fitting together, the data fitting the config, and a workdir that
already holds a run. Each failure is a `ConfigError` or `CheckpointError` naming the key, file or
value, the allowed range and the fix.
"""

from __future__ import annotations

import datetime
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp

from pkd_jax import bert, checkpoints, data, losses
from pkd_jax.errors import CheckpointError, ConfigError

KINDS = ("finetune", "distill")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _fail(key: str, value, expected: str):
    raise ConfigError(f"config.{key}={value!r}: expected {expected}")


# --------------------------------------------------------------------------------------------
# Config values
# --------------------------------------------------------------------------------------------

def _integer(lo: int, none_ok: bool = False):
    def ok(v):
        return (v is None and none_ok) or (isinstance(v, int) and not isinstance(v, bool) and v >= lo)
    return ok, f"an integer >= {lo}" + (" or None" if none_ok else "")


def _number(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False, none_ok: bool = False):
    def ok(v):
        if v is None:
            return none_ok
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return False
        return (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)
    interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    return ok, f"a number in {interval}" + (" or None" if none_ok else "")


# Allowed values of every numeric field (dotted keys for nested ones); fields a config lacks are skipped.
RANGES = {
    "batch_size": _integer(1), "eval_batch_size": _integer(1), "max_seq_length": _integer(2),
    "log_every_steps": _integer(1), "keep_checkpoints": _integer(1), "seed": _integer(0),
    "eval_every_steps": _integer(0), "checkpoint_every_steps": _integer(0),
    "max_steps": _integer(1, none_ok=True), "train_examples": _integer(1, none_ok=True),
    "eval_examples": _integer(1, none_ok=True), "test_examples": _integer(1, none_ok=True),
    "layers": _integer(1, none_ok=True), "mesh.fsdp": _integer(1),
    "num_epochs": _number(0, 1000, lo_open=True),
    "learning_rate": _number(0, 1, lo_open=True),
    "warmup_fraction": _number(0, 1, hi_open=True),
    "weight_decay": _number(0, 1, hi_open=True),
    "max_grad_norm": _number(0, math.inf, lo_open=True, hi_open=True, none_ok=True),
    "model_overrides.hidden_dropout_prob": _number(0, 1, hi_open=True, none_ok=True),
    "model_overrides.attention_probs_dropout_prob": _number(0, 1, hi_open=True, none_ok=True),
    "alpha": _number(0, 1),
    "beta": _number(0, math.inf, hi_open=True),
    "temperature": _number(0, math.inf, lo_open=True, hi_open=True),
    "hidden_mse": _number(0, math.inf, hi_open=True),
    "attention_kl": _number(0, math.inf, hi_open=True),
}


_MISSING = object()


def _get(config, dotted: str):
    for part in dotted.split("."):
        if part not in config:
            return _MISSING
        config = config[part]
    return config


def check_config(config) -> None:
    """Fail at once, naming the key and the allowed values, on what the run could only trip over later."""
    if config.kind not in KINDS:
        _fail("kind", config.kind, " or ".join(KINDS))
    if config.task not in data.TASKS:
        _fail("task", config.task, "one of " + ", ".join(data.TASKS))
    if config.dtype not in ("auto", *_DTYPES):
        _fail("dtype", config.dtype, "auto, float32 or bfloat16")
    for key, (ok, expected) in RANGES.items():
        value = _get(config, key)
        if value is not _MISSING and not ok(value):
            _fail(key, value, expected)
    if config.model is None and config.kind == "finetune":
        _fail("model", None, "a pretrained checkpoint (minilm-l6, bert-base, an HF folder or hub id)")
    if config.kind == "distill":
        _check_distill_config(config)
    compute_dtype(config.dtype)


def _check_distill_config(config) -> None:
    if not config.teacher:
        _fail("teacher", config.teacher, "a finished run's workdir, an HF folder or hub id")
    if config.teacher_mode not in ("auto", "cached", "online"):
        _fail("teacher_mode", config.teacher_mode, "auto, cached or online")
    if config.teacher_mode == "cached" and config.teacher_dropout:
        _fail("teacher_mode", "cached", "online (or auto) when teacher_dropout is on")
    for key in ("hidden_mse", "attention_kl"):
        if config[key] > 0 and config.teacher_mode == "cached":
            _fail("teacher_mode", "cached", f"online (or auto) when {key} > 0: it compares per-token "
                  "teacher states, which are not cached (S x H values per example and layer)")
    if config.patient_features not in bert.FEATURES:
        _fail("patient_features", config.patient_features, " or ".join(bert.FEATURES))
    if config.mode not in losses.MODES:
        _fail("mode", config.mode, " or ".join(losses.MODES))
    layer_strategy(config.strategy)
    try:
        losses.get_distance(config.distance)
    except ValueError as e:
        raise ConfigError(f"config.distance={config.distance!r}: {e}") from None


def layer_strategy(value: str):
    """config.strategy ('skip' | 'last' | '2,4') -> the argument of losses.layer_map."""
    if value in losses.STRATEGIES:
        return value
    try:
        return [int(v) for v in value.split(",")]
    except ValueError:
        _fail("strategy", value, "skip, last or comma-separated teacher layers such as 2,4")


def compute_dtype(name: str):
    """config.dtype -> a jnp dtype: auto is bfloat16 on TPUs and on GPUs with bfloat16 tensor cores
    (compute capability 8.0+: A100, H100, ...), float32 elsewhere. An explicit bfloat16 on an older
    GPU is refused: XLA emulates it there, slower than float32."""
    device = jax.devices()[0]
    capability = getattr(device, "compute_capability", None) if device.platform == "gpu" else None
    old_gpu = capability is not None and float(capability) < 8.0
    if name == "auto":
        return jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu") and not old_gpu else jnp.float32
    if name == "bfloat16" and old_gpu:
        _fail("dtype", name, f"float32 or auto on this GPU ({device.device_kind}, compute capability "
              f"{capability}): bfloat16 needs 8.0 or newer")
    return _DTYPES[name]


# --------------------------------------------------------------------------------------------
# The parts of a run: teacher, student, task
# --------------------------------------------------------------------------------------------

def check_model(config, model: bert.BertConfig, where: str) -> None:
    """config.max_seq_length against a checkpoint's position table."""
    if config.max_seq_length > model.max_position_embeddings:
        _fail("max_seq_length", config.max_seq_length,
              f"at most {model.max_position_embeddings}, the position table of {where}")


def check_student_depth(config, pretrained: str) -> None:
    depth = checkpoints.read_config(checkpoints.resolve(pretrained))["num_hidden_layers"]
    if config.layers is not None and config.layers > depth:
        _fail("layers", config.layers, f"at most {depth}, the layers of {pretrained}")


def check_teacher(config, teacher_dir: str, task: data.TaskSpec) -> None:
    """The teacher was fine-tuned on this task, with its labels in the same order, and has a head."""
    folder = checkpoints.resolve(teacher_dir)
    run = Path(config.teacher)
    if (run / "config.json").exists() and (run / "model").exists():  # a run's workdir records its task
        trained_on = json.loads((run / "config.json").read_text()).get("task")
        if trained_on != task.name:
            raise CheckpointError(f"{run / 'config.json'}: the teacher was fine-tuned on task {trained_on!r}, "
                                  f"this run is {task.name!r}: give a teacher fine-tuned on {task.name}")
    if not any(name.startswith("classifier.") for name in checkpoints.weight_names(folder)):
        raise CheckpointError(f"{folder}: no classifier weights, so not a fine-tuned teacher; fine-tune it "
                              f"first (configs/finetune.py:task={task.name}) and pass that run's workdir")
    head = checkpoints.load_config(folder)  # its id2label: label_names None when HF's generic LABEL_i
    if head.num_labels != task.num_labels:
        raise CheckpointError(f"{folder / 'config.json'}: the teacher has {head.num_labels} output(s), task "
                              f"{task.name} needs {task.num_labels}: give a teacher fine-tuned on {task.name}")
    names = [n.lower() for n in head.label_names or ()]
    if not task.is_regression and names and names != list(task.label_names):
        raise CheckpointError(f"{folder / 'config.json'}: the teacher's id2label {list(head.label_names)} is not "
                              f"{task.name}'s {list(task.label_names)} (in this order): its classes would be misread")


def check_pair(config, teacher: bert.BertConfig, student: bert.BertConfig, teacher_tok, student_tok) -> tuple:
    """Teacher and student fit together for the chosen objective; returns the layer map."""
    if teacher_tok.get_vocab() != student_tok.get_vocab():
        raise CheckpointError("teacher and student use different vocabularies; distillation needs the same "
                              "tokenizer (initialise the student from the teacher's pretrained checkpoint)")
    th, sh = teacher.hidden_size, student.hidden_size
    width_free = losses.accepts_any_width(config.distance) and config.hidden_mse == 0
    if th != sh and not config.projection and not width_free:
        raise ConfigError(f"teacher hidden size {th} != student hidden size {sh}: the patient loss "
                          f"(distance={config.distance}) and hidden_mse compare vectors of equal size; set "
                          "--config.projection=True to learn a linear map from the student's to the "
                          "teacher's, or compare with --config.distance=cka, which allows different widths")
    ta, sa = teacher.num_attention_heads, student.num_attention_heads
    if config.attention_kl > 0 and ta != sa:
        raise ConfigError(f"attention_kl compares attention distributions head by head, but the teacher has "
                          f"{ta} heads and the student {sa}: use equal head counts or --config.attention_kl=0")
    try:
        return losses.layer_map(teacher.num_hidden_layers, student.num_hidden_layers, layer_strategy(config.strategy))
    except ValueError as e:
        raise ConfigError(f"config.strategy={config.strategy!r} with config.layers={config.layers}: {e}") from None


# --------------------------------------------------------------------------------------------
# The data and the schedule
# --------------------------------------------------------------------------------------------

def check_schedule(config, train_examples: int, steps_per_epoch: int, total_steps: int) -> None:
    if steps_per_epoch == 0:
        _fail("batch_size", config.batch_size, f"at most the {train_examples} training examples")
    if config.eval_every_steps > total_steps:
        _fail("eval_every_steps", config.eval_every_steps,
              f"at most the run's {total_steps} steps (0: at the end of every epoch)")


# --------------------------------------------------------------------------------------------
# A workdir that already holds a run
# --------------------------------------------------------------------------------------------

# Fields that change how a run is watched, where its inputs sit or what it writes at the end, not
# what it trains: resuming with other values gives the same model.
RESUMABLE_CHANGES = ("progress", "log_every_steps", "checkpoint_every_steps", "keep_checkpoints",
                     "predict_test", "test_examples", "eval_batch_size", "compilation_cache", "cache_dir",
                     "glue_dir", "distributed.")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def workdir_changes(config, workdir: Path) -> dict[str, tuple]:
    """{key: (this config's value, the saved run's)} for the fields that would change what the run
    in `workdir` trains; empty when the workdir holds no run or the same one."""
    saved_file = Path(workdir) / "config.json"
    if not saved_file.exists():
        return {}
    saved = _flat(json.loads(saved_file.read_text()))
    now = _flat(json.loads(config.to_json_best_effort()))
    return {k: (now[k], saved[k]) for k in now
            if k in saved and now[k] != saved[k] and not k.startswith(RESUMABLE_CHANGES)}


def check_workdir(config, workdir: Path) -> None:
    """Refuse to resume a run in `workdir` under another config (see `replace_run` to start over)."""
    changes = workdir_changes(config, workdir)
    if changes:
        listed = "; ".join(f"{k}: {new!r} here, {old!r} there" for k, (new, old) in sorted(changes.items()))
        raise ConfigError(f"{workdir} holds a run with another config ({listed}). Run the same config to "
                          "resume it, choose another --workdir, or pass --restart to start over (the old "
                          "run is moved aside, not deleted)")


def replace_run(workdir: Path) -> Path | None:
    """Move the run in `workdir` (every entry but earlier replaced runs) to workdir/replaced-<time>/."""
    workdir = Path(workdir)
    entries = [p for p in workdir.iterdir() if not p.name.startswith("replaced-")] if workdir.exists() else []
    if not entries:
        return None
    aside = workdir / f"replaced-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    aside.mkdir()
    for p in entries:
        p.rename(aside / p.name)
    return aside
