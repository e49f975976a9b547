"""The SD-VAE between pixels and latents: load a local ``diffusers.AutoencoderKL``, encode images to
posterior moments, decode latents to pixels, and ADM's centre crop.

Nothing downloads: the VAE is a local directory in the layout of ``stabilityai/sd-vae-ft-ema`` /
``sd-vae-ft-mse`` (``config.json`` + ``diffusion_pytorch_model.safetensors`` or ``.bin``). Latents
are stored as REPA/SRA do, as moments ``[mean, std]`` (2C, h, w) of the posterior, and the model
sees ``(mean + std * eps) * scale`` with ``scale`` = 0.18215 for the SD VAEs.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from repdyn.datasets.sources import SD_VAE_SCALE
from repdyn.core.runtime import resolve_device

__all__ = ["Vae", "load_vae", "center_crop_arr", "check_vae", "to_pixels", "SD_VAE_SCALE"]

_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


@dataclass
class Vae:
    """A loaded AutoencoderKL with the scale and identity recorded in latents and checkpoints."""

    model: Any  # diffusers.AutoencoderKL, eval mode
    path: Path
    scale: float
    config_sha: str  # sha256 of config.json: which VAE made a set of latents
    device: torch.device
    dtype: torch.dtype

    @property
    def info(self) -> dict[str, Any]:
        return {"path": str(self.path), "scale": self.scale, "config_sha": self.config_sha,
                "latent_channels": int(self.model.config.latent_channels)}

    @torch.no_grad()
    def encode_moments(self, x: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
        """Pixels in [-1, 1] (N, 3, H, W) -> float32 moments [mean, std] (N, 2C, h, w)."""
        out = []
        for s in range(0, len(x), batch_size):
            dist = self.model.encode(x[s: s + batch_size].to(self.device, self.dtype)).latent_dist
            out.append(torch.cat([dist.mean, dist.std], dim=1).float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
        """Model-space latents (already multiplied by ``scale``) -> float32 pixels in [-1, 1]."""
        out = []
        for s in range(0, len(latents), batch_size):
            z = latents[s: s + batch_size].to(self.device, self.dtype) / self.scale
            out.append(self.model.decode(z).sample.float().clamp(-1, 1).cpu())
        return torch.cat(out)


def load_vae(path: str | os.PathLike, device: str | torch.device = "auto", dtype: str = "auto",
             scale: float = SD_VAE_SCALE) -> Vae:
    """The AutoencoderKL in local folder ``path``; one-line errors when it is missing or not one.

    ``dtype``: ``auto`` = bf16 on a GPU, fp32 on CPU; or ``fp32`` / ``bf16`` / ``fp16``.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"VAE folder {path} has no config.json: expected a local AutoencoderKL "
                                "(e.g. a copy of stabilityai/sd-vae-ft-ema: config.json + weights)")
    if not any((path / f).is_file() for f in _WEIGHT_FILES):
        raise FileNotFoundError(f"VAE folder {path} has no weights ({' or '.join(_WEIGHT_FILES)})")
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise ValueError("the VAE needs diffusers: pip install 'repdyn[latents]' (or pip install diffusers)") from None
    import json

    cls = json.loads((path / "config.json").read_text()).get("_class_name")
    if cls not in (None, "AutoencoderKL"):
        raise ValueError(f"{path} holds a {cls}, not an AutoencoderKL")
    dev = resolve_device(device)
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(
        dtype, torch.bfloat16 if dtype == "auto" and dev.type == "cuda" else torch.float32)
    try:
        model = AutoencoderKL.from_pretrained(path, local_files_only=True, torch_dtype=dt)
    except (OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"cannot load the AutoencoderKL in {path}: {str(e).splitlines()[0]}") from None
    sha = hashlib.sha256((path / "config.json").read_bytes()).hexdigest()[:16]
    return Vae(model.to(dev).eval().requires_grad_(False), path, float(scale), sha, dev, dt)


def center_crop_arr(image: Any, image_size: int) -> np.ndarray:
    """ADM's preprocessing (guided-diffusion, used by REPA/SRA): halve with a box filter while the
    short side is at least twice the target, resize bicubically so the short side is ``image_size``,
    then take the centre square. Returns uint8 (H, W, 3)."""
    from PIL import Image

    while min(*image.size) >= 2 * image_size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    ratio = image_size / min(*image.size)
    image = image.resize(tuple(round(x * ratio) for x in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image.convert("RGB"))
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[top: top + image_size, left: left + image_size]


def check_vae(meta: dict, vae: Vae | None) -> None:
    """A latent checkpoint needs a VAE, and the one its training latents came from when it says so."""
    if meta.get("latent_scale") is None:
        return
    if vae is None:
        raise ValueError("this is a latent-space checkpoint: pass --vae PATH (the local AutoencoderKL its latents "
                         "came from, e.g. sd-vae-ft-ema) to decode the samples")
    made_by = meta.get("vae") or {}
    if made_by.get("config_sha") and made_by["config_sha"] != vae.config_sha:
        raise ValueError(f"the checkpoint's latents came from the VAE in {made_by.get('path')} (config "
                         f"{made_by['config_sha']}), not {vae.path} ({vae.config_sha}): pass that VAE")


def to_pixels(samples: torch.Tensor, meta: dict, vae: Vae | None) -> torch.Tensor:
    """Samples of a checkpoint as pixels in [-1, 1]: pixel models as they are, latent models decoded by
    ``vae`` (checked with :func:`check_vae`) at the checkpoint's latent scale."""
    if meta.get("latent_scale") is None:
        return samples
    check_vae(meta, vae)
    vae.scale = float(meta["latent_scale"])
    return vae.decode(samples)
