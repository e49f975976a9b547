"""Samples as files: uint8 conversion, PNG grids and the ADM evaluator's ``.npz`` batch."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from repdyn.core.files import atomic_path

__all__ = ["require_pixels", "to_uint8", "from_uint8", "as_saved", "save_npz", "save_grid"]


def require_pixels(meta: dict | None) -> None:
    """Latent checkpoints cannot be written as images (no VAE decoder here): say so up front."""
    if meta and meta.get("latent_scale") is not None:
        raise ValueError("this is a latent-space checkpoint: PNG/npz export and Inception metrics need pixels "
                         "(decode with the SD-VAE first); fd_<dataset> works on latents directly")


def to_uint8(x: torch.Tensor, meta: dict | None = None) -> torch.Tensor:
    """Model-space pixels in [-1, 1] (N, C, H, W) -> uint8 (N, C, H, W), rounded as DiT/ADM."""
    require_pixels(meta)
    return (127.5 * x.float() + 128.0).clamp(0, 255).to(torch.uint8)


def from_uint8(u8: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) -> model-space float pixels, the inverse of :func:`to_uint8` on its grid."""
    return (u8.float() - 127.5) / 127.5


def as_saved(x: torch.Tensor, meta: dict | None = None) -> torch.Tensor:
    """The images as they are written (clamped to [-1, 1] and quantised to 8 bits), in model space.

    Every metric scores these, not the raw sampler output: an early checkpoint's raw samples can
    lie far outside [-1, 1], which no PNG or ``.npz`` holds. Latents pass through unchanged.
    """
    if meta and meta.get("latent_scale") is not None:
        return x
    return from_uint8(to_uint8(x, meta))


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
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **out)
    return path


def save_grid(path: str | os.PathLike, images: torch.Tensor, nrow: int | None = None, pad: int = 2,
              labels: Any = None, label_names: dict[int, str] | None = None) -> Path:
    """Write uint8 images (N, C, H, W) as one PNG grid (black padding). With ``labels`` (N,), each tile
    gets its conditioning class written in a strip above it (``label_names`` maps a class to its text;
    the null class of unconditional samples reads "null"), so a reader sees whether samples follow
    their labels."""
    from PIL import Image, ImageDraw

    images = torch.as_tensor(images)
    n, c, h, w = images.shape
    nrow = nrow or max(1, int(np.ceil(np.sqrt(n))))
    rows = int(np.ceil(n / nrow))
    strip = 11 if labels is not None else 0
    cell_w = max(w, 30) if labels is not None else w  # room for a short class name
    grid = np.zeros((rows * (h + strip + pad) + pad, nrow * (cell_w + pad) + pad, c), dtype=np.uint8)
    for i, img in enumerate(images.permute(0, 2, 3, 1).numpy()):
        r, col = divmod(i, nrow)
        top, left = pad + r * (h + strip + pad) + strip, pad + col * (cell_w + pad) + (cell_w - w) // 2
        grid[top: top + h, left: left + w] = img
    pil = Image.fromarray(grid[..., 0] if c == 1 else grid, mode="L" if c == 1 else "RGB")
    if labels is not None:
        draw = ImageDraw.Draw(pil)
        for i, y in enumerate(np.asarray(labels).tolist()[:n]):
            r, col = divmod(i, nrow)
            text = (label_names or {}).get(int(y), str(int(y)))[: max(3, cell_w // 6)]
            draw.text((pad + col * (cell_w + pad), pad + r * (h + strip + pad) - 1), text,
                      fill=255 if c == 1 else (255, 255, 255))
    path = Path(path)
    with atomic_path(path) as tmp:
        pil.save(tmp, format="PNG")
    return path
