"""The Frechet distance between Gaussian feature statistics, in float64 (own maths: eigh-based, no
complex sqrtm). The dataset classifier caches its reference statistics with it and the generation
metrics score samples with it."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["feature_statistics", "sqrtm_psd", "trace_sqrt_product", "frechet_distance", "frechet_distance_features",
           "fd_bootstrap_se"]


def feature_statistics(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (ddof=1, as pytorch-fid and the ADM evaluator) in float64."""
    f = np.asarray(torch.as_tensor(features).double().cpu())
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"need features (N >= 2, D), got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def sqrtm_psd(a: np.ndarray) -> np.ndarray:
    """Square root of a symmetric PSD matrix via eigh (tiny negative eigenvalues clipped)."""
    a = 0.5 * (a + a.T)
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def trace_sqrt_product(s1: np.ndarray, s2: np.ndarray) -> float:
    """tr sqrt(S1 S2) for PSD S1, S2, as sum sqrt(eig(sqrt(S1) S2 sqrt(S1))): the eigenvalues of
    S1 S2 are those of that symmetric PSD matrix, so no complex or non-symmetric sqrtm is needed."""
    r = sqrtm_psd(s1)
    m = r @ s2 @ r
    w = np.linalg.eigvalsh(0.5 * (m + m.T))
    return float(np.sqrt(np.clip(w, 0, None)).sum())


def frechet_distance(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr sqrt(S1 S2)."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    s1, s2 = np.atleast_2d(s1).astype(np.float64), np.atleast_2d(s2).astype(np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"mismatched statistics: mu {mu1.shape} / {mu2.shape}, sigma {s1.shape} / {s2.shape}")
    diff = mu1 - mu2
    fd = diff @ diff + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt_product(s1, s2)
    return float(max(fd, 0.0))


def frechet_distance_features(f1: np.ndarray | torch.Tensor, f2: np.ndarray | torch.Tensor) -> float:
    return frechet_distance(*feature_statistics(f1), *feature_statistics(f2))


@torch.no_grad()
def fd_bootstrap_se(features: torch.Tensor | np.ndarray, ref_mu: np.ndarray, ref_sigma: np.ndarray,
                    n_boot: int = 50, seed: int = 0) -> float:
    """Standard error of the Frechet distance over resamples of the generated set.

    With a few hundred samples the distance itself is noisy; comparisons between checkpoints (the
    study's claims) need that noise next to the value, not just the value.
    """
    f = np.asarray(features.detach().cpu() if torch.is_tensor(features) else features, dtype=np.float64)
    if len(f) < 3:
        return float("nan")
    rng = np.random.default_rng(seed)
    vals = [frechet_distance(*feature_statistics(f[rng.integers(0, len(f), len(f))]), ref_mu, ref_sigma)
            for _ in range(n_boot)]
    return float(np.std(vals, ddof=1))


# ------------------------------------------------------------------------------------------------
# torch-fidelity (Inception)
# ------------------------------------------------------------------------------------------------
