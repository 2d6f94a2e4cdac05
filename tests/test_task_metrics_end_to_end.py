"""Task metrics end to end: MRPC (selected by F1) and STS-B (one logit, selected by the mean of
Pearson and Spearman) fine-tuned on real GLUE rows, then a one-logit STS-B student distilled from
the STS-B model through the teacher cache.

Each run evaluates four times, so which step is "best" matters: results.json must name the step
whose logged dev metrics win by the task's selection metric (the earliest among ties), its
checkpoint must be kept, and the exported HF folder, run by transformers' PyTorch BERT, must score
what the run logged for that step (recomputed with scikit-learn and scipy).

The runs use a one-device mesh: on 2 CPU cores 8 fake devices cost about 3x the
time per step (measured 2.3 s against 0.8 s), and meshes are what test_partitioning and
test_multiprocess check.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from configs import finetune, pkd
from pkd_jax import checkpoints, data, teacher_cache, train

TRAIN, DEV = 256, 128  # training examples (16 a step), first dev examples


def _config(c, steps: int, every: int, **fields):
    c.progress, c.predict_test, c.bucket = False, False, False  # one batch shape: one compilation
    c.train_examples, c.eval_examples, c.max_steps, c.eval_every_steps = TRAIN, DEV, steps, every
    c.checkpoint_every_steps = steps  # the last step, evaluated anyway: checkpoints at evaluations only
    c.keep_checkpoints = 1  # the latest one, plus the best: a best step is kept for being best
    for k, v in fields.items():
        c[k] = v
    return c


def _finetune(task, glue_dir, steps, every, **fields):
    return _config(finetune.get_config(f"task={task},model=minilm-l6,layers=2,glue_dir={glue_dir},runlocal"),
                   steps, every, **fields)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, glue_dir, one_device):
    """MRPC and STS-B fine-tuned, and a 1-layer STS-B student distilled from the STS-B model."""
    root = tmp_path_factory.mktemp("task_metrics")
    out, built = {}, []
    build = teacher_cache.build_or_load
    with one_device(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(teacher_cache, "build_or_load", lambda *a, **k: built.append(build(*a, **k)) or built[-1])
        # MRPC: the 2-layer model stays at the majority class here; four equal F1 scores.
        out["mrpc"] = root / "mrpc", train.train_and_evaluate(_finetune("mrpc", glue_dir, 8, 2), root / "mrpc")
        # STS-B at a high learning rate: dev correlation peaks at step 4, then falls (best != last).
        stsb = _finetune("stsb", glue_dir, 16, 4, learning_rate=2e-3)
        out["stsb"] = root / "stsb", train.train_and_evaluate(stsb, root / "stsb")
        distill = _config(pkd.get_config(f"task=stsb,teacher={root / 'stsb'},layers=1,glue_dir={glue_dir},runlocal"),
                          32, 8, teacher_mode="cached", learning_rate=1e-3)
        out["distill"] = root / "distill", train.train_and_evaluate(distill, root / "distill"), built
    return out


def _dev_log(workdir: Path) -> list[dict]:
    lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [l for l in lines if l["split"] == "dev"]


def _torch_logits(model_dir: Path, ds) -> np.ndarray:
    """Logits of transformers' PyTorch BERT, loaded from an export, on `ds`'s rows."""
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    enc = tok(list(ds["text_a"]), list(ds["text_b"]), truncation=True, max_length=64, padding=True,
              return_tensors="pt")
    model = BertForSequenceClassification.from_pretrained(str(model_dir)).eval()
    with torch.no_grad():
        return model(**enc).logits.numpy()


def _dev(task, glue_dir):
    return data.load_split(task, data.dev_split(task), glue_dir).select(range(DEV))


def _check_selection(workdir: Path, results: dict, selection: str, evals: list[int]) -> dict:
    """The best step is the first argmax of the selection column of the logged dev metrics; its
    checkpoint is kept (with keep_checkpoints=1, beside the last one)."""
    dev = _dev_log(workdir)
    assert [d["step"] for d in dev] == evals
    assert results["metric"] == selection
    column = [d[selection] if selection in d else (d["pearson"] + d["spearmanr"]) / 2 for d in dev]
    np.testing.assert_allclose([d["score"] for d in dev], column, rtol=1e-12)
    best = dev[int(np.argmax(column))]  # the first of equal scores: a later tie is no improvement
    assert results["best"]["step"] == results["step"] == best["step"]
    assert results["best"]["metrics"] == results["metrics"] == {k: v for k, v in best.items()
                                                                  if k not in ("step", "split")}
    assert results["last"]["step"] == evals[-1]
    kept = checkpoints.TrainCheckpointer(workdir / "checkpoints", keep=1).all_steps()
    assert kept == sorted({best["step"], evals[-1]})
    return best


def test_mrpc_selects_by_f1_keeps_it_and_exports_it(runs, glue_dir):
    from sklearn.metrics import accuracy_score, f1_score

    workdir, results = runs["mrpc"]
    best = _check_selection(workdir, results, "f1", [2, 4, 6, 8])
    ds = _dev("mrpc", glue_dir)
    preds = _torch_logits(workdir / "model", ds).argmax(-1)
    labels = np.asarray(ds["label"])
    assert f1_score(labels, preds) == pytest.approx(best["f1"], abs=1e-12)
    assert accuracy_score(labels, preds) == pytest.approx(best["accuracy"], abs=1e-12)


def test_stsb_selects_by_correlation_keeps_it_and_exports_it(runs, glue_dir):
    from scipy.stats import pearsonr, spearmanr

    workdir, results = runs["stsb"]
    best = _check_selection(workdir, results, "pearson_spearmanr_mean", [4, 8, 12, 16])
    assert best["score"] > results["last"]["metrics"]["score"] + 0.05  # the choice mattered
    ds = _dev("stsb", glue_dir)
    logits = _torch_logits(workdir / "model", ds)
    assert logits.shape == (DEV, 1)
    labels = np.asarray(ds["label"])
    # JAX and PyTorch float32 logits: Pearson measured 1.3e-6 apart, Spearman (ranks) equal.
    assert pearsonr(logits[:, 0], labels)[0] == pytest.approx(best["pearson"], abs=1e-5)
    assert spearmanr(logits[:, 0], labels)[0] == pytest.approx(best["spearmanr"], abs=1e-5)


def test_stsb_student_from_the_cached_one_logit_teacher(runs, glue_dir):
    workdir, results, built = runs["distill"]
    assert len(built) == 1 and not built[0].reused
    logits = np.load(built[0].path / "logits.npy")
    assert logits.shape == (TRAIN, 1) and logits.dtype == np.float32
    assert built[0].features.shape == (TRAIN, 0, 384)  # a 1-layer student maps no teacher layer
    # Row i is the teacher's output on training example i (runlocal's seeded subset).
    ds = data.load_split("stsb", "train", glue_dir)
    rows = np.sort(np.random.default_rng(0).choice(len(ds), TRAIN, replace=False))
    teacher = _torch_logits(Path(results["teacher"]["path"]), ds.select(rows[:32]))
    np.testing.assert_allclose(logits[:32], teacher, atol=1e-5)  # measured: 8.3e-7
    assert results["total_steps"] == 32 and results["teacher"]["layers"] == 2 and results["model"]["layers"] == 1
    pearson = results["last"]["metrics"]["pearson"]
    assert np.isfinite(pearson) and pearson > 0, results["last"]
