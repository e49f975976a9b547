"""Training objectives with one interface for DiT (DDPM) and SiT (flow matching).

The trainer and the method loss terms (SRA, DiverseDiT) only talk to this interface:
``sample_t`` -> ``corrupt`` -> model -> ``loss``; ``log_snr`` puts both families on one axis for
probe tables; ``less_noisy`` gives SRA's teacher time. Each objective also says which time
convention its checkpoints use (written into checkpoint ``meta``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from repdyn.model.diffusion import GaussianDiffusion
from repdyn.model.flow import make_path

__all__ = ["Objective", "FlowObjective", "DDPMObjective", "make_objective"]


class Objective(ABC):
    """One family's training objective. Shapes: ``x0``, ``eps``, ``x_t`` are (B, C, H, W); ``t`` is (B,)
    (float in [0, 1] for SiT, integer steps for DiT); ``model_out`` is the backbone's (B, C_out, H, W)."""

    family: str
    time_convention: str
    prediction: str

    @abstractmethod
    def sample_t(self, n: int, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
        """(n,) training times."""

    @abstractmethod
    def corrupt(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_t (B, C, H, W) from clean x0 and noise eps at (B,) times t."""

    @abstractmethod
    def loss(self, model_out, x0, x_t, t, eps) -> dict[str, torch.Tensor]:
        """Per-sample terms, each (B,); ``"loss"`` is what is averaged and optimised."""

    @abstractmethod
    def log_snr(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) log(alpha^2 / sigma^2) of times t: one axis for DiT and SiT tables."""

    @abstractmethod
    def less_noisy(self, t: torch.Tensor, t_max: float, generator: torch.Generator | None = None) -> torch.Tensor:
        """A (B,) per-sample time at most as noisy as ``t`` (SRA's teacher time)."""

    @abstractmethod
    def meta(self) -> dict:
        """What a checkpoint records about the objective (family, time convention, prediction, ...)."""


@dataclass
class FlowObjective(Objective):
    """SiT: x_t = alpha x0 + sigma eps (t = 1 noise), MSE on the velocity."""

    path: str = "linear"
    weighting: str = "uniform"
    family: str = "sit"
    time_convention: str = "flow-t1-noise"
    prediction: str = "velocity"

    def __post_init__(self):
        self._path = make_path(self.path)
        if self.weighting not in ("uniform", "lognormal"):
            raise ValueError(f"unknown t weighting {self.weighting!r}; use uniform or lognormal")

    def sample_t(self, n, device, generator=None):
        if self.weighting == "uniform":
            return torch.rand(n, device=device, generator=generator)
        sigma = torch.exp(torch.randn(n, device=device, generator=generator))  # REPA's lognormal
        return sigma / (1 + sigma)

    def corrupt(self, x0, t, eps):
        return self._path.interpolate(x0, eps, t)

    def loss(self, model_out, x0, x_t, t, eps):
        target = self._path.velocity(x0, eps, t)
        mse = ((model_out[:, : x0.shape[1]].float() - target.float()) ** 2).mean(dim=list(range(1, x0.ndim)))
        return {"loss": mse, "mse": mse}

    def log_snr(self, t):
        return self._path.log_snr(t)

    def less_noisy(self, t, t_max, generator=None):
        delta = torch.rand(t.shape, device=t.device, generator=generator) * t_max
        return (t - delta).clamp(0.0, 1.0)

    def meta(self):
        return {"family": "sit", "prediction": self.prediction, "time_convention": self.time_convention,
                "path": self.path, "weighting": self.weighting}


@dataclass
class DDPMObjective(Objective):
    """DiT: integer t in 0..T-1 (T-1 noisiest), eps prediction, learned sigma with the VB term."""

    num_timesteps: int = 1000
    learn_sigma: bool = True
    family: str = "dit"
    time_convention: str = "ddpm-t999-noisiest"
    prediction: str = "eps"

    def __post_init__(self):
        self.diffusion = GaussianDiffusion.linear(self.num_timesteps, learn_sigma=self.learn_sigma)

    def sample_t(self, n, device, generator=None):
        return torch.randint(0, self.num_timesteps, (n,), device=device, generator=generator)

    def corrupt(self, x0, t, eps):
        return self.diffusion.q_sample(x0, t, eps)

    def loss(self, model_out, x0, x_t, t, eps):
        return self.diffusion.training_losses(model_out, x0, x_t, t, eps)

    def log_snr(self, t):
        return self.diffusion.log_snr(t)

    def less_noisy(self, t, t_max, generator=None):
        # Official DiT-SRA: delta ~ randint(0, T * t_max), clamped to [1, T-1] (floor 1, not 0).
        k = max(1, int(self.num_timesteps * t_max))
        delta = torch.randint(0, k, t.shape, device=t.device, generator=generator)
        return (t - delta).clamp(1, self.num_timesteps - 1)

    def meta(self):
        return {"family": "dit", "prediction": self.prediction, "time_convention": self.time_convention,
                "num_timesteps": self.num_timesteps, "learn_sigma": self.learn_sigma, "beta_schedule": "linear"}


def make_objective(family: str, *, path: str = "linear", weighting: str = "uniform", learn_sigma: bool = True,
                   num_timesteps: int = 1000) -> Objective:
    if family == "sit":
        return FlowObjective(path=path, weighting=weighting)
    if family == "dit":
        return DDPMObjective(num_timesteps=num_timesteps, learn_sigma=learn_sigma)
    raise ValueError(f"unknown family {family!r}; use dit or sit")
