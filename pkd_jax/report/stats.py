"""Statistics over seeds for the study: a method's score on a task, and two methods compared.

Scores are per seed (one run each), as fractions (0.852) or any other unit; everything is float64.
With n seeds, x_i the scores, c the confidence (0.95) and t_q the Student t quantile with n - 1
degrees of freedom at q = (1 + c) / 2:

  mean = sum(x_i) / n,   std = sqrt(sum((x_i - mean)^2) / (n - 1)),   sem = std / sqrt(n),
  CI   = mean ± t_q * sem.

Two methods run with the same seeds (same data order and initialisation) are compared per seed:
d_i = a_i - b_i, and the statistics above of d give the mean difference and its CI (the paired t
interval); t = mean(d) / sem(d) gives the two-sided p-value 2 * (1 - F_{n-1}(|t|)) (scipy's
ttest_rel). The verdict reads the CI: "holds" above 0, "reversed" below 0, "not shown" otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np

HOLDS, REVERSED, NOT_SHOWN = "holds", "reversed", "not shown"


@dataclass(frozen=True)
class Summary:
    """A method's scores over n seeds; std, sem and the CI are nan when n == 1 (no spread to measure)."""
    n: int
    mean: float
    std: float
    sem: float
    ci_low: float
    ci_high: float


@dataclass(frozen=True)
class Paired:
    """a - b over n paired seeds: the mean difference, its CI, the two-sided p-value and the verdict."""
    n: int
    mean_diff: float
    ci_low: float
    ci_high: float
    p_value: float
    verdict: str


def _scores(values, what: str, seeds: list | None = None) -> np.ndarray:
    """values as a 1-D float64 array; a nan/inf score (a failed run?) is an error naming its seeds
    (or positions), not a silent nan in the table."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"{what}: expected a 1-D sequence of scores, got shape {x.shape}")
    if x.size == 0:
        raise ValueError(f"{what}: no scores (at least one seed is needed)")
    bad = np.flatnonzero(~np.isfinite(x)).tolist()
    if bad:
        where = f"seeds {[seeds[i] for i in bad]}" if seeds is not None else f"positions {bad}"
        raise ValueError(f"{what}: non-finite scores at {where}")
    return x


def _student_t():
    from scipy.stats import t  # here: importing scipy.stats costs every run.py 1.2 s

    return t


def _quantile(n: int, confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    return float(_student_t().ppf((1.0 + confidence) / 2.0, n - 1))


def summary(values, confidence: float = 0.95) -> Summary:
    """mean, std (ddof=1), sem = std / sqrt(n) and the Student t CI mean ± t_q * sem over the seeds'
    scores (a sequence, or a mapping seed -> score). n == 1: std, sem, ci_low and ci_high are nan.
    No scores, or a nan/inf score: ValueError."""
    if isinstance(values, Mapping):
        seeds = list(values)
        x = _scores([values[s] for s in seeds], "summary", seeds)
    else:
        x = _scores(values, "summary")
    n, mean = x.size, float(x.mean())
    if n == 1:
        return Summary(1, mean, math.nan, math.nan, math.nan, math.nan)
    std = float(x.std(ddof=1))
    sem = std / math.sqrt(n)
    half = _quantile(n, confidence) * sem
    return Summary(n, mean, std, sem, mean - half, mean + half)


def _pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    """a and b aligned seed by seed: mappings by their seed keys, sequences by position."""
    if isinstance(a, Mapping) != isinstance(b, Mapping):
        raise TypeError("paired: give two mappings seed -> score, or two sequences in seed order, not one of each")
    if isinstance(a, Mapping):
        if a.keys() != b.keys():
            raise ValueError(f"paired: seeds differ; missing in a: {sorted(b.keys() - a.keys())}, "
                             f"missing in b: {sorted(a.keys() - b.keys())}")
        seeds = list(a)
        return _scores([a[s] for s in seeds], "paired a", seeds), _scores([b[s] for s in seeds], "paired b", seeds)
    a, b = _scores(a, "paired a"), _scores(b, "paired b")
    if a.size != b.size:
        raise ValueError(f"paired: a has {a.size} scores, b has {b.size}; each seed needs both")
    return a, b


def _verdict(low: float, high: float) -> str:
    return HOLDS if low > 0 else REVERSED if high < 0 else NOT_SHOWN


def paired(a, b, confidence: float = 0.95) -> Paired:
    """a - b over seeds: mean difference, paired t CI, two-sided paired t-test p-value and verdict.

    a and b: mappings seed -> score (paired by seed; different seed sets raise ValueError naming the
    seeds missing on each side) or equal-length sequences in the same seed order.
    n == 1: CI and p are nan, verdict "not shown" (one seed cannot show a difference).
    Every d_i equal to d (sem 0): t = d / 0 is undefined, so the limits are used: CI (d, d) and
    p = 0.0 when d != 0 (the same difference on every seed, t -> ±inf), p = 1.0 when d == 0 (no
    difference at all, t -> 0); scipy's ttest_rel would give nan for d == 0.
    """
    a, b = _pair(a, b)
    d = a - b
    s = summary(d, confidence)
    if s.n == 1:
        return Paired(1, s.mean, math.nan, math.nan, math.nan, NOT_SHOWN)
    if s.sem == 0.0:
        p = 1.0 if s.mean == 0.0 else 0.0
    else:
        p = float(2.0 * _student_t().sf(abs(s.mean / s.sem), s.n - 1))
    return Paired(s.n, s.mean, s.ci_low, s.ci_high, p, _verdict(s.ci_low, s.ci_high))


def of_teacher(s: Summary, teacher: float) -> Summary:
    """The share of the teacher's score kept: every statistic of s divided by teacher (a scalar, so
    the teacher's own seed-to-seed spread is not in the CI). format_summary(..., scale=100) prints %."""
    if not (math.isfinite(teacher) and teacher > 0):
        raise ValueError(f"of_teacher: the teacher's score must be finite and > 0, got {teacher}")
    return replace(s, mean=s.mean / teacher, std=s.std / teacher, sem=s.sem / teacher,
                   ci_low=s.ci_low / teacher, ci_high=s.ci_high / teacher)


def _num(x: float, scale: float, digits: int, sign: str = "") -> str:
    """x * scale to `digits` decimals; "–" for nan (the report's mark for a missing value)."""
    return "–" if math.isnan(x) else f"{x * scale:{sign}.{digits}f}"


def format_summary(s: Summary, scale: float = 100, digits: int = 1) -> str:
    """ "85.2 ± 0.6 [84.5, 85.9]": mean ± std [CI], times scale (100: fractions to percent)."""
    return (f"{_num(s.mean, scale, digits)} ± {_num(s.std, scale, digits)} "
            f"[{_num(s.ci_low, scale, digits)}, {_num(s.ci_high, scale, digits)}]")


def _p(p: float) -> str:
    """Two significant digits; below 0.001 only the bound."""
    return "p=–" if math.isnan(p) else "p<0.001" if p < 0.001 else f"p={p:.2g}"


def format_paired(p: Paired, scale: float = 100, digits: int = 1) -> str:
    """ "+1.3 [+0.2, +2.4], p=0.03, holds": signed mean difference [CI], times scale; p-value; verdict."""
    return (f"{_num(p.mean_diff, scale, digits, '+')} [{_num(p.ci_low, scale, digits, '+')}, "
            f"{_num(p.ci_high, scale, digits, '+')}], {_p(p.p_value)}, {p.verdict}")
