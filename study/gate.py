"""The maturity gate of the generation claims (C5, C6, C7): are the samples good enough to judge?

A generation claim compares arms by the quality (fd) of samples drawn from their EMA weights. That
comparison means something only where the samples are those of a trained model: the committed
``cpu-repro`` run (EMA 0.999, 2000 steps) sampled weights that still held 13-61% of their
initialisation (0.999 ** step) and whose conditional samples ignored their labels (class accuracy
0.10, chance), so its fd differences were the residue of initialisation. :func:`maturity` states the
gate and its numbers; a claim whose arms fail it is ``not testable at this scale``.

The gate (every condition must hold):

* **EMA age**: every compared run's sampled weights hold < 1% of their initialisation
  (:data:`MAX_INIT_FRACTION`; ``decay ** step`` at its final checkpoint, the decay from the study's
  config or the run's ``-ema<d>`` arm);
* **labels obeyed**: the baseline's conditional samples reach a class accuracy of at least 0.6
  (:data:`MIN_CLASS_ACC`; mean over its seeds at their final checkpoints) by the dataset's
  classifier (``cond_acc_<data>`` of the evaluation table; the classifier itself reads 0.84 of real
  Fashion-MNIST test images, ``classifier_test_acc``), chance being 0.1;
* **measured well enough**: that accuracy's binomial standard error, ``sqrt(p (1 - p) / n)`` with the
  evaluation row's ``n_samples``, is below 2 points (:data:`MAX_CLASS_ACC_SE`) in every baseline row.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .power import arm_of
from repdyn.model.checkpoint import init_fraction

from .tables import StudyTables, class_acc_column, run_ema_decay

__all__ = ["Maturity", "maturity", "binomial_se", "MAX_INIT_FRACTION", "MIN_CLASS_ACC", "MAX_CLASS_ACC_SE"]

MAX_INIT_FRACTION = 0.01  # < 1% of the initial weights left in the sampled EMA
MIN_CLASS_ACC = 0.6  # the baseline's samples obey their labels (chance 0.1; the classifier 0.84 on real images)
MAX_CLASS_ACC_SE = 0.02  # binomial SE of that accuracy below 2 points (n >= 625 guarantees it at any p)


def binomial_se(p: float, n: float) -> float:
    """Binomial standard error of an accuracy ``p`` measured on ``n`` samples (NaN without n)."""
    if not (math.isfinite(p) and math.isfinite(n)) or n <= 0:
        return math.nan
    return math.sqrt(p * (1 - p) / n)


@dataclass(frozen=True)
class Maturity:
    """The gate's numbers for one set of compared arms, and whether they pass."""

    init_fraction: float  # the largest over the compared runs' final checkpoints
    init_run: str  # the run it belongs to
    class_acc: float  # baseline, mean over seeds at their final checkpoints (NaN: not measured)
    class_acc_se: float  # the largest per-row binomial SE
    n_samples: float  # the smallest evaluation n of those rows
    classifier_acc: float  # the classifier's accuracy on real test images (NaN when not recorded)
    reasons: tuple[str, ...]  # why it fails (empty: it passes)

    @property
    def passed(self) -> bool:
        return not self.reasons

    def text(self) -> str:
        """The numbers, one clause each (``init fraction``, class accuracy with its SE, classifier)."""
        init = (f"the sampled EMA holds {100 * self.init_fraction:.3g}% of its initial weights ({self.init_run}; "
                f"gate < {100 * MAX_INIT_FRACTION:g}%)") if math.isfinite(self.init_fraction) else \
            "the sampled EMA's share of initial weights is unknown (no EMA decay recorded)"
        if math.isfinite(self.class_acc):
            acc = (f"baseline class accuracy {self.class_acc:.2f} +- {self.class_acc_se:.3f} SE (n = "
                   f"{self.n_samples:.0f}; gate >= {MIN_CLASS_ACC:g} with SE < {MAX_CLASS_ACC_SE:g}; chance 0.10")
            acc += f", the classifier on real images {self.classifier_acc:.2f})" if math.isfinite(
                self.classifier_acc) else ")"
        else:
            acc = "the baseline's class accuracy was not measured (no cond_acc column)"
        return f"{init}; {acc}"


def _final_rows(ev: pd.DataFrame, arms: Sequence[str]) -> pd.DataFrame:
    """Each run's last evaluated checkpoint, for runs of ``arms``."""
    ev = ev[ev["run"].map(arm_of).isin(arms)]
    return ev[ev["step"] == ev.groupby("run")["step"].transform("max")]


def maturity(tb: StudyTables, arms: Sequence[str], baseline: str = "baseline") -> Maturity:
    """The maturity gate (module docstring) for a claim comparing ``arms``: the EMA age of every run of
    ``arms`` and the class accuracy of ``baseline`` (``baseline-ema<d>`` arms are their own
    baselines: pass the arm's name)."""
    ev = tb.eval_ema
    if ev is None or ev.empty or "run" not in ev.columns:
        return Maturity(math.nan, "", math.nan, math.nan, math.nan, math.nan, ("no evaluation table",))
    rows = _final_rows(ev, tuple(arms) + (baseline,))
    default = tb.config.get("ema_decay")
    weights = rows["weights"] if "weights" in rows.columns else pd.Series("ema", index=rows.index)
    fracs = pd.Series([init_fraction(run_ema_decay(r, default), st) if w == "ema" else 0.0
                       for r, st, w in zip(rows["run"], rows["step"], weights)], index=rows.index, dtype=float)
    reasons = []
    if fracs.empty or fracs.isna().any():
        init, init_run = math.nan, ""
        reasons.append("EMA age unknown")
    else:
        init, init_run = float(fracs.max()), str(rows.loc[fracs.idxmax(), "run"])
        if init >= MAX_INIT_FRACTION:
            reasons.append("EMA too young")
    base = rows[rows["run"].map(arm_of) == baseline]
    col = class_acc_column(ev, tb.config.get("data"))
    clf = float(base["classifier_test_acc"].mean()) if "classifier_test_acc" in base.columns and len(base) else math.nan
    if col is None or base.empty or base[col].isna().all():
        reasons.append("class accuracy not measured")
        return Maturity(init, init_run, math.nan, math.nan, math.nan, clf, tuple(reasons))
    n = base["n_samples"].astype(float) if "n_samples" in base.columns else pd.Series(np.nan, index=base.index)
    ses = [binomial_se(float(p), float(k)) for p, k in zip(base[col], n)]
    acc, se = float(base[col].mean()), (float(np.max(ses)) if ses else math.nan)
    if not acc >= MIN_CLASS_ACC:
        reasons.append("samples ignore their labels" if acc < 0.2 else "class accuracy below the gate")
    if not se < MAX_CLASS_ACC_SE:
        reasons.append("too few samples for the class accuracy")
    return Maturity(init, init_run, acc, se, float(n.min()), clf, tuple(reasons))
