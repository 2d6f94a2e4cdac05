r"""Which patient features and layer map to distil a teacher with: measured, before any training.

  python -m pkd_jax.advise TEACHER --task=TASK [--student-init=MODEL --layers=k] [--glue-dir=DIR] \
      [--examples=256] [--max-seq-length=128] [--out=DIR] [--json]

TEACHER is a finished run's workdir (its `model/` is read; the student starts by default from the
pretrained checkpoint its config.json names under "model") or an HF folder / known name (then the
student starts from TEACHER itself unless --student-init says otherwise). --layers defaults to
half the teacher's depth. On the first --examples dev examples of TASK, tokenised with the
teacher's tokenizer, it measures with `targets.layer_features`:

* spread: for every teacher layer and both patient features (`bert.FEATURES`: "cls", the [CLS]
  vector; "mean", the mean over real tokens, below the top layer only) how much the L2-normalised
  feature varies across inputs (`targets.spread`, 0..1). Below `targets.NEAR_CONSTANT` a layer is
  near-constant: a patient loss toward it teaches the student nothing about the input.
* CKA: linear CKA (`losses.get_distance("cka")`, 1 − that distance) between the L2-normalised
  features of every layer of the student's initialisation (the first k layers of --student-init)
  and every teacher layer: 1 − the "cka" patient loss of that pair at the first step.

Candidate layer maps (student layers 1..k−1 -> teacher layers, `losses.layer_map`): "skip" (when
k divides the depth), "last", and per feature the explicit "most similar" map, the strictly
increasing teacher layers that maximise the summed CKA with the student's layers. The rule:

1. Feature: the one whose teacher layers used by skip and last have the larger minimum spread.
2. Avoid, per feature, every candidate map with a near-constant mapped layer.
3. Map: among the chosen feature's candidates with no near-constant target, the one with the
   highest mean CKA between student layer i and its mapped teacher layer. The most-similar map
   competes only when it is neither skip nor last, beats both by at least CLEARLY_BETTER, and the
   student does not start from the teacher's own checkpoint: then similarity is highest for the
   layers the student is a copy of, so that map degenerates to (1, ..., k−1), a patient loss near
   0 from the first step. (For such a student CKA also tends to rank skip above last, whose
   layers are deeper.) If every candidate has a near-constant target, the one with the largest
   minimum spread is named, with a warning.

Prints the per-layer table, the maps and the recommendation; writes OUT/advice.json (every number,
the recommendation, the command, device and date), OUT/advice.md (the tables, the recommendation,
the heatmap) and OUT/advice.png (CKA, student layer × teacher layer, one panel per feature, the
recommended map outlined). OUT defaults to TEACHER/advice for a run workdir (the report then
shows its table in the task's section), else ./advice. --json prints advice.json instead.
A TEACHER that is not a model, a task without a dev split in --glue-dir or k outside 2..depth−1
ends with a one-line message and exit status 2. A tool: the library does not import it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import shlex
import sys
from pathlib import Path
from typing import Sequence

import jax
import numpy as np
from flax import nnx
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from pkd_jax import bert, checkpoints, data, fsutil, losses, partitioning, targets
from pkd_jax.errors import PkdError

CLEARLY_BETTER = 0.05  # mean-CKA margin by which the most-similar map must beat skip and last
_NAMES = {"cls": "[CLS]", "mean": "mean"}


class AdviceError(PkdError):
    """A problem the user can fix (bad path, missing data, impossible depth): exit status 2."""


@dataclasses.dataclass
class Teacher:
    model: str  # the teacher's model folder or name
    init: str  # the default student initialisation
    workdir: Path | None  # the run workdir, when TEACHER is one
    lineage: tuple[Path, ...]  # folders of the checkpoints the teacher is (or was fine-tuned from)


def resolve_teacher(teacher: str) -> Teacher:
    """A run workdir (model/ and config.json's "model") or a model folder / known name."""
    run = Path(teacher)
    try:
        if (run / "model" / "config.json").is_file():
            config = run / "config.json"
            pretrained = json.loads(config.read_text()).get("model") if config.is_file() else None
            init = pretrained or str(run / "model")
            return Teacher(str(run / "model"), init, run, _folders(run / "model", init))
        if (run / "metrics.jsonl").is_file() or (run / "results.json").is_file():
            raise AdviceError(f"{teacher}: a run workdir without model/config.json (unfinished, or not exported)")
        folder = checkpoints.resolve(teacher)
        checkpoints.read_config(folder)
    except checkpoints.CheckpointError as e:
        raise AdviceError(f"{e} (TEACHER: a run workdir, an HF model folder or a known name)") from None
    return Teacher(teacher, teacher, None, (folder.resolve(),))


def _folders(*models) -> tuple[Path, ...]:
    """The local folders of the models that resolve without error (a hub id offline does not)."""
    out = []
    for model in models:
        try:
            out.append(checkpoints.resolve(model).resolve())
        except checkpoints.CheckpointError:
            pass
    return tuple(out)


def dev_sample(task: str, tokenizer, glue_dir: str | None, examples: int, max_seq_length: int) -> data.Tokenized:
    """The first `examples` dev examples of `task`, tokenised."""
    try:
        ds = data.load_split(task, data.dev_split(task), glue_dir=glue_dir)
    except data.GlueFormatError as e:
        raise AdviceError(f"{task}: no usable dev split: {e}") from None
    return data.tokenize(ds.select(range(min(examples, len(ds)))), tokenizer, max_seq_length)


def model_features(model: bert.BertForSequenceClassification, tok: data.Tokenized, mesh=None) -> dict[str, np.ndarray]:
    """{"cls": [L, N, H], "mean": [L-1, N, H]} of every example of `tok` (`targets.layer_features`)."""
    mesh = mesh if mesh is not None else partitioning.make_mesh()
    graphdef, params = nnx.split(model, nnx.Param)
    params = partitioning.place_state(params, mesh)
    return targets.layer_features(graphdef, params, tok, mesh, limit=len(tok))


def layer_spreads(model: str, task: str, *, glue_dir: str | None = None, examples: int = 256,
                  max_seq_length: int = 128) -> dict[str, list[float]]:
    """{"cls": [L], "mean": [L-1]}: `targets.spread` of a model's features per layer on the first
    `examples` dev examples of `task` (tokenised with the model's own tokenizer)."""
    tok = dev_sample(task, checkpoints.load_tokenizer(model), glue_dir, examples, max_seq_length)
    features = model_features(checkpoints.load_pretrained(model), tok)
    return {kind: [float(x) for x in targets.spread(f)] for kind, f in features.items()}


def cka_matrix(student: np.ndarray, teacher: np.ndarray) -> np.ndarray:
    """[Ls, N, Hs], [Lt, N, Ht] -> [Ls, Lt]: linear CKA of every pair of layers' L2-normalised
    features (1 − the "cka" patient distance)."""
    distance = losses.get_distance("cka")
    unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)  # noqa: E731
    row = jax.jit(jax.vmap(lambda x, y: 1.0 - distance(x[None], y[None]), (None, 0)))
    t = unit(np.asarray(teacher, np.float32))
    return np.stack([np.asarray(row(s, t), np.float64) for s in unit(np.asarray(student, np.float32))])


def most_similar_map(cka: np.ndarray) -> tuple[int, ...]:
    """cka [m, n] (student layers 1..m, teacher layers 1..n, m <= n) -> the strictly increasing
    1-indexed teacher layers maximising the summed CKA (dynamic programming)."""
    m, n = cka.shape
    best = np.full((m + 1, n + 1), -np.inf)
    best[0] = 0.0
    for i in range(1, m + 1):
        for j in range(i, n + 1):
            best[i, j] = max(best[i, j - 1], best[i - 1, j - 1] + cka[i - 1, j - 1])
    chosen, j = [], n
    for i in range(m, 0, -1):
        while j > i and best[i, j] == best[i, j - 1]:
            j -= 1
        chosen.append(j)
        j -= 1
    return tuple(reversed(chosen))


def _why_not_similar(layers: tuple[int, ...], named: dict, mean_cka: float, rival: float,
                     same_start: bool) -> str | None:
    """Why the most-similar map is not a candidate (None: it is one); the module docstring's rule."""
    if same_start:
        return "the student starts from the teacher's checkpoint: its own layers are the most similar"
    if layers in named.values():
        return "the same as skip or last"
    if mean_cka < rival + CLEARLY_BETTER:
        return f"not {CLEARLY_BETTER:g} above the best of skip and last in mean CKA"
    return None


def candidate_maps(spreads: dict, cka: dict, depth: int, k: int, same_start: bool) -> list[dict]:
    """Every (feature, map): its teacher layers, minimum spread, mean CKA, near-constant layers and
    whether it is offered (skip and last always; the most-similar map by `_why_not_similar`)."""
    named = {s: losses.layer_map(depth, k, s) for s in ("skip", "last") if s == "last" or depth % k == 0}
    rows = []
    for kind in bert.FEATURES:
        similarity = np.asarray(cka[kind])[:k - 1, :depth - 1]  # the mappable layers
        for strategy, layers in {**named, "most similar": most_similar_map(similarity)}.items():
            values = [spreads[kind][l - 1] for l in layers]
            rows.append({"features": kind, "strategy": strategy, "layer_map": list(layers),
                         "min_spread": min(values),
                         "mean_cka": float(np.mean([similarity[i, l - 1] for i, l in enumerate(layers)])),
                         "near_constant": [l for l, v in zip(layers, values) if v < targets.NEAR_CONSTANT],
                         "offered": True, "why_not": None})
        similar, rival = rows[-1], max(r["mean_cka"] for r in rows[-len(named) - 1:-1])
        similar["why_not"] = _why_not_similar(tuple(similar["layer_map"]), named, similar["mean_cka"], rival,
                                              same_start)
        similar["offered"] = similar["why_not"] is None
    return rows


def _config_flags(kind: str, row: dict) -> str:
    strategy = row["strategy"] if row["strategy"] != "most similar" else ",".join(map(str, row["layer_map"]))
    return f"--config.patient_features={kind} --config.strategy={strategy}"


def recommend(spreads: dict, maps: list[dict]) -> dict:
    """The rule of the module docstring, applied to candidate_maps' rows."""
    used = {l for r in maps if r["strategy"] in ("skip", "last") for l in r["layer_map"]}
    floor = {kind: min(spreads[kind][l - 1] for l in used) for kind in bert.FEATURES}
    kind = max(bert.FEATURES, key=lambda f: floor[f])  # ties: "cls", the paper's
    other = next(f for f in bert.FEATURES if f != kind)
    mine = [r for r in maps if r["features"] == kind and r["offered"]]
    clean = [r for r in mine if not r["near_constant"]]
    best = max(clean, key=lambda r: r["mean_cka"]) if clean else max(mine, key=lambda r: r["min_spread"])
    strategy = best["strategy"] if best["strategy"] != "most similar" else "explicit"
    reason = (f"{_NAMES[kind]} features: minimum spread {floor[kind]:.3g} over the teacher layers skip and last use "
              f"({_NAMES[other]}: {floor[other]:.3g}); "
              + (f"{strategy} map: the highest mean CKA ({best['mean_cka']:.3f}) of the maps with no near-constant "
                 "target" if clean else "WARNING: every candidate map has a near-constant target; this one varies most"))
    avoid = [{key: r[key] for key in ("features", "strategy", "layer_map", "near_constant")} for r in maps
             if r["near_constant"]]
    return {"features": kind, "strategy": strategy, "layer_map": best["layer_map"], "mean_cka": best["mean_cka"],
            "min_spread": best["min_spread"], "flags": _config_flags(kind, best), "reason": reason, "avoid": avoid}


def advise(teacher: str, task: str, *, student_init: str | None = None, layers: int | None = None,
           glue_dir: str | None = None, examples: int = 256, max_seq_length: int = 128) -> dict:
    """Measure and recommend (the module docstring); returns advice.json's content, less the command."""
    source = resolve_teacher(teacher)
    depth = checkpoints.load_config(source.model).num_hidden_layers
    k = depth // 2 if layers is None else layers
    if not 2 <= k < depth:
        raise AdviceError(f"--layers={k}: a student needs 2 to {depth - 1} layers to learn from this "
                          f"{depth}-layer teacher's intermediate layers")
    init = student_init or source.init
    try:
        tokenizer = checkpoints.load_tokenizer(source.model)
    except checkpoints.CheckpointError:
        tokenizer = checkpoints.load_tokenizer(init)  # an export without tokenizer files
    tok = dev_sample(task, tokenizer, glue_dir, examples, max_seq_length)
    if len(tok) < 2:
        raise AdviceError(f"{task}: {len(tok)} dev example(s); spread and CKA need at least 2")
    try:
        student_model = checkpoints.load_pretrained(init, num_layers=k)
        same_start = checkpoints.resolve(init).resolve() in source.lineage
    except checkpoints.CheckpointError as e:
        raise AdviceError(f"--student-init: {e}") from None
    mesh = partitioning.make_mesh()
    teacher_f = model_features(checkpoints.load_pretrained(source.model), tok, mesh)
    student_f = model_features(student_model, tok, mesh)
    spreads = {kind: [float(x) for x in targets.spread(f)] for kind, f in teacher_f.items()}
    cka = {kind: cka_matrix(student_f[kind], teacher_f[kind]).tolist() for kind in bert.FEATURES}
    maps = candidate_maps(spreads, cka, depth, k, same_start)
    return {
        "teacher": {"path": str(teacher), "model": source.model, "layers": depth,
                    "workdir": None if source.workdir is None else str(source.workdir)},
        "student": {"init": init, "layers": k, "starts_from_teacher_checkpoint": same_start},
        "task": task, "examples": len(tok), "max_seq_length": max_seq_length, "near_constant": targets.NEAR_CONSTANT,
        "spread": spreads, "cka": cka, "maps": maps, "recommendation": recommend(spreads, maps),
        "device": f"{jax.devices()[0].device_kind} x{jax.device_count()} ({jax.default_backend()})",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "jax": jax.__version__,
    }


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}" if x >= 0.01 else f"{x:.1e}"


def layer_table(advice: dict) -> str:
    """The per-teacher-layer table: spread of each feature and the near-constant flags."""
    spread = advice["spread"]
    lines = ["| Teacher layer | Spread [CLS] | Spread mean | Near-constant |", "|---:|---:|---:|---|"]
    for layer in range(1, advice["teacher"]["layers"] + 1):
        values = {kind: spread[kind][layer - 1] if layer <= len(spread[kind]) else None for kind in bert.FEATURES}
        flags = [_NAMES[kind] for kind, v in values.items() if v is not None and v < advice["near_constant"]]
        lines.append(f"| {layer} | {_fmt(values['cls'])} | {_fmt(values['mean'])} | {', '.join(flags)} |")
    return "\n".join(lines)


def maps_table(advice: dict) -> str:
    """Every candidate (feature, map): teacher layers, minimum spread, mean CKA and verdict."""
    rec = advice["recommendation"]
    lines = ["| Features | Map | Teacher layers | Min spread | Mean CKA | Verdict |", "|---|---|---|---:|---:|---|"]
    for r in advice["maps"]:
        picked = r["features"] == rec["features"] and r["layer_map"] == rec["layer_map"] and r["offered"]
        verdict = ("**recommended**" if picked
                   else f"avoid: near-constant layer(s) {', '.join(map(str, r['near_constant']))}" if r["near_constant"]
                   else f"not offered: {r['why_not']}" if not r["offered"] else "")
        lines.append(f"| {_NAMES[r['features']]} | {r['strategy']} | {', '.join(map(str, r['layer_map']))} | "
                     f"{_fmt(r['min_spread'])} | {r['mean_cka']:.3f} | {verdict} |")
    return "\n".join(lines)


def markdown(advice: dict, image: str | None = "advice.png") -> str:
    """advice.md: what was measured, the two tables, the recommendation and the heatmap."""
    t, s, rec = advice["teacher"], advice["student"], advice["recommendation"]
    avoid = "; ".join(f"{_NAMES[a['features']]} with {a['strategy']} ({', '.join(map(str, a['layer_map']))}: "
                      f"layer(s) {', '.join(map(str, a['near_constant']))} near-constant)" for a in rec["avoid"])
    parts = [
        f"# Patient features and layer map: {t['path']} → a {s['layers']}-layer student",
        f"Teacher `{t['model']}` ({t['layers']} layers); student: the first {s['layers']} layers of `{s['init']}`; "
        f"the first {advice['examples']} {data.TASKS[advice['task']].glue_name} dev examples (max length "
        f"{advice['max_seq_length']}). Spread: how much a layer's L2-normalised feature varies across inputs (0: the "
        f"same for every input; below {advice['near_constant']:g} it is near-constant, a target that teaches nothing "
        "about the input); the mean feature exists below the top layer only.",
        layer_table(advice),
        "Candidate maps of student layers 1..k−1 (mean CKA: linear CKA of student layer i's features at its "
        "initialisation with its mapped teacher layer's, averaged over i):",
        maps_table(advice),
        f"**Recommendation:** `{rec['flags']}` (teacher layers {', '.join(map(str, rec['layer_map']))}). "
        f"{rec['reason']}.",
        f"Avoid: {avoid}." if avoid else "No candidate map has a near-constant target.",
        f"Command: `{advice.get('command', '')}`; {advice['device']}; {advice['date']}."]
    if image:
        parts.append(f"![CKA, student layer × teacher layer]({image})")
    return "\n\n".join(parts) + "\n"


def plot_cka(advice: dict, path: str | Path) -> Path:
    """CKA heatmaps, student layer × teacher layer, one panel per feature; near-constant teacher
    layers marked * on the axis, the recommended map outlined in red."""
    rec = advice["recommendation"]
    fig = Figure(figsize=(4 + 1.6 * advice["teacher"]["layers"], 1.5 + 0.7 * advice["student"]["layers"]),
                 layout="constrained")
    axes = fig.subplots(1, len(bert.FEATURES), squeeze=False)[0]
    for ax, kind in zip(axes, bert.FEATURES):
        grid = np.asarray(advice["cka"][kind])
        image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=1, origin="lower", aspect="auto")
        for (i, j), v in np.ndenumerate(grid):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8, color="white" if v < 0.6 else "black")
        if kind == rec["features"]:
            for i, layer in enumerate(rec["layer_map"]):
                ax.add_patch(Rectangle((layer - 1.5, i - 0.5), 1, 1, fill=False, edgecolor="#d62728", lw=3))
        spread = advice["spread"][kind]
        ax.set_xticks(range(grid.shape[1]), [f"{j + 1}{'*' if spread[j] < advice['near_constant'] else ''}"
                                             for j in range(grid.shape[1])])
        ax.set_yticks(range(grid.shape[0]), [str(i + 1) for i in range(grid.shape[0])])
        ax.set(title=f"{_NAMES[kind]} features", xlabel="teacher layer (* near-constant)", ylabel="student layer")
    fig.colorbar(image, ax=axes, shrink=0.9, label="linear CKA")
    fig.suptitle(f"{advice['teacher']['path']}: recommended {rec['flags']}", fontsize=9)
    fig.savefig(path, dpi=120)
    return Path(path)


def write(advice: dict, out: str | Path) -> Path:
    """OUT/advice.json, advice.md and advice.png; returns advice.md."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fsutil.write_text(out / "advice.json", json.dumps(advice, indent=1) + "\n")
    plot_cka(advice, out / "advice.png")
    return fsutil.write_text(out / "advice.md", markdown(advice))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pkd_jax.advise", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("teacher", metavar="TEACHER", help="a finished run's workdir, an HF model folder or a known name")
    p.add_argument("--task", required=True, choices=list(data.TASKS))
    p.add_argument("--student-init", help="the student's checkpoint (default: the teacher's pretrained one)")
    p.add_argument("--layers", type=int, help="student depth k (default: half the teacher's)")
    p.add_argument("--glue-dir", help="a local GLUE folder (default: the HF hub)")
    p.add_argument("--examples", type=int, default=256, help="dev examples measured (the first ones)")
    p.add_argument("--max-seq-length", type=int, default=128)
    p.add_argument("--out", help="output folder (default: TEACHER/advice for a run workdir, else ./advice)")
    p.add_argument("--json", action="store_true", help="print advice.json instead of the tables")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    try:
        advice = advise(args.teacher, args.task, student_init=args.student_init, layers=args.layers,
                        glue_dir=args.glue_dir, examples=args.examples, max_seq_length=args.max_seq_length)
    except AdviceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    advice["command"] = "python -m pkd_jax.advise " + shlex.join(argv)
    workdir = advice["teacher"]["workdir"]
    out = Path(args.out) if args.out else Path(workdir) / "advice" if workdir else Path("advice")
    path = write(advice, out)
    print(json.dumps(advice, indent=1) if args.json else markdown(advice, image=None))
    print(f"advice: {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
