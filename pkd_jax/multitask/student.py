"""The multi-task student: one shared BERT encoder with a head per task, its view as each task's
model (graphdef and step), and its export as HuggingFace folders.

`MultiTaskStudent.models[t]` is task t's `BertForSequenceClassification`, and every
`models[t].bert` is one module: NNX keeps a shared module's parameters once in the state (under
the first task in sorted order), so the state holds the encoder once and a head per task. The
current `task` is a static attribute, part of the graphdef: `views` gives each task's graphdef,
whose forward pass is `models[task]`, and `bert.apply`, the step factories and the evaluation take
it like any model's. All views share one params pytree, so one train state and one optimizer
serve every task, and a task's compiled step never depends on which task ran before it.
"""

from __future__ import annotations

from pathlib import Path

import jax
import optax
from flax import nnx

from pkd_jax import bert, checkpoints, fsutil

ENCODER = "encoder"  # the encoder's folder beside the tasks' in WORKDIR/model


class MultiTaskStudent(nnx.Module):
    """Task models sharing the first one's encoder; calls go to `models[task]`."""

    def __init__(self, models: dict[str, bert.BertForSequenceClassification]):
        first = next(iter(models.values()))
        for model in models.values():
            model.bert = first.bert
        self.models = nnx.Dict(models)
        self.task = next(iter(models))

    def __call__(self, *args, **kwargs) -> bert.BertOutput:
        return self.models[self.task](*args, **kwargs)


def views(student: MultiTaskStudent) -> dict[str, nnx.GraphDef]:
    """Each task's graphdef (its forward pass is that task's model); the params are shared."""
    out = {}
    for task in student.models:
        student.task = task
        out[task] = nnx.split(student, nnx.Param)[0]
    return out


def _head_task(path) -> str | None:
    """The task whose head a params (or Adam moment) leaf belongs to; None for the encoder's."""
    keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    for i in range(len(keys) - 2):
        if keys[i] == "models" and keys[i + 2] == "classifier":
            return keys[i + 1]
    return None


def task_step(step, task: str):
    """A single-task step (`steps.make_distill_step` on `task`'s view) as that task's step of the
    whole student: α/β/T are `state.hparams[task]`, and the other tasks' heads keep their
    parameters and Adam moments. Their gradient is zero, but Adam's momentum and weight decay would
    still move them; PyTorch's AdamW, as in MT-DNN, skips parameters without a gradient likewise."""

    def step_of_task(state, teacher_params, batch):
        new, metrics = step(state.replace(hparams=state.hparams[task]), teacher_params, batch)
        def keep_other_heads(path, updated, before):
            return before if _head_task(path) not in (None, task) else updated
        params = jax.tree_util.tree_map_with_path(keep_other_heads, new.params, state.params)
        opt_state = jax.tree_util.tree_map_with_path(keep_other_heads, new.opt_state, state.opt_state)
        return new.replace(params=params, opt_state=opt_state, hparams=state.hparams), metrics

    return step_of_task


def weighted(tx: optax.GradientTransformation, weight: float) -> optax.GradientTransformation:
    """`tx` on weight × the gradient, i.e. the update of weight × the loss (clipping comes after,
    as with a weighted loss in PyTorch); its state is `tx`'s, so every task's step shares it."""
    if weight == 1:
        return tx

    def update(grads, state, params=None):
        return tx.update(jax.tree.map(lambda g: g * weight, grads), state, params)

    return optax.GradientTransformation(tx.init, update)


def param_counts(student: MultiTaskStudent) -> dict:
    """Parameters of the whole student, of the shared encoder, and of each task's exported model."""
    models = student.models
    encoder = next(iter(models.values())).bert
    return {"params": bert.param_count(student),
            "params_without_embeddings": bert.param_count(student, embeddings=False),
            "encoder_params": bert.param_count(encoder),
            "heads": {t: bert.param_count(m.classifier) for t, m in models.items()},
            "per_task": {t: {"params": bert.param_count(m),
                             "params_without_embeddings": bert.param_count(m, embeddings=False)}
                         for t, m in models.items()}}


def export(graphdef, params, folder: Path, tokenizer) -> Path:
    """`folder`/<task>/ for every task (the encoder and that task's head, for
    `transformers.BertForSequenceClassification`) and `folder`/encoder/ (for `BertModel`), staged
    and published together: a reader never finds one task's model newer than another's."""
    models = nnx.merge(graphdef, params).models
    with fsutil.staged_dir(folder) as tmp:
        for task, model in models.items():
            checkpoints.save_pretrained(model, tmp / task, tokenizer)
        checkpoints.save_pretrained(next(iter(models.values())), tmp / ENCODER, tokenizer, head=False)
    return folder
