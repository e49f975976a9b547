"""The study's figures, one recipe each, from :class:`~repdyn.study.tables.StudyTables`.

Each ``fig_*`` returns ``{file name: matplotlib Figure}`` and writes nothing; ``repdyn.commands.demo``
(and the notebooks, through it) saves them. :data:`FIGURE_FAMILIES` maps a family name to its
recipe, so a notebook regenerates exactly the figures of one family.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from repdyn.core.files import atomic_path, save_figure

from repdyn.core.timesteps import format_t

from repdyn.analysis import plots
from repdyn.study.claims import C5_FIGURE, c5_points
from repdyn.analysis.correlation import correlate
from repdyn.study.power import arm_of
from repdyn.study.tables import StudyTables, accuracy_grid

__all__ = ["fig_layer_grid", "fig_sra_vs_baseline", "fig_teacher_student", "fig_probe_vs_quality",
           "fig_quality_vs_time", "fig_diversity", "fig_alignment_spatial", "block_cka", "FIGURE_FAMILIES", "FIGURE_FAMILY_NAMES",
           "write_figures"]

Figures = dict[str, plt.Figure]
SEED_BAND = "band: +-1 SD over training seeds"
MAIN_ARMS = ("baseline", "sra", "diverse", "repa")


def _by_arm(frame: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """``frame`` with an ``arm`` column (the seeds of an arm are drawn as one line with a band) and
    the caption of that band ("" with one seed per arm)."""
    arm = frame["run"].map(arm_of)
    seeded = (frame.assign(arm=arm).groupby("arm")["run"].nunique() > 1).any()
    return frame.assign(arm=arm), (SEED_BAND if seeded else "")


def _step_cost(tb: StudyTables, arm: str) -> float | None:
    """The interleaved per-step cost of an arm's method (``sra-kt3`` and ``sra-ema..`` cost as ``sra``)."""
    cost = tb.study.get("step_cost", {})
    return cost.get(arm, cost.get(arm.split("-")[0]))


def _meta(tb: StudyTables, **extra) -> dict:
    return {"model": tb.config.get("model", "?"), "data": tb.config.get("data", "?"), **extra}


def fig_layer_grid(tb: StudyTables) -> Figures:
    """C1/C2: probe accuracy over blocks x t (the layer-grid heatmap, per run) and accuracy vs block per t."""
    lg = tb.layer_grid
    if lg is None:
        return {}
    out: Figures = {}
    for run, df in lg.groupby("run"):
        r = df.iloc[0]
        out[f"layer_grid_{run}.png"] = plots.layer_grid_heatmap(
            df, title=f"Linear-probe accuracy (%) per block and t: {run} (EMA, step {int(r['step'])})",
            meta={"protocol": f"{r['probe']} probe, label={r['label_policy']}, n_train={r['n_train']}, "
                              f"n_test={r['n_test']}"})
    arm = lg["run"].map(arm_of)
    base = lg[arm == "baseline"] if (arm == "baseline").any() else lg
    frame = base.assign(**{"accuracy (%)": 100 * base["accuracy"], "t": base["t"].map(format_t)})
    band = SEED_BAND if base["run"].nunique() > 1 else ""
    out["accuracy_vs_block.png"] = plots.plot_curves(
        frame, "block", "accuracy (%)", hue="t", title="Probe accuracy rises with depth, peaks, then falls? "
        "(baseline, EMA; block 0 = input embedding)", meta=_meta(tb, weights="EMA", seeds=band), xlabel="block",
        ylabel="top-1 accuracy (%)", errorbar="sd")
    return out


def fig_sra_vs_baseline(tb: StudyTables) -> Figures:
    """C3: SRA minus baseline probe accuracy over the grid (each arm's mean over its seeds)."""
    if tb.layer_grid is None:
        return {}
    lg = tb.layer_grid.assign(seed_run=tb.layer_grid["run"], run=tb.layer_grid["run"].map(arm_of))
    if not {"sra", "baseline"} <= set(lg["run"]):
        return {}
    diff = 100 * (accuracy_grid(lg, "sra") - accuracy_grid(lg, "baseline"))
    lim = max(1.0, float(np.nanmax(np.abs(diff.values))))
    frame = lg[lg["run"].isin(["sra", "baseline"])]
    frame = frame.assign(**{"accuracy (%)": 100 * frame["accuracy"], "t": frame["t"].map(format_t)})
    return {
        "sra_minus_baseline.png": plots.heatmap(
            diff.values, list(diff.index), [format_t(t) for t in diff.columns],
            title="SRA - baseline: probe accuracy (points) per block and t (mean over seeds)", cmap="vlag", vmin=-lim, vmax=lim,
            fmt="+.1f", meta=_meta(tb, weights="EMA, final checkpoints"), cbar_label="accuracy difference (pts)",
            xlabel="t (1 = pure noise)", ylabel="block"),
        "sra_vs_baseline_blocks.png": plots.plot_curves(
            frame, "block", "accuracy (%)", hue="t", style="run",
            title="Probe accuracy per block: SRA (dashed) vs baseline", meta=_meta(tb, weights="EMA"),
            xlabel="block", ylabel="top-1 accuracy (%)"),
    }


def fig_teacher_student(tb: StudyTables) -> Figures:
    """C4: student (online, block k_s, t) vs teacher (EMA, block k_t, lower t) over training."""
    if tb.curves is None:
        return {}
    c = tb.cells
    frame, band = _by_arm(tb.curves.assign(**{"accuracy (%)": 100 * tb.curves["accuracy"]}))
    main = frame["arm"].isin(MAIN_ARMS)
    frame = frame[main] if main.any() else frame  # the C5 / EMA arms would hide the three main ones
    return {"teacher_vs_student.png": plots.plot_curves(
        frame, "step", "accuracy (%)", hue="arm", style="role", title="Teacher vs student probe accuracy over training",
        meta=_meta(tb, protocol=f"student = online block {c.get('student_block')} at t={c.get('t_student')}; "
                                f"teacher = EMA block {c.get('teacher_block')} at t={c.get('t_teacher')}", seeds=band),
        xlabel="training step", ylabel="top-1 accuracy (%)", errorbar="sd")}


def fig_probe_vs_quality(tb: StudyTables) -> Figures:
    """C5: fd of every checkpoint vs the teacher layer's probe accuracy."""
    q = tb.quality
    if q.empty:
        return {}
    metric = q["metric"].iloc[0]
    tab = correlate(100 * q["accuracy"], q[metric], control=q["step"], x_name="teacher probe acc", y_name=metric,
                    n_boot=1000)
    c = tb.cells
    return {"probe_vs_quality.png": plots.plot_correlation(
        100 * q["accuracy"], q[metric], tab,
        xlabel=f"teacher-cell probe accuracy (%) (EMA block {c.get('teacher_block')}, t={c.get('t_teacher')})",
        ylabel=f"{metric} (lower is better)", point_labels=[f"{r}@{s}" for r, s in zip(q["run"], q["step"])],
        hue=q["step"], title="Generation quality vs teacher-layer probe accuracy, every checkpoint (context; "
        "C5 itself needs SRA runs per teacher block)", meta=_meta(tb)), **_fig_c5(tb)}


def _fig_c5(tb: StudyTables) -> Figures:
    """C5 as SRA App. I: each SRA run's final quality vs the final baseline's probe accuracy at the
    block it aligned to (every seed a point, labelled k)."""
    pts = c5_points(tb)
    if pts is None or pts["k"].nunique() < 2:
        return {}
    metric = pts.attrs["metric"]
    tab = correlate(pts["baseline_accuracy"], pts["value"], x_name="baseline probe acc at k", y_name=metric,
                    n_boot=1000)
    return {C5_FIGURE: plots.plot_correlation(
        pts["baseline_accuracy"], pts["value"], tab, point_labels=[f"k={k}" for k in pts["k"]],
        xlabel=f"final baseline probe accuracy (%) at teacher block k ({pts.attrs['at']})",
        ylabel=f"final {metric} of the SRA run aligned to k (lower is better)",
        title="SRA App. I: quality of SRA runs vs the baseline's accuracy at their teacher block (every seed)",
        meta=_meta(tb))}


def fig_quality_vs_time(tb: StudyTables) -> Figures:
    """C7: fd against compute (steps x each method's interleaved per-step cost), per arm with its
    seed band; against training wall-clock time when no per-step cost was measured."""
    q = tb.quality
    if q.empty:
        return {}
    metric = q["metric"].iloc[0]
    frame, band = _by_arm(q)
    cost = frame["arm"].map(lambda a: _step_cost(tb, a))
    if cost.notna().all():
        frame = frame.assign(compute=frame["step"] * cost.astype(float))
        x, xlabel = "compute", "compute (s): steps x per-step cost measured side by side"
    else:
        x, xlabel = "train_seconds", "training time (s, same machine)"
    return {"quality_vs_time.png": plots.plot_curves(
        frame, x, metric, hue="arm", title=f"{metric} at equal compute", meta=_meta(tb, seeds=band),
        xlabel=xlabel, ylabel=f"{metric} (lower is better)", errorbar="sd")}


def fig_alignment_spatial(tb: StudyTables) -> Figures:
    """Over training, per arm (mean +- SD over seeds): the SRA student and teacher blocks' alignment
    with the external encoder (REPA's figure: does SRA align without the encoder?) and the spatial
    structure of their patch tokens (iREPA's measures), on the EMA weights at the curves' t."""
    cb = tb.curves_blocks
    if cb is None or cb.empty:
        return {}
    c = tb.cells
    blocks = [b for b in (c.get("student_block"), c.get("teacher_block")) if b is not None]
    frame, band = _by_arm(cb[cb["block"].isin(blocks)] if blocks else cb)
    main = frame["arm"].isin(MAIN_ARMS)
    frame = frame[main] if main.any() else frame
    ref = next((r for r in frame["reference"].dropna().unique() if "grid" not in str(r)), None)
    return {"alignment_spatial_over_training.png": plots.plot_measure_panels(
        frame, ["cknna", "mutual_knn", "lds", "cds", "rmsc"], hue="arm", style="block",
        title="Alignment with an external encoder and spatial structure over training (EMA)",
        meta=_meta(tb, protocol=f"blocks {', '.join(map(str, blocks))} (SRA's student, teacher) at "
                                f"t={frame['t'].iloc[0]:g}; encoder: {ref or 'none'}", seeds=band or "one seed"),
        labels=plots.MEASURE_LABELS)}


def block_cka(cka: pd.DataFrame) -> pd.DataFrame:
    """Block x block CKA at equal t from ``probe similarity``'s tidy ``cka.csv`` (columns t, block_a,
    block_b, cka)."""
    df = cka[cka["t_a"] == cka["t_b"]]
    return df.rename(columns={"t_a": "t"})[["t", "block_a", "block_b", "cka"]]


def fig_diversity(tb: StudyTables) -> Figures:
    """C6: mean off-diagonal CKA over training and block x block CKA per run (same t, shared scale)."""
    out: Figures = {}
    if tb.curves_similarity is not None:
        frame, band = _by_arm(tb.curves_similarity)
        out["cka_offdiag_over_training.png"] = plots.plot_curves(
            frame, "step", "cka_mean_offdiag", hue="arm",
            title="Mean off-diagonal CKA between blocks over training (EMA)",
            meta=_meta(tb, protocol="debiased linear CKA, pooled test features", seeds=band), xlabel="training step",
            ylabel="mean off-diagonal CKA", errorbar="sd")
    mats = {run: block_cka(df) for run, df in tb.similarity.items()}
    if mats:
        ts = sorted(next(iter(mats.values()))["t"].unique())
        t0 = ts[len(ts) // 2]
        # one colour scale for every panel, from the lowest value shown, so small differences are visible
        lo = min(float(df.loc[df["t"] == t0, "cka"].min()) for df in mats.values())
        vmin = max(0.0, np.floor(lo * 20) / 20)
        fig, axes = plt.subplots(1, len(mats), figsize=(4.2 * len(mats), 3.8), constrained_layout=True)
        axes = np.atleast_1d(axes)
        for ax, (run, df) in zip(axes, sorted(mats.items())):
            sub = df[df["t"] == t0].pivot_table(index="block_a", columns="block_b", values="cka")
            im = ax.imshow(sub.values, vmin=vmin, vmax=1, cmap="magma")
            ax.set_xticks(range(len(sub.columns)), sub.columns)
            ax.set_yticks(range(len(sub.index)), sub.index)
            off = sub.values[~np.eye(len(sub), dtype=bool)]
            ax.set_title(f"{run}: mean off-diagonal {np.nanmean(off):.2f}")
            ax.set_xlabel("block")
            ax.set_ylabel("block")
        fig.colorbar(im, ax=axes.tolist(), label="debiased CKA")
        fig.suptitle(f"Block x block CKA at t={format_t(t0)} (EMA, final checkpoints, pooled test features)")
        out["cka_blocks_by_run.png"] = fig
    return out


FIGURE_FAMILIES: dict[str, Callable[[StudyTables], Figures]] = {
    "layer_grid": fig_layer_grid,
    "sra_vs_baseline": fig_sra_vs_baseline,
    "teacher_student": fig_teacher_student,
    "probe_vs_quality": fig_probe_vs_quality,
    "quality_vs_time": fig_quality_vs_time,
    "diversity": fig_diversity,
    "alignment_spatial": fig_alignment_spatial,
}

FIGURE_FAMILY_NAMES = tuple(FIGURE_FAMILIES) + ("pca",)  # pca: drawn by `probe pca`, copied


def write_figures(tables: StudyTables, figures: str | os.PathLike,
                  families: Sequence[str] | None = None) -> dict[str, list[Path]]:
    """Save the figures of ``families`` (default: all) into ``figures``; returns their paths by family."""
    figures = Path(figures)
    unknown = set(families or ()) - set(FIGURE_FAMILY_NAMES)
    if unknown:
        raise ValueError(f"unknown figure family {sorted(unknown)}; use {', '.join(FIGURE_FAMILY_NAMES)}")
    written: dict[str, list[Path]] = {}
    for family in families or FIGURE_FAMILY_NAMES:
        if family == "pca":  # probe pca already drew them: copy, do not redraw
            written[family] = []
            for run, src in tables.pca_png.items():
                dst = figures / f"pca_{run}.png"
                with atomic_path(dst) as tmp:
                    shutil.copyfile(src, tmp)
                written[family].append(dst)
            continue
        written[family] = [save_figure(fig, figures / name) for name, fig in FIGURE_FAMILIES[family](tables).items()]
    return written
