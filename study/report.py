"""``REPORT.md`` as text: one section per claim with its verdict, numbers, rule and figures."""

from __future__ import annotations

import math
import os
from collections.abc import Collection, Sequence
from pathlib import Path

import pandas as pd

from repdyn.core.files import atomic_write_text
from repdyn.core.runtime import machine_description

from repdyn.study.arms import arm_table, ema_sensitivity
from repdyn.study.claims import CLAIMS, Verdict, check_claims, rule_text
from repdyn.study.tables import StudyTables

__all__ = ["render_report", "write_report"]


def _sessions(study: dict) -> str:
    """Which sessions the compute line sums: the whole study, or its gathering and its runs' ``--only``
    sessions (runs made by an older version recorded none, and the line says so)."""
    if "gather_sessions" not in study:
        return f"{study.get('sessions', 1)} session(s)"
    runs = study.get("run_sessions", 0)
    if not runs and "train" in study.get("gather_timings_s", {}):
        return f"{study['gather_sessions']} session(s)"
    return (f"{study['gather_sessions']} gathering session(s) and {runs} `--only` run session(s)"
            + ("" if runs else ": the runs were trained in --only sessions that recorded no compute (an older "
               "version), so their training, probes and evaluation are not in it"))


def render_report(tb: StudyTables, verdicts: Sequence[Verdict], figures: Collection[str], machine: str,
                  tables_dir: str) -> str:
    """The report's Markdown. ``figures``: the file names present beside it (only those are linked)."""
    cfg, study = tb.config, tb.study
    tim = study.get("timings_s", {})
    lines = ["# Representation claims, checked with repdyn", "",
             f"Study `{cfg.get('name')}`: {cfg.get('model')} {cfg.get('model_overrides') or ''} on {cfg.get('data')}, "
             f"{cfg.get('steps')} steps at batch {cfg.get('batch_size')}, runs: "
             f"{', '.join(m for m in cfg.get('methods', []))}"
             + (f" + SRA teacher blocks {cfg.get('extra_teacher_blocks')}" if cfg.get("extra_teacher_blocks") else "")
             + ".", f"Machine: {machine}.",
             f"Compute time of the study (s, summed over {_sessions(study)}, installation not included): "
             + ", ".join(f"{k} {v:.0f}" for k, v in tim.items()) + ".", "",
             f"Verdicts are computed by `repdyn.study.claims` from the tables in `{tables_dir}`; the rule for each "
             "claim is stated below. Comparisons of arms (C3, C4, C6-C9) are made over training seeds, as a "
             "paired t interval of the per-seed differences where the arms share their seeds (Welch where they "
             "do not; each line says which): "
             "**held** = the 95% interval is above zero and reaches the claimed effect, **held, smaller than "
             "claimed** = it is above zero but entirely below the claimed effect, **did not hold** = it lies "
             "below the claimed effect without clearing zero, **underpowered at this scale** = it contains both "
             "zero and the claimed effect, or there is one seed per arm (the run-to-run spread is then "
             "unmeasured); C8 (non-inferiority) and C9 (a direction) are held only when their intervals clear "
             "zero on the claim's side and did not hold when they lie on the other. Generation claims (C5-C9) "
             "are judged only where the samples pass the maturity gate "
             "(the sampled EMA holds < 1% of its initial weights and the baseline's conditional samples reach "
             "a class accuracy >= 0.6 with SE < 2 points); otherwise **not testable at this scale**. A claim "
             "whose design has no runs at this scale is **not run at this scale**; **inconclusive** = a control "
             "or input the rule needs is missing. This is a small-scale check: a claim that is underpowered or "
             "does not hold here may still hold at ImageNet scale.", "",
             "| claim | verdict | summary |", "|---|---|---|"]
    lines += [f"| {v.claim}: {CLAIMS[v.claim]} | **{v.verdict}** | {v.summary} |" for v in verdicts]
    lines.append("")
    for v in verdicts:
        lines += [f"## {v.claim}: {CLAIMS[v.claim]}", "", f"**Verdict: {v.verdict}.** {v.summary}.", ""]
        lines += [f"- {d}" for d in v.details]
        lines += ["", f"Rule: {rule_text(v.claim)}", ""]
        lines += [f"![{v.claim}]({f})" for f in v.figures if f in figures]
        lines.append("")
    lines += _arms_section(tb)
    return "\n".join(lines) + "\n"


def _fmt(mean: float, sd: float, scale: float = 1.0, spec: str = ".2f") -> str:
    if math.isnan(mean):
        return ""
    return f"{scale * mean:{spec}}" + ("" if math.isnan(sd) else f" +- {scale * sd:{spec}}")


def _cell(r: pd.Series, col: str, scale: float = 1.0, spec: str = ".2f") -> str:
    """``mean +- SD`` of an arm-table column (blank when not measured)."""
    return _fmt(r.get(f"{col}_mean", math.nan), r.get(f"{col}_std", math.nan), scale, spec)


def _arms_section(tb: StudyTables) -> list[str]:
    """Every arm's final numbers (mean +- SD over seeds) and the teacher-EMA sensitivity."""
    if tb.quality.empty and tb.curves is None:
        return []
    arms = arm_table(tb)
    metric = arms.attrs["metric"]
    lines = ["## Every arm at its final checkpoint", "",
             "Mean +- SD over training seeds (SD blank with one seed). Teacher / student: the curves' cells "
             f"(student = online block {tb.cells.get('student_block')} at t={tb.cells.get('t_student')}, teacher = "
             f"EMA block {tb.cells.get('teacher_block')} at t={tb.cells.get('t_teacher')}).", "",
             ("Beside every fd: the class accuracy of its conditional samples by the dataset's classifier (chance "
              "0.10) and the share of its initial weights the sampled EMA still holds (decay ** step): an fd of "
              "samples that ignore their labels, or of weights that are mostly initialisation, is not a "
              "generation result."), "",
             ("The online weights' final " + metric + " (same sampler and samples) is the cross-check beside the "
              "EMA's: an EMA that lags, or is still its initialisation, shows as a gap between the two."), "",
             f"| arm | seeds | final {metric} (EMA) | online weights | class acc | EMA init weights (%) | "
             "teacher acc (%) | student acc (%) |",
             "|---|---|---|---|---|---|---|---|"]
    for _, r in arms.iterrows():
        lines.append(f"| {r['arm']} | {r['seeds']} | {_cell(r, 'metric_value')} | {_cell(r, 'online_value')} | "
                     f"{_cell(r, 'class_acc')} | {_cell(r, 'init_fraction', 100, '.3g')} | {_cell(r, 'teacher_acc')} | "
                     f"{_cell(r, 'student_acc')} |")
    lines.append("")
    ema = ema_sensitivity(tb)
    if ema:
        lines += ["## SRA's teacher EMA (SRA App. F: the result depends on it)", "",
                  "Each SRA teacher (= EMA) decay against the baseline at the same decay (the decay is also that of the "
                  "sampled EMA), 95% interval over seeds (paired where the arms share seeds); the verdicts above "
                  "use the study's default decay.", ""]
        lines += [f"- {e}" for e in ema] + [""]
    return lines


def write_report(tables: StudyTables, figures: str | os.PathLike, tables_dir: str | os.PathLike) -> Path:
    """``<figures>/REPORT.md``: one section per claim with its figure, numbers and verdict."""
    figures = Path(figures)
    present = {p.name for p in figures.glob("*.png")} if figures.is_dir() else set()
    text = render_report(tables, check_claims(tables), present, machine_description(), str(tables_dir))
    return atomic_write_text(figures / "REPORT.md", text)
