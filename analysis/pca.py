"""Patch-token PCA rendered as RGB maps over the block x t grid (an improved SRA Fig. 2 left).

SRA fits a fresh 3-component PCA per (block, t) cell and min-max scales each cell, so neither
the component signs nor the colour scale are comparable between cells. Here:

* one PCA basis per block, fitted on the tokens of *all* requested t (and images) together, so a
  token that does not change along t keeps its colour;
* a deterministic sign convention (each component's largest-|loading| channel is positive) and
  optional alignment of each block's signs to the previous block (sign of the correlation of
  the projections of the same tokens), so neighbouring rows do not flip colours;
* a fixed colour scale per block: the ``percentiles`` of the projections over all t and images,
  clipped, so brightness changes along t are real.

Token grids are (N_img, T_tok, D) with T_tok = H*W in row-major patch order (DiT/SiT layout).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import numpy as np
import torch

from .cells import grid_cells

ArrayLike = Union[np.ndarray, torch.Tensor]

__all__ = [
    "pca_basis",
    "canonical_signs",
    "align_signs",
    "SharedPCA",
    "tokens_to_grid",
    "PCAGrid",
    "pca_rgb_grid",
]


def _np64(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def pca_basis(x: ArrayLike, n_components: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Principal axes of x (n, D) in float64 via SVD of the centred data.

    Returns (mean (D,), components (k, D) orthonormal rows with canonical signs, explained
    variance (k,)). k = min(n_components, n, D).
    """
    x = _np64(x)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"pca_basis: need (n >= 2, D) data, got {x.shape}")
    mean = x.mean(0)
    xc = x - mean
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    k = min(n_components, vt.shape[0])
    comps = canonical_signs(vt[:k])
    return mean, comps, (s[:k] ** 2) / (x.shape[0] - 1)


def canonical_signs(components: np.ndarray) -> np.ndarray:
    """Flip each row so that its largest-|loading| entry is positive (deterministic signs)."""
    c = np.array(components, dtype=np.float64, copy=True)
    idx = np.abs(c).argmax(1)
    sgn = np.sign(c[np.arange(len(c)), idx])
    sgn[sgn == 0] = 1.0
    return c * sgn[:, None]


def align_signs(components: np.ndarray, reference: np.ndarray,
                x: ArrayLike | None = None, x_ref: ArrayLike | None = None,
                mean: np.ndarray | None = None, mean_ref: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Flip components so they point the same way as a reference basis.

    components, reference: (k, D). Without data, the sign of the dot product of matching rows
    decides (same feature space, e.g. one block across t). With ``x`` / ``x_ref`` (the same n
    tokens seen by both bases, (n, D) and (n, D')), the sign of the correlation between the two
    projections decides -- this also works between blocks whose channels differ in meaning.
    Returns (aligned components, signs (k,) of +-1).
    """
    c = np.asarray(components, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    k = min(len(c), len(r))
    if x is not None and x_ref is not None:
        xa, xb = _np64(x), _np64(x_ref)
        pa = (xa - (xa.mean(0) if mean is None else mean)) @ c[:k].T
        pb = (xb - (xb.mean(0) if mean_ref is None else mean_ref)) @ r[:k].T
        score = (pa * pb).sum(0)
    else:
        if c.shape[1] != r.shape[1]:
            raise ValueError("align_signs without data needs bases of the same width D")
        score = (c[:k] * r[:k]).sum(1)
    sgn = np.where(score < 0, -1.0, 1.0)
    sgn = np.concatenate([sgn, np.ones(len(c) - k)])
    return c * sgn[:, None], sgn


@dataclass
class SharedPCA:
    """A PCA basis with a fixed colour scale.

    mean (D,), components (k, D), explained_variance (k,), lo / hi (k,): the projection values
    mapped to 0 and 1 in ``to_unit``.
    """

    mean: np.ndarray
    components: np.ndarray
    explained_variance: np.ndarray
    lo: np.ndarray
    hi: np.ndarray

    @classmethod
    def fit(cls, tokens: Sequence[ArrayLike] | ArrayLike, n_components: int = 3,
            percentiles: tuple[float, float] = (1.0, 99.0), max_fit_tokens: int | None = 200_000,
            seed: int = 0) -> "SharedPCA":
        """Fit one basis on all given token sets together.

        tokens: arrays of shape (..., D) (e.g. one (N_img, T_tok, D) per t); all are flattened
        to rows and concatenated. The colour scale uses every row; the basis is fitted on at most
        ``max_fit_tokens`` random rows (a speed cap).
        """
        sets = list(tokens) if isinstance(tokens, (list, tuple)) else [tokens]
        rows = np.concatenate([_np64(t).reshape(-1, _np64(t).shape[-1]) for t in sets], 0)
        fit_rows = rows
        if max_fit_tokens is not None and len(rows) > max_fit_tokens:
            fit_rows = rows[np.random.default_rng(seed).choice(len(rows), max_fit_tokens, replace=False)]
        mean, comps, ev = pca_basis(fit_rows, n_components)
        proj = (rows - mean) @ comps.T
        lo, hi = np.percentile(proj, percentiles[0], axis=0), np.percentile(proj, percentiles[1], axis=0)
        hi = np.where(hi > lo, hi, lo + 1e-12)
        return cls(mean, comps, ev, lo, hi)

    def transform(self, x: ArrayLike) -> np.ndarray:
        """(..., D) -> (..., k) projections."""
        x = _np64(x)
        return (x - self.mean) @ self.components.T

    def to_unit(self, x: ArrayLike) -> np.ndarray:
        """(..., D) -> (..., k) in [0, 1] with the fixed scale (clipped)."""
        return np.clip((self.transform(x) - self.lo) / (self.hi - self.lo), 0.0, 1.0)

    def flip(self, signs: np.ndarray) -> "SharedPCA":
        """Return a copy with components multiplied by ``signs`` (scale bounds follow)."""
        s = np.asarray(signs, dtype=np.float64)
        lo = np.where(s > 0, self.lo, -self.hi)
        hi = np.where(s > 0, self.hi, -self.lo)
        return SharedPCA(self.mean, self.components * s[:, None], self.explained_variance, lo, hi)


def tokens_to_grid(x: np.ndarray, hw: tuple[int, int] | None = None) -> np.ndarray:
    """(N, T_tok, C) -> (N, H, W, C), row-major patch order. ``hw`` defaults to a square grid."""
    x = np.asarray(x)
    if x.ndim == 2:
        x = x[None]
    n, t, c = x.shape
    if hw is None:
        side = int(round(np.sqrt(t)))
        if side * side != t:
            raise ValueError(f"{t} tokens do not form a square grid; pass hw=(H, W)")
        hw = (side, side)
    if hw[0] * hw[1] != t:
        raise ValueError(f"hw={hw} does not match {t} tokens")
    return x.reshape(n, hw[0], hw[1], c)


@dataclass
class PCAGrid:
    """RGB maps for every (block, t) cell.

    images[(block, t)]: (N_img, H, W, 3) float in [0, 1]; bases[block]: the SharedPCA used for
    that block (for ``basis="per_cell"``, keyed by (block, t)); blocks, ts; meta (settings).
    """

    images: dict[tuple[Any, Any], np.ndarray]
    bases: dict[Any, SharedPCA]
    blocks: list[Any]
    ts: list[Any]
    meta: dict[str, Any] = field(default_factory=dict)


def pca_rgb_grid(
    features: Mapping[tuple[Hashable, Hashable], ArrayLike],
    blocks: Sequence[Hashable] | None = None,
    ts: Sequence[Hashable] | None = None,
    images: Sequence[int] | None = None,
    basis: Literal["shared", "per_cell"] = "shared",
    align: Literal["previous_block", "none"] = "previous_block",
    percentiles: tuple[float, float] = (1.0, 99.0),
    hw: tuple[int, int] | None = None,
    max_fit_tokens: int | None = 200_000,
) -> PCAGrid:
    """PCA-RGB maps over the block x t grid.

    features: ``{(block, t): (N_img, T_tok, D)}`` token features (pooling="tokens").
    images: indices of the images to render (default all); the basis is fitted on these images.
    basis: "shared" (one basis and colour scale per block, across t; the default) or "per_cell"
    (SRA's per-cell PCA, for comparison; its signs are still aligned to the block's first t).
    align: "previous_block" flips each block's components to agree with the previous block on
    the same tokens. Returns a ``PCAGrid``.
    """
    blocks, ts = grid_cells(features, blocks, ts)

    def cell(b, t):
        x = _np64(features[(b, t)])
        if x.ndim != 3:
            raise ValueError(f"cell ({b}, {t}): PCA maps need token features (N, T_tok, D), got {x.shape}")
        return x if images is None else x[list(images)]

    out: dict[tuple[Any, Any], np.ndarray] = {}
    bases: dict[Any, SharedPCA] = {}
    prev: tuple[SharedPCA, np.ndarray] | None = None
    for b in blocks:
        cells = {t: cell(b, t) for t in ts}
        if basis == "shared":
            p = SharedPCA.fit(list(cells.values()), 3, percentiles, max_fit_tokens)
            ref_tokens = np.concatenate([c.reshape(-1, c.shape[-1]) for c in cells.values()], 0)
            if align == "previous_block" and prev is not None:
                _, s = align_signs(p.components, prev[0].components, ref_tokens, prev[1], p.mean, prev[0].mean)
                p = p.flip(s)
            bases[b] = p
            prev = (p, ref_tokens)
            for t in ts:
                out[(b, t)] = tokens_to_grid(p.to_unit(cells[t]), hw)
        elif basis == "per_cell":
            first = None
            for t in ts:
                p = SharedPCA.fit([cells[t]], 3, percentiles, max_fit_tokens)
                if first is not None:
                    _, s = align_signs(p.components, first.components)
                    p = p.flip(s)
                first = first or p
                bases[(b, t)] = p
                out[(b, t)] = tokens_to_grid(p.to_unit(cells[t]), hw)
        else:
            raise ValueError(f"unknown basis {basis!r}; use 'shared' or 'per_cell'")
    meta = {"basis": basis, "align": align, "percentiles": percentiles,
            "images": list(images) if images is not None else None}
    return PCAGrid(out, bases, blocks, ts, meta)
