"""Gaussian diffusion (DDPM) for DiT: linear betas, eps prediction, learned variance (VB term).

Follows the ADM / DiT ``gaussian_diffusion.py`` maths (written afresh): integer t in
``0..T-1`` with **t = T-1 the noisiest**, ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``, and,
with a learned variance, the model's extra C channels interpolate (in log space) between the
posterior variance and beta_t. Loss = MSE(eps) + VB, where the VB term sees a stop-gradient mean
so it only trains the variance (Nichol & Dhariwal 2021, as DiT).

Schedules are kept in float64 on the host and gathered per batch, so results do not depend on
the device's matmul precision.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["GaussianDiffusion", "linear_beta_schedule", "normal_kl", "discretized_gaussian_log_likelihood"]


def linear_beta_schedule(num_timesteps: int = 1000) -> np.ndarray:
    """DDPM's linear schedule, rescaled so any T spans the same noise range as T = 1000."""
    scale = 1000 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """Log-likelihood of data in [-1, 1] quantised to 256 bins (the decoder term at t = 0)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(
        x < -0.999, log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))),
    )


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=list(range(1, x.ndim)))


class GaussianDiffusion:
    """DDPM process over ``betas``; ``timestep_map`` maps respaced indices to original steps."""

    def __init__(self, betas: np.ndarray, learn_sigma: bool = True, timestep_map: np.ndarray | None = None):
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError("betas must be a 1-D array in (0, 1]")
        self.betas = betas
        self.num_timesteps = len(betas)
        self.learn_sigma = learn_sigma
        self.timestep_map = np.arange(self.num_timesteps) if timestep_map is None else np.asarray(timestep_map)
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # log of the posterior variance, clipped because it is 0 at t = 0.
        self.posterior_log_variance_clipped = np.log(
            np.append(self.posterior_variance[1], self.posterior_variance[1:]) if self.num_timesteps > 1
            else np.array([betas[0]])
        )
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)

    @classmethod
    def linear(cls, num_timesteps: int = 1000, learn_sigma: bool = True) -> "GaussianDiffusion":
        return cls(linear_beta_schedule(num_timesteps), learn_sigma=learn_sigma)

    def respaced(self, use_timesteps: list[int] | np.ndarray) -> "GaussianDiffusion":
        """The same process observed only at ``use_timesteps`` (DiT/ADM ``space_timesteps``)."""
        use = sorted(set(int(t) for t in use_timesteps))
        if not use or use[0] < 0 or use[-1] >= self.num_timesteps:
            raise ValueError(f"respaced timesteps must lie in 0..{self.num_timesteps - 1}")
        last = 1.0
        new_betas = []
        for i, abar in enumerate(self.alphas_cumprod):
            if i in use:
                new_betas.append(1 - abar / last)
                last = abar
        return GaussianDiffusion(np.array(new_betas), self.learn_sigma, timestep_map=self.timestep_map[use])

    # -- helpers ----------------------------------------------------------------------------------
    @staticmethod
    def _gather(arr: np.ndarray, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        out = torch.from_numpy(arr).to(like.device)[t.long()].to(like.dtype)
        return out.reshape(-1, *([1] * (like.ndim - 1)))

    def log_snr(self, t: torch.Tensor) -> torch.Tensor:
        """log(abar_t / (1 - abar_t)) in float64, for tables that mix DiT and SiT."""
        abar = torch.from_numpy(self.alphas_cumprod)[t.long().cpu()]
        return (torch.log(abar) - torch.log1p(-abar)).to(t.device)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return self._gather(self.sqrt_alphas_cumprod, t, x0) * x0 + self._gather(
            self.sqrt_one_minus_alphas_cumprod, t, x0) * eps

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        mean = self._gather(self.posterior_mean_coef1, t, x_t) * x0 + self._gather(self.posterior_mean_coef2, t, x_t) * x_t
        return mean, self._gather(self.posterior_log_variance_clipped, t, x_t)

    def predict_x0_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return self._gather(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - self._gather(
            self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps

    def split_output(self, model_out: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Model output -> (eps, variance values in [-1, 1] or None)."""
        if self.learn_sigma:
            if model_out.shape[1] != 2 * channels:
                raise ValueError(f"learned-sigma DDPM needs {2 * channels} output channels, got {model_out.shape[1]}")
            return model_out[:, :channels], model_out[:, channels:]
        return model_out[:, :channels], None

    def p_mean_variance(self, model_out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, clip_denoised: bool = False):
        """Mean and log-variance of p(x_{t-1} | x_t), plus the predicted x0 and eps."""
        eps, var_values = self.split_output(model_out, x_t.shape[1])
        if var_values is None:
            # Fixed "large" variance (beta_t, with the posterior variance at t = 0), as ADM.
            fixed = np.append(self.posterior_variance[1], self.betas[1:]) if self.num_timesteps > 1 else self.betas
            log_var = self._gather(np.log(fixed), t, x_t)
        else:
            min_log = self._gather(self.posterior_log_variance_clipped, t, x_t)
            max_log = self._gather(np.log(self.betas), t, x_t)
            frac = (var_values + 1) / 2
            log_var = frac * max_log + (1 - frac) * min_log
        x0 = self.predict_x0_from_eps(x_t, t, eps)
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
        mean, _ = self.q_posterior(x0, x_t, t)
        return mean, log_var, x0, eps

    # -- training loss ----------------------------------------------------------------------------
    def training_losses(self, model_out: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                        eps: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-sample ``loss`` = MSE(eps) [+ VB in bits/dim with a frozen mean]."""
        eps_pred, var_values = self.split_output(model_out, x0.shape[1])
        mse = _mean_flat((eps - eps_pred.float()) ** 2)
        terms = {"mse": mse}
        if var_values is not None:
            frozen = torch.cat([eps_pred.detach(), var_values], dim=1).float()
            true_mean, true_log_var = self.q_posterior(x0.float(), x_t.float(), t)
            mean, log_var, _, _ = self.p_mean_variance(frozen, x_t.float(), t)
            kl = _mean_flat(normal_kl(true_mean, true_log_var, mean, log_var)) / math.log(2.0)
            nll = -_mean_flat(discretized_gaussian_log_likelihood(x0.float(), mean, 0.5 * log_var)) / math.log(2.0)
            terms["vb"] = torch.where(t == 0, nll, kl)
            terms["loss"] = mse + terms["vb"]
        else:
            terms["loss"] = mse
        return terms
