"""The end-to-end study behind ``make demo``: train, probe, analyse, evaluate, report.

One pipeline checks the papers' representation claims (C1-C7, see :mod:`analysis.claims`) with
the toolkit's own commands: it trains baseline / SRA / DiverseDiT runs with checkpoints along the
way, runs the layer grid on each final EMA, student-vs-teacher curves over every checkpoint,
similarity / diversity matrices, PCA maps, the offline ``fd_<dataset>`` of every checkpoint, and
writes tidy tables under ``<out>/tables``. Every step is skipped when its outputs exist, so an
interrupted study resumes.

Figures are made by the ``fig_*`` functions from those tables only; the notebooks call the same
functions, so a figure has one recipe.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

__all__ = ["StudyConfig", "SCALES", "run_study", "study_paths", "fig_layer_grid", "fig_sra_vs_baseline",
           "fig_teacher_student", "fig_probe_vs_quality", "fig_diversity", "fig_pca", "fig_quality_vs_time",
           "make_figures", "load_tables"]


@dataclass
class StudyConfig:
    """Everything that sets the scale of the study (recorded in ``<out>/study.json``)."""

    name: str = "cpu"
    model: str = "SiT-T/4"
    model_overrides: dict = field(default_factory=dict)
    data: str = "fashion-mnist"
    methods: tuple[str, ...] = ("baseline", "sra", "diverse")
    extra_teacher_blocks: tuple[int, ...] = ()  # extra SRA runs with other teacher blocks (C5)
    steps: int = 1200
    n_ckpts: int = 4
    batch_size: int = 64
    lr: float = 5e-4
    ema_decay: float = 0.999
    seed: int = 0
    grid_ts: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
    grid_runs: tuple[str, ...] | None = None  # runs that get a full layer grid (None: all)
    n_train: int = 2000
    n_test: int = 1000
    curve_n_train: int = 1000  # per checkpoint, student and teacher cells
    curve_n_test: int = 500
    t_probe: float = 0.5  # student cell time for the curves; the teacher's is t - t_max / 2
    n_div: int = 48
    sim_n: int = 512
    sim_ts: tuple[float, ...] = (0.1, 0.5, 0.9)
    eval_n: int = 300
    eval_steps: int = 12
    eval_sampler: str = "ode-euler"
    pca_images: tuple[int, ...] = (0, 1, 2, 3)
    device: str = "auto"

    def ckpt_steps(self) -> list[int]:
        return sorted({max(1, round(self.steps * (i + 1) / self.n_ckpts)) for i in range(self.n_ckpts)})

    def run_specs(self) -> list[tuple[str, str, dict]]:
        """(run name, method, extra config) for every training run."""
        specs = [(m.replace("+", "-"), m, {}) for m in self.methods]
        specs += [(f"sra-kt{k}", "sra", {"sra": {"teacher_block": k}}) for k in self.extra_teacher_blocks]
        return specs


SCALES: dict[str, StudyConfig] = {
    # make demo: tiny SiTs (depth 6, width 64, 8x8 tokens) on a 2-core CPU, ~15 min with installation.
    # EMA 0.995: over 600 steps a 0.999 EMA (the SRA teacher) would still be 55% initialisation.
    # The full layer grid runs on baseline and SRA only (C1-C3 use them); every run gets curves.
    "cpu": StudyConfig(model_overrides={"hidden_size": 64}, steps=600, batch_size=32, lr=1e-3, ema_decay=0.995,
                       grid_runs=("baseline", "sra"), n_div=32),
    # the notebook / CI test: about a minute, only checks that every piece runs.
    "smoke": StudyConfig(name="smoke", model_overrides={"depth": 4, "hidden_size": 64}, steps=40, n_ckpts=2,
                         batch_size=32, ema_decay=0.9, grid_ts=(0.2, 0.6), n_train=200, n_test=120,
                         curve_n_train=200, curve_n_test=120, n_div=16, sim_n=64, sim_ts=(0.2, 0.6), eval_n=48,
                         eval_steps=4, pca_images=(0, 1)),
    # one GPU (meant for an H100; not yet run, wall time unmeasured): SiT-S/2 on 32x32 Fashion-MNIST,
    # several SRA teacher layers for C5.
    "gpu": StudyConfig(name="gpu", model="SiT-S/2", steps=8000, n_ckpts=8, batch_size=256, lr=2e-4,
                       ema_decay=0.9995, extra_teacher_blocks=(6, 11), grid_ts=(0.0, 0.2, 0.4, 0.6, 0.8),
                       n_train=10000, n_test=5000, curve_n_train=5000, curve_n_test=2000, n_div=128, sim_n=2048,
                       eval_n=5000, eval_steps=50, eval_sampler="ode-heun", device="cuda"),
}


def study_paths(out: str | os.PathLike) -> dict[str, Path]:
    out = Path(out)
    return {"out": out, "runs": out / "runs", "tables": out / "tables", "cache": out / "cache",
            "study": out / "study.json"}


# ----------------------------------------------------------------------------------------------
# the pipeline
# ----------------------------------------------------------------------------------------------


def _train_runs(cfg: StudyConfig, paths: dict, progress: bool, log: Callable) -> dict[str, Path]:
    from training.checkpoint import latest_checkpoint
    from training.config import resolve_config
    from training.trainer import train

    runs = {}
    for name, method, extra in cfg.run_specs():
        run_dir = paths["runs"] / name
        overrides = dict(model=cfg.model, model_overrides=dict(cfg.model_overrides), method=method, data=cfg.data,
                         steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, ema_decay=cfg.ema_decay,
                         seed=cfg.seed, ckpt_every=0, ckpt_steps=cfg.ckpt_steps(),
                         log_every=max(1, cfg.steps // 100), out=str(run_dir), device=cfg.device, **extra)
        tc = resolve_config(None, None, overrides)
        last = latest_checkpoint(run_dir)
        if last is None or int(last.stem) < cfg.steps:
            log(f"[train] {name}: {cfg.model} {method}, {cfg.steps} steps")
            train(tc, resume=run_dir if last is not None else None, quiet=not progress)
        runs[name] = run_dir
    return runs


def _feature_spec(cfg: StudyConfig, paths: dict, progress: bool, n: int):
    from analysis.commands import FeatureSpec

    return FeatureSpec(data=cfg.data, split="test", n=n, device=cfg.device, cache_dir=paths["cache"],
                       seed=cfg.seed, progress=progress)


def _sra_cells(cfg: StudyConfig) -> tuple[int, int, float, float]:
    """The student / teacher cells every run's curves use: the SRA run's blocks, t and mean teacher t."""
    from training.methods.sra import DEFAULT_T_MAX, default_blocks
    from training.models import model_config

    mc = model_config(cfg.model, **{"input_size": 32, "in_channels": 1, "num_classes": 10, **cfg.model_overrides})
    ks, kt = default_blocks(mc)
    return ks, kt, cfg.t_probe, round(cfg.t_probe - DEFAULT_T_MAX / 2, 6)


def run_study(out: str | os.PathLike = "runs/demo", scale: str | StudyConfig = "cpu",
              figures: str | os.PathLike = "figures", progress: bool = True,
              log: Callable[[str], None] = print, **overrides: Any) -> Path:
    """Run (or resume) the whole study; returns the path of ``REPORT.md``."""
    from analysis.claims import write_report
    from analysis.commands import run_diversity, run_pca, run_similarity
    from analysis.dynamics import run_curves
    from probe.cache import atomic_write_text
    from probe.layer_grid import run_layer_grid
    from training.checkpoint import list_checkpoints
    from training.evaluation import resolve_device, run_eval

    cfg = scale if isinstance(scale, StudyConfig) else SCALES[scale]
    if scale not in SCALES and not isinstance(scale, StudyConfig):
        raise ValueError(f"unknown scale {scale!r}; use one of {', '.join(SCALES)}")
    cfg = replace(cfg, **overrides) if overrides else cfg
    paths = study_paths(out)
    for p in ("runs", "tables", "cache"):
        paths[p].mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t_all = time.perf_counter()

    def timed(key, fn, *a, **kw):
        t0 = time.perf_counter()
        res = fn(*a, **kw)
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0
        return res

    runs = timed("train", _train_runs, cfg, paths, progress, log)
    tables = paths["tables"]
    ks, kt, t_s, t_t = _sra_cells(cfg)

    for name, run_dir in runs.items():
        final = list_checkpoints(run_dir)[-1]
        lg = tables / f"layer_grid_{name}"
        if (cfg.grid_runs is None or name in cfg.grid_runs) and not (lg / "layer_grid.csv").exists():
            log(f"[layer-grid] {name}")
            timed("layer_grid", run_layer_grid, final, data=cfg.data, ts=list(cfg.grid_ts), n_train=cfg.n_train,
                  n_test=cfg.n_test, device=cfg.device, out_dir=lg, cache_dir=paths["cache"], seed=cfg.seed,
                  progress=progress)
        log(f"[curves] {name}")
        timed("curves", run_curves, run_dir, _feature_spec(cfg, paths, progress, cfg.curve_n_test), student_block=ks,
              teacher_block=kt, t=t_s, t_teacher=t_t, n_train=cfg.curve_n_train, n_test=cfg.curve_n_test,
              n_div=cfg.n_div,
              out=tables / f"curves_{name}")
        metrics = tables / "eval_metrics.csv"
        done = set(pd.read_csv(metrics)["ckpt_sha"].astype(str)) if metrics.exists() else set()
        from training.checkpoint import file_sha

        for ck in list_checkpoints(run_dir):
            if file_sha(ck) in done:
                continue
            log(f"[eval] {name} {ck.name}")
            timed("eval", run_eval, ck, metrics, n=cfg.eval_n, method=cfg.eval_sampler, steps=cfg.eval_steps,
                  data=cfg.data, device=resolve_device(cfg.device), seed=cfg.seed, batch_size=256)
        spec = _feature_spec(cfg, paths, progress, cfg.sim_n)
        if not (tables / f"similarity_{name}").exists():
            log(f"[similarity] {name}")
            timed("similarity", run_similarity, final, spec, ts=list(cfg.sim_ts), out=tables / f"similarity_{name}")
        if not (tables / f"diversity_{name}").exists():
            log(f"[diversity] {name}")
            dspec = replace(spec, n=cfg.n_div, pooling="tokens")
            timed("diversity", run_diversity, final, dspec, ts=list(cfg.sim_ts), out=tables / f"diversity_{name}")
        if not (tables / f"pca_{name}").exists():
            log(f"[pca] {name}")
            timed("pca", run_pca, final, replace(spec, n=max(cfg.pca_images) + 1), images=list(cfg.pca_images),
                  out=tables / f"pca_{name}")

    timings["total"] = time.perf_counter() - t_all
    # A resumed study adds its time to the earlier runs': the report shows the cost of the whole study.
    prev = json.loads(paths["study"].read_text()) if paths["study"].exists() else {}
    same = prev.get("config") == json.loads(json.dumps(asdict(cfg), default=str))
    total = dict(prev.get("timings_s", {})) if same else {}
    for k, v in timings.items():
        total[k] = total.get(k, 0.0) + v
    info = {"config": asdict(cfg), "timings_s": total, "sessions": (prev.get("sessions", 0) if same else 0) + 1,
            "cells": {"student_block": ks, "teacher_block": kt, "t_student": t_s, "t_teacher": t_t}}
    atomic_write_text(paths["study"], json.dumps(info, indent=2, default=str))
    log("[figures] writing figures and REPORT.md")
    figs = make_figures(out, figures)
    return write_report(out, figures, figs)


# ----------------------------------------------------------------------------------------------
# tables -> figures (the notebooks call these too)
# ----------------------------------------------------------------------------------------------


def load_tables(out: str | os.PathLike) -> dict[str, Any]:
    """Every table of a study, keyed by kind (missing ones are absent)."""
    paths = study_paths(out)
    t = paths["tables"]
    if not t.is_dir():
        raise FileNotFoundError(f"{t} not found: run the study first (`probe demo --out {paths['out']}`)")
    res: dict[str, Any] = {"study": json.loads(paths["study"].read_text()) if paths["study"].exists() else {}}
    grids = [pd.read_csv(p).assign(run=p.parent.name.removeprefix("layer_grid_"))
             for p in sorted(t.glob("layer_grid_*/layer_grid.csv"))]
    if grids:
        res["layer_grid"] = pd.concat(grids, ignore_index=True)
    curves = [pd.read_csv(p).assign(run=p.parent.name.removeprefix("curves_")) for p in sorted(t.glob("curves_*/curves.csv"))]
    if curves:
        res["curves"] = pd.concat(curves, ignore_index=True)
    sims = [pd.read_csv(p).assign(run=p.parent.name.removeprefix("curves_"))
            for p in sorted(t.glob("curves_*/curves_similarity.csv"))]
    if sims:
        res["curves_similarity"] = pd.concat(sims, ignore_index=True)
    if (t / "eval_metrics.csv").exists():
        res["eval"] = pd.read_csv(t / "eval_metrics.csv", dtype={"ckpt_sha": str})
    res["training"] = {p.name: pd.read_csv(p / "metrics.csv") for p in sorted(paths["runs"].glob("*"))
                       if (p / "metrics.csv").exists()}
    res["similarity_dirs"] = {p.name.removeprefix("similarity_"): p for p in sorted(t.glob("similarity_*"))}
    res["diversity_dirs"] = {p.name.removeprefix("diversity_"): p for p in sorted(t.glob("diversity_*"))}
    res["pca_dirs"] = {p.name.removeprefix("pca_"): p for p in sorted(t.glob("pca_*"))}
    return res


def _meta(tables: dict, **extra) -> dict:
    cfg = tables["study"].get("config", {})
    return {"model": cfg.get("model", "?"), "data": cfg.get("data", "?"), **extra}


def _fmt(t: float) -> str:
    return f"{float(t):g}"


def fig_layer_grid(out, figures) -> list[Path]:
    """C1/C2: probe accuracy over blocks x t (heatmap per run) and accuracy vs block per t."""
    from analysis import plots

    tb = load_tables(out)
    lg = tb["layer_grid"]
    figures = Path(figures)
    paths = []
    for run, df in lg.groupby("run"):
        piv = df.pivot_table(index="block", columns="t", values="accuracy").sort_index()
        paths.append(plots.heatmap(
            100 * piv.values, list(piv.index), [_fmt(t) for t in piv.columns], figures / f"layer_grid_{run}.png",
            title=f"Linear-probe accuracy (%) per block and t: {run}", cmap="viridis", fmt=".0f",
            meta=_meta(tb, weights="EMA", protocol=f"{df['probe'].iloc[0]} probe, label={df['label_policy'].iloc[0]}, "
                                                  f"n_train={df['n_train'].iloc[0]}, n_test={df['n_test'].iloc[0]}"),
            cbar_label="top-1 accuracy (%)", xlabel="t (1 = pure noise)", ylabel="block (1-based)"))
    base = lg[lg["run"] == "baseline"] if "baseline" in set(lg["run"]) else lg
    frame = base.assign(**{"accuracy (%)": 100 * base["accuracy"], "t": base["t"].map(_fmt)})
    paths.append(plots.plot_curves(frame, "block", "accuracy (%)", figures / "accuracy_vs_block.png", hue="t",
                                   title="Probe accuracy rises with depth, peaks, then falls? (baseline, EMA)",
                                   meta=_meta(tb, weights="EMA"), xlabel="block (1-based)",
                                   ylabel="top-1 accuracy (%)"))
    return paths


def fig_sra_vs_baseline(out, figures) -> list[Path]:
    """C3: SRA minus baseline probe accuracy over the grid."""
    from analysis import plots

    tb = load_tables(out)
    lg = tb["layer_grid"]
    runs = set(lg["run"])
    if not {"sra", "baseline"} <= runs:
        return []
    piv = {r: lg[lg["run"] == r].pivot_table(index="block", columns="t", values="accuracy").sort_index()
           for r in ("sra", "baseline")}
    diff = 100 * (piv["sra"] - piv["baseline"])
    lim = max(1.0, float(np.nanmax(np.abs(diff.values))))
    p1 = plots.heatmap(diff.values, list(diff.index), [_fmt(t) for t in diff.columns], Path(figures) / "sra_minus_baseline.png",
                       title="SRA - baseline: probe accuracy (points) per block and t", cmap="vlag", vmin=-lim, vmax=lim,
                       fmt="+.1f", meta=_meta(tb, weights="EMA, final checkpoints"), cbar_label="accuracy difference (pts)",
                       xlabel="t (1 = pure noise)", ylabel="block (1-based)")
    frame = lg[lg["run"].isin(["sra", "baseline"])]
    frame = frame.assign(**{"accuracy (%)": 100 * frame["accuracy"], "t": frame["t"].map(_fmt)})
    p2 = plots.plot_curves(frame, "block", "accuracy (%)", Path(figures) / "sra_vs_baseline_blocks.png", hue="t",
                           style="run", title="Probe accuracy per block: SRA (dashed) vs baseline",
                           meta=_meta(tb, weights="EMA"), xlabel="block (1-based)", ylabel="top-1 accuracy (%)")
    return [p1, p2]


def fig_teacher_student(out, figures) -> list[Path]:
    """C4: student (online, block k_s, t) vs teacher (EMA, block k_t, lower t) over training."""
    from analysis import plots

    tb = load_tables(out)
    cur = tb["curves"]
    cells = tb["study"].get("cells", {})
    frame = cur.assign(**{"accuracy (%)": 100 * cur["accuracy"]})
    return [plots.plot_curves(
        frame, "step", "accuracy (%)", Path(figures) / "teacher_vs_student.png", hue="run", style="role",
        title="Teacher vs student probe accuracy over training",
        meta=_meta(tb, protocol=f"student = online block {cells.get('student_block')} at t={cells.get('t_student')}; "
                                f"teacher = EMA block {cells.get('teacher_block')} at t={cells.get('t_teacher')}"),
        xlabel="training step", ylabel="top-1 accuracy (%)")]


def quality_table(out) -> pd.DataFrame:
    """One row per checkpoint: teacher-cell probe accuracy, fd and its bootstrap SE, step, run, and
    cumulative training time (from the run's logged steps/s)."""
    tb = load_tables(out)
    ev = tb["eval"]
    metric = next(c for c in ev.columns if c.startswith("fd_") and not c.endswith("_se"))
    teach = tb["curves"][tb["curves"]["role"] == "teacher"][["checkpoint_sha", "accuracy", "run", "step"]]
    ev = ev.rename(columns={"ckpt_sha": "checkpoint_sha"})
    if f"{metric}_se" not in ev.columns:
        ev[f"{metric}_se"] = np.nan
    df = teach.merge(ev[["checkpoint_sha", metric, f"{metric}_se"]], on="checkpoint_sha", how="inner")
    times = []
    for run, step in zip(df["run"], df["step"]):
        m = tb["training"].get(run)
        if m is None:
            times.append(np.nan)
            continue
        m = m.sort_values("step")
        dt = np.diff(np.concatenate([[0], m["step"].values])) / m["steps_per_s"].values
        times.append(float(np.interp(step, m["step"].values, np.cumsum(dt))))
    return df.assign(train_seconds=times, metric=metric).sort_values(["run", "step"]).reset_index(drop=True)


def fig_probe_vs_quality(out, figures) -> list[Path]:
    """C5: fd of every checkpoint vs the teacher layer's probe accuracy."""
    from analysis import plots
    from analysis.correlation import correlate

    q = quality_table(out)
    metric = q["metric"].iloc[0]
    tab = correlate(100 * q["accuracy"], q[metric], control=q["step"], x_name="teacher probe acc",
                    y_name=metric, n_boot=1000)
    tb = load_tables(out)
    cells = tb["study"].get("cells", {})
    return [plots.plot_correlation(
        100 * q["accuracy"], q[metric], tab, Path(figures) / "probe_vs_quality.png",
        xlabel=f"teacher-cell probe accuracy (%) (EMA block {cells.get('teacher_block')}, t={cells.get('t_teacher')})",
        ylabel=f"{metric} (lower is better)", point_labels=[f"{r}@{s}" for r, s in zip(q["run"], q["step"])],
        hue=q["step"], title="Generation quality vs teacher-layer probe accuracy (all checkpoints)",
        meta=_meta(tb))]


def fig_quality_vs_time(out, figures) -> list[Path]:
    """C7: fd over training wall-clock time, per run."""
    from analysis import plots

    q = quality_table(out)
    metric = q["metric"].iloc[0]
    return [plots.plot_curves(q, "train_seconds", metric, Path(figures) / "quality_vs_time.png", hue="run",
                              title=f"{metric} over training wall-clock time", meta=_meta(load_tables(out)),
                              xlabel="training time (s, same machine)", ylabel=f"{metric} (lower is better)")]


def fig_diversity(out, figures) -> list[Path]:
    """C6: block x block CKA per run (same t) and mean off-diagonal CKA over training."""
    from analysis import plots

    tb = load_tables(out)
    paths = []
    sims = tb["curves_similarity"]
    paths.append(plots.plot_curves(sims, "step", "cka_mean_offdiag", Path(figures) / "cka_offdiag_over_training.png",
                                   hue="run", title="Mean off-diagonal CKA between blocks over training (EMA)",
                                   meta=_meta(tb, protocol="debiased linear CKA, pooled test features"),
                                   xlabel="training step", ylabel="mean off-diagonal CKA"))
    mats = {run: block_cka(d) for run, d in tb["similarity_dirs"].items() if (d / "cka.csv").exists()}
    if mats:
        import matplotlib.pyplot as plt

        from analysis.plots import save_figure

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
        fig.suptitle(f"Block x block CKA at t={_fmt(t0)} (EMA, final checkpoints, pooled test features)")
        paths.append(save_figure(fig, Path(figures) / "cka_blocks_by_run.png"))
    return paths


def block_cka(similarity_dir: Path) -> pd.DataFrame:
    """Block x block CKA at equal t from ``probe similarity``'s tidy ``cka.csv`` (columns t, block_a,
    block_b, cka)."""
    df = pd.read_csv(Path(similarity_dir) / "cka.csv")
    df = df[df["t_a"] == df["t_b"]]
    return df.rename(columns={"t_a": "t"})[["t", "block_a", "block_b", "cka"]]


def fig_pca(out, figures) -> list[Path]:
    """PCA maps of patch tokens (shared basis per block across t) for each run's final EMA."""
    import shutil

    tb = load_tables(out)
    paths = []
    for run, d in tb["pca_dirs"].items():
        src = d / "pca.png"
        if src.exists():
            dst = Path(figures) / f"pca_{run}.png"
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
            paths.append(dst)
    return paths


FIGURE_FAMILIES = {
    "layer_grid": fig_layer_grid,
    "sra_vs_baseline": fig_sra_vs_baseline,
    "teacher_student": fig_teacher_student,
    "probe_vs_quality": fig_probe_vs_quality,
    "quality_vs_time": fig_quality_vs_time,
    "diversity": fig_diversity,
    "pca": fig_pca,
}


def make_figures(out, figures) -> dict[str, list[Path]]:
    Path(figures).mkdir(parents=True, exist_ok=True)
    return {name: fn(out, figures) for name, fn in FIGURE_FAMILIES.items()}
