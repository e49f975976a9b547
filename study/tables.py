"""A study's tables, loaded once and shared by the figures, the claim rules and the report.

:func:`load_study_tables` reads a study's files once into a :class:`StudyTables`, plain data that the
claim rules, figure recipes and report work on (none of them reads or writes a file).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from repdyn.model.checkpoint import init_fraction

from .paths import StudyPaths

__all__ = ["StudyTables", "load_study_tables", "quality_table", "accuracy_grid", "depth_profiles", "run_ema_decay",
           "class_acc_column"]

_EMA_RUN = re.compile(r"-ema(?P<decay>[0-9.]+?)(?:-s\d+)?$")


def run_ema_decay(run: str, default: float | None) -> float | None:
    """The EMA decay a run trained with: ``<arm>-ema<d>`` (seeded or not) has ``d``, any other run the
    study's ``default`` (``config['ema_decay']``)."""
    m = _EMA_RUN.search(str(run))
    return float(m.group("decay")) if m else default


def class_acc_column(ev: pd.DataFrame, data: str | None = None) -> str | None:
    """The evaluation table's class-accuracy column (``cond_acc_<data>``: the share of conditional
    samples the dataset's classifier reads as their label), or None when it has none."""
    if data and f"cond_acc_{data}" in ev.columns:
        return f"cond_acc_{data}"
    return next((c for c in ev.columns if c.startswith("cond_acc_")), None)


@dataclass
class StudyTables:
    """Every table of one study; a kind the study has not produced is ``None`` (or empty)."""

    study: dict[str, Any] = field(default_factory=dict)  # study.json: config, timings, cells
    layer_grid: pd.DataFrame | None = None  # layer_grid.csv of every run, with a ``run`` column
    curves: pd.DataFrame | None = None  # curves.csv (student / teacher rows) of every run
    curves_similarity: pd.DataFrame | None = None  # curves_similarity.csv of every run
    curves_blocks: pd.DataFrame | None = None  # curves_blocks.csv (every block: alignment, spatial) of every run
    eval: pd.DataFrame | None = None  # eval_metrics.csv (one row per checkpoint)
    training: dict[str, pd.DataFrame] = field(default_factory=dict)  # run -> metrics.csv
    similarity: dict[str, pd.DataFrame] = field(default_factory=dict)  # run -> cka.csv of the final EMA
    pca_png: dict[str, Path] = field(default_factory=dict)  # run -> pca.png written by probe pca

    @property
    def config(self) -> dict[str, Any]:
        return self.study.get("config", {})

    @property
    def cells(self) -> dict[str, Any]:
        """The student / teacher cells every run's curves use (block and t of each)."""
        return self.study.get("cells", {})

    @cached_property
    def quality(self) -> pd.DataFrame:
        return quality_table(self)

    @property
    def eval_ema(self) -> pd.DataFrame | None:
        """The evaluation rows of the sampled (EMA) weights, what every generation claim reads."""
        return weights_rows(self.eval, "ema")

    @property
    def eval_online(self) -> pd.DataFrame | None:
        """The online weights' evaluation rows: the cross-check beside the EMA's (final checkpoints)."""
        return weights_rows(self.eval, "model")


def weights_rows(ev: pd.DataFrame | None, weights: str) -> pd.DataFrame | None:
    """The rows of ``ev`` evaluated on ``weights`` (a table without the column holds EMA rows only)."""
    if ev is None:
        return None
    if "weights" not in ev.columns:
        return ev if weights == "ema" else ev.iloc[0:0]
    return ev[ev["weights"] == weights]


def quality_table(tb: StudyTables) -> pd.DataFrame:
    """One row per evaluated checkpoint: teacher-cell probe accuracy, ``fd_<data>`` and its
    bootstrap SE, step, run, cumulative training time (from the run's logged steps/s), and beside
    every fd what makes it readable: ``class_acc`` (conditional samples' class accuracy by the
    dataset's classifier, NaN when not measured), ``n_samples`` and ``init_fraction`` (the share of
    its initialisation the sampled EMA still holds, :func:`init_fraction`)."""
    if tb.eval is None or tb.curves is None:
        return pd.DataFrame(columns=["checkpoint_sha", "accuracy", "run", "step", "train_seconds", "metric"])
    ev = tb.eval_ema
    metric = next(c for c in ev.columns if c.startswith("fd_") and not c.endswith("_se"))
    teach = tb.curves[tb.curves["role"] == "teacher"][["checkpoint_sha", "accuracy", "run", "step"]]
    ev = ev.rename(columns={"ckpt_sha": "checkpoint_sha"})
    if f"{metric}_se" not in ev.columns:
        ev[f"{metric}_se"] = np.nan
    acc_col = class_acc_column(ev, tb.config.get("data"))
    ev = ev.assign(class_acc=ev[acc_col] if acc_col else np.nan,
                   n_samples=ev["n_samples"] if "n_samples" in ev.columns else np.nan)
    df = teach.merge(ev[["checkpoint_sha", metric, f"{metric}_se", "class_acc", "n_samples"]], on="checkpoint_sha",
                     how="inner")
    default = tb.config.get("ema_decay")
    df["init_fraction"] = [init_fraction(run_ema_decay(r, default), st) for r, st in zip(df["run"], df["step"])]
    times = []
    for run, step in zip(df["run"], df["step"]):
        m = tb.training.get(run)
        if m is None:
            times.append(np.nan)
            continue
        m = m.sort_values("step")
        dt = np.diff(np.concatenate([[0], m["step"].values])) / m["steps_per_s"].values
        times.append(float(np.interp(step, m["step"].values, np.cumsum(dt))))
    return df.assign(train_seconds=times, metric=metric).sort_values(["run", "step"]).reset_index(drop=True)


def accuracy_grid(layer_grid: pd.DataFrame, run: str) -> pd.DataFrame:
    """One run's probe accuracy as a (block x t) frame."""
    return layer_grid[layer_grid["run"] == run].pivot_table(index="block", columns="t", values="accuracy").sort_index()


def depth_profiles(layer_grids: pd.DataFrame, by: str = "step") -> pd.DataFrame:
    """The depth profile (accuracy per block, points, mean over the grid's t) of layer grids from
    several seeds and, e.g., training steps: one row per (``by``, block) with the mean and SD over
    the seeds (``run`` column: one run per seed) and the number of seeds. Block 0 is the input
    embedding, the floor. Used to find where a profile has structure beyond its seed spread."""
    prof = 100 * layer_grids.groupby([by, "run", "block"])["accuracy"].mean()
    agg = prof.groupby([by, "block"]).agg(["mean", "std", "count"]).rename(columns={"count": "seeds"})
    return agg.reset_index()


def _read_runs(files: Iterable[Path], prefix: str) -> pd.DataFrame | None:
    frames = [pd.read_csv(p, dtype={"checkpoint_sha": str}, keep_default_na=False, na_values=[""])
              .assign(run=p.parent.name.removeprefix(prefix)) for p in sorted(files)]
    return pd.concat(frames, ignore_index=True) if frames else None


def load_study_tables(out: str | os.PathLike) -> StudyTables:
    """Every table of a study, read once."""
    paths = StudyPaths.of(out)
    t = paths.tables
    if not t.is_dir():
        raise FileNotFoundError(f"{t} not found: run the study first (`probe demo --out {paths.out}`)")
    metrics = paths.eval_metrics
    return StudyTables(
        study=json.loads(paths.study.read_text()) if paths.study.exists() else {},
        layer_grid=_read_runs(t.glob("layer_grid_*/layer_grid.csv"), "layer_grid_"),
        curves=_read_runs(t.glob("curves_*/curves.csv"), "curves_"),
        curves_similarity=_read_runs(t.glob("curves_*/curves_similarity.csv"), "curves_"),
        curves_blocks=_read_runs(t.glob("curves_*/curves_blocks.csv"), "curves_"),
        eval=pd.read_csv(metrics, dtype={"ckpt_sha": str}) if metrics.exists() else None,
        training={p.name: pd.read_csv(p / "metrics.csv") for p in sorted(paths.runs.glob("*"))
                  if (p / "metrics.csv").exists()},
        similarity={p.parent.name.removeprefix("similarity_"): pd.read_csv(p)
                    for p in sorted(t.glob("similarity_*/cka.csv"))},
        pca_png={p.parent.name.removeprefix("pca_"): p for p in sorted(t.glob("pca_*/pca.png"))},
    )
