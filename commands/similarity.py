"""``probe similarity``: CKA (debiased by default) and per-sample cosine over the (block, t) grid."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from repdyn.analysis import plots
from repdyn.analysis.similarity import cka_grid, cosine_matrix
from repdyn.probe.grid import GridFeatures
from repdyn.core.timesteps import format_t
from repdyn.core.files import write_npz, write_table
from repdyn.model.checkpoint import run_dir_of

from repdyn.commands.features import FeatureSpec, describe_grid, load_features, load_for_analysis
from repdyn.commands.outputs import Outputs, prepare_for, releases_outputs, result_identity

__all__ = ["SimilarityResult", "run_similarity", "cross_similarity", "check_n"]


@dataclass
class SimilarityResult(Outputs):
    table: pd.DataFrame | None = None  # tidy cka.csv / cross_cka.csv


def check_n(n: int, debiased: bool) -> None:
    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    if debiased and n < 4:
        raise ValueError(f"too few samples for the debiased CKA estimator: --n {n} (needs >= 4, use a few "
                         "hundred) or pass --biased")
    if n < 2:
        raise ValueError(f"CKA needs at least 2 samples, got --n {n}")


def cross_similarity(ga: GridFeatures, gb: GridFeatures, debiased: bool = True, device: str | None = None, **kw: Any):
    """(cells_a x cells_b) CKA between two grids that must hold the *same* inputs (and noise).

    Two grids are comparable only row by row; this refuses grids with different sample counts or
    different images instead of returning a meaningless number.
    """
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
    widths = {np.shape(x)[-1] for x in fa + (fb or [])}
    if len(widths) != 1:
        return None
    return cosine_matrix(fa, fb, mode="per_sample")


def _keys_arrays(keys, suffix: str = "") -> dict[str, np.ndarray]:
    return {f"blocks{suffix}": np.array([k[0] for k in keys]), f"ts{suffix}": np.array([float(k[1]) for k in keys])}


@releases_outputs
def run_similarity(ckpt: str | os.PathLike, spec: FeatureSpec, *, weights: str = "ema",
                   other: str | os.PathLike | None = None, other_weights: str | None = None,
                   blocks: Sequence[int] | None = None, ts: Sequence | None = None, debiased: bool = True,
                   method: str = "auto", out: str | os.PathLike | None = None, pdf: bool = False,
                   overwrite: bool = False) -> SimilarityResult:
    """Within one model: the full (blocks*t)^2 matrix, plus block x block per t and t x t per block
    figures. With ``other`` and/or ``other_weights`` (teacher EMA vs student online, checkpoint i vs
    j, SRA vs baseline): the cross-model (cells_a x cells_b) matrix on the same images and noise.
    Writes ``cka.csv`` (tidy: block_a, t_a, log_snr_a, block_b, t_b, log_snr_b, cka, cosine),
    ``cka.npz`` (matrices + keys) and the figures.
    """
    check_n(spec.n, debiased)
    ck = load_for_analysis(ckpt, weights, spec)
    cross = other is not None or (other_weights is not None and other_weights != weights)
    ow = other_weights or weights
    ck_b = load_for_analysis(other if other is not None else ckpt, ow, spec) if cross else None
    ident = result_identity(ck, spec, other=ck_b.sha if other is not None else None,
                            other_weights=other_weights, blocks=blocks, ts=ts, debiased=debiased, estimator=method)
    res = prepare_for(ck, out, "similarity", SimilarityResult, identity=ident, overwrite=overwrite)
    _, ga = load_features(ck, spec, blocks=blocks, ts=ts)
    est = "debiased CKA" if debiased else "biased CKA"
    meta = describe_grid(ck, ga, estimator=est)
    if not cross:
        fa = {(b, t): ga.features[(b, t)] for b in ga.blocks for t in ga.ts}
        grid = cka_grid(fa, blocks=ga.blocks, ts=ga.ts, debiased=debiased, method=method, device=spec.device)
        cos = _cosine_or_none([fa[k] for k in grid.keys_a], None)
        name = f"{meta['model']} @ step {ck.step} ({meta['weights']})"
        res.save("grid_png", plots.plot_cka_grid(grid, title=f"{est} over (block, t): {name}", meta=meta),
                 "cka_grid.png", pdf)
        if len(ga.blocks) > 1:
            res.save("block_png", plots.plot_cka_panels(grid, "block_by_block", title=f"{est}, block x block at "
                                                        f"each t: {name}", meta=meta), "cka_block_by_block.png", pdf)
        if len(ga.ts) > 1:
            res.save("t_png", plots.plot_cka_panels(grid, "t_by_t", title=f"{est}, t x t within each block: {name}",
                                                    meta=meta), "cka_t_by_t.png", pdf)
        df = _cka_tidy(grid, ga.log_snr, ga.log_snr, cos)
        arrays = dict(cka=grid.matrix, **_keys_arrays(grid.keys_a))
    else:
        if ck_b.family != ck.family and ts is None:
            raise ValueError("the two checkpoints are of different families (DiT vs SiT): pass --t explicitly")
        _, gb = load_features(ck_b, spec, blocks=blocks, ts=ts)
        grid = cross_similarity(ga, gb, debiased=debiased, device=spec.device, method=method)
        cos = _cosine_or_none([ga.features[k] for k in grid.keys_a], [gb.features[k] for k in grid.keys_b])
        meta_b = describe_grid(ck_b, gb)
        a_name = f"A = {_run_name(ckpt)} ({meta['weights']}, step {ck.step})"
        b_name = f"B = {_run_name(other or ckpt)} ({meta_b['weights']}, step {ck_b.step})"
        meta = {**meta, "weights": f"{meta['weights']} vs {meta_b['weights']}", "step": f"{ck.step} vs {ck_b.step}"}
        res.save("grid_png", plots.plot_cka_grid(grid, title=f"Cross-model {est}: rows {a_name}, columns {b_name}",
                                                 meta=meta), "cross_cka_grid.png", pdf)
        # Same-cell view (the diagonal of the cross matrix): how far B is from A at each (block, t).
        diag = pd.DataFrame([{"block": ka[0], "t": ka[1], "cka": grid.matrix[i, j]}
                             for i, ka in enumerate(grid.keys_a) for j, kb in enumerate(grid.keys_b) if ka == kb])
        if not diag.empty:
            piv = diag.pivot(index="block", columns="t", values="cka")
            res.save("diag_png", plots.heatmap(piv.to_numpy(), list(piv.index), [format_t(t) for t in piv.columns],
                                               title=f"{est} of the same (block, t) cell: {a_name} vs {b_name}",
                                               meta=meta, vmin=0, vmax=1, cbar_label=est, xlabel="t",
                                               ylabel="block"), "cross_cka_same_cell.png", pdf)
        df = _cka_tidy(grid, ga.log_snr, gb.log_snr, cos)
        df.insert(0, "model_a", f"{Path(ckpt).name}:{weights}")
        df.insert(1, "model_b", f"{Path(other or ckpt).name}:{ow}")
        arrays = dict(cka=grid.matrix, **_keys_arrays(grid.keys_a, "_a"), **_keys_arrays(grid.keys_b, "_b"))
    if cos is not None:
        arrays["cosine"] = cos
    prefix = "cross_cka" if cross else "cka"
    arrays["protocol"] = np.array(json.dumps({**ga.meta, "estimator": est, "method": method}, default=str))
    res.files["npz"] = write_npz(res.out / f"{prefix}.npz", **arrays)
    res.files["csv"] = write_table(df, res.out / f"{prefix}.csv")
    res.table = df
    return res.finish()


def _run_name(ckpt: str | os.PathLike) -> str:
    """``<run>/<checkpoint>``: a title that tells two runs' ``0000040.pt`` apart."""
    return f"{run_dir_of(ckpt).name}/{Path(ckpt).name}"
