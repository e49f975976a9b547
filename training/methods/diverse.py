"""DiverseDiT's representation-diversity loss as a :class:`~repdyn.training.methods.LossTerm`.

The long residual connections (LRC) are a backbone part (``ModelConfig.long_skip``, built by
``model_flags_for_method``); this module holds only the loss. Its three terms are pure,
differentiable functions of (N, T, D) block outputs so that the analysis code can report the same
quantities on any checkpoint:

* :func:`orthogonality` — signed cosine between the batch-and-token means of two blocks;
* :func:`mi_proxy` — |mean per-token cosine| between two blocks (the paper's "mutual information"
  stand-in);
* :func:`dispersion` — minus the normalised variance, across channels, of each channel's L1/L2
  "usage" pooled over blocks (the loss *rewards* uneven channel use);
* :func:`diversity_loss` — the mean of the three, over a block-pair set.

Behaviour follows the official code (``kobeshegu/DiverseDiT`` ``loss.py``, see docs/methods.md,
"DiverseDiT: official behaviour and our choices"), with two deliberate, documented differences and one option:

1. The pair set is an explicit list (``diverse.pairs``, 1-based blocks) instead of being computed
   inside the loss; its default (:func:`official_pairs`) reproduces the official selection, except
   that a negative start index (small depth or ``encoder_depth > 9``) is clamped to 0 instead of
   wrapping around (wrapping pairs a block with itself or repeats pairs).
2. The adaptive weight is built from the live loss, as the official code does (the gradient passes
   through it); ``diverse.detach_weight: true`` uses it as a detached coefficient instead.
3. Non-finite values are not silently replaced by 0: the trainer stops on a non-finite loss.
   The terms are computed in fp32 (or wider) whatever the autocast dtype.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from repdyn.training.config import TrainConfig
from repdyn.model.backbone import ModelConfig
from repdyn.model.objectives import Objective
from repdyn.training.methods.base import LossTerm, StepContext, check_option_names

__all__ = [
    "orthogonality",
    "mi_proxy",
    "dispersion",
    "channel_usage",
    "dispersion_from_usage",
    "diversity_loss",
    "official_pairs",
    "adaptive_weight",
    "DiversityTerms",
    "DiversityTerm",
    "DiverseOptions",
]

_EPS = 1e-8  # the official normalisation epsilon


def _fp32_or_wider(x: torch.Tensor) -> torch.Tensor:
    """Half-precision autocast features are upcast; fp64 inputs (analysis, gradcheck) stay fp64."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _check_ntd(x: torch.Tensor, name: str) -> None:
    if x.ndim != 3:
        raise ValueError(f"{name} must be a (N, T, D) block output, got shape {tuple(x.shape)}")


def orthogonality(a: torch.Tensor, b: torch.Tensor, eps: float = _EPS) -> torch.Tensor:
    """Signed cosine between the mean vectors of two blocks (range -1..1; lower = more diverse).

    Each (N, T, D) feature is averaged over batch *and* tokens into one D-vector, L2-normalised,
    and the two are dotted. It is signed, not absolute, as in the official code: minimising it
    pushes the blocks' mean directions apart, past orthogonal if it can.
    """
    _check_ntd(a, "a")
    _check_ntd(b, "b")
    pa = F.normalize(_fp32_or_wider(a).mean(dim=(0, 1)), p=2, dim=0, eps=eps)
    pb = F.normalize(_fp32_or_wider(b).mean(dim=(0, 1)), p=2, dim=0, eps=eps)
    return (pa * pb).sum()


def mi_proxy(a: torch.Tensor, b: torch.Tensor, eps: float = _EPS) -> torch.Tensor:
    """|mean over tokens of the per-token cosine| between two blocks (range 0..1).

    Token n of block a is compared with the same token of block b (cosine over channels); the
    mean over all N*T tokens is taken, *then* the absolute value (so opposite-signed tokens can
    cancel, as in the official code). The paper calls it a mutual-information proxy.
    """
    _check_ntd(a, "a")
    _check_ntd(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"mi_proxy needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    d = a.shape[-1]
    fa = F.normalize(_fp32_or_wider(a).reshape(-1, d), p=2, dim=1, eps=eps)
    fb = F.normalize(_fp32_or_wider(b).reshape(-1, d), p=2, dim=1, eps=eps)
    return (fa * fb).sum(dim=1).mean().abs()


def channel_usage(x: torch.Tensor, eps: float = _EPS) -> torch.Tensor:
    """(D,) usage of each channel of one (N, T, D) block: ``|col|_1 / (N*T |col|_2)``.

    Every channel column of the (N*T, D) token matrix is L2-normalised over the tokens and its
    mean absolute value taken: a flatness ratio (1/sqrt(N*T) for a constant column, 1/(N*T) for a
    one-hot one), not an activation mean. Keeps the input dtype (callers choose the precision).
    """
    _check_ntd(x, "x")
    return F.normalize(x.reshape(-1, x.shape[-1]), p=2, dim=0, eps=eps).abs().mean(dim=0)


def dispersion_from_usage(usages: Sequence[torch.Tensor], eps: float = _EPS) -> torch.Tensor:
    """Minus the normalised variance across channels of the block-averaged usage (range -1..0).

    The usage is averaged over blocks, divided by its maximum over channels (so it lies in
    [0, 1]); its population variance is divided by 0.25 (the largest variance of a [0, 1]
    variable), clamped to [0, 1] and negated.
    """
    usages = list(usages)
    if not usages:
        raise ValueError("dispersion needs at least one block output")
    usage = torch.stack(usages).sum(0) / (len(usages) + eps)
    usage = usage / (usage.max() + eps)
    variance = ((usage - usage.mean()) ** 2).mean()
    return -(variance / 0.25).clamp(0.0, 1.0)


def dispersion(blocks: Sequence[torch.Tensor] | torch.Tensor, eps: float = _EPS) -> torch.Tensor:
    """The dispersion term over a set of (N, T, D) blocks, in fp32 (range -1..0; lower = more uneven).

    The loss *rewards* uneven channel use. A single (N, T, D) tensor counts as one block.
    """
    if torch.is_tensor(blocks):
        blocks = [blocks]
    blocks = list(blocks)
    for i, x in enumerate(blocks):
        _check_ntd(x, f"blocks[{i}]")
    return dispersion_from_usage([channel_usage(_fp32_or_wider(x), eps) for x in blocks], eps)


@dataclass
class DiversityTerms:
    """The diversity loss and its three parts (all differentiable scalars)."""

    loss: torch.Tensor
    orthogonality: torch.Tensor
    mi_proxy: torch.Tensor
    dispersion: torch.Tensor


def diversity_loss(
    feats: Mapping[int, torch.Tensor] | Sequence[torch.Tensor],
    pairs: Sequence[tuple[int, int]],
    dispersion_blocks: Sequence[int] | None = None,
) -> DiversityTerms:
    """``(orthogonality + mi_proxy + dispersion) / 3`` over ``pairs``.

    ``feats`` maps a block key to its (N, T, D) output; a plain list is keyed 0..n-1. ``pairs``
    are (a, b) keys of ``feats``; orthogonality and the MI proxy are averaged over them. The
    dispersion uses ``dispersion_blocks`` (default: every block in ``feats``, as the official code).
    """
    if not isinstance(feats, Mapping):
        feats = dict(enumerate(feats))
    if not pairs:
        raise ValueError("diversity_loss needs at least one block pair")
    missing = sorted({k for p in pairs for k in p} - set(feats))
    if missing:
        raise ValueError(f"diversity_loss: no features for block(s) {missing}; have {sorted(feats)}")
    orth = torch.stack([orthogonality(feats[a], feats[b]) for a, b in pairs]).mean()
    mi = torch.stack([mi_proxy(feats[a], feats[b]) for a, b in pairs]).mean()
    keys = sorted(feats) if dispersion_blocks is None else list(dispersion_blocks)
    disp = dispersion([feats[k] for k in keys])
    return DiversityTerms(loss=(orth + mi + disp) / 3.0, orthogonality=orth, mi_proxy=mi, dispersion=disp)


def official_pairs(depth: int, encoder_depth: int = 8, max_pairs: int = 10) -> list[tuple[int, int]]:
    """The official code's block pairs, as **1-based** block numbers.

    Official rule (0-based blocks, n = depth): ``m = min(max_pairs, n(n-1)/2)``; outer
    ``i in range(m - encoder_depth - 1, m + encoder_depth)``, inner ``j in range(i + 1, n)``,
    stop after m pairs. For encoder_depth 8 and depth >= 12 that is 0-based (1, 2..11), i.e.
    1-based (2, 3..12). A negative start is clamped to 0 here (the official list indexing would
    wrap it to the last blocks and produce self-pairs and repeats).
    """
    if depth < 2:
        raise ValueError(f"the diversity loss needs at least 2 blocks, got depth {depth}")
    m = min(max_pairs, depth * (depth - 1) // 2)
    out: list[tuple[int, int]] = []
    for i in range(max(0, m - encoder_depth - 1), m + encoder_depth):
        for j in range(i + 1, depth):
            if len(out) >= m:
                return out
            out.append((i + 1, j + 1))
    return out


def adaptive_weight(value: torch.Tensor | float, low: float = 0.1, high: float = 0.5,
                    detach: bool = False) -> torch.Tensor:
    """The piecewise weight: 1 above ``high``, ``(v - low) / 0.5`` between ``low`` and ``high`` (the 0.5
    is the paper's constant, not ``high - low``), 0 at or below ``low``.

    ``detach=False`` (the official code) builds it from the live loss, so the gradient of
    ``w * L`` in the band is ``(2 L - low) / 0.5`` (1.0 at L = 0.3, 1.6 at L = 0.45);
    ``detach=True`` (the paper's formula read as a coefficient) gives ``w`` alone (0.4, 0.7).
    """
    v = torch.as_tensor(value)
    v = (v.detach() if detach else v).float()
    mid = (v - low) / 0.5
    return torch.where(v > high, torch.ones_like(v), torch.where(v > low, mid, torch.zeros_like(v)))


def _parse_pairs(raw: Any, depth: int) -> list[tuple[int, int]]:
    pairs = []
    for p in raw:
        if not isinstance(p, (list, tuple)) or len(p) != 2 or not all(
                isinstance(k, int) and not isinstance(k, bool) for k in p):
            raise ValueError(f"diverse.pairs must be a list of [a, b] 1-based block pairs, got item {p!r}")
        a, b = p
        if not (1 <= a <= depth and 1 <= b <= depth):
            raise ValueError(f"diverse.pairs item {list(p)} is out of range: blocks are 1..{depth} (1-based)")
        if a == b:
            raise ValueError(f"diverse.pairs item {list(p)} pairs a block with itself; use two different blocks")
        pairs.append((a, b))
    if not pairs:
        raise ValueError("diverse.pairs is empty; give at least one [a, b] pair or leave it unset")
    return pairs


@dataclass(frozen=True)
class DiverseOptions:
    """DiverseDiT's options (``config.diverse``), validated against the model in one place.

    ``pairs`` default to :func:`official_pairs` of (depth, ``encoder_depth``); ``weight_mode``
    ``adaptive`` (official) or ``constant`` (``weight``); ``detach_weight`` False = the official
    gradient through the adaptive weight, True = the weight as a detached coefficient.
    """

    pairs: tuple[tuple[int, int], ...]
    encoder_depth: int = 8
    weight_mode: str = "adaptive"
    weight: float = 0.001
    low: float = 0.1
    high: float = 0.5
    detach_weight: bool = False

    @classmethod
    def from_dict(cls, opts: dict | None, model_config: ModelConfig) -> "DiverseOptions":
        opts = dict(opts or {})
        check_option_names(opts, cls, "diverse")
        depth = model_config.depth
        if model_config.long_skip and depth % 2:
            raise ValueError(f"DiverseDiT long skips pair block i with depth-1-i and need an even depth, got "
                             f"{depth}; set model_overrides.depth to an even number")
        enc = opts.get("encoder_depth", 8)
        if isinstance(enc, bool) or not isinstance(enc, int) or enc < 0:
            raise ValueError(f"diverse.encoder_depth must be an integer >= 0, got {enc!r}")
        if opts.get("pairs") is not None:
            pairs = _parse_pairs(opts["pairs"], depth)
        else:
            if depth < 2:
                raise ValueError(f"the diversity loss needs at least 2 blocks, got depth {depth}")
            pairs = official_pairs(depth, enc)
        mode = opts.get("weight_mode", "adaptive")
        if mode not in ("adaptive", "constant"):
            raise ValueError(f"diverse.weight_mode must be 'adaptive' or 'constant', got {mode!r}")
        weight = opts.get("weight", 0.001)
        low, high = opts.get("low", 0.1), opts.get("high", 0.5)
        for key, val in (("weight", weight), ("low", low), ("high", high)):
            if isinstance(val, bool) or not isinstance(val, (int, float)) or not math.isfinite(val) or val < 0:
                raise ValueError(f"diverse.{key} must be a finite number >= 0, got {val!r}")
        if not low < high:
            raise ValueError(f"diverse.low ({low}) must be below diverse.high ({high})")
        detach = opts.get("detach_weight", False)
        if not isinstance(detach, bool):
            raise ValueError(f"diverse.detach_weight must be true or false, got {detach!r}")
        return cls(tuple(pairs), enc, mode, float(weight), float(low), float(high), detach)


class DiversityTerm(LossTerm):
    """``w * L_div`` on the student's block outputs (after long-skip fusion), training steps only.

    The features come from the student's ``forward_features`` (the trainer asks for
    :meth:`student_blocks`), so sampling and probing never collect them.
    """

    name = "diverse"

    def __init__(self, depth: int, pairs: Sequence[tuple[int, int]], weight_mode: str = "adaptive",
                 weight: float = 0.001, low: float = 0.1, high: float = 0.5, detach_weight: bool = False):
        self.depth = depth
        self.detach_weight = bool(detach_weight)
        self.pairs = [(int(a), int(b)) for a, b in pairs]
        self.weight_mode = weight_mode
        self.weight = float(weight)
        self.low, self.high = float(low), float(high)

    @classmethod
    def from_config(cls, config: TrainConfig, model_config: ModelConfig, objective: Objective) -> "DiversityTerm":
        """Validate ``config.diverse`` against the model (before any training) and build the term."""
        o = DiverseOptions.from_dict(config.diverse, model_config)
        return cls(model_config.depth, o.pairs, o.weight_mode, o.weight, o.low, o.high, o.detach_weight)

    def student_blocks(self) -> set[int]:
        # Every block: the dispersion term runs over all of them, as the official code.
        return set(range(1, self.depth + 1))

    def __call__(self, ctx: StepContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        feats = {k: ctx.feats.blocks[k] for k in range(1, self.depth + 1)}
        terms = diversity_loss(feats, self.pairs)
        if self.weight_mode == "adaptive":
            w = adaptive_weight(terms.loss, self.low, self.high, detach=self.detach_weight)
        else:
            w = torch.tensor(self.weight, device=terms.loss.device)
        logs = {"loss_div": terms.loss, "div_orth": terms.orthogonality, "div_mi": terms.mi_proxy,
                "div_disp": terms.dispersion, "div_weight": w}
        return w * terms.loss, {k: v.detach() for k, v in logs.items()}
