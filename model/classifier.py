"""The offline metric's feature space: a small CNN trained once per dataset and cached.

``fd_<dataset>`` / ``cond_acc_<dataset>`` are computed in its pooled features. They are **not**
FID: another feature space, comparable only with themselves, but they need no download.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from repdyn.datasets.sources import make_dataset, native_inputs
from repdyn.core.files import save_torch
from repdyn.model.frechet import feature_statistics

__all__ = ["SmallCNN", "DatasetClassifier", "cache_root", "metric_name", "classifier_cache_path", "model_batches",
           "train_classifier", "get_classifier", "optional_test_split", "fit_cross_entropy",
           "dataset_fingerprint",
           "CLASSIFIER_FORMAT"]

CLASSIFIER_FORMAT = 1


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


def metric_name(spec: str) -> str:
    """``fashion-mnist`` -> itself; ``folder:/a/b`` -> ``folder-b``; safe for file and column names."""
    if ":" not in spec:
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", spec)
    kind, rest = spec.split(":", 1)
    return f"{kind}-{re.sub(r'[^A-Za-z0-9_.-]+', '-', Path(rest).name or 'root')}"


def classifier_cache_path(spec: str, inputs: dict[str, int] | None = None) -> Path:
    """``<cache>/classifiers/<dataset>.pt``; path-based specs also get a short hash of the path, and
    data converted for a model (``inputs``: its channels / image size, when not the spec's own) a
    suffix such as ``-1ch`` or ``-64px``, so a grayscale and an RGB model of one folder keep one
    classifier each instead of retraining it in turn."""
    name = metric_name(spec)
    if ":" in spec:
        name += "-" + hashlib.sha256(spec.encode()).hexdigest()[:8]
    native = native_inputs(spec)
    if inputs and native:
        if int(inputs["channels"]) != native["channels"]:
            name += f"-{int(inputs['channels'])}ch"
        if int(inputs["image_size"]) != native["image_size"]:
            name += f"-{int(inputs['image_size'])}px"
    return cache_root() / "classifiers" / f"{name}.pt"


def model_batches(ds: Any, indices: np.ndarray, batch_size: int, generator: torch.Generator | None = None):
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


def dataset_fingerprint(ds: Any) -> dict:
    """What a cached dataset network was trained on (size, classes, channels, resolution): a cache
    entry for another variant of the data is retrained, not reused."""
    return {"n": len(ds), "num_classes": int(ds.num_classes), "channels": int(ds.channels),
            "image_size": int(ds.image_size)}


@torch.no_grad()
def _embed_all(model: SmallCNN, ds: Any, indices: np.ndarray, batch_size: int, device: torch.device,
               seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features, logits and labels of ``ds[indices]``."""
    model.eval()
    g = torch.Generator().manual_seed(seed)
    feats, logits, labels = [], [], []
    for x, y in model_batches(ds, indices, batch_size, g):
        f = model.embed(x.to(device))
        feats.append(f.cpu())
        logits.append(model.head(f).cpu())
        labels.append(y)
    return torch.cat(feats), torch.cat(logits), torch.cat(labels)


def fit_cross_entropy(model: nn.Module, epoch_batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]], *,
                      epochs: int, steps_per_epoch: int, lr: float, weight_decay: float,
                      device: torch.device, desc: str, progress: bool = False) -> None:
    """Supervised training of a small dataset network (the classifier, the embedded encoder): AdamW
    with a one-cycle lr over ``epochs`` passes of ``epoch_batches()`` (called once per epoch, so each
    caller keeps its own data order and random stream); leaves the model in eval mode."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, total))
    bar = tqdm(total=total, disable=not progress, desc=desc, unit="step")
    for _ in range(epochs):
        model.train()
        for x, y in epoch_batches():
            loss = nn.functional.cross_entropy(model(x.to(device)), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()


def train_classifier(train_ds: Any, test_ds: Any | None = None, *, spec: str | None = None, epochs: int = 2,
                     batch_size: int = 128, lr: float = 2e-3, width: int = 16, seed: int = 0,
                     device: str | torch.device = "cpu", max_ref: int = 60000,
                     progress: bool = False) -> DatasetClassifier:
    """Train :class:`SmallCNN` on ``train_ds`` (model-space inputs, so generated samples need no
    conversion), report test accuracy, and store the train-split feature statistics."""
    device = torch.device(device)
    torch.manual_seed(seed)
    model = SmallCNN(int(train_ds.channels), int(train_ds.num_classes), width).to(device)
    n = len(train_ds)
    g = torch.Generator().manual_seed(seed)
    fit_cross_entropy(model, lambda: model_batches(train_ds, torch.randperm(n, generator=g).numpy(), batch_size, g),
                      epochs=epochs, steps_per_epoch=(n + batch_size - 1) // batch_size, lr=lr, weight_decay=1e-4,
                      device=device, desc=f"classifier {spec or train_ds.name}", progress=progress)
    acc = float("nan")
    if test_ds is not None:
        _, logits, y = _embed_all(model, test_ds, np.arange(len(test_ds)), 512, device)
        acc = float((logits.argmax(1) == y).float().mean())
    ref_idx = np.random.default_rng(seed).permutation(n)[:max_ref]
    feats, _, _ = _embed_all(model, train_ds, np.sort(ref_idx), 512, device, seed)
    mu, sigma = feature_statistics(feats)
    spec = spec or getattr(train_ds, "name", "dataset")
    info = {"width": width, "epochs": epochs, "seed": seed, "lr": lr, "batch_size": batch_size,
            "n_ref": len(ref_idx), "fingerprint": dataset_fingerprint(train_ds)}
    return DatasetClassifier(model.cpu(), spec, metric_name(spec), acc, mu, sigma, info)


def _save_classifier(clf: DatasetClassifier, path: Path) -> None:
    state = {"format": CLASSIFIER_FORMAT, "dataset": clf.dataset, "name": clf.name,
             "in_channels": clf.model.body[0].in_channels, "num_classes": clf.model.head.out_features,
             "state_dict": clf.model.state_dict(), "test_accuracy": clf.test_accuracy,
             "ref_mu": torch.from_numpy(clf.ref_mu), "ref_sigma": torch.from_numpy(clf.ref_sigma), "info": clf.info,
             "torch_version": str(torch.__version__)}
    save_torch(state, path)


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


def optional_test_split(make_dataset_fn: Callable, spec: str) -> Any:
    """The dataset's test split, or None where it has none (a cached network then reports no test
    accuracy instead of failing)."""
    try:
        return make_dataset_fn(spec, split="test")
    except (FileNotFoundError, ValueError):
        return None


def get_classifier(spec: str, *, train_if_missing: bool = True, device: str | torch.device = "cpu",
                   progress: bool = False, epochs: int = 2, make_dataset_fn: Callable | None = None,
                   log: Callable[[str], None] | None = None) -> DatasetClassifier:
    """The cached classifier for dataset ``spec``; trained (once) and cached if missing or stale."""
    make_dataset_fn = make_dataset_fn or make_dataset
    train_ds = make_dataset_fn(spec, split="train")
    fingerprint = dataset_fingerprint(train_ds)
    path = classifier_cache_path(spec, fingerprint)
    if path.exists():
        clf = _load_classifier(path)
        if clf.info.get("fingerprint") == fingerprint and clf.dataset == spec:
            return clf
        if log:
            log(f"classifier cache {path} does not match dataset {spec!r}; retraining")
    if not train_if_missing:
        raise ValueError(f"no cached classifier for {spec!r} at {path}; run once with training enabled")
    if log:
        log(f"training the {spec} feature classifier once (cached at {path})")
    clf = train_classifier(train_ds, optional_test_split(make_dataset_fn, spec), spec=spec, epochs=epochs,
                           device=device, progress=progress)
    _save_classifier(clf, path)
    clf.path = path
    return clf
