"""Datasets behind one interface, and a resumable, DDP-aware batch order.

Specs accepted by :func:`make_dataset`:

* ``fashion-mnist`` — Debian's ``dataset-fashion-mnist`` IDX files (official 60k/10k split),
  28x28 padded to 32x32, 1 channel, pixels in [-1, 1];
* ``digits`` — scikit-learn's 8x8 digits, a tiny fallback (fixed 80/20 split);
* ``folder:PATH`` — an image folder with one sub-folder per class (``PATH/train`` and
  ``PATH/test`` if present, else a fixed 90/10 split), resized to ``image_size``; read as RGB, or as
  grayscale with ``channels=1`` (channels follow the model: PIL converts grayscale <-> RGB);
* ``latents:PATH`` — pre-computed SD-VAE moments in the REPA/SRA layout (``PATH/vae-sd/**.npy``
  of shape (8, h, w) = [mean, std], labels in ``PATH/vae-sd/dataset.json``; a test split in
  ``PATH/test/vae-sd``); each access draws a fresh posterior sample ``(mean + std * eps) * 0.18215``.

A folder without a test split is never reused as its own test split: ``train`` and ``test`` are a
disjoint, seeded 90/10 cut of it (:data:`HELDOUT_RULE`), recorded in ``dataset.split_rule`` and
warned about, since it is not an official split. The trainer of a latents folder may take every
file (``holdout_cut=False``: the papers train on all of ImageNet's train latents); probes never do.

``channels`` (from the checkpoint being probed): image datasets are converted to that many channels
(1 = grayscale, 3 = RGB; Fashion-MNIST and digits repeat their one channel for an RGB model); data
that cannot be converted (latents for a pixel model, images for a latent model) is a one-line error.
A file that cannot be read (a corrupt image, a latent of another shape) is a one-line error naming it.

Datasets return *raw* items; :meth:`finalize` turns a collated batch into model inputs on the
training device. Everything random (posterior draws) happens there, from the trainer's generator,
so a resumed run sees exactly the same numbers.
"""

from __future__ import annotations

import gzip
import json
import os
import struct
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["make_dataset", "list_class_folders", "ImageArrayDataset", "ImageFolderDataset", "LatentsDataset",
           "ResumableBatchSampler",
           "FASHION_MNIST_DIR", "SD_VAE_SCALE", "dataset_names", "heldout_cut", "HELDOUT_RULE",
           "native_inputs", "FOLDER_IMAGE_SIZE"]

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]
SD_VAE_SCALE = 0.18215
SPLITS = ("train", "test")
HELDOUT_RULE = "seeded 90/10 cut of one folder (numpy default_rng(0) permutation; not an official split)"
OFFICIAL_SPLIT = "official"


def _raw_images(folder: Path, n_latents: int) -> list[Path] | None:
    """REPA's ``images/`` beside ``vae-sd/``: its image files in sorted order, paired with the sorted
    latent files item by item as REPA's ``CustomDataset`` pairs them; None without the folder."""
    if not folder.is_dir():
        return None
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS)
    if len(files) != n_latents:
        raise ValueError(f"{folder} has {len(files)} images but vae-sd/ {n_latents} latents: REPA pairs them by "
                         "sorted order, so both must hold the same items")
    return files


def heldout_cut(n: int, split: str) -> np.ndarray:
    """The rows of ``split`` in a disjoint, seeded 90/10 cut of ``n`` items (sorted)."""
    perm = np.random.default_rng(0).permutation(n)
    cut = int(round(0.9 * n))
    return np.sort(perm[:cut] if split == "train" else perm[cut:])


def _warn_cut(where: str) -> None:
    warnings.warn(f"{where} has no test split: using a {HELDOUT_RULE} (train and test are disjoint)", stacklevel=3)


def dataset_names() -> list[str]:
    return ["fashion-mnist", "digits", "folder:PATH", "latents:PATH"]


class ImageArrayDataset(Dataset):
    """Images held in memory as uint8 (N, C, H, W); items are floats in [-1, 1]."""

    latent_scale: float | None = None

    def __init__(self, name: str, split: str, images: np.ndarray, labels: np.ndarray, class_names: list[str],
                 max_value: float = 255.0, channels: int | None = None):
        if len(images) == 0:
            raise ValueError(f"dataset {name!r} split {split!r} is empty")
        if channels is not None and channels != images.shape[1]:
            if images.shape[1] == 1 and channels == 3:  # grayscale -> RGB (what PIL's convert("RGB") gives)
                images = np.repeat(images, 3, axis=1)
            else:
                raise ValueError(_channels_error(name, f"{images.shape[1]} channel(s)", channels))
        self.name, self.split = name, split
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        self.class_names = class_names
        self.num_classes = len(class_names)
        self.channels = self.images.shape[1]
        self.image_size = self.images.shape[-1]
        self.max_value = max_value

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i].float() / (self.max_value / 2) - 1.0, self.labels[i]

    def get_batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Vectorised gather (the in-memory fast path used by the trainer and probes)."""
        return self.images[idx].float() / (self.max_value / 2) - 1.0, self.labels[idx]

    def finalize(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return x


def _channels_error(name: str, have: str, want: int) -> str:
    """One line: data ``name`` (with ``have`` channels) cannot feed a model of ``want`` channels."""
    hint = ("a pixel model needs images (fashion-mnist, digits or folder:PATH)" if want in (1, 3)
            else "a latent model needs latents:PATH (probe encode makes them)")
    return f"data {name} has {have} and cannot be converted to the {want} channel(s) the model takes: {hint}"


# -- Fashion-MNIST ---------------------------------------------------------------------------------


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: expected {int(np.prod(shape))} values, found {arr.size}")
    return arr.reshape(shape)


def _find_idx(root: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (root / name).exists():
            return root / name
    return None


def load_fashion_mnist(split: str, root: str | os.PathLike | None = None, pad_to: int = 32,
                       channels: int | None = None) -> ImageArrayDataset:
    root = Path(root or os.environ.get("REPDYN_FASHION_MNIST", FASHION_MNIST_DIR))
    prefix = "train" if split == "train" else "t10k"
    img_path = _find_idx(root, f"{prefix}-images-idx3-ubyte")
    lbl_path = _find_idx(root, f"{prefix}-labels-idx1-ubyte")
    if img_path is None or lbl_path is None:
        raise FileNotFoundError(
            f"Fashion-MNIST IDX files not found in {root}: install them with `sudo apt-get install "
            "dataset-fashion-mnist` (Debian/Ubuntu), point REPDYN_FASHION_MNIST at a folder with the four IDX "
            "files, or use --data digits"
        )
    images = _read_idx(img_path)
    labels = _read_idx(lbl_path)
    if len(images) != len(labels):
        raise ValueError(f"Fashion-MNIST {split}: {len(images)} images but {len(labels)} labels")
    pad = (pad_to - images.shape[-1]) // 2
    images = np.pad(images, ((0, 0), (pad, pad), (pad, pad)))[:, None]
    return ImageArrayDataset("fashion-mnist", split, images, labels, FASHION_MNIST_CLASSES, channels=channels)


def load_digits_dataset(split: str, channels: int | None = None) -> ImageArrayDataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    perm = np.random.default_rng(0).permutation(len(d.target))
    cut = int(0.8 * len(perm))
    idx = perm[:cut] if split == "train" else perm[cut:]
    images = d.images[idx].astype(np.uint8)[:, None]  # values 0..16
    return ImageArrayDataset("digits", split, images, d.target[idx], [str(i) for i in range(10)], max_value=16.0,
                             channels=channels)


# -- Image folder ---------------------------------------------------------------------------------

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


def list_class_folders(root: Path) -> tuple[list[tuple[Path, int]], list[str]]:
    """(image file, class index) pairs of ``root/<class>/<image>`` (sorted, recursive) and the class
    names; the label of a class is its index in the sorted folder names, as torchvision's ImageFolder."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"{root} has no class sub-folders: expected {root}/<class_name>/<image files>")
    files = [(f, c) for c, name in enumerate(classes) for f in sorted((root / name).rglob("*"))
             if f.suffix.lower() in IMAGE_EXTS]
    return files, classes


class ImageFolderDataset(Dataset):
    """``root/<class>/<image>``; centre-cropped and resized to ``image_size``, RGB (``channels=3``) or
    grayscale (``channels=1``) whatever the files are (PIL converts)."""

    latent_scale: float | None = None

    def __init__(self, root: str | os.PathLike, split: str, image_size: int = 32, channels: int = 3):
        root = Path(root)
        if channels not in (1, 3):
            raise ValueError(_channels_error(f"folder:{root}", "images (1 or 3 channels)", channels))
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {root} does not exist")
        base = root / split if (root / "train").is_dir() else root
        if split == "test" and not (root / "test").is_dir() and (root / "train").is_dir():
            raise FileNotFoundError(f"{root} has train/ but no test/ folder")
        files, classes = list_class_folders(base)
        self.split_rule = OFFICIAL_SPLIT
        if base is root:  # no explicit split: the disjoint seeded cut
            files = [files[i] for i in heldout_cut(len(files), split)]
            self.split_rule = HELDOUT_RULE
            _warn_cut(f"image folder {root}")
        if not files:
            raise ValueError(f"no images found for split {split!r} under {base}")
        self.name, self.split = f"folder:{root}", split
        self.files = files
        self.class_names = classes
        self.num_classes = len(classes)
        self.channels = channels
        self.image_size = image_size
        self.labels = torch.tensor([c for _, c in files])

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from PIL import Image

        path, label = self.files[i]
        img = read_image(path, "RGB" if self.channels == 3 else "L")
        w, h = img.size
        s = min(w, h)
        img = img.crop(((w - s) // 2, (h - s) // 2, (w + s) // 2, (h + s) // 2))
        img = img.resize((self.image_size, self.image_size), Image.BICUBIC)
        arr = np.asarray(img, dtype=np.uint8).reshape(self.image_size, self.image_size, self.channels)
        x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 127.5 - 1.0
        return x, torch.tensor(label)

    def get_batch(self, idx: torch.Tensor):
        items = [self[int(i)] for i in idx]
        return torch.stack([a for a, _ in items]), torch.stack([b for _, b in items])

    def finalize(self, x, generator=None):
        return x


def read_image(path: str | os.PathLike, mode: str):
    """The image at ``path`` as a PIL image in ``mode`` ("RGB" / "L"); a file PIL cannot read is a
    one-line error naming it."""
    from PIL import Image

    try:
        with Image.open(path) as f:
            return f.convert(mode)
    except (OSError, SyntaxError, ValueError) as e:  # PIL.UnidentifiedImageError is an OSError
        why = "not an image PIL can read" if isinstance(e, Image.UnidentifiedImageError) else _first_line(e)
        raise ValueError(f"cannot read image {path} ({why}): remove or replace the file") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# -- Pre-computed latents (REPA / SRA layout) -------------------------------------------------------


def _load_npy(path: Path) -> np.ndarray:
    """One latent file; a one-line error naming it if it is not a readable ``.npy`` array."""
    try:
        with open(path, "rb") as f:
            if f.read(6) != b"\x93NUMPY":
                raise ValueError("not a .npy file")
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:  # unreadable, not .npy, truncated or pickled
        raise ValueError(f"cannot read latent {path} ({_first_line(e)}): re-encode it or remove it") from None


class LatentsDataset(Dataset):
    """Per-image ``.npy`` moments (2C, h, w) plus ``dataset.json`` labels; samples the posterior."""

    latent_scale = SD_VAE_SCALE

    def __init__(self, root: str | os.PathLike, split: str = "train", holdout_cut: bool = True):
        root = Path(root)
        feat_dir = root / "vae-sd" if (root / "vae-sd").is_dir() else root
        has_test = (root / "test" / "vae-sd").is_dir()
        if split == "test" and has_test:
            feat_dir = root / "test" / "vae-sd"
        cut = not has_test and (holdout_cut or split == "test")
        meta_path = feat_dir / "dataset.json"
        if not meta_path.exists():
            raise FileNotFoundError(f"{meta_path} not found: expected the REPA/SRA latents layout "
                                    "(vae-sd/*.npy moments plus vae-sd/dataset.json labels)")
        with open(meta_path) as f:
            meta = json.load(f)
        labels = meta.get("labels")
        if not labels:
            raise ValueError(f"{meta_path} has no 'labels' list")
        label_of = {str(k).replace("\\", "/"): int(v) for k, v in labels}
        files = sorted(p for p in feat_dir.rglob("*.npy"))
        rel = [str(p.relative_to(feat_dir)).replace("\\", "/") for p in files]
        missing = [r for r in rel if r not in label_of]
        if missing:
            raise ValueError(f"{len(missing)} latent files have no label in dataset.json, e.g. {missing[0]}")
        if not files:
            raise ValueError(f"no .npy latents under {feat_dir}")
        first = _load_npy(files[0])
        if first.ndim != 3 or first.shape[0] % 2:
            raise ValueError(f"{files[0]} has shape {first.shape}; expected (2C, h, w) = [mean, std] moments")
        self.name, self.split = f"latents:{root}", split
        labels_all = [label_of[r] for r in rel]
        self.num_classes = max(labels_all) + 1
        self.split_rule = OFFICIAL_SPLIT if has_test else (HELDOUT_RULE if cut else "every file (no test split)")
        images = _raw_images(feat_dir.parent / "images", len(files))
        if cut:
            keep = heldout_cut(len(files), split)
            files, labels_all = [files[i] for i in keep], [labels_all[i] for i in keep]
            images = [images[i] for i in keep] if images is not None else None
            if not files:
                raise ValueError(f"latents folder {root} is too small for a held-out {split} cut; add PATH/test/vae-sd")
            _warn_cut(f"latents folder {root}")
        self.files = files
        self.image_files = images  # REPA's images/ beside vae-sd/, paired by sorted order; None without it
        self.labels = torch.tensor(labels_all)
        names = meta.get("class_names")
        self.class_names = list(names) if names and len(names) >= self.num_classes else [
            str(i) for i in range(self.num_classes)]
        self.vae_info = meta.get("vae")  # written by probe encode: path, scale, config_sha
        self.channels = first.shape[0] // 2
        self.image_size = first.shape[-1]
        self.moment_shape = tuple(first.shape)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        arr = _load_npy(self.files[i])
        if arr.shape != self.moment_shape:
            raise ValueError(f"latent {self.files[i]} has shape {arr.shape}, expected {self.moment_shape} like the "
                             f"other files of {self.name}: re-encode it or remove it (and its dataset.json entry)")
        return torch.from_numpy(arr.astype(np.float32)), self.labels[i]

    def get_batch(self, idx: torch.Tensor):
        items = [self[int(i)] for i in idx]
        return torch.stack([a for a, _ in items]), torch.stack([b for _, b in items])

    def raw_images(self, idx: torch.Tensor | np.ndarray) -> torch.Tensor:
        """The raw uint8 images (B, C, H, W) of items ``idx``, from REPA's ``images/`` folder beside
        ``vae-sd/`` (what REPA's encoder sees; a one-line error without that folder)."""
        if self.image_files is None:
            raise ValueError(f"{self.name} has no images/ folder beside vae-sd/: the raw images REPA's encoder "
                             "reads (REPA's dataset layout) are missing")
        out = []
        for i in np.asarray(idx, dtype=np.int64):
            arr = np.asarray(read_image(self.image_files[int(i)], "RGB"), dtype=np.uint8)
            out.append(torch.from_numpy(arr.transpose(2, 0, 1).copy()))
        shapes = {tuple(x.shape) for x in out}
        if len(shapes) > 1:
            raise ValueError(f"the images of {self.name} differ in size ({sorted(shapes)[:2]}): REPA's images/ holds "
                             "one resolution (center-cropped as its preprocessing does)")
        return torch.stack(out)

    def finalize(self, moments: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        mean, std = moments.chunk(2, dim=1)
        eps = torch.randn(mean.shape, device=mean.device, generator=generator, dtype=mean.dtype)
        return (mean + std * eps) * SD_VAE_SCALE


FOLDER_IMAGE_SIZE = 32  # what make_dataset resizes folder images to when the model does not say


def native_inputs(spec: str) -> dict[str, int] | None:
    """The channels and image size a spec gives when no model asks for others (``make_dataset``
    without ``channels`` / ``image_size``); None for latents, which are never converted."""
    if spec in ("fashion-mnist", "digits"):
        return {"channels": 1, "image_size": 32 if spec == "fashion-mnist" else 8}
    if spec.startswith("folder:"):
        return {"channels": 3, "image_size": FOLDER_IMAGE_SIZE}
    return None


def make_dataset(spec: str, split: str = "train", root: str | None = None, image_size: int = FOLDER_IMAGE_SIZE,
                 holdout_cut: bool = True, channels: int | None = None):
    """Build a dataset from a spec string (see module docstring). ``holdout_cut=False`` (training
    only): a latents folder without a test split gives every file as ``train``. ``channels``: what
    the model takes (from its checkpoint); images are converted to it (1 grayscale, 3 RGB), None
    keeps each source's own (folders: RGB)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if spec == "fashion-mnist":
        return load_fashion_mnist(split, root, channels=channels)
    if spec == "digits":
        return load_digits_dataset(split, channels=channels)
    if spec.startswith("folder:"):
        return ImageFolderDataset(spec.split(":", 1)[1], split, image_size=image_size,
                                  channels=3 if channels is None else channels)
    if spec.startswith("latents:"):
        ds = LatentsDataset(spec.split(":", 1)[1], split, holdout_cut=holdout_cut)
        if channels is not None and channels != ds.channels:
            raise ValueError(_channels_error(ds.name, f"{ds.channels} latent channel(s)", channels))
        return ds
    raise ValueError(f"unknown dataset {spec!r}; use one of {dataset_names()}")


# -- Batch order ------------------------------------------------------------------------------------


class ResumableBatchSampler:
    """Per-rank index batches from a seeded per-epoch permutation, resumable mid-epoch.

    Every epoch draws ``randperm(n)`` from ``seed + epoch``; rank r takes every world-th batch
    slot. Its state is just (epoch, batch index), so a checkpoint can restore the exact order.
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if batch_size * world_size > n:
            raise ValueError(f"global batch {batch_size * world_size} is larger than the dataset ({n} items)")
        self.n, self.batch_size, self.seed, self.rank, self.world_size = n, batch_size, seed, rank, world_size
        self.batches_per_epoch = n // (batch_size * world_size)
        self.epoch, self.position = 0, 0

    def _order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.n, generator=g)

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            order = self._order(self.epoch)
            gb = self.batch_size * self.world_size
            while self.position < self.batches_per_epoch:
                start = self.position * gb + self.rank * self.batch_size
                self.position += 1
                yield order[start : start + self.batch_size]
            self.epoch += 1
            self.position = 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
