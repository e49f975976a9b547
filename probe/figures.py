"""Figures for probe results (to be consolidated with ``analysis/plots.py`` later).

The layer-grid heatmap states everything needed to read it without the CSV: model, step,
weights (EMA / online), label policy, probe and sample counts, with t and log-SNR on the x axis
so DiT and SiT grids can be compared by eye.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["layer_grid_heatmap", "save_figure_atomic"]


def save_figure_atomic(fig, path: str | os.PathLike, dpi: int = 150) -> Path:
    """``fig.savefig`` into a temp file next to ``path``, then ``os.replace`` (no torn PNGs)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _fmt_t(t) -> str:
    tf = float(t)
    return str(int(tf)) if tf == int(tf) and abs(tf) >= 1 else f"{tf:g}"


def _fmt_lsnr(v: float) -> str:
    if math.isinf(v):
        return "+inf" if v > 0 else "-inf"
    return f"{v:+.1f}"


def layer_grid_heatmap(df: pd.DataFrame, path: str | os.PathLike | None = None, title: str | None = None,
                       value: str = "accuracy"):
    """Blocks (rows, 1 at the top) x t (columns, clean -> noisy), annotated in percent.

    ``df``: the tidy table of :func:`probe.layer_grid.run_layer_grid` for one checkpoint x weights.
    Returns the matplotlib figure (closed after saving if ``path`` is given).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import seaborn as sns

    if df.empty:
        raise ValueError("no rows to plot")
    keys = df[["checkpoint", "weights"]].drop_duplicates()
    if len(keys) > 1:
        raise ValueError("layer_grid_heatmap draws one checkpoint x weights; filter the table first")
    grid = df.pivot_table(index="block", columns="t", values=value, aggfunc="mean").sort_index()
    grid = grid[sorted(grid.columns, key=float)]
    lsnr = df.drop_duplicates("t").set_index("t")["log_snr"]
    cols = [f"{_fmt_t(t)}\n{_fmt_lsnr(float(lsnr[t]))}" for t in grid.columns]
    data = grid.to_numpy(dtype=float) * 100.0
    nb, nt = data.shape
    fig, ax = plt.subplots(figsize=(1.6 + 0.75 * nt, 1.9 + 0.42 * nb))
    annot_fmt = ".0f" if nb * nt > 120 else ".1f"
    sns.heatmap(pd.DataFrame(data, index=grid.index, columns=cols), ax=ax, annot=nb * nt <= 400, fmt=annot_fmt,
                cmap="viridis", vmin=max(0.0, np.nanmin(data) - 5), vmax=min(100.0, np.nanmax(data) + 2),
                cbar_kws={"label": "top-1 accuracy (%)" if value == "accuracy" else value},
                annot_kws={"fontsize": 8 if nt <= 12 else 6}, linewidths=0.4, linecolor="white")
    ax.set_ylabel("block (1-based output)")
    ax.set_xlabel("t (larger = noisier)  /  log-SNR        red box: best cell")
    ax.tick_params(axis="x", labelsize=8, rotation=0)
    ax.tick_params(axis="y", rotation=0)
    if title is None:
        r = df.iloc[0]
        step = "" if pd.isna(r.get("step")) else f" @ step {int(r['step'])}"
        title = (f"{r.get('model', '?')}{step} ({Path(str(r['checkpoint'])).name}, {r['weights']} weights)\n"
                 f"{r.get('probe', '?')} probe, label={r.get('label_policy', '?')}, pooling={r.get('pooling', '?')}, "
                 f"{r.get('dataset', '?')} n_train={r.get('n_train', '?')} n_test={r.get('n_test', '?')}")
    ax.set_title(title, fontsize=9)
    best = np.unravel_index(np.nanargmax(data), data.shape)
    ax.add_patch(plt.Rectangle((best[1], best[0]), 1, 1, fill=False, edgecolor="red", lw=1.8))
    fig.tight_layout()
    if path is not None:
        save_figure_atomic(fig, path)
        plt.close(fig)
    return fig
