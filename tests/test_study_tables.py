"""scripts/study_tables.py on a hand-made summary: a diverged seed is named and left out, and a claim is
compared on the seeds both methods finished (against scipy's paired t-test); the sittings' ledger."""

import json
import sys
from pathlib import Path

import numpy as np
from scipy import stats as sps

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import study_tables  # noqa: E402


def _student(seeds, scores, failed=()):
    return {"seeds": list(seeds), "score": list(scores), "failed_seeds": list(failed),
            "metrics": {"accuracy": list(scores)}}


def test_a_diverged_seed_is_named_and_claims_use_the_seeds_both_finished():
    kd = [0.80, 0.82, 0.79, 0.81]
    pkd = [0.83, 0.84, 0.80, 0.85]  # seed 2 diverged: seeds 0, 1, 3, 4
    summary = {"tasks": ["sst2"], "layers": [3], "teacher": {"score": {"sst2": 0.9}, "layers": 6},
               "data": {"sst2": {"baseline": {"accuracy": 0.509}}},
               "students": {"sst2": {"3": {"KD": _student((0, 1, 2, 3), kd),
                                           "PKD-Skip": _student((0, 1, 3, 4), pkd, failed=(2,))}}}}
    table = "\n".join(study_tables.main_table(summary))
    mean, sd = np.mean(pkd), np.std(pkd, ddof=1)
    half = sps.t.ppf(0.975, 3) * sd / 2
    assert (f"| PKD-Skip-3 | {100 * mean:.1f} ± {100 * sd:.1f} [{100 * (mean - half):.1f}, "
            f"{100 * (mean + half):.1f}] (seed 2 diverged) |") in table

    row = next(line for line in study_tables.paired_table(summary, 3) if line.startswith("| PKD above KD"))
    a, b = [0.83, 0.84, 0.80], [0.80, 0.82, 0.81]  # seeds 0, 1, 3: finished by both
    p = sps.ttest_rel(a, b).pvalue
    assert f"{100 * np.mean(np.subtract(a, b)):+.1f} [" in row and f"p={p:.2g}" in row
    kept = "\n".join(study_tables.kept_table(summary))
    assert f"| SST-2 | 3 | PKD-Skip | {100 * mean:.1f} | {100 * mean / 0.9:.1f} [" in kept


def test_sittings_side_by_side_keep_their_own_lines_and_count_wall_time_once(tmp_path):
    """Two invocations on one OUT (disjoint work) each rewrite only their own ledger line; the wall
    time is the union of the sittings' spans, the CPU time their sum."""
    import reproduce

    earlier = {"date": "2026-11-30T08:00:00+00:00", "wall_s": 3600.0, "cpu_s": 3000.0, "runs_trained": 2}
    (tmp_path / "sittings.jsonl").write_text(json.dumps(earlier) + "\n")  # a line from before "sitting" ids
    a = reproduce.Ledger(tmp_path)
    a.id = "a"
    b = reproduce.Ledger(tmp_path)
    b.id = "b"
    a.add(1), b.add(1), a.add(1), b.add(2)
    lines = [json.loads(x) for x in (tmp_path / "sittings.jsonl").read_text().splitlines()]
    assert lines[0] == earlier
    assert sorted((x["sitting"], x["runs_trained"]) for x in lines[1:]) == [("a", 2), ("b", 3)]

    sittings = [{"date": "2026-11-30T10:00:00+00:00", "wall_s": 3600.0},  # 09:00-10:00
                {"date": "2026-11-30T10:30:00+00:00", "wall_s": 3600.0},  # 09:30-10:30, beside it
                {"date": "2026-11-30T12:00:00+00:00", "wall_s": 600.0}]   # 11:50-12:00
    assert study_tables.busy_seconds(sittings) == 5400 + 600


def test_each_claim_is_named_on_its_first_row_shown():
    """A claim whose first comparison has no runs yet still names its second one (not the claim
    above it): here "Skip above Last" shows PKD-Skip − PKD-Last and "mean features above [CLS]"
    only PKD-Last-mean − PKD-Last."""
    scores = {"PKD-Last": [0.83, 0.84, 0.82], "PKD-Skip": [0.83, 0.85, 0.80], "PKD-Last-mean": [0.82, 0.83, 0.81]}
    summary = {"tasks": ["sst2"], "students": {"sst2": {"3": {m: _student((0, 1, 2), x) for m, x in scores.items()}}}}
    rows = [line.split(" | ")[:2] for line in study_tables.paired_table(summary, 3)[2:-1]]
    assert rows == [["| Skip above Last (paper, Table 2)", "PKD-Skip − PKD-Last"],
                    ["| mean features above [CLS] (new)", "PKD-Last-mean − PKD-Last"]]
