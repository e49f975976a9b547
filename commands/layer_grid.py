"""``probe layer-grid``: checkpoint -> grid features -> one probe per cell -> tidy table + heatmap.

The steps are the ones of ``docs/probing.md``: features of ``n_train`` train images and ``spec.n``
official-test images for every (block, t) cell (shared noise, null label by default, cached), one
probe per cell fitted on train (held-out L2 selection, refit) and scored on test. The outputs are
written only once everything has succeeded, each atomically, so a failed run never leaves a table
that looks complete.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from repdyn.analysis.plots import layer_grid_heatmap
from repdyn.core.files import atomic_write_text, write_table
from repdyn.core.runtime import init_distributed, resolve_device
from repdyn.probe.grid import LABEL_POLICIES, default_ts, validate_blocks, validate_ts
from repdyn.probe.hooks import parse_pooling
from repdyn.probe.layer_grid import DEFAULT_N_TRAIN, TABLE_COLUMNS, check_probe_sizes, grid_table
from repdyn.probe.probes import PROBES

from repdyn.commands.features import FeatureSpec, check_weights, data_of, dataset_for, load_features, load_for_analysis
from repdyn.commands.outputs import Outputs, prepare_for, releases_outputs

__all__ = ["LayerGridResult", "run_layer_grid"]


@dataclass
class LayerGridResult(Outputs):
    """The table and where it was written (``out`` and the paths are None off rank 0 under torchrun)."""

    table: pd.DataFrame | None = None
    probe_seconds: float | None = None

    @property
    def csv(self) -> Path | None:
        return self.files.get("csv")

    @property
    def png(self) -> Path | None:
        return self.files.get("png")

    @property
    def protocol(self) -> Path | None:
        return self.files.get("protocol")


@releases_outputs
def run_layer_grid(checkpoint: str | os.PathLike, spec: FeatureSpec, *, weights: str = "ema",
                   blocks: Sequence[int] | None = None, ts: Sequence | None = None, probe: str = "torch",
                   n_train: int = DEFAULT_N_TRAIN, holdout: float = 0.2, probe_device: str | None = None,
                   data_root: str | None = None, out: str | os.PathLike | None = None,
                   overwrite: bool = False) -> LayerGridResult:
    """Probe every (block, t) cell of one checkpoint (default blocks: 0 = input embedding, then 1..depth):
    probes fitted on ``n_train`` train images and scored on ``spec.n`` test images (``spec.split`` is
    not used: the grid always reads both). Writes ``layer_grid.csv``, ``layer_grid.png`` and
    ``layer_grid.protocol.json`` (the full extraction and probe protocol). ``spec.cache_dir=None``
    disables the feature cache. Under ``torchrun`` every rank extracts its shard; rank 0 probes and writes."""
    # Cheap argument checks first, so typos fail before a checkpoint or dataset is loaded.
    check_weights(weights)
    if spec.label not in LABEL_POLICIES:
        raise ValueError(f"--label must be null or class, got {spec.label!r}")
    if probe not in PROBES:
        raise ValueError(f"--probe must be one of {', '.join(PROBES)}, got {probe!r}")
    parse_pooling(spec.pooling)
    if n_train < 2 or spec.n < 1:
        raise ValueError("--n-train must be >= 2 and --n-test >= 1")
    if probe == "cuml" and not torch.cuda.is_available():
        raise ValueError("cuML needs a CUDA GPU; use --probe torch")
    rank, _ = init_distributed(spec.device)
    dev = resolve_device(spec.device)

    ck = load_for_analysis(checkpoint, weights, spec)
    # default: block 0 (the input embedding: what the input alone gives, the floor of the profile) and
    # every transformer block
    blocks = validate_blocks(blocks, ck.model.depth) if blocks else [0, *range(1, ck.model.depth + 1)]
    validate_ts(ts if ts else default_ts(ck.family, ck.num_timesteps), ck.family, ck.num_timesteps)
    dtrain = dataset_for(ck, spec, "train", root=data_root)  # channels follow the model
    dtest = dataset_for(ck, spec, "test", root=data_root)
    n_train = check_probe_sizes(n_train, len(dtrain), dtrain.num_classes)
    identity = {"checkpoint_sha": ck.sha, "weights": weights, "data": data_of(ck, spec), "blocks": blocks, "ts": ts,
                "label": spec.label, "probe": probe, "n_train": n_train, "n_test": spec.n, "pooling": spec.pooling,
                "seed": spec.seed, "holdout": holdout, "time_convention": ck.time_convention}
    # claimed before any extraction: a wrong --out fails in seconds, not after the fits
    res = prepare_for(ck, out, "layer-grid", LayerGridResult, identity=identity, overwrite=overwrite,
                      root="layer_grid", parts=(spec.label, probe)) if rank == 0 else None
    _, gtr = load_features(ck, spec, blocks=blocks, ts=ts or None, split="train", n=n_train, dataset=dtrain)
    _, gte = load_features(ck, spec, blocks=blocks, ts=ts or None, split="test", dataset=dtest)
    if res is None:  # a non-zero rank: rank 0 probes and writes
        return LayerGridResult(None, table=pd.DataFrame(columns=TABLE_COLUMNS))

    num_classes = max(dtrain.num_classes, int(gtr.labels.max()) + 1, int(gte.labels.max()) + 1)
    df, proto = grid_table(gtr, gte, probe, device=probe_device or str(dev), seed=spec.seed, holdout=holdout,
                           progress=spec.progress, num_classes=num_classes)
    # Figure first (the step most likely to fail), the table last: a CSV only exists for a finished run
    # (an older table in the same folder is removed first so it cannot pass for this run's).
    (res.out / "layer_grid.csv").unlink(missing_ok=True)
    proto["checkpoint_load"] = {"notes": res.notes, "ignored_keys": ck.ignored_keys, "inferred": ck.inferred}
    # a raw release has one weight set: its figure says so instead of "ema weights"
    res.save("png", layer_grid_heatmap(df.assign(weights="release") if ck.meta.get("raw_release") else df),
             "layer_grid.png")
    res.files["protocol"] = atomic_write_text(res.out / "layer_grid.protocol.json",
                                              json.dumps(proto, indent=1, default=str))
    res.files["csv"] = write_table(df, res.out / "layer_grid.csv")
    res.table, res.probe_seconds = df, proto["probe_seconds"]
    return res.finish()
