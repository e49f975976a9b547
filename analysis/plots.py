"""Figures for the analysis suite (matplotlib / seaborn, headless).

Every function takes the result objects or tidy tables of the other ``analysis`` modules, a
``title`` and an optional ``meta`` mapping (model, weights, protocol, ...) rendered as a subtitle, so
each figure states what it shows, and returns the matplotlib ``Figure``. Nothing here writes a file:
``commands/`` saves figures with :func:`repdyn.core.files.save_figure` (atomic, PNG and optional PDF).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from repdyn.core.timesteps import format_t

from repdyn.analysis.correlation import linear_fit
from repdyn.analysis.diversity import pair_matrix

__all__ = [
    "plot_measure_panels",
    "MEASURE_LABELS",
    "describe",
    "heatmap",
    "layer_grid_heatmap",
    "cell_metric_heatmaps",
    "plot_similarity_curves",
    "plot_cka_grid",
    "plot_cka_panels",
    "plot_diversity",
    "plot_pca_grid",
    "plot_umap",
    "plot_correlation",
    "plot_attribution",
    "plot_curves",
]

# How a representation measure is named on a figure (one place for every command and the study).
MEASURE_LABELS = {"cknna": "CKNNA", "mutual_knn": "mutual kNN", "cycle_knn": "cycle kNN",
                  "unbiased_cka": "unbiased CKA", "lds": "LDS (local - distant cos)", "cds": "CDS (cos decay slope)",
                  "rmsc": "RMSC (RMS contrast)"}

_META_ORDER = ("model", "weights", "step", "block", "t", "protocol", "estimator", "n")


def describe(meta: Mapping[str, Any] | None) -> str:
    """'model=SiT-T · weights=ema · protocol=...' from a meta mapping (known keys first)."""
    if not meta:
        return ""
    keys = [k for k in _META_ORDER if k in meta] + [k for k in meta if k not in _META_ORDER]
    return " · ".join(f"{k}={meta[k]}" for k in keys if meta[k] is not None and meta[k] != "")


def _titles(fig: plt.Figure, title: str, meta: Mapping[str, Any] | None) -> None:
    sub = describe(meta)
    fig.suptitle(title + (f"\n{sub}" if sub else ""), fontsize=11)


def _annotate_ok(shape: tuple[int, int], annotate: bool | str) -> bool:
    if annotate == "auto":
        return shape[0] * shape[1] <= 256
    return bool(annotate)


def heatmap(
    matrix: np.ndarray,
    row_labels: Sequence[Any],
    col_labels: Sequence[Any] | None = None,
    title: str = "",
    meta: Mapping[str, Any] | None = None,
    annotate: bool | str = "auto",
    fmt: str = ".2f",
    cmap: str = "magma",
    vmin: float | None = None,
    vmax: float | None = None,
    cbar_label: str = "",
    xlabel: str = "",
    ylabel: str = "",
) -> plt.Figure:
    """Annotated heatmap of a (R, C) matrix (annotations when R*C <= 256 by default)."""
    m = np.asarray(matrix, dtype=float)
    col_labels = row_labels if col_labels is None else col_labels
    size = (max(4.5, 0.45 * m.shape[1] + 2.5), max(3.5, 0.4 * m.shape[0] + 1.8))
    fig, ax = plt.subplots(figsize=size)
    sns.heatmap(m, ax=ax, cmap=cmap, vmin=vmin, vmax=vmax, annot=_annotate_ok(m.shape, annotate), fmt=fmt,
                annot_kws={"fontsize": 7}, xticklabels=[str(c) for c in col_labels],
                yticklabels=[str(r) for r in row_labels], cbar_kws={"label": cbar_label}, square=m.shape[0] == m.shape[1])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    _titles(fig, title, meta)
    return fig


def plot_cka_grid(
    grid: Any,
    title: str = "CKA over (block, t)",
    meta: Mapping[str, Any] | None = None,
    cmap: str = "magma",
    vmin: float | None = 0.0,
    vmax: float | None = 1.0,
) -> plt.Figure:
    """Full (blocks*t)^2 matrix of a ``similarity.CKAGrid``: block-major order, white lines
    between blocks, block labels at the group centres and t labels on the cells when they fit."""
    m = np.asarray(grid.matrix, dtype=float)
    ka, kb = list(grid.keys_a), list(grid.keys_b)
    side = min(14.0, max(5.0, 0.16 * max(m.shape) + 3))
    fig, ax = plt.subplots(figsize=(side + 1.2, side), layout="constrained")
    im = ax.imshow(m, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest", aspect="equal")
    cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    cb.set_label("debiased CKA" if grid.meta.get("debiased", True) else "CKA")

    def groups(keys):
        out, start = [], 0
        for i in range(1, len(keys) + 1):
            if i == len(keys) or keys[i][0] != keys[start][0]:
                out.append((keys[start][0], start, i))
                start = i
        return out

    ga, gb = groups(ka), groups(kb)
    for _, s, _e in ga[1:]:
        ax.axhline(s - 0.5, color="white", lw=0.8)
    for _, s, _e in gb[1:]:
        ax.axvline(s - 0.5, color="white", lw=0.8)
    ax.set_yticks([(s + e - 1) / 2 for _, s, e in ga], [f"block {b}" for b, _, _ in ga], fontsize=8)
    ax.set_xticks([(s + e - 1) / 2 for _, s, e in gb], [f"block {b}" for b, _, _ in gb], fontsize=8, rotation=90)
    if len(ka) <= 40:
        ax.yaxis.remove_overlapping_locs = False  # else the t label at each block's centre row is dropped
        ax.set_yticks(range(len(ka)), [f"t={format_t(k[1])}" for k in ka], minor=True, fontsize=6)
        ax.tick_params(axis="y", which="minor", pad=55, length=0)
    ts = sorted({k[1] for k in ka})
    ax.set_xlabel(f"columns: block-major (block, t), t in {[format_t(t) for t in ts]}")
    ax.set_ylabel("rows: (block, t)")
    _titles(fig, title, meta)
    return fig


def plot_cka_panels(
    grid: Any,
    view: str = "block_by_block",
    title: str | None = None,
    meta: Mapping[str, Any] | None = None,
    ncols: int = 4,
    cmap: str = "magma",
    annotate: bool | str = "auto",
) -> plt.Figure:
    """Small multiples of a ``CKAGrid``: block x block per t (``view="block_by_block"``) or
    t x t per block (``view="t_by_t"``), one shared colour scale [0, 1]."""
    if view == "block_by_block":
        keys, get, lab, axis_name = grid.ts, grid.block_by_block, "t", "block"
    elif view == "t_by_t":
        keys, get, lab, axis_name = grid.blocks, grid.t_by_t, "block", "t"
    else:
        raise ValueError("view must be 'block_by_block' or 't_by_t'")
    ncols = min(ncols, len(keys))
    nrows = int(np.ceil(len(keys) / ncols))
    first = get(keys[0])[0]
    cell = max(2.6, 0.32 * first.shape[0] + 1.0)
    fig, axes = plt.subplots(nrows, ncols, figsize=(cell * ncols + 1.0, cell * nrows + 0.9), squeeze=False,
                             layout="constrained")
    ann = _annotate_ok(first.shape, annotate) and first.shape[0] <= 12
    for ax, k in zip(axes.flat, keys):
        m, rl, cl = get(k)
        sns.heatmap(m, ax=ax, vmin=0, vmax=1, cmap=cmap, cbar=False, square=True, annot=ann, fmt=".2f",
                    annot_kws={"fontsize": 6}, xticklabels=[format_t(c) for c in cl], yticklabels=[format_t(r) for r in rl])
        ax.set_title(f"{lab}={format_t(k)}", fontsize=9)
        ax.set_xlabel(axis_name, fontsize=8)
        ax.set_ylabel(axis_name, fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.colorbar(plt.cm.ScalarMappable(norm=matplotlib.colors.Normalize(0, 1), cmap=cmap), ax=axes.ravel().tolist(),
                 fraction=0.02, pad=0.02, label="debiased CKA" if grid.meta.get("debiased", True) else "CKA")
    default = "CKA block x block at each t" if view == "block_by_block" else "CKA t x t within each block"
    _titles(fig, title or default, meta)
    return fig


def plot_diversity(
    report: pd.DataFrame,
    terms: Sequence[str] = ("orthogonality", "token_cosine", "dispersion"),
    ts: Sequence[Hashable] | None = None,
    title: str = "DiverseDiT diversity terms per block pair",
    meta: Mapping[str, Any] | None = None,
) -> plt.Figure:
    """Rows = terms, columns = t; each panel the (L, L) block-pair matrix of that term."""
    ts = sorted(report["t"].unique()) if ts is None else list(ts)
    ranges = {"orthogonality": (-1, 1, "vlag"), "token_cosine": (0, 1, "magma"), "dispersion": (-1, 0, "magma_r"),
              "diversity": (-1, 1, "vlag")}
    L = len(set(report["block_a"]) | set(report["block_b"]))
    cell = max(2.6, 0.3 * L + 1.2)
    fig, axes = plt.subplots(len(terms), len(ts), figsize=(cell * len(ts) + 1.5, cell * len(terms) + 1.0),
                             squeeze=False, layout="constrained")
    for i, term in enumerate(terms):
        lo, hi, cmap = ranges.get(term, (None, None, "magma"))
        mats = [pair_matrix(report, term, t) for t in ts]
        if term == "dispersion":      # usually tiny in magnitude: use the data range, not [-1, 0]
            lo = float(np.nanmin([np.nanmin(m) for m, _ in mats]))
            hi = max(0.0, float(np.nanmax([np.nanmax(m) for m, _ in mats])))
            lo = lo if lo < hi else hi - 1e-6
        for j, (t, (m, blocks)) in enumerate(zip(ts, mats)):
            ax = axes[i, j]
            sns.heatmap(m, ax=ax, vmin=lo, vmax=hi, cmap=cmap, square=True, cbar=False,
                        annot=L <= 8, fmt=".2g" if term == "dispersion" else ".2f", annot_kws={"fontsize": 6},
                        xticklabels=blocks, yticklabels=blocks)
            ax.set_title(f"{term}, t={format_t(t)}", fontsize=9)
            ax.set_xlabel("block", fontsize=8)
            ax.set_ylabel("block", fontsize=8)
            ax.tick_params(labelsize=7)
        fig.colorbar(plt.cm.ScalarMappable(norm=matplotlib.colors.Normalize(lo, hi), cmap=cmap),
                     ax=axes[i, :].tolist(), fraction=0.025, pad=0.01, label=term)
    _titles(fig, title, meta)
    return fig


def plot_pca_grid(
    pca_grid: Any,
    images: Sequence[int] | None = None,
    inputs: np.ndarray | None = None,
    title: str = "Patch-token PCA (shared basis per block, fixed colour scale)",
    meta: Mapping[str, Any] | None = None,
    image_labels: Sequence[str] | None = None,
) -> plt.Figure:
    """PCA-RGB maps: one panel group per image, side by side; rows = blocks, columns = t.

    inputs: optional (N_img, H, W[, C]) images in [0, 1] or [-1, 1] shown above each group.
    images: positions (within the grid's rendered images) to show (default all, max 4).
    image_labels: one title per position of the grid (e.g. dataset index and class); default
    "image <position>".
    """
    some = next(iter(pca_grid.images.values()))
    n_img = some.shape[0]
    images = list(range(min(n_img, 4))) if images is None else list(images)
    blocks, ts = pca_grid.blocks, pca_grid.ts
    nrows = len(blocks) + (1 if inputs is not None else 0)
    ncols = len(images) * len(ts)
    s = 1.15
    heights = ([1.25] if inputs is not None else []) + [1.0] * len(blocks)
    fig, axes = plt.subplots(nrows, ncols, figsize=(s * ncols + 0.8, s * sum(heights) + 1.2), squeeze=False,
                             gridspec_kw={"wspace": 0.05, "hspace": 0.12, "height_ratios": heights})
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        for sp in ax.spines.values():
            sp.set_visible(False)
    r0 = 0
    if inputs is not None:
        inp = np.asarray(inputs, dtype=float)
        if inp.min() < 0:
            inp = (inp + 1) / 2
        for gi, im_idx in enumerate(images):
            img = np.clip(inp[im_idx], 0, 1)
            if img.ndim == 3 and img.shape[0] in (1, 3) and img.shape[-1] not in (1, 3):
                img = np.moveaxis(img, 0, -1)
            ax = axes[0, gi * len(ts)]
            ax.imshow(img.squeeze(), cmap="gray" if img.squeeze().ndim == 2 else None, vmin=0, vmax=1)
            ax.set_title(image_labels[im_idx] if image_labels is not None else f"image {im_idx}", fontsize=8)
            ax.set_anchor("S")
            for j in range(1, len(ts)):
                axes[0, gi * len(ts) + j].axis("off")
        axes[0, 0].set_ylabel("input", fontsize=8)
        r0 = 1
    for bi, b in enumerate(blocks):
        for gi, im_idx in enumerate(images):
            for tj, t in enumerate(ts):
                ax = axes[r0 + bi, gi * len(ts) + tj]
                ax.imshow(pca_grid.images[(b, t)][im_idx], interpolation="nearest")
                if bi == len(blocks) - 1:
                    ax.set_xlabel(f"t={format_t(t)}", fontsize=7)
                if bi == 0 and inputs is None and tj == 0:
                    ax.set_title(image_labels[im_idx] if image_labels is not None else f"image {im_idx}",
                                 fontsize=8, loc="left")
                if gi == 0 and tj == 0:
                    ax.set_ylabel(f"block {b}", fontsize=8)
    _titles(fig, title, {**(meta or {}), "basis": pca_grid.meta.get("basis")})
    return fig


def plot_umap(
    embeddings: Mapping[Any, np.ndarray],
    labels: Sequence[int] | np.ndarray,
    class_names: Sequence[str] | None = None,
    title: str = "UMAP of pooled block features",
    meta: Mapping[str, Any] | None = None,
    ncols: int = 4,
    point_size: float = 6.0,
) -> plt.Figure:
    """One scatter panel per key ((block, t) cell, or t for AlignedUMAP), coloured by class."""
    labels = np.asarray(labels)
    keys = list(embeddings)
    ncols = min(ncols, len(keys))
    nrows = int(np.ceil(len(keys) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.3 * ncols + 1.6, 3.2 * nrows + 0.8), squeeze=False,
                             layout="constrained")
    classes = np.unique(labels)
    palette = sns.color_palette("tab10" if len(classes) <= 10 else "husl", len(classes))
    for ax, k in zip(axes.flat, keys):
        e = np.asarray(embeddings[k])
        for c, col in zip(classes, palette):
            sel = labels == c
            ax.scatter(e[sel, 0], e[sel, 1], s=point_size, color=col, alpha=0.8, linewidths=0,
                       label=class_names[c] if class_names is not None else str(c))
        if isinstance(k, tuple) and len(k) == 2:
            ax.set_title(f"block {k[0]}, t={format_t(k[1])}", fontsize=9)
        else:
            ax.set_title(f"t={format_t(k)}" if not isinstance(k, str) else k, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel("UMAP-1", fontsize=8)
        ax.set_ylabel("UMAP-2", fontsize=8)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    handles, labs = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labs, loc="outside right center", fontsize=8, markerscale=2.5, title="class", frameon=False)
    _titles(fig, title, meta)
    return fig


def plot_correlation(
    x: Sequence[float],
    y: Sequence[float],
    table: pd.DataFrame,
    xlabel: str = "probe accuracy",
    ylabel: str = "FID",
    point_labels: Sequence[Any] | None = None,
    hue: Sequence[float] | None = None,
    hue_label: str = "step",
    title: str = "Probe accuracy vs generation quality",
    meta: Mapping[str, Any] | None = None,
) -> plt.Figure:
    """Scatter with least-squares fit line and the correlation table as text (r [CI], p)."""
    xa, ya = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    sc = ax.scatter(xa, ya, c=None if hue is None else np.asarray(hue, dtype=float), cmap="viridis",
                    s=36, edgecolors="black", linewidths=0.4, zorder=3)
    if hue is not None:
        cb = fig.colorbar(sc, ax=ax, label=hue_label)
        cb.locator = MaxNLocator(integer=True)  # steps are whole numbers
        cb.update_ticks()
    if np.isfinite(xa).sum() >= 2:
        slope, icpt = linear_fit(xa, ya)
        xs = np.linspace(np.nanmin(xa), np.nanmax(xa), 50)
        ax.plot(xs, slope * xs + icpt, color="crimson", lw=1.5, label=f"fit: y = {slope:.3g} x {'-' if icpt < 0 else '+'} {abs(icpt):.3g}", zorder=2)
        ax.legend(loc="best", fontsize=8)
    if point_labels is not None:
        for xi, yi, lab in zip(xa, ya, point_labels):
            ax.annotate(str(lab), (xi, yi), textcoords="offset points", xytext=(4, 3), fontsize=7)
    lines = []
    for _, r in table.iterrows():
        lines.append(f"{r['method']:<16s} r={r['r']:+.2f} [{r['ci_low']:+.2f}, {r['ci_high']:+.2f}]  p={r['p_value']:.2g}")
    n = int(table["n"].iloc[0]) if len(table) else len(xa)
    lines.append(f"n={n}, 95% bootstrap CI" + ("  (n < 5: unreliable)" if n < 5 else ""))
    ax.text(0.0, -0.16, "\n".join(lines), transform=ax.transAxes, fontsize=7.5,
            family="monospace", va="top", ha="left")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    _titles(fig, title, meta)
    return fig


def plot_attribution(
    images: np.ndarray,
    patch_maps: np.ndarray,
    targets: Sequence[Any] | None = None,
    class_names: Sequence[str] | None = None,
    title: str = "Integrated gradients of the probe logit, per patch",
    meta: Mapping[str, Any] | None = None,
    alpha: float = 0.55,
    panel_titles: Sequence[str] | None = None,
) -> plt.Figure:
    """Each image with its per-patch attribution overlaid (diverging colours, symmetric scale).

    images: (N, C, H, W) or (N, H, W[, C]) in [-1, 1] or [0, 1]; patch_maps: (N, h, w).
    panel_titles: one title per image (overrides the "class ..." titles from ``targets``).
    """
    imgs = np.asarray(images, dtype=float)
    if imgs.ndim == 4 and imgs.shape[1] in (1, 3) and imgs.shape[-1] not in (1, 3):
        imgs = np.moveaxis(imgs, 1, -1)
    if imgs.min() < 0:
        imgs = (imgs + 1) / 2
    imgs = np.clip(imgs, 0, 1)
    maps = np.asarray(patch_maps, dtype=float)
    n = len(maps)
    fig, axes = plt.subplots(2, n, figsize=(2.0 * n + 1.4, 4.8), squeeze=False, layout="constrained")
    for i in range(n):
        img = imgs[i].squeeze()
        h, w = img.shape[:2]
        lim = np.abs(maps[i]).max() or 1.0
        for r in range(2):
            axes[r, i].imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1)
            axes[r, i].set_xticks([])
            axes[r, i].set_yticks([])
        im = axes[1, i].imshow(maps[i], cmap="RdBu_r", vmin=-lim, vmax=lim, alpha=alpha,
                               extent=(-0.5, w - 0.5, h - 0.5, -0.5), interpolation="nearest")
        lab = ""
        if targets is not None:
            c = targets[i]
            lab = f"class {class_names[c] if class_names is not None else c}"
        if panel_titles is not None:
            lab = panel_titles[i]
        axes[0, i].set_title(lab or f"image {i}", fontsize=8)
    axes[0, 0].set_ylabel("input", fontsize=8)
    axes[1, 0].set_ylabel("attribution", fontsize=8)
    cb = fig.colorbar(im, ax=axes[1, :].tolist(), fraction=0.03, pad=0.01)
    cb.set_label("per-patch attribution\n(scale per image)", fontsize=7)
    cb.set_ticks([])
    _titles(fig, title, meta)
    return fig


def plot_curves(
    frame: pd.DataFrame,
    x: str,
    y: str,
    hue: str | None = None,
    style: str | None = None,
    title: str = "",
    meta: Mapping[str, Any] | None = None,
    xlabel: str | None = None,
    ylabel: str | None = None,
    logx: bool = False,
    errorbar: str | tuple | None = ("ci", 95),
) -> plt.Figure:
    """Line plot of a tidy table (e.g. probe accuracy or CKA vs step, per weights / block). Rows that
    share x and hue/style (e.g. training seeds of one arm) are drawn as their mean with an
    ``errorbar`` band (seaborn's: ``"sd"`` for the seed spread)."""
    for c in [x, y] + [c for c in (hue, style) if c]:
        if c not in frame.columns:
            raise ValueError(f"column {c!r} not in the table")
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    sns.lineplot(data=frame, x=x, y=y, hue=hue, style=style, marker="o", ax=ax, errorbar=errorbar,
                 palette="viridis" if hue and pd.api.types.is_numeric_dtype(frame[hue]) else None)
    if logx:
        ax.set_xscale("log")
    elif pd.api.types.is_integer_dtype(frame[x]):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # blocks and steps are whole numbers
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(ylabel or y)
    ax.grid(alpha=0.3)
    if hue or style:
        ax.legend(fontsize=8, bbox_to_anchor=(1.02, 1), loc="upper left", frameon=False,
                  title=" / ".join(f"{c} =" if c == "t" else c for c in (hue, style) if c), title_fontsize=8)
    _titles(fig, title or f"{y} vs {x}", meta)
    return fig


def _fmt_lsnr(v: float) -> str:
    if math.isinf(v):
        return "+inf" if v > 0 else "-inf"
    return f"{v:+.1f}"


def layer_grid_heatmap(df: pd.DataFrame, title: str | None = None, value: str = "accuracy",
                       meta: Mapping[str, Any] | None = None) -> plt.Figure:
    """Probe accuracy (%) of one checkpoint's layer grid: blocks (rows, 1 at the top, block 0 = the
    input embedding when present) x t (columns, clean -> noisy, with log-SNR under each t), the best
    cell boxed in red. Serves ``probe layer-grid`` and the study's figures.

    ``df``: the tidy layer-grid table of one checkpoint x weights.
    """
    if df.empty:
        raise ValueError("no rows to plot")
    if "checkpoint" in df.columns and len(df[["checkpoint", "weights"]].drop_duplicates()) > 1:
        raise ValueError("layer_grid_heatmap draws one checkpoint x weights; filter the table first")
    grid = df.pivot_table(index="block", columns="t", values=value, aggfunc="mean").sort_index()
    grid = grid[sorted(grid.columns, key=float)]
    lsnr = df.drop_duplicates("t").set_index("t")["log_snr"]
    cols = [f"{format_t(t)}\n{_fmt_lsnr(float(lsnr[t]))}" for t in grid.columns]
    data = grid.to_numpy(dtype=float) * 100.0
    nb, nt = data.shape
    fig, ax = plt.subplots(figsize=(1.6 + 0.75 * nt, 1.9 + 0.42 * nb))
    sns.heatmap(pd.DataFrame(data, index=grid.index, columns=cols), ax=ax, annot=nb * nt <= 400,
                fmt=".0f" if nb * nt > 120 else ".1f", cmap="viridis", vmin=max(0.0, np.nanmin(data) - 5),
                vmax=min(100.0, np.nanmax(data) + 2),
                cbar_kws={"label": "top-1 accuracy (%)" if value == "accuracy" else value},
                annot_kws={"fontsize": 8 if nt <= 12 else 6}, linewidths=0.4, linecolor="white")
    ax.set_ylabel("block (1-based output; 0 = input embedding)" if 0 in grid.index else "block (1-based output)")
    ax.set_xlabel("t (larger = noisier)  /  log-SNR        red box: best cell")
    ax.tick_params(axis="x", labelsize=8, rotation=0)
    ax.tick_params(axis="y", rotation=0)
    if title is None:
        r = df.iloc[0]
        step = "" if pd.isna(r.get("step")) else f" @ step {int(r['step'])}"
        title = (f"{r.get('model', '?')}{step} ({Path(str(r['checkpoint'])).name}, {r['weights']} weights)\n"
                 f"{r.get('probe', '?')} probe, label={r.get('label_policy', '?')}, pooling={r.get('pooling', '?')}, "
                 f"{r.get('dataset', '?')} n_train={r.get('n_train', '?')} n_test={r.get('n_test', '?')}")
    sub = describe(meta)
    ax.set_title(title + (f"\n{sub}" if sub else ""), fontsize=9)
    best = np.unravel_index(np.nanargmax(data), data.shape)
    ax.add_patch(plt.Rectangle((best[1], best[0]), 1, 1, fill=False, edgecolor="red", lw=1.8))
    fig.tight_layout()
    return fig


def cell_metric_heatmaps(df: pd.DataFrame, metrics: Sequence[str], title: str, meta: Mapping[str, Any] | None = None,
                         value: str = "value", best: Mapping[str, str] | None = None,
                         labels: Mapping[str, str] | None = None) -> plt.Figure:
    """One heatmap per metric of a tidy (block, t, log_snr, metric, value) table: blocks (rows, 1 at
    the top) x t (columns, clean -> noisy, log-SNR under each t), each panel on its own colour scale
    with its best cell boxed in red (``best[metric]``: ``"max"`` (default) or ``"min"``). Serves
    ``probe align`` and ``probe spatial``."""
    if df.empty:
        raise ValueError("no rows to plot")
    metrics = list(metrics)
    ts = sorted(df["t"].unique(), key=float)
    blocks = sorted(df["block"].unique())
    lsnr = df.drop_duplicates("t").set_index("t")["log_snr"] if "log_snr" in df.columns else None
    cols = [f"{format_t(t)}\n{_fmt_lsnr(float(lsnr[t]))}" if lsnr is not None else format_t(t) for t in ts]
    nb, nt = len(blocks), len(ts)
    w, h = 1.6 + 0.75 * nt, 1.9 + 0.42 * nb
    fig, axes = plt.subplots(1, len(metrics), figsize=(w * len(metrics), h + 0.6), squeeze=False, layout="constrained")
    for ax, m in zip(axes[0], metrics):
        sub = df[df["metric"] == m]
        grid = sub.pivot_table(index="block", columns="t", values=value, aggfunc="mean").reindex(index=blocks, columns=ts)
        data = grid.to_numpy(dtype=float)
        sns.heatmap(pd.DataFrame(data, index=blocks, columns=cols), ax=ax, annot=nb * nt <= 200, fmt=".3g",
                    cmap="viridis", cbar_kws={"label": (labels or {}).get(m, m)}, annot_kws={"fontsize": 7},
                    linewidths=0.4, linecolor="white")
        ax.set_title((labels or {}).get(m, m), fontsize=10)
        ax.set_xlabel("t (larger = noisier) / log-SNR")
        ax.set_ylabel("block (1-based output)")
        ax.tick_params(axis="x", labelsize=8, rotation=0)
        ax.tick_params(axis="y", rotation=0)
        if np.isfinite(data).any():
            pick = np.nanargmin if (best or {}).get(m, "max") == "min" else np.nanargmax
            r, c = np.unravel_index(pick(data), data.shape)
            ax.add_patch(plt.Rectangle((c, r), 1, 1, fill=False, edgecolor="red", lw=1.8))
    _titles(fig, title + "  (red box: best cell)", meta)
    return fig


_SIM_PANELS = (
    ("cka_mean_offdiag", "mean off-diagonal CKA between blocks", "debiased CKA"),
    ("cka_student_teacher", "CKA student cell vs teacher cell", "debiased CKA"),
    ("orthogonality", "orthogonality (pooled cosine)", "cosine"),
    ("token_cosine", "token |cosine| (MI proxy)", "|cosine|"),
    ("dispersion", "channel dispersion", "dispersion (<= 0)"),
    ("diversity", "DiverseDiT total (mean of 3 terms)", "value"),
)
_UNIT_BOUNDED = {"cka_mean_offdiag", "cka_student_teacher", "orthogonality", "token_cosine"}  # at most 1
MIN_Y_SPAN = 0.02  # the smallest y range drawn: differences below it are noise, not trends


def plot_similarity_curves(frame: pd.DataFrame, title: str, meta: Mapping[str, Any] | None,
                           st_label: str) -> plt.Figure:
    """One panel per similarity / diversity quantity over training steps, each with its own y scale
    (they differ by orders of magnitude), but never narrower than :data:`MIN_Y_SPAN`, so a change of
    1e-7 is drawn flat instead of as a trend."""
    fig, axes = plt.subplots(2, 3, figsize=(12.5, 6.4), sharex=True, layout="constrained")
    for ax, (col, name, ylab) in zip(axes.flat, _SIM_PANELS):
        vals = pd.to_numeric(frame[col], errors="coerce")
        ax.plot(frame["step"], vals, marker="o", color="tab:blue")
        ax.set_title(name if col != "cka_student_teacher" else f"{name}\n{st_label}", fontsize=9)
        ax.set_ylabel(ylab, fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
        ax.ticklabel_format(axis="y", useOffset=False)
        if vals.notna().any():
            lo, hi = float(vals.min()), float(vals.max())
            if hi - lo < MIN_Y_SPAN:
                mid = (hi + lo) / 2
                ax.set_ylim(mid - MIN_Y_SPAN / 2, mid + MIN_Y_SPAN / 2)
            if col in _UNIT_BOUNDED:
                bottom, top = ax.get_ylim()
                ax.set_ylim(max(bottom, -1.0 if col == "orthogonality" else 0.0), min(top, 1.0))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes[-1]:
        ax.set_xlabel("training step", fontsize=9)
    _titles(fig, title, meta)
    return fig



def plot_measure_panels(frame: pd.DataFrame, measures: Sequence[str], *, hue: str, title: str,
                        meta: Mapping[str, Any] | None = None, labels: Mapping[str, str] | None = None,
                        style: str | None = None, x: str = "step", xlabel: str = "training step") -> plt.Figure:
    """One panel per measure (CKNNA to an encoder, LDS, ...) over ``x``, one line per ``hue`` (and
    ``style``) value, as REPA's alignment-over-training figure. frame: tidy rows ``x, measure, value``
    (+ hue, style). Several rows per point (training seeds) are drawn as their mean with a +-1 SD
    band; one row per point with an ``se`` column (e.g. over images) as value +- se."""
    measures = [m for m in measures if (frame["measure"] == m).any()]
    if not measures:
        raise ValueError("plot_measure_panels: no rows for the requested measures")
    ncol = min(3, len(measures))
    nrow = math.ceil(len(measures) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.3 * ncol, 3.3 * nrow), squeeze=False, layout="constrained")
    hues = sorted(frame[hue].unique())
    colors = dict(zip(hues, sns.color_palette("viridis_r" if hue == "block" else "tab10", len(hues))))
    styles = sorted(frame[style].unique()) if style else [None]
    dashes = dict(zip(styles, ("-", "--", ":", "-.")))
    for ax, m in zip(axes.flat, measures):
        d = frame[frame["measure"] == m]
        for h in hues:
            for st in styles:
                g = d[(d[hue] == h) & ((d[style] == st) if style else True)]
                if g.empty:
                    continue
                agg = g.groupby(x)["value"].agg(["mean", "std", "count"]).reset_index()
                if (agg["count"] > 1).any():
                    band = agg["std"].fillna(0.0)
                elif "se" in g.columns:
                    band = g.sort_values(x)["se"].to_numpy(dtype=float)
                else:
                    band = None
                name = f"{hue} {h}" if hue == "block" else str(h)
                ax.plot(agg[x], agg["mean"], marker="o", ms=3, color=colors[h], ls=dashes.get(st, "-"),
                        label=name + (f", {style} {st}" if style else ""))
                if band is not None and np.isfinite(band).any():
                    ax.fill_between(agg[x], agg["mean"] - band, agg["mean"] + band, color=colors[h], alpha=0.15, lw=0)
        ax.set_title((labels or {}).get(m, m), fontsize=9)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(xlabel, fontsize=9)
    for ax in list(axes.flat)[len(measures):]:
        ax.set_visible(False)
    handles, names = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside right center", fontsize=8)
    _titles(fig, title, meta)
    return fig
