"""``probe layer-grid``: checkpoint -> grid features -> probes -> tidy table + heatmap.

The steps are the ones of ``docs/probing.md``: features of ``n_train`` train images and
``n_test`` official-test images for every (block, t) cell (shared noise, null label by default,
cached), one probe per cell fitted on train (held-out L2 selection, refit) and scored on test.
The outputs are written only once everything has succeeded, each atomically, so a failed run
never leaves a table that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist

from training.checkpoint import load_checkpoint
from training.data import make_dataset

from .cache import FeatureCache, atomic_write_text
from .figures import layer_grid_heatmap
from .grid import GridFeatures, extract_grid, validate_blocks, validate_ts, default_ts, LABEL_POLICIES
from .hooks import parse_pooling
from .probes import PROBES, fit_probes

__all__ = ["run_layer_grid", "grid_table", "summarize", "LayerGridResult", "DEFAULT_N_TRAIN", "DEFAULT_N_TEST",
           "TABLE_COLUMNS"]

DEFAULT_N_TRAIN = 2000
DEFAULT_N_TEST = 1000
TABLE_COLUMNS = ["checkpoint", "weights", "step", "model", "method", "family", "block", "t", "log_snr", "accuracy",
                 "val_accuracy", "train_accuracy", "reg", "reg_kind", "probe", "pooling", "label_policy", "dataset",
                 "n_train", "n_test", "holdout", "seed", "time_convention", "checkpoint_sha", "protocol_hash"]


# Table spelling of the label policy: a bare "null" would be read back as NaN by pandas.read_csv.
TABLE_LABEL_POLICY = {"null": "null-class", "class": "true-class"}


class LayerGridResult:
    """The table plus where it was written (``csv``, ``png``, ``protocol`` paths; None off rank 0)."""

    def __init__(self, table: pd.DataFrame, csv: Path | None, png: Path | None, protocol: Path | None, info: dict):
        self.table, self.csv, self.png, self.protocol, self.info = table, csv, png, protocol, info


def _flatten(g: GridFeatures, cells: list[tuple]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(cells, rows, D) features, labels per row and the image id per row (tokens as samples)."""
    x = g.stack(cells)
    if x.ndim == 4:  # tokens: (cells, N, T, D) -> every token is a sample with its image's label
        c, n, t, d = x.shape
        return x.reshape(c, n * t, d), np.repeat(g.labels, t), np.repeat(np.arange(n), t)
    return x, g.labels, None


def protocol_hash(proto: dict) -> str:
    return hashlib.sha256(json.dumps(proto, sort_keys=True, default=str).encode()).hexdigest()[:12]


def grid_table(gtr: GridFeatures, gte: GridFeatures, probe: str = "torch", *, device: str = "cpu", seed: int = 0,
               holdout: float = 0.2, progress: bool = False, num_classes: int | None = None,
               **probe_kwargs) -> tuple[pd.DataFrame, dict]:
    """Fit one probe per cell of train / test grids; returns the tidy table and the full protocol."""
    cells = [(b, t) for t in gtr.ts for b in gtr.blocks]
    xtr, ytr, groups = _flatten(gtr, cells)
    xte, yte, _ = _flatten(gte, cells)
    res = fit_probes(xtr, ytr, xte, yte, probe, device=device, seed=seed, holdout=holdout, groups=groups,
                     num_classes=num_classes, progress=progress, **probe_kwargs)
    m = gtr.meta
    proto = {"extraction": {k: v for k, v in m.items() if k not in ("blocks", "ts")},
             "test_split": {"split": gte.meta["split"], "n_samples": gte.meta["n_samples"],
                            "indices_sha": gte.meta["indices_sha"]},
             "probe": res.protocol}
    phash = protocol_hash(proto)
    rows = []
    for i, (b, t) in enumerate(cells):
        rows.append({
            "checkpoint": m["checkpoint"], "weights": m["weights"], "step": m["step"], "model": m["model"],
            "method": m["method"], "family": m["family"], "block": int(b), "t": t, "log_snr": gtr.log_snr[t],
            "accuracy": float(res.accuracy[i]), "val_accuracy": float(res.val_accuracy[i]),
            "train_accuracy": float(res.train_accuracy[i]), "reg": float(res.reg[i]),
            "reg_kind": res.protocol["reg_kind"], "probe": probe, "pooling": m["pooling"],
            "label_policy": TABLE_LABEL_POLICY[m["label_policy"]], "dataset": m["dataset"], "n_train": m["n_samples"],
            "n_test": gte.meta["n_samples"], "holdout": res.protocol["holdout"], "seed": m["seed"],
            "time_convention": m["time_convention"], "checkpoint_sha": m["checkpoint_sha"], "protocol_hash": phash,
        })
    df = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    proto["probe_seconds"] = res.seconds
    return df, proto


def summarize(df: pd.DataFrame) -> str:
    """A compact text summary: the accuracy grid (%) and the best cell."""
    grid = df.pivot_table(index="block", columns="t", values="accuracy") * 100
    grid.columns = [f"{float(c):g}" for c in grid.columns]
    best = df.loc[df["accuracy"].idxmax()]
    r = df.iloc[0]
    head = (f"{r['model']} ({r['weights']} weights, label={r['label_policy']}, probe={r['probe']}, "
            f"pooling={r['pooling']}, n_train={r['n_train']}, n_test={r['n_test']})")
    body = grid.round(1).to_string(float_format=lambda v: f"{v:5.1f}")
    tail = (f"best: block {int(best['block'])}, t={best['t']:g} (log-SNR {best['log_snr']:+.2f}): "
            f"{100 * best['accuracy']:.1f}% top-1")
    return f"{head}\ntop-1 accuracy (%), rows = block, columns = t\n{body}\n{tail}"


def _maybe_init_dist(device: str) -> tuple[int, int]:
    """Join the torchrun process group if launched by torchrun (NCCL on GPUs, gloo otherwise)."""
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1 and not dist.is_initialized():
        use_nccl = torch.cuda.is_available() and device != "cpu"
        if use_nccl:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if use_nccl else "gloo")
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _default_out(checkpoint: Path, weights: str, label: str, probe: str) -> Path:
    return Path("layer_grid") / f"{checkpoint.stem}-{weights}-{label}-{probe}"


def run_layer_grid(checkpoint: str | os.PathLike, *, data: str | None = None, blocks: Sequence[int] | None = None,
                   ts: Sequence | None = None, weights: str = "ema", label: str = "null", probe: str = "torch",
                   device: str = "auto", n_train: int = DEFAULT_N_TRAIN, n_test: int = DEFAULT_N_TEST,
                   pooling: str = "mean", seed: int = 0, batch_size: int = 256,
                   out_dir: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
                   family: str | None = None, time_convention: str | None = None, trust: bool = False,
                   data_root: str | None = None, holdout: float = 0.2, progress: bool = True,
                   probe_device: str | None = None) -> LayerGridResult:
    """Probe every (block, t) cell of one checkpoint; writes ``layer_grid.csv`` + ``layer_grid.png``.

    Also writes ``layer_grid.protocol.json`` (the full extraction and probe protocol). Returns a
    :class:`LayerGridResult`. ``cache_dir=None`` disables the feature cache. Under ``torchrun``
    every rank extracts its shard; rank 0 probes and writes (other ranks get an empty table).
    """
    # Cheap argument checks first, so typos fail before a checkpoint or dataset is loaded.
    if weights not in ("ema", "model"):
        raise ValueError(f"--weights must be ema or model, got {weights!r}")
    if label not in LABEL_POLICIES:
        raise ValueError(f"--label must be null or class, got {label!r}")
    if probe not in PROBES:
        raise ValueError(f"--probe must be one of {', '.join(PROBES)}, got {probe!r}")
    parse_pooling(pooling)
    if n_train < 2 or n_test < 1:
        raise ValueError("--n-train must be >= 2 and --n-test >= 1")
    if probe == "cuml" and not torch.cuda.is_available():
        raise ValueError("cuML needs a CUDA GPU; use --probe torch")
    checkpoint = Path(checkpoint)
    rank, world = _maybe_init_dist(device)
    if device == "auto" and world > 1 and torch.cuda.is_available():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    elif device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"

    ck = load_checkpoint(checkpoint, weights=weights, family=family, time_convention=time_convention, trust=trust)
    validate_blocks(blocks, ck.model.depth)
    nT = int(ck.meta.get("num_timesteps", 1000) or 1000)
    validate_ts(ts if ts else default_ts(ck.meta["family"], nT), ck.meta["family"], nT)
    data = data or ck.meta.get("data") or "fashion-mnist"
    dtrain = make_dataset(data, "train", root=data_root)
    dtest = make_dataset(data, "test", root=data_root)
    cache = FeatureCache(cache_dir) if cache_dir is not None else None
    common = dict(blocks=blocks, ts=ts or None, label_policy=label, pooling=pooling, batch_size=batch_size,
                  seed=seed, device=device, cache=cache, progress=progress)
    gtr = extract_grid(ck, dtrain, n_samples=n_train, split="train", **common)
    gte = extract_grid(ck, dtest, n_samples=n_test, split="test", **common)
    if rank != 0:
        return LayerGridResult(pd.DataFrame(columns=TABLE_COLUMNS), None, None, None, {})

    num_classes = max(dtrain.num_classes, int(gtr.labels.max()) + 1, int(gte.labels.max()) + 1)
    pdev = probe_device or device
    df, proto = grid_table(gtr, gte, probe, device=pdev, seed=seed, holdout=holdout, progress=progress,
                           num_classes=num_classes)
    out = Path(out_dir) if out_dir is not None else _default_out(checkpoint, weights, label, probe)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, png_path, proto_path = out / "layer_grid.csv", out / "layer_grid.png", out / "layer_grid.protocol.json"
    # Figure first (the step most likely to fail), the table last: a CSV only exists for a finished run
    # (an older table in the same folder is removed first so it cannot pass for this run's).
    csv_path.unlink(missing_ok=True)
    layer_grid_heatmap(df, png_path)
    atomic_write_text(proto_path, json.dumps(proto, indent=1, default=str))
    atomic_write_text(csv_path, df.to_csv(index=False))
    return LayerGridResult(df, csv_path, png_path, proto_path, {"probe_seconds": proto["probe_seconds"]})

