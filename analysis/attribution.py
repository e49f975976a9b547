"""Attribution of a linear probe's class logit back to the input patches (captum).

The chain is ``x -> feature_fn(x) -> probe -> logits``: ``feature_fn`` is any differentiable
callable returning pooled features (N, D) -- typically "noise x to level t with a fixed eps, run
the frozen backbone to block k, mean-pool tokens" (see ``backbone_feature_fn``). Integrated
gradients (default) attribute the chosen class logit to every input pixel; summing over channels
and the pixels of each p x p patch gives one score per patch token, which ``plots.plot_attribution``
overlays on the images.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import numpy as np
import torch
from torch import nn

ArrayLike = Union[np.ndarray, torch.Tensor]

__all__ = ["LinearProbe", "Attribution", "probe_attribution", "pool_patches", "backbone_feature_fn"]


class LinearProbe(nn.Module):
    """Standardise-then-linear probe head: logits = ((f - mean) / std) @ W^T + b.

    weight (K, D), bias (K,), optional mean / std (D,). ``from_sklearn`` takes a fitted
    LogisticRegression (``coef_``, ``intercept_``) and an optional StandardScaler.
    """

    def __init__(self, weight: ArrayLike, bias: ArrayLike | None = None,
                 mean: ArrayLike | None = None, std: ArrayLike | None = None):
        super().__init__()
        w = torch.as_tensor(np.asarray(weight) if not isinstance(weight, torch.Tensor) else weight, dtype=torch.float32)
        if w.ndim == 1:
            w = w[None]
        self.register_buffer("weight", w)
        self.register_buffer("bias", torch.zeros(w.shape[0]) if bias is None else torch.as_tensor(bias, dtype=torch.float32).reshape(-1))
        self.register_buffer("mean", torch.zeros(w.shape[1]) if mean is None else torch.as_tensor(mean, dtype=torch.float32))
        s = torch.ones(w.shape[1]) if std is None else torch.as_tensor(std, dtype=torch.float32)
        self.register_buffer("std", torch.where(s > 0, s, torch.ones_like(s)))

    @classmethod
    def from_sklearn(cls, clf: Any, scaler: Any | None = None) -> "LinearProbe":
        mean = getattr(scaler, "mean_", None) if scaler is not None else None
        std = getattr(scaler, "scale_", None) if scaler is not None else None
        return cls(clf.coef_, clf.intercept_, mean, std)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        f = (f.to(self.weight.dtype) - self.mean) / self.std
        return f @ self.weight.T + self.bias


@dataclass
class Attribution:
    """pixel: (N, C, H, W) attributions; patch: (N, H/p, W/p) per-patch sums over channels and
    pixels; target: (N,) class attributed; logits: (N, K) probe output on x; delta: IG
    convergence deltas (N,) or None; meta: method, n_steps, patch_size, baseline."""

    pixel: np.ndarray
    patch: np.ndarray
    target: np.ndarray
    logits: np.ndarray
    delta: np.ndarray | None
    meta: dict[str, Any] = field(default_factory=dict)


def pool_patches(attr: ArrayLike, patch_size: int, reduce: Literal["sum", "abs_sum"] = "sum") -> np.ndarray:
    """(N, C, H, W) pixel attributions -> (N, H/p, W/p) per-patch totals (channels summed)."""
    a = attr.detach().cpu().numpy() if isinstance(attr, torch.Tensor) else np.asarray(attr)
    n, c, h, w = a.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"image {h}x{w} is not divisible by patch_size {patch_size}")
    a = np.abs(a) if reduce == "abs_sum" else a
    return a.reshape(n, c, h // patch_size, patch_size, w // patch_size, patch_size).sum(axis=(1, 3, 5))


def probe_attribution(
    x: torch.Tensor,
    feature_fn: Callable[[torch.Tensor], torch.Tensor],
    probe: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    target: int | ArrayLike | None = None,
    method: Literal["integrated_gradients", "saliency", "input_x_gradient"] = "integrated_gradients",
    baseline: torch.Tensor | float | None = None,
    n_steps: int = 32,
    patch_size: int = 2,
    internal_batch_size: int | None = None,
) -> Attribution:
    """Attribute the probe's class logit to the input pixels and patches.

    x: (N, C, H, W) inputs in model space. feature_fn: x -> (N, D) pooled block features (must be
    differentiable w.r.t. x; the backbone itself stays frozen -- only input gradients are taken).
    probe: (N, D) -> (N, K) logits. target: class per image (default: the probe's argmax).
    baseline: IG baseline (default zeros = the mid-grey image in [-1, 1] pixel space).
    Returns an ``Attribution``.
    """
    from captum.attr import InputXGradient, IntegratedGradients, Saliency

    if x.ndim != 4:
        raise ValueError(f"x must be (N, C, H, W), got {tuple(x.shape)}")

    def forward(inp: torch.Tensor) -> torch.Tensor:
        return probe(feature_fn(inp))

    x = x.detach().float()
    with torch.no_grad():
        logits = forward(x)
    if logits.ndim != 2 or logits.shape[0] != x.shape[0]:
        raise ValueError(f"probe(feature_fn(x)) must return (N, K) logits, got {tuple(logits.shape)}")
    if target is None:
        tgt = logits.argmax(1)
    elif isinstance(target, int):
        tgt = torch.full((x.shape[0],), target, dtype=torch.long)
    else:
        tgt = torch.as_tensor(np.asarray(target) if not isinstance(target, torch.Tensor) else target).long().reshape(-1)
        if len(tgt) != x.shape[0]:
            raise ValueError(f"target has {len(tgt)} entries for {x.shape[0]} inputs")
    inp = x.clone().requires_grad_(True)
    delta = None
    with torch.enable_grad():
        if method == "integrated_gradients":
            base = torch.zeros_like(x) if baseline is None else (
                torch.full_like(x, float(baseline)) if isinstance(baseline, (int, float)) else baseline.to(x))
            ig = IntegratedGradients(forward)
            attr, d = ig.attribute(inp, baselines=base, target=tgt, n_steps=n_steps,
                                   internal_batch_size=internal_batch_size, return_convergence_delta=True)
            delta = d.detach().cpu().numpy()
        elif method == "saliency":
            attr = Saliency(forward).attribute(inp, target=tgt, abs=False)
        elif method == "input_x_gradient":
            attr = InputXGradient(forward).attribute(inp, target=tgt)
        else:
            raise ValueError(f"unknown method {method!r}")
    pixel = attr.detach().cpu().numpy()
    meta = {"method": method, "n_steps": n_steps if method == "integrated_gradients" else None,
            "patch_size": patch_size, "baseline": "zeros" if baseline is None else "custom"}
    return Attribution(pixel, pool_patches(pixel, patch_size), tgt.cpu().numpy(), logits.detach().cpu().numpy(),
                       delta, meta)


def backbone_feature_fn(
    model: nn.Module,
    block: int,
    t: float | int,
    noise: torch.Tensor,
    noise_fn: Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor],
    y: torch.Tensor | None = None,
    pooling: Literal["mean"] = "mean",
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Build ``feature_fn`` for a frozen ``repdyn.model.backbone`` backbone (``model.block_features``).

    noise: fixed eps (N, C, H, W) so the attribution is for one noise draw; ``noise_fn(x, eps, t)``
    maps clean inputs to the model input at level t (e.g. SiT ``(1 - t) x + t eps``; DiT
    ``sqrt(abar) x + sqrt(1 - abar) eps``) -- passed in because the conventions differ per family.
    y: labels (default: the null class, the probing protocol). Parameters are frozen.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()

    def fn(x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        eps = noise if noise.shape[0] == n else noise.repeat((n + noise.shape[0] - 1) // noise.shape[0], 1, 1, 1)[:n]
        xt = noise_fn(x, eps.to(x), t)
        tt = torch.full((n,), t, dtype=torch.float32 if isinstance(t, float) else torch.long, device=x.device)
        yy = y if y is not None else torch.full((n,), model.y_embedder.num_classes, dtype=torch.long, device=x.device)
        if len(yy) != n:
            yy = yy.repeat((n + len(yy) - 1) // len(yy))[:n]
        feats = model.block_features(xt, tt, yy, [block])[block]          # (N, T, D)
        return feats.mean(1)

    return fn
