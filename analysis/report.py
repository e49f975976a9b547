"""``REPORT.md`` as text: one section per claim with its verdict, numbers, rule and figures."""

from __future__ import annotations

from collections.abc import Collection, Sequence

from .claims import CLAIMS, Verdict, rule_text
from .tables import StudyTables

__all__ = ["render_report"]


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
             f"Compute time of the study (s, summed over {study.get('sessions', 1)} session(s), installation "
             "not included): " + ", ".join(f"{k} {v:.0f}" for k, v in tim.items()) + ".", "",
             f"Verdicts are computed by `analysis/claims.py` from the tables in `{tables_dir}`; the rule for each "
             "claim is stated below. Comparisons of arms (C3, C4, C6, C7) are made over training seeds: "
             "**held** = the 95% interval is above zero, **did not hold** = it excludes the claimed effect, "
             "**underpowered at this scale** = it contains both zero and the claimed effect, or there is one "
             "seed per arm (the run-to-run spread is then unmeasured). This is a small-scale check: a claim "
             "that is underpowered or does not hold here may still hold at ImageNet scale.", "",
             "| claim | verdict | summary |", "|---|---|---|"]
    lines += [f"| {v.claim}: {CLAIMS[v.claim]} | **{v.verdict}** | {v.summary} |" for v in verdicts]
    lines.append("")
    for v in verdicts:
        lines += [f"## {v.claim}: {CLAIMS[v.claim]}", "", f"**Verdict: {v.verdict}.** {v.summary}.", ""]
        lines += [f"- {d}" for d in v.details]
        lines += ["", f"Rule: {rule_text(v.claim)}", ""]
        lines += [f"![{v.claim}]({f})" for f in v.figures if f in figures]
        lines.append("")
    return "\n".join(lines) + "\n"
