"""``probe pca``: patch-token PCA as RGB maps (rows = blocks, columns = t), several images side by side."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from repdyn.analysis import plots
from repdyn.analysis.pca import pca_rgb_grid
from repdyn.core.timesteps import format_t
from repdyn.probe.grid import load_x0
from repdyn.core.files import write_npz

from repdyn.commands.features import (FeatureSpec, analysis_ts, describe_grid, load_features, load_for_analysis,
                                      spread_blocks)
from repdyn.commands.outputs import Outputs, prepare_for, releases_outputs, result_identity

__all__ = ["run_pca"]


@releases_outputs
def run_pca(ckpt: str | os.PathLike, spec: FeatureSpec, *, weights: str = "ema", images: Sequence[int] | None = None,
            blocks: Sequence[int] | None = None, ts: Sequence | None = None, basis: str = "shared",
            out: str | os.PathLike | None = None, pdf: bool = False, overwrite: bool = False) -> Outputs:
    """Shared basis per block across t by default (``per_cell``: SRA's per-cell PCA).

    ``images``: row indices of ``spec.split`` (default 0..3). Default blocks: all (or 7 evenly
    spaced for deep models); default t: 0.1, 0.3, 0.5, 0.7 (SRA's; DiT 100..700). Writes
    ``pca.png`` and ``pca.npz`` (RGB maps per cell, image indices, explained variance per block).
    """
    if basis not in ("shared", "per_cell"):
        raise ValueError(f"--basis must be shared or per_cell, got {basis!r}")
    images = list(images) if images else [0, 1, 2, 3]
    if len(set(images)) != len(images):
        raise ValueError(f"--images has duplicates: {images}")
    ck = load_for_analysis(ckpt, weights, spec)
    blocks = list(blocks) if blocks else spread_blocks(ck.model.depth, 7)
    ts = list(ts) if ts else analysis_ts(ck, few=True)
    res = prepare_for(ck, out, "pca", overwrite=overwrite,
                      identity=result_identity(ck, spec, images=images, blocks=blocks, ts=ts, basis=basis))
    # Rows in the user's order (the cache key includes the order, so this is its own cache entry).
    ds, g = load_features(ck, spec, blocks=blocks, ts=ts, pooling="tokens", indices=images)
    feats = {(b, t): g.features[(b, t)] for b in g.blocks for t in g.ts}
    grid = pca_rgb_grid(feats, g.blocks, g.ts, basis=basis)
    x0 = load_x0(ds, np.asarray(images), spec.seed, spec.split).numpy()
    # latents (e.g. 4 SD-VAE channels) are no picture: the maps are shown without the input row
    pixels = getattr(ds, "latent_scale", None) is None and x0.shape[1] in (1, 3)
    names = getattr(ds, "class_names", None)
    labels = [f"{spec.split} #{i}" + (f" ({names[int(l)]})" if names else f" (class {int(l)})")
              for i, l in zip(images, g.labels)]
    meta = describe_grid(ck, g, images=",".join(str(i) for i in images))
    meta["protocol"] = meta["protocol"].replace(f"n={len(images)}, ", "")
    name = f"{meta['model']} @ step {ck.step} ({meta['weights']})"
    if not pixels:
        meta["inputs"] = f"latent ({x0.shape[1]} channels): no input panel"
    res.save("png", plots.plot_pca_grid(grid, images=list(range(len(images))), inputs=x0 if pixels else None,
                                        image_labels=labels,
                                        title=f"Patch-token PCA (RGB = PC1-3, {basis} basis): {name}", meta=meta),
             "pca.png", pdf)
    arrays: dict[str, Any] = {f"rgb_block{b}_t{format_t(t)}": grid.images[(b, t)] for b in g.blocks for t in g.ts}
    arrays["images"] = np.asarray(images)
    if basis == "shared":
        arrays["explained_variance"] = np.stack([grid.bases[b].explained_variance for b in g.blocks])
    arrays["blocks"], arrays["ts"] = np.asarray(g.blocks), np.asarray([float(t) for t in g.ts])
    res.files["npz"] = write_npz(res.out / "pca.npz", **arrays)
    return res.finish()
