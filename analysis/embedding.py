"""2-D embeddings of pooled block features: UMAP per cell and AlignedUMAP across t.

Thin, seeded wrappers around umap-learn. Notes:
* a fixed ``seed`` makes UMAP reproducible but single-threaded (umap-learn disables its
  parallel SGD when ``random_state`` is set); pass ``seed=None`` for speed.
* the first UMAP call of a process pays ~15 s of numba JIT compilation.
* features are z-scored per channel by default: DiT residual streams have a few massive
  channels that otherwise dominate Euclidean neighbourhoods.
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, Union

import numpy as np
import pandas as pd
import torch

ArrayLike = Union[np.ndarray, torch.Tensor]

__all__ = ["standardize", "umap_embed", "umap_cells", "aligned_umap", "embedding_frame"]


def _np(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"UMAP needs pooled features (n, d), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("features contain NaN or Inf")
    return x


def standardize(x: ArrayLike) -> np.ndarray:
    """Per-channel z-score of (n, d) features (constant channels left at 0)."""
    x = _np(x)
    sd = x.std(0)
    return (x - x.mean(0)) / np.where(sd > 0, sd, 1.0)


def _umap_kwargs(n: int, n_neighbors: int, min_dist: float, metric: str, seed: int | None) -> dict[str, Any]:
    if n < 4:
        raise ValueError(f"UMAP needs at least 4 samples, got {n}")
    nn = min(n_neighbors, n - 1)
    kw: dict[str, Any] = dict(n_neighbors=nn, min_dist=min_dist, metric=metric, n_components=2)
    if seed is not None:
        kw["random_state"] = seed
    return kw


def umap_embed(x: ArrayLike, n_neighbors: int = 15, min_dist: float = 0.1, metric: str = "euclidean",
               seed: int | None = 0, standardize_features: bool = True, **umap_kwargs: Any) -> np.ndarray:
    """UMAP of pooled features x (n, d) -> (n, 2) float32.

    n_neighbors is capped at n - 1. Extra keyword arguments go to ``umap.UMAP``.
    """
    import umap  # local import: umap pulls numba and is slow to import

    x = standardize(x) if standardize_features else _np(x)
    kw = _umap_kwargs(len(x), n_neighbors, min_dist, metric, seed) | umap_kwargs
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*n_jobs value.*")
        return umap.UMAP(**kw).fit_transform(x).astype(np.float32)


def umap_cells(features: Mapping[tuple[Hashable, Hashable], ArrayLike], cells: Sequence[tuple[Hashable, Hashable]],
               **kwargs: Any) -> dict[tuple[Hashable, Hashable], np.ndarray]:
    """Independent UMAP per chosen (block, t) cell: {cell: (n, 2)}. ``kwargs`` -> ``umap_embed``."""
    missing = [c for c in cells if c not in features]
    if missing:
        raise ValueError(f"cells not in features: {missing}")
    return {c: umap_embed(features[c], **kwargs) for c in cells}


def aligned_umap(
    features: Mapping[tuple[Hashable, Hashable], ArrayLike],
    block: Hashable,
    ts: Sequence[Hashable] | None = None,
    n_neighbors: int = 15,
    min_dist: float = 0.1,
    alignment_regularisation: float = 1e-2,
    alignment_window_size: int = 3,
    seed: int | None = 0,
    standardize_features: bool = True,
    **umap_kwargs: Any,
) -> dict[Hashable, np.ndarray]:
    """AlignedUMAP of one block across timesteps: {t: (n, 2)} with consistent orientation.

    features: ``{(block, t): (n, d)}``; every t must hold the same n inputs in the same order
    (``repdyn.probe.grid`` guarantees this), so consecutive slices are related by the identity map.
    """
    import umap

    ts = sorted(t for (b, t) in features if b == block) if ts is None else list(ts)
    if len(ts) < 2:
        raise ValueError(f"aligned_umap needs at least 2 timesteps for block {block!r}, got {ts}")
    missing = [(block, t) for t in ts if (block, t) not in features]
    if missing:
        raise ValueError(f"features lack cells {missing}")
    xs = [standardize(features[(block, t)]) if standardize_features else _np(features[(block, t)]) for t in ts]
    n = len(xs[0])
    if any(len(x) != n for x in xs):
        raise ValueError(f"block {block!r}: sample counts differ across t: {[len(x) for x in xs]}")
    relations = [{i: i for i in range(n)} for _ in range(len(ts) - 1)]
    kw = _umap_kwargs(n, n_neighbors, min_dist, "euclidean", seed) | umap_kwargs
    kw.pop("n_components", None)
    model = umap.AlignedUMAP(n_components=2, alignment_regularisation=alignment_regularisation,
                             alignment_window_size=alignment_window_size, **kw)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*n_jobs value.*")
        model.fit(xs, relations=relations)
    return {t: np.asarray(e, dtype=np.float32) for t, e in zip(ts, model.embeddings_)}


def embedding_frame(embeddings: Mapping[Any, np.ndarray], labels: ArrayLike | None = None,
                    key_names: tuple[str, ...] = ("block", "t")) -> pd.DataFrame:
    """Tidy table of embeddings: key columns, sample, x, y, [label]."""
    frames = []
    lab = None if labels is None else np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels)
    for key, e in embeddings.items():
        e = np.asarray(e)
        d: dict[str, Any] = {}
        kt = key if isinstance(key, tuple) else (key,)
        names = key_names if len(kt) == len(key_names) else tuple(f"key{i}" for i in range(len(kt)))
        for nm, v in zip(names, kt):
            d[nm] = [v] * len(e)
        d["sample"] = np.arange(len(e))
        d["x"], d["y"] = e[:, 0], e[:, 1]
        if lab is not None:
            if len(lab) != len(e):
                raise ValueError(f"labels ({len(lab)}) and embedding ({len(e)}) lengths differ")
            d["label"] = lab
        frames.append(pd.DataFrame(d))
    return pd.concat(frames, ignore_index=True)
