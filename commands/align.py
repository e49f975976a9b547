"""``probe align``: every (block, t) cell of a checkpoint against an external encoder's features of
the same images (platonic-rep kNN alignment: CKNNA, mutual kNN, ...)."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from repdyn.analysis import plots
from repdyn.analysis.alignment import METRICS, align_cells
from repdyn.core.files import atomic_write_text, write_table
from repdyn.core.runtime import resolve_device
from repdyn.model.encoders import (EncodedFeatures, Encoder, PrecomputedFeatures, describe, info_json,
    load_encoder, parse_encoder)
from repdyn.probe.cache import FeatureCache

from repdyn.commands.features import (FeatureSpec, checkpoint_columns, data_of, describe_grid, load_features,
                                      load_for_analysis)
from repdyn.commands.outputs import Outputs, prepare_for, releases_outputs, result_identity

__all__ = ["AlignResult", "run_align", "encoder_features", "parse_metrics", "DEFAULT_METRICS"]

DEFAULT_METRICS = ("cknna", "mutual_knn")


@dataclass
class AlignResult(Outputs):
    table: pd.DataFrame | None = None  # alignment.csv (tidy)
    encoder: str = ""


def parse_metrics(metrics: Sequence[str] | str | None) -> list[str]:
    """``"cknna,mutual_knn"`` or a list -> validated metric names (default :data:`DEFAULT_METRICS`)."""
    if isinstance(metrics, str):
        metrics = [metrics]
    names = [m.strip() for item in metrics or [] for m in str(item).split(",") if m.strip()]
    names = list(dict.fromkeys(names)) or list(DEFAULT_METRICS)
    bad = [m for m in names if m not in METRICS]
    if bad:
        raise ValueError(f"unknown --metrics {', '.join(bad)}; choose from {', '.join(METRICS)}")
    return names


def _indices_sha(idx: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(np.asarray(idx, dtype=np.int64)).tobytes()).hexdigest()[:16]


def encoder_features(enc: Encoder, ds, indices: np.ndarray, spec: FeatureSpec, *, tokens: bool,
                     dataset_name: str) -> np.ndarray:
    """The encoder's pooled (N, D) or token (N, T, D) features of ``ds[indices]``, read from (or
    written to) the shared feature cache, keyed by the encoder's identity, the images and the split."""
    if isinstance(enc, PrecomputedFeatures) or spec.cache_dir is None:
        f = enc.features(ds, indices, batch_size=spec.batch_size, device=resolve_device(spec.device), tokens=tokens,
                         progress=spec.progress)
        return f.tokens if tokens else f.pooled
    cache = FeatureCache(spec.cache_dir)
    fields = {"kind": "encoder", **enc.identity(), "dataset": dataset_name, "split": spec.split,
              "indices": _indices_sha(indices), "n": int(len(indices)), "what": "tokens" if tokens else "pooled"}
    if cache.has(fields):
        return np.asarray(cache.load(fields), dtype=np.float32)
    f: EncodedFeatures = enc.features(ds, indices, batch_size=spec.batch_size, device=resolve_device(spec.device),
                                      tokens=tokens, progress=spec.progress)
    arr = f.tokens if tokens else f.pooled
    w = cache.writer(fields, arr.shape)
    try:
        w.write(0, arr)
        w.commit()
    except BaseException:
        w.abort()
        raise
    return arr


def _log(msg: str) -> None:
    print(f"note: {msg}", file=sys.stderr)


@releases_outputs
def run_align(ckpt: str | os.PathLike, spec: FeatureSpec, *, encoder: str = "embedded", weights: str = "ema",
              blocks: Sequence[int] | None = None, ts: Sequence | None = None,
              metrics: Sequence[str] | str | None = None, topk: int = 10, out: str | os.PathLike | None = None,
              pdf: bool = False, overwrite: bool = False) -> AlignResult:
    """Score every (block, t) cell against the encoder on the same images (``spec.split``, the first
    ``spec.n`` of the seeded subset, the layer grid's seeded noise). ``spec.pooling``: ``mean``
    (each image one mean-pooled row) or ``tokens`` (each image its row-major patch tokens
    concatenated, against the encoder's concatenated patch tokens). Metrics from
    :mod:`repdyn.analysis.alignment` with platonic-rep's preprocessing (clip at the 0.95 quantile,
    L2-normalise rows). Writes ``alignment.csv`` (tidy: run, checkpoint, checkpoint_sha, step, weights, block, t,
    log_snr, metric, value, encoder, topk, n) and ``alignment.png`` (blocks x t per metric, best cell boxed)."""
    names = parse_metrics(metrics)
    parse_encoder(encoder)  # a malformed spec fails before any work
    if spec.pooling not in ("mean", "tokens"):
        raise ValueError(f"alignment uses mean-pooled or token features, got pooling {spec.pooling!r}")
    if int(topk) < (2 if "cknna" in names else 1):
        raise ValueError(f"--topk must be >= {2 if 'cknna' in names else 1}, got {topk}")
    if spec.n < max(int(topk) + 1, 4):
        raise ValueError(f"--n {spec.n} is too small for --topk {topk}: every image needs topk neighbours "
                         f"(--n >= {max(int(topk) + 1, 4)}; use a few hundred)")
    ck = load_for_analysis(ckpt, weights, spec)
    enc = load_encoder(encoder, data=data_of(ck, spec), device=resolve_device(spec.device), progress=spec.progress, log=_log)
    ident = result_identity(ck, spec, encoder=enc.identity(), blocks=blocks, ts=ts, metrics=names, topk=int(topk))
    res = prepare_for(ck, out, "align", AlignResult, identity=ident, overwrite=overwrite)
    ds, g = load_features(ck, spec, blocks=blocks, ts=ts)
    tokens = spec.pooling == "tokens"
    y = encoder_features(enc, ds, g.indices, spec, tokens=tokens, dataset_name=str(g.meta.get("dataset")))
    cells = {(b, t): g.features[(b, t)] for b in g.blocks for t in g.ts}
    wide = align_cells(y, cells, metrics=names, topk=int(topk), device=spec.device)
    df = wide.melt(id_vars=["block", "t", "n", "topk"], value_vars=names, var_name="metric", value_name="value")
    df.insert(2, "log_snr", df["t"].map(lambda t: g.log_snr[t]))
    df["encoder"] = enc.name
    df = df[["block", "t", "log_snr", "metric", "value", "encoder", "topk", "n"]]
    df = pd.concat([pd.DataFrame([checkpoint_columns(ck)] * len(df)), df], axis=1)
    meta = describe_grid(ck, g, encoder=describe(enc), topk=int(topk))
    name = f"{meta['model']} @ step {ck.step} ({meta['weights']})"
    what = "patch tokens" if tokens else "mean-pooled"
    res.save("png", plots.cell_metric_heatmaps(df, names, f"Alignment of {what} cells with {enc.name}: {name}",
                                               meta=meta, labels=plots.MEASURE_LABELS), "alignment.png", pdf)
    res.files["csv"] = write_table(df, res.out / "alignment.csv")
    res.files["encoder"] = atomic_write_text(res.out / "encoder.json", json.dumps(json.loads(info_json(enc)), indent=1))
    res.table, res.encoder = df, enc.name
    return res.finish()
