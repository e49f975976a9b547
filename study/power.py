"""Comparisons over training seeds, with a confidence interval and the effect they could detect.

A claim about arms (SRA vs baseline, teacher vs student, DiverseDiT vs baseline) is a statement
about training runs, so its noise is the run-to-run spread over **training seeds**, not the
test-set noise of one model's probe. :func:`compare` gives the difference of two arms' per-seed
values with a Welch t interval; :func:`judge` turns it into a verdict against the effect the claim
needs (its ``claimed`` size, in the claim's own units and direction):

* ``held``: the 95% interval lies above 0 (in the claimed direction);
* ``did not hold``: the interval excludes an effect as large as the claimed one (or shows the
  opposite);
* ``underpowered at this scale``: the interval holds both 0 and the claimed effect, or there are
  fewer than two seeds per arm (the spread is unmeasured) -- with the minimal detectable effect
  (5% two-sided, 80% power) of the measured spread, so the reader knows what could have been seen.

Runs of one arm are named ``<arm>`` (seed 0) or ``<arm>-s<seed>``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

__all__ = ["Comparison", "compare", "judge", "arm_of", "seed_of", "UNDERPOWERED"]

UNDERPOWERED = "underpowered at this scale"
_SEED = re.compile(r"^(?P<arm>.+?)-s(?P<seed>\d+)$")


def arm_of(run: str) -> str:
    m = _SEED.match(str(run))
    return m.group("arm") if m else str(run)


def seed_of(run: str) -> int:
    m = _SEED.match(str(run))
    return int(m.group("seed")) if m else 0


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

    def text(self, unit: str = "") -> str:
        ci = "n/a (one seed)" if not math.isfinite(self.se) else f"[{self.ci_low:+.2f}, {self.ci_high:+.2f}]{unit}"
        seeds = f"{self.n_a} vs {self.n_b} seeds" if self.n_b else f"{self.n_a} seeds"
        mde = f"; detectable effect ~{self.mde:.2f}{unit}" if math.isfinite(self.mde) else ""
        return f"difference {self.diff:+.2f}{unit}, 95% CI {ci} ({seeds}{mde})"


def compare(a: Sequence[float], b: Sequence[float] = ()) -> Comparison:
    """Welch t interval of mean(a) - mean(b) (or of mean(a) alone when ``b`` is empty)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    diff = float(a.mean() - (b.mean() if b.size else 0.0))
    if a.size < 2 or (b.size and b.size < 2):
        return Comparison(diff, math.nan, math.nan, math.nan, int(a.size), int(b.size), math.nan)
    va, vb = a.var(ddof=1) / a.size, (b.var(ddof=1) / b.size if b.size else 0.0)
    se = math.sqrt(va + vb)
    if b.size:
        dof = (va + vb) ** 2 / (va**2 / (a.size - 1) + vb**2 / (b.size - 1)) if va + vb > 0 else a.size + b.size - 2
    else:
        dof = a.size - 1
    q = float(stats.t.ppf(0.975, dof))
    mde = (q + float(stats.t.ppf(0.8, dof))) * se
    return Comparison(diff, se, diff - q * se, diff + q * se, int(a.size), int(b.size), mde)


def judge(c: Comparison, claimed: float) -> str:
    """The verdict of a comparison whose claim is an effect of at least ``claimed`` (> 0, in the
    claim's direction: pass differences signed so that the claim predicts a positive value)."""
    if not math.isfinite(c.se):
        return UNDERPOWERED
    if c.ci_low > 0:
        return "held"
    if c.ci_high < claimed:
        return "did not hold"
    return UNDERPOWERED
