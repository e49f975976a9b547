"""Orchestration behind the analysis commands: checkpoint -> cached grid features -> analysis -> files.

``probe similarity | diversity | pca | umap | attribute | correlate`` each call one ``run_*``
function here (``probe curves`` lives in :mod:`analysis.dynamics`). Every function

* loads the checkpoint(s) and extracts the (block, t) features with :func:`probe.grid.extract_grid`
  through a :class:`probe.cache.FeatureCache`, so nothing already cached (by ``layer-grid``, another
  command, or an earlier run) is recomputed and every command sees the same images and noise;
* calls the pure functions of ``analysis/`` (similarity, diversity, pca, embedding, correlation,
  attribution);
* writes tidy tables (CSV; matrices also as NPZ) and figures whose titles state model, step,
  weights, block, t and protocol. Tables and figures are written atomically (temp file + rename),
  and the table last, so a failed run never leaves a table that looks complete.

Argument errors are ``ValueError`` with a one-line message (the CLI prints ``error: ...``).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

__all__ = ["FeatureSpec", "load_features", "parse_cells", "cell_t", "default_out", "write_table", "write_npz",
           "describe_grid", "run_similarity", "cross_similarity", "run_diversity", "run_pca", "run_umap",
           "run_attribute", "run_correlate", "prepare_join", "JOIN_KEYS"]


# ---------------------------------------------------------------------------------------------
# Shared plumbing: features, cells, output files
# ---------------------------------------------------------------------------------------------


@dataclass
class FeatureSpec:
    """How features are extracted (the protocol every command states in its titles).

    ``cache_dir=None`` disables the cache. ``split`` defaults to the official test split: the
    analyses describe the representation, they do not fit anything that could overfit it.
    """

    data: str | None = None
    split: str = "test"
    n: int = 512
    label: str = "null"
    pooling: str = "mean"
    seed: int = 0
    batch_size: int = 256
    device: str = "auto"
    cache_dir: str | os.PathLike | None = ".repdyn_cache/features"
    family: str | None = None
    time_convention: str | None = None
    trust: bool = False
    progress: bool = True


def _load_ck(path: str | os.PathLike, weights: str, spec: FeatureSpec):
    from training.checkpoint import load_checkpoint

    if weights not in ("ema", "model"):
        raise ValueError(f"--weights must be ema or model, got {weights!r}")
    return load_checkpoint(path, weights=weights, family=spec.family, time_convention=spec.time_convention,
                           trust=spec.trust)


def _dataset(ck, spec: FeatureSpec, split: str | None = None):
    from training.data import make_dataset

    return make_dataset(spec.data or ck.meta.get("data") or "fashion-mnist", split or spec.split)


def load_features(ck, spec: FeatureSpec, *, blocks: Sequence[int] | None = None, ts: Sequence | None = None,
                  split: str | None = None, n: int | None = None, pooling: str | None = None,
                  indices: Sequence[int] | None = None, dataset=None):
    """Grid features of a loaded checkpoint under ``spec`` (overrides per call); returns (dataset, grid)."""
    from probe.cache import FeatureCache
    from probe.grid import extract_grid

    ds = dataset if dataset is not None else _dataset(ck, spec, split)
    cache = FeatureCache(spec.cache_dir) if spec.cache_dir is not None else None
    g = extract_grid(ck, ds, blocks=blocks, ts=ts, n_samples=n if n is not None else spec.n,
                     label_policy=spec.label, pooling=pooling or spec.pooling, batch_size=spec.batch_size,
                     seed=spec.seed, device=spec.device, cache=cache, split=split or spec.split, indices=indices,
                     progress=spec.progress)
    return ds, g


def _family_nt(ck) -> tuple[str, int]:
    return ck.meta["family"], int(ck.meta.get("num_timesteps", 1000) or 1000)


def cell_t(ck, t) -> float | int:
    """One t in the checkpoint family's canonical form (SiT float, DiT int), validated."""
    from probe.grid import validate_ts

    fam, nt = _family_nt(ck)
    return validate_ts([t], fam, nt)[0]


def parse_cells(cells: Sequence[str | tuple] | None) -> list[tuple[int, float]]:
    """``["2,0.5", "4,0.3"]`` (or tuples) -> [(2, 0.5), (4, 0.3)]; a clear error otherwise."""
    out = []
    for c in cells or []:
        if isinstance(c, tuple):
            b, t = c
        else:
            parts = [p.strip() for p in str(c).replace(":", ",").split(",") if p.strip()]
            if len(parts) != 2:
                raise ValueError(f"a cell is 'block,t' (e.g. 4,0.5), got {c!r}")
            b, t = parts
        try:
            out.append((int(b), float(t)))
        except ValueError:
            raise ValueError(f"a cell is 'block,t' with an integer block and a numeric t, got {c!r}") from None
    return out


def _default_blocks(depth: int, max_blocks: int) -> list[int]:
    """All blocks for shallow models, else ``max_blocks`` evenly spaced ones including 1 and depth."""
    if depth <= max_blocks:
        return list(range(1, depth + 1))
    return sorted({int(round(x)) for x in np.linspace(1, depth, max_blocks)})


def _default_ts(ck, few: bool) -> list:
    """The layer-grid default, or SRA's PCA times (0.1, 0.3, 0.5, 0.7; DiT analogues) when ``few``."""
    from probe.grid import default_ts

    fam, nt = _family_nt(ck)
    if not few:
        return default_ts(fam, nt)
    return [0.1, 0.3, 0.5, 0.7] if fam == "sit" else [int(f * nt) for f in (0.1, 0.3, 0.5, 0.7)]


def default_out(kind: str, ckpt: str | os.PathLike, weights: str) -> Path:
    """``figures/<kind>/<run>-<ckpt stem>-<weights>``: one folder per analysed checkpoint and weights."""
    p = Path(ckpt).resolve()
    run = p.parent.parent.name if p.parent.name == "checkpoints" else p.parent.name
    return Path("figures") / kind / f"{run}-{p.stem}-{weights}"


def write_table(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    from probe.cache import atomic_write_text

    return atomic_write_text(path, df.to_csv(index=False))


def write_npz(path: str | os.PathLike, **arrays: Any) -> Path:
    from probe.cache import atomic_write_bytes

    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return atomic_write_bytes(path, buf.getvalue())


def _weights_word(weights: str) -> str:
    return "EMA" if weights == "ema" else "online"


def describe_grid(ck, g, **extra: Any) -> dict[str, Any]:
    """Title metadata: model, step, weights, protocol (data/split, n, label policy, pooling, seed)."""
    m = g.meta
    proto = (f"{m['dataset']}/{m['split']} n={m['n_samples']}, label={m['label_policy']}, "
             f"pooling={m['pooling']}, seed={m['seed']}")
    d = {"model": m.get("model"), "step": ck.step, "weights": _weights_word(ck.weights), "protocol": proto}
    d.update(extra)
    return d


def _fmt_t(t) -> str:
    return f"{t:g}" if isinstance(t, float) else str(t)


def _check_n(n: int, debiased: bool) -> None:
    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    if debiased and n < 4:
        raise ValueError(f"too few samples for the debiased CKA estimator: --n {n} (needs >= 4, use a few "
                         "hundred) or pass --biased")
    if n < 2:
        raise ValueError(f"CKA needs at least 2 samples, got --n {n}")


def _prepare_out(out: str | os.PathLike | None, kind: str, ckpt, weights: str) -> Path:
    path = Path(out) if out is not None else default_out(kind, ckpt, weights)
    path.mkdir(parents=True, exist_ok=True)
    return path


# ---------------------------------------------------------------------------------------------
# probe similarity
# ---------------------------------------------------------------------------------------------


def cross_similarity(ga, gb, debiased: bool = True, device: str | None = None, **kw: Any):
    """(cells_a x cells_b) CKA between two grids that must hold the *same* inputs (and noise).

    Two grids are comparable only row by row; this refuses grids with different sample counts
    or different images instead of returning a meaningless number.
    """
    from analysis.similarity import cka_grid

    na, nb = len(ga.labels), len(gb.labels)
    if na != nb:
        raise ValueError(f"mismatched sample counts between models: {na} vs {nb}; both must see the same "
                         "images (same --data, --split, --n, --seed)")
    if not np.array_equal(np.asarray(ga.indices), np.asarray(gb.indices)) or ga.meta.get("dataset") != gb.meta.get("dataset"):
        raise ValueError("the two models saw different images (dataset, split or sample set differ); use the "
                         "same --data, --split, --n and --seed for both")
    fa = {(b, t): ga.features[(b, t)] for b in ga.blocks for t in ga.ts}
    fb = {(b, t): gb.features[(b, t)] for b in gb.blocks for t in gb.ts}
    return cka_grid(fa, fb, blocks=None, ts=None, debiased=debiased, device=device, **kw)


def _cka_tidy(grid, log_snr_a: dict, log_snr_b: dict, cosine: np.ndarray | None) -> pd.DataFrame:
    df = grid.to_frame("cka")
    df.insert(2, "log_snr_a", df["t_a"].map(lambda t: log_snr_a[t]))
    df.insert(5, "log_snr_b", df["t_b"].map(lambda t: log_snr_b[t]))
    if cosine is not None:
        df["cosine"] = cosine.reshape(-1)
    return df


def _cosine_or_none(fa: list, fb: list | None) -> np.ndarray | None:
    """Per-sample cosine between cells (same width only, e.g. blocks of one architecture)."""
    from analysis.similarity import cosine_matrix

    widths = {np.shape(x)[-1] for x in fa + (fb or [])}
    if len(widths) != 1:
        return None
    return cosine_matrix(fa, fb, mode="per_sample")


def run_similarity(ckpt: str | os.PathLike, spec: FeatureSpec, *, weights: str = "ema",
                   other: str | os.PathLike | None = None, other_weights: str | None = None,
                   blocks: Sequence[int] | None = None, ts: Sequence | None = None, debiased: bool = True,
                   method: str = "auto", out: str | os.PathLike | None = None, pdf: bool = False) -> dict[str, Any]:
    """CKA (debiased by default) and per-sample cosine over the (block, t) grid.

    Within one model: the full (blocks*t)^2 matrix, plus block x block per t and t x t per block
    figures. With ``other`` and/or ``other_weights`` (teacher EMA vs student online, checkpoint i vs
    j, SRA vs baseline): the cross-model (cells_a x cells_b) matrix on the same images and noise.
    Writes ``cka.csv`` (tidy: block_a, t_a, log_snr_a, block_b, t_b, log_snr_b, cka, cosine),
    ``cka.npz`` (matrices + keys) and the figures; returns their paths.
    """
    from analysis import plots
    from analysis.similarity import cka_grid

    _check_n(spec.n, debiased)
    ck = _load_ck(ckpt, weights, spec)
    ds, ga = load_features(ck, spec, blocks=blocks, ts=ts)
    cross = other is not None or (other_weights is not None and other_weights != weights)
    outdir = _prepare_out(out, "similarity", ckpt, weights)
    est = "debiased CKA" if debiased else "biased CKA"
    meta = describe_grid(ck, ga, estimator=est)
    dev = "auto" if spec.device == "auto" else spec.device
    files: dict[str, Any] = {"out": outdir}
    if not cross:
        fa = {(b, t): ga.features[(b, t)] for b in ga.blocks for t in ga.ts}
        grid = cka_grid(fa, blocks=ga.blocks, ts=ga.ts, debiased=debiased, method=method, device=dev)
        cos = _cosine_or_none([fa[k] for k in grid.keys_a], None)
        name = f"{meta['model']} @ step {ck.step} ({meta['weights']})"
        files["grid_png"] = plots.plot_cka_grid(grid, outdir / "cka_grid.png",
                                                title=f"{est} over (block, t): {name}", meta=meta, pdf=pdf)
        if len(ga.blocks) > 1:
            files["block_png"] = plots.plot_cka_panels(grid, outdir / "cka_block_by_block.png", "block_by_block",
                                                       title=f"{est}, block x block at each t: {name}", meta=meta,
                                                       pdf=pdf)
        if len(ga.ts) > 1:
            files["t_png"] = plots.plot_cka_panels(grid, outdir / "cka_t_by_t.png", "t_by_t",
                                                   title=f"{est}, t x t within each block: {name}", meta=meta,
                                                   pdf=pdf)
        lb = ga.log_snr
        df = _cka_tidy(grid, lb, lb, cos)
        arrays = dict(cka=grid.matrix, blocks=np.array([k[0] for k in grid.keys_a]),
                      ts=np.array([float(k[1]) for k in grid.keys_a]))
        if cos is not None:
            arrays["cosine"] = cos
    else:
        ow = other_weights or weights
        ck_b = _load_ck(other if other is not None else ckpt, ow, spec)
        if ck_b.meta["family"] != ck.meta["family"] and ts is None:
            raise ValueError("the two checkpoints are of different families (DiT vs SiT): pass --t explicitly")
        _, gb = load_features(ck_b, spec, blocks=blocks, ts=ts)
        grid = cross_similarity(ga, gb, debiased=debiased, device=dev, method=method)
        cos = _cosine_or_none([ga.features[k] for k in grid.keys_a], [gb.features[k] for k in grid.keys_b])
        meta_b = describe_grid(ck_b, gb)
        a_name = f"A = {Path(ckpt).name} ({meta['weights']}, step {ck.step})"
        b_name = f"B = {Path(other or ckpt).name} ({meta_b['weights']}, step {ck_b.step})"
        meta = {**meta, "weights": f"{meta['weights']} vs {meta_b['weights']}",
                "step": f"{ck.step} vs {ck_b.step}"}
        files["grid_png"] = plots.plot_cka_grid(grid, outdir / "cross_cka_grid.png",
                                                title=f"Cross-model {est}: rows {a_name}, columns {b_name}",
                                                meta=meta, pdf=pdf)
        # Same-cell view (the diagonal of the cross matrix): how far B is from A at each (block, t).
        diag = pd.DataFrame([{"block": ka[0], "t": ka[1], "cka": grid.matrix[i, j]}
                             for i, ka in enumerate(grid.keys_a) for j, kb in enumerate(grid.keys_b) if ka == kb])
        if not diag.empty:
            piv = diag.pivot(index="block", columns="t", values="cka")
            files["diag_png"] = plots.heatmap(piv.to_numpy(), list(piv.index), [_fmt_t(t) for t in piv.columns],
                                              outdir / "cross_cka_same_cell.png",
                                              title=f"{est} of the same (block, t) cell: {a_name} vs {b_name}",
                                              meta=meta, vmin=0, vmax=1, cbar_label=est, xlabel="t",
                                              ylabel="block", pdf=pdf)
        df = _cka_tidy(grid, ga.log_snr, gb.log_snr, cos)
        df.insert(0, "model_a", f"{Path(ckpt).name}:{weights}")
        df.insert(1, "model_b", f"{Path(other or ckpt).name}:{ow}")
        arrays = dict(cka=grid.matrix, blocks_a=np.array([k[0] for k in grid.keys_a]),
                      ts_a=np.array([float(k[1]) for k in grid.keys_a]),
                      blocks_b=np.array([k[0] for k in grid.keys_b]), ts_b=np.array([float(k[1]) for k in grid.keys_b]))
        if cos is not None:
            arrays["cosine"] = cos
    prefix = "cross_cka" if cross else "cka"
    arrays["protocol"] = np.array(json.dumps({**ga.meta, "estimator": est, "method": method}, default=str))
    files["npz"] = write_npz(outdir / f"{prefix}.npz", **arrays)
    files["csv"] = write_table(df, outdir / f"{prefix}.csv")
    files["table"] = df
    return files


# ---------------------------------------------------------------------------------------------
# probe diversity
# ---------------------------------------------------------------------------------------------


def _plot_ts(ts: list, k: int = 4) -> list:
    if len(ts) <= k:
        return list(ts)
    return [ts[i] for i in sorted({int(round(x)) for x in np.linspace(0, len(ts) - 1, k)})]


def run_diversity(ckpt: str | os.PathLike, spec: FeatureSpec, *, weights: str = "ema",
                  blocks: Sequence[int] | None = None, ts: Sequence | None = None,
                  out: str | os.PathLike | None = None, pdf: bool = False) -> dict[str, Any]:
    """DiverseDiT's three terms for every block pair and t (``analysis.diversity.diversity_report``).

    Token features by default (``spec.pooling="tokens"``: the terms are defined on tokens; with
    pooled features the token cosine becomes a per-image cosine). Writes ``diversity.csv`` (one
    row per t x block pair), ``dispersion.csv`` (per block and pooled over blocks),
    ``diversity.png`` (pair matrices for up to 4 t) and ``diversity_vs_t.png`` (pair means vs t).
    """
    from analysis import plots
    from analysis.diversity import diversity_report, dispersion_table

    if spec.n < 2:
        raise ValueError(f"the diversity terms need at least 2 images, got --n {spec.n}")
    ck = _load_ck(ckpt, weights, spec)
    _, g = load_features(ck, spec, blocks=blocks, ts=ts)
    if len(g.blocks) < 2:
        raise ValueError("the diversity terms compare block pairs: pass at least 2 --blocks")
    feats = {(b, t): g.features[(b, t)] for b in g.blocks for t in g.ts}
    rep = diversity_report(feats, g.blocks, g.ts, log_snr=g.log_snr)
    disp = dispersion_table(feats, g.blocks, g.ts)
    outdir = _prepare_out(out, "diversity", ckpt, weights)
    meta = describe_grid(ck, g)
    name = f"{meta['model']} @ step {ck.step} ({meta['weights']})"
    files: dict[str, Any] = {"out": outdir}
    files["png"] = plots.plot_diversity(rep, outdir / "diversity.png", ts=_plot_ts(g.ts),
                                        title=f"DiverseDiT diversity terms per block pair: {name}", meta=meta, pdf=pdf)
    terms = ["orthogonality", "token_cosine", "dispersion", "diversity"]
    long = rep.groupby("t", as_index=False)[terms].mean().melt(id_vars="t", var_name="term", value_name="mean over pairs")
    files["curve_png"] = plots.plot_curves(long, "t", "mean over pairs", outdir / "diversity_vs_t.png", hue="term",
                                           title=f"Diversity terms (mean over {len(rep) // len(g.ts)} block pairs) "
                                                 f"vs t: {name}", meta=meta,
                                           xlabel="t (larger = noisier)", pdf=pdf)
    for df in (rep, disp):
        df.insert(0, "checkpoint", str(ck.path))
        df.insert(1, "checkpoint_sha", ck.sha)
        df.insert(2, "step", ck.step)
        df.insert(3, "weights", ck.weights)
    files["dispersion_csv"] = write_table(disp, outdir / "dispersion.csv")
    files["csv"] = write_table(rep, outdir / "diversity.csv")
    files["table"] = rep
    return files


# ---------------------------------------------------------------------------------------------
# probe pca
# ---------------------------------------------------------------------------------------------


def run_pca(ckpt: str | os.PathLike, spec: FeatureSpec, *, weights: str = "ema", images: Sequence[int] | None = None,
            blocks: Sequence[int] | None = None, ts: Sequence | None = None, basis: str = "shared",
            out: str | os.PathLike | None = None, pdf: bool = False) -> dict[str, Any]:
    """Patch-token PCA as RGB maps for several images side by side (shared basis per block).

    ``images``: row indices of ``spec.split`` (default 0..3). Default blocks: all (or 7 evenly
    spaced for deep models); default t: 0.1, 0.3, 0.5, 0.7 (SRA's; DiT 100..700). Writes
    ``pca.png`` and ``pca.npz`` (RGB maps per cell, image indices, explained variance per block).
    """
    from analysis import plots
    from analysis.pca import pca_rgb_grid

    if basis not in ("shared", "per_cell"):
        raise ValueError(f"--basis must be shared or per_cell, got {basis!r}")
    images = list(images) if images else [0, 1, 2, 3]
    if len(set(images)) != len(images):
        raise ValueError(f"--images has duplicates: {images}")
    ck = _load_ck(ckpt, weights, spec)
    blocks = list(blocks) if blocks else _default_blocks(ck.model.depth, 7)
    ts = list(ts) if ts else _default_ts(ck, few=True)
    # Rows in the user's order (the cache key includes the order, so this is its own cache entry).
    ds, g = load_features(ck, spec, blocks=blocks, ts=ts, pooling="tokens", indices=images)
    feats = {(b, t): g.features[(b, t)] for b in g.blocks for t in g.ts}
    grid = pca_rgb_grid(feats, g.blocks, g.ts, basis=basis)
    from probe.grid import _load_x0

    x0 = _load_x0(ds, np.asarray(images), spec.seed, spec.split).numpy()
    names = getattr(ds, "class_names", None)
    labels = [f"{spec.split} #{i}" + (f" ({names[int(l)]})" if names else f" (class {int(l)})")
              for i, l in zip(images, g.labels)]
    outdir = _prepare_out(out, "pca", ckpt, weights)
    meta = describe_grid(ck, g, images=",".join(str(i) for i in images))
    meta["protocol"] = meta["protocol"].replace(f"n={len(images)}, ", "")
    name = f"{meta['model']} @ step {ck.step} ({meta['weights']})"
    files: dict[str, Any] = {"out": outdir}
    files["png"] = plots.plot_pca_grid(grid, outdir / "pca.png", images=list(range(len(images))), inputs=x0,
                                       image_labels=labels,
                                       title=f"Patch-token PCA (RGB = PC1-3, {basis} basis): {name}",
                                       meta=meta, pdf=pdf)
    arrays: dict[str, Any] = {f"rgb_block{b}_t{_fmt_t(t)}": grid.images[(b, t)] for b in g.blocks for t in g.ts}
    arrays["images"] = np.asarray(images)
    if basis == "shared":
        arrays["explained_variance"] = np.stack([grid.bases[b].explained_variance for b in g.blocks])
    arrays["blocks"], arrays["ts"] = np.asarray(g.blocks), np.asarray([float(t) for t in g.ts])
    files["npz"] = write_npz(outdir / "pca.npz", **arrays)
    return files


# ---------------------------------------------------------------------------------------------
# probe umap
# ---------------------------------------------------------------------------------------------


def run_umap(ckpt: str | os.PathLike, spec: FeatureSpec, *, weights: str = "ema",
             cells: Sequence[str | tuple] | None = None, aligned_block: int | None = None,
             ts: Sequence | None = None, n_neighbors: int = 15, min_dist: float = 0.1, umap_seed: int | None = 0,
             out: str | os.PathLike | None = None, pdf: bool = False) -> dict[str, Any]:
    """UMAP of pooled features for chosen (block, t) cells, and AlignedUMAP across t for one block.

    Default (neither ``cells`` nor ``aligned_block``): the middle block at 3 values of t. Writes
    ``umap.csv`` / ``umap.png`` for the cells and ``umap_aligned.csv`` / ``umap_aligned.png``
    for the aligned block (tidy: block, t, sample, x, y, label, dataset index).
    """
    from analysis import plots
    from analysis.embedding import aligned_umap, embedding_frame, umap_cells

    if spec.n < 4:
        raise ValueError(f"UMAP needs at least 4 samples, got --n {spec.n}")
    ck = _load_ck(ckpt, weights, spec)
    parsed = [(b, cell_t(ck, t)) for b, t in parse_cells(cells)]
    if not parsed and aligned_block is None:
        mid = max(1, ck.model.depth // 2)
        parsed = [(mid, t) for t in _default_ts(ck, few=True)[::2] + [_default_ts(ck, few=True)[-1]]]
    tss = [cell_t(ck, t) for t in ts] if ts else _default_ts(ck, few=True)
    blocks = sorted({b for b, _ in parsed} | ({aligned_block} if aligned_block is not None else set()))
    all_ts = sorted({t for _, t in parsed} | (set(tss) if aligned_block is not None else set()))
    ds, g = load_features(ck, spec, blocks=blocks, ts=all_ts)
    outdir = _prepare_out(out, "umap", ckpt, weights)
    meta = describe_grid(ck, g, umap=f"n_neighbors={n_neighbors}, min_dist={min_dist}, z-scored")
    name = f"{meta['model']} @ step {ck.step} ({meta['weights']})"
    names = getattr(ds, "class_names", None)
    kw = dict(n_neighbors=n_neighbors, min_dist=min_dist, seed=umap_seed)
    files: dict[str, Any] = {"out": outdir}
    if parsed:
        emb = umap_cells({c: g.features[c] for c in parsed}, parsed, **kw)
        df = embedding_frame(emb, g.labels)
        df["index"] = np.tile(g.indices, len(emb))
        files["png"] = plots.plot_umap(emb, g.labels, outdir / "umap.png", class_names=names,
                                       title=f"UMAP of mean-pooled block features: {name}", meta=meta, pdf=pdf)
        files["csv"] = write_table(df, outdir / "umap.csv")
    if aligned_block is not None:
        emb = aligned_umap({(aligned_block, t): g.features[(aligned_block, t)] for t in tss}, aligned_block, tss, **kw)
        df = embedding_frame(emb, g.labels, key_names=("t",))
        df.insert(0, "block", aligned_block)
        df["index"] = np.tile(g.indices, len(emb))
        files["aligned_png"] = plots.plot_umap(emb, g.labels, outdir / "umap_aligned.png", class_names=names,
                                               title=f"AlignedUMAP of block {aligned_block} across t: {name}",
                                               meta={**meta, "block": aligned_block}, pdf=pdf)
        files["aligned_csv"] = write_table(df, outdir / "umap_aligned.csv")
    return files


# ---------------------------------------------------------------------------------------------
# probe attribute
# ---------------------------------------------------------------------------------------------


def _fit_cell_probe(gtr, gte, cell, num_classes: int, seed: int, probe: str = "torch") -> tuple[Any, dict]:
    """The layer-grid protocol for one cell (held-out strength choice, refit), returning the probe itself.

    ``fit_probes`` gives the test accuracy and the chosen strength; the weights are then refitted on
    the whole (standardised) train split with that strength, exactly as its refit step does:
    batched L-BFGS logistic regression (``torch``) or closed-form ridge on one-hot targets
    (``ridge``, whose class scores are the regression outputs plus the class priors).
    """
    from analysis.attribution import LinearProbe
    from probe.probes import _standardise, batched_logreg, batched_ridge, fit_probes

    if probe not in ("torch", "ridge"):
        raise ValueError(f"--probe must be torch or ridge for attribution, got {probe!r}")
    xtr = np.asarray(gtr.features[cell], dtype=np.float32)
    xte = np.asarray(gte.features[cell], dtype=np.float32)
    res = fit_probes(xtr[None], gtr.labels, xte[None], gte.labels, probe, num_classes=num_classes, seed=seed,
                     device="cpu")
    a = torch.as_tensor(xtr)[None]
    y = torch.as_tensor(gtr.labels)
    mu, sd = _standardise(a, a)
    xs = (a - mu) / sd
    if probe == "torch":
        xa = torch.cat([xs, torch.ones((1, a.shape[1], 1))], dim=2)
        w, _ = batched_logreg(xa, y, num_classes, torch.tensor([[float(res.reg[0])]]))
        w = w[0, :, 0, :]  # (D+1, K)
        weight, bias = w[:-1].T.contiguous(), w[-1]
    else:
        w = batched_ridge(xs, y, num_classes, torch.tensor([float(res.reg[0])]))[0, 0]  # (D, K)
        weight = w.T.contiguous()
        bias = torch.nn.functional.one_hot(y.long(), num_classes).float().mean(0)
    lin = LinearProbe(weight, bias, mu[0, 0], sd[0, 0])
    info = {"probe": probe, "accuracy": float(res.accuracy[0]), "val_accuracy": float(res.val_accuracy[0]),
            "reg": float(res.reg[0])}
    return lin, info


def run_attribute(ckpt: str | os.PathLike, spec: FeatureSpec, *, block: int, t: float, weights: str = "ema",
                  images: Sequence[int] | None = None, n_train: int = 2000, target: str = "label", probe: str = "torch",
                  method: str = "integrated_gradients", n_steps: int = 32,
                  out: str | os.PathLike | None = None, pdf: bool = False) -> dict[str, Any]:
    """Captum attribution of a trained linear probe's class logit back to the input patches.

    The probe is fitted on cached (block, t) features of ``n_train`` train images with the
    layer-grid protocol and scored on ``spec.n`` test images. The attributed images are test rows
    ``images`` (default 0..5), noised to ``t`` with the *same* per-image noise as the cache, so
    the forward that is attributed is exactly the one that was probed. ``target``: "label" (the
    true class) or "pred" (the probe's prediction). Writes ``attribution.png``,
    ``attribution.npz`` (pixel and patch maps) and ``attribution.csv`` (per image).
    """
    from analysis import plots
    from analysis.attribution import backbone_feature_fn, probe_attribution
    from probe.grid import _load_x0, noise_bank
    from training.flow import model_time

    if probe not in ("torch", "ridge"):
        raise ValueError(f"--probe must be torch or ridge for attribution, got {probe!r}")
    if target not in ("label", "pred"):
        raise ValueError(f"--target must be label or pred, got {target!r}")
    if method not in ("integrated_gradients", "saliency", "input_x_gradient"):
        raise ValueError(f"--method must be integrated_gradients, saliency or input_x_gradient, got {method!r}")
    if n_train < 10 or spec.n < 2:
        raise ValueError("--n-train must be >= 10 and --n >= 2 to fit and score the probe")
    images = list(images) if images else list(range(6))
    ck = _load_ck(ckpt, weights, spec)
    tt = cell_t(ck, t)
    from probe.grid import validate_blocks

    validate_blocks([block], ck.model.depth)
    dtr, gtr = load_features(ck, spec, blocks=[block], ts=[tt], split="train", n=n_train)
    dte, gte = load_features(ck, spec, blocks=[block], ts=[tt], split="test")
    if max(images) >= len(dte) or min(images) < 0:
        raise ValueError(f"--images must be rows 0..{len(dte) - 1} of the test split")
    k = max(dtr.num_classes, int(gtr.labels.max()) + 1)
    lin, info = _fit_cell_probe(gtr, gte, (block, tt), k, spec.seed, probe)

    idx = np.asarray(images)
    x0 = _load_x0(dte, idx, spec.seed, "test")
    cfg = ck.model.config
    eps = noise_bank(idx, (cfg.in_channels, cfg.input_size, cfg.input_size), spec.seed, "test")
    fam = ck.meta["family"]
    conv = ck.meta.get("time_convention", "flow-t1-noise" if fam == "sit" else "ddpm-t999-noisiest")
    t_ours = torch.full((1,), float(tt)) if fam == "sit" else torch.full((1,), int(tt))
    t_model = float(model_time(t_ours, conv)[0]) if fam == "sit" else int(tt)

    def noise_fn(x, e, _t):  # our convention for the corruption, the model's for its input
        return ck.objective.corrupt(x, t_ours.to(x.device).expand(len(x)), e)

    y = None
    if spec.label == "class":
        y = torch.as_tensor(np.asarray(dte.labels)[idx])
    feature_fn = backbone_feature_fn(ck.model, block, t_model, eps, noise_fn, y=y)
    labels = np.asarray(dte.labels)[idx]
    tgt = labels if target == "label" else None
    attr = probe_attribution(x0, feature_fn, lin, target=tgt, method=method, n_steps=n_steps,
                             patch_size=cfg.patch_size)
    pred = attr.logits.argmax(1)
    names = getattr(dte, "class_names", None)
    outdir = _prepare_out(out, "attribution", ckpt, weights)
    meta = describe_grid(ck, gte, block=block, t=_fmt_t(tt),
                         probe=f"{probe}, n_train={n_train}, test acc {100 * info['accuracy']:.1f}%")
    name = f"{meta['model']} @ step {ck.step} ({meta['weights']})"
    titles = [f"test #{i}: {names[l] if names else l}\nprobe says {names[p] if names else p}"
              for i, l, p in zip(idx, labels, pred)]
    files: dict[str, Any] = {"out": outdir}
    files["png"] = plots.plot_attribution(
        x0.numpy(), attr.patch, outdir / "attribution.png",
        panel_titles=titles, title=f"{method.replace('_', ' ')} of the probe's {target} logit, block {block}, "
                            f"t={_fmt_t(tt)}: {name}", meta=meta, pdf=pdf)
    rows = pd.DataFrame({"index": idx, "label": labels, "predicted": pred, "target": attr.target,
                         "target_logit": attr.logits[np.arange(len(idx)), attr.target],
                         "delta": attr.delta if attr.delta is not None else np.nan,
                         "patch_sum": attr.patch.reshape(len(idx), -1).sum(1), "title": titles})
    for col, v in (("block", block), ("t", tt), ("weights", ck.weights), ("step", ck.step),
                   ("checkpoint_sha", ck.sha), ("method", method), ("probe_accuracy", info["accuracy"]),
                   ("probe", probe), ("probe_reg", info["reg"])):
        rows[col] = v
    files["npz"] = write_npz(outdir / "attribution.npz", pixel=attr.pixel, patch=attr.patch, images=idx,
                             labels=labels, target=attr.target, logits=attr.logits)
    files["csv"] = write_table(rows, outdir / "attribution.csv")
    files["table"] = rows
    files["probe"] = info
    return files


# ---------------------------------------------------------------------------------------------
# probe correlate
# ---------------------------------------------------------------------------------------------

# Join keys, in order of preference. Probe tables (layer_grid.csv, curves.csv) write
# ``checkpoint_sha``; ``probe eval`` (training.evaluation.checkpoint_keys) writes ``ckpt_sha``. Both
# are the same file_sha() of the checkpoint file, so the content hash is the default key: it survives
# moving or renaming run folders. ``checkpoint`` (a path) is compared after resolving it.
JOIN_KEYS = ("sha", "checkpoint", "step", "run")


def prepare_join(df: pd.DataFrame, on: str, what: str) -> pd.DataFrame:
    """Give ``df`` the canonical join column for ``on`` (``ckpt_sha``, resolved ``checkpoint``, ...)."""
    df = df.copy()
    if on == "sha":
        if "ckpt_sha" not in df.columns and "checkpoint_sha" in df.columns:
            df["ckpt_sha"] = df["checkpoint_sha"]
        if "ckpt_sha" not in df.columns:
            raise ValueError(f"the {what} table has no ckpt_sha / checkpoint_sha column; join with --on checkpoint, "
                             "step or run")
        df["ckpt_sha"] = df["ckpt_sha"].astype(str)
    elif on == "checkpoint":
        if "checkpoint" not in df.columns:
            raise ValueError(f"the {what} table has no checkpoint column")
        df["checkpoint"] = [str(Path(str(p)).resolve()) for p in df["checkpoint"]]
    elif on in ("step", "run"):
        if on not in df.columns:
            raise ValueError(f"the {what} table has no {on} column")
    else:
        raise ValueError(f"--on must be one of {', '.join(JOIN_KEYS)}, got {on!r}")
    return df


def _read_csv(path: str | os.PathLike, what: str) -> pd.DataFrame:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{what} table {p} does not exist")
    try:
        df = pd.read_csv(p, keep_default_na=False, na_values=[""])  # "null" is a label policy, not NaN
    except pd.errors.EmptyDataError:
        raise ValueError(f"{what} table {p} is empty") from None
    if df.empty:
        raise ValueError(f"{what} table {p} has no rows")
    return df


def run_correlate(probe_csv: str | os.PathLike | Sequence[str | os.PathLike], metrics_csv: str | os.PathLike, *,
                  metric: str, value: str = "accuracy", cell: str | tuple | None = None,
                  weights: str | None = None, role: str | None = None, on: str = "auto", agg: str | None = None,
                  control_step: bool = True, n_boot: int = 2000, out: str | os.PathLike | None = None,
                  pdf: bool = False) -> dict[str, Any]:
    """Join probe results with a generation-metrics table and correlate (one point per checkpoint).

    ``probe_csv``: ``layer_grid.csv`` / ``curves.csv`` file(s) (several are concatenated: across
    runs). ``metrics_csv``: ``probe eval``'s table or any CSV with a key column and ``metric``.
    ``on``: ``sha`` (default when both tables have a checkpoint hash), ``checkpoint`` (path),
    ``step`` or ``run``. Weights are *not* a key: generation uses EMA weights while a student
    probe uses online ones; filter with ``weights``. Writes ``correlation.csv`` (Pearson,
    Spearman, Kendall, partial on step, bootstrap CIs), ``joined.csv`` and ``correlation.png``.
    """
    from analysis import plots
    from analysis.correlation import SmallSampleWarning, correlate, join_probe_metrics

    paths = [probe_csv] if isinstance(probe_csv, (str, os.PathLike)) else list(probe_csv)
    probe = pd.concat([_read_csv(p, "probe") for p in paths], ignore_index=True)
    metrics = _read_csv(metrics_csv, "metrics")
    if metric not in metrics.columns:
        cands = [c for c in metrics.columns if c.startswith(("fd_", "fid", "cond_acc", "is", "kid", "prec", "rec"))]
        raise ValueError(f"metrics table {metrics_csv} has no column {metric!r}"
                         + (f"; metric columns: {', '.join(cands)}" if cands else f" (columns: {', '.join(metrics.columns)})"))
    if pd.to_numeric(metrics[metric], errors="coerce").notna().sum() == 0:
        raise ValueError(f"metrics column {metric!r} in {metrics_csv} is empty (no numeric values)")
    metrics[metric] = pd.to_numeric(metrics[metric], errors="coerce")
    if value not in probe.columns:
        raise ValueError(f"probe table has no column {value!r} (columns: {', '.join(probe.columns)})")
    if on == "auto":
        has = lambda df: "ckpt_sha" in df.columns or "checkpoint_sha" in df.columns  # noqa: E731
        on = "sha" if has(probe) and has(metrics) else next(
            (k for k in ("checkpoint", "step", "run") if k in probe.columns and k in metrics.columns), None)
        if on is None:
            raise ValueError("the probe and metrics tables share no key column (ckpt_sha/checkpoint_sha, checkpoint, "
                             "step, run); add one to the metrics CSV")
    probe = prepare_join(probe, on, "probe")
    metrics = prepare_join(metrics, on, "metrics")
    key = "ckpt_sha" if on == "sha" else on
    filt: dict[str, Any] = {}
    if cell is not None:
        (b, t), = parse_cells([cell])
        filt.update(block=b, t=t)
    for col, v in (("weights", weights), ("role", role)):
        if v is not None:
            if col not in probe.columns:
                raise ValueError(f"--{col} given but the probe table has no {col} column")
            filt[col] = v
    if "step" in metrics.columns and "step" in probe.columns and key != "step":
        metrics = metrics.drop(columns="step")  # keep the probe table's step (same checkpoint)
    metrics = metrics.drop_duplicates(subset=[key], keep="last")
    try:
        joined = join_probe_metrics(probe, metrics, metric, on=[key], probe_value=value, cell=filt or None, agg=agg)
    except ValueError as e:
        msg = str(e)
        if "several probe rows" in msg:
            raise ValueError("several probe rows per checkpoint: choose one with --cell BLOCK,T (and --weights / "
                             "--role for curves.csv), or reduce with --agg max") from None
        raise
    if metric == value:
        raise ValueError("--metric and --value name the same column")
    control = joined["step"] if control_step and "step" in joined.columns and joined["step"].nunique() > 1 else None
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SmallSampleWarning)
        table = correlate(joined[value], joined[metric], control=control, n_boot=n_boot, x_name=value, y_name=metric)
    small = [str(w.message) for w in caught if issubclass(w.category, SmallSampleWarning)]
    table.insert(0, "join_key", key)
    for col, v in filt.items():
        table[col] = v
    outdir = Path(out) if out is not None else Path("figures") / "correlate"
    outdir.mkdir(parents=True, exist_ok=True)
    first = probe.iloc[0]
    desc = []
    if cell is not None:
        desc.append(f"block {filt['block']}, t={_fmt_t(filt['t'])}")
    if weights or role:
        desc.append(" ".join(x for x in (role, _weights_word(weights) if weights else None) if x))
    meta = {"model": first.get("model") if "model" in probe.columns else None,
            "protocol": (f"{first.get('probe', '?')} probe, label={first.get('label_policy', '?')}, "
                         f"n_train={first.get('n_train', '?')}") if "probe" in probe.columns else None,
            "join": f"{key}, n={len(joined)}"}
    lab = (joined["step"] if "step" in joined.columns else joined[key]).tolist()
    files: dict[str, Any] = {"out": outdir, "warnings": small, "join_key": key}
    files["png"] = plots.plot_correlation(
        joined[value], joined[metric], table, outdir / "correlation.png",
        xlabel=f"probe {value}" + (f" ({', '.join(desc)})" if desc else ""), ylabel=metric,
        point_labels=[f"{int(s)}" if isinstance(s, (int, float, np.integer, np.floating)) and s == s else str(s)[:8]
                      for s in lab],
        hue=joined["step"] if "step" in joined.columns else None,
        title=f"Probe {value} vs {metric}" + (f" ({', '.join(desc)})" if desc else ""), meta=meta, pdf=pdf)
    files["joined_csv"] = write_table(joined, outdir / "joined.csv")
    files["csv"] = write_table(table, outdir / "correlation.csv")
    files["table"], files["joined"] = table, joined
    return files
