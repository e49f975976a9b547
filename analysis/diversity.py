"""DiverseDiT's three representation-diversity terms, as reference pure functions and a report.

Definitions follow ``shared/spec/methods.md`` section 2.2 (the official code's behaviour, not the
paper's prose). Each term takes block features of shape (N, T, D) -- N images, T tokens, D
channels -- and returns a 0-d tensor. They are plain torch ops, differentiable, dtype-preserving
and device-agnostic, so a training loss can call them directly on autocast features:

* ``orthogonality(a, b)``: mean-pool each block over batch *and* tokens to one D-vector,
  L2-normalise, dot product. Signed cosine in [-1, 1] (not an absolute value).
* ``token_cosine(a, b)`` (the "MI proxy"): flatten to (N*T, D), L2-normalise every token,
  per-token cosine, mean over tokens, **then** absolute value. In [0, 1].
* ``channel_dispersion([f_1, ..., f_k])``: per block, flatten to (N*T, D) and L2-normalise each
  channel column over the N*T tokens; channel usage = mean |column| (= ||col||_1 / (N*T ||col||_2),
  a flatness ratio). Average usage over blocks, divide by its max over channels, population
  variance over channels, / 0.25, clamp to [0, 1], negate. In [-1, 0]; more negative = channels
  used more unevenly.
* ``diversity_loss``: (mean orthogonality over pairs + mean token cosine over pairs + dispersion
  over all blocks) / 3, clamped to <= 5 and replaced by 0 when non-finite, as the official code.

The eps values (1e-8 in the normalisations and denominators) match the official code.

``diversity_report`` evaluates the terms for every block pair at every t of a feature grid
(``probe.grid`` layout ``{(block, t): (N, T, D)}``) and returns a tidy DataFrame.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence
from itertools import combinations
from typing import Any, Union

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

ArrayLike = Union[np.ndarray, torch.Tensor]
EPS = 1e-8

__all__ = [
    "orthogonality",
    "token_cosine",
    "channel_usage",
    "channel_dispersion",
    "diversity_loss",
    "official_pairs",
    "diversity_report",
    "dispersion_table",
    "pair_matrix",
]


def _as_ntd(x: ArrayLike, name: str = "features") -> torch.Tensor:
    """(N, T, D) tensor view; (N, D) pooled features become (N, 1, D). Keeps dtype and graph."""
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if t.ndim == 2:
        t = t[:, None, :]
    if t.ndim != 3:
        raise ValueError(f"{name}: expected (N, T, D) or (N, D), got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name}: empty tensor of shape {tuple(t.shape)}")
    return t


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"block features must have the same (N, T, D) shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def orthogonality(a: ArrayLike, b: ArrayLike, eps: float = EPS) -> torch.Tensor:
    """Signed cosine between the batch-and-token means of two blocks.

    a, b: (N, T, D) (or (N, D)). Returns a 0-d tensor in [-1, 1]; the loss pushes it down, i.e.
    towards orthogonal (or opposite) mean directions.
    """
    a, b = _as_ntd(a, "a"), _as_ntd(b, "b")
    _check_pair(a, b)
    ma = F.normalize(a.mean(dim=(0, 1)), p=2, dim=0, eps=eps)
    mb = F.normalize(b.mean(dim=(0, 1)), p=2, dim=0, eps=eps)
    return (ma * mb).sum()


def token_cosine(a: ArrayLike, b: ArrayLike, eps: float = EPS) -> torch.Tensor:
    """|mean over tokens of cos(a_token, b_token)| -- DiverseDiT's mutual-information proxy.

    a, b: (N, T, D). Each of the N*T tokens is compared with the same token in the other block;
    the absolute value is taken *after* averaging (as coded). Returns a 0-d tensor in [0, 1].
    """
    a, b = _as_ntd(a, "a"), _as_ntd(b, "b")
    _check_pair(a, b)
    d = a.shape[-1]
    na = F.normalize(a.reshape(-1, d), p=2, dim=1, eps=eps)
    nb = F.normalize(b.reshape(-1, d), p=2, dim=1, eps=eps)
    return (na * nb).sum(dim=1).mean().abs()


def channel_usage(x: ArrayLike, eps: float = EPS) -> torch.Tensor:
    """Per-channel usage of one block: mean |column| after L2-normalising each channel over tokens.

    x: (N, T, D). Returns (D,). Equals ||col||_1 / (N*T*||col||_2): 1/sqrt(N*T) for a channel
    spread evenly over tokens, smaller for a sparse / peaky channel.
    """
    x = _as_ntd(x)
    flat = x.reshape(-1, x.shape[-1])
    return F.normalize(flat, p=2, dim=0, eps=eps).abs().mean(dim=0)


def _dispersion_from_usage(usages: Sequence[torch.Tensor], eps: float = EPS) -> torch.Tensor:
    u = torch.stack(list(usages)).sum(0) / (len(usages) + eps)
    u = u / (u.max() + eps)
    var = ((u - u.mean()) ** 2).mean()             # population variance over channels
    return -torch.clamp(var / 0.25, 0.0, 1.0)


def channel_dispersion(feats: Sequence[ArrayLike] | Mapping[Any, ArrayLike], eps: float = EPS) -> torch.Tensor:
    """Negative normalised variance of channel usage, pooled over a set of blocks.

    feats: k >= 1 block tensors (N, T, D) (a mapping's values are used). Returns a 0-d tensor in
    [-1, 0]. The official loss needs k >= 2 blocks (it returns 0 otherwise); this reference
    function also accepts one block so reports can show a per-block value.
    """
    vals = list(feats.values()) if isinstance(feats, Mapping) else list(feats)
    if not vals:
        raise ValueError("channel_dispersion needs at least one block")
    ts = [_as_ntd(v, f"feats[{i}]") for i, v in enumerate(vals)]
    if len({t.shape[-1] for t in ts}) != 1:
        raise ValueError("channel_dispersion: all blocks need the same width D")
    return _dispersion_from_usage([channel_usage(t, eps) for t in ts], eps)


def official_pairs(n_blocks: int, encoder_depth: int = 8, max_pairs: int = 10) -> list[tuple[int, int]]:
    """The block-pair subset the official DiverseDiT code uses (0-based positions in the sorted
    block list, ``projection=True`` path).

    Outer index i runs over ``range(m - encoder_depth - 1, m + encoder_depth)`` with
    ``m = min(max_pairs, n(n-1)/2)``, inner j over ``range(i + 1, n)``, stopping after m pairs.
    encoder_depth 8 -> [(1, 2), ..., (1, 11)]; 4 (12 blocks) -> (5, 6..11), (6, 7..10).
    Negative i wraps around as Python indexing does in the original (returned modulo n);
    i >= n is skipped.
    """
    m = min(max_pairs, n_blocks * (n_blocks - 1) // 2)
    pairs: list[tuple[int, int]] = []
    for i in range(m - encoder_depth - 1, m + encoder_depth):
        if i >= n_blocks:
            break
        for j in range(i + 1, n_blocks):
            if len(pairs) >= m:
                break
            pairs.append((i % n_blocks, j % n_blocks))
        if len(pairs) >= m:
            break
    return pairs


def diversity_loss(
    feats: Sequence[ArrayLike] | Mapping[Any, ArrayLike],
    pairs: Iterable[tuple[int, int]] | None = None,
    eps: float = EPS,
) -> dict[str, torch.Tensor]:
    """DiverseDiT's L_div on a list of block features, with its three parts.

    feats: blocks in depth order, each (N, T, D) (a mapping is sorted by key). pairs: 0-based
    positions into that list for the two pairwise terms (default: ``official_pairs(len(feats))``).
    Returns {"orthogonality", "token_cosine", "dispersion", "total"} 0-d tensors; ``total`` is
    their mean, clamped to <= 5, and 0 if non-finite. Dispersion is 0 for fewer than 2 blocks.
    """
    if isinstance(feats, Mapping):
        feats = [feats[k] for k in sorted(feats)]
    ts = [_as_ntd(f, f"feats[{i}]") for i, f in enumerate(feats)]
    if len(ts) < 2:
        z = torch.zeros((), device=ts[0].device if ts else None)
        return {"orthogonality": z, "token_cosine": z, "dispersion": z, "total": z}
    pairs = official_pairs(len(ts)) if pairs is None else list(pairs)
    orth = torch.stack([orthogonality(ts[i], ts[j], eps) for i, j in pairs]).mean() if pairs else torch.zeros(())
    mi = torch.stack([token_cosine(ts[i], ts[j], eps) for i, j in pairs]).mean() if pairs else torch.zeros(())
    disp = channel_dispersion(ts, eps)
    total = torch.clamp((orth + mi + disp) / 3.0, max=5.0)
    if not torch.isfinite(total):
        total = torch.zeros_like(total)
    return {"orthogonality": orth, "token_cosine": mi, "dispersion": disp, "total": total}


# --------------------------------------------------------------------------------------------
# report over a (block, t) grid
# --------------------------------------------------------------------------------------------
def _grid(features: Mapping[tuple[Any, Any], ArrayLike], blocks, ts):
    blocks = sorted({k[0] for k in features}) if blocks is None else list(blocks)
    ts = sorted({k[1] for k in features}) if ts is None else list(ts)
    missing = [(b, t) for b in blocks for t in ts if (b, t) not in features]
    if missing:
        raise ValueError(f"features lack cells {missing[:4]}")
    return blocks, ts


@torch.no_grad()
def diversity_report(
    features: Mapping[tuple[Any, Any], ArrayLike],
    blocks: Sequence[Hashable] | None = None,
    ts: Sequence[Hashable] | None = None,
    pairs: Iterable[tuple[Hashable, Hashable]] | None = None,
    log_snr: Mapping[Hashable, float] | None = None,
    device: str | torch.device | None = None,
) -> pd.DataFrame:
    """The three terms for every block pair at every t, as a tidy table.

    features: ``{(block, t): (N, T, D)}`` (or (N, D) pooled; then T = 1 and the token cosine is
    a per-image cosine). pairs: block-label pairs (default: all a < b). Computed in float64.

    Returns one row per (t, block_a, block_b) with columns t, [log_snr], block_a, block_b,
    orthogonality, token_cosine, dispersion (over the two blocks), diversity (mean of the three),
    n_samples, n_tokens. Values equal the pure functions applied to that pair.
    """
    blocks, ts = _grid(features, blocks, ts)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    pairs = list(combinations(blocks, 2)) if pairs is None else [tuple(p) for p in pairs]
    for a, b in pairs:
        if a not in blocks or b not in blocks:
            raise ValueError(f"pair ({a}, {b}) refers to a block not in the grid {blocks}")
    rows = []
    for t in ts:
        x = {b: _as_ntd(torch.as_tensor(np.asarray(features[(b, t)])) if not isinstance(features[(b, t)], torch.Tensor)
                       else features[(b, t)].detach(), f"features[{b}, {t}]").to(dev, torch.float64) for b in blocks}
        shapes = {tuple(v.shape) for v in x.values()}
        if len(shapes) != 1:
            raise ValueError(f"t={t}: blocks have different shapes {sorted(shapes)}")
        n, tok, d = next(iter(shapes))
        # cached per-block quantities, then every pair is cheap
        means = {b: F.normalize(v.mean(dim=(0, 1)), p=2, dim=0, eps=EPS) for b, v in x.items()}
        normed = torch.stack([F.normalize(x[b].reshape(-1, d), p=2, dim=1, eps=EPS).reshape(-1) for b in blocks])
        tok_cos = (normed @ normed.T) / (n * tok)          # (L, L) mean per-token cosine
        pos = {b: i for i, b in enumerate(blocks)}
        usage = {b: channel_usage(v) for b, v in x.items()}
        for a, b in pairs:
            orth = float((means[a] * means[b]).sum())
            mi = float(tok_cos[pos[a], pos[b]].abs())
            disp = float(_dispersion_from_usage([usage[a], usage[b]]))
            row = {"t": t, "block_a": a, "block_b": b, "orthogonality": orth, "token_cosine": mi,
                   "dispersion": disp, "diversity": (orth + mi + disp) / 3.0, "n_samples": n, "n_tokens": tok}
            if log_snr is not None:
                row["log_snr"] = float(log_snr[t])
            rows.append(row)
    cols = ["t"] + (["log_snr"] if log_snr is not None else []) + [
        "block_a", "block_b", "orthogonality", "token_cosine", "dispersion", "diversity", "n_samples", "n_tokens"]
    return pd.DataFrame(rows, columns=cols)


@torch.no_grad()
def dispersion_table(
    features: Mapping[tuple[Any, Any], ArrayLike],
    blocks: Sequence[Hashable] | None = None,
    ts: Sequence[Hashable] | None = None,
) -> pd.DataFrame:
    """Per-(block, t) channel dispersion (single block) plus an "all" row per t pooling every
    block, as the loss does. Columns: t, block, dispersion."""
    blocks, ts = _grid(features, blocks, ts)
    rows = []
    for t in ts:
        usages = []
        for b in blocks:
            v = features[(b, t)]
            v = v.detach() if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v))
            u = channel_usage(v.to(torch.float64))
            usages.append(u)
            rows.append({"t": t, "block": b, "dispersion": float(_dispersion_from_usage([u]))})
        rows.append({"t": t, "block": "all", "dispersion": float(_dispersion_from_usage(usages))})
    return pd.DataFrame(rows, columns=["t", "block", "dispersion"])


def pair_matrix(report: pd.DataFrame, term: str, t: Hashable) -> tuple[np.ndarray, list[Any]]:
    """(L, L) symmetric matrix of ``term`` at timestep ``t`` from a ``diversity_report`` table
    (diagonal NaN, missing pairs NaN), plus the block labels. Feeds ``plots.heatmap``."""
    if term not in report.columns:
        raise ValueError(f"unknown term {term!r}; columns are {list(report.columns)}")
    sub = report[report["t"] == t]
    if sub.empty:
        raise ValueError(f"t={t!r} not in the report")
    blocks = sorted(set(sub["block_a"]) | set(sub["block_b"]))
    pos = {b: i for i, b in enumerate(blocks)}
    m = np.full((len(blocks), len(blocks)), np.nan)
    for a, b, v in zip(sub["block_a"], sub["block_b"], sub[term]):
        m[pos[a], pos[b]] = m[pos[b], pos[a]] = v
    return m, blocks
