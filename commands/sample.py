"""``probe sample``: a PNG grid (and optionally an ADM ``.npz``) from a checkpoint."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from repdyn.datasets.sources import FASHION_MNIST_CLASSES
from repdyn.model import samplers
from repdyn.core.files import check_writable
from repdyn.model.checkpoint import load_checkpoint
from repdyn.evaluation.images import save_grid, save_npz, to_uint8
from repdyn.evaluation.vae import check_vae, load_vae, to_pixels

__all__ = ["SampleResult", "SamplerSettings", "run_sample"]


@dataclass
class SamplerSettings:
    """How samples are drawn (shared by ``probe sample`` and ``probe eval``)."""

    method: str | None = None  # default: sde for SiT, ddpm for DiT
    steps: int = 50
    cfg_scale: float = 1.0
    guidance_interval: tuple[float, float] = (0.0, 1.0)
    legacy_cfg_channels: bool = False
    labels: Any = None
    seed: int = 0
    batch_size: int = 64

    def resolved_method(self, family: str) -> str:
        return self.method or ("ddpm" if family == "dit" else "sde")

    def kwargs(self, family: str) -> dict[str, Any]:
        return dict(method=self.resolved_method(family), steps=self.steps, cfg_scale=self.cfg_scale,
                    guidance_interval=tuple(self.guidance_interval), legacy_cfg_channels=self.legacy_cfg_channels,
                    labels=self.labels, seed=self.seed, batch_size=self.batch_size)


@dataclass
class SampleResult:
    grid: Path
    npz: Path | None
    n: int
    method: str
    steps: int
    notes: list[str]  # what the checkpoint loader ignored or inferred


def run_sample(ckpt_path: str | os.PathLike, out: str | os.PathLike, *, n: int = 64,
               npz: str | os.PathLike | None = None, weights: str = "ema", family: str | None = None,
               trust: bool = False, sampler: SamplerSettings | None = None, device: str = "cpu",
               progress: bool = True, overwrite: bool = False, vae: str | os.PathLike | None = None,
               num_heads: int | None = None, time_convention: str | None = None) -> SampleResult:
    """Existing ``out`` / ``npz`` files are replaced only with ``overwrite``, and both must be writable
    (checked before sampling). Latent checkpoints are decoded with the AutoencoderKL in folder ``vae``."""
    for target, flag in ((out, "--out"), (npz, "--npz")):
        if target is not None and Path(target).exists() and not overwrite:
            raise ValueError(f"{target} exists; pass --overwrite to replace it or choose another path")
        if target is not None:
            check_writable(target, flag)
    s = sampler or SamplerSettings()
    ck = load_checkpoint(ckpt_path, weights=weights, family=family, num_heads=num_heads, trust=trust,
                         time_convention=time_convention)
    kw = s.kwargs(ck.family)
    samplers.validate_options(ck.family, kw["method"], s.steps, s.cfg_scale, tuple(s.guidance_interval),
                              ck.num_timesteps)
    decoder = load_vae(vae, device) if vae is not None else None
    check_vae(ck.meta, decoder)  # before sampling
    images = to_pixels(samplers.sample(ck, None, n=n, device=device, progress=progress, **kw), ck.meta, decoder)
    u8 = to_uint8(images)
    y = samplers.resolve_labels(s.labels, n, int(ck.meta.get("num_classes") or 1), s.seed)
    num_classes = int(ck.meta.get("num_classes") or 1)
    names = dict(enumerate(FASHION_MNIST_CLASSES)) if ck.data == "fashion-mnist" else {}
    grid = save_grid(out, u8, labels=y, label_names={**names, num_classes: "null"})
    return SampleResult(grid, save_npz(npz, u8, y) if npz is not None else None, n, kw["method"], s.steps,
                        ck.load_notes())
