"""``probe spatial``: iREPA's spatial-structure metrics (LDS, CDS, RMSC) of every (block, t)
cell's patch tokens, per image, then mean and standard error over images."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd

from repdyn.analysis import plots
from repdyn.analysis.spatial import SPATIAL_METRICS, spatial_cells
from repdyn.core.files import write_table
from repdyn.core.runtime import resolve_device

from repdyn.commands.features import FeatureSpec, checkpoint_columns, describe_grid, load_features, load_for_analysis
from repdyn.commands.outputs import Outputs, prepare_for, releases_outputs, result_identity

__all__ = ["SpatialResult", "run_spatial", "SPATIAL_METRICS"]



@dataclass
class SpatialResult(Outputs):
    table: pd.DataFrame | None = None  # spatial.csv (tidy)


@releases_outputs
def run_spatial(ckpt: str | os.PathLike, spec: FeatureSpec, *, weights: str = "ema",
                blocks: Sequence[int] | None = None, ts: Sequence | None = None, far_dist: int = 6, dmax: int = 8,
                out: str | os.PathLike | None = None, pdf: bool = False, overwrite: bool = False) -> SpatialResult:
    """Patch tokens (pooling ``tokens``) of every cell -> LDS (``far_dist``), CDS (``dmax``) and
    RMSC per image (:mod:`repdyn.analysis.spatial`; iREPA's defaults 6 and 8, in patches). Writes
    ``spatial.csv`` (tidy: run, checkpoint, checkpoint_sha, step, weights, block, t, log_snr, metric,
    mean, se, n, grid, far_dist, dmax) and
    ``spatial.png`` (blocks x t per metric, highest cell boxed). A token grid too small for a
    threshold (largest Manhattan distance H + W - 2 below it) is an error, raised before extraction
    when the checkpoint's grid is known."""
    if spec.n < 2:
        raise ValueError(f"--n must be >= 2 for a standard error over images, got {spec.n}")
    ck = load_for_analysis(ckpt, weights, spec)
    side = _token_side(ck)
    if side is not None:  # fail before any extraction
        for name, thr in (("lds", far_dist), ("cds", dmax)):
            if 2 * side - 2 < thr:
                raise ValueError(f"{name}: the checkpoint's {side}x{side} token grid has Manhattan distances up to "
                                 f"{2 * side - 2} < {thr}; pass a smaller --{'far-dist' if name == 'lds' else 'dmax'}")
    spec = FeatureSpec(**{**spec.__dict__, "pooling": "tokens"})
    ident = result_identity(ck, spec, blocks=blocks, ts=ts, far_dist=int(far_dist), dmax=int(dmax))
    res = prepare_for(ck, out, "spatial", SpatialResult, identity=ident, overwrite=overwrite)
    _, g = load_features(ck, spec, blocks=blocks, ts=ts)
    df = spatial_cells({(b, t): g.features[(b, t)] for b in g.blocks for t in g.ts}, far_dist=far_dist, dmax=dmax,
                       device=resolve_device(spec.device))
    df.insert(2, "log_snr", df["t"].map(lambda t: g.log_snr[t]))
    df = pd.concat([pd.DataFrame([checkpoint_columns(ck)] * len(df)), df], axis=1)
    meta = describe_grid(ck, g, far_dist=far_dist, dmax=dmax)
    name = f"{meta['model']} @ step {ck.step} ({meta['weights']})"
    res.save("png", plots.cell_metric_heatmaps(df, list(SPATIAL_METRICS), f"Spatial structure of patch tokens "
                                               f"(mean over images): {name}", meta=meta, value="mean",
                                               labels=plots.MEASURE_LABELS), "spatial.png", pdf)
    res.files["csv"] = write_table(df, res.out / "spatial.csv")
    res.table = df
    return res.finish()


def _token_side(ck) -> int | None:
    """The checkpoint's token grid side (input size / patch size), when its config says."""
    side = getattr(getattr(ck.model, "x_embedder", None), "grid_size", None)
    return int(side) if side is not None else None
