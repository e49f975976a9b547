"""``probe layer-grid``: checkpoint -> grid features -> one probe per cell -> tidy table + heatmap.

The steps are the ones of ``docs/probing.md``: features of ``n_train`` train images and ``n_test``
official-test images for every (block, t) cell (shared noise, null label by default, cached), one
probe per cell fitted on train (held-out L2 selection, refit) and scored on test. The outputs are
written only once everything has succeeded, each atomically, so a failed run never leaves a table
that looks complete.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from repdyn.analysis.plots import layer_grid_heatmap
from repdyn.probe.cache import FeatureCache
from repdyn.probe.grid import LABEL_POLICIES, default_ts, extract_grid, validate_blocks, validate_ts
from repdyn.probe.hooks import parse_pooling
from repdyn.probe.layer_grid import DEFAULT_N_TEST, check_probe_sizes, DEFAULT_N_TRAIN, TABLE_COLUMNS, grid_table
from repdyn.probe.probes import PROBES
from repdyn.model.checkpoint import load_checkpoint
from repdyn.datasets.sources import make_dataset
from repdyn.core.files import atomic_write_text, save_figure, write_table
from repdyn.core.runtime import init_distributed, resolve_device

from repdyn.commands.features import check_weights
from repdyn.commands.outputs import claim_output, default_out, release_output, releases_outputs

__all__ = ["LayerGridResult", "run_layer_grid"]


@dataclass
class LayerGridResult:
    """The table and where it was written (paths are None off rank 0 under torchrun)."""

    table: pd.DataFrame
    csv: Path | None
    png: Path | None
    protocol: Path | None
    probe_seconds: float | None = None
    notes: list[str] = field(default_factory=list)  # what the checkpoint loader ignored or inferred


@releases_outputs
def run_layer_grid(checkpoint: str | os.PathLike, *, data: str | None = None, blocks: Sequence[int] | None = None,
                   ts: Sequence | None = None, weights: str = "ema", label: str = "null", probe: str = "torch",
                   device: str = "auto", n_train: int = DEFAULT_N_TRAIN, n_test: int = DEFAULT_N_TEST,
                   pooling: str = "mean", seed: int = 0, batch_size: int = 256,
                   out_dir: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
                   family: str | None = None, time_convention: str | None = None, trust: bool = False,
                   data_root: str | None = None, holdout: float = 0.2, progress: bool = True,
                   probe_device: str | None = None, overwrite: bool = False,
                   num_heads: int | None = None) -> LayerGridResult:
    """Probe every (block, t) cell of one checkpoint (default blocks: 0 = input embedding, then 1..depth); writes ``layer_grid.csv``, ``layer_grid.png`` and
    ``layer_grid.protocol.json`` (the full extraction and probe protocol). ``cache_dir=None`` disables
    the feature cache. Under ``torchrun`` every rank extracts its shard; rank 0 probes and writes."""
    # Cheap argument checks first, so typos fail before a checkpoint or dataset is loaded.
    check_weights(weights)
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
    rank, _ = init_distributed(device)
    dev = resolve_device(device)

    ck = load_checkpoint(checkpoint, weights=weights, family=family, time_convention=time_convention,
                         num_heads=num_heads, trust=trust)
    # default: block 0 (the input embedding: what the input alone gives, the floor of the profile) and
    # every transformer block
    blocks = validate_blocks(blocks, ck.model.depth) if blocks else [0, *range(1, ck.model.depth + 1)]
    validate_ts(ts if ts else default_ts(ck.family, ck.num_timesteps), ck.family, ck.num_timesteps)
    data = data or ck.data or "fashion-mnist"
    dtrain = make_dataset(data, "train", root=data_root, **ck.dataset_inputs())  # channels follow the model
    dtest = make_dataset(data, "test", root=data_root, **ck.dataset_inputs())
    n_train = check_probe_sizes(n_train, len(dtrain), dtrain.num_classes)
    identity = {"command": "layer-grid", "checkpoint_sha": ck.sha, "weights": weights, "data": data, "blocks": blocks,
                "ts": ts, "label": label, "probe": probe, "n_train": n_train, "n_test": n_test, "pooling": pooling,
                "seed": seed, "holdout": holdout, "time_convention": ck.time_convention}
    out = Path(out_dir) if out_dir is not None else default_out("layer_grid", checkpoint, weights, identity, label,
                                                                  probe, sha=ck.sha)
    if rank == 0:  # claimed before any extraction: a wrong --out fails in seconds, not after the fits
        claim_output(out, identity, overwrite)
    cache = FeatureCache(cache_dir) if cache_dir is not None else None
    common = dict(blocks=blocks, ts=ts or None, label_policy=label, pooling=pooling, batch_size=batch_size,
                  seed=seed, device=dev, cache=cache, progress=progress)
    gtr = extract_grid(ck, dtrain, n_samples=n_train, split="train", **common)
    gte = extract_grid(ck, dtest, n_samples=n_test, split="test", **common)
    if rank != 0:
        return LayerGridResult(pd.DataFrame(columns=TABLE_COLUMNS), None, None, None)

    num_classes = max(dtrain.num_classes, int(gtr.labels.max()) + 1, int(gte.labels.max()) + 1)
    df, proto = grid_table(gtr, gte, probe, device=probe_device or str(dev), seed=seed, holdout=holdout,
                           progress=progress, num_classes=num_classes)
    csv_path, png_path, proto_path = out / "layer_grid.csv", out / "layer_grid.png", out / "layer_grid.protocol.json"
    # Figure first (the step most likely to fail), the table last: a CSV only exists for a finished run
    # (an older table in the same folder is removed first so it cannot pass for this run's).
    csv_path.unlink(missing_ok=True)
    proto["checkpoint_load"] = {"notes": ck.load_notes(), "ignored_keys": ck.ignored_keys, "inferred": ck.inferred}
    # a raw release has one weight set: its figure says so instead of "ema weights"
    save_figure(layer_grid_heatmap(df.assign(weights="release") if ck.meta.get("raw_release") else df), png_path)
    atomic_write_text(proto_path, json.dumps(proto, indent=1, default=str))
    write_table(df, csv_path)
    release_output(out, [csv_path.name, png_path.name, proto_path.name], ck.load_notes())
    return LayerGridResult(df, csv_path, png_path, proto_path, proto["probe_seconds"], ck.load_notes())
