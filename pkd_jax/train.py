"""Train state, jitted fine-tune / distillation steps over a device mesh, and the run loop.

Steps are pure functions `(state, [teacher_params,] batch) -> (state, metrics)`; `compile_step`
jits them once with explicit shardings and the state donated. Only the student is
differentiated: the teacher's forward pass (online mode) runs inside the same program under
`stop_gradient`, or its outputs arrive in the batch (cached mode: `teacher_logits` [B, C] and
`teacher_cls` [B, M, H] for the M mapped layers).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from pkd_jax import bert, checkpoints, data, losses, metrics, optim, partitioning

log = logging.getLogger(__name__)

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]

# ============================================================================================
# Train state
# ============================================================================================


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates done
    params: Any  # the student's nnx.State of Params (float32 master copy)
    opt_state: Any
    rng: jax.Array  # raw uint32 key; step s uses fold_in(rng, s), so resuming replays dropout exactly
    hparams: dict[str, jax.Array]  # alpha, beta, temperature: float32 scalars (one per student under vmap)
    # Learned map of the student's [CLS] vectors to the teacher's hidden size ({"kernel", "bias"}),
    # trained with the student; None when both sizes agree.
    projection: Any = None

    def trainable(self):
        """What the optimizer updates: the params, plus the projection when there is one."""
        return self.params if self.projection is None else (self.params, self.projection)


def create_train_state(model: nnx.Module, tx: optax.GradientTransformation, seed: int,
                       alpha: float = 0.0, beta: float = 0.0, temperature: float = 1.0,
                       projection_to: int | None = None):
    """(graphdef, state) for a student model; the graphdef is static, the state a pytree.

    projection_to: the teacher's hidden size, when it differs from the student's.
    """
    graphdef, params = nnx.split(model, nnx.Param)
    hparams = {k: jnp.float32(v) for k, v in (("alpha", alpha), ("beta", beta), ("temperature", temperature))}
    projection = None
    if projection_to is not None:
        hidden = model.config.hidden_size
        init = jax.random.normal(jax.random.PRNGKey(seed), (hidden, projection_to)) * model.config.initializer_range
        projection = {"kernel": init, "bias": jnp.zeros(projection_to)}
    state = TrainState(step=jnp.int32(0), params=params, opt_state=None, rng=jax.random.PRNGKey(seed),
                       hparams=hparams, projection=projection)
    return graphdef, state.replace(opt_state=tx.init(state.trainable()))


# ============================================================================================
# Forward passes
# ============================================================================================


def forward(graphdef, params, batch: Batch, *, rng=None):
    """The model's BertOutput; dropout on when a key is given."""
    model = nnx.merge(graphdef, params)
    return model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"],
                 deterministic=rng is None, rngs=rng)


def _apply_gradients(state: TrainState, tx, loss_fn) -> tuple[TrainState, jax.Array, Any]:
    """One optimizer update; `loss_fn(params, projection)` -> (loss, aux)."""
    def loss_of(trainable):
        return loss_fn(*(trainable if state.projection is not None else (trainable, None)))

    (loss, aux), grads = jax.value_and_grad(loss_of, has_aux=True)(state.trainable())
    updates, opt_state = tx.update(grads, state.opt_state, state.trainable())
    new = optax.apply_updates(state.trainable(), updates)
    params, projection = new if state.projection is not None else (new, None)
    state = state.replace(step=state.step + 1, params=params, projection=projection, opt_state=opt_state)
    return state, loss, (aux, optax.tree.norm(grads))


def _accuracy(logits, labels):
    return jnp.mean(jnp.argmax(logits, -1) == labels)


# ============================================================================================
# Steps
# ============================================================================================


def make_finetune_step(graphdef, tx: optax.GradientTransformation, *, regression: bool = False):
    """Plain fine-tuning (teacher, or the FT-baseline student): cross-entropy or MSE."""

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        rng = jax.random.fold_in(state.rng, state.step)

        def loss_fn(params, _):
            logits = forward(graphdef, params, batch, rng=rng).logits
            if regression:
                return jnp.mean(jnp.square(logits[:, 0] - batch["labels"])), logits
            return losses.cross_entropy(logits, batch["labels"]), logits

        state, loss, (logits, grad_norm) = _apply_gradients(state, tx, loss_fn)
        metrics = {"loss": loss, "grad_norm": grad_norm}
        if not regression:
            metrics["accuracy"] = _accuracy(logits, batch["labels"])
        return state, metrics

    return step


def make_distill_step(graphdef, tx: optax.GradientTransformation, *, layer_map: tuple[int, ...],
                      teacher_graphdef=None, teacher_dropout: bool = False, normalize: bool = True,
                      mode: str = "compat", regression: bool = False, distance="mse"):
    """The PKD step: (1-α)·CE + α·KD(T) + β·patient, α/β/T read from `state.hparams`.

    layer_map: 1-indexed teacher layers matched to student layers 1..k-1 (`losses.layer_map`).
    teacher_graphdef given: online mode, `step(state, teacher_params, batch)` runs the teacher
    (with its own dropout when `teacher_dropout`: a differently perturbed view every step).
    None: cached mode, `step(state, None, batch)` reads `teacher_logits` / `teacher_cls`.
    """
    k_minus_1 = len(layer_map)
    teacher_index = np.asarray(layer_map, np.int32) - 1  # cls[l-1] is after layer l

    def teacher_outputs(teacher_params, batch, rng):
        if teacher_graphdef is None:
            return batch["teacher_logits"], jnp.swapaxes(batch["teacher_cls"], 0, 1)
        out = forward(teacher_graphdef, teacher_params, batch, rng=rng if teacher_dropout else None)
        return jax.lax.stop_gradient(out.logits), jax.lax.stop_gradient(out.cls[teacher_index])

    def step(state: TrainState, teacher_params, batch: Batch) -> tuple[TrainState, Metrics]:
        rng = jax.random.fold_in(state.rng, state.step)  # as in fine-tuning: α=β=0 is the FT step
        t_logits, t_cls = teacher_outputs(teacher_params, batch, jax.random.fold_in(rng, 1))
        hp = state.hparams

        def loss_fn(params, projection):
            out = forward(graphdef, params, batch, rng=rng)
            s_cls = out.cls[:k_minus_1]
            if projection is not None:
                s_cls = s_cls @ projection["kernel"] + projection["bias"]
            loss, terms = losses.pkd_loss(
                out.logits, t_logits, batch["labels"], s_cls, t_cls,
                alpha=hp["alpha"], beta=hp["beta"], temperature=hp["temperature"],
                normalize=normalize, mode=mode, regression=regression, distance=distance)
            return loss, (terms, out.logits)

        state, loss, ((terms, logits), grad_norm) = _apply_gradients(state, tx, loss_fn)
        metrics = {"loss": loss, **terms, "grad_norm": grad_norm}
        if not regression:
            metrics["accuracy"] = _accuracy(logits, batch["labels"])
            metrics["agreement"] = jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(t_logits, -1))
        return state, metrics

    return step


def make_eval_step(graphdef):
    """Deterministic forward pass -> float32 logits."""
    return lambda params, batch: forward(graphdef, params, batch).logits


# ============================================================================================
# Compilation over the mesh
# ============================================================================================


def state_sharding(state, mesh, fsdp: bool = False):
    return partitioning.state_sharding(state, mesh, fsdp)


def compile_step(step: Callable, state, mesh, *, fsdp: bool = False) -> Callable:
    """jit a step once: state sharded per `fsdp` and donated, metrics replicated."""
    shardings = state_sharding(state, mesh, fsdp)
    return jax.jit(step, donate_argnums=0, out_shardings=(shardings, partitioning.replicated(mesh)))


def place(tree, mesh, fsdp: bool = False):
    """Put a state / params pytree on the mesh (replicated, or FSDP-sharded)."""
    return jax.device_put(tree, partitioning.state_sharding(tree, mesh, fsdp))


# ============================================================================================
# The run: config checks, data, models, loop, evaluation, export
# ============================================================================================

_KINDS = ("finetune", "distill")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_MODEL_INPUTS = ("input_ids", "token_type_ids", "attention_mask")
_TRAIN_INPUTS = (*_MODEL_INPUTS, "labels", "teacher_logits", "teacher_cls")


class Preempted(Exception):
    """SIGTERM arrived: a checkpoint was saved; the same command resumes the run."""


def _fail(key: str, value, expected: str):
    raise ValueError(f"config.{key}={value!r}: expected {expected}")


def check_config(config) -> None:
    """Fail at once, naming the key, on values the run could only trip over later."""
    if config.kind not in _KINDS:
        _fail("kind", config.kind, " or ".join(_KINDS))
    if config.task not in data.TASKS:
        _fail("task", config.task, "one of " + ", ".join(data.TASKS))
    if config.dtype not in ("auto", *_DTYPES):
        _fail("dtype", config.dtype, "auto, float32 or bfloat16")
    for key in ("batch_size", "eval_batch_size", "max_seq_length", "log_every_steps", "keep_checkpoints"):
        if config[key] < 1:
            _fail(key, config[key], "a positive integer")
    for key in ("max_steps", "train_examples", "eval_examples", "test_examples", "layers"):
        if config[key] is not None and config[key] < 1:
            _fail(key, config[key], "a positive integer or None")
    if config.num_epochs <= 0 or config.learning_rate <= 0:
        _fail("num_epochs" if config.num_epochs <= 0 else "learning_rate",
              min(config.num_epochs, config.learning_rate), "a positive number")
    if not 0 <= config.warmup_fraction < 1:
        _fail("warmup_fraction", config.warmup_fraction, "a fraction in [0, 1)")
    if config.model is None and config.kind == "finetune":
        _fail("model", None, "a pretrained checkpoint (minilm-l6, bert-base, an HF folder or hub id)")
    if config.kind == "distill":
        if not config.teacher:
            _fail("teacher", config.teacher, "a finished run's workdir, an HF folder or hub id")
        if config.teacher_mode not in ("auto", "cached", "online"):
            _fail("teacher_mode", config.teacher_mode, "auto, cached or online")
        if config.teacher_mode == "cached" and config.teacher_dropout:
            _fail("teacher_mode", "cached", "online (or auto) when teacher_dropout is on")
        if config.mode not in losses.MODES:
            _fail("mode", config.mode, " or ".join(losses.MODES))
        if not 0 <= config.alpha <= 1 or config.beta < 0 or config.temperature <= 0:
            raise ValueError(f"config.alpha={config.alpha}, beta={config.beta}, temperature="
                             f"{config.temperature}: expected 0 <= alpha <= 1, beta >= 0, temperature > 0")
        _strategy(config.strategy)
        losses.get_distance(config.distance)


def _strategy(value: str):
    """'skip' | 'last' | '2,4' -> the argument of losses.layer_map."""
    if value in losses.STRATEGIES:
        return value
    try:
        return [int(v) for v in value.split(",")]
    except ValueError:
        _fail("strategy", value, "skip, last or comma-separated teacher layers such as 2,4")


def compute_dtype(name: str):
    if name == "auto":
        return jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu") else jnp.float32
    return _DTYPES[name]


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def _tokenized_split(config, tokenizer, split: str, cache_dir: Path, limit: int | None = None,
                     subsample: int | None = None) -> data.Tokenized:
    ds = data.load_split(config.task, split, glue_dir=config.glue_dir, source=config.data_source)
    if subsample is not None and subsample < len(ds):
        # A fixed data seed: teacher and students (whatever their own seed) see the same subset.
        rows = np.sort(np.random.default_rng(0).choice(len(ds), subsample, replace=False))
        ds = ds.select(rows)
    elif limit is not None and limit < len(ds):
        ds = ds.select(range(limit))
    tok = data.tokenize(ds, tokenizer, config.max_seq_length, cache_dir=cache_dir / "tokenized")
    if tok.num_truncated:
        log.warning("%s/%s: %d of %d examples truncated to %d tokens", config.task, split,
                        tok.num_truncated, len(tok), config.max_seq_length)
    return tok


def predict(eval_fn, params, tok: data.Tokenized, mesh, batch_size: int, bucket: bool = True) -> np.ndarray:
    """Logits [N, C] of every example, in the split's row order."""
    def place(batch):
        return batch["index"], batch["weight"], partitioning.shard_batch(
            {k: batch[k] for k in _MODEL_INPUTS}, mesh)

    outputs = []
    with data.prefetch(data.eval_batches(tok, batch_size, bucket=bucket), place) as batches:
        for index, weight, batch in batches:
            outputs.append((index, weight, eval_fn(params, batch)))  # dispatched; fetched below
    logits = None
    for index, weight, out in outputs:
        out = partitioning.to_host(out)
        if logits is None:
            logits = np.zeros((len(tok), out.shape[-1]), np.float32)
        real = weight > 0
        logits[index[real]] = out[real]
    return logits


def evaluate(eval_fn, params, tok: data.Tokenized, task: str, mesh, batch_size: int) -> dict[str, float]:
    preds = metrics.predictions_from_logits(task, predict(eval_fn, params, tok, mesh, batch_size))
    result = metrics.compute(task, preds, tok.labels)
    result["score"] = metrics.main_score(task, result)
    return result


# --------------------------------------------------------------------------------------------
# Logging: metrics.jsonl, TensorBoard, progress bar (process 0 only)
# --------------------------------------------------------------------------------------------


def after_step(step: int, config, steps_per_epoch: int, total: int, *, evaluate: Callable[[int], object],
               save: Callable[[int], None], fetch: Callable[[int], None], window: "MetricsWindow") -> None:
    """What a training loop (a run's or a sweep chunk's) does after `step`: evaluate at each epoch's
    end, every eval_every_steps and at the last step (evaluations also checkpoint); otherwise save
    every checkpoint_every_steps; otherwise fetch the train metrics every log_every_steps."""
    if step % steps_per_epoch == 0 or step == total or (
            config.eval_every_steps and step % config.eval_every_steps == 0):
        evaluate(step)
    elif config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0:
        save(step)
        window.restart(step)  # saving time is not training time
    elif step % config.log_every_steps == 0:
        fetch(step)


class MetricsWindow:
    """Device metrics of the steps since the last fetch, and the wall time those steps took.

    A step only appends its metrics (no host sync); `fetch` brings them to the host at log,
    evaluation and checkpoint times; `restart` keeps evaluation and saving out of training time.
    """

    def __init__(self, step: int):
        self.pending: list[tuple[int, Metrics]] = []
        self.restart(step)

    def add(self, step: int, metrics: Metrics) -> None:
        self.pending.append((step, metrics))

    def restart(self, step: int) -> None:
        self.t0, self.start = time.perf_counter(), step

    def fetch(self, step: int):
        """([(step, host metrics)], seconds, steps) since the last fetch; None when nothing is new."""
        if not self.pending:
            return None
        host = [(s, jax.device_get(m)) for s, m in self.pending]
        elapsed, steps = time.perf_counter() - self.t0, step - self.start
        self.pending = []
        self.restart(step)
        return host, elapsed, steps


def write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and a rename: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _step_of(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")  # a line cut short by a kill


class RunLog:
    def __init__(self, workdir: Path, start: int, total: int, enabled: bool, progress: bool):
        self.enabled = enabled
        if not enabled:
            return
        from tensorboardX import SummaryWriter
        from tqdm.auto import tqdm

        path = workdir / "metrics.jsonl"
        if path.exists():  # drop lines a killed run wrote after its last checkpoint, or half-wrote
            kept = [l for l in path.read_text().splitlines() if _step_of(l) <= start]
            write_atomic(path, "".join(l + "\n" for l in kept))
        self.jsonl = path.open("a")
        self.tb = SummaryWriter(str(workdir / "tensorboard"))
        self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True,
                        disable=not progress, desc=workdir.name)

    def write(self, step: int, split: str, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, "split": split, **values}) + "\n")
        self.jsonl.flush()
        for k, v in values.items():
            self.tb.add_scalar(f"{split}/{k}", v, step)
        if split == "train":
            self.bar.set_postfix(loss=f"{values['loss']:.4f}", ex_s=f"{values['examples_per_s']:.0f}")
        else:
            self.bar.write(f"step {step} {split}: " + ", ".join(f"{k}={v:.4f}" for k, v in values.items()))

    def advance(self, n: int = 1) -> None:
        if self.enabled:
            self.bar.update(n)

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.tb.close()
            self.jsonl.close()


# --------------------------------------------------------------------------------------------
# train_and_evaluate
# --------------------------------------------------------------------------------------------


def _teacher_source(config) -> tuple[str, str]:
    """(teacher model folder or name, the student's pretrained checkpoint)."""
    run = Path(config.teacher)
    if (run / "model" / "config.json").exists():  # a finished run's workdir
        pretrained = config.model
        if pretrained is None and (run / "config.json").exists():
            pretrained = json.loads((run / "config.json").read_text()).get("model")
        if pretrained is None:
            _fail("model", None, f"the pretrained checkpoint to initialise the student from "
                  f"({run / 'config.json'} does not say which one the teacher started from)")
        return str(run / "model"), pretrained
    if config.model is None:
        _fail("model", None, "the pretrained checkpoint to initialise the student from "
              "(the teacher is not a run workdir that records it)")
    return config.teacher, config.model


def _check_compatible(teacher: bert.BertConfig, student: bert.BertConfig, teacher_tok, student_tok,
                      projection: bool) -> None:
    if teacher_tok.get_vocab() != student_tok.get_vocab():
        raise ValueError("teacher and student use different vocabularies; distillation needs the same "
                         "tokenizer (initialise the student from the teacher's pretrained checkpoint)")
    th, sh = teacher.hidden_size, student.hidden_size
    if th != sh and not projection:
        raise ValueError(f"teacher hidden size {th} != student hidden size {sh}: the patient loss "
                         "compares [CLS] vectors of equal size; set --config.projection=True to learn "
                         "a linear map from the student's to the teacher's")


def _batch_rows(train_tok, config, step: int) -> list[int]:
    """The dataset idx of the examples in the batch of `step` (the order is a function of the step)."""
    batch = next(data.train_batches(train_tok, config.batch_size, config.seed, start_step=step,
                                    bucket=config.bucket))
    return train_tok.idx[batch["index"]].tolist()


@dataclasses.dataclass
class Setup:
    """Everything a run needs before its first step: mesh, data, teacher, student recipe.

    Built by `prepare(config)`; shared by `train_and_evaluate` and the vmapped sweep.
    """

    config: Any
    mesh: Any
    fsdp: bool
    dtype: Any
    task: data.TaskSpec
    cache_dir: Path
    pretrained: str  # the checkpoint students (and fine-tuned models) start from
    tokenizer: Any
    train_tok: data.Tokenized
    dev_tok: data.Tokenized
    steps_per_epoch: int
    total_steps: int
    teacher: Any = None  # the loaded teacher model (distillation only)
    teacher_path: str | None = None
    layer_map: tuple[int, ...] | None = None

    @property
    def distill(self) -> bool:
        return self.teacher is not None

    @property
    def online(self) -> bool:
        c = self.config
        return self.distill and (c.teacher_mode == "online" or (c.teacher_mode == "auto" and c.teacher_dropout))

    def new_student(self, seed: int) -> bert.BertForSequenceClassification:
        """The model to train: the first `layers` layers of `pretrained`, a head seeded by `seed`."""
        c = self.config
        overrides = {k: v for k, v in c.model_overrides.items() if v is not None}
        label_names = None if self.task.is_regression else self.task.label_names
        return checkpoints.load_pretrained(self.pretrained, num_labels=self.task.num_labels, num_layers=c.layers,
                                           dtype=self.dtype, seed=seed, label_names=label_names, **overrides)

    def optimizer(self) -> optax.GradientTransformation:
        c = self.config
        return optim.make_optimizer(learning_rate=c.learning_rate, total_steps=self.total_steps,
                                    warmup_steps=self.warmup_steps, weight_decay=c.weight_decay,
                                    max_grad_norm=c.max_grad_norm)

    @property
    def warmup_steps(self) -> int:
        return int(self.config.warmup_fraction * self.total_steps)

    def hparams(self) -> dict[str, Any]:
        """create_train_state's keywords: alpha, beta, temperature (fine-tuning: 0, 0, 1) and,
        when the teacher is wider or narrower than the student, the projection's output size."""
        c = self.config
        hp = {"alpha": c.get("alpha", 0.0), "beta": c.get("beta", 0.0), "temperature": c.get("temperature", 1.0)}
        if self.distill:
            student = checkpoints.load_config(self.pretrained, num_layers=c.layers)
            if student.hidden_size != self.teacher.config.hidden_size:
                hp["projection_to"] = self.teacher.config.hidden_size
        return hp

    def teacher_inputs(self, lead: bool = True):
        """(teacher graphdef, teacher params, add_teacher) for the step and the host batches.

        Online: the placed teacher for every step. Cached: (None, None, cache.add_to) after the
        teacher's one pass over the training set (or its reuse). Fine-tuning: all None.
        """
        if not self.distill:
            return None, None, None
        t_graphdef, t_params = nnx.split(self.teacher, nnx.Param)
        t_params = place(t_params, self.mesh, self.fsdp)
        if self.online:
            return t_graphdef, t_params, None
        from pkd_jax import teacher_cache

        cache = teacher_cache.build_or_load(
            t_graphdef, t_params, self.train_tok, self.layer_map, mesh=self.mesh,
            batch_size=self.config.eval_batch_size, cache_dir=self.cache_dir / "teacher",
            dtype_name=jnp.dtype(self.dtype).name, architecture=repr(self.teacher.config),
            progress=self.config.progress and lead)
        log.info("teacher outputs %s: %s", "reused" if cache.reused else "computed", cache.path)
        return None, None, cache.add_to

    def make_step(self, graphdef, tx, teacher_graphdef=None):
        """The pure step: (state, batch) for fine-tuning, (state, teacher_params, batch) to distil."""
        c = self.config
        if not self.distill:
            return make_finetune_step(graphdef, tx, regression=self.task.is_regression)
        return make_distill_step(graphdef, tx, layer_map=self.layer_map, teacher_graphdef=teacher_graphdef,
                                 teacher_dropout=c.teacher_dropout, normalize=c.normalize, mode=c.mode,
                                 regression=self.task.is_regression, distance=c.distance)

    def train_batches(self, start: int, add_teacher=None):
        """Sharded training batches from step `start` on (with teacher outputs when cached)."""
        c = self.config
        for b in data.train_batches(self.train_tok, c.batch_size, c.seed, start_step=start, bucket=c.bucket):
            b = add_teacher(b) if add_teacher else b
            yield partitioning.shard_batch({k: b[k] for k in _TRAIN_INPUTS if k in b}, self.mesh)


def prepare(config) -> Setup:
    """Check the config, join the processes, build the mesh, load the teacher and the data."""
    check_config(config)
    cache_dir = Path(config.cache_dir) if config.cache_dir else data.cache_root()
    if config.compilation_cache:  # a resumed run, or the next student, skips recompiling
        jax.config.update("jax_compilation_cache_dir", str(cache_dir / "xla"))
    partitioning.initialize_distributed(**config.distributed)
    mesh = partitioning.make_mesh(config.mesh.fsdp)
    for key in ("batch_size", "eval_batch_size"):
        partitioning.check_batch_size(config[key], mesh)
    dtype = compute_dtype(config.dtype)
    task = data.get_task(config.task)

    teacher = teacher_path = layer_map = None
    pretrained = config.model
    if config.kind == "distill":
        teacher_path, pretrained = _teacher_source(config)
        teacher = checkpoints.load_pretrained(teacher_path, num_labels=task.num_labels, dtype=dtype)
    tokenizer = checkpoints.load_tokenizer(pretrained)
    if teacher is not None:
        student = checkpoints.load_config(pretrained, num_layers=config.layers)
        _check_compatible(teacher.config, student, checkpoints.load_tokenizer(teacher_path), tokenizer,
                          config.projection)
        layer_map = losses.layer_map(teacher.config.num_hidden_layers, student.num_hidden_layers,
                                     _strategy(config.strategy))

    train_tok = _tokenized_split(config, tokenizer, "train", cache_dir, subsample=config.train_examples)
    dev_tok = _tokenized_split(config, tokenizer, data.dev_split(config.task), cache_dir, limit=config.eval_examples)
    steps_per_epoch = data.steps_per_epoch(len(train_tok), config.batch_size)
    if steps_per_epoch == 0:
        _fail("batch_size", config.batch_size, f"at most the {len(train_tok)} training examples")
    total = config.max_steps or int(np.ceil(config.num_epochs * steps_per_epoch))
    return Setup(config=config, mesh=mesh, fsdp=config.mesh.fsdp > 1, dtype=dtype, task=task,
                 cache_dir=cache_dir, pretrained=pretrained, tokenizer=tokenizer, train_tok=train_tok,
                 dev_tok=dev_tok, steps_per_epoch=steps_per_epoch, total_steps=total, teacher=teacher,
                 teacher_path=teacher_path, layer_map=layer_map)


def train_and_evaluate(config, workdir) -> dict:
    """Fine-tune (config.kind="finetune") or distil ("distill") on a GLUE task; returns results.json."""
    # ---- Setup ---------------------------------------------------------------------------
    setup = prepare(config)
    workdir = Path(workdir)
    lead = jax.process_index() == 0
    mesh, fsdp, total = setup.mesh, setup.fsdp, setup.total_steps
    train_tok, dev_tok, steps_per_epoch = setup.train_tok, setup.dev_tok, setup.steps_per_epoch
    if lead:
        workdir.mkdir(parents=True, exist_ok=True)
        write_atomic(workdir / "config.json", config.to_json_best_effort(indent=1) + "\n")

    # ---- Model, optimizer, step ---------------------------------------------------------------
    model = setup.new_student(config.seed)
    tx = setup.optimizer()
    graphdef, state = create_train_state(model, tx, config.seed, **setup.hparams())
    state = place(state, mesh, fsdp)
    eval_fn = jax.jit(make_eval_step(graphdef))
    t_graphdef, t_params, add_teacher = setup.teacher_inputs(lead)
    compiled = compile_step(setup.make_step(graphdef, tx, t_graphdef), state, mesh, fsdp=fsdp)
    run_step = (lambda s, b: compiled(s, t_params, b)) if setup.distill else compiled

    # ---- Resume ----------------------------------------------------------------------------
    ckpt = checkpoints.TrainCheckpointer(workdir / "checkpoints", keep=config.keep_checkpoints)
    meta = {"best": None, "last": None, "train_seconds": 0.0}  # saved with every checkpoint
    restored = ckpt.restore_latest(state)
    if restored is not None:
        _, state, saved = restored
        meta.update(saved)
        log.info("resumed from step %d", int(state.step))
    start = int(state.step)

    # ---- Loop ------------------------------------------------------------------------------
    run_log = RunLog(workdir, start, total, lead, config.progress)
    stop = SigtermFlag()
    window = MetricsWindow(start)

    def fetch_train_metrics(step: int) -> None:
        fetched = window.fetch(step)
        if fetched is None:
            return
        host, elapsed, steps = fetched
        for s, m in host:
            if not np.isfinite(m["loss"]):
                raise FloatingPointError(
                    f"training loss is {m['loss']} at step {s} (batch of training examples idx "
                    f"{_batch_rows(train_tok, config, s - 1)}); stopped without saving. The last good "
                    f"checkpoint (step {max(ckpt.all_steps(), default=0)}) is kept: lower "
                    "config.learning_rate or inspect those examples, then run the same command again.")
        meta["train_seconds"] += elapsed
        values = {k: float(np.mean([m[k] for _, m in host])) for k in host[-1][1]}
        values["examples_per_s"] = steps * config.batch_size / max(elapsed, 1e-9)
        values["learning_rate"] = float(config.learning_rate * optim.lr_schedule(1.0, total, setup.warmup_steps)(step - 1))
        values["epoch"] = step / steps_per_epoch
        run_log.write(step, "train", values)

    def save(step: int, score: float | None = None) -> None:
        fetch_train_metrics(step)  # refuses to save a state that went NaN
        ckpt.save(step, state, meta, score)

    def run_eval(step: int) -> dict:
        fetch_train_metrics(step)
        result = evaluate(eval_fn, state.params, dev_tok, config.task, mesh, config.eval_batch_size)
        run_log.write(step, "dev", result)
        meta["last"] = {"step": step, "metrics": result}
        if meta["best"] is None or result["score"] > meta["best"]["metrics"]["score"]:
            meta["best"] = meta["last"]
            params = jax.tree.map(partitioning.to_host, state.params)
            if lead:
                checkpoints.save_pretrained(nnx.merge(graphdef, params), workdir / "model", setup.tokenizer)
        save(step, result["score"])
        window.restart(step)  # evaluation time is not training time
        return result

    try:
        with data.prefetch(setup.train_batches(start, add_teacher), size=2) as batches:
            for step in range(start + 1, total + 1):
                if stop.requested:
                    save(step - 1)
                    ckpt.wait()
                    raise Preempted(f"SIGTERM: saved a checkpoint at step {step - 1}; run the same command to resume")
                state, m = run_step(state, next(batches))
                window.add(step, m)
                run_log.advance()
                after_step(step, config, steps_per_epoch, total, evaluate=run_eval, save=save,
                           fetch=fetch_train_metrics, window=window)
        if meta["last"] is None or meta["last"]["step"] != total:  # e.g. preempted during the last eval
            run_eval(total)
        ckpt.wait()
    finally:
        stop.restore()
        run_log.close()

    # ---- Results ---------------------------------------------------------------------------
    results = {
        "task": config.task, "kind": config.kind, "metric": metrics.main_metric(config.task),
        "metrics": meta["best"]["metrics"], "step": meta["best"]["step"],
        "best": meta["best"], "last": meta["last"], "total_steps": total,
        "train_seconds": meta["train_seconds"],
        "examples_per_s": total * config.batch_size / max(meta["train_seconds"], 1e-9),
        "model": {"pretrained": setup.pretrained, "layers": model.config.num_hidden_layers,
                  "hidden_size": model.config.hidden_size, "params": bert.param_count(model),
                  "params_without_embeddings": bert.param_count(model, embeddings=False)},
        "teacher": None if not setup.distill else {
            "path": setup.teacher_path, "layers": setup.teacher.config.num_hidden_layers,
            "layer_map": list(setup.layer_map)},
        "train_examples": len(train_tok), "dev_examples": len(dev_tok),
        "truncated": {"train": train_tok.num_truncated, "dev": dev_tok.num_truncated},
        "config": json.loads(config.to_json_best_effort()),
    }
    if config.predict_test:
        results["test_predictions"] = _predict_test(setup, workdir, lead)
    if lead:
        write_atomic(workdir / "results.json", json.dumps(results, indent=1) + "\n")
    ckpt.close()
    return results


def _predict_test(setup: Setup, workdir: Path, lead: bool) -> list[str]:
    """GLUE submission files of the best model (W/model) for every test split found."""
    from jax.experimental import multihost_utils

    config = setup.config
    multihost_utils.sync_global_devices("model exported")
    graphdef, params = nnx.split(checkpoints.load_pretrained(workdir / "model", dtype=setup.dtype), nnx.Param)
    eval_fn = jax.jit(make_eval_step(graphdef))
    params = place(params, setup.mesh, setup.fsdp)
    written = []
    for split in (s for s in setup.task.splits if s.startswith("test")):
        try:
            tok = _tokenized_split(config, setup.tokenizer, split, setup.cache_dir, limit=config.test_examples)
        except (data.GlueFormatError, RuntimeError) as e:
            log.warning("no test predictions for %s/%s: %s", config.task, split, e)
            continue
        preds = metrics.predictions_from_logits(
            config.task, predict(eval_fn, params, tok, setup.mesh, config.eval_batch_size))
        if lead:
            path = data.write_glue_predictions(config.task, preds, tok.idx, workdir / "predictions", split=split)
            written.append(str(path))
    return written


class SigtermFlag:
    """Turns SIGTERM (a preempted VM) into a flag the loop checks between steps."""

    def __init__(self):
        self.requested = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
