"""DiverseDiT's three representation-diversity terms, as reference pure functions and a report.

Definitions follow docs/methods.md, "DiverseDiT: official behaviour and our choices" (the
official code's behaviour, not the
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

The maths lives in one place, ``repdyn.training.methods.diverse`` (the training loss); the functions here
accept numpy or torch, (N, T, D) or pooled (N, D), and add the grid report. The loss with its pair
set is ``repdyn.training.methods.diverse.diversity_loss`` / ``official_pairs``.

The eps values (1e-8 in the normalisations and denominators) match the official code.

``diversity_report`` evaluates the terms for every block pair at every t of a feature grid
(``repdyn.probe.grid`` layout ``{(block, t): (N, T, D)}``) and returns a tidy DataFrame.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence
from itertools import combinations
from typing import Any, Union

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from repdyn.training.methods import diverse as _terms

from .cells import grid_cells

ArrayLike = Union[np.ndarray, torch.Tensor]
EPS = 1e-8

__all__ = [
    "orthogonality",
    "token_cosine",
    "channel_usage",
    "channel_dispersion",
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
    """Signed cosine between the batch-and-token means of two blocks (the training term, on any
    array). a, b: (N, T, D) or (N, D). Returns a 0-d tensor in [-1, 1]."""
    a, b = _as_ntd(a, "a"), _as_ntd(b, "b")
    _check_pair(a, b)
    return _terms.orthogonality(a, b, eps)


def token_cosine(a: ArrayLike, b: ArrayLike, eps: float = EPS) -> torch.Tensor:
    """|mean over tokens of cos(a_token, b_token)| -- DiverseDiT's mutual-information proxy
    (``repdyn.training.methods.diverse.mi_proxy`` on any array). Returns a 0-d tensor in [0, 1]."""
    a, b = _as_ntd(a, "a"), _as_ntd(b, "b")
    _check_pair(a, b)
    return _terms.mi_proxy(a, b, eps)


def channel_usage(x: ArrayLike, eps: float = EPS) -> torch.Tensor:
    """(D,) per-channel usage of one block (see ``repdyn.training.methods.diverse.channel_usage``)."""
    return _terms.channel_usage(_as_ntd(x), eps)


def channel_dispersion(feats: Sequence[ArrayLike] | Mapping[Any, ArrayLike], eps: float = EPS) -> torch.Tensor:
    """Negative normalised variance of channel usage, pooled over a set of blocks.

    feats: k >= 1 block tensors (N, T, D) (a mapping's values are used). Returns a 0-d tensor in
    [-1, 0]; one block gives a per-block value for reports.
    """
    vals = list(feats.values()) if isinstance(feats, Mapping) else list(feats)
    if not vals:
        raise ValueError("channel_dispersion needs at least one block")
    ts = [_as_ntd(v, f"feats[{i}]") for i, v in enumerate(vals)]
    if len({t.shape[-1] for t in ts}) != 1:
        raise ValueError("channel_dispersion: all blocks need the same width D")
    return _terms.dispersion(ts, eps)


# --------------------------------------------------------------------------------------------
# report over a (block, t) grid
# --------------------------------------------------------------------------------------------


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
    blocks, ts = grid_cells(features, blocks, ts)
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
            disp = float(_terms.dispersion_from_usage([usage[a], usage[b]]))
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
    blocks, ts = grid_cells(features, blocks, ts)
    rows = []
    for t in ts:
        usages = []
        for b in blocks:
            v = features[(b, t)]
            v = v.detach() if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v))
            u = channel_usage(v.to(torch.float64))
            usages.append(u)
            rows.append({"t": t, "block": b, "dispersion": float(_terms.dispersion_from_usage([u]))})
        rows.append({"t": t, "block": "all", "dispersion": float(_terms.dispersion_from_usage(usages))})
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
