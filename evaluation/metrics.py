"""Generation metrics: ``fd_<dataset>`` and class accuracy from the dataset classifier, torch-fidelity's
Inception metrics (FID / IS / KID / precision-recall) and the ADM evaluator's FID / sFID from a local
weights file, never downloaded. The Frechet maths is :mod:`repdyn.model.frechet`."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from repdyn.model.classifier import DatasetClassifier
from repdyn.model.frechet import fd_bootstrap_se, feature_statistics, frechet_distance

__all__ = ["INCEPTION_WEIGHTS_NAME", "INCEPTION_WEIGHTS_URL", "classifier_metrics",
           "check_inception_weights", "inception_metrics", "adm_features", "adm_metrics", "adm_reference_stats",
           "SFID_CHANNELS"]

INCEPTION_WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS_NAME}"


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


@torch.no_grad()
def classifier_metrics(clf: DatasetClassifier, images: torch.Tensor, labels: torch.Tensor | None = None,
                       batch_size: int = 512) -> dict[str, float]:
    """``fd_<dataset>`` (generated vs train-split features) with its bootstrap standard error
    ``fd_<dataset>_se``, and ``cond_acc_<dataset>``
    (classifier accuracy against the conditioning labels; real-class labels only)."""
    clf.model.eval()
    feats, preds = [], []
    for s in range(0, len(images), batch_size):
        f = clf.model.embed(images[s: s + batch_size].float())
        feats.append(f)
        preds.append(clf.model.head(f).argmax(1))
    feats_t, pred = torch.cat(feats), torch.cat(preds)
    out = {f"fd_{clf.name}": frechet_distance(*feature_statistics(feats_t), clf.ref_mu, clf.ref_sigma),
           f"fd_{clf.name}_se": fd_bootstrap_se(feats_t, clf.ref_mu, clf.ref_sigma)}
    if labels is not None:
        labels = torch.as_tensor(labels).long()
        real = labels < clf.model.head.out_features
        out[f"cond_acc_{clf.name}"] = float((pred[real] == labels[real]).float().mean()) if real.any() else float("nan")
    return out
