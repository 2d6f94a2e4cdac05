"""Multi-task PKD (configs/multitask.py, pkd_jax/multitask): the sampling rules and their resumable
order against hand-computed values; the config's checks; a 2-task student (SST-2 + STS-B: a
regression head; real data, the packaged MiniLM) trained through the loop with one compiled step
per task and none while tasks alternate; per-task dev metrics, selection by their mean and test
files; the export loaded by transformers with the student's logits; the same result after a NaN
stop, a SIGTERM and two resumes; and the report's per-task tables."""

import itertools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file

from configs import multitask as multitask_config
from pkd_jax import checkpoints, data, loop, metrics, report, steps
from pkd_jax.errors import CheckpointError, ConfigError
from pkd_jax.multitask import mixing, student as student_, tasks as tasks_, trainer

REPO = Path(__file__).resolve().parents[1]

# ---- Sampling -------------------------------------------------------------------------------------


def test_sampling_rules_give_the_hand_computed_probabilities():
    sizes = [100, 400, 900]
    np.testing.assert_allclose(mixing.probabilities("proportional", sizes), [1 / 14, 4 / 14, 9 / 14])
    # √n: 10, 20, 30
    np.testing.assert_allclose(mixing.probabilities("temperature", sizes, 2.0), [1 / 6, 2 / 6, 3 / 6])
    np.testing.assert_allclose(mixing.probabilities("temperature", sizes, 1.0), [1 / 14, 4 / 14, 9 / 14])
    np.testing.assert_allclose(mixing.probabilities("equal", sizes), [1 / 3] * 3)
    with pytest.raises(ValueError, match="round-robin"):
        mixing.probabilities("round-robin", sizes)


def test_task_order_is_seeded_follows_the_probabilities_and_resumes_exactly():
    probs = mixing.probabilities("temperature", [100, 400, 900], 2.0)
    order = mixing.task_order(probs, 0, 0, 6000)
    np.testing.assert_allclose(np.bincount(order, minlength=3) / len(order), probs, atol=0.02)
    np.testing.assert_array_equal(order, mixing.task_order(probs, 0, 0, 6000))
    assert not np.array_equal(order, mixing.task_order(probs, 1, 0, 6000))
    for start in (1, 1023, 1024, 3001):  # inside, at and across the 1024-step blocks
        np.testing.assert_array_equal(mixing.task_order(probs, 0, start, 6000), order[start:])
        np.testing.assert_array_equal(mixing.counts(probs, 0, start), np.bincount(order[:start], minlength=3))
    # Batches: task t's k-th batch is (t, k); resuming at `start` continues each task's own stream.
    streams = [lambda k, t=t: ((t, i) for i in itertools.count(k)) for t in range(3)]
    whole = list(itertools.islice(mixing.mixed_batches(streams, probs, 0, 0), 3000))
    assert [t for t, _ in whole] == order[:3000].tolist()
    resumed = list(itertools.islice(mixing.mixed_batches(streams, probs, 0, 1500), 1500))
    assert resumed == whole[1500:]


# ---- Config ---------------------------------------------------------------------------------------


def _args(glue_dir, sst2, stsb, tasks="sst2+stsb") -> str:
    return f"tasks={tasks},teachers={sst2}+{stsb},layers=2,glue_dir={glue_dir},runlocal"


def _set(config, key: str, value) -> None:
    """config.a.b = value for key "a.b", as --config.a.b=value does."""
    *parents, leaf = key.split(".")
    for p in parents:
        config = config[p]
    config[leaf] = value


@pytest.mark.parametrize("args, change, named", [
    ("tasks=sst2+qqqq,teachers=a+b", None, r"config\.tasks=\('sst2', 'qqqq'\).*'qqqq' is not one"),
    ("tasks=sst2+sst2,teachers=a+b", None, r"each task once \(sst2 repeated\)"),
    ("tasks=sst2+stsb", None, r"config\.per_task\.sst2\.teacher=None"),
    ("tasks=sst2+stsb,teachers=a+b", ("sampling", "round-robin"), r"config\.sampling='round-robin'.*proportional"),
    ("tasks=sst2+stsb,teachers=a+b", ("sampling_temperature", 0.0), r"config\.sampling_temperature=0\.0"),
    ("tasks=sst2+stsb,teachers=a+b", ("per_task.stsb.alpha", 2.0), r"config\.per_task\.stsb\.alpha=2\.0.*\[0, 1\]"),
    ("tasks=sst2+stsb,teachers=a+b", ("per_task.sst2.weight", 0.0), r"config\.per_task\.sst2\.weight=0\.0"),
    ("tasks=sst2+stsb,teachers=a+b", ("per_task.sst2.strategy", "top"), r"config\.per_task\.sst2\.strategy='top'"),
    ("tasks=sst2+stsb,teachers=a+b", ("per_task.sst2.train_examples", 0), r"config\.per_task\.sst2\.train_examples=0"),
    ("tasks=sst2+stsb,teachers=a+b", ("tasks", ("sst2",)), r"config\.per_task=\['sst2', 'stsb'\]"),
])
def test_config_errors_name_the_key_and_the_fix(args, change, named):
    c = multitask_config.get_config(args)
    if change:
        _set(c, *change)
    with pytest.raises(ConfigError, match=named):
        tasks_.check_multitask_config(c)


def test_a_task_config_is_the_shared_fields_with_its_own_overrides():
    c = multitask_config.get_config("tasks=sst2+stsb,teachers=a+b,layers=3")
    c.train_examples, c.alpha = 500, 0.5
    _set(c, "per_task.sst2.train_examples", 10000)
    _set(c, "per_task.stsb.alpha", 0.2)
    sst2, stsb = tasks_.task_config(c, "sst2"), tasks_.task_config(c, "stsb")
    assert (sst2.task, sst2.teacher, sst2.train_examples, sst2.alpha) == ("sst2", "a", 10000, 0.5)
    assert (stsb.task, stsb.teacher, stsb.train_examples, stsb.alpha) == ("stsb", "b", 500, 0.2)
    assert sst2.kind == "distill" and "per_task" not in sst2 and "tasks" not in sst2


def test_teachers_must_match_the_tasks(glue_dir, teacher_runs):
    with pytest.raises(ValueError, match=r"1 teacher\(s\) for 2 task\(s\)"):
        multitask_config.get_config("tasks=sst2+stsb,teachers=a")
    wrong = multitask_config.get_config(_args(glue_dir, teacher_runs["sst2"], teacher_runs["sst2"], "stsb+sst2"))
    with pytest.raises(CheckpointError, match=r"task stsb \(config\.per_task\.stsb\): .*fine-tuned on task 'sst2'"):
        trainer.MultiTaskRun(wrong, teacher_runs["sst2"].parent / "wrong")


# ---- One student's step per task ------------------------------------------------------------------


def test_a_task_step_leaves_the_other_heads_alone_and_weights_its_loss():
    """`task_step` on a toy step over the student's params layout (the e2e run uses the real one):
    the task's α/β/T reach the step; the other heads keep parameters and Adam moments, which
    momentum alone would otherwise move."""
    params = {"models": {"a": {"bert": {"w": jnp.ones(3)}, "classifier": {"kernel": jnp.ones(2)}},
                         "b": {"classifier": {"kernel": jnp.ones(2)}}}}
    tx = optax.adam(0.1)

    def toy_step(task):
        """A step whose loss reads the encoder and `task`'s head: the other head's gradient is zero."""
        def step(state, teacher_params, batch):
            def loss(p):
                return jnp.sum((p["models"]["a"]["bert"]["w"] * batch) ** 2) + jnp.sum(
                    p["models"][task]["classifier"]["kernel"] ** 2)
            updates, opt_state = tx.update(jax.grad(loss)(state.params), state.opt_state, state.params)
            new = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                                opt_state=opt_state)
            return new, {"alpha": state.hparams["alpha"]}
        return step

    state = steps.TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params), rng=jax.random.key(0),
                             hparams={"a": {"alpha": 0.25}, "b": {"alpha": 0.75}})
    state, m = student_.task_step(toy_step("a"), "a")(state, None, 1.0)
    assert m["alpha"] == 0.25
    state, m = student_.task_step(toy_step("b"), "b")(state, None, 2.0)  # b's head now has momentum
    assert m["alpha"] == 0.75 and state.hparams == {"a": {"alpha": 0.25}, "b": {"alpha": 0.75}}
    before = state
    state, _ = student_.task_step(toy_step("a"), "a")(state, None, 1.0)
    unfrozen, _ = toy_step("a")(before.replace(hparams=before.hparams["a"]), None, 1.0)

    def head(s, t, tree="params"):
        if tree == "params":
            return s.params["models"][t]["classifier"]["kernel"]
        return getattr(s.opt_state[0], tree)["models"][t]["classifier"]["kernel"]  # adam's mu and nu

    for tree in ("params", "mu", "nu"):
        np.testing.assert_array_equal(head(state, "b", tree), head(before, "b", tree))
        assert not np.array_equal(head(unfrozen, "b", tree), head(before, "b", tree))  # what the freeze prevents
        np.testing.assert_array_equal(head(state, "a", tree), head(unfrozen, "a", tree))
    np.testing.assert_array_equal(state.params["models"]["a"]["bert"]["w"], unfrozen.params["models"]["a"]["bert"]["w"])
    # The weight scales the gradient the optimizer sees: the update of weight × the loss.
    params, grads = {"w": jnp.ones(3)}, {"w": jnp.array([1.0, -2.0, 0.5])}
    sgd = optax.sgd(0.1)
    doubled, _ = student_.weighted(sgd, 2.0).update(grads, sgd.init(params), params)
    np.testing.assert_allclose(doubled["w"], sgd.update(jax.tree.map(lambda g: 2 * g, grads), sgd.init(params))[0]["w"])


# ---- A 2-task run ---------------------------------------------------------------------------------

SEED = 7  # its first 8 steps alternate: sst2 stsb stsb sst2 sst2 stsb sst2 stsb
ORDER = ["sst2", "stsb", "stsb", "sst2", "sst2", "stsb", "sst2", "stsb"]


def _teacher_run(root: Path, task: str, model_dir: Path, score: float) -> Path:
    """A finished fine-tuning run's workdir around a teacher folder, as train.py leaves one."""
    w = root / task
    w.mkdir(parents=True)
    (w / "model").symlink_to(model_dir)
    config = {"task": task, "kind": "finetune", "model": "minilm-l6", "layers": None}
    (w / "config.json").write_text(json.dumps(config))
    best = {"step": 10, "metrics": {"score": score}}
    params = 22_713_986  # all-MiniLM-L6-v2 with a head; the report only shows it
    (w / "results.json").write_text(json.dumps({
        "task": task, "kind": "finetune", "metric": metrics.main_metric(task), "metrics": best["metrics"], "step": 10,
        "best": best, "last": best, "total_steps": 10, "examples_per_s": 50.0, "config": config,
        "model": {"pretrained": "minilm-l6", "layers": 6, "hidden_size": 384, "params": params,
                  "params_without_embeddings": params // 2}, "teacher": None}))
    return w


@pytest.fixture(scope="module")
def teacher_runs(tmp_path_factory, sst2_teacher_dir, stsb_teacher_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("teachers")
    return {"sst2": _teacher_run(root, "sst2", sst2_teacher_dir, 0.9),
            "stsb": _teacher_run(root, "stsb", stsb_teacher_dir, 0.8)}


# 8 steps of batch 8 (4 + 4 per epoch: 32 examples per task, length 32); evaluation and checkpoint
# at 4 and 8; STS-B's own alpha and beta, SST-2's loss counted twice.
OVERRIDES = {"seed": SEED, "progress": False, "max_seq_length": 32, "batch_size": 8, "train_examples": 32,
             "max_steps": 8, "eval_every_steps": 4, "checkpoint_every_steps": 0, "log_every_steps": 1,
             "eval_examples": 32, "test_examples": 4, "learning_rate": 2e-3, "per_task.stsb.alpha": 0.2,
             "per_task.stsb.beta": 10.0, "per_task.sst2.weight": 2.0}


def _config(glue_dir, teacher_runs):
    c = multitask_config.get_config(_args(glue_dir, **teacher_runs))
    for key, value in OVERRIDES.items():
        _set(c, key, value)
    return c


@pytest.fixture(scope="module")
def reference(glue_dir, teacher_runs, tmp_path_factory):
    """An uninterrupted run; records each trace of a task's step (at trace time only), the task of
    every step the loop ran, and what the best evaluation exported."""
    workdir = tmp_path_factory.mktemp("reference")
    traces, ran, exported = [], [], []
    real_step, real_train_step, real_export = steps.make_distill_step, trainer._Students.train_step, student_.export

    def counting(*args, **kwargs):
        step = real_step(*args, **kwargs)

        def traced_step(state, teacher_params, batch):
            traces.append(batch["teacher_logits"].shape)  # Python: runs when jax traces, never after
            return step(state, teacher_params, batch)
        return traced_step

    def recording_step(self, state, item):
        ran.append(self.run.tasks[item[0]])
        return real_train_step(self, state, item)

    def recording_export(graphdef, params, folder, tokenizer):
        exported.append((graphdef, params))
        return real_export(graphdef, params, folder, tokenizer)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(steps, "make_distill_step", counting)
        mp.setattr(trainer._Students, "train_step", recording_step)
        mp.setattr(student_, "export", recording_export)
        results = trainer.train_multitask(_config(glue_dir, teacher_runs), workdir)
    return {"workdir": workdir, "results": results, "traces": traces, "ran": ran, "exported": exported[-1]}


def _lines(workdir: Path) -> list[dict]:
    return [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_tasks_alternate_without_recompiling(reference):
    assert reference["ran"] == ORDER
    # One trace per task (its only batch shape), at compile time before the loop; none as tasks alternate.
    assert sorted(reference["traces"]) == [(8, 1), (8, 2)]


def test_each_task_learns_with_its_own_loss_and_the_mean_selects(reference):
    res, lines = reference["results"], _lines(reference["workdir"])
    train = [l for l in lines if l["split"] == "train" and "task" in l]
    assert [l["task"] for l in train] == ORDER and all(np.isfinite(l["loss"]) for l in train)
    weights = {"sst2": (0.5, 100.0), "stsb": (0.2, 10.0)}  # (alpha, beta): shared and per-task override
    for l in train:
        alpha, beta = weights[l["task"]]
        assert l["loss"] == pytest.approx((1 - alpha) * l["ce"] + alpha * l["ds"] + beta * l["pt"], rel=1e-5)
    stsb = [l["ce"] for l in train if l["task"] == "stsb"]  # the regression head learns the scores' scale
    assert np.mean(stsb[2:]) < 0.75 * np.mean(stsb[:2])
    dev = {(l.get("task"), l["step"]): l for l in lines if l["split"] == "dev"}
    assert sorted(s for t, s in dev if t is None) == [4, 8]
    for step in (4, 8):
        assert set(dev["sst2", step]) >= {"accuracy", "score"} and set(dev["stsb", step]) >= {"pearson", "spearmanr"}
        assert dev[None, step]["score"] == pytest.approx((dev["sst2", step]["score"] + dev["stsb", step]["score"]) / 2)
    best = max((4, 8), key=lambda s: (dev[None, s]["score"], -s))
    assert res["step"] == best and res["metrics"]["score"] == pytest.approx(dev[None, best]["score"])
    for task in ("sst2", "stsb"):
        assert res["per_task"][task]["metrics"]["score"] == pytest.approx(dev[task, best]["score"])
        assert res["per_task"][task]["steps"] == ORDER.count(task)
    assert res["model"]["params"] == res["model"]["encoder_params"] + 770 + 385  # heads: 384·2+2, 384+1


def test_test_predictions_per_task(reference):
    files = reference["results"]["per_task"]
    sst2 = Path(files["sst2"]["test_predictions"][0]).read_text().splitlines()
    stsb = Path(files["stsb"]["test_predictions"][0]).read_text().splitlines()
    assert Path(files["sst2"]["test_predictions"][0]).name == "SST-2.tsv" and len(sst2) == len(stsb) == 5
    assert {l.split("\t")[1] for l in sst2[1:]} <= {"0", "1"}
    assert all(np.isfinite(float(l.split("\t")[1])) for l in stsb[1:])  # scores, not class ids


def test_export_gives_the_students_logits_in_transformers(reference, glue_dir, tokenizer):
    """Each task's folder in BertForSequenceClassification and the encoder's in BertModel compute what
    the selected student computes, on real dev inputs; the folders' dev metrics are the selected step's."""
    workdir, res = reference["workdir"], reference["results"]
    graphdef, params = reference["exported"]
    student = nnx.merge(graphdef, params)
    for task in ("sst2", "stsb"):
        tok = data.tokenize(data.load_split(task, "validation", glue_dir=glue_dir).select(range(32)), tokenizer, 32)
        inputs = {"input_ids": tok.input_ids, "token_type_ids": tok.token_type_ids,
                  "attention_mask": (np.arange(32) < tok.lengths[:, None]).astype(np.int32)}
        student.task = task
        out = student(*(jnp.asarray(inputs[k]) for k in data.MODEL_INPUTS))
        hf, info = transformers.BertForSequenceClassification.from_pretrained(
            str(workdir / "model" / task), output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"]
        with torch.no_grad():
            logits = hf.eval()(**{k: torch.from_numpy(v).long() for k, v in inputs.items()}).logits.numpy()
        np.testing.assert_allclose(logits, np.asarray(out.logits), atol=2e-5, rtol=0)
        got = metrics.compute(task, metrics.predictions_from_logits(task, logits), tok.labels)
        for k, v in got.items():
            assert v == pytest.approx(res["per_task"][task]["metrics"][k], abs=1e-4)
    encoder, info = transformers.BertModel.from_pretrained(str(workdir / "model" / "encoder"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        pooled = encoder.eval()(**{k: torch.from_numpy(v).long() for k, v in inputs.items()}).pooler_output.numpy()
    np.testing.assert_allclose(pooled, np.asarray(out.pooled), atol=2e-5, rtol=0)
    assert json.loads((workdir / "model" / "stsb" / "config.json").read_text())["problem_type"] == "regression"


def test_nan_loss_stops_the_run_naming_step_task_and_examples(glue_dir, teacher_runs, tmp_path, monkeypatch):
    real_train_step = trainer._Students.train_step

    def nan_from_step_2(self, state, item):  # the compiled steps stay the reference's
        at = int(state.step) + 1
        new, m = real_train_step(self, state, item)
        return new, dict(m, loss=np.float32(np.nan) if at >= 2 else m["loss"])

    monkeypatch.setattr(trainer._Students, "train_step", nan_from_step_2)
    with pytest.raises(FloatingPointError, match=r"loss is nan at step 2 \(task stsb, batch of training examples "
                                                 r"idx \[\d+(, \d+){7}\]\); stopped without saving"):
        trainer.train_multitask(_config(glue_dir, teacher_runs), tmp_path)
    assert checkpoints.TrainCheckpointer(tmp_path / "checkpoints").all_steps() == []


def test_preempted_then_resumed_by_run_py_ends_like_the_uninterrupted_run(reference, glue_dir, teacher_runs,
                                                                         tmp_path, monkeypatch):
    """SIGTERM during step 3 (in process: the loop saves and raises Preempted); then the same config
    through run.py resumes and ends with the reference's results, exported weights and log."""
    real_train_step = trainer._Students.train_step

    def terminated(self, state, item):
        at = int(state.step) + 1  # read before the step donates the state
        out = real_train_step(self, state, item)
        if at == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(trainer._Students, "train_step", terminated)
    with pytest.raises(loop.Preempted, match="saved a checkpoint at step 3"):
        trainer.train_multitask(_config(glue_dir, teacher_runs), tmp_path)
    monkeypatch.undo()
    assert checkpoints.TrainCheckpointer(tmp_path / "checkpoints").all_steps() == [3]

    proc = subprocess.run([sys.executable, "run.py", f"--config=configs/multitask.py:{_args(glue_dir, **teacher_runs)}",
                           f"--workdir={tmp_path}", *(f"--config.{k}={v}" for k, v in OVERRIDES.items()),
                           "--config.predict_test=False"],  # the exports are compared instead
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "JAX_NUM_CPU_DEVICES": "4", "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("multitask sst2+stsb in ") and "best dev mean of main metrics = " in proc.stdout
    # Each task's teacher cache comes from the interrupted run (absl may log a line twice: count paths).
    reused = {line.split("teacher outputs reused: ")[1] for line in proc.stderr.splitlines()
              if "outputs reused: " in line}
    assert len(reused) == 2 and "teacher outputs computed" not in proc.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    ref_dir, ref = reference["workdir"], reference["results"]
    assert results["best"] == ref["best"] and results["last"] == ref["last"]
    for folder in ("sst2", "stsb", "encoder"):
        a, b = (load_file(w / "model" / folder / "model.safetensors") for w in (tmp_path, ref_dir))
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), folder
    drop = lambda lines: [{k: v for k, v in l.items() if k != "examples_per_s"} for l in lines]  # noqa: E731
    assert drop(_lines(tmp_path)) == drop(_lines(ref_dir))


# ---- Report ---------------------------------------------------------------------------------------


def test_report_puts_the_student_beside_teachers_and_single_task_students(reference, teacher_runs, tmp_path, capsys):
    single = tmp_path / "pkd-skip2"  # a single-task SST-2 student, as train.py leaves one
    single.mkdir()
    (single / "config.json").write_text(json.dumps({"task": "sst2", "kind": "distill", "layers": 2, "beta": 100.0,
                                                    "strategy": "skip"}))
    (single / "results.json").write_text(json.dumps({
        "task": "sst2", "kind": "distill", "metric": "accuracy", "metrics": {"accuracy": 0.5, "score": 0.5},
        "step": 8, "best": {}, "total_steps": 8, "examples_per_s": 10.0,
        "config": {"task": "sst2", "kind": "distill", "layers": 2, "beta": 100.0, "strategy": "skip"},
        "model": {"layers": 2, "params": 15_600_000, "params_without_embeddings": 3_700_000},
        "teacher": {"path": str(teacher_runs["sst2"] / "model")}}))
    workdir, res = reference["workdir"], reference["results"]
    assert report.main([str(teacher_runs["sst2"]), str(teacher_runs["stsb"]), str(single), str(workdir),
                        "--out", str(tmp_path / "report")]) == 0
    text = (tmp_path / "report" / "report.md").read_text()
    rows = {(r.task, r.name): r for r in report.summary_rows(
        report.load_runs([teacher_runs["sst2"], teacher_runs["stsb"], single]),
        extra=report.multitask_rows([report.load_multitask(workdir)], report.load_runs(
            [teacher_runs["sst2"], teacher_runs["stsb"]])))}
    mt = rows["sst2", workdir.name]
    assert mt.method == "MT-PKD-Skip-2" and mt.teacher == "sst2"
    assert mt.pct_of_teacher == pytest.approx(100 * res["per_task"]["sst2"]["metrics"]["score"] / 0.9)
    assert rows["stsb", workdir.name].pct_of_teacher == pytest.approx(
        100 * res["per_task"]["stsb"]["metrics"]["score"] / 0.8)
    score = res["per_task"]["sst2"]["metrics"]["score"]
    assert f"| SST-2 | 90.0 | 50.0 (PKD-Skip-2, pkd-skip2) | {100 * score:.1f} (MT-PKD-Skip-2) | " \
           f"{100 * (score - 0.5):+.1f} |" in text
    encoder = res["model"]["encoder_params"]
    assert f"{encoder / 1e6:.3g} M (50 %) saved" in text  # two students would hold the encoder twice
    assert "## STS-B" in text and f"| {workdir.name} | MT-PKD-Skip-2 |" in capsys.readouterr().out
