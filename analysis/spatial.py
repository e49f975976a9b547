"""Spatial structure of patch tokens (iREPA, Singh et al. 2025): LDS, CDS, RMSC and SRSS.

Definitions (End2End-Diffusion/iREPA, ``metrics/spatial_metrics.py``, commit 99ad4ac; written here
from the definitions, not from that code). Input: tokens (B, H*W, D), the H x W patch grid of each
image in row-major order (token ``r * W + c`` sits at row r, column c). Every token is
L2-normalised first (``x / max(||x||, 1e-8)``), so ``cos(i, j) = u_i . u_j``; distances are
Manhattan distances on the grid, ``d(i, j) = |r_i - r_j| + |c_i - c_j|``. Each metric returns one
value per image, a (B,) float64 numpy array.

* ``lds`` (local-vs-distant similarity): mean cos over 4-neighbour pairs (d = 1) minus mean cos
  over pairs with d >= ``far_dist`` (default 6). Higher = more spatially organised.
* ``cds`` (correlation-decay slope): ``m_d`` = mean cos over pairs at distance d for
  d = 1..``dmax`` (default 8); CDS = minus the least-squares slope of ``m_d`` against d.
  Higher = similarity decays faster with distance.
* ``rmsc`` (RMS spatial contrast): ``sqrt(mean_i ||u_i - mean_j u_j||^2)`` over the tokens of an
  image (no grid needed). Higher = tokens more different from their image mean.
* ``srss`` (mask-aware LDS): for every foreground anchor i, mean cos to foreground tokens at
  ``d_pos_min <= d <= d_pos`` (default 1..1) minus mean cos to background tokens at
  d >= ``d_neg`` (default 6); averaged over the anchors that have both. NaN for an image with
  fewer than 2 foreground tokens, no background token, or no such anchor.

The defaults are the reference's (``far_dist=6``, ``dmax=8``, ``d_pos=1``, ``d_neg=6``), which
iREPA uses on 16 x 16 grids. The thresholds are in patches, so values on other grid sizes are not
comparable with iREPA's numbers. Where a grid cannot reach a threshold (largest distance
``H + W - 2`` below ``far_dist``, ``dmax`` or ``d_neg``) the reference silently returns a different
quantity (LDS without its far term, a CDS fitted over fewer distances); here that is a ValueError.

Deliberate differences from the reference code: computed in float64 (reference float32); the
SRSS normalisation uses eps 1e-8 like the other metrics (reference 1e-12; only matters for
all-zero tokens); images are processed ``batch_size`` at a time, so memory is batch_size x T x T.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from typing import Union

import numpy as np
import pandas as pd
import torch

from repdyn.core.runtime import resolve_device

ArrayLike = Union[np.ndarray, torch.Tensor]

__all__ = ["grid_shape", "manhattan_distances", "distance_profile", "lds", "cds", "rmsc", "srss", "spatial_cells",
           "SPATIAL_METRICS"]

SPATIAL_METRICS = ("lds", "cds", "rmsc")

_EPS = 1e-8


# --------------------------------------------------------------------------------------------
# input handling
# --------------------------------------------------------------------------------------------
def _device(device: str | torch.device | None) -> torch.device:
    return torch.device("cpu") if device is None else resolve_device(device)


def grid_shape(n_tokens: int, grid: tuple[int, int] | None = None) -> tuple[int, int]:
    """(H, W) of a row-major token grid: ``grid`` if given (must multiply to n_tokens), else the
    square root of n_tokens (a ValueError when it is not a square)."""
    if grid is not None:
        h, w = (int(g) for g in grid)
        if h < 1 or w < 1 or h * w != n_tokens:
            raise ValueError(f"grid {grid} does not hold {n_tokens} tokens")
        return h, w
    h = math.isqrt(n_tokens)
    if h * h != n_tokens:
        raise ValueError(f"{n_tokens} tokens are not a square grid; pass grid=(H, W)")
    return h, h


def _tokens(x: ArrayLike, device: str | torch.device | None,
            grid: tuple[int, int] | None = None, need_grid: bool = True) -> tuple[torch.Tensor, int, int]:
    """(B, T, D) float64 tensor on device and the grid (H, W) ((0, 0) when not ``need_grid``).
    (B, H, W, D) input is flattened row-major to (B, H*W, D) and gives the grid itself."""
    t = torch.as_tensor(x) if not isinstance(x, torch.Tensor) else x.detach()
    if t.ndim == 4:
        if grid is not None and tuple(grid) != tuple(t.shape[1:3]):
            raise ValueError(f"grid {grid} contradicts tokens of shape {tuple(t.shape)}")
        grid = (t.shape[1], t.shape[2])
        t = t.reshape(t.shape[0], t.shape[1] * t.shape[2], t.shape[3])
    if t.ndim != 3 or 0 in t.shape:
        raise ValueError(f"tokens: expected (B, H*W, D), got shape {tuple(t.shape)}")
    t = t.to(device=_device(device), dtype=torch.float64)
    if not torch.isfinite(t).all():
        raise ValueError("tokens: contain NaN or Inf")
    if not need_grid:
        return t, 0, 0
    h, w = grid_shape(t.shape[1], grid)
    return t, h, w


def _unit(u: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(u, dim=-1, eps=_EPS)


def manhattan_distances(h: int, w: int, device: str | torch.device | None = None) -> torch.Tensor:
    """(H*W, H*W) int64 Manhattan distances between the cells of a row-major H x W grid."""
    dev = _device(device)
    r = torch.arange(h, device=dev).repeat_interleave(w)
    c = torch.arange(w, device=dev).repeat(h)
    return (r[:, None] - r[None, :]).abs() + (c[:, None] - c[None, :]).abs()


def _need(h: int, w: int, threshold: int, what: str) -> None:
    if h + w - 2 < threshold:
        raise ValueError(f"{what}: a {h}x{w} grid has Manhattan distances up to {h + w - 2} < {threshold}; "
                         f"use a larger grid or a smaller threshold")


def _batches(b: int, batch_size: int):
    step = max(1, int(batch_size))
    for s in range(0, b, step):
        yield slice(s, min(b, s + step))


# --------------------------------------------------------------------------------------------
# mean cosine per distance
# --------------------------------------------------------------------------------------------
def _profile_sums(tokens: torch.Tensor, h: int, w: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of cos over ordered token pairs at each distance d = 0..H+W-2 (B, H+W-1), and the number
    of such pairs (H+W-1,)."""
    dist = manhattan_distances(h, w, tokens.device).reshape(-1)
    nd = h + w - 1
    counts = torch.bincount(dist, minlength=nd).to(torch.float64)
    out = []
    for sl in _batches(tokens.shape[0], batch_size):
        u = _unit(tokens[sl])
        g = (u @ u.transpose(1, 2)).reshape(u.shape[0], -1)            # (b, T*T)
        out.append(torch.zeros(u.shape[0], nd, dtype=torch.float64, device=u.device).index_add_(1, dist, g))
    return torch.cat(out), counts


def distance_profile(tokens: ArrayLike, grid: tuple[int, int] | None = None, batch_size: int = 64,
                     device: str | torch.device | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean cosine between tokens at each Manhattan distance d = 0..H+W-2.

    tokens: (B, H*W, D). Returns ``(profile (B, H+W-1), counts (H+W-1,))``: ``profile[b, d]`` is
    the mean cos over the ``counts[d]`` ordered token pairs at distance d (``profile[:, 0]`` = 1
    up to zero tokens). LDS and CDS are functions of this profile.
    """
    t, h, w = _tokens(tokens, device, grid)
    sums, counts = _profile_sums(t, h, w, batch_size)
    return (sums / counts).cpu().numpy(), counts.cpu().numpy().astype(np.int64)


# --------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------
def lds(tokens: ArrayLike, far_dist: int = 6, grid: tuple[int, int] | None = None, batch_size: int = 64,
        device: str | torch.device | None = None) -> np.ndarray:
    """Local-vs-distant similarity per image: mean cos of 4-neighbours (d = 1) minus mean cos of
    token pairs with d >= far_dist (iREPA ``lds``, default far_dist = 6).

    tokens: (B, H*W, D) row-major (or (B, H, W, D)); ``grid=(H, W)`` for non-square grids.
    Returns (B,) float64. ValueError when the grid's largest distance H+W-2 is below far_dist.
    """
    t, h, w = _tokens(tokens, device, grid)
    if far_dist < 1:
        raise ValueError(f"lds: far_dist must be >= 1, got {far_dist}")
    _need(h, w, max(far_dist, 1), "lds")
    sums, counts = _profile_sums(t, h, w, batch_size)
    local = sums[:, 1] / counts[1]
    far = sums[:, far_dist:].sum(1) / counts[far_dist:].sum()
    return (local - far).cpu().numpy()


def cds(tokens: ArrayLike, dmax: int = 8, grid: tuple[int, int] | None = None, batch_size: int = 64,
        device: str | torch.device | None = None) -> np.ndarray:
    """Correlation-decay slope per image: minus the least-squares slope of the mean cos at
    distance d against d = 1..dmax (iREPA ``cds``, default dmax = 8).

    tokens: (B, H*W, D) row-major; ``grid=(H, W)`` for non-square grids. Returns (B,) float64.
    ValueError when dmax < 2 or the grid's largest distance H+W-2 is below dmax.
    """
    t, h, w = _tokens(tokens, device, grid)
    if dmax < 2:
        raise ValueError(f"cds: dmax must be >= 2 to fit a slope, got {dmax}")
    _need(h, w, dmax, "cds")
    sums, counts = _profile_sums(t, h, w, batch_size)
    m = sums[:, 1:dmax + 1] / counts[1:dmax + 1]                         # (B, dmax)
    d = torch.arange(1, dmax + 1, dtype=torch.float64, device=m.device)
    d0 = d - d.mean()
    slope = (m - m.mean(1, keepdim=True)) @ d0 / (d0 @ d0)
    return (-slope).cpu().numpy()


def rmsc(tokens: ArrayLike, device: str | torch.device | None = None) -> np.ndarray:
    """RMS spatial contrast per image: ``sqrt(mean_i ||u_i - mean_j u_j||^2)`` of the L2-normalised
    tokens u (iREPA ``rmsc``). tokens: (B, T, D) (no grid needed). Returns (B,) float64 in [0, 1]."""
    u = _unit(_tokens(tokens, device, need_grid=False)[0])
    uc = u - u.mean(1, keepdim=True)
    return uc.square().sum(-1).mean(1).sqrt().cpu().numpy()


def srss(tokens: ArrayLike, masks: ArrayLike, d_pos: int = 1, d_neg: int = 6, d_pos_min: int = 1,
         grid: tuple[int, int] | None = None, batch_size: int = 64,
         device: str | torch.device | None = None) -> np.ndarray:
    """Mask-aware LDS per image (iREPA ``srss``): for each foreground anchor, mean cos to foreground
    tokens at d_pos_min <= d <= d_pos minus mean cos to background tokens at d >= d_neg; averaged
    over the anchors that have both kinds of partner.

    tokens: (B, H*W, D) row-major; masks: (B, H*W) (or (B, H, W)) booleans / {0, 1}, 1 =
    foreground. Returns (B,) float64, NaN for an image with < 2 foreground tokens, no background
    token or no valid anchor. ValueError when the grid's largest distance is below d_neg.
    """
    t, h, w = _tokens(tokens, device, grid)
    mk = torch.as_tensor(masks) if not isinstance(masks, torch.Tensor) else masks.detach()
    mk = mk.reshape(mk.shape[0], -1).to(device=t.device) if mk.ndim == 3 else mk.to(device=t.device)
    if mk.shape != t.shape[:2]:
        raise ValueError(f"srss: masks must be (B, H*W) = {tuple(t.shape[:2])}, got {tuple(mk.shape)}")
    if not 1 <= d_pos_min <= d_pos:
        raise ValueError(f"srss: need 1 <= d_pos_min <= d_pos, got d_pos_min={d_pos_min}, d_pos={d_pos}")
    _need(h, w, d_neg, "srss")
    dist = manhattan_distances(h, w, t.device)
    near = ((dist >= d_pos_min) & (dist <= d_pos)).to(torch.float64)
    far = (dist >= d_neg).to(torch.float64)
    out = []
    for sl in _batches(t.shape[0], batch_size):
        u = _unit(t[sl])
        g = u @ u.transpose(1, 2)                                       # (b, T, T)
        fg = mk[sl].to(torch.bool)
        f = fg.to(torch.float64)
        pos_w = f[:, :, None] * f[:, None, :] * near                     # FG anchor, FG partner, near
        neg_w = f[:, :, None] * (1.0 - f)[:, None, :] * far              # FG anchor, BG partner, far
        pos_n, neg_n = pos_w.sum(2), neg_w.sum(2)
        delta = (g * pos_w).sum(2) / pos_n.clamp_min(1) - (g * neg_w).sum(2) / neg_n.clamp_min(1)
        valid = fg & (pos_n > 0) & (neg_n > 0)
        n_valid = valid.sum(1)
        val = torch.where(valid, delta, torch.zeros_like(delta)).sum(1) / n_valid.clamp_min(1)
        ok = (fg.sum(1) >= 2) & ((~fg).sum(1) >= 1) & (n_valid > 0)
        out.append(torch.where(ok, val, torch.full_like(val, float("nan"))))
    return torch.cat(out).cpu().numpy()


def spatial_cells(cells: Mapping[Hashable, ArrayLike], far_dist: int = 6, dmax: int = 8,
                  device: str | torch.device | None = None) -> pd.DataFrame:
    """LDS, CDS and RMSC of every cell's tokens, summarised over images (the per-cell row of
    ``probe spatial`` and of ``probe curves``).

    cells: ``{key: tokens (B, H*W, D)}``, e.g. ``{(block, t): ...}``, B >= 2 images. Returns one
    row per (cell, metric): ``block, t`` (2-tuple keys, else ``key``), ``metric``, ``mean``, ``se``
    (standard error over images), ``n``, ``grid``, ``far_dist``, ``dmax``.
    """
    rows = []
    for key, x in cells.items():
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 3 or x.shape[0] < 2:
            raise ValueError(f"cell {key!r}: need tokens (B >= 2, T, D), got shape {x.shape}")
        grid = grid_shape(x.shape[1])
        per = {"lds": lds(x, far_dist=far_dist, grid=grid, device=device),
               "cds": cds(x, dmax=dmax, grid=grid, device=device), "rmsc": rmsc(x, device=device)}
        where = {"block": key[0], "t": key[1]} if isinstance(key, tuple) and len(key) == 2 else {"key": key}
        for m, v in per.items():
            v = np.asarray(v, dtype=np.float64)
            rows.append({**where, "metric": m, "mean": float(v.mean()), "se": float(v.std(ddof=1) / np.sqrt(len(v))),
                         "n": int(len(v)), "grid": f"{grid[0]}x{grid[1]}", "far_dist": int(far_dist),
                         "dmax": int(dmax)})
    return pd.DataFrame(rows)
