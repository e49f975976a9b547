"""``probe umap``: UMAP of pooled features for chosen (block, t) cells, AlignedUMAP across t for one block."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from repdyn.analysis import plots
from repdyn.analysis.embedding import aligned_umap, embedding_frame, umap_cells
from repdyn.core.files import write_table

from repdyn.commands.features import (FeatureSpec, analysis_ts, cell_t, describe_grid, load_features, load_for_analysis,
                                      parse_cells)
from repdyn.commands.outputs import Outputs, prepare_for, releases_outputs, result_identity

__all__ = ["run_umap"]


@releases_outputs
def run_umap(ckpt: str | os.PathLike, spec: FeatureSpec, *, weights: str = "ema",
             cells: Sequence[str | tuple] | None = None, aligned_block: int | None = None,
             ts: Sequence | None = None, n_neighbors: int = 15, min_dist: float = 0.1, umap_seed: int | None = 0,
             out: str | os.PathLike | None = None, pdf: bool = False, overwrite: bool = False) -> Outputs:
    """Default (neither ``cells`` nor ``aligned_block``): the middle block at 3 values of t. Writes
    ``umap.csv`` / ``umap.png`` for the cells and ``umap_aligned.csv`` / ``umap_aligned.png`` for the
    aligned block (tidy: block, t, sample, x, y, label, dataset index)."""
    if spec.n < 4:
        raise ValueError(f"UMAP needs at least 4 samples, got --n {spec.n}")
    ck = load_for_analysis(ckpt, weights, spec)
    few = analysis_ts(ck, few=True)
    parsed = [(b, cell_t(ck, t)) for b, t in parse_cells(cells)]
    if not parsed and aligned_block is None:
        parsed = [(max(1, ck.model.depth // 2), t) for t in few[::2] + [few[-1]]]
    tss = [cell_t(ck, t) for t in ts] if ts else few
    blocks = sorted({b for b, _ in parsed} | ({aligned_block} if aligned_block is not None else set()))
    all_ts = sorted({t for _, t in parsed} | (set(tss) if aligned_block is not None else set()))
    res = prepare_for(ck, out, "umap", overwrite=overwrite,
                      identity=result_identity(ck, spec, cells=parsed, aligned_block=aligned_block, ts=tss,
                                               n_neighbors=n_neighbors, min_dist=min_dist, umap_seed=umap_seed))
    ds, g = load_features(ck, spec, blocks=blocks, ts=all_ts)
    meta = describe_grid(ck, g, umap=f"n_neighbors={n_neighbors}, min_dist={min_dist}, z-scored")
    name = f"{meta['model']} @ step {ck.step} ({meta['weights']})"
    names = getattr(ds, "class_names", None)
    kw = dict(n_neighbors=n_neighbors, min_dist=min_dist, seed=umap_seed)
    if parsed:
        emb = umap_cells({c: g.features[c] for c in parsed}, parsed, **kw)
        df = embedding_frame(emb, g.labels)
        df["index"] = np.tile(g.indices, len(emb))
        res.save("png", plots.plot_umap(emb, g.labels, class_names=names, title=f"UMAP of mean-pooled block "
                                        f"features: {name}", meta=meta), "umap.png", pdf)
        res.files["csv"] = write_table(df, res.out / "umap.csv")
    if aligned_block is not None:
        emb = aligned_umap({(aligned_block, t): g.features[(aligned_block, t)] for t in tss}, aligned_block, tss, **kw)
        df = embedding_frame(emb, g.labels, key_names=("t",))
        df.insert(0, "block", aligned_block)
        df["index"] = np.tile(g.indices, len(emb))
        res.save("aligned_png", plots.plot_umap(emb, g.labels, class_names=names,
                                                title=f"AlignedUMAP of block {aligned_block} across t: {name}",
                                                meta={**meta, "block": aligned_block}), "umap_aligned.png", pdf)
        res.files["aligned_csv"] = write_table(df, res.out / "umap_aligned.csv")
    return res.finish()
