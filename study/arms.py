"""Each arm's final numbers over its training seeds, and the SRA teacher-EMA sensitivity (App. F).

An arm is a method with its settings (``baseline``, ``sra``, ``sra-kt3``, ``sra-ema0.99``, ...);
its runs are its training seeds (:func:`repdyn.study.power.arm_of`). These tables are context for the
claims, in the report beside the verdicts: what every run ended at, so a reader can see the spread.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from repdyn.study.power import arm_of, compare, compare_arms
from repdyn.study.tables import StudyTables

__all__ = ["arm_table", "ema_sensitivity", "arm_decay"]

_EMA_ARM = re.compile(r"^sra-ema(?P<decay>[0-9.]+)$")


def _final(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows of each run's last step."""
    last = frame.groupby("run")["step"].transform("max")
    return frame[frame["step"] == last]


def _per_run(tb: StudyTables) -> pd.DataFrame:
    """One row per run: final generation metric with what makes it readable (``class_acc``: the
    conditional samples' class accuracy; ``init_fraction``: the share of its initialisation the
    sampled EMA holds), final teacher and student probe accuracy (points)."""
    rows = pd.DataFrame({"run": sorted(set(tb.quality["run"]) | set(tb.curves["run"] if tb.curves is not None
                                                                         else []))})
    q = tb.quality
    if not q.empty:
        metric = q["metric"].iloc[0]
        cols = ["run", metric] + [c for c in ("class_acc", "init_fraction") if c in q.columns]
        rows = rows.merge(_final(q)[cols].rename(columns={metric: "metric_value"}), on="run", how="left")
    online = tb.eval_online
    if online is not None and not online.empty and not q.empty:
        metric = q["metric"].iloc[0]
        if metric in online.columns:
            rows = rows.merge(_final(online)[["run", metric]].rename(columns={metric: "online_value"}), on="run",
                              how="left")
    if tb.curves is not None:
        c = _final(tb.curves)
        for role in ("teacher", "student"):
            acc = c[c["role"] == role].groupby("run")["accuracy"].mean().mul(100).rename(f"{role}_acc")
            rows = rows.merge(acc, left_on="run", right_index=True, how="left")
    return rows.assign(arm=rows["run"].map(arm_of))


def arm_table(tb: StudyTables) -> pd.DataFrame:
    """Per arm: number of seeds, mean and SD over seeds of the final metric (EMA, and the online
    weights' cross-check where evaluated), its samples' class accuracy and initial-weight fraction,
    and the final teacher / student probe accuracy."""
    per = _per_run(tb)
    cols = [c for c in ("metric_value", "online_value", "class_acc", "init_fraction", "teacher_acc", "student_acc")
            if c in per.columns]
    agg = per.groupby("arm")[cols].agg(["mean", "std"])
    agg.columns = [f"{c}_{s}" for c, s in agg.columns]
    out = agg.assign(seeds=per.groupby("arm")["run"].nunique()).reset_index()
    out.attrs["metric"] = tb.quality["metric"].iloc[0] if not tb.quality.empty else "metric"
    return out


def _readable(rows: pd.DataFrame) -> str:
    """`` (class acc 0.71, init 0.25%)`` for an arm's runs (means), when measured: beside every fd."""
    parts = []
    if "class_acc" in rows.columns and rows["class_acc"].notna().any():
        parts.append(f"class acc {rows['class_acc'].mean():.2f}")
    if "init_fraction" in rows.columns and rows["init_fraction"].notna().any():
        parts.append(f"init {100 * rows['init_fraction'].mean():.3g}%")
    return f" ({', '.join(parts)})" if parts else ""


def arm_decay(arm: str, default: float) -> float | None:
    """The teacher (= EMA) decay of an SRA arm: ``sra-ema<d>`` has d, ``sra`` the study's default."""
    if arm == "sra":
        return default
    m = _EMA_ARM.match(arm)
    return float(m.group("decay")) if m else None


def ema_sensitivity(tb: StudyTables) -> list[str]:
    """Lines of the App. F check: for each SRA teacher decay, the relative metric change against a
    baseline with the same EMA decay (``baseline`` for the study's default, ``baseline-ema<d>``
    otherwise: the decay is also the sampled EMA's) and the final teacher - student gap, each with
    its 95% interval over seeds. Empty when the study has no teacher-EMA arm."""
    per = _per_run(tb)
    default = tb.config.get("ema_decay")
    decays = {a: arm_decay(a, default) for a in sorted(set(per["arm"]))}
    decays = {a: d for a, d in decays.items() if d is not None}
    if len(decays) < 2 or "metric_value" not in per.columns:
        return []
    metric = tb.quality["metric"].iloc[0]
    lines = []
    for arm, d in sorted(decays.items(), key=lambda kv: kv[1]):
        r = per[per["arm"] == arm]
        lag = 1 / (1 - d) if d < 1 else np.inf
        text = f"decay {d:g} (`{arm}`, mean lag ~{lag:.0f} steps, {len(r)} seeds): "
        # the decay is also that of the EMA weights that are sampled: compare with a baseline whose
        # EMA has the same decay, else the metric compares evaluation EMAs, not teachers
        base_arm = "baseline" if arm == "sra" else f"baseline-ema{d:g}"
        base = per.loc[per["arm"] == base_arm, "metric_value"].dropna()
        if len(base):
            vs = compare_arms(r.set_index("run")["metric_value"].dropna(),
                              per[per["arm"] == base_arm].set_index("run")["metric_value"].dropna())
            rel = 100 * vs.diff / base.mean()
            text += (f"{metric} {r['metric_value'].mean():.2f}{_readable(r)} vs `{base_arm}` {base.mean():.2f}"
                     f"{_readable(per[per['arm'] == base_arm])} ({rel:+.1f}%; {vs.text()})")
        else:
            text += (f"{metric} {r['metric_value'].mean():.2f}, no baseline at EMA {d:g} (`{base_arm}`): the "
                     "decay is also the sampled EMA's, so this metric is not a test of the teacher")
        if {"teacher_acc", "student_acc"} <= set(r.columns):
            gap = compare((r["teacher_acc"] - r["student_acc"]).dropna())
            text += f"; teacher - student accuracy {gap.text(' pts')}"
        lines.append(text)
    return lines
