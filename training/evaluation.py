"""Generation metrics: torch-fidelity (FID / IS / KID / precision-recall) from a local Inception
file, an offline Frechet distance in a small dataset classifier's feature space, ADM ``.npz``
export, and a metrics table keyed by checkpoint and sampler settings.

Nothing here downloads anything. Without the Inception file the offline metrics still run; they
are reported as ``fd_<dataset>`` / ``cond_acc_<dataset>`` and are **not** FID: they live in a
different feature space and are only comparable with themselves.
"""

from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import samplers

__all__ = [
    "INCEPTION_WEIGHTS_NAME",
    "INCEPTION_WEIGHTS_URL",
    "KEY_COLUMNS",
    "require_pixels",
    "to_uint8",
    "save_npz",
    "save_grid",
    "feature_statistics",
    "sqrtm_psd",
    "trace_sqrt_product",
    "frechet_distance",
    "frechet_distance_features",
    "SmallCNN",
    "DatasetClassifier",
    "cache_root",
    "classifier_cache_path",
    "train_classifier",
    "get_classifier",
    "classifier_metrics",
    "inception_metrics",
    "checkpoint_keys",
    "evaluate_checkpoint",
    "append_metrics_row",
    "run_sample",
    "run_eval",
    "parse_labels",
    "resolve_device",
]

INCEPTION_WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS_NAME}"
# A metrics row is identified by these; re-evaluating the same settings replaces the row.
KEY_COLUMNS = ("ckpt_sha", "weights", "method", "steps", "cfg_scale", "guidance_low", "guidance_high",
               "legacy_cfg_channels", "labels", "n_samples", "seed")
CLASSIFIER_FORMAT = 1


# ------------------------------------------------------------------------------------------------
# Images and files
# ------------------------------------------------------------------------------------------------


def require_pixels(meta: dict | None) -> None:
    """Latent checkpoints cannot be written as images (no VAE decoder here): say so up front."""
    if meta and meta.get("latent_scale") is not None:
        raise ValueError("this is a latent-space checkpoint: PNG/npz export and Inception metrics need pixels "
                         "(decode with the SD-VAE first); fd_<dataset> works on latents directly")


def to_uint8(x: torch.Tensor, meta: dict | None = None) -> torch.Tensor:
    """Model-space pixels in [-1, 1] (N, C, H, W) -> uint8 (N, C, H, W), rounded as DiT/ADM."""
    require_pixels(meta)
    return (127.5 * x.float() + 128.0).clamp(0, 255).to(torch.uint8)


@contextmanager
def _atomic_path(path: str | os.PathLike):
    """Yield a temp path in the destination folder; rename it over ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_npz(path: str | os.PathLike, images: torch.Tensor | np.ndarray, labels: Any = None, rgb: bool = True) -> Path:
    """ADM-evaluator batch: ``arr_0`` uint8 NHWC (+ ``arr_1`` labels, as guided-diffusion writes).

    Grayscale is repeated to 3 channels by default because the ADM Inception graph expects RGB.
    """
    arr = torch.as_tensor(images)
    if arr.dtype != torch.uint8 or arr.ndim != 4:
        raise ValueError(f"save_npz needs uint8 images (N, C, H, W), got {arr.dtype} {tuple(arr.shape)}")
    if rgb and arr.shape[1] == 1:
        arr = arr.repeat(1, 3, 1, 1)
    out = {"arr_0": arr.permute(0, 2, 3, 1).contiguous().numpy()}
    if labels is not None:
        out["arr_1"] = np.asarray(torch.as_tensor(labels).cpu(), dtype=np.int64)
    path = Path(path)
    with _atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **out)
    return path


def save_grid(path: str | os.PathLike, images: torch.Tensor, nrow: int | None = None, pad: int = 2) -> Path:
    """Write uint8 images (N, C, H, W) as one PNG grid (black padding)."""
    from PIL import Image

    images = torch.as_tensor(images)
    n, c, h, w = images.shape
    nrow = nrow or max(1, int(np.ceil(np.sqrt(n))))
    rows = int(np.ceil(n / nrow))
    grid = np.zeros((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), dtype=np.uint8)
    for i, img in enumerate(images.permute(0, 2, 3, 1).numpy()):
        r, col = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = img
    pil = Image.fromarray(grid[..., 0] if c == 1 else grid, mode="L" if c == 1 else "RGB")
    path = Path(path)
    with _atomic_path(path) as tmp:
        pil.save(tmp, format="PNG")
    return path


# ------------------------------------------------------------------------------------------------
# Frechet distance (own matrix square root; float64)
# ------------------------------------------------------------------------------------------------


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


# ------------------------------------------------------------------------------------------------
# Dataset classifier (offline metric)
# ------------------------------------------------------------------------------------------------


class SmallCNN(nn.Module):
    """Three conv blocks -> global average pool -> linear; the pooled vector is the feature."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 16):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.BatchNorm2d(4 * w), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(4 * w, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@dataclass
class DatasetClassifier:
    """A trained :class:`SmallCNN` plus the train-split feature statistics of its dataset."""

    model: SmallCNN
    dataset: str
    name: str  # metric suffix, e.g. "fashion-mnist"
    test_accuracy: float
    ref_mu: np.ndarray
    ref_sigma: np.ndarray
    info: dict
    path: Path | None = None


def cache_root() -> Path:
    """``$REPDYN_CACHE`` or ``~/.cache/repdyn``."""
    return Path(os.environ.get("REPDYN_CACHE") or Path.home() / ".cache" / "repdyn")


def _metric_name(spec: str) -> str:
    """``fashion-mnist`` -> itself; ``folder:/a/b`` -> ``folder-b``; safe for file and column names."""
    if ":" not in spec:
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", spec)
    kind, rest = spec.split(":", 1)
    return f"{kind}-{re.sub(r'[^A-Za-z0-9_.-]+', '-', Path(rest).name or 'root')}"


def classifier_cache_path(spec: str) -> Path:
    """``<cache>/classifiers/<dataset>.pt``; path-based specs also get a short hash of the path."""
    name = _metric_name(spec)
    if ":" in spec:
        name += "-" + hashlib.sha256(spec.encode()).hexdigest()[:8]
    return cache_root() / "classifiers" / f"{name}.pt"


def _batches(ds: Any, indices: np.ndarray, batch_size: int, generator: torch.Generator | None = None):
    """Model-space batches (x, y) from a project dataset (``get_batch`` / ``finalize`` when present)."""
    for s in range(0, len(indices), batch_size):
        idx = torch.as_tensor(indices[s: s + batch_size])
        if hasattr(ds, "get_batch"):
            x, y = ds.get_batch(idx)
        else:
            items = [ds[int(i)] for i in idx]
            x, y = torch.stack([a for a, _ in items]), torch.stack([torch.as_tensor(b) for _, b in items])
        if hasattr(ds, "finalize"):
            x = ds.finalize(x, generator)
        yield x.float(), torch.as_tensor(y).long()


def _fingerprint(ds: Any) -> dict:
    return {"n": len(ds), "num_classes": int(ds.num_classes), "channels": int(ds.channels),
            "image_size": int(ds.image_size)}


@torch.no_grad()
def _embed_all(model: SmallCNN, ds: Any, indices: np.ndarray, batch_size: int, device: torch.device,
               seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features, logits and labels of ``ds[indices]``."""
    model.eval()
    g = torch.Generator().manual_seed(seed)
    feats, logits, labels = [], [], []
    for x, y in _batches(ds, indices, batch_size, g):
        f = model.embed(x.to(device))
        feats.append(f.cpu())
        logits.append(model.head(f).cpu())
        labels.append(y)
    return torch.cat(feats), torch.cat(logits), torch.cat(labels)


def train_classifier(train_ds: Any, test_ds: Any | None = None, *, spec: str | None = None, epochs: int = 2,
                     batch_size: int = 128, lr: float = 2e-3, width: int = 16, seed: int = 0,
                     device: str | torch.device = "cpu", max_ref: int = 60000,
                     progress: bool = False) -> DatasetClassifier:
    """Train :class:`SmallCNN` on ``train_ds`` (model-space inputs, so generated samples need no
    conversion), report test accuracy, and store the train-split feature statistics."""
    from tqdm.auto import tqdm

    device = torch.device(device)
    torch.manual_seed(seed)
    model = SmallCNN(int(train_ds.channels), int(train_ds.num_classes), width).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    n = len(train_ds)
    total = epochs * ((n + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, total))
    g = torch.Generator().manual_seed(seed)
    bar = tqdm(total=total, disable=not progress, desc=f"classifier {spec or train_ds.name}", unit="step")
    for _ in range(epochs):
        model.train()
        order = torch.randperm(n, generator=g).numpy()
        for x, y in _batches(train_ds, order, batch_size, g):
            loss = nn.functional.cross_entropy(model(x.to(device)), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    acc = float("nan")
    if test_ds is not None:
        _, logits, y = _embed_all(model, test_ds, np.arange(len(test_ds)), 512, device)
        acc = float((logits.argmax(1) == y).float().mean())
    ref_idx = np.random.default_rng(seed).permutation(n)[:max_ref]
    feats, _, _ = _embed_all(model, train_ds, np.sort(ref_idx), 512, device, seed)
    mu, sigma = feature_statistics(feats)
    spec = spec or getattr(train_ds, "name", "dataset")
    info = {"width": width, "epochs": epochs, "seed": seed, "lr": lr, "batch_size": batch_size,
            "n_ref": len(ref_idx), "fingerprint": _fingerprint(train_ds)}
    return DatasetClassifier(model.cpu(), spec, _metric_name(spec), acc, mu, sigma, info)


def _save_classifier(clf: DatasetClassifier, path: Path) -> None:
    state = {"format": CLASSIFIER_FORMAT, "dataset": clf.dataset, "name": clf.name,
             "in_channels": clf.model.body[0].in_channels, "num_classes": clf.model.head.out_features,
             "state_dict": clf.model.state_dict(), "test_accuracy": clf.test_accuracy,
             "ref_mu": torch.from_numpy(clf.ref_mu), "ref_sigma": torch.from_numpy(clf.ref_sigma), "info": clf.info,
             "torch_version": str(torch.__version__)}
    with _atomic_path(path) as tmp:
        torch.save(state, tmp)


def _load_classifier(path: Path) -> DatasetClassifier:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable cache file: say which and how to fix
        raise ValueError(f"classifier cache {path} is unreadable ({type(e).__name__}); delete it to retrain") from None
    if state.get("format") != CLASSIFIER_FORMAT:
        raise ValueError(f"classifier cache {path} has an old format; delete it to retrain")
    model = SmallCNN(state["in_channels"], state["num_classes"], state["info"]["width"])
    model.load_state_dict(state["state_dict"])
    return DatasetClassifier(model.eval(), state["dataset"], state["name"], float(state["test_accuracy"]),
                             state["ref_mu"].numpy(), state["ref_sigma"].numpy(), dict(state["info"]), path)


def get_classifier(spec: str, *, train_if_missing: bool = True, device: str | torch.device = "cpu",
                   progress: bool = False, epochs: int = 2, make_dataset_fn: Callable | None = None,
                   log: Callable[[str], None] | None = None) -> DatasetClassifier:
    """The cached classifier for dataset ``spec``; trained (once) and cached if missing or stale."""
    if make_dataset_fn is None:
        from .data import make_dataset as make_dataset_fn
    path = classifier_cache_path(spec)
    train_ds = make_dataset_fn(spec, split="train")
    if path.exists():
        clf = _load_classifier(path)
        if clf.info.get("fingerprint") == _fingerprint(train_ds) and clf.dataset == spec:
            return clf
        if log:
            log(f"classifier cache {path} does not match dataset {spec!r}; retraining")
    if not train_if_missing:
        raise ValueError(f"no cached classifier for {spec!r} at {path}; run once with training enabled")
    try:
        test_ds = make_dataset_fn(spec, split="test")
    except (FileNotFoundError, ValueError):
        test_ds = None
    if log:
        log(f"training the {spec} feature classifier once (cached at {path})")
    clf = train_classifier(train_ds, test_ds, spec=spec, epochs=epochs, device=device, progress=progress)
    _save_classifier(clf, path)
    clf.path = path
    return clf


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
# Evaluate a checkpoint; metrics table
# ------------------------------------------------------------------------------------------------


def checkpoint_keys(ck: Any) -> dict[str, Any]:
    """Join keys shared with probe tables: run (run folder name), checkpoint (absolute path),
    step, weights, ckpt_sha."""
    path = Path(ck.path).resolve()
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    return {"run": run_dir.name, "checkpoint": str(path), "step": ck.step, "weights": ck.weights,
            "ckpt_sha": ck.sha}


def _labels_policy(labels: Any) -> str:
    if labels is None:
        return "balanced"
    if isinstance(labels, str):
        return labels
    if isinstance(labels, (int, np.integer)):
        return f"class{int(labels)}"
    return "given"


def _reference_images(ds: Any, n: int, seed: int) -> torch.Tensor:
    idx = np.sort(np.random.default_rng(seed).permutation(len(ds))[:n])
    return torch.cat([x for x, _ in _batches(ds, idx, 512, torch.Generator().manual_seed(seed))])


def evaluate_checkpoint(ck: Any, *, n: int = 1000, method: str | None = None, steps: int = 50,
                        cfg_scale: float = 1.0, guidance_interval: tuple[float, float] = (0.0, 1.0),
                        legacy_cfg_channels: bool = False, labels: Any = None, seed: int = 0, batch_size: int = 64,
                        device: str | torch.device = "cpu", data: str | None = None,
                        inception_weights: str | os.PathLike | None = None, n_ref: int | None = None,
                        offline: bool = True, npz_path: str | os.PathLike | None = None,
                        make_dataset_fn: Callable | None = None, classifier: DatasetClassifier | None = None,
                        progress: bool = False, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Sample ``n`` images and score them; returns one metrics-table row (dict).

    Offline metrics (``fd_<data>``, ``cond_acc_<data>``) need the dataset; torch-fidelity metrics
    run only when ``inception_weights`` is given (checked before sampling).
    """
    family = ck.meta["family"]
    method = method or ("ddpm" if family == "dit" else "sde")
    if inception_weights is not None:
        check_inception_weights(inception_weights)
    spec = data or ck.meta.get("data")
    if spec is None and (offline or inception_weights is not None):
        raise ValueError("this checkpoint does not record its dataset: pass --data (e.g. fashion-mnist)")
    if make_dataset_fn is None and spec is not None:
        from .data import make_dataset as make_dataset_fn
    t0 = time.time()
    images = samplers.sample(ck, None, n=n, labels=labels, method=method, steps=steps, cfg_scale=cfg_scale,
                             guidance_interval=guidance_interval, legacy_cfg_channels=legacy_cfg_channels,
                             seed=seed, batch_size=batch_size, device=device, progress=progress)
    sample_seconds = time.time() - t0
    y = samplers.resolve_labels(labels, n, int(ck.meta.get("num_classes") or ck.model.y_embedder.num_classes), seed)
    row: dict[str, Any] = {
        **checkpoint_keys(ck), "family": family, "method": method, "steps": int(steps), "cfg_scale": float(cfg_scale),
        "guidance_low": float(guidance_interval[0]), "guidance_high": float(guidance_interval[1]),
        "legacy_cfg_channels": bool(legacy_cfg_channels), "labels": _labels_policy(labels), "n_samples": int(n),
        "seed": int(seed), "data": spec, "sample_seconds": round(sample_seconds, 3),
    }
    if npz_path is not None:
        save_npz(npz_path, to_uint8(images, ck.meta), y)
        row["npz"] = str(npz_path)
    if offline and spec is not None:
        clf = classifier or get_classifier(spec, device=device, progress=progress, make_dataset_fn=make_dataset_fn,
                                           log=log)
        row.update(classifier_metrics(clf, images, y))
        row["classifier_test_acc"] = clf.test_accuracy
    if inception_weights is not None:
        ref_ds = make_dataset_fn(spec, split="train")
        ref = to_uint8(_reference_images(ref_ds, n_ref or n, seed), ck.meta)
        row.update(inception_metrics(to_uint8(images, ck.meta), ref, inception_weights, device=device,
                                     verbose=progress))
        row["n_ref"] = len(ref)
        row["evaluator"] = "torch-fidelity inception-v3-compat"
    row["evaluated_at"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return row


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v)
    return str(v)


def append_metrics_row(csv_path: str | os.PathLike, row: dict[str, Any],
                       key: Iterable[str] = KEY_COLUMNS) -> Path:
    """Add ``row`` to a CSV table, replacing any row with the same key; written atomically."""
    path = Path(csv_path)
    key = [k for k in key if k in row]
    rows: list[dict[str, str]] = []
    columns: list[str] = []
    if path.exists():
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            columns = list(reader.fieldnames or [])
            rows = list(reader)
    new = {k: _cell(v) for k, v in row.items()}
    rows = [r for r in rows if any(r.get(k, "") != new[k] for k in key)] if key else rows
    rows.append(new)
    columns += [c for c in new if c not in columns]
    with _atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, restval="")
        w.writeheader()
        w.writerows(rows)
    return path


# ------------------------------------------------------------------------------------------------
# CLI-facing entry points (the typer commands only parse flags and call these)
# ------------------------------------------------------------------------------------------------


def parse_labels(text: str | None) -> Any:
    """CLI ``--labels``: balanced (default) | random | null | CLASS | comma-separated list."""
    if text is None or text == "balanced":
        return None
    if text in ("random", "null"):
        return text
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--labels must be balanced, random, null, a class index or a comma-separated list, "
                         f"got {text!r}") from None
    return values[0] if len(values) == 1 else values


def resolve_device(device: str) -> str:
    """``auto`` -> cuda when available, else cpu."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device} requested but no CUDA device is available; use --device cpu")
    return device


def _load(ckpt_path: str | os.PathLike, weights: str, family: str | None, trust: bool) -> Any:
    from .checkpoint import load_checkpoint

    return load_checkpoint(ckpt_path, weights=weights, family=family, trust=trust)


def run_sample(ckpt_path: str | os.PathLike, out: str | os.PathLike, *, n: int = 64,
               npz: str | os.PathLike | None = None, weights: str = "ema", family: str | None = None,
               trust: bool = False, method: str | None = None, steps: int = 50, cfg_scale: float = 1.0,
               guidance_interval: tuple[float, float] = (0.0, 1.0), legacy_cfg_channels: bool = False,
               labels: Any = None, seed: int = 0, batch_size: int = 64, device: str = "cpu",
               progress: bool = True) -> dict[str, Any]:
    """``probe sample``: a PNG grid (and optionally an ADM ``.npz``) from a checkpoint."""
    ck = _load(ckpt_path, weights, family, trust)
    method = method or ("ddpm" if ck.meta["family"] == "dit" else "sde")
    samplers.validate_options(ck.meta["family"], method, steps, cfg_scale, tuple(guidance_interval),
                              int(ck.meta.get("num_timesteps") or 1000))
    require_pixels(ck.meta)
    images = samplers.sample(ck, None, n=n, labels=labels, method=method, steps=steps, cfg_scale=cfg_scale,
                             guidance_interval=guidance_interval, legacy_cfg_channels=legacy_cfg_channels, seed=seed,
                             batch_size=batch_size, device=device, progress=progress)
    u8 = to_uint8(images, ck.meta)
    y = samplers.resolve_labels(labels, n, int(ck.meta.get("num_classes") or 1), seed)
    result = {"grid": str(save_grid(out, u8)), "n": n, "method": method, "steps": steps}
    if npz is not None:
        result["npz"] = str(save_npz(npz, u8, y))
    return result


def run_eval(ckpt_path: str | os.PathLike, metrics_csv: str | os.PathLike | None = None, *, weights: str = "ema",
             family: str | None = None, trust: bool = False, **kwargs: Any) -> dict[str, Any]:
    """``probe eval``: evaluate one checkpoint and append the row to ``metrics_csv`` (default:
    ``<run>/eval_metrics.csv`` beside the run's ``checkpoints/`` folder)."""
    if kwargs.get("inception_weights") is not None:
        check_inception_weights(kwargs["inception_weights"])
    ck = _load(ckpt_path, weights, family, trust)
    row = evaluate_checkpoint(ck, **kwargs)
    if metrics_csv is None:
        p = Path(ckpt_path).resolve()
        metrics_csv = (p.parent.parent if p.parent.name == "checkpoints" else p.parent) / "eval_metrics.csv"
    append_metrics_row(metrics_csv, row)
    row["metrics_csv"] = str(metrics_csv)
    return row
