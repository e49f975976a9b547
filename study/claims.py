"""The papers' representation claims (C1-C7), judged from a study's tables.

Each ``check_cN`` takes a study's :class:`~repdyn.study.tables.StudyTables` and returns a
:class:`Verdict`: ``held``, ``did not hold``, ``underpowered at this scale`` or ``inconclusive``
plus the numbers behind it. The rules are stated in each docstring and in the report. Claims about
arms (and C1 when the baseline has several seeds) are judged over training seeds
(:mod:`repdyn.study.power`); a single model's claims use the binomial standard error of a probe
accuracy on the test split, so a difference smaller than the noise is not called a win.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import stats

from repdyn.study.power import UNDERPOWERED, Comparison, arm_of, compare, judge
from repdyn.study.tables import StudyTables, accuracy_grid

__all__ = ["Verdict", "check_claims", "CLAIMS", "RULES", "rule_text", "EFFECTS", "c5_points", "C5_FIGURE"]

CLAIMS = {
    "C1": "Probe accuracy rises with depth, peaks mid-depth, then falls (SRA Fig. 2 right)",
    "C2": "Lower noise gives better representations (SRA Fig. 2)",
    "C3": "SRA improves probe accuracy across blocks and timesteps over the baseline (SRA Fig. 7a,b)",
    "C4": "The teacher's probe accuracy exceeds the student's and both rise over training (SRA Fig. 7d)",
    "C5": "Generation quality tracks the probe accuracy of the teacher layer used for alignment (SRA Fig. 7c)",
    "C6": "DiverseDiT lowers inter-block similarity and improves generation",
    "C7": "SRA reaches a given generation quality sooner than the baseline at equal compute (SRA Fig. 4)",
}


@dataclass
class Verdict:
    claim: str
    verdict: str  # "held" | "did not hold" | "inconclusive" | "underpowered at this scale"
    summary: str
    details: list[str] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)


def _se_points(p: float, n: int) -> float:
    """Binomial standard error of an accuracy, in points."""
    return 100 * math.sqrt(max(p * (1 - p), 1e-4) / max(n, 1))


def _baseline_runs(lg: pd.DataFrame) -> list[str]:
    """The baseline's layer-grid runs (one per training seed), or the first run when none is a baseline."""
    runs = sorted(set(lg["run"]))
    base = [r for r in runs if arm_of(r) == "baseline"]
    return base or runs[:1]


def _profile(grid: pd.DataFrame) -> pd.Series:
    """Accuracy (points) per transformer block of a (block x t) grid, mean over t (block 0, the
    floor, excluded)."""
    return 100 * grid[grid.index >= 1].mean(axis=1)


def check_c1(tb: StudyTables) -> Verdict:
    """Profile = accuracy per transformer block averaged over t (baseline, EMA); the peak is the
    block with the best mean profile. With >= 2 baseline training seeds the rule is over seeds:
    held if the peak is an inner block and its per-seed lead over block 1 and over the last block
    both have 95% intervals above 0; did not hold if the peak is an end block and the other end is
    below it (interval above 0: a monotone profile); otherwise underpowered (with the detectable
    lead). With one seed the noise is the probe's test-set binomial error (2 SE margins) and the
    verdict is about that model only. The input embedding (block 0) is the floor reported beside it."""
    lg = tb.layer_grid
    runs = _baseline_runs(lg)
    grids = {r: accuracy_grid(lg, r) for r in runs}
    profs = pd.DataFrame({r: _profile(g) for r, g in grids.items()})
    prof = profs.mean(axis=1)
    peak = int(prof.idxmax())
    first, last = int(prof.index[0]), int(prof.index[-1])
    blocks = grids[runs[0]][grids[runs[0]].index >= 1]
    per_t = {f"{t:g}": int(blocks[t].idxmax()) for t in blocks.columns}
    what = f"{len(runs)} seeds" if len(runs) > 1 else runs[0]
    details = [f"baseline accuracy by block (mean over t, {what}): "
               + ", ".join(f"{b}: {v:.1f}%" for b, v in prof.items()),
               f"peak block per t ({runs[0]}): {per_t}"]
    floor = [100 * float(g.loc[0].mean()) for g in grids.values() if 0 in g.index]
    if floor:
        details.insert(1, f"input embedding (block 0, the floor): {np.mean(floor):.1f}%; best block adds "
                          f"{prof.max() - np.mean(floor):+.1f} pts over what the input alone gives")
    figs = [f"layer_grid_{runs[0]}.png", "accuracy_vs_block.png"]
    shape = (f"peak at block {peak} of {last} ({prof[peak]:.1f}%), block 1 {prof[first]:.1f}%, "
             f"block {last} {prof[last]:.1f}%")
    if len(runs) > 1:
        lead_first = compare(profs.loc[peak] - profs.loc[first])
        lead_last = compare(profs.loc[peak] - profs.loc[last])
        details += [f"peak - block 1 per seed: {lead_first.text(' pts')}",
                    f"peak - block {last} per seed: {lead_last.text(' pts')}"]
        if first < peak < last and lead_first.ci_low > 0 and lead_last.ci_low > 0:
            return Verdict("C1", "held", shape + ": both leads above 0 over seeds", details, figs)
        if peak in (first, last):
            other = last if peak == first else first
            drop = compare(profs.loc[peak] - profs.loc[other])
            if drop.ci_low > 0:
                trend = "keeps rising to the last block" if peak == last else "falls from block 1"
                return Verdict("C1", "did not hold", f"accuracy {trend} ({shape}; lead "
                               f"{drop.diff:+.1f} pts, 95% CI [{drop.ci_low:+.1f}, {drop.ci_high:+.1f}] over "
                               "seeds): no mid-depth peak at this scale", details, figs)
        mde = max(lead_first.mde, lead_last.mde)
        return Verdict("C1", UNDERPOWERED, f"{shape}: the seed spread (detectable lead ~{mde:.1f} pts) does not "
                       "separate the peak from the ends", details, figs)
    n = int(lg["n_test"].iloc[0])
    margin = 2 * _se_points(prof.max() / 100, n)
    details.append(f"margin (2 SE, one model's test-set noise): {margin:.1f} pts")
    if first < peak < last and prof[peak] - prof[last] > margin and prof[peak] - prof[first] > margin:
        return Verdict("C1", "held", shape, details, figs)
    if peak == last or (prof[peak] - prof[last] <= margin and prof[last] - prof[first] > margin):
        return Verdict("C1", "did not hold", f"accuracy keeps rising to the last block ({shape}): no mid-depth "
                       "peak at this scale", details, figs)
    return Verdict("C1", "inconclusive", f"{shape}: the peak is within noise of the ends", details, figs)


def _c2_one(df: pd.DataFrame) -> tuple[float, float]:
    """(median over blocks of Spearman rho(log-SNR, accuracy), share of blocks whose least-noisy t
    beats the noisiest by > 2 SE) for one run's grid."""
    n = int(df["n_test"].iloc[0])
    rhos, wins = [], []
    for _, d in df.groupby("block"):
        d = d.sort_values("log_snr")
        rhos.append(stats.spearmanr(d["log_snr"], d["accuracy"]).statistic if len(d) > 2 else np.nan)
        lo, hi = d["accuracy"].iloc[-1], d["accuracy"].iloc[0]  # least noisy, noisiest
        wins.append(100 * (lo - hi) > 2 * _se_points(lo, n))
    return (float(np.nanmedian(rhos)) if np.isfinite(rhos).any() else math.nan), float(np.mean(wins))


def check_c2(tb: StudyTables) -> Verdict:
    """Per block, Spearman rho between log-SNR and accuracy across t. Held if the median rho > 0.5
    and the least-noisy t beats the noisiest t by more than 2 SE in at least 3/4 of the blocks, in
    every baseline training seed; did not hold if the median rho is negative in every seed."""
    lg = tb.layer_grid
    runs = _baseline_runs(lg)
    figs = [f"layer_grid_{runs[0]}.png"]
    if lg[lg["run"] == runs[0]]["t"].nunique() < 3:
        return Verdict("C2", "inconclusive", f"needs at least 3 timesteps per block, got "
                       f"{lg[lg['run'] == runs[0]]['t'].nunique()}", [], figs)
    per_run = {r: _c2_one(lg[lg["run"] == r]) for r in runs}
    details = [f"{r}: median Spearman rho(log-SNR, accuracy) over blocks {m:.2f}; least-noisy t beats the noisiest "
               f"by > 2 SE in {f:.0%} of blocks" for r, (m, f) in per_run.items()]
    meds = [m for m, _ in per_run.values()]
    seeds = f" in all {len(runs)} seeds" if len(runs) > 1 else ""
    if all(m > 0.5 and f >= 0.75 for m, f in per_run.values()):
        return Verdict("C2", "held", f"accuracy increases as noise decreases{seeds} (median rho "
                       f"{min(meds):.2f} to {max(meds):.2f})", details, figs)
    if all(m < 0 for m in meds):
        return Verdict("C2", "did not hold", f"accuracy does not increase with lower noise{seeds} (median rho "
                       f"{max(meds):.2f} at most)", details, figs)
    return Verdict("C2", "inconclusive", f"weak or mixed trend (median rho {min(meds):.2f} to {max(meds):.2f})",
                   details, figs)


# The smallest effect that counts as each arm claim, in the rule's units. The papers give their
# effects as figures (SRA Fig. 4, 7; DiverseDiT tables) whose values the text does not state, so
# these are the project's reading: an effect below them would not support the claim as worded.
EFFECTS = {
    "C3": 1.0,  # SRA - baseline probe accuracy, mean over transformer-block cells (points)
    "C4": 1.0,  # teacher - student probe accuracy at the final checkpoint (points)
    "C5": 0.6,  # -Spearman(baseline accuracy at block k, fd of the SRA run aligned to block k)
    "C6": 0.05,  # relative fd reduction of DiverseDiT vs baseline at the final checkpoint (5%)
    "C7": 0.10,  # relative compute saved by SRA to reach the baseline's final fd (10%)
}


def _by_arm(frame: pd.DataFrame, value: str, arms: Sequence[str]) -> dict[str, pd.Series]:
    """Per-seed values of ``value`` for each arm (rows already reduced to one per run)."""
    arm = frame["run"].map(arm_of)
    return {a: frame.loc[arm == a].set_index("run")[value] for a in arms}


def _verdict_text(verdict: str, what: str, c: Comparison, unit: str, claimed: float) -> str:
    if verdict == UNDERPOWERED and not math.isfinite(c.se):
        return (f"{what}: {c.diff:+.2f}{unit} with one training seed per arm -- the run-to-run spread is not "
                f"measured, so neither {claimed:g}{unit} (the claim) nor 0 can be ruled out")
    return f"{what}: {c.text(unit)}; claimed >= {claimed:g}{unit}"


def check_c3(tb: StudyTables) -> Verdict:
    """Per training seed: mean SRA - baseline probe accuracy over the transformer-block cells (block 0,
    the input embedding, excluded), compared over seeds (Welch 95% CI). Held if the CI is above 0;
    did not hold if it excludes the claimed +1 point; otherwise underpowered (with the detectable
    effect)."""
    lg = tb.layer_grid[tb.layer_grid["block"] >= 1]
    per_run = lg.groupby("run", as_index=False)["accuracy"].mean().assign(accuracy=lambda d: 100 * d["accuracy"])
    arms = _by_arm(per_run, "accuracy", ("sra", "baseline"))
    if arms["sra"].empty or arms["baseline"].empty:
        return Verdict("C3", UNDERPOWERED, "needs baseline and SRA layer grids")
    c = compare(arms["sra"], arms["baseline"])
    v = judge(c, EFFECTS["C3"])
    b0, s0 = arms["baseline"].index[0], arms["sra"].index[0]
    diff = 100 * (accuracy_grid(lg, s0) - accuracy_grid(lg, b0))
    details = ["mean accuracy over cells, per run: " + ", ".join(f"{r} {a:.1f}%" for r, a in per_run.values),
               f"{s0} - {b0} per block (mean over t): " + ", ".join(f"{b}: {x:+.1f}" for b, x in
                                                                 diff.mean(axis=1).items()),
               f"{(diff.values > 0).sum()}/{diff.size} cells better for SRA ({s0} vs {b0})"]
    return Verdict("C3", v, _verdict_text(v, "SRA - baseline probe accuracy", c, " pts", EFFECTS["C3"]), details,
                   ["sra_minus_baseline.png", "sra_vs_baseline_blocks.png"])


def check_c4(tb: StudyTables) -> Verdict:
    """SRA runs: teacher (EMA, k_t, lower t) minus student (online, k_s, t) accuracy at the final
    checkpoint, one value per training seed (one-sample 95% CI). Held if the CI is above 0 and both
    rise over training (Spearman(step, accuracy) > 0, mean over seeds); did not hold if the CI
    excludes the claimed +1 point; otherwise underpowered."""
    cur = tb.curves[tb.curves["run"].map(arm_of) == "sra"]
    if cur.empty:
        return Verdict("C4", UNDERPOWERED, "needs an SRA run's curves")
    gaps, rises, details = [], [], []
    for run, d in cur.groupby("run"):
        d = d.pivot_table(index="step", columns="role", values="accuracy").sort_index()
        gap = 100 * (d["teacher"] - d["student"])
        gaps.append(float(gap.iloc[-1]))
        rho = [stats.spearmanr(d.index, d[r]).statistic if len(d) > 2 else float(np.sign(d[r].diff().iloc[-1]))
               for r in ("student", "teacher")]
        rises.append(rho)
        details.append(f"{run}: teacher - student per checkpoint " + ", ".join(f"{g:+.1f}" for g in gap)
                       + f"; Spearman(step, acc) student {rho[0]:.2f}, teacher {rho[1]:.2f}")
    c = compare(gaps)
    v = judge(c, EFFECTS["C4"])
    both_rise = bool(np.mean(rises, axis=0).min() > 0)
    if v == "held" and not both_rise:
        v = "did not hold"
        details.append("the teacher leads, but the accuracies do not both rise over training")
    return Verdict("C4", v, _verdict_text(v, "final teacher - student accuracy", c, " pts", EFFECTS["C4"]), details,
                   ["teacher_vs_student.png"])


def _accuracy_at_t(grid: pd.DataFrame, t: float | None) -> tuple[pd.Series, str]:
    """Accuracy (points) per block at time ``t``, linear in t between the grid's two nearest times
    (mean over seeds); the mean over the grid's t when ``t`` is unknown or outside the grid."""
    g = 100 * grid.pivot_table(index="block", columns="t", values="accuracy").sort_index()
    ts = np.asarray(g.columns, dtype=float)
    if t is None or not (ts.min() <= t <= ts.max()):
        return g.mean(axis=1), "mean over the grid's t"
    return g.apply(lambda row: float(np.interp(t, ts, row.to_numpy())), axis=1), f"at the teacher's t = {t:g}"


C5_FIGURE = "probe_vs_quality_by_teacher_block.png"


def c5_points(tb: StudyTables) -> pd.DataFrame | None:
    """SRA App. I's points: one row per SRA run (``sra-kt<k>`` and the default ``sra``) with its
    teacher block ``k``, the final baseline's accuracy at block k (``baseline_accuracy``, points)
    and the run's final generation metric (``value``; ``attrs['metric']`` names it). None without
    a baseline layer grid or evaluated SRA runs."""
    q, lg = tb.quality, tb.layer_grid
    if q.empty or lg is None or "baseline" not in set(lg["run"].map(arm_of)):
        return None
    kt_default = tb.cells.get("teacher_block")
    final = q.sort_values("step").groupby("run").tail(1)
    metric = final["metric"].iloc[0]

    def block_of(run: str) -> int | None:
        a = arm_of(run)
        return int(a[len("sra-kt"):]) if a.startswith("sra-kt") else (kt_default if a == "sra" else None)

    acc, at = _accuracy_at_t(lg[lg["run"].map(arm_of) == "baseline"], tb.cells.get("t_teacher"))
    final = final.assign(k=final["run"].map(block_of)).dropna(subset=["k"])
    final = final[final["k"].astype(int).isin(acc.index)].assign(k=lambda d: d["k"].astype(int))
    if final.empty:
        return None
    pts = pd.DataFrame({"run": final["run"].to_numpy(), "k": final["k"].to_numpy(),
                        "baseline_accuracy": acc.loc[final["k"]].to_numpy(), "value": final[metric].to_numpy()})
    pts.attrs.update(metric=metric, at=at)
    return pts


def check_c5(tb: StudyTables) -> Verdict:
    """As SRA App. I (Fig. 7c): SRA runs aligned to different teacher blocks k (``sra-kt<k>`` runs and
    the default ``sra``), x = probe accuracy of the final baseline EMA at block k at the teacher's mean
    t (interpolated between grid times; mean over baseline seeds), y = each run's final fd (mean over
    seeds). Held if Spearman(x, y) < 0 with a bootstrap
    CI over seeds below 0; did not hold if the CI excludes the claimed strength (rho <= -0.6);
    underpowered with fewer than 4 teacher blocks or one seed per block. The bootstrap resamples the
    teacher blocks (the points) and the seeds within each."""
    pts = c5_points(tb)
    if pts is None:
        return Verdict("C5", UNDERPOWERED, "needs the baseline's layer grid and evaluated SRA runs")
    metric, at = pts.attrs["metric"], pts.attrs["at"]
    final = pts.rename(columns={"value": metric})
    ks = sorted(int(k) for k in final["k"].unique())
    acc = final.groupby("k")["baseline_accuracy"].first()
    details = [f"teacher blocks with an SRA run: {ks}; baseline accuracy ({at}) at them: "
               + ", ".join(f"{k}: {acc[k]:.1f}%" for k in ks),
               "final " + metric + " per block (mean over seeds): "
               + ", ".join(f"{k}: {final.loc[final['k'] == k, metric].mean():.2f}" for k in ks)]
    seeds = final.groupby("k").size()
    if len(ks) < 4 or seeds.min() < 2:
        return Verdict("C5", UNDERPOWERED, f"{len(ks)} teacher block(s) with SRA runs, {int(seeds.min())} seed(s) "
                       "each: the paper's design needs SRA runs at several teacher blocks (>= 4 here) with >= 2 "
                       "seeds to put an interval on the correlation", details, [C5_FIGURE])
    y = final.groupby("k")[metric].mean()
    point = float(stats.spearmanr([acc[k] for k in y.index], y.values).statistic)
    rng = np.random.default_rng(0)
    groups = [g for _, g in final.groupby("k")]
    boots = []
    for _ in range(500):  # resample the teacher blocks (the points), then the seeds within each
        xs, ys = [], []
        for i in rng.integers(0, len(groups), len(groups)):
            g = groups[i]
            xs.append(acc[int(g["k"].iloc[0])])
            ys.append(float(g[metric].to_numpy()[rng.integers(0, len(g), len(g))].mean()))
        boots.append(float(stats.spearmanr(xs, ys).statistic) if len(set(xs)) > 1 else np.nan)
    lo, hi = np.nanpercentile(boots, [2.5, 97.5])
    v = "held" if hi < 0 else ("did not hold" if -lo < EFFECTS["C5"] else UNDERPOWERED)
    details.append(f"Spearman rho = {point:.2f}, 95% bootstrap CI (teacher blocks and seeds) [{lo:.2f}, {hi:.2f}]")
    return Verdict("C5", v, f"rho(probe accuracy at k, {metric}) = {point:.2f} [{lo:.2f}, {hi:.2f}]; claimed <= "
                   f"{-EFFECTS['C5']:g}", details, [C5_FIGURE])


def check_c6(tb: StudyTables) -> Verdict:
    """Final checkpoints, per training seed: DiverseDiT vs baseline relative fd reduction
    (1 - fd_diverse / mean fd_baseline) and the mean off-diagonal CKA (EMA). Held if the fd CI is
    above 0 and the CKA is lower; did not hold if the CI excludes the claimed 5%; otherwise
    underpowered."""
    q, sims = tb.quality, tb.curves_similarity
    if q.empty or sims is None or not {"diverse", "baseline"} <= set(sims["run"].map(arm_of)):
        return Verdict("C6", UNDERPOWERED, "needs baseline and DiverseDiT runs with curves and evaluations")
    metric = q["metric"].iloc[0]
    final = q.sort_values("step").groupby("run").tail(1)
    fd = _by_arm(final, metric, ("diverse", "baseline"))
    ref = float(fd["baseline"].mean())
    c = compare(1 - fd["diverse"] / ref, 1 - fd["baseline"] / ref)
    v = judge(c, EFFECTS["C6"])
    last = sims.sort_values("step").groupby("run").tail(1)
    cka = _by_arm(last, "cka_mean_offdiag", ("diverse", "baseline"))
    lower = float(cka["diverse"].mean()) < float(cka["baseline"].mean())
    if v == "held" and not lower:
        v = "did not hold"
    details = [f"final {metric}: " + ", ".join(f"{r} {x:.2f}" for arm in ("baseline", "diverse")
                                              for r, x in sorted(fd[arm].items())),
               f"mean off-diagonal CKA (EMA, final): diverse {cka['diverse'].mean():.3f}, baseline "
               f"{cka['baseline'].mean():.3f} ({'lower' if lower else 'not lower'})"]
    return Verdict("C6", v, _verdict_text(v, f"relative {metric} reduction", c, "", EFFECTS["C6"]), details,
                   ["cka_blocks_by_run.png", "cka_offdiag_over_training.png"])


def _steps_to_reach(df: pd.DataFrame, metric: str, target: float) -> float:
    """Training steps until ``metric`` first reaches ``target`` (linear between checkpoints; inf if never)."""
    d = df.sort_values("step")
    prev = None
    for _, r in d.iterrows():
        if r[metric] <= target:
            if prev is None:
                return float(r["step"])
            f = (prev[metric] - target) / max(prev[metric] - r[metric], 1e-12)
            return float(prev["step"] + f * (r["step"] - prev["step"]))
        prev = r
    return math.inf


def check_c7(tb: StudyTables) -> Verdict:
    """At equal compute: compute = steps x the per-step cost of each method measured side by side in
    one interleaved timing (``step_cost`` in study.json), so machine load cannot decide it. Per SRA
    seed: 1 - (SRA compute to reach the baseline's final fd, seed mean) / (the baseline's compute).
    Held if the CI is above 0; did not hold if it excludes the claimed 10% saving (or SRA never
    reaches it); otherwise underpowered. Wall-clock times are context only."""
    q = tb.quality
    cost = tb.study.get("step_cost") or {}
    if q.empty or not {"sra", "baseline"} <= set(q["run"].map(arm_of)):
        return Verdict("C7", UNDERPOWERED, "needs evaluated baseline and SRA runs")
    if not {"sra", "baseline"} <= set(cost):
        return Verdict("C7", UNDERPOWERED, "no side-by-side per-step cost was measured (study.json step_cost)")
    metric = q["metric"].iloc[0]
    arm = q["run"].map(arm_of)
    base, sra = q[arm == "baseline"], q[arm == "sra"]
    finals = base.sort_values("step").groupby("run").tail(1)
    target, base_steps = float(finals[metric].mean()), float(finals["step"].mean())
    ratio = cost["sra"] / cost["baseline"]
    savings = [1 - ratio * _steps_to_reach(d, metric, target) / base_steps for _, d in sra.groupby("run")]
    details = [f"per-step cost measured side by side: SRA / baseline = {ratio:.2f} "
               f"({cost['sra'] * 1000:.1f} vs {cost['baseline'] * 1000:.1f} ms)",
               f"target {metric} = the baseline's final {target:.2f} (mean of {len(finals)} seed(s)) at step "
               f"{base_steps:.0f}",
               "SRA: " + "; ".join(f"{r}: " + ", ".join(f"{int(s)} -> {f:.2f}" for s, f in zip(d["step"], d[metric]))
                                   for r, d in sra.groupby("run")),
               "wall-clock (context only): " + ", ".join(f"{r} {t:.0f} s" for r, t in
                                                         q.groupby("run")["train_seconds"].max().items())]
    if len(savings) >= 2 and all(math.isinf(x) for x in savings):
        return Verdict("C7", "did not hold", f"SRA does not reach the baseline's final {metric} within this budget",
                       details, ["quality_vs_time.png"])
    if any(math.isinf(x) for x in savings):
        details.append("SRA did not reach the target within the budget in "
                       f"{sum(math.isinf(x) for x in savings)} of {len(savings)} seed(s) (counted as -100% saving)")
    c = compare([x if math.isfinite(x) else -1.0 for x in savings])
    v = judge(c, EFFECTS["C7"])
    return Verdict("C7", v, _verdict_text(v, "compute saved by SRA", c, "", EFFECTS["C7"]), details,
                   ["quality_vs_time.png"])


RULES = {"C1": check_c1, "C2": check_c2, "C3": check_c3, "C4": check_c4, "C5": check_c5, "C6": check_c6,
         "C7": check_c7}


def rule_text(claim: str) -> str:
    """The rule of a claim as stated in its check's docstring (one line)."""
    return " ".join((RULES[claim].__doc__ or "").split())


def check_claims(tb: StudyTables) -> list[Verdict]:
    return [rule(tb) for rule in RULES.values()]
