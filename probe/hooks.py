"""Capture block outputs with forward hooks, pool them inside the hook, stop early.

Why hooks (and not ``model(..., features=...)``): hooks work unchanged on every checkpoint we
load, including published DiT/SiT/REPA/SRA ones, and pooling inside the hook means the full
(N, T, D) token tensor of a block never outlives the forward, so a whole block grid costs about
one forward of memory. The forward is aborted by raising a private exception from the deepest
requested block (baukit's ``stop=True``): nothing after that block is computed. Handles are
removed in ``finally``, so an exception anywhere (including ours) never leaves a hook behind.

Pooling names (``pooling=`` everywhere in ``probe/``):

* ``"mean"``: mean over tokens -> (N, D) (the REPA / DDAE protocol, default);
* ``"tokens"``: every token kept -> (N, T, D); probes treat tokens as samples;
* ``"spatialK"`` (e.g. ``"spatial2"``): average-pool the token grid to K x K cells and concatenate
  them -> (N, K*K*D), diffssl's ``AdaptiveAvgPool2d(2)`` recipe.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

import torch
from torch import nn
import torch.nn.functional as F

__all__ = ["BlockCapture", "capture_blocks", "pool_tokens", "parse_pooling", "pooled_dim"]

_SPATIAL_RE = re.compile(r"^spatial(\d+)$")


class _StopForward(Exception):
    """Raised by the deepest hook to end the forward; caught by :class:`BlockCapture`."""


def parse_pooling(pooling: str) -> tuple[str, int]:
    """``"mean"`` -> ("mean", 0), ``"tokens"`` -> ("tokens", 0), ``"spatial2"`` -> ("spatial", 2)."""
    if pooling in ("mean", "tokens"):
        return pooling, 0
    m = _SPATIAL_RE.match(pooling)
    if m and int(m.group(1)) >= 1:
        return "spatial", int(m.group(1))
    raise ValueError(f"unknown pooling {pooling!r}; use mean, tokens or spatialK (e.g. spatial2)")


def pool_tokens(h: torch.Tensor, pooling: str = "mean") -> torch.Tensor:
    """Pool a block output (N, T, D) with a square token grid; see the module docstring."""
    kind, k = parse_pooling(pooling)
    if h.ndim != 3:
        raise ValueError(f"block output must be (N, tokens, D), got shape {tuple(h.shape)}")
    if kind == "mean":
        return h.mean(dim=1)
    if kind == "tokens":
        return h
    n, t, d = h.shape
    side = int(round(t**0.5))
    if side * side != t:
        raise ValueError(f"spatial pooling needs a square token grid, got {t} tokens")
    if k > side:
        raise ValueError(f"spatial{k} pooling needs at least {k}x{k} tokens, the model has {side}x{side}")
    grid = h.transpose(1, 2).reshape(n, d, side, side)
    pooled = F.adaptive_avg_pool2d(grid.float(), k).to(h.dtype)  # (N, D, k, k)
    return pooled.permute(0, 2, 3, 1).reshape(n, k * k * d)  # cell-major: [cell(0,0) D, cell(0,1) D, ...]


def pooled_dim(pooling: str, hidden: int) -> int:
    """Feature width per sample after pooling (tokens: per token)."""
    kind, k = parse_pooling(pooling)
    return hidden * (k * k if kind == "spatial" else 1)


def _as_tensor(out) -> torch.Tensor:
    # Normalise module outputs: some wrappers return tuples (captum#1215 is the classic failure).
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot capture a block output of type {type(out).__name__}")


class BlockCapture:
    """Context manager: capture (pooled) outputs of 1-based blocks of a DiT/SiT; block 0 is the
    stream that enters block 1 (patch embedding + position embedding: what the input alone gives).

    >>> with BlockCapture(model, [2, 4], pooling="mean") as cap:
    ...     model(x, t, y)            # stops after block 4, no exception escapes
    >>> cap.outputs[2].shape          # (N, D)

    ``keep_tokens=n`` also keeps the full (n, T, D) tokens of the first n samples of the batch
    in ``cap.tokens`` (PCA maps, token cosine) without storing everyone's tokens. ``stop=False``
    lets the forward finish (its output is then returned as usual). ``model`` must provide
    ``block_output_module(k)`` (it maps DiverseDiT long-skip blocks to their fusion modules).
    """

    def __init__(self, model: nn.Module, blocks: Iterable[int], pooling: str | Callable = "mean", *,
                 stop: bool = True, keep_tokens: int = 0, out_dtype: torch.dtype | None = None):
        self.blocks = sorted(set(int(b) for b in blocks))
        if not self.blocks:
            raise ValueError("BlockCapture needs at least one block")
        if self.blocks[0] < 0:
            raise ValueError(f"block {self.blocks[0]} is out of range (0 = input embedding, 1..depth = blocks)")
        if isinstance(pooling, str):
            parse_pooling(pooling)
        self.model = model
        self.pooling = pooling
        self.stop = stop
        self.keep_tokens = int(keep_tokens)
        self.out_dtype = out_dtype
        # validates the range; block 0 is read by a pre-hook on the first block (its input stream)
        self.modules = {k: model.block_output_module(k) for k in self.blocks if k != 0}
        self.outputs: dict[int, torch.Tensor] = {}
        self.tokens: dict[int, torch.Tensor] = {}
        self.stopped = False
        self._handles: list = []

    def _make_hook(self, k: int):
        deepest = k == self.blocks[-1]

        def hook(module, inputs, output=None):
            h = _as_tensor(inputs[0] if k == 0 else output).detach()
            pooled = self.pooling(h) if callable(self.pooling) else pool_tokens(h, self.pooling)
            if self.out_dtype is not None:
                pooled = pooled.to(self.out_dtype)
            self.outputs[k] = pooled
            if self.keep_tokens > 0:
                self.tokens[k] = h[: self.keep_tokens].clone()
            if deepest and self.stop:
                raise _StopForward()

        return hook

    def __enter__(self) -> "BlockCapture":
        self.outputs, self.tokens, self.stopped = {}, {}, False
        try:
            for k, mod in self.modules.items():
                self._handles.append(mod.register_forward_hook(self._make_hook(k)))
            if 0 in self.blocks:
                self._handles.append(self.model.blocks[0].register_forward_pre_hook(self._make_hook(0)))
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        """Remove every hook this capture registered (idempotent)."""
        while self._handles:
            self._handles.pop().remove()

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.remove()
        if exc_type is not None and issubclass(exc_type, _StopForward):
            self.stopped = True
            return True  # the early stop is not an error
        return False


def capture_blocks(model: nn.Module, blocks: Iterable[int], forward: Callable[[], object],
                   pooling: str | Callable = "mean", keep_tokens: int = 0,
                   out_dtype: torch.dtype | None = None) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Run ``forward()`` under a stopping :class:`BlockCapture`; returns (pooled, kept tokens).

    Raises if the forward ended without reaching the deepest block (a model that skips blocks
    would otherwise give silently missing features).
    """
    with BlockCapture(model, blocks, pooling, keep_tokens=keep_tokens, out_dtype=out_dtype) as cap:
        forward()
    missing = [k for k in cap.blocks if k not in cap.outputs]
    if missing:
        raise RuntimeError(f"the forward did not reach block(s) {missing}")
    return cap.outputs, cap.tokens
