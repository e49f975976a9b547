"""External encoders for alignment: pooled features (N, D) and patch tokens (N, T, D) of dataset
images, from local files only (nothing is ever downloaded).

``--encoder SPEC``:

* ``embedded`` (default): :class:`TinyViT`, a small ViT (patch 4, width 64, depth 4, 4 heads) trained
  once per dataset with a classification head and cached under ``<cache>/encoders/`` (``$REPDYN_CACHE``
  or ``~/.cache/repdyn``). Its patch tokens fall on the diffusion models' 8 x 8 token grid for 32 x 32
  inputs. It is deliberately *not* the classifier behind ``fd_<data>`` (:mod:`repdyn.model.classifier`:
  a CNN, seed 0): another architecture, another seed (1) and another training subset, so "alignment
  tracks fd" cannot hold by construction. Training is short (1 epoch over at most 20 000 training
  images, about a minute on one CPU core; 75% on Fashion-MNIST); its test accuracy is recorded
  with it. Inputs are the model-space images ([-1, 1]) the diffusion model sees. Pooled = the CLS token after the final
  norm; tokens = the patch tokens after the final norm.
* ``dinov2-vits14:PATH`` (also ``vitb14``, ``vitl14``, ``vitg14`` and the ``-reg`` variants with
  4 registers): DINOv2 through timm with the weights in the local file PATH: either the official
  ``dinov2_vits14_pretrain.pth`` (https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth)
  or timm's ``model.safetensors`` of ``timm/vit_small_patch14_dinov2.lvd142m`` (huggingface.co);
  timm converts the official layout and resamples the position embedding to the 16 x 16 grid.
  Preprocessing as REPA (``preprocess_raw_image``): images to [0, 1], grayscale repeated to 3
  channels, ImageNet mean/std normalisation, then bicubic resize to 224 x 224 (16 x 16 patches of 14
  pixels), or to ``14 * token_grid`` when the caller asks for a token grid (REPA training: the
  patch tokens fall on the diffusion model's grid, as REPA's ``224 * (resolution // 256)``).
  Pooled = the CLS token (``x_norm_clstoken``), tokens = the 256 normalised patch tokens
  (``x_norm_patchtokens``, what REPA aligns to); register tokens are dropped. REPA's
  ``--enc-type`` spelling ``dinov2-vit-b:PATH`` (``-s``, ``-l``, ``-g``) names the same models.
* ``timm:NAME:PATH``: any timm model with local weights, preprocessed with the model's own
  ``pretrained_cfg`` (input size, mean, std; bicubic resize). Pooled = ``forward_head(...,
  pre_logits=True)``; tokens = the non-prefix tokens of ``forward_features`` (ViTs) or the flattened
  final feature map (CNNs).
* ``features:PATH``: precomputed features of the analysed split's images: ``.npy`` (one array),
  ``.npz`` or ``.safetensors`` (``features`` array, or the only array, plus an optional ``indices``
  array). Pooled (N, D) or tokens (N, T, D; pooled = their mean). Row r holds image ``indices[r]``,
  or image r when there is no ``indices`` array.

Image encoders need pixel images: a ``latents:PATH`` dataset can only be aligned with
``features:PATH``.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from repdyn.core.files import save_torch
from repdyn.datasets.sources import make_dataset
from repdyn.model.torch_file import file_sha
from repdyn.model.classifier import (cache_root, dataset_fingerprint, fit_cross_entropy, metric_name, model_batches,
                                     optional_test_split)

__all__ = ["Encoder", "TinyViT", "EmbeddedEncoder", "TimmEncoder", "PrecomputedFeatures", "EncodedFeatures",
           "DINOV2_MODELS", "REPA_ENCODER_NAMES", "ENCODER_FORMAT", "parse_encoder", "load_encoder",
           "get_embedded_encoder", "train_embedded", "embedded_cache_path", "load_feature_file", "IMAGENET_MEAN",
           "IMAGENET_STD"]

ENCODER_FORMAT = 1
EMBEDDED_SEED = 1  # the fd classifier uses seed 0
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DINOV2_MODELS = {
    "dinov2-vits14": "vit_small_patch14_dinov2", "dinov2-vitb14": "vit_base_patch14_dinov2",
    "dinov2-vitl14": "vit_large_patch14_dinov2", "dinov2-vitg14": "vit_giant_patch14_dinov2",
    "dinov2-vits14-reg": "vit_small_patch14_reg4_dinov2", "dinov2-vitb14-reg": "vit_base_patch14_reg4_dinov2",
    "dinov2-vitl14-reg": "vit_large_patch14_reg4_dinov2", "dinov2-vitg14-reg": "vit_giant_patch14_reg4_dinov2",
}
EMBEDDED_N_TRAIN = 20000  # training images of the embedded encoder ("embedded:N" asks for another count)
# REPA's --enc-type names (encoder-architecture-size) of the same models.
REPA_ENCODER_NAMES = {f"dinov2-vit-{s}": f"dinov2-vit{s}14" for s in "sblg"}
SPECS = "embedded[:N] | dinov2-vits14:PATH (vitb14, vitl14, vitg14, -reg) | timm:NAME:PATH | features:PATH"


@dataclass
class EncodedFeatures:
    """An encoder's features of ``indices`` (rows in that order): pooled (N, D), tokens (N, T, D) or None."""

    pooled: np.ndarray
    tokens: np.ndarray | None
    indices: np.ndarray


class Encoder:
    """Base: ``encode(x)`` maps model-space images (B, C, H, W) in [-1, 1] to (pooled, tokens)."""

    spec: str = ""
    name: str = ""  # safe for file and column names
    sha: str = ""  # content identity (weights or feature file), part of every cache key
    info: dict

    def identity(self) -> dict[str, Any]:
        return {"encoder": self.name, "encoder_sha": self.sha}

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def features(self, dataset: Any, indices: np.ndarray, *, batch_size: int = 64, device: str | torch.device = "cpu",
                 tokens: bool = True, progress: bool = False) -> EncodedFeatures:
        """Features of ``dataset`` rows ``indices`` (the images ``probe.grid`` analyses)."""
        if getattr(dataset, "latent_scale", None) is not None:
            raise ValueError(f"encoder {self.spec!r} needs pixel images, but the dataset holds VAE latents; align "
                             "with precomputed encoder features instead (--encoder features:PATH)")
        idx = np.asarray(indices, dtype=np.int64)
        device = torch.device(device)
        self.to(device)
        pooled, toks = [], []
        bar = tqdm(total=len(idx), disable=not progress, desc=f"encoder {self.name}", unit="img")
        with torch.no_grad():
            for x, _ in model_batches(dataset, idx, batch_size):
                p, t = self.encode(x.to(device))
                pooled.append(p.float().cpu().numpy())
                if tokens:
                    toks.append(t.float().cpu().numpy())
                bar.update(len(x))
        bar.close()
        return EncodedFeatures(np.concatenate(pooled), np.concatenate(toks) if tokens else None, idx)

    def to(self, device: torch.device) -> "Encoder":
        return self


# ----------------------------------------------------------------------------------------------
# embedded: a small ViT trained once per dataset
# ----------------------------------------------------------------------------------------------


class TinyViT(nn.Module):
    """Patch embedding -> CLS + learned positions -> pre-norm transformer -> norm; head on CLS."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int = 32, patch: int = 4, dim: int = 64,
                 depth: int = 4, heads: int = 4, mlp_ratio: int = 2):
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image size {image_size} is not a multiple of the patch size {patch}")
        self.grid = image_size // patch
        self.patch = nn.Conv2d(in_channels, dim, patch, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 1 + self.grid ** 2, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, dim * mlp_ratio, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1 + grid^2, dim): CLS then the patch tokens (row-major), after the final norm."""
        z = self.patch(x).flatten(2).transpose(1, 2)
        z = torch.cat([self.cls.expand(len(z), -1, -1), z], 1) + self.pos
        return self.norm(self.blocks(z))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.tokens(x)[:, 0])


class EmbeddedEncoder(Encoder):
    def __init__(self, model: TinyViT, dataset: str, info: dict, sha: str, path: Path | None = None):
        self.model, self.dataset, self.info, self.sha, self.path = model.eval(), dataset, info, sha, path
        self.spec = "embedded"
        self.name = f"embedded-vit-{metric_name(dataset)}"
        self.test_accuracy = float(info.get("test_accuracy", float("nan")))

    def to(self, device: torch.device) -> "EmbeddedEncoder":
        self.model.to(device)
        return self

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.model.tokens(x)
        return z[:, 0], z[:, 1:]


def embedded_cache_path(data: str, max_train: int = EMBEDDED_N_TRAIN) -> Path:
    """``<cache>/encoders/embedded-vit-<dataset>.pt`` (path-based datasets add a hash of the path; an
    encoder trained on another number of images than :data:`EMBEDDED_N_TRAIN` adds ``-n<N>``, so a
    quick one never stands in for the default)."""
    name = metric_name(data)
    if ":" in data:
        name += "-" + hashlib.sha256(data.encode()).hexdigest()[:8]
    if int(max_train) != EMBEDDED_N_TRAIN:
        name += f"-n{int(max_train)}"
    return cache_root() / "encoders" / f"embedded-vit-{name}.pt"


def train_embedded(train_ds: Any, test_ds: Any | None = None, *, epochs: int = 1, max_train: int = EMBEDDED_N_TRAIN,
                   batch_size: int = 64, lr: float = 4e-3, seed: int = EMBEDDED_SEED,
                   device: str | torch.device = "cpu", progress: bool = False) -> tuple[TinyViT, dict]:
    """Train :class:`TinyViT` on (at most ``max_train`` images of) ``train_ds``; returns the model and
    its record (settings, dataset fingerprint, test accuracy on ``test_ds``)."""
    device = torch.device(device)
    torch.manual_seed(seed)
    model = TinyViT(int(train_ds.channels), int(train_ds.num_classes), int(train_ds.image_size)).to(device)
    rng = np.random.default_rng(seed)
    subset = np.sort(rng.permutation(len(train_ds))[:max_train])
    fit_cross_entropy(model, lambda: model_batches(train_ds, rng.permutation(subset), batch_size), epochs=epochs,
                      steps_per_epoch=math.ceil(len(subset) / batch_size), lr=lr, weight_decay=0.05, device=device,
                      desc=f"embedded ViT {getattr(train_ds, 'name', '')}", progress=progress)
    acc = float("nan")
    if test_ds is not None:
        hits = 0
        with torch.no_grad():
            for x, y in model_batches(test_ds, np.arange(len(test_ds)), 512):
                hits += int((model(x.to(device)).argmax(1).cpu() == y).sum())
        acc = hits / len(test_ds)
    info = {"arch": "TinyViT", "patch": 4, "dim": 64, "depth": 4, "heads": 4, "epochs": epochs, "n_train": len(subset),
            "seed": seed, "lr": lr, "batch_size": batch_size, "test_accuracy": acc,
            "fingerprint": dataset_fingerprint(train_ds)}
    return model.cpu(), info


def _state_sha(state_dict: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(state_dict):
        h.update(k.encode())
        h.update(state_dict[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def get_embedded_encoder(data: str, *, train_if_missing: bool = True, device: str | torch.device = "cpu",
                         progress: bool = False, epochs: int = 1, max_train: int = EMBEDDED_N_TRAIN,
                         make_dataset_fn: Callable | None = None,
                         log: Callable[[str], None] | None = None) -> EmbeddedEncoder:
    """The cached embedded ViT of dataset ``data``; trained once (and cached) when missing or stale.
    ``epochs`` / ``max_train`` only apply when it is trained."""
    make_dataset_fn = make_dataset_fn or make_dataset
    path = embedded_cache_path(data, max_train)
    train_ds = make_dataset_fn(data, split="train")
    if path.exists():
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable cache file: say which and how to fix
            raise ValueError(f"encoder cache {path} is unreadable ({type(e).__name__}); delete it to retrain") from None
        info = dict(state.get("info", {}))
        if (state.get("format") == ENCODER_FORMAT and state.get("dataset") == data
                and info.get("fingerprint") == dataset_fingerprint(train_ds)):
            model = TinyViT(state["in_channels"], state["num_classes"], state["image_size"])
            model.load_state_dict(state["state_dict"])
            return EmbeddedEncoder(model, data, info, state["sha"], path)
        if log:
            log(f"encoder cache {path} does not match dataset {data!r}; retraining")
    if not train_if_missing:
        raise ValueError(f"no cached embedded encoder for {data!r} at {path}; run once with training enabled")
    if getattr(train_ds, "latent_scale", None) is not None:
        raise ValueError(f"the embedded encoder needs pixel images, but {data!r} holds VAE latents; pass "
                         "--encoder features:PATH or dinov2-vits14:PATH with images")
    if log:
        log(f"training the embedded ViT encoder of {data} once (cached at {path})")
    model, info = train_embedded(train_ds, optional_test_split(make_dataset_fn, data), epochs=epochs,
                                 max_train=max_train, device=device,
                                 progress=progress)
    sha = _state_sha(model.state_dict())
    save_torch({"format": ENCODER_FORMAT, "dataset": data, "in_channels": int(train_ds.channels),
                "num_classes": int(train_ds.num_classes), "image_size": int(train_ds.image_size),
                "state_dict": model.state_dict(), "info": info, "sha": sha,
                "torch_version": str(torch.__version__)}, path)
    return EmbeddedEncoder(model, data, info, sha, path)


# ----------------------------------------------------------------------------------------------
# timm models with local weights (DINOv2 and any other)
# ----------------------------------------------------------------------------------------------


def _timm():
    try:
        import timm
    except ImportError:
        raise ValueError("this encoder needs timm: pip install 'timm>=0.9' (or the project's 'encoders' extra)") from None
    return timm


def _weights_file(path: str, how: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"encoder weights {p} not found (nothing is downloaded); {how}")
    return p


class TimmEncoder(Encoder):
    """A timm model with local weights; see the module docstring for the preprocessing."""

    def __init__(self, spec: str, arch: str, path: str, *, img_size: int | None = None,
                 mean: tuple = IMAGENET_MEAN, std: tuple = IMAGENET_STD, how: str = ""):
        timm = _timm()
        p = _weights_file(path, how or f"put the weights of timm model {arch!r} there (.safetensors, .pth or .bin)")
        kw: dict[str, Any] = {"num_classes": 0}
        if img_size is not None:
            kw["img_size"] = img_size
        try:
            self.model = timm.create_model(arch, pretrained=True, pretrained_cfg_overlay={"file": str(p)}, **kw).eval()
        except RuntimeError as e:  # state-dict mismatches: one line
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            first = " ".join(lines[:2])[:300] if lines else type(e).__name__
            raise ValueError(f"encoder weights {p} do not fit timm model {arch!r}: {first}") from None
        except Exception as e:  # noqa: BLE001 - unknown model names, unreadable files
            raise ValueError(f"could not load timm model {arch!r} from {p}: {type(e).__name__}: {e}") from None
        cfg = dict(getattr(self.model, "pretrained_cfg", {}) or {})
        self.size = int(img_size or cfg.get("input_size", (3, 224, 224))[-1])
        self.mean = torch.tensor(cfg.get("mean", mean) if img_size is None else mean).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg.get("std", std) if img_size is None else std).view(1, 3, 1, 1)
        self.spec, self.arch, self.path = spec, arch, p
        self.name = metric_name(spec.split(":", 1)[0] if spec.startswith("dinov2") else f"timm-{arch}")
        self.sha = file_sha(p)
        self.prefix = int(getattr(self.model, "num_prefix_tokens", 0))
        self.info = {"arch": arch, "weights": str(p), "image_size": self.size}

    def identity(self) -> dict[str, Any]:
        return {"encoder": self.name, "encoder_arch": self.arch, "encoder_sha": self.sha}

    def to(self, device: torch.device) -> "TimmEncoder":
        self.model.to(device)
        self.mean, self.std = self.mean.to(device), self.std.to(device)
        return self

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Model-space [-1, 1] -> [0, 1] -> 3 channels -> mean/std -> bicubic resize (REPA's order)."""
        x = (x.float() + 1) / 2
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        elif x.shape[1] != 3:
            raise ValueError(f"encoder {self.spec!r} takes 1- or 3-channel images, got {x.shape[1]} channels")
        x = (x - self.mean) / self.std
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = nn.functional.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False)
        return x

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.model.forward_features(self.preprocess(x))
        pooled = self.model.forward_head(f, pre_logits=True)
        if f.ndim == 4:  # CNN feature map (B, C, H, W)
            tokens = f.flatten(2).transpose(1, 2)
        else:
            tokens = f[:, self.prefix:]
        return pooled, tokens


# ----------------------------------------------------------------------------------------------
# precomputed features
# ----------------------------------------------------------------------------------------------


def load_feature_file(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """(features, indices or None) of a ``.npy`` / ``.npz`` / ``.safetensors`` file; one-line errors."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"features file {p} not found")
    suffix = p.suffix.lower()
    try:
        if suffix == ".npy":
            arrays = {"features": np.load(p, mmap_mode="r")}
        elif suffix == ".npz":
            with np.load(p) as z:
                arrays = {k: z[k] for k in z.files}
        elif suffix == ".safetensors":
            from safetensors.numpy import load_file
            arrays = load_file(str(p))
        else:
            raise ValueError(f"features file {p}: use .npy, .npz or .safetensors, got {suffix or 'no suffix'!r}")
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 - a corrupt or foreign file: one line
        raise ValueError(f"features file {p} is unreadable ({type(e).__name__})") from None
    idx = arrays.pop("indices", None)
    if "features" in arrays:
        feats = arrays["features"]
    elif len(arrays) == 1:
        feats = next(iter(arrays.values()))
    else:
        raise ValueError(f"features file {p} holds {sorted(arrays)}: name the feature array 'features' (and the "
                         "image indices 'indices')")
    if feats.ndim not in (2, 3) or feats.shape[0] == 0:
        raise ValueError(f"features file {p}: expected pooled (N, D) or tokens (N, T, D), got shape {tuple(feats.shape)}")
    if idx is not None:
        idx = np.asarray(idx)
        if idx.ndim != 1 or len(idx) != feats.shape[0]:
            raise ValueError(f"features file {p}: 'indices' has shape {tuple(idx.shape)} but there are "
                             f"{feats.shape[0]} feature rows; give one image index per row")
        if not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(f"features file {p}: 'indices' must be integers, got {idx.dtype}")
        if len(np.unique(idx)) != len(idx):
            raise ValueError(f"features file {p}: 'indices' repeats image indices")
    return feats, idx


class PrecomputedFeatures(Encoder):
    """``features:PATH``: rows looked up by dataset image index."""

    def __init__(self, spec: str, path: str):
        self.spec, self.path = spec, Path(path).expanduser()
        self.feats, self.idx = load_feature_file(self.path)
        self.name = metric_name(f"features:{self.path.stem}")
        self.sha = file_sha(self.path)
        self.info = {"file": str(self.path), "shape": list(self.feats.shape)}

    def features(self, dataset: Any, indices: np.ndarray, *, batch_size: int = 64, device: str | torch.device = "cpu",
                 tokens: bool = True, progress: bool = False) -> EncodedFeatures:
        want = np.asarray(indices, dtype=np.int64)
        n_total = len(dataset)
        if self.idx is None:
            if self.feats.shape[0] != n_total:
                raise ValueError(f"features file {self.path} has {self.feats.shape[0]} rows but the "
                                 f"{getattr(dataset, 'split', '')} split has {n_total} images; row i must be image i, "
                                 "or add an 'indices' array (.npz / .safetensors)")
            rows = want
        else:
            pos = {int(v): r for r, v in enumerate(self.idx)}
            missing = [int(i) for i in want if int(i) not in pos]
            if missing:
                raise ValueError(f"features file {self.path} has no rows for {len(missing)} of the {len(want)} images "
                                 f"analysed (e.g. image {missing[0]}); it covers {len(pos)} images: give features "
                                 "for every image of the split, or fewer --n")
            rows = np.array([pos[int(i)] for i in want], dtype=np.int64)
        x = np.asarray(self.feats[rows], dtype=np.float32)
        if x.ndim == 2:
            if tokens:
                raise ValueError(f"features file {self.path} holds pooled (N, D) features; token alignment needs "
                                 "tokens (N, T, D)")
            return EncodedFeatures(x, None, want)
        return EncodedFeatures(x.mean(1), x if tokens else None, want)


# ----------------------------------------------------------------------------------------------
# specs
# ----------------------------------------------------------------------------------------------


def parse_encoder(spec: str) -> tuple[str, dict]:
    """``spec`` -> (kind, arguments); ValueError on anything else. No file is touched."""
    s = (spec or "").strip()
    if s in ("embedded", "fashion-mnist", ""):
        return "embedded", {}
    kind, _, rest = s.partition(":")
    if kind == "embedded":
        if not rest.isdigit() or int(rest) < 100:
            raise ValueError(f"--encoder {s}: write embedded:N with N >= 100 training images (default "
                             f"{EMBEDDED_N_TRAIN}), or plain embedded")
        return "embedded", {"max_train": int(rest)}
    kind = REPA_ENCODER_NAMES.get(kind, kind)
    if kind in DINOV2_MODELS:
        if not rest:
            raise ValueError(f"--encoder {s}: give the local weights file, e.g. {kind}:weights/{kind}_pretrain.pth")
        return "timm", {"arch": DINOV2_MODELS[kind], "path": rest, "dinov2": kind}
    if kind == "timm":
        name, _, path = rest.partition(":")
        if not name or not path:
            raise ValueError(f"--encoder {s}: write timm:NAME:PATH (a timm model name and its local weights file)")
        return "timm", {"arch": name, "path": path}
    if kind == "features":
        if not rest:
            raise ValueError("--encoder features:PATH needs a .npy, .npz or .safetensors file")
        return "features", {"path": rest}
    raise ValueError(f"unknown --encoder {s!r}; use {SPECS}")


def _vit_patch(model: nn.Module) -> int | None:
    """The square patch size of a timm ViT (None for models without a patch embedding: CNNs)."""
    size = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if size is None:
        return None
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    return int(size[0]) if size[0] == size[1] else None


def load_encoder(spec: str, *, data: str = "fashion-mnist", device: str | torch.device = "cpu",
                 progress: bool = False, log: Callable[[str], None] | None = None,
                 token_grid: int | None = None) -> Encoder:
    """The encoder named by ``spec`` (see the module docstring); ``data`` is the dataset the
    embedded encoder is trained on. ``token_grid``: a ViT encoder (DINOv2, timm ViTs) is built for
    images of that many patches a side (positions resampled by timm, images resized to match), so
    that token i is the same image patch as the diffusion model's token i, as REPA sizes DINOv2;
    other encoders (embedded, CNNs, features) are as they are."""
    kind, args = parse_encoder(spec)
    if kind == "embedded":
        return get_embedded_encoder(data, device=device, progress=progress, log=log, **args)
    if kind == "features":
        return PrecomputedFeatures(spec, args["path"])
    if "dinov2" in args:
        d = args["dinov2"]
        how = (f"get the official weights: wget https://dl.fbaipublicfiles.com/dinov2/{d.replace('-reg', '').replace('-', '_')}/"
               f"{d.replace('-reg', '_reg4').replace('-', '_')}_pretrain.pth (or timm's model.safetensors of timm/"
               f"{args['arch']}.lvd142m)")
        return TimmEncoder(spec, args["arch"], args["path"], img_size=224 if token_grid is None else 14 * token_grid,
                           how=how)
    enc = TimmEncoder(spec, args["arch"], args["path"])
    patch = _vit_patch(enc.model)
    if token_grid is not None and patch is not None and enc.size != token_grid * patch:
        mean, std = tuple(enc.mean.flatten().tolist()), tuple(enc.std.flatten().tolist())
        enc = TimmEncoder(spec, args["arch"], args["path"], img_size=token_grid * patch, mean=mean, std=std)
    return enc


def describe(enc: Encoder) -> str:
    """One line for titles and records."""
    extra = ""
    if isinstance(enc, EmbeddedEncoder):
        extra = f" (test acc {100 * enc.test_accuracy:.1f}%)"
    return f"{enc.name}{extra}"


def info_json(enc: Encoder) -> str:
    return json.dumps({"spec": enc.spec, "name": enc.name, "sha": enc.sha, **enc.info}, default=str)
