"""Evaluate a checkpoint: sample, score (offline classifier metrics, Inception metrics), and keep
one row per (checkpoint, sampler settings) in a metrics table.

Nothing here downloads anything. Without the Inception file the offline metrics still run; they
are reported as ``fd_<dataset>`` / ``cond_acc_<dataset>`` and are **not** FID.
"""

from __future__ import annotations

import csv
import datetime as _dt
import functools
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from repdyn.model import samplers
from repdyn.datasets.sources import IMAGE_EXTS, make_dataset
from repdyn.model.classifier import DatasetClassifier, get_classifier, model_batches
from repdyn.evaluation.metrics import classifier_metrics
from repdyn.core.files import atomic_path, exclusive_lock
from repdyn.evaluation.images import as_saved, save_npz, to_uint8
from repdyn.evaluation.metrics import adm_metrics, adm_reference_stats, check_inception_weights, inception_metrics
from repdyn.evaluation.vae import Vae, center_crop_arr, check_vae, to_pixels

__all__ = ["KEY_COLUMNS", "checkpoint_keys", "evaluate_checkpoint", "append_metrics_row", "parse_labels",
           "load_reference"]

# A metrics row is identified by these; re-evaluating the same settings replaces the row.
KEY_COLUMNS = ("ckpt_sha", "weights", "method", "steps", "cfg_scale", "guidance_low", "guidance_high",
               "legacy_cfg_channels", "labels", "n_samples", "seed")


def checkpoint_keys(ck: Any) -> dict[str, Any]:
    """Join keys shared with probe tables: run (run folder name), checkpoint (absolute path),
    step, weights, ckpt_sha."""
    return {"run": ck.run_name, "checkpoint": str(Path(ck.path).resolve()), "step": ck.step, "weights": ck.weights,
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
    return torch.cat([x for x, _ in model_batches(ds, idx, 512, torch.Generator().manual_seed(seed))])


def evaluate_checkpoint(ck: Any, *, n: int = 1000, method: str | None = None, steps: int = 50,
                        cfg_scale: float = 1.0, guidance_interval: tuple[float, float] = (0.0, 1.0),
                        legacy_cfg_channels: bool = False, labels: Any = None, seed: int = 0, batch_size: int = 64,
                        device: str | torch.device = "cpu", data: str | None = None,
                        inception_weights: str | os.PathLike | None = None, n_ref: int | None = None,
                        offline: bool = True, npz_path: str | os.PathLike | None = None,
                        make_dataset_fn: Callable | None = None, classifier: DatasetClassifier | None = None,
                        progress: bool = False, log: Callable[[str], None] | None = None, vae: Vae | None = None,
                        reference: str | os.PathLike | None = None,
                        samples: torch.Tensor | None = None) -> dict[str, Any]:
    """Sample ``n`` images and score them; returns one metrics-table row (dict).

    Offline metrics (``fd_<data>``, ``cond_acc_<data>``) need the dataset and are computed in the
    model's space (latents for latent models); torch-fidelity metrics run only when
    ``inception_weights`` is given (checked before sampling), on pixels: latent models are decoded
    by ``vae``. ``reference``: an ADM evaluator ``.npz`` (its ``arr_0`` reference batch) or an
    image folder; default for pixel models: the dataset's train split. ``samples``: already drawn
    samples (e.g. gathered from torchrun ranks), in model space, instead of sampling here.
    """
    family = ck.meta["family"]
    method = method or ("ddpm" if family == "dit" else "sde")
    if inception_weights is not None:
        check_inception_weights(inception_weights)
    spec = data or ck.meta.get("data")
    if spec is None and (offline or inception_weights is not None):
        raise ValueError("this checkpoint does not record its dataset: pass --data (e.g. fashion-mnist)")
    # the reference data in the model's channels and size (a grayscale folder for a one-channel model)
    make_dataset_fn = make_dataset_fn or functools.partial(make_dataset, **ck.dataset_inputs())
    latent = ck.meta.get("latent_scale") is not None
    if latent and (npz_path is not None or inception_weights is not None):
        check_vae(ck.meta, vae)
    if latent and inception_weights is not None and reference is None:
        raise ValueError("Inception metrics of a latent model need pixels to compare with: pass --ref (an ADM "
                         "reference .npz such as VIRTUAL_imagenet256_labeled.npz, or an image folder)")
    ref_images, ref_stats = (load_reference(reference) if reference is not None and inception_weights is not None
                             else (None, {}))
    t0 = time.time()
    if samples is None:
        samples = samplers.sample(ck, None, n=n, labels=labels, method=method, steps=steps, cfg_scale=cfg_scale,
                                  guidance_interval=guidance_interval, legacy_cfg_channels=legacy_cfg_channels,
                                  seed=seed, batch_size=batch_size, device=device, progress=progress)
    images = as_saved(samples, ck.meta)  # score what the images are: clamped and quantised, as written
    pixels = to_pixels(images, ck.meta, vae) if latent and (npz_path is not None or inception_weights is not None) else images
    sample_seconds = time.time() - t0
    y = samplers.resolve_labels(labels, n, int(ck.meta.get("num_classes") or ck.model.y_embedder.num_classes), seed)
    row: dict[str, Any] = {
        **checkpoint_keys(ck), "family": family, "method": method, "steps": int(steps), "cfg_scale": float(cfg_scale),
        "guidance_low": float(guidance_interval[0]), "guidance_high": float(guidance_interval[1]),
        "legacy_cfg_channels": bool(legacy_cfg_channels), "labels": _labels_policy(labels), "n_samples": int(n),
        "seed": int(seed), "data": spec, "sample_seconds": round(sample_seconds, 3),
    }
    if npz_path is not None:
        save_npz(npz_path, to_uint8(pixels), y)
        row["npz"] = str(npz_path)
    if offline and spec is not None:
        clf = classifier or get_classifier(spec, device=device, progress=progress, make_dataset_fn=make_dataset_fn,
                                           log=log)
        row.update(classifier_metrics(clf, images, y))
        row["classifier_test_acc"] = clf.test_accuracy
    if inception_weights is not None:
        if ref_images is None:
            ref_images = to_uint8(_reference_images(make_dataset_fn(spec, split="train"), n_ref or n, seed), ck.meta)
        elif n_ref is not None:
            ref_images = ref_images[:n_ref]
        generated = to_uint8(pixels)
        row.update(inception_metrics(generated, ref_images, inception_weights, device=device, verbose=progress))
        # the ADM evaluator's numbers: FID against the reference statistics and sFID (spatial features)
        stats = ref_stats or adm_reference_stats(ref_images, inception_weights, device=device)
        row.update(adm_metrics(generated, inception_weights, stats, device=device))
        row["reference_stats"] = "npz mu/sigma/mu_s/sigma_s" if ref_stats else "computed from the reference images"
        row["n_ref"] = len(ref_images)
        row["reference"] = str(reference) if reference is not None else f"{spec} train split"
        row["evaluator"] = "torch-fidelity inception-v3-compat"
    if latent and vae is not None:
        row["vae"] = str(vae.path)
    row["evaluated_at"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return row


def load_reference(path: str | os.PathLike, resolution: int | None = None) -> tuple[torch.Tensor, dict]:
    """Reference images as uint8 (N, 3, H, W) and the ADM statistics found beside them: an ADM
    evaluator ``.npz`` (``arr_0`` uint8 NHWC, the reference batch; ``mu`` / ``sigma`` / ``mu_s`` /
    ``sigma_s`` when present) or an image folder (ADM centre crop to ``resolution``, default: the
    first image's short side; no statistics)."""
    from PIL import Image

    path = Path(path)
    if path.suffix == ".npz":
        if not path.is_file():
            raise FileNotFoundError(f"reference {path} does not exist")
        with np.load(path) as z:
            if "arr_0" not in z.files:
                raise ValueError(f"reference {path} has no ADM reference batch: expected arr_0 (uint8 N x H x W x 3) "
                                 f"and optionally mu, sigma, mu_s, sigma_s; found {', '.join(z.files) or 'nothing'}")
            arr = z["arr_0"]
            stats = {k: z[k] for k in ("mu", "sigma", "mu_s", "sigma_s") if k in z.files}
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
            raise ValueError(f"reference {path}: arr_0 must be uint8 (N, H, W, 3), got {arr.dtype} {arr.shape}")
        return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous(), stats
    if not path.is_dir():
        raise FileNotFoundError(f"reference {path} is neither an ADM .npz nor an image folder")
    files = sorted(f for f in path.rglob("*") if f.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise ValueError(f"no images under reference folder {path}")
    first = Image.open(files[0])
    size = resolution or min(first.size)
    return torch.from_numpy(np.stack([center_crop_arr(Image.open(f), size) for f in files])).permute(0, 3, 1, 2), {}


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
    new = {k: _cell(v) for k, v in row.items()}
    with exclusive_lock(path):  # concurrent writers (e.g. `probe demo --only` workers) add rows, none lost
        rows: list[dict[str, str]] = []
        columns: list[str] = []
        if path.exists():
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                columns = list(reader.fieldnames or [])
                rows = list(reader)
        rows = [r for r in rows if any(r.get(k, "") != new[k] for k in key)] if key else rows
        rows.append(new)
        columns += [c for c in new if c not in columns]
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=columns, restval="")
            w.writeheader()
            w.writerows(rows)
    return path


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
