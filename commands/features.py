"""How a command gets its features: the extraction protocol (:class:`FeatureSpec`), loading a
checkpoint and its data under it, the flags every analysis checks the same way (``--weights``,
cells) and the title metadata that states the protocol.

Every analysis command extracts grid features the same way, so the protocol is one dataclass and
one loader; a result then says exactly which images, noise, labels and pooling it was measured on.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from repdyn.core.timesteps import format_t
from repdyn.datasets.sources import make_dataset
from repdyn.model.checkpoint import LoadedCheckpoint, load_checkpoint
from repdyn.probe.cache import DEFAULT_CACHE, FeatureCache
from repdyn.probe.grid import GridFeatures, default_ts, extract_grid, validate_ts

__all__ = ["FeatureSpec", "check_weights", "weights_word", "load_for_analysis", "checkpoint_columns", "data_of",
           "dataset_for", "load_features", "cell_t", "parse_cells", "spread_blocks", "analysis_ts", "describe_grid"]


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
    cache_dir: str | os.PathLike | None = DEFAULT_CACHE
    family: str | None = None
    time_convention: str | None = None
    num_heads: int | None = None
    trust: bool = False
    progress: bool = True


def check_weights(weights: str) -> str:
    """``--weights`` checked before any checkpoint is read (a typo fails in one line, at once)."""
    if weights not in ("ema", "model"):
        raise ValueError(f"--weights must be ema or model, got {weights!r}")
    return weights


def weights_word(weights: str) -> str:
    """How titles name a weight set: EMA or online."""
    return "EMA" if weights == "ema" else "online"


def load_for_analysis(path: str | os.PathLike, weights: str, spec: FeatureSpec) -> LoadedCheckpoint:
    """The checkpoint as the spec says to read it (family, time convention, heads of foreign files)."""
    return load_checkpoint(path, weights=check_weights(weights), family=spec.family,
                           time_convention=spec.time_convention, num_heads=spec.num_heads, trust=spec.trust)


def checkpoint_columns(ck: LoadedCheckpoint) -> dict[str, object]:
    """The columns that tie a result row to its checkpoint, as every probe table writes them, so
    ``probe correlate`` can join any of them with ``probe eval``'s metrics (on the content hash)."""
    return {"run": ck.run_name, "checkpoint": str(Path(ck.path).resolve()), "checkpoint_sha": ck.sha,
            "step": ck.step, "weights": ck.weights}


def data_of(ck: LoadedCheckpoint, spec: FeatureSpec) -> str:
    """The dataset a command analyses: ``--data`` when given, else the one the run trained on (else
    Fashion-MNIST, for files that do not say)."""
    return spec.data or ck.data or "fashion-mnist"


def dataset_for(ck: LoadedCheckpoint, spec: FeatureSpec, split: str | None = None, *, root: str | None = None):
    """The split of :func:`data_of` in the checkpoint's channels (:meth:`LoadedCheckpoint.dataset_inputs`);
    ``root``: where a downloaded dataset lives (default: its own)."""
    return make_dataset(data_of(ck, spec), split or spec.split, root=root, **ck.dataset_inputs())


def load_features(ck: LoadedCheckpoint, spec: FeatureSpec, *, blocks: Sequence[int] | None = None,
                  ts: Sequence | None = None, split: str | None = None, n: int | None = None,
                  pooling: str | None = None, indices: Sequence[int] | None = None,
                  dataset=None) -> tuple[Any, GridFeatures]:
    """Grid features of a loaded checkpoint under ``spec`` (overrides per call); returns (dataset, grid)."""
    ds = dataset if dataset is not None else dataset_for(ck, spec, split)
    cache = FeatureCache(spec.cache_dir) if spec.cache_dir is not None else None
    g = extract_grid(ck, ds, blocks=blocks, ts=ts, n_samples=n if n is not None else spec.n,
                     label_policy=spec.label, pooling=pooling or spec.pooling, batch_size=spec.batch_size,
                     seed=spec.seed, device=spec.device, cache=cache, split=split or spec.split, indices=indices,
                     progress=spec.progress)
    return ds, g


def cell_t(ck: LoadedCheckpoint, t) -> float | int:
    """One t in the checkpoint family's canonical form (SiT float, DiT int), validated."""
    return validate_ts([t], ck.family, ck.num_timesteps)[0]


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


def spread_blocks(depth: int, max_blocks: int) -> list[int]:
    """All blocks for shallow models, else ``max_blocks`` evenly spaced ones including 1 and depth."""
    if depth <= max_blocks:
        return list(range(1, depth + 1))
    return sorted({int(round(x)) for x in np.linspace(1, depth, max_blocks)})


def analysis_ts(ck: LoadedCheckpoint, few: bool) -> list:
    """The layer-grid default, or SRA's PCA times (0.1, 0.3, 0.5, 0.7; DiT analogues) when ``few``."""
    if not few:
        return default_ts(ck.family, ck.num_timesteps)
    fr = (0.1, 0.3, 0.5, 0.7)
    return list(fr) if ck.family == "sit" else [int(f * ck.num_timesteps) for f in fr]


def describe_grid(ck: LoadedCheckpoint, g: GridFeatures, **extra: Any) -> dict[str, Any]:
    """Title metadata: model, step, weights, protocol (data/split, n, label policy, pooling, seed)."""
    m = g.meta
    proto = (f"{m['dataset']}/{m['split']} n={m['n_samples']}, label={m['label_policy']}, "
             f"pooling={m['pooling']}, seed={m['seed']}")
    d = {"model": m.get("model"), "step": ck.step, "weights": weights_word(ck.weights), "protocol": proto}
    d.update({k: format_t(v) if k == "t" else v for k, v in extra.items()})
    return d
