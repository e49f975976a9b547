"""Generation metrics: the Frechet distance (own float64 maths) and torch-fidelity's Inception
metrics (FID / IS / KID / precision-recall) from a local weights file, never downloaded."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

__all__ = ["INCEPTION_WEIGHTS_NAME", "INCEPTION_WEIGHTS_URL", "feature_statistics", "sqrtm_psd",
           "trace_sqrt_product", "frechet_distance", "frechet_distance_features", "fd_bootstrap_se",
           "check_inception_weights", "inception_metrics", "adm_features", "adm_metrics", "adm_reference_stats",
           "SFID_CHANNELS"]

INCEPTION_WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS_NAME}"


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


class _UInt8Images(torch.utils.data.Dataset):
    """uint8 (N, 3, H, W) images as torch-fidelity wants them."""

    def __init__(self, images: torch.Tensor):
        images = torch.as_tensor(images)
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must be uint8 (N, 1|3, H, W), got {images.dtype} {tuple(images.shape)}")
        self.images = images.repeat(1, 3, 1, 1) if images.shape[1] == 1 else images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


def check_inception_weights(path: str | os.PathLike | None) -> Path:
    """The Inception weights file, or a one-line error saying what it is and where to get it."""
    if path is None or not Path(path).is_file():
        where = "no --inception-weights given" if path is None else f"{path} does not exist"
        raise ValueError(f"FID/IS/KID/precision-recall need torch-fidelity's Inception weights ({where}): "
                         f"download {INCEPTION_WEIGHTS_NAME} once from {INCEPTION_WEIGHTS_URL} and pass "
                         "--inception-weights PATH")
    return Path(path)


def inception_metrics(generated: torch.Tensor, reference: torch.Tensor, weights_path: str | os.PathLike, *,
                      isc: bool = True, fid: bool = True, kid: bool = True, prc: bool = True, batch_size: int = 64,
                      device: str | torch.device = "cpu", verbose: bool = False, rng_seed: int = 2020,
                      feature_layer_fid: str = "2048") -> dict[str, float]:
    """FID, IS, KID and precision/recall from one local ``inception-v3-compat`` file (no download).

    ``generated`` / ``reference``: uint8 (N, 1|3, H, W). Subset sizes shrink to fit small N.
    ``feature_layer_fid``: "2048" (pool_3, the standard FID); smaller layers only for quick checks.
    """
    import torch_fidelity

    weights = check_inception_weights(weights_path)
    g, r = _UInt8Images(generated), _UInt8Images(reference)
    n_min = min(len(g), len(r))
    prc = prc and n_min > 3
    kwargs = dict(
        input1=g, input2=r, cuda=torch.device(device).type == "cuda", batch_size=batch_size,
        isc=isc, fid=fid, kid=kid and n_min >= 2, prc=prc,
        feature_extractor="inception-v3-compat", feature_extractor_weights_path=str(weights),
        feature_layer_fid=feature_layer_fid,
        isc_splits=max(1, min(10, len(g) // 100)), kid_subset_size=min(1000, n_min), kid_subsets=100,
        datasets_download=False, cache=False, save_cpu_ram=True, verbose=verbose, rng_seed=rng_seed,
    )
    try:
        res = torch_fidelity.calculate_metrics(**kwargs)
    except RuntimeError as e:
        if "state_dict" in str(e):
            raise ValueError(f"{weights} is not an inception-v3-compat state dict ({INCEPTION_WEIGHTS_NAME} "
                             "from torch-fidelity's releases is)") from None
        raise
    names = {"frechet_inception_distance": "fid", "inception_score_mean": "is", "inception_score_std": "is_std",
             "kernel_inception_distance_mean": "kid", "kernel_inception_distance_std": "kid_std",
             "precision": "precision", "recall": "recall"}
    return {names[k]: float(v) for k, v in res.items() if k in names}


# ------------------------------------------------------------------------------------------------
# ADM evaluator statistics: FID against the reference npz's mu / sigma, and sFID
# ------------------------------------------------------------------------------------------------

SFID_CHANNELS = 7  # the ADM evaluator keeps the first 7 channels of mixed_6/conv (17 x 17 x 7 = 2023 dims)


@torch.no_grad()
def adm_features(images: torch.Tensor, weights_path: str | os.PathLike, batch_size: int = 64,
                 device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """(pool_3 features (N, 2048), spatial features (N, 2023)) of uint8 (N, 3, H, W) images.

    torch-fidelity's ``inception-v3-compat`` is a port of the TF graph the ADM evaluator uses; the
    spatial features are its ``mixed_6/conv`` tensor, i.e. the 1x1 branch (conv + batch norm + ReLU)
    of the 7th mixed block (Mixed_6d), first 7 channels, flattened. Written here because
    torch-fidelity exposes only pooled features.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    weights = check_inception_weights(weights_path)
    net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights))
    net = net.to(device).eval()
    spatial: list[torch.Tensor] = []
    hook = net.Mixed_6d.branch1x1.register_forward_hook(
        lambda m, i, o: spatial.append(o[:, :SFID_CHANNELS].permute(0, 2, 3, 1).reshape(len(o), -1).double().cpu()))
    pool = []
    try:
        imgs = _UInt8Images(images).images
        for s in range(0, len(imgs), batch_size):
            (f,) = net(imgs[s: s + batch_size].to(device))
            pool.append(f.double().cpu())
    finally:
        hook.remove()
    return torch.cat(pool).numpy(), torch.cat(spatial).numpy()


def adm_metrics(generated: torch.Tensor, weights_path: str | os.PathLike, reference: dict[str, np.ndarray],
                batch_size: int = 64, device: str | torch.device = "cpu") -> dict[str, float]:
    """FID and sFID against ADM-evaluator reference statistics (``mu``, ``sigma``, ``mu_s``,
    ``sigma_s``), as in ``VIRTUAL_imagenet256_labeled.npz``: ``fid_adm`` and ``sfid``."""
    pool, spatial = adm_features(generated, weights_path, batch_size, device)
    out = {}
    if "mu" in reference and "sigma" in reference:
        out["fid_adm"] = frechet_distance(*feature_statistics(pool), reference["mu"], reference["sigma"])
    if "mu_s" in reference and "sigma_s" in reference:
        out["sfid"] = frechet_distance(*feature_statistics(spatial), reference["mu_s"], reference["sigma_s"])
    return out


def adm_reference_stats(images: torch.Tensor, weights_path: str | os.PathLike, batch_size: int = 64,
                        device: str | torch.device = "cpu") -> dict[str, np.ndarray]:
    """``mu``, ``sigma``, ``mu_s``, ``sigma_s`` of reference images (when the npz carries none)."""
    pool, spatial = adm_features(images, weights_path, batch_size, device)
    (mu, sigma), (mu_s, sigma_s) = feature_statistics(pool), feature_statistics(spatial)
    return {"mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s}
