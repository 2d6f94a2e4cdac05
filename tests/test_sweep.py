"""The vmapped sweep: each student equals its separate run; outputs, resume, NaN students, chunking.

Equality tolerance: vmap batches the students' matmuls and reductions differently from a single
run, so float32 results agree to rounding, not bit for bit. Parameters after the run: |Δ| ≤
PARAM_ATOL + PARAM_RTOL·|x| elementwise (measured on 8 fake CPU devices: max |Δ| ≈ 6e-8 after 4
AdamW steps at lr 5e-3; the suite's 4 pass within the same bounds); dev metrics: equal.
"""

import csv
import json

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from configs import sweep as sweep_config
from pkd_jax import checkpoints, data, losses, optim, partitioning, report, setup, steps, sweep, train
from pkd_jax.bert import BertConfig, BertForSequenceClassification

PARAM_ATOL, PARAM_RTOL = 1e-5, 1e-4


def _config(glue_dir, teacher, **fields):
    """2 students (alpha 0.2 and 0.7), vmapped in one chunk, on an SST-2 slice: 4 steps, evaluated
    at steps 2 and 4."""
    c = sweep_config.get_config(f"task=sst2,teacher={teacher},model=minilm-l6,layers=3,glue_dir={glue_dir}")
    c.train_examples, c.max_seq_length, c.batch_size = 128, 32, 16
    c.eval_examples, c.eval_batch_size = 64, 32
    c.max_steps, c.eval_every_steps, c.checkpoint_every_steps, c.log_every_steps = 4, 2, 0, 2
    c.progress, c.students_per_chunk = False, 2  # the CPU's automatic size would be 1
    c.temperatures, c.alphas, c.betas, c.learning_rates = (10.0,), (0.2, 0.7), (100.0,), (5e-3,)
    for key, value in fields.items():
        c[key] = value
    return c


def _assert_params_close(a, b):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=PARAM_ATOL, rtol=PARAM_RTOL,
                                   err_msg=jax.tree_util.keystr(path))


def _student(state, j):
    return jax.tree.map(lambda x: x[j], state)


# --------------------------------------------------------------------------------------------
# The sweep against separate train_and_evaluate runs
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def swept(tmp_path_factory, glue_dir, sst2_teacher_dir, one_device):
    """The sweep and its points' single runs, on one device (the vmapped step's placements over four
    are test_vmapped_step_equals_separate_steps')."""
    with one_device():
        return _swept(tmp_path_factory.mktemp("sweep"), glue_dir, sst2_teacher_dir)


def _swept(root, glue_dir, sst2_teacher_dir):
    config = _config(glue_dir, sst2_teacher_dir)
    runner = sweep.Sweep(config, root / "sweep")
    assert runner.plan.chunks == [[0, 1]]
    final = runner.train_chunk(0).state
    # The chunk is done: writes the tables and results only; run.py's report hook adds sweep.md and the heatmap.
    results = runner.run(on_progress=report.write_sweep_report)
    singles = [train.train_and_evaluate(sweep.point_config(config, p), root / f"single{p.student}")
               for p in runner.points]
    single_states = []
    for p in runner.points:
        ckpt = checkpoints.TrainCheckpointer(root / f"single{p.student}" / "checkpoints")
        step, state, _ = ckpt.restore_latest(_student(final, p.student))
        ckpt.close()
        assert step == 4
        single_states.append(state)
    return {"root": root, "workdir": root / "sweep", "config": config, "final": final, "results": results,
            "singles": singles, "single_states": single_states}


def test_each_student_ends_with_its_single_runs_parameters(swept):
    final = jax.device_get(swept["final"])
    for j, single in enumerate(swept["single_states"]):
        student = _student(final, j)
        assert int(student.step) == int(single.step) == 4
        _assert_params_close(student.params, single.params)
        _assert_params_close(student.opt_state, single.opt_state)
        assert student.hparams["alpha"] == np.float32((0.2, 0.7)[j])
    # The students did diverge from each other: the test compares something.
    a, b = (_student(final, j).params["classifier"]["kernel"][...] for j in (0, 1))
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-4


def test_each_student_has_its_single_runs_dev_metrics(swept):
    rows = list(csv.DictReader((swept["workdir"] / "sweep.csv").open()))
    assert [int(r["student"]) for r in rows] == [0, 1]
    for row, single in zip(rows, swept["singles"]):
        assert int(row["best_step"]) == single["best"]["step"]
        assert float(row["score"]) == single["best"]["metrics"]["score"]
        assert float(row["accuracy"]) == single["best"]["metrics"]["accuracy"]
        assert (int(row["last_step"]), float(row["last_score"])) == (4, single["last"]["metrics"]["score"])
        assert row["status"] == "ok" and float(row["alpha"]) in (0.2, 0.7)


def test_outputs(swept):
    w, results = swept["workdir"], swept["results"]
    best = min(swept["singles"], key=lambda r: -r["best"]["metrics"]["score"])  # first on ties
    assert results["best"]["metrics"] == best["best"]["metrics"]
    assert results["students"] == 2 and results["failed"] == [] and results["chunks"] == 1
    assert results["grid"]["alphas"] == [0.2, 0.7] and results["students_examples_per_s"] > 0
    assert json.loads((w / "results.json").read_text()) == results
    md = (w / "sweep.md").read_text()
    assert "★" in md and "![heatmap](heatmap.png)" in md and md.count("\n| ") == 3  # header + 2 rows
    assert (w / "heatmap.png").read_bytes()[:4] == b"\x89PNG"
    assert not (w / "chunk_000" / "checkpoints").exists()  # dropped once the chunk finished
    lines = [json.loads(l) for l in (w / "metrics.jsonl").read_text().splitlines()]
    assert {(l["student"], l["split"]) for l in lines} == {(0, "train"), (1, "train"), (0, "dev"), (1, "dev")}
    assert {p.name for p in (w / "tensorboard").iterdir()} == {"student_000", "student_001"}


def test_best_model_is_the_best_students_best_parameters(swept):
    """best_model/ holds what the winning point's single run exported as its model/."""
    winner = swept["results"]["best"]["student"]
    ours = load_file(swept["workdir"] / "best_model" / "model.safetensors")
    theirs = load_file(swept["root"] / f"single{winner}" / "model" / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for k in ours:
        np.testing.assert_allclose(ours[k], theirs[k], atol=PARAM_ATOL, rtol=PARAM_RTOL, err_msg=k)
    assert checkpoints.load_tokenizer(swept["workdir"] / "best_model") is not None


def test_rerun_of_a_finished_sweep_trains_nothing(swept, monkeypatch):
    from pkd_jax import teacher_cache

    monkeypatch.setattr(sweep.Sweep, "train_chunk", lambda *a: pytest.fail("retrained a finished chunk"))
    monkeypatch.setattr(teacher_cache, "build_or_load", lambda *a, **k: pytest.fail("ran the teacher's pass"))
    assert sweep.train_grid(swept["config"], swept["workdir"]) == swept["results"]


@pytest.fixture
def on_one_device(one_device):
    with one_device():
        yield


@pytest.mark.usefixtures("on_one_device")  # as the fixture's run it resumes
def test_interrupted_chunk_resumes_and_a_nan_student_fails_alone(swept, glue_dir, sst2_teacher_dir, monkeypatch):
    """Chunk 0 (alpha 0.2, as the fixture's student 0) dies after step 3 and resumes from its
    step-2 checkpoint; chunk 1 (lr 1e30) goes NaN and is marked failed without stopping the sweep."""
    config = _config(glue_dir, sst2_teacher_dir, alphas=(0.2,), learning_rates=(5e-3, 1e30), students_per_chunk=1,
                     checkpoint_every_steps=2)
    workdir = swept["root"] / "resumed"
    runner = sweep.Sweep(config, workdir)
    real_batches = data.train_batches

    def dying_batches(*args, **kwargs):
        yield from (b for _, b in zip(range(3), real_batches(*args, **kwargs)))
        raise RuntimeError("killed")

    monkeypatch.setattr(data, "train_batches", dying_batches)
    with pytest.raises(RuntimeError, match="killed"):
        runner.train_chunk(0)
    monkeypatch.setattr(data, "train_batches", real_batches)
    assert sorted(p.name for p in (workdir / "chunk_000" / "checkpoints").iterdir()) == ["2"]

    final = jax.device_get(runner.train_chunk(0).state)  # the same command again: resumes at step 2
    _assert_params_close(_student(final, 0).params, _student(jax.device_get(swept["final"]), 0).params)
    results = runner.run(on_progress=report.write_sweep_report)

    rows = {int(r["student"]): r for r in csv.DictReader((workdir / "sweep.csv").open())}
    fixture_row = next(csv.DictReader((swept["workdir"] / "sweep.csv").open()))
    for key in ("best_step", "score", "last_step", "last_score"):
        assert rows[0][key] == fixture_row[key], key
    assert rows[1]["status"] == "failed" and rows[1]["failed_step"] == "2" and rows[1]["score"] == ""
    assert results["failed"] == [1] and results["best"]["student"] == 0
    assert "failed (NaN at step 2)" in (workdir / "sweep.md").read_text()
    lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    keys = [(l["chunk"], l["student"], l["step"], l["split"]) for l in lines]
    assert len(keys) == len(set(keys))  # the killed run's lines after step 2 were dropped
    assert (0, 0, 4, "dev") in keys and not any(k[1] == 1 and k[3] == "dev" for k in keys)


def test_a_workdir_of_another_grid_is_refused(swept, glue_dir, sst2_teacher_dir):
    with pytest.raises(ValueError, match=r"holds a run with another config \(betas: \[10\.0\] here, \[100\.0\] there\).*--restart"):
        sweep.Sweep(_config(glue_dir, sst2_teacher_dir, betas=(10.0,)), swept["workdir"])


# --------------------------------------------------------------------------------------------
# The vmapped step itself, both placements (no data pipeline)
# --------------------------------------------------------------------------------------------


# Two layers, one of them mapped: what is vmapped does not depend on depth, and each layer adds to
# the compilation of the five steps below (the suite's time is mostly compilation).
TINY = BertConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=128, max_position_embeddings=64)
TINY_LAYER_MAP = losses.layer_map(6, 2, "skip")
# Every hyper-parameter differs between the two students.
POINTS = [sweep.Point(0, 0, 1e-3, 5.0, 0.2, 10.0), sweep.Point(1, 0, 3e-4, 20.0, 0.7, 500.0)]


def _tiny_batch(rows=16, length=24, mapped_layers=len(TINY_LAYER_MAP)):
    """Random token ids with cached-teacher outputs (random too: the step only reads them)."""
    rng = np.random.default_rng(0)
    return {"input_ids": rng.integers(1, TINY.vocab_size, (rows, length), dtype=np.int32),
            "token_type_ids": np.zeros((rows, length), np.int32),
            "attention_mask": (np.arange(length) < rng.integers(4, length, rows)[:, None]).astype(np.int32),
            "labels": rng.integers(0, 2, rows, dtype=np.int32),
            "teacher_logits": rng.normal(size=(rows, 2)).astype(np.float32),
            "teacher_features": rng.normal(size=(rows, mapped_layers, TINY.hidden_size)).astype(np.float32)}


@pytest.mark.parametrize("features, distance, placements", [
    ("cls", "mse", (False, True)), ("mean", "cka", (False,))])
def test_vmapped_step_equals_separate_steps(features, distance, placements):
    """Two steps of two students (every hyper-parameter different) against their own single
    steps; students replicated (batch split over the devices) and sharded (one per device);
    the paper's objective, and mean features with the CKA distance."""
    mesh, batch = partitioning.make_mesh(), _tiny_batch()

    def student(lr):
        tx = optim.make_optimizer(learning_rate=lr, total_steps=10, warmup_steps=1)
        return tx, BertForSequenceClassification(TINY, rngs=nnx.Rngs(0))

    tx, model = student(1.0)  # the stacked students' learning rates are set per student
    graphdef, base = steps.create_train_state(model, tx, seed=0)
    step = steps.make_distill_step(graphdef, tx, layer_map=TINY_LAYER_MAP, features=features, distance=distance)
    single = steps.compile_step(step, base, mesh)
    expected = []
    for p in POINTS:
        own_tx, model = student(p.learning_rate)
        _, state = steps.create_train_state(model, own_tx, seed=0, **p.hparams)
        state = partitioning.place_state(state, mesh)
        for _ in range(2):
            state, m = single(state, None, partitioning.shard_batch(batch, mesh))
        expected.append((jax.device_get(state).params, float(m["loss"])))

    for shard_students in placements:
        # Sharded: one student per device (the two points, then copies of the second).
        points = POINTS + [POINTS[-1]] * ((mesh.size - len(POINTS)) if shard_students else 0)
        stacked = sweep.stack_students(base, points, mesh, shard_students=shard_students)
        kernel = stacked.params["classifier"]["kernel"][...]
        assert kernel.sharding.shard_shape(kernel.shape)[0] == (1 if shard_students else len(points))
        vstep = sweep.compile_students_step(step, stacked, mesh, shard_students=shard_students)
        place = sweep.replicate_batch if shard_students else partitioning.shard_batch
        for _ in range(2):
            stacked, m = vstep(stacked, None, place(batch, mesh))
        stacked = jax.device_get(stacked)
        assert m["loss"].shape == (len(points),) and m["loss"][0] != m["loss"][1]
        for j, (params, loss) in enumerate(expected):
            np.testing.assert_allclose(m["loss"][j], loss, rtol=1e-5)
            _assert_params_close(_student(stacked, j).params, params)


# --------------------------------------------------------------------------------------------
# Grid, chunks, chunk size, config
# --------------------------------------------------------------------------------------------


def test_default_grid_is_the_papers(minilm_dir):
    c = sweep_config.get_config(f"task=rte,teacher={minilm_dir},model=minilm-l6")
    points = sweep.grid(c)
    assert len(points) == 36 and {p.seed for p in points} == {0} and {p.learning_rate for p in points} == {5e-5}
    assert {p.temperature for p in points} == {5, 10, 20} and {p.alpha for p in points} == {0.2, 0.5, 0.7}
    assert {p.beta for p in points} == {10, 100, 500, 1000}
    assert [p.student for p in points] == list(range(36))
    assert len(sweep.grid(sweep_config.get_config("runlocal"))) == 8
    single = sweep.point_config(c, points[5])
    assert (single.kind, single.temperature, single.alpha, single.beta) == ("distill", 5.0, 0.5, 100.0)
    assert "alphas" not in single and "alpha" not in c
    setup.check_config(single)


def test_chunks_hold_one_seed():
    c = sweep_config.get_config("runlocal")
    c.seeds, c.betas = (0, 1), (10.0,)  # 2 seeds x 4 students
    assert sweep.make_chunks(sweep.grid(c), 3) == [[0, 1, 2], [3], [4, 5, 6], [7]]


def test_auto_chunk_size():
    gib = 2**30
    assert sweep.auto_chunk_size(gib, 10 * gib, max_students=36) == 8  # 80 % of 10 GiB
    assert sweep.auto_chunk_size(gib, 10 * gib, max_students=4) == 4
    assert sweep.auto_chunk_size(gib, 10 * gib, max_students=36, reserved=6 * gib) == 2
    assert sweep.auto_chunk_size(20 * gib, 10 * gib, max_students=36) == 1
    assert sweep.auto_chunk_size(gib, 10 * gib, max_students=36, devices=8, shard_students=True) == 40
    assert sweep.auto_chunk_size(gib, 10 * gib, max_students=12, devices=8, shard_students=True) == 16
    assert sweep.auto_chunk_size(gib, 10 * gib, max_students=36, cpu=True) == 1
    assert sweep.auto_chunk_size(gib, 10 * gib, max_students=36, devices=8, shard_students=True, cpu=True) == 8
    # BERT_3 (45.7M params) at batch 32 x 128 on one device: params dominate, activations follow.
    base = sweep.student_bytes(BertConfig(num_hidden_layers=3), 45_692_930, 32, 128, 2)
    assert 0.9 * gib < base < 2 * gib


def test_a_cpu_sweep_trains_its_students_one_after_another(glue_dir, sst2_teacher_dir, tmp_path):
    assert jax.default_backend() == "cpu"
    runner = sweep.Sweep(_config(glue_dir, sst2_teacher_dir, students_per_chunk=0), tmp_path)
    assert runner.plan.students_per_chunk == 1 and runner.plan.chunks == [[0], [1]]


@pytest.mark.parametrize("field, value, match", [
    ("alphas", (0.5, 1.5), "alphas"), ("betas", (), "betas"), ("temperatures", (5.0, 5.0), "temperatures"),
    ("seeds", (0.5,), "seeds"), ("students_per_chunk", -1, "students_per_chunk"),
])
def test_bad_grids_fail_at_once(field, value, match):
    c = sweep_config.get_config("runlocal")
    c[field] = value
    with pytest.raises(ValueError, match=match):
        sweep.check_sweep_config(c)


def test_shard_students_and_fsdp_exclude_each_other():
    c = sweep_config.get_config("runlocal")
    c.shard_students, c.mesh.fsdp = True, 2
    with pytest.raises(ValueError, match="not both"):
        sweep.check_sweep_config(c)
