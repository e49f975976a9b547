"""Comparisons over training seeds, with a confidence interval and the effect they could detect.

A claim about arms (SRA vs baseline, teacher vs student, DiverseDiT vs baseline) is a statement
about training runs, so its noise is the run-to-run spread over **training seeds**, not the
test-set noise of one model's probe. :func:`compare` gives the difference of two arms' per-seed
values: :func:`compare_arms` pairs them by seed when the arms share their training seeds (the
per-seed differences, a paired t interval: seed-to-seed variation common to both arms cancels) and
falls back to a Welch t interval where they do not (a seed missing in one arm); :func:`compare` is
the plain Welch / one-sample interval. :func:`judge` turns a comparison into a verdict against the
effect the claim needs (its ``claimed`` size, in the claim's own units and direction):

* ``held``: the 95% interval lies above 0 (in the claimed direction) and reaches the claimed effect;
* ``held, smaller than claimed``: the interval lies above 0 but entirely below the claimed effect
  (there is an effect, smaller than the paper's);
* ``did not hold``: the interval excludes an effect as large as the claimed one (or shows the
  opposite) without lying above 0;
* ``underpowered at this scale``: the interval holds both 0 and the claimed effect, or there are
  fewer than two seeds per arm (the spread is unmeasured) -- with the minimal detectable effect
  (5% two-sided, 80% power) of the measured spread, so the reader knows what could have been seen.

Two verdicts come from outside the interval: ``not testable at this scale`` (a generation claim whose
samples fail the maturity gate, :mod:`repdyn.study.gate`) and ``not run at this scale`` (the scale
has no runs of the design the claim needs).

Runs of one arm are named ``<arm>`` (seed 0) or ``<arm>-s<seed>``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

__all__ = ["Comparison", "compare", "compare_arms", "paired", "probe_noise_comparison", "judge", "judge_sign", "arm_of",
           "seed_of", "seed_or_none", "HELD", "HELD_SMALLER", "NOT_HELD", "UNDERPOWERED", "NOT_TESTABLE", "NOT_RUN",
           "INCONCLUSIVE", "VERDICTS"]

HELD = "held"
HELD_SMALLER = "held, smaller than claimed"
NOT_HELD = "did not hold"
UNDERPOWERED = "underpowered at this scale"
NOT_TESTABLE = "not testable at this scale"
NOT_RUN = "not run at this scale"
INCONCLUSIVE = "inconclusive"
VERDICTS = (HELD, HELD_SMALLER, NOT_HELD, UNDERPOWERED, NOT_TESTABLE, NOT_RUN, INCONCLUSIVE)

_SEED = re.compile(r"^(?P<arm>.+?)-s(?P<seed>\d+)$")


def arm_of(run: str) -> str:
    m = _SEED.match(str(run))
    return m.group("arm") if m else str(run)


def seed_or_none(run: str) -> int | None:
    """The training seed a run name ``<arm>-s<seed>`` carries, None for a name without one."""
    m = _SEED.match(str(run))
    return int(m.group("seed")) if m else None


def seed_of(run: str) -> int:
    """The run's training seed (0 for a name without one: a one-seed study names runs by arm only)."""
    seed = seed_or_none(run)
    return 0 if seed is None else seed


@dataclass(frozen=True)
class Comparison:
    """``a - b`` over seeds (``b`` empty: a one-sample comparison of ``a`` with 0)."""

    diff: float
    se: float  # nan with fewer than two seeds in an arm
    ci_low: float
    ci_high: float
    n_a: int
    n_b: int
    mde: float  # minimal detectable |effect| at 5% two-sided, 80% power, for this se
    kind: str = "welch"  # "paired" (per-seed differences) | "welch" (unpaired arms) | "one-sample" | "test-set"

    def text(self, unit: str = "") -> str:
        ci = "n/a (one seed)" if not math.isfinite(self.se) else f"[{self.ci_low:+.2f}, {self.ci_high:+.2f}]{unit}"
        if self.kind == "paired":
            seeds = f"paired t over {self.n_a} shared seeds"
        elif self.kind == "test-set":
            seeds = "one model: the probe's test-set binomial error, not a seed spread"
        elif self.n_b:
            seeds = f"Welch, {self.n_a} vs {self.n_b} seeds, unpaired"
        else:
            seeds = f"{self.n_a} seeds"
        mde = f"; detectable effect ~{self.mde:.2f}{unit}" if math.isfinite(self.mde) else ""
        return f"difference {self.diff:+.2f}{unit}, 95% CI {ci} ({seeds}{mde})"


def compare(a: Sequence[float], b: Sequence[float] = ()) -> Comparison:
    """Welch t interval of mean(a) - mean(b) (or the one-sample t interval of mean(a) when ``b`` is empty)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    diff = float(a.mean() - (b.mean() if b.size else 0.0))
    kind = "welch" if b.size else "one-sample"
    if a.size < 2 or (b.size and b.size < 2):
        return Comparison(diff, math.nan, math.nan, math.nan, int(a.size), int(b.size), math.nan, kind)
    va, vb = a.var(ddof=1) / a.size, (b.var(ddof=1) / b.size if b.size else 0.0)
    se = math.sqrt(va + vb)
    if b.size:
        dof = (va + vb) ** 2 / (va**2 / (a.size - 1) + vb**2 / (b.size - 1)) if va + vb > 0 else a.size + b.size - 2
    else:
        dof = a.size - 1
    q = float(stats.t.ppf(0.975, dof))
    mde = (q + float(stats.t.ppf(0.8, dof))) * se
    return Comparison(diff, se, diff - q * se, diff + q * se, int(a.size), int(b.size), mde, kind)


def _by_seed(values: Mapping[Any, float] | pd.Series) -> pd.Series:
    """Per-seed values: the index is the seed (run names such as ``sra-s2`` are read by :func:`seed_of`)."""
    s = pd.Series(values, dtype=float).dropna()
    return s.set_axis([k if isinstance(k, (int, np.integer)) else seed_of(k) for k in s.index])


def paired(a: Mapping[Any, float] | pd.Series, b: Mapping[Any, float] | pd.Series) -> bool:
    """Whether two arms' per-seed values are paired: the same (>= 2) training seeds in both."""
    sa, sb = _by_seed(a), _by_seed(b)
    return len(sa) >= 2 and sa.index.is_unique and sb.index.is_unique and set(sa.index) == set(sb.index)


def compare_arms(a: Mapping[Any, float] | pd.Series, b: Mapping[Any, float] | pd.Series) -> Comparison:
    """``a - b`` for two arms given per seed (keyed by seed or by run name ``<arm>-s<seed>``): when the
    arms share their training seeds, the paired t interval of the per-seed differences (the mean
    difference is the same as Welch's; its interval drops the seed-to-seed variation both arms
    share); otherwise (a seed missing in one arm) the Welch interval, marked unpaired."""
    sa, sb = _by_seed(a), _by_seed(b)
    if not paired(sa, sb):
        return compare(sa.to_numpy(), sb.to_numpy())
    d = compare((sa - sb.reindex(sa.index)).to_numpy())
    return Comparison(d.diff, d.se, d.ci_low, d.ci_high, d.n_a, d.n_a, d.mde, "paired")


def probe_noise_comparison(diff: float, se: float) -> Comparison:
    """A normal 95% interval for one model's difference whose noise is a probe's test-set binomial
    error ``se`` (the one-seed case: the verdict is about that model, not about training runs)."""
    q = float(stats.norm.ppf(0.975))
    return Comparison(diff, se, diff - q * se, diff + q * se, 1, 0, (q + float(stats.norm.ppf(0.8))) * se, "test-set")


def judge_sign(*cs: Comparison) -> str:
    """The verdict of a claim that is only a direction (each comparison signed so that the claim
    predicts a positive value; a non-inferiority claim passes ``margin - excess``): ``held`` if every
    95% interval lies above 0, ``did not hold`` if any lies below 0, otherwise (or with an unmeasured
    spread) underpowered."""
    if any(not math.isfinite(c.se) for c in cs):
        return UNDERPOWERED
    if any(c.ci_high < 0 for c in cs):
        return NOT_HELD
    if all(c.ci_low > 0 for c in cs):
        return HELD
    return UNDERPOWERED


def judge(c: Comparison, claimed: float) -> str:
    """The verdict of a comparison whose claim is an effect of at least ``claimed`` (> 0, in the
    claim's direction: pass differences signed so that the claim predicts a positive value):
    ``held`` if the 95% interval lies above 0 and reaches ``claimed``; ``held, smaller than
    claimed`` if it lies above 0 but entirely below ``claimed``; ``did not hold`` if it lies below
    ``claimed`` without clearing 0; otherwise (or with an unmeasured spread) underpowered."""
    if not math.isfinite(c.se):
        return UNDERPOWERED
    if c.ci_low > 0:
        return HELD_SMALLER if c.ci_high < claimed else HELD
    if c.ci_high < claimed:
        return NOT_HELD
    return UNDERPOWERED
