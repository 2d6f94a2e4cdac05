"""python -m pkd_jax.advise on the real all-MiniLM-L6-v2 and the real SST-2 dev set (64 examples,
max length 64): spreads against transformers, CKA of a model with itself, the recommendation, the
files and errors of the CLI, and the advice table in the report."""

import contextlib
import io
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from pkd_jax import advise, checkpoints, data, losses, partitioning, report, targets

ARGS = ["--task=sst2", "--examples=64", "--max-seq-length=64", "--layers=3"]


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = advise.main(argv)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def cli(tmp_path_factory, glue_dir) -> tuple[Path, dict, str]:
    """The CLI on the pretrained MiniLM as teacher and student init: (OUT, advice.json, stdout)."""
    out = tmp_path_factory.mktemp("advice")
    rc, stdout, stderr = _run(["minilm-l6", *ARGS, f"--glue-dir={glue_dir}", f"--out={out}"])
    assert rc == 0, stderr
    return out, json.loads((out / "advice.json").read_text()), stdout


def test_spreads_equal_transformers_hidden_states(cli, glue_dir, minilm_dir):
    """(a) Spreads from an independent pipeline: the TSV read by hand, HF tokenizer, PyTorch BertModel."""
    lines = (glue_dir / "SST-2" / "dev.tsv").read_text().splitlines()[1:65]
    sentences = [line.split("\t")[0] for line in lines]
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(minilm_dir))
    enc = tokenizer(sentences, padding=True, truncation=True, max_length=64, return_tensors="pt")
    model = transformers.BertModel.from_pretrained(str(minilm_dir)).eval()
    with torch.no_grad():
        hidden = [h.double().numpy() for h in model(**enc, output_hidden_states=True).hidden_states[1:]]
    mask = enc["attention_mask"].double().numpy()[:, :, None]
    features = {"cls": [h[:, 0] for h in hidden],
                "mean": [(h * mask).sum(1) / mask.sum(1) for h in hidden[:-1]]}

    def spread(x):  # mean squared distance of the unit rows to their mean
        unit = x / np.linalg.norm(x, axis=-1, keepdims=True)
        return float(((unit - unit.mean(0)) ** 2).sum(-1).mean())

    measured = cli[1]["spread"]
    assert cli[1]["examples"] == 64 and [len(measured["cls"]), len(measured["mean"])] == [6, 5]
    for kind, layers in features.items():
        expected = [spread(x) for x in layers]
        # Measured 2026-11-30: relative differences <= 2e-6, [CLS] spreads of 1e-6 included.
        np.testing.assert_allclose(measured[kind], expected, rtol=1e-4, err_msg=kind)


def test_a_sample_smaller_than_a_batch_runs_unpadded_with_the_same_features(glue_dir, minilm_dir, tokenizer):
    """5 examples run as one batch of 8 (the next multiple of the 4 devices), not padded to the
    requested 256 (a run's spread check on a tiny training set), and give the features they give
    among 64 examples in batches of 32."""
    tok = advise.dev_sample("sst2", tokenizer, glue_dir, 64, 64)
    graphdef, params = nnx.split(checkpoints.load_pretrained(minilm_dir, num_labels=2), nnx.Param)
    mesh = partitioning.make_mesh()
    sizes, eval_batches = [], data.eval_batches

    def recorded(tok, batch_size, **kw):
        sizes.append(batch_size)
        return eval_batches(tok, batch_size, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(data, "eval_batches", recorded)
        few = targets.layer_features(graphdef, params, tok, mesh, batch_size=256, limit=5, bucket=False)
    assert sizes == [8] and few["cls"].shape == (6, 5, 384)
    every = targets.layer_features(graphdef, params, tok, mesh, batch_size=32, limit=64, bucket=False)
    for kind in ("cls", "mean"):
        np.testing.assert_allclose(few[kind], every[kind][:, :5], atol=1e-5, err_msg=kind)


def test_cka_of_a_model_with_its_own_layers(cli):
    """(b) Student = the teacher's first 3 layers: CKA(student i, teacher i) = 1, below 1 elsewhere."""
    cka = cli[1]["cka"]
    assert np.shape(cka["cls"]) == (3, 6) and np.shape(cka["mean"]) == (2, 5)
    for kind in ("cls", "mean"):
        grid = np.asarray(cka[kind])
        diagonal = np.arange(grid.shape[0])
        np.testing.assert_allclose(grid[diagonal, diagonal], 1.0, atol=1e-5, err_msg=kind)
        off = np.ones(grid.shape, bool)
        off[diagonal, diagonal] = False
        assert np.all(grid[off] < 1 - 1e-3) and np.all(grid[off] > 0), (kind, grid)


def test_recommends_mean_features_and_avoids_constant_cls_maps(cli):
    """(c) MiniLM's [CLS] below its top layer is near-constant: mean features, and the [CLS] maps
    onto near-constant layers are listed to avoid."""
    advice = cli[1]
    rec, spread = advice["recommendation"], advice["spread"]
    assert rec["features"] == "mean"
    # mean CKA decides between skip (2, 4) and last (4, 5): the shallower skip layers are closer
    assert (rec["strategy"], rec["layer_map"]) == ("skip", [2, 4])
    assert rec["flags"] == "--config.patient_features=mean --config.strategy=skip"
    assert all(v < targets.NEAR_CONSTANT for v in spread["cls"][:5]) and spread["cls"][5] > targets.NEAR_CONSTANT
    avoided = {(a["features"], a["strategy"]): a for a in rec["avoid"]}
    for strategy in ("skip", "last"):
        layers = list(losses.layer_map(6, 3, strategy))
        constant = [l for l in layers if spread["cls"][l - 1] < targets.NEAR_CONSTANT]
        assert avoided[("cls", strategy)]["layer_map"] == layers
        assert avoided[("cls", strategy)]["near_constant"] == constant == layers
    assert not any(a["features"] == "mean" for a in rec["avoid"])
    # the most-similar mean map is the student's own layers: listed, not offered
    similar = next(m for m in advice["maps"] if m["features"] == "mean" and m["strategy"] == "most similar")
    assert similar["layer_map"] == [1, 2] and not similar["offered"]


def test_cli_files_and_output(cli):
    """(d) advice.json, advice.md and advice.png in --out; the tables printed."""
    out, advice, stdout = cli
    md = (out / "advice.md").read_text()
    for text in (md, stdout):
        assert "| Teacher layer | Spread [CLS] | Spread mean | Near-constant |" in text
        assert "**Recommendation:** `--config.patient_features=mean --config.strategy=skip`" in text
        assert "| mean | skip | 2, 4 |" in text and "**recommended**" in text
    assert "![CKA, student layer × teacher layer](advice.png)" in md
    png = (out / "advice.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert advice["command"].startswith("python -m pkd_jax.advise minilm-l6 --task=sst2")
    assert advice["device"] and advice["date"] and advice["student"]["starts_from_teacher_checkpoint"]


def test_cli_errors_exit_2_with_one_line(tmp_path, glue_dir):
    """(d) A bad TEACHER path, an unfinished run, k >= depth, a glue dir without the dev split."""
    no_model = tmp_path / "no_model"
    no_model.mkdir()
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "metrics.jsonl").write_text("")
    cases = [([str(tmp_path / "missing"), *ARGS], f"{tmp_path / 'missing'}: no such model folder"),
             ([str(no_model), *ARGS], f"{no_model}: no config.json"),
             ([str(unfinished), *ARGS], "a run workdir without model/config.json"),
             (["minilm-l6", "--task=sst2", "--layers=6"], "--layers=6: a student needs 2 to 5 layers"),
             (["minilm-l6", *ARGS, f"--glue-dir={tmp_path}"], "sst2: no usable dev split")]
    for argv, message in cases:
        rc, stdout, stderr = _run(argv)
        assert rc == 2 and stdout == "", argv
        assert stderr.startswith("error: ") and stderr.count("\n") == 1 and message in stderr, stderr
    assert not list(tmp_path.rglob("advice.json"))


def test_most_similar_map_is_the_best_increasing_map():
    rng = np.random.default_rng(0)
    for m, n in [(1, 3), (2, 5), (3, 5), (4, 7), (5, 11)]:
        cka = rng.random((m, n))
        best = max(itertools.combinations(range(1, n + 1), m), key=lambda c: sum(cka[i, l - 1] for i, l in enumerate(c)))
        assert advise.most_similar_map(cka) == best


def test_the_rule_on_synthetic_measurements():
    """Feature by the minimum spread over skip's and last's layers; map by mean CKA; the most-similar
    map only for a student of another checkpoint that it beats by CLEARLY_BETTER."""
    spreads = {"cls": [0.3, 0.3, 0.3, 0.3, 0.3, 0.3], "mean": [0.5, 0.5, 0.5, 0.5, 0.5]}
    cka = {"cls": np.full((3, 6), 0.2), "mean": np.full((2, 5), 0.2)}
    cka["cls"][0, 0] = cka["cls"][1, 2] = 0.9  # student 1 ~ teacher 1, student 2 ~ teacher 3
    cka["cls"][0, 1], cka["cls"][1, 3] = 0.5, 0.4  # skip (2, 4): 0.45; last (4, 5): 0.2
    for kind in ("cls", "mean"):
        cka[kind] = cka[kind].tolist()
    rec = advise.recommend(spreads, advise.candidate_maps(spreads, cka, 6, 3, same_start=False))
    assert (rec["features"], rec["strategy"], rec["layer_map"]) == ("mean", "skip", [2, 4])  # ties: skip first
    spreads["mean"][3] = 0.2  # mean's floor over layers 2, 4, 5 drops below [CLS]'s
    rec = advise.recommend(spreads, advise.candidate_maps(spreads, cka, 6, 3, same_start=False))
    assert (rec["features"], rec["strategy"], rec["layer_map"]) == ("cls", "explicit", [1, 3])
    assert rec["flags"] == "--config.patient_features=cls --config.strategy=1,3" and rec["avoid"] == []
    rec = advise.recommend(spreads, advise.candidate_maps(spreads, cka, 6, 3, same_start=True))
    assert (rec["features"], rec["strategy"], rec["layer_map"]) == ("cls", "skip", [2, 4])
    spreads["cls"][1] = 1e-4  # layer 2 near-constant: skip is avoided, last remains
    maps = advise.candidate_maps(spreads, cka, 6, 3, same_start=True)
    rec = advise.recommend(spreads, maps)
    assert (rec["features"], rec["strategy"]) == ("mean", "skip")  # [CLS]'s floor is now 1e-4
    assert {(a["features"], a["strategy"]) for a in rec["avoid"]} == {("cls", "skip")}


def _workdir(root: Path, name: str, kind: str, layers, score: float, teacher: Path | None = None) -> Path:
    """A finished run workdir as train.py leaves it (as tests/test_report.py builds them)."""
    w = root / name
    w.mkdir(parents=True)
    config = {"task": "sst2", "kind": kind, "model": "minilm-l6", "layers": layers}
    if teacher is not None:
        config |= {"teacher": str(teacher), "beta": 100.0, "strategy": "skip", "alpha": 0.5, "temperature": 10.0}
    metrics = {"accuracy": score, "score": score}
    (w / "config.json").write_text(json.dumps(config))
    (w / "metrics.jsonl").write_text(json.dumps({"step": 10, "split": "dev", **metrics}) + "\n")
    (w / "results.json").write_text(json.dumps({
        "task": "sst2", "kind": kind, "metric": "accuracy", "metrics": metrics, "step": 10,
        "best": {"step": 10, "metrics": metrics}, "total_steps": 10, "examples_per_s": 1.0, "config": config,
        "model": {"pretrained": "minilm-l6", "layers": layers or 6, "params": 1, "params_without_embeddings": 1},
        "teacher": None if teacher is None else {"path": str(teacher / "model"), "layers": 6, "layer_map": [2, 4]}}))
    return w


def test_report_shows_a_teachers_advice(tmp_path, glue_dir, minilm_dir):
    """(e) The advisor on a teacher workdir writes W/advice/; the report's task section shows its table."""
    root = tmp_path / "runs"
    teacher = _workdir(root, "teacher", "finetune", None, 0.9)
    (teacher / "model").symlink_to(minilm_dir, target_is_directory=True)  # stands in for the export
    student = _workdir(root, "pkd3", "distill", 3, 0.8, teacher=teacher)
    rc, stdout, stderr = _run([str(teacher), *ARGS, f"--glue-dir={glue_dir}"])
    assert rc == 0, stderr
    md = (teacher / "advice" / "advice.md").read_text()
    assert (teacher / "advice" / "advice.png").is_file()
    advice = json.loads((teacher / "advice" / "advice.json").read_text())
    assert advice["teacher"]["workdir"] == str(teacher) and advice["student"]["init"] == "minilm-l6"

    out = tmp_path / "report"
    assert report.main([str(teacher), str(student), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| Teacher layer"))
    table = "\n".join(lines[start:start + 8])  # header, rule and 6 layers
    assert lines[start + 8] == ""
    section = text[text.index("## SST-2"):]
    assert "### Teacher teacher: patient features per layer ([advice](../runs/teacher/advice/advice.md))" in section
    assert table in section
    assert next(l for l in md.splitlines() if l.startswith("**Recommendation:**")) in section
    # a student workdir's advice/ is not a teacher's: not shown
    (student / "advice").mkdir()
    (student / "advice" / "advice.md").write_text("| Teacher layer | x |\n")
    assert report.main([str(teacher), str(student), "--out", str(out)]) == 0
    assert (out / "report.md").read_text().count("patient features per layer") == 1
