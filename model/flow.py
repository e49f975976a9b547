"""Flow-matching interpolants for SiT (the "path" part of SiT's path / loss / sampler split).

Convention used everywhere in this project (REPA / SRA): ``x_t = alpha(t) x0 + sigma(t) eps``
with ``t in [0, 1]`` and **t = 1 pure noise**; the network predicts the velocity
``d x_t / dt = alpha'(t) x0 + sigma'(t) eps`` (``eps - x0`` on the linear path).

willisma/SiT checkpoints use the mirror convention (t = 0 noise, velocity ``x0 - eps``); they are
tagged ``flow-t0-noise`` and :func:`model_time` / :func:`model_velocity_sign` convert.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch

__all__ = ["FlowPath", "LinearPath", "CosinePath", "make_path", "model_time", "model_velocity_sign",
           "TIME_CONVENTIONS"]

# Names written into checkpoint meta.
TIME_CONVENTIONS = ("flow-t1-noise", "flow-t0-noise", "ddpm-t999-noisiest")


def _expand(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


class FlowPath(ABC):
    """alpha(t), sigma(t) and their derivatives; subclasses define the schedule.

    Shapes: ``t`` is (B,) (or already broadcast to the data's rank); ``x0``, ``eps``, ``x_t`` and
    ``v`` are (B, C, H, W) images or latents; every method returns tensors of the data's shape.
    """

    name = "base"

    @abstractmethod
    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha(t), sigma(t)), each of ``t``'s shape."""

    @abstractmethod
    def d_alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha'(t), sigma'(t)), each of ``t``'s shape."""

    def interpolate(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = alpha(t) x0 + sigma(t) eps: (B, C, H, W) from (B, C, H, W) x0 / eps and (B,) t."""
        a, s = self.alpha_sigma(_expand(t, x0))
        return a * x0 + s * eps

    def velocity(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """d x_t / dt = alpha'(t) x0 + sigma'(t) eps: (B, C, H, W), the SiT regression target."""
        da, ds = self.d_alpha_sigma(_expand(t, x0))
        return da * x0 + ds * eps

    def log_snr(self, t: torch.Tensor) -> torch.Tensor:
        """log(alpha^2 / sigma^2); +inf at clean data, -inf at pure noise."""
        t = t.double()
        a, s = self.alpha_sigma(t)
        return 2 * (torch.log(a.abs()) - torch.log(s.abs()))

    def x0_eps_from_velocity(self, x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor):
        """Solve [x_t; v] = [[a, s], [a', s']] [x0; eps] for (x0, eps), each (B, C, H, W) like ``x_t``
        and ``v``, with (B,) ``t`` — used by samplers."""
        tt = _expand(t, x_t)
        a, s = self.alpha_sigma(tt)
        da, ds = self.d_alpha_sigma(tt)
        det = a * ds - s * da
        x0 = (ds * x_t - s * v) / det
        eps = (a * v - da * x_t) / det
        return x0, eps


class LinearPath(FlowPath):
    """alpha = 1 - t, sigma = t (SiT / REPA / SRA default)."""

    name = "linear"

    def alpha_sigma(self, t):
        return 1 - t, t

    def d_alpha_sigma(self, t):
        return -torch.ones_like(t), torch.ones_like(t)


class CosinePath(FlowPath):
    """alpha = cos(pi t / 2), sigma = sin(pi t / 2) (REPA's ``--path-type cosine``)."""

    name = "cosine"

    def alpha_sigma(self, t):
        return torch.cos(t * math.pi / 2), torch.sin(t * math.pi / 2)

    def d_alpha_sigma(self, t):
        return -math.pi / 2 * torch.sin(t * math.pi / 2), math.pi / 2 * torch.cos(t * math.pi / 2)


def make_path(name: str) -> FlowPath:
    paths = {"linear": LinearPath, "cosine": CosinePath}
    if name not in paths:
        raise ValueError(f"unknown path {name!r}; use one of {sorted(paths)}")
    return paths[name]()


def model_time(t: torch.Tensor, convention: str) -> torch.Tensor:
    """Our t (1 = noise) -> the t a checkpoint of ``convention`` was trained with."""
    if convention == "flow-t1-noise":
        return t
    if convention == "flow-t0-noise":
        return 1 - t
    raise ValueError(f"not a flow time convention: {convention!r}; use one of {TIME_CONVENTIONS[:2]}")


def model_velocity_sign(convention: str) -> float:
    """+1 if the network's output is d x_t / dt in our convention, -1 for the mirrored one."""
    return 1.0 if convention == "flow-t1-noise" else -1.0
