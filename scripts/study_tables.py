"""The tables of scripts/reproduce.py's results.md, from its results.json summary (statistics: pkd_jax.report.stats)."""

from __future__ import annotations

import datetime
import math
import statistics

from pkd_jax import bert, checkpoints, metrics, report
from pkd_jax.report import stats

# The paper's claims and this project's, each as "a above b" compared seed by seed.
COMPARISONS = (
    ("PKD above KD (paper, Table 1)", "PKD-Skip", "KD"),
    ("PKD above KD (paper, Table 1)", "PKD-Last", "KD"),
    ("KD above FT (paper, Table 1)", "KD", "FT"),
    ("Skip above Last (paper, Table 2)", "PKD-Skip", "PKD-Last"),
    ("Skip above Last (paper, Table 2)", "PKD-Skip-mean", "PKD-Last-mean"),
    ("mean features above [CLS] (new)", "PKD-Skip-mean", "PKD-Skip"),
    ("mean features above [CLS] (new)", "PKD-Last-mean", "PKD-Last"),
    ("PKD on mean features above KD (new)", "PKD-Skip-mean", "KD"),
    ("PKD on mean features above KD (new)", "PKD-Last-mean", "KD"),
    ("the advised objective above KD (new)", "Advised", "KD"),
    ("the advised objective above PKD-Skip-mean (new)", "Advised", "PKD-Skip-mean"),
)
SECONDARY = {"mrpc": ("f1", "accuracy"), "qqp": ("f1", "accuracy"), "stsb": ("pearson", "spearmanr")}


def speed_table(model_dirs: dict[str, str], repeats: int, batch_size: int = 128, seq_len: int = 128) -> list[dict]:
    """Inference examples/s of each model, parameters, and speed-up over the first."""
    rows = []
    for label, path in model_dirs.items():
        model = checkpoints.load_pretrained(path)
        rate = report.inference_examples_per_s(path, batch_size=batch_size, seq_len=seq_len, repeats=repeats)
        rows.append({"model": label, "layers": model.config.num_hidden_layers, "params": bert.param_count(model),
                     "examples_per_s": rate})
    for r in rows:
        r["speedup"] = r["examples_per_s"] / rows[0]["examples_per_s"]
    return rows


def _by_seed(result: dict) -> dict[int, float]:
    return dict(zip(result["seeds"], result["score"]))


def _result(summary: dict, task: str, k: int, method: str) -> dict | None:
    return summary["students"].get(task, {}).get(str(k), {}).get(method)


def _title(task: str) -> str:
    return f"{report.task_title(task)} ({report.metric_title(metrics.main_metric(task))})"


def _pct(x: float) -> str:
    return "–" if x is None or math.isnan(x) else f"{100 * x:.1f}"


def _cell(result: dict) -> str:
    """mean ± std [CI] over the seeds that finished; diverged seeds are named, not averaged."""
    failed = result.get("failed_seeds", [])
    text = stats.format_summary(stats.summary(_by_seed(result))) if result["score"] else "–"
    return text + (f" (seed{'s' * (len(failed) > 1)} {', '.join(map(str, failed))} diverged)" if failed else "")


def _mean(result: dict) -> float:
    """The mean score over the finished seeds; -inf when every seed diverged (ranks last)."""
    return statistics.fmean(result["score"]) if result["score"] else -math.inf


def _mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    s = stats.summary(values)
    return f"{100 * s.mean:.1f}" + ("" if math.isnan(s.std) else f" ± {100 * s.std:.1f}")


def _methods(summary: dict, k: int) -> list[str]:
    seen = {m for t in summary["tasks"] for m in summary["students"].get(t, {}).get(str(k), {})}
    order = ("FT", "KD", "PKD-Last", "PKD-Skip", "PKD-Last-mean", "PKD-Skip-mean", "Advised")
    return [m for m in order if m in seen]


def busy_seconds(sittings: list[dict]) -> float:
    """Wall time during which some sitting ran: the union of their [end - wall_s, end] intervals
    (sittings may run side by side)."""
    ends = [datetime.datetime.fromisoformat(s["date"]).timestamp() for s in sittings]
    spans = sorted((end - s["wall_s"], end) for s, end in zip(sittings, ends))
    total, reach = 0.0, -math.inf
    for start, end in spans:
        total += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    return total


def header(summary: dict) -> list[str]:
    sittings = summary["sittings"]
    wall = busy_seconds(sittings) / 3600
    cpu = sum(s["cpu_s"] for s in sittings) / 3600
    return [f"Command: `{summary['command']}`", "",
            f"Device: {summary['device']}; {summary['versions']}. Tables generated {summary['date']}. "
            f"Compute so far: {len(sittings)} sitting(s), {wall:.2f} h of wall time, {cpu:.2f} CPU-hours "
            f"({cpu / 2:.2f} h of the 2 cores), {sum(s['runs_trained'] for s in sittings)} runs trained. "
            f"Dev-set metrics ×100 at each run's best evaluation; students over seeds "
            f"{', '.join(map(str, summary['seeds']))}: mean ± std [95 % confidence interval, Student t].", ""]


def data_table(summary: dict) -> list[str]:
    lines = ["| Task | Train examples | Max length | Truncated (whole train set) | Truncated dev |",
             "|---|---:|---:|---:|---:|"]
    for t in summary["tasks"]:
        d = summary["data"][t]
        (tt, tn), (dt, dn) = d["truncated"]["train"], d["truncated"]["validation"]
        used = f"{d['train_examples']:,} of {tn:,}" if d["train_examples"] else f"all {tn:,}"
        lines.append(f"| {report.task_title(t)} | {used} | {d['max_seq_length']} | {tt} ({100 * tt / tn:.2f} %) | "
                     f"{dt} of {dn} ({100 * dt / dn:.2f} %) |")
    return lines


def main_table(summary: dict) -> list[str]:
    tasks, teacher = summary["tasks"], summary["teacher"]
    lines = ["| Model | " + " | ".join(_title(t) for t in tasks) + " | Avg % of teacher |",
             "|---|" + "---:|" * (len(tasks) + 1)]
    lines.append(f"| Teacher BERT{teacher.get('layers', '')} | "
                 + " | ".join(_pct(teacher["score"].get(t)) for t in tasks) + " | 100 |")
    lines.append("| Majority class | " + " | ".join(
        _pct(metrics.main_score(t, summary["data"][t]["baseline"])) for t in tasks) + " | |")
    for k in summary["layers"]:
        for m in _methods(summary, k):
            cells, kept = [], []
            for t in tasks:
                res = _result(summary, t, k, m)
                cells.append("–" if res is None else _cell(res))
                if res is not None and res["score"] and t in teacher["score"]:
                    kept.append(statistics.fmean(res["score"]) / teacher["score"][t])
            avg = "–" if not kept else f"{100 * statistics.fmean(kept):.1f}" + (
                f" ({len(kept)} of {len(tasks)} tasks)" if len(kept) < len(tasks) else "")
            lines.append(f"| {m}-{k} | " + " | ".join(cells) + f" | {avg} |")
    return lines


def secondary_table(summary: dict) -> list[str]:
    """MRPC F1 / accuracy and STS-B Pearson / Spearman, mean ± std, for the tasks that have two metrics."""
    tasks = [t for t in summary["tasks"] if t in SECONDARY]
    if not tasks:
        return []
    names = {t: SECONDARY[t] for t in tasks}
    lines = ["| Model | " + " | ".join(f"{report.task_title(t)} ({' / '.join(map(report.metric_title, names[t]))})"
                                      for t in tasks) + " |", "|---|" + "---:|" * len(tasks)]
    teacher = summary["teacher"]["metrics"]
    lines.append("| Teacher | " + " | ".join(" / ".join(_pct(teacher[t][n]) if t in teacher else "–"
                                                        for n in names[t]) for t in tasks) + " |")
    for k in summary["layers"]:
        for m in _methods(summary, k):
            cells = []
            for t in tasks:
                res = _result(summary, t, k, m)
                cells.append("–" if res is None else " / ".join(_mean_std(res["metrics"][n]) for n in names[t]))
            lines.append(f"| {m}-{k} | " + " | ".join(cells) + " |")
    return lines


def paired_table(summary: dict, k: int) -> list[str]:
    """Each claim, a − b per task: mean difference [95 % CI], paired t-test p, verdict."""
    tasks = [t for t in summary["tasks"] if str(k) in summary["students"].get(t, {})]
    lines = ["| Claim | a − b | " + " | ".join(report.task_title(t) for t in tasks) + " |",
             "|---|---|" + "---|" * len(tasks)]
    decided = dict.fromkeys(tasks, 0)
    compared = dict.fromkeys(tasks, 0)
    shown = None  # the claim of the last row shown: its name heads the first row of each claim
    for claim, a, b in COMPARISONS:
        cells = []
        for t in tasks:
            ra, rb = _result(summary, t, k, a), _result(summary, t, k, b)
            common = sorted(set(ra["seeds"]) & set(rb["seeds"])) if ra and rb else []
            if not common:
                cells.append("–")
                continue
            p = stats.paired({s: _by_seed(ra)[s] for s in common}, {s: _by_seed(rb)[s] for s in common})
            compared[t] += 1
            decided[t] += p.verdict != stats.NOT_SHOWN
            cells.append(stats.format_paired(p))
        if any(c != "–" for c in cells):
            lines.append(f"| {claim if claim != shown else ''} | {a} − {b} | " + " | ".join(cells) + " |")
            shown = claim
    lines.append("| *comparisons decided (holds or reversed)* | | "
                 + " | ".join(f"{decided[t]} of {compared[t]}" for t in tasks) + " |")
    return lines


def kept_table(summary: dict) -> list[str]:
    """The best student per task and depth, and the share of the teacher's score it keeps."""
    lines = ["| Task | Depth | Best method | Score | % of teacher [95 % CI] |", "|---|---:|---|---:|---:|"]
    for t in summary["tasks"]:
        teacher = summary["teacher"]["score"].get(t)
        for k in summary["layers"]:
            found = summary["students"].get(t, {}).get(str(k), {})
            if not found or teacher is None:
                continue
            m = max(found, key=lambda name: _mean(found[name]))
            s = stats.summary(_by_seed(found[m]))
            share = "– (teacher's score ≤ 0)"
            if teacher > 0:
                kept = stats.of_teacher(s, teacher)
                share = f"{_pct(kept.mean)} [{_pct(kept.ci_low)}, {_pct(kept.ci_high)}]"
            lines.append(f"| {report.task_title(t)} | {k} | {m} | {_pct(s.mean)} | {share} |")
    return lines


def advice_table(summary: dict) -> list[str]:
    """Per task and depth: the advisor's recommendation, where the Advised method and the method
    using the recommended features and map with the paper's mse distance rank."""
    lines = ["| Task | Depth | Recommended | Why | Advised ranks | Best method |", "|---|---:|---|---|---:|---|"]
    for t in summary["tasks"]:
        for k in summary["layers"]:
            advice = summary["advice"].get(t, {}).get(str(k))
            found = summary["students"].get(t, {}).get(str(k), {})
            if advice is None or not found:
                continue
            rec = advice["recommendation"]
            ranked = sorted(found, key=lambda name: -_mean(found[name]))
            rank = f"{ranked.index('Advised') + 1} of {len(ranked)}" if "Advised" in ranked else "–"
            lines.append(f"| {report.task_title(t)} | {k} | `{rec['flags']}` | {rec['reason']} | {rank} | "
                         f"{ranked[0]} |")
    return lines


def spread_table(summary: dict) -> list[str]:
    """The teacher's per-layer spread of both features (the advisor's measurement, first depth)."""
    k = str(summary["layers"][0])
    rows = [(t, summary["advice"][t][k]["spread"]) for t in summary["tasks"] if t in summary["advice"]]
    if not rows:
        return []
    depth = len(rows[0][1]["cls"])
    lines = ["| Teacher | Features | " + " | ".join(f"layer {i + 1}" for i in range(depth)) + " |",
             "|---|---|" + "---:|" * depth]
    for t, spread in rows:
        for kind, name in (("cls", "[CLS]"), ("mean", "mean")):
            values = spread[kind] + [None] * (depth - len(spread[kind]))
            lines.append(f"| {report.task_title(t)} | {name} | "
                         + " | ".join("–" if v is None else f"{v:.4f}" for v in values) + " |")
    return lines


def points_table(summary: dict) -> list[str]:
    """The chosen (T, α, β) of each method and where it was searched."""
    tasks = summary["tasks"]
    lines = ["| Student | " + " | ".join(report.task_title(t) for t in tasks) + " |", "|---|" + "---|" * len(tasks)]
    for k in summary["layers"]:
        for m in _methods(summary, k):
            cells = []
            for t in tasks:
                res = _result(summary, t, k, m)
                if res is None or m == "FT":
                    cells.append("–")
                    continue
                p, src, f = res["point"], res["source"], res["fields"]
                where = (f"of {res['grid_size']}" if res["grid_size"] else f"k={src['layers']}'s" if src["task"] == t
                         else f"{report.task_title(src['task'])} k={src['layers']}'s")
                what = f"; {f['patient_features']}, {f['strategy']}, {f['distance']}" if m == "Advised" else ""
                cells.append(f"T={p['temperature']:g}, α={p['alpha']:g}, β={p['beta']:g} ({where}{what})")
            lines.append(f"| {m}-{k} | " + " | ".join(cells) + " |")
    return lines


def multitask_table(summary: dict) -> list[str]:
    """The multi-task student beside the teacher and the single-task students of its method, per task
    (over the multi-task seeds), and the parameters one shared encoder saves."""
    mt = summary.get("multitask")
    if not mt:
        return []
    m, k, seeds = mt["method"], mt["layers"], mt["seeds"]
    lines = [f"One {k}-layer student for {', '.join(report.task_title(t) for t in mt['per_task'])} ({m}, each task at "
             f"its single-task point and data size), seeds {', '.join(map(str, seeds))}; the single-task "
             "students over the same seeds; the difference paired by seed.", "",
             "| Task | Teacher | Single-task | Multi-task | Multi − single |", "|---|---:|---:|---:|---|"]
    for t, res in mt["per_task"].items():
        single = _result(summary, t, k, m)
        mine = dict(zip(seeds, res["score"]))
        theirs = {s: v for s, v in _by_seed(single).items() if s in mine} if single else {}
        cell = (stats.format_summary(stats.summary(theirs)) if theirs else "–")
        diff = stats.format_paired(stats.paired(mine, theirs)) if theirs.keys() == mine.keys() else "–"
        lines.append(f"| {_title(t)} | {_pct(summary['teacher']['score'].get(t))} | {cell} | "
                     f"{stats.format_summary(stats.summary(mine))} | {diff} |")
    singles = sum(mt["single_params"].values())
    lines += ["", f"Parameters: {len(mt['single_params'])} single-task students {singles / 1e6:.1f}M, the multi-task "
              f"student {mt['params'] / 1e6:.1f}M ({100 * (1 - mt['params'] / singles):.0f} % fewer)."]
    return lines


def speed_lines(summary: dict) -> list[str]:
    lines = ["| Model | Layers | Parameters | Examples/s | Speed-up |", "|---|---:|---:|---:|---:|"]
    for r in summary["speed"]:
        lines.append(f"| {r['model']} | {r['layers']} | {r['params'] / 1e6:.1f}M | {r['examples_per_s']:.1f} | "
                     f"{r['speedup']:.2f}× |")
    return lines


def markdown(summary: dict) -> str:
    parts = [header(summary),
             ["### Data", ""] + data_table(summary),
             ["### Scores", ""] + main_table(summary),
             ["", "Both metrics of the pair tasks (mean ± std):", ""] + secondary_table(summary)]
    for k in summary["layers"]:
        parts.append([f"### Paired comparisons, {k}-layer students", "",
                      "a − b over the same seeds (same data order and initial head): mean difference ×100 "
                      "[95 % CI], paired t-test p, and the verdict (holds: CI above 0; reversed: below 0).",
                      ""] + paired_table(summary, k))
    parts += [["### The best student against the teacher", ""] + kept_table(summary),
              ["### The advisor", ""] + advice_table(summary),
              ["", "Spread of the teacher's L2-normalised features per layer (0: the same for every input; below "
               "0.01 near-constant):", ""] + spread_table(summary),
              ["### Chosen grid points", ""] + points_table(summary),
              ["### Multi-task PKD", ""] + (multitask_table(summary) or ["Not run yet."]),
              ["### Inference speed (batch {}, seq {}, exported models)".format(*summary["speed_shape"]), ""]
              + speed_lines(summary)]
    return "\n".join(line for part in parts for line in [*part, ""])
