"""``probe diversity``: DiverseDiT's three terms for every block pair and t of one checkpoint."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from repdyn.analysis import plots
from repdyn.analysis.diversity import dispersion_table, diversity_report
from repdyn.core.files import write_table

from repdyn.commands.features import FeatureSpec, describe_grid, load_features, load_for_analysis
from repdyn.commands.outputs import Outputs, prepare_for, releases_outputs, result_identity

__all__ = ["DiversityResult", "run_diversity"]

TERMS = ["orthogonality", "token_cosine", "dispersion", "diversity"]


@dataclass
class DiversityResult(Outputs):
    table: pd.DataFrame | None = None  # diversity.csv: one row per t x block pair
    dispersion: pd.DataFrame | None = None  # dispersion.csv


def _plot_ts(ts: list, k: int = 4) -> list:
    if len(ts) <= k:
        return list(ts)
    return [ts[i] for i in sorted({int(round(x)) for x in np.linspace(0, len(ts) - 1, k)})]


@releases_outputs
def run_diversity(ckpt: str | os.PathLike, spec: FeatureSpec, *, weights: str = "ema",
                  blocks: Sequence[int] | None = None, ts: Sequence | None = None,
                  out: str | os.PathLike | None = None, pdf: bool = False, overwrite: bool = False) -> DiversityResult:
    """Token features by default (``spec.pooling="tokens"``: the terms are defined on tokens; with
    pooled features the token cosine becomes a per-image cosine). Writes ``diversity.csv``,
    ``dispersion.csv`` (per block and pooled over blocks), ``diversity.png`` (pair matrices for up to
    4 t) and ``diversity_vs_t.png`` (pair means vs t)."""
    if spec.n < 2:
        raise ValueError(f"the diversity terms need at least 2 images, got --n {spec.n}")
    ck = load_for_analysis(ckpt, weights, spec)
    res = prepare_for(ck, out, "diversity", DiversityResult, overwrite=overwrite,
                      identity=result_identity(ck, spec, blocks=blocks, ts=ts))
    _, g = load_features(ck, spec, blocks=blocks, ts=ts)
    if len(g.blocks) < 2:
        raise ValueError("the diversity terms compare block pairs: pass at least 2 --blocks")
    feats = {(b, t): g.features[(b, t)] for b in g.blocks for t in g.ts}
    rep = diversity_report(feats, g.blocks, g.ts, log_snr=g.log_snr)
    disp = dispersion_table(feats, g.blocks, g.ts)
    meta = describe_grid(ck, g)
    name = f"{meta['model']} @ step {ck.step} ({meta['weights']})"
    res.save("png", plots.plot_diversity(rep, ts=_plot_ts(g.ts), title=f"DiverseDiT diversity terms per block pair: "
                                         f"{name}", meta=meta), "diversity.png", pdf)
    long = rep.groupby("t", as_index=False)[TERMS].mean().melt(id_vars="t", var_name="term", value_name="mean over pairs")
    res.save("curve_png", plots.plot_curves(long, "t", "mean over pairs", hue="term",
                                            title=f"Diversity terms (mean over {len(rep) // len(g.ts)} block pairs) "
                                                  f"vs t: {name}", meta=meta, xlabel="t (larger = noisier)"),
             "diversity_vs_t.png", pdf)
    for df in (rep, disp):
        df.insert(0, "checkpoint", str(ck.path))
        df.insert(1, "checkpoint_sha", ck.sha)
        df.insert(2, "step", ck.step)
        df.insert(3, "weights", ck.weights)
    res.files["dispersion_csv"] = write_table(disp, res.out / "dispersion.csv")
    res.files["csv"] = write_table(rep, res.out / "diversity.csv")
    res.table, res.dispersion = rep, disp
    return res.finish()
