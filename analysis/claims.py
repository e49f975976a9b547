"""The papers' representation claims (C1-C7), judged from a study's tables.

Each ``check_cN`` takes a study's :class:`~analysis.tables.StudyTables` and returns a
:class:`Verdict`: ``held``, ``did not hold`` or ``inconclusive`` plus the numbers behind it. The
rules are stated in each docstring and in the report; the margins use the binomial standard error
of a probe accuracy on the test split, so a difference smaller than the noise is not called a win.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import stats

from .correlation import correlate
from .tables import StudyTables, accuracy_grid

__all__ = ["Verdict", "check_claims", "CLAIMS", "RULES", "rule_text"]

CLAIMS = {
    "C1": "Probe accuracy rises with depth, peaks mid-depth, then falls (SRA Fig. 2 right)",
    "C2": "Lower noise gives better representations (SRA Fig. 2)",
    "C3": "SRA improves probe accuracy across blocks and timesteps over the baseline (SRA Fig. 7a,b)",
    "C4": "The teacher's probe accuracy exceeds the student's and both rise over training (SRA Fig. 7d)",
    "C5": "Generation quality tracks the probe accuracy of the teacher layer used for alignment (SRA Fig. 7c)",
    "C6": "DiverseDiT lowers inter-block similarity and improves generation",
    "C7": "SRA reaches a given generation quality sooner than the baseline at equal wall-clock (SRA Fig. 4)",
}


@dataclass
class Verdict:
    claim: str
    verdict: str  # "held" | "did not hold" | "inconclusive"
    summary: str
    details: list[str] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)


def _se_points(p: float, n: int) -> float:
    """Binomial standard error of an accuracy, in points."""
    return 100 * math.sqrt(max(p * (1 - p), 1e-4) / max(n, 1))


def check_c1(tb: StudyTables) -> Verdict:
    """Profile = accuracy per transformer block averaged over t (baseline, EMA). Held if the peak is at
    an inner block and beats both the first and the last block by more than 2 standard errors. The
    input embedding (block 0) is the floor reported next to it, not part of the profile."""
    lg = tb.layer_grid
    run = "baseline" if "baseline" in set(lg["run"]) else sorted(set(lg["run"]))[0]
    full = accuracy_grid(lg, run)
    g = full[full.index >= 1]
    prof = 100 * g.mean(axis=1)
    n = int(lg["n_test"].iloc[0])
    margin = 2 * _se_points(prof.max() / 100, n)
    peak = int(prof.idxmax())
    first, last = int(prof.index[0]), int(prof.index[-1])
    per_t = {f"{t:g}": int(g[t].idxmax()) for t in g.columns}
    details = [f"{run} accuracy by block (mean over t): " + ", ".join(f"{b}: {v:.1f}%" for b, v in prof.items()),
               f"peak block per t: {per_t}", f"margin (2 SE): {margin:.1f} pts"]
    if 0 in full.index:
        floor = 100 * float(full.loc[0].mean())
        details.insert(1, f"input embedding (block 0, the floor): {floor:.1f}%; best block adds "
                          f"{prof.max() - floor:+.1f} pts over what the input alone gives")
    inner = first < peak < last
    if inner and prof[peak] - prof[last] > margin and prof[peak] - prof[first] > margin:
        v, s = "held", f"peak at block {peak} of {last} ({prof[peak]:.1f}%), above block 1 ({prof[first]:.1f}%) and block {last} ({prof[last]:.1f}%)"
    elif peak == last or (prof[peak] - prof[last] <= margin and prof[last] - prof[first] > margin):
        v, s = "did not hold", f"accuracy keeps rising to the last block ({prof[last]:.1f}% at block {last}, peak {prof[peak]:.1f}% at block {peak}): no mid-depth peak at this scale"
    else:
        v, s = "inconclusive", f"peak at block {peak} ({prof[peak]:.1f}%) but within noise of the ends ({prof[first]:.1f}%, {prof[last]:.1f}%)"
    return Verdict("C1", v, s, details, [f"layer_grid_{run}.png", "accuracy_vs_block.png"])


def check_c2(tb: StudyTables) -> Verdict:
    """Per block, Spearman rho between log-SNR and accuracy across t. Held if the median rho > 0.5
    and the least-noisy t beats the noisiest t by more than 2 SE in at least 3/4 of the blocks."""
    lg = tb.layer_grid
    run = "baseline" if "baseline" in set(lg["run"]) else sorted(set(lg["run"]))[0]
    df = lg[lg["run"] == run]
    n = int(df["n_test"].iloc[0])
    rhos, wins = [], []
    for b, d in df.groupby("block"):
        d = d.sort_values("log_snr")
        rhos.append(stats.spearmanr(d["log_snr"], d["accuracy"]).statistic if len(d) > 2 else np.nan)
        lo, hi = d["accuracy"].iloc[-1], d["accuracy"].iloc[0]  # least noisy, noisiest
        wins.append(100 * (lo - hi) > 2 * _se_points(lo, n))
    if not np.isfinite(rhos).any():
        return Verdict("C2", "inconclusive", f"needs at least 3 timesteps per block, got {df['t'].nunique()}",
                       [], [f"layer_grid_{run}.png"])
    med, frac = float(np.nanmedian(rhos)), float(np.mean(wins))
    details = ["Spearman rho(log-SNR, accuracy) per block: " + ", ".join(f"{r:.2f}" for r in rhos),
               f"blocks where the least-noisy t beats the noisiest by > 2 SE: {frac:.0%}"]
    if med > 0.5 and frac >= 0.75:
        v, s = "held", f"accuracy increases as noise decreases (median rho {med:.2f}; {frac:.0%} of blocks)"
    elif med < 0:
        v, s = "did not hold", f"accuracy does not increase with lower noise (median rho {med:.2f})"
    else:
        v, s = "inconclusive", f"weak trend (median rho {med:.2f}; {frac:.0%} of blocks clearly better at low noise)"
    return Verdict("C2", v, s, details, [f"layer_grid_{run}.png"])


def check_c3(tb: StudyTables) -> Verdict:
    """SRA - baseline accuracy over all (block, t) cells of the transformer blocks (block 0, the input
    embedding, excluded). Held if the mean gain exceeds 1 SE and at least 2/3 of the cells improve
    (sign test p reported); did not hold if the mean is below -1 SE."""
    lg = tb.layer_grid[tb.layer_grid["block"] >= 1]
    if not {"sra", "baseline"} <= set(lg["run"]):
        return Verdict("C3", "inconclusive", "needs a baseline and an SRA run")
    diff = 100 * (accuracy_grid(lg, "sra") - accuracy_grid(lg, "baseline"))
    vals = diff.values.ravel()
    vals = vals[np.isfinite(vals)]
    n = int(lg["n_test"].iloc[0])
    se = _se_points(float(lg["accuracy"].mean()), n)
    pos = int((vals > 0).sum())
    p = stats.binomtest(pos, len(vals), 0.5).pvalue
    mean = float(vals.mean())
    details = [f"mean difference {mean:+.2f} pts over {len(vals)} cells; {pos}/{len(vals)} cells improve "
               f"(sign test p = {p:.3g}); one cell's SE ~ {se:.1f} pts",
               "per block (mean over t): " + ", ".join(f"{b}: {v:+.1f}" for b, v in diff.mean(axis=1).items())]
    if mean > se and pos >= 2 * len(vals) / 3:
        v, s = "held", f"SRA is better on {pos}/{len(vals)} cells, mean {mean:+.1f} pts"
    elif mean < -se:
        v, s = "did not hold", f"SRA is worse on average ({mean:+.1f} pts; {pos}/{len(vals)} cells better)"
    else:
        v, s = "inconclusive", f"difference within noise (mean {mean:+.1f} pts; {pos}/{len(vals)} cells better)"
    return Verdict("C3", v, s, details, ["sra_minus_baseline.png", "sra_vs_baseline_blocks.png"])


def check_c4(tb: StudyTables) -> Verdict:
    """SRA run: teacher (EMA, k_t, lower t) minus student (online, k_s, t) accuracy per checkpoint;
    held if the teacher leads at >= 3/4 of the checkpoints and both have Spearman(step, acc) > 0."""
    cur = tb.curves
    run = "sra" if "sra" in set(cur["run"]) else sorted(set(cur["run"]))[0]
    d = cur[cur["run"] == run].pivot_table(index="step", columns="role", values="accuracy").sort_index()
    gap = 100 * (d["teacher"] - d["student"])
    lead = float((gap > 0).mean())
    rho_s = stats.spearmanr(d.index, d["student"]).statistic if len(d) > 2 else float(np.sign(d["student"].diff().iloc[-1]))
    rho_t = stats.spearmanr(d.index, d["teacher"]).statistic if len(d) > 2 else float(np.sign(d["teacher"].diff().iloc[-1]))
    details = [f"{run}: steps {list(d.index)}", "student accuracy: " + ", ".join(f"{100 * a:.1f}%" for a in d["student"]),
               "teacher accuracy: " + ", ".join(f"{100 * a:.1f}%" for a in d["teacher"]),
               "teacher - student: " + ", ".join(f"{g:+.1f}" for g in gap),
               f"Spearman(step, accuracy): student {rho_s:.2f}, teacher {rho_t:.2f}"]
    both_rise = rho_s > 0 and rho_t > 0
    if lead >= 0.75 and both_rise:
        v, s = "held", f"teacher leads at {lead:.0%} of checkpoints (final gap {gap.iloc[-1]:+.1f} pts) and both rise"
    elif lead <= 0.25:
        v, s = "did not hold", f"the student matches or beats the teacher ({lead:.0%} of checkpoints led by the teacher)"
    else:
        v, s = "inconclusive", f"teacher leads at {lead:.0%} of checkpoints; rising: student {rho_s:.2f}, teacher {rho_t:.2f}"
    return Verdict("C4", v, s, details, ["teacher_vs_student.png"])


def check_c5(tb: StudyTables) -> Verdict:
    """Across all checkpoints of all runs: Spearman between teacher-cell accuracy and fd (lower fd =
    better, so the claim predicts a negative rho). Held if rho <= -0.5 with its bootstrap CI below
    0; the partial correlation controlling for the step says whether it is more than training time."""
    quality = tb.quality
    metric = quality["metric"].iloc[0]
    tab = correlate(100 * quality["accuracy"], quality[metric], control=quality["step"], n_boot=1000)
    row = tab.set_index("method")
    sp = row.loc["spearman"]
    part = row.loc["partial_spearman"] if "partial_spearman" in row.index else None
    details = [f"{len(quality)} checkpoints ({', '.join(sorted(set(quality['run'])))})",
               f"Spearman rho = {sp['r']:.2f} [{sp['ci_low']:.2f}, {sp['ci_high']:.2f}]"
               + (f"; partial (controlling for step) = {part['r']:.2f} [{part['ci_low']:.2f}, {part['ci_high']:.2f}]"
                  if part is not None else "")]
    if sp["r"] <= -0.5 and sp["ci_high"] < 0:
        extra = "" if part is None or part["ci_high"] < 0 else "; not beyond what training progress explains (partial CI includes 0)"
        v, s = "held", f"better probes go with lower {metric} (rho {sp['r']:.2f}){extra}"
    elif sp["r"] >= 0.5 and sp["ci_low"] > 0:
        v, s = "did not hold", f"higher probe accuracy goes with *worse* {metric} (rho {sp['r']:.2f})"
    else:
        v, s = "inconclusive", f"no clear relation (rho {sp['r']:.2f}, CI [{sp['ci_low']:.2f}, {sp['ci_high']:.2f}])"
    return Verdict("C5", v, s, details, ["probe_vs_quality.png"])


def _fd_noise(quality: pd.DataFrame, metric: str, *rows: pd.Series) -> float:
    """2 x the standard error of a difference of fd values (0 when no SE was recorded)."""
    se = [float(r.get(f"{metric}_se", np.nan)) for r in rows]
    se = [v for v in se if np.isfinite(v)]
    return 2 * math.sqrt(sum(v * v for v in se)) if se else 0.0


def check_c6(tb: StudyTables) -> Verdict:
    """Final checkpoints: DiverseDiT vs baseline on mean off-diagonal CKA (EMA) and fd. Held if the CKA
    is lower and fd is lower by more than 2 SE of the difference; did not hold if the CKA is not lower
    and fd is not lower; otherwise inconclusive."""
    quality = tb.quality
    sims = tb.curves_similarity
    if sims is None or not {"diverse", "baseline"} <= set(sims["run"]):
        return Verdict("C6", "inconclusive", "needs a baseline and a DiverseDiT run")
    last = sims.sort_values("step").groupby("run").tail(1).set_index("run")
    metric = quality["metric"].iloc[0]
    final = quality.sort_values("step").groupby("run").tail(1).set_index("run")
    cka_b, cka_d = last.loc["baseline", "cka_mean_offdiag"], last.loc["diverse", "cka_mean_offdiag"]
    fd_b, fd_d = final.loc["baseline", metric], final.loc["diverse", metric]
    noise = _fd_noise(quality, metric, final.loc["baseline"], final.loc["diverse"])
    lower_sim, better_gen, worse_gen = cka_d < cka_b, fd_d < fd_b - noise, fd_d > fd_b + noise
    details = [f"mean off-diagonal CKA (EMA, final): baseline {cka_b:.3f}, diverse {cka_d:.3f}",
               f"{metric} (final): baseline {fd_b:.2f}, diverse {fd_d:.2f}; 2 SE of the difference {noise:.2f}"]
    gen = "better" if better_gen else ("worse" if worse_gen else "the same within noise")
    if lower_sim and better_gen:
        v, s = "held", f"lower inter-block CKA ({cka_d:.2f} vs {cka_b:.2f}) and better {metric} ({fd_d:.2f} vs {fd_b:.2f})"
    elif not lower_sim and not better_gen:
        v, s = "did not hold", f"inter-block CKA not lower ({cka_d:.2f} vs {cka_b:.2f}) and {metric} {gen}"
    else:
        v, s = "inconclusive", (f"inter-block CKA {'lower' if lower_sim else 'not lower'} ({cka_d:.2f} vs {cka_b:.2f}) "
                                f"but {metric} {gen} ({fd_d:.2f} vs {fd_b:.2f} +- {noise:.2f})")
    return Verdict("C6", v, s, details, ["cka_blocks_by_run.png", "cka_offdiag_over_training.png"])


def _time_to_reach(df: pd.DataFrame, metric: str, target: float) -> float | None:
    d = df.sort_values("train_seconds")
    prev = None
    for _, r in d.iterrows():
        if r[metric] <= target:
            if prev is None:
                return float(r["train_seconds"])
            f = (prev[metric] - target) / max(prev[metric] - r[metric], 1e-12)
            return float(prev["train_seconds"] + f * (r["train_seconds"] - prev["train_seconds"]))
        prev = r
    return None


def check_c7(tb: StudyTables) -> Verdict:
    """Target = the baseline's final fd plus 2 SE of a difference (what cannot be told apart from it).
    Held if SRA reaches it in < 0.9x the training time the baseline needed, did not hold if it needs
    > 1.1x or never reaches it (linear interpolation between checkpoints; same machine, measured
    steps/s); inconclusive in between."""
    quality = tb.quality
    metric = quality["metric"].iloc[0]
    if not {"sra", "baseline"} <= set(quality["run"]):
        return Verdict("C7", "inconclusive", "needs a baseline and an SRA run")
    base = quality[quality["run"] == "baseline"].sort_values("step")
    sra = quality[quality["run"] == "sra"].sort_values("step")
    noise = _fd_noise(quality, metric, base.iloc[-1], sra.iloc[-1])
    target = float(base[metric].iloc[-1])
    t_base = float(base["train_seconds"].iloc[-1])
    t_sra = _time_to_reach(sra, metric, target + noise)
    details = [f"target {metric} = baseline's final {target:.2f} (+ {noise:.2f} noise allowance), reached after "
               f"{t_base:.0f} s of training",
               "SRA: " + ", ".join(f"{s:.0f} s -> {f:.2f}" for s, f in zip(sra["train_seconds"], sra[metric])),
               "baseline: " + ", ".join(f"{s:.0f} s -> {f:.2f}" for s, f in zip(base["train_seconds"], base[metric]))]
    if t_sra is not None and t_sra < 0.9 * t_base:
        v, s = "held", f"SRA reaches {metric} {target:.2f} after {t_sra:.0f} s vs {t_base:.0f} s for the baseline"
    elif t_sra is None or t_sra > 1.1 * t_base:
        v, s = "did not hold", ("SRA does not reach the baseline's final quality within this budget" if t_sra is None
                                else f"SRA needs {t_sra:.0f} s vs {t_base:.0f} s for the baseline")
    else:
        v, s = "inconclusive", f"within 10% ({t_sra:.0f} s vs {t_base:.0f} s)"
    return Verdict("C7", v, s, details, ["quality_vs_time.png"])


RULES = {"C1": check_c1, "C2": check_c2, "C3": check_c3, "C4": check_c4, "C5": check_c5, "C6": check_c6,
         "C7": check_c7}


def rule_text(claim: str) -> str:
    """The rule of a claim as stated in its check's docstring (one line)."""
    return " ".join((RULES[claim].__doc__ or "").split())


def check_claims(tb: StudyTables) -> list[Verdict]:
    return [rule(tb) for rule in RULES.values()]
