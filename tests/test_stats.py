"""pkd_jax.report.stats against scipy's own t interval and t-tests, numpy, and one example by hand."""

import math
import random
import warnings

import numpy as np
import pytest
from scipy import stats as sps

from pkd_jax.report import stats


def _random_scores(rng, n, loc=0.8, scale=0.02):
    return rng.normal(loc, scale, size=n)


@pytest.mark.parametrize("n", [2, 3, 5, 10])
@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
def test_summary_matches_numpy_and_scipy_interval(n, confidence):
    x = _random_scores(np.random.default_rng(n), n)
    s = stats.summary(list(x), confidence)
    sem = np.std(x, ddof=1) / np.sqrt(n)
    low, high = sps.t.interval(confidence, n - 1, loc=np.mean(x), scale=sps.sem(x))
    assert s.n == n
    assert s.mean == pytest.approx(np.mean(x), rel=1e-12)
    assert s.std == pytest.approx(np.std(x, ddof=1), rel=1e-12)
    assert s.sem == pytest.approx(sem, rel=1e-12)
    assert (s.ci_low, s.ci_high) == pytest.approx((low, high), rel=1e-12)
    # The interval is the one-sample t-test's: a mean at a CI end is rejected at exactly 1 - confidence.
    assert sps.ttest_1samp(x, s.ci_low).pvalue == pytest.approx(1 - confidence, rel=1e-6)


def test_summary_of_one_seed_has_no_spread_and_of_none_is_an_error():
    s = stats.summary([0.8])
    assert s.n == 1 and s.mean == 0.8
    assert all(math.isnan(v) for v in (s.std, s.sem, s.ci_low, s.ci_high))
    assert stats.format_summary(s) == "80.0 ± – [–, –]"
    with pytest.raises(ValueError, match="no scores"):
        stats.summary([])
    with pytest.raises(ValueError, match=r"non-finite scores at seeds \[2\]"):
        stats.summary({1: 0.8, 2: float("nan")})


def test_summary_of_equal_scores_is_a_point():
    assert stats.summary([0.5, 0.5, 0.5]) == stats.Summary(3, 0.5, 0.0, 0.0, 0.5, 0.5)


def _check_paired_against_scipy(a, b, confidence=0.95):
    p = stats.paired(a, b, confidence)
    d = np.asarray(a) - np.asarray(b)
    test = sps.ttest_rel(a, b)
    low, high = sps.t.interval(confidence, len(d) - 1, loc=d.mean(), scale=sps.sem(d))
    assert p.n == len(d)
    assert p.mean_diff == pytest.approx(d.mean(), rel=1e-12)
    assert (p.ci_low, p.ci_high) == pytest.approx((low, high), rel=1e-12)
    assert p.p_value == pytest.approx(test.pvalue, rel=1e-9)
    # The CI excludes 0 exactly when the test rejects at 1 - confidence.
    assert (p.verdict != "not shown") == (test.pvalue < 1 - confidence)
    return p


@pytest.mark.parametrize("seed", range(8))
def test_paired_matches_ttest_rel_on_random_data(seed):
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(2, 12))
    b = _random_scores(rng, n)
    a = b + rng.normal(rng.normal(0, 0.01), 0.01, size=n)  # shared seed effect plus a method effect
    _check_paired_against_scipy(list(a), list(b), confidence=[0.9, 0.95, 0.99][seed % 3])


def test_paired_verdict_of_each_kind_including_n2_and_negative_differences():
    b = [0.80, 0.82, 0.78, 0.81, 0.79]
    better = [x + e for x, e in zip(b, [0.020, 0.025, 0.018, 0.022, 0.021])]
    worse = [x - e for x, e in zip(b, [0.020, 0.025, 0.018, 0.022, 0.021])]
    mixed = [x + e for x, e in zip(b, [0.02, -0.03, 0.01, -0.01, 0.005])]
    assert _check_paired_against_scipy(better, b).verdict == "holds"
    worse_p = _check_paired_against_scipy(worse, b)
    assert worse_p.verdict == "reversed" and worse_p.mean_diff < 0 and worse_p.ci_high < 0
    assert _check_paired_against_scipy(mixed, b).verdict == "not shown"
    two = _check_paired_against_scipy([0.70, 0.74], [0.72, 0.75])  # n=2: df 1, a wide interval
    assert two.n == 2 and two.mean_diff == pytest.approx(-0.015) and two.verdict == "not shown"


def test_paired_by_seed_whatever_the_dict_order():
    rng = np.random.default_rng(7)
    seeds = [3, 11, 42, 0, 7, 19]
    a = dict(zip(seeds, _random_scores(rng, 6)))
    b = dict(zip(seeds, _random_scores(rng, 6)))
    shuffled = list(b.items())
    random.Random(1).shuffle(shuffled)
    b_shuffled = dict(shuffled)
    assert list(b_shuffled) != seeds
    p = stats.paired(a, b_shuffled)
    assert p == _check_paired_against_scipy([a[s] for s in seeds], [b[s] for s in seeds])
    # Pairing by dict position instead of seed would give another p-value: the test tells them apart.
    assert p.p_value != pytest.approx(sps.ttest_rel(list(a.values()), list(b_shuffled.values())).pvalue)


def test_paired_refuses_mismatched_seeds_lengths_and_kinds():
    with pytest.raises(ValueError, match=r"missing in a: \[4\], missing in b: \[1, 2\]"):
        stats.paired({1: 0.8, 2: 0.8, 3: 0.8}, {3: 0.7, 4: 0.7})
    with pytest.raises(ValueError, match="a has 3 scores, b has 2"):
        stats.paired([0.8, 0.8, 0.8], [0.7, 0.7])
    with pytest.raises(TypeError, match="not one of each"):
        stats.paired({1: 0.8, 2: 0.8}, [0.7, 0.7])
    with pytest.raises(ValueError, match=r"paired b: non-finite scores at seeds \[2\]"):
        stats.paired({1: 0.8, 2: 0.8}, {2: math.inf, 1: 0.7})
    with pytest.raises(ValueError, match="no scores"):
        stats.paired({}, {})


def test_paired_of_one_seed_shows_nothing():
    p = stats.paired({5: 0.8}, {5: 0.7})
    assert p.n == 1 and p.mean_diff == pytest.approx(0.1) and p.verdict == "not shown"
    assert math.isnan(p.ci_low) and math.isnan(p.ci_high) and math.isnan(p.p_value)
    assert stats.format_paired(p) == "+10.0 [–, –], p=–, not shown"


@pytest.mark.parametrize("d, p_value, verdict", [(0.25, 0.0, "holds"), (-0.25, 0.0, "reversed"),
                                                 (0.0, 1.0, "not shown")])
def test_paired_with_the_same_difference_on_every_seed(d, p_value, verdict):
    b = [0.5, 0.25, 0.75, 0.5]  # dyadic, so a - b is exactly d on every seed
    p = stats.paired([x + d for x in b], b)
    assert p == stats.Paired(4, d, d, d, p_value, verdict)
    # scipy agrees where its answer is defined: t = ±inf gives p = 0; for d = 0 it has 0 / 0 (nan).
    with warnings.catch_warnings():  # scipy warns of the zero variance
        warnings.simplefilter("ignore")
        ref = sps.ttest_rel([x + d for x in b], b).pvalue
    assert ref == p_value if d else math.isnan(ref)


def test_hand_computed_example():
    """Three seeds, so df = 2, where Student's t has closed forms:
    F(t) = 1/2 + t / (2 sqrt(2 + t^2)), so the quantile at q is t_q = sqrt(2 a^2 / (1 - a^2)) with
    a = 2q - 1, and the two-sided p-value of t is 1 - |t| / sqrt(2 + t^2)."""
    a = [0.81, 0.84, 0.83]
    b = [0.80, 0.82, 0.80]
    # d = (0.01, 0.02, 0.03): mean 0.02; squared deviations 1e-4, 0, 1e-4, so std = sqrt(2e-4 / 2)
    # = 0.01 and sem = 0.01 / sqrt(3) = 0.0057735.
    sem = 0.01 / math.sqrt(3)
    # 95 %: q = 0.975, a = 0.95, t_q = sqrt(2 * 0.9025 / 0.0975) = sqrt(18.51282) = 4.302653;
    # half-width 4.302653 * 0.0057735 = 0.0248414, CI (-0.0048414, 0.0448414): contains 0.
    t_q = math.sqrt(2 * 0.95 ** 2 / (1 - 0.95 ** 2))
    assert t_q == pytest.approx(4.302653, abs=1e-6)
    # t = 0.02 / 0.0057735 = 3.464102 (= 2 sqrt 3); p = 1 - 3.464102 / sqrt(14) = 1 - 0.9258201 = 0.0741799.
    p_value = 1 - (0.02 / sem) / math.sqrt(2 + (0.02 / sem) ** 2)
    assert p_value == pytest.approx(0.0741799, abs=1e-7)

    p = stats.paired(a, b)
    assert p.n == 3 and p.mean_diff == pytest.approx(0.02, rel=1e-12)
    assert (p.ci_low, p.ci_high) == pytest.approx((-0.0048414, 0.0448414), abs=1e-7)
    assert p.p_value == pytest.approx(p_value, rel=1e-9) and p.verdict == "not shown"
    assert stats.format_paired(p) == "+2.0 [-0.5, +4.5], p=0.074, not shown"

    # The student a alone: mean 2.48 / 3 = 0.8266667, deviations -1/60, 1/75, 1/300; squares sum to
    # 4.6666667e-4, std = sqrt(2.3333333e-4) = 0.0152753, sem = 0.0152753 / sqrt(3) = 0.0088192,
    # half-width 4.302653 * 0.0088192 = 0.0379458, CI (0.7887208, 0.8646125).
    s = stats.summary(a)
    assert (s.mean, s.std, s.sem) == pytest.approx((0.8266667, 0.0152753, 0.0088192), abs=1e-7)
    assert (s.ci_low, s.ci_high) == pytest.approx((0.7887208, 0.8646125), abs=1e-7)
    assert stats.format_summary(s) == "82.7 ± 1.5 [78.9, 86.5]"
    # Against a teacher at 0.90: 0.8266667 / 0.9 = 91.85 % kept, std 1.70, the CI scaled the same
    # way: 0.7887208 / 0.9 = 0.8763565, 0.8646125 / 0.9 = 0.9606806.
    kept = stats.of_teacher(s, 0.90)
    assert (kept.mean, kept.ci_low, kept.ci_high) == pytest.approx((0.9185185, 0.8763565, 0.9606806), abs=1e-7)
    assert stats.format_summary(kept, digits=2) == "91.85 ± 1.70 [87.64, 96.07]"


def test_of_teacher_refuses_a_score_that_cannot_be_divided_by():
    for teacher in (0.0, -0.5, math.nan):
        with pytest.raises(ValueError, match="teacher"):
            stats.of_teacher(stats.summary([0.8, 0.9]), teacher)


def test_formats():
    s = stats.Summary(5, 0.8524, 0.0061, 0.0027, 0.8449, 0.8599)
    assert stats.format_summary(s) == "85.2 ± 0.6 [84.5, 86.0]"
    assert stats.format_summary(s, scale=1, digits=3) == "0.852 ± 0.006 [0.845, 0.860]"
    p = stats.Paired(5, 0.013, 0.002, 0.024, 0.031, "holds")
    assert stats.format_paired(p) == "+1.3 [+0.2, +2.4], p=0.031, holds"
    q = stats.Paired(5, -0.013, -0.024, -0.002, 0.0004, "reversed")
    assert stats.format_paired(q, digits=2) == "-1.30 [-2.40, -0.20], p<0.001, reversed"
    assert stats.format_paired(stats.Paired(5, 0.0, -0.01, 0.01, 1.0, "not shown")).endswith("p=1, not shown")


def test_confidence_must_be_a_probability():
    for confidence in (0.0, 1.0, 95):
        with pytest.raises(ValueError, match="confidence"):
            stats.summary([0.8, 0.9], confidence)
