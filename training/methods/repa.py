"""REPA (representation alignment) as a :class:`~repdyn.training.methods.LossTerm`.

The student's block ``encoder_depth`` output goes through one MLP projector per external encoder
(``projectors``, a backbone part in REPA's layout, built by ``model_flags_for_method``) and each
projected token is pulled towards the same token of that encoder's patch features of the clean
image: ``proj_coeff * mean over encoders, batch and tokens of -cos(proj(h), z)``. The encoders run
without gradients, in the student's autocast, and are never part of a checkpoint (a resume checks
that they are the same ones, by content hash).

Targets come from an image encoder of :mod:`repdyn.model.encoders` run on the clean image (pixel
data: x0 in the model's [-1, 1] space; latent data: the raw image REPA's dataset layout keeps in
``images/`` beside ``vae-sd/``, read by dataset index, as REPA's loader does; ViTs are sized so that
their patch grid is the model's token grid, as REPA resizes images for DINOv2), or from a
precomputed ``features:PATH`` file of token features keyed by dataset index.

Official-code facts and our choices: ``docs/methods.md``, "REPA: official behaviour and our choices".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from repdyn.model.backbone import ModelConfig
from repdyn.model.encoders import Encoder, PrecomputedFeatures, load_encoder, parse_encoder
from repdyn.model.objectives import Objective
from repdyn.training.config import TrainConfig
from repdyn.training.methods.base import LossTerm, StepContext, check_option_names

__all__ = ["REPATerm", "REPAOptions", "AlignmentTarget", "ImageTarget", "FeatureTarget", "repa_loss",
           "token_cosine_loss", "default_encoder_depth", "default_projector_dim", "encoder_specs"]

OFFICIAL_PROJECTOR_DIM = 2048  # every official REPA size (S to XL)
DEFAULT_PROJ_COEFF = 0.5  # REPA's --proj-coeff

# (depth, width) -> projector block (1-based), as the official runs: XL and L use 8 (train.py's default),
# B uses 4 (sihyun-yu/REPA issue 5). Other sizes: about a third of the depth, as L and B.
_DEPTH_TABLE: dict[tuple[int, int], int] = {(28, 1152): 8, (24, 1024): 8, (12, 768): 4}


def default_encoder_depth(model_config: ModelConfig) -> int:
    """The projector's block, 1-based: the official 8 (XL, L) or 4 (B); else ``max(1, depth // 3)``
    (the ratio of L and B: the tiny T, depth 6, and M, depth 8, get 2; depth 4 gets 1)."""
    c = model_config
    return _DEPTH_TABLE.get((c.depth, c.hidden_size), max(1, c.depth // 3))


def default_projector_dim(model_config: ModelConfig) -> int:
    """REPA's 2048 from width 384 (every official size); below, ``2 * width``.

    2048 on a width-128 model would make the projector ~4.6 M parameters beside a ~1.2 M backbone
    and cost ~18 blocks per token; ``2 * width`` keeps it at about half a block per token (for z
    dims up to the width), which is what 2048 costs at XL (8.2 M multiply-adds per token against a
    block's 15.9 M).
    """
    return OFFICIAL_PROJECTOR_DIM if model_config.hidden_size >= 384 else 2 * model_config.hidden_size


def token_cosine_loss(projected: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over batch and tokens of minus the per-token cosine (over channels), in fp32 or wider.

    ``projected`` and ``target`` are (N, T, z); both are L2-normalised per token (``F.normalize``,
    eps 1e-12, as the official loss) before the dot product. Range -1 (aligned) to 1.
    """
    if projected.shape != target.shape:
        raise ValueError(f"REPA projector output {tuple(projected.shape)} and encoder tokens {tuple(target.shape)} "
                         "shapes differ")
    p = projected.float() if projected.dtype in (torch.float16, torch.bfloat16) else projected
    z = target.to(p.dtype)
    return -(F.normalize(p, dim=-1) * F.normalize(z, dim=-1)).sum(dim=-1).mean()


def repa_loss(projected: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> torch.Tensor:
    """REPA's projection loss: :func:`token_cosine_loss` averaged over encoders (unweighted)."""
    if len(projected) != len(targets) or not targets:
        raise ValueError(f"REPA needs one projector output per encoder, got {len(projected)} outputs and "
                         f"{len(targets)} encoders")
    return torch.stack([token_cosine_loss(p, z) for p, z in zip(projected, targets)]).mean()


def encoder_specs(value: Any) -> tuple[str, ...]:
    """``repa.encoder`` as a tuple of specs: a string (comma-separated for several, as REPA's
    ``--enc-type``) or a list of strings. One-line error otherwise."""
    if isinstance(value, str):
        specs = [s.strip() for s in value.split(",")]
    elif isinstance(value, (list, tuple)) and all(isinstance(s, str) for s in value):
        specs = [s.strip() for s in value]
    else:
        raise ValueError(f"repa.encoder must be an encoder spec or a list of them, got {value!r}")
    if not specs or any(not s for s in specs):
        raise ValueError(f"repa.encoder {value!r} has an empty entry; e.g. 'embedded' or "
                         "'embedded,dinov2-vitb14:PATH'")
    if len(set(specs)) != len(specs):
        raise ValueError(f"repa.encoder {value!r} names an encoder twice; give each once")
    for s in specs:
        parse_encoder(s)  # a malformed spec fails here, before anything is loaded
    return tuple(specs)


def _int_option(opts: dict, key: str, default: int, low: int, high: int | None = None) -> int:
    val = opts.get(key, default)
    if isinstance(val, bool) or not isinstance(val, int) or val < low or (high is not None and val > high):
        span = f"in {low}..{high}" if high is not None else f">= {low}"
        raise ValueError(f"repa.{key} must be an integer {span}, got {val!r}")
    return val


@dataclass(frozen=True)
class REPAOptions:
    """REPA's options (``config.repa``), validated against the model in one place.

    ``encoder``: the encoder specs (default the dataset's embedded ViT); ``encoder_depth``: the
    projector's block (1-based, :func:`default_encoder_depth`); ``projector_dim``: the projectors'
    hidden width (:func:`default_projector_dim`); ``proj_coeff``: the loss weight (0.5).
    """

    encoder: tuple[str, ...]
    encoder_depth: int
    projector_dim: int
    proj_coeff: float = DEFAULT_PROJ_COEFF

    @classmethod
    def from_dict(cls, opts: dict | None, model_config: ModelConfig) -> "REPAOptions":
        opts = dict(opts or {})
        check_option_names(opts, cls, "repa")
        specs = encoder_specs(opts.get("encoder", "embedded"))
        depth = _int_option(opts, "encoder_depth", default_encoder_depth(model_config), 1, model_config.depth)
        width = _int_option(opts, "projector_dim", default_projector_dim(model_config), 1)
        coeff = opts.get("proj_coeff", DEFAULT_PROJ_COEFF)
        if isinstance(coeff, bool) or not isinstance(coeff, (int, float)) or not math.isfinite(coeff) or coeff < 0:
            raise ValueError(f"repa.proj_coeff must be a finite number >= 0, got {coeff!r}")
        return cls(specs, depth, width, float(coeff))


class AlignmentTarget:
    """One encoder's patch tokens for a batch: ``tokens(x0, indices)`` -> (N, T, z), no gradient."""

    spec: str
    dim: int
    num_tokens: int

    def tokens(self, x0: torch.Tensor, indices: torch.Tensor | None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def identity(self) -> dict[str, str]:
        """What a resume checks: the spec and the content hash of the weights or feature file."""
        raise NotImplementedError


class ImageTarget(AlignmentTarget):
    """An image encoder run on the clean model-space image x0 (the encoder moves to x0's device once)."""

    def __init__(self, encoder: Encoder, channels: int, image_size: int):
        self.encoder, self.spec = encoder, encoder.spec
        self._device: torch.device | None = None
        with torch.no_grad():
            _, toks = encoder.encode(torch.zeros(1, channels, image_size, image_size))
        if toks is None or toks.ndim != 3:
            raise ValueError(f"REPA encoder {encoder.spec!r} gives no patch tokens; use a ViT encoder "
                             "(embedded, dinov2-...) or features:PATH with (N, T, D) tokens")
        self.num_tokens, self.dim = int(toks.shape[1]), int(toks.shape[2])

    def tokens(self, x0: torch.Tensor, indices: torch.Tensor | None) -> torch.Tensor:
        if self._device != x0.device:
            self.encoder.to(x0.device)
            self._device = x0.device
        return self.encoder.encode(x0)[1]

    def identity(self) -> dict[str, str]:
        return {"spec": self.spec, "name": self.encoder.name, "sha": self.encoder.sha}


class RawImageTarget(ImageTarget):
    """A latent model's encoder target, as REPA: the encoder reads the item's raw image from the
    dataset's ``images/`` folder (by the batch's dataset indices), not the latent x0."""

    def __init__(self, encoder: Encoder, dataset: Any, channels: int, image_size: int):
        super().__init__(encoder, channels, image_size)
        self.dataset = dataset

    def tokens(self, x0: torch.Tensor, indices: torch.Tensor | None) -> torch.Tensor:
        if indices is None:
            raise ValueError("REPA on latents reads the raw images by the batch's dataset indices (the trainer "
                             "passes them)")
        pixels = self.dataset.raw_images(indices.cpu()).to(x0.device, non_blocking=True).float() / 127.5 - 1.0
        return super().tokens(pixels, indices)


class FeatureTarget(AlignmentTarget):
    """Precomputed token features (``features:PATH``), row looked up by the batch's dataset indices."""

    def __init__(self, features: PrecomputedFeatures, n_items: int):
        self.features, self.spec = features, features.spec
        feats, idx = features.feats, features.idx
        path = features.path
        if feats.ndim != 3:
            raise ValueError(f"REPA needs token features (N, T, D) in {path}, got shape {tuple(feats.shape)} "
                             "(pooled features have no tokens to align)")
        if idx is None:
            if feats.shape[0] != n_items:
                raise ValueError(f"features file {path} has {feats.shape[0]} rows but the training set has "
                                 f"{n_items} items; row i must be item i, or add an 'indices' array")
            self.rows = np.arange(n_items)
        else:
            rows = np.full(n_items, -1, dtype=np.int64)
            inside = (idx >= 0) & (idx < n_items)
            rows[idx[inside]] = np.nonzero(inside)[0]
            missing = np.nonzero(rows < 0)[0]
            if len(missing):
                raise ValueError(f"features file {path} has no rows for {len(missing)} of the {n_items} training "
                                 f"items (e.g. item {int(missing[0])}); REPA needs a target for every item")
            self.rows = rows
        self.num_tokens, self.dim = int(feats.shape[1]), int(feats.shape[2])

    def tokens(self, x0: torch.Tensor, indices: torch.Tensor | None) -> torch.Tensor:
        if indices is None:
            raise ValueError("precomputed REPA features need the batch's dataset indices (the trainer passes them)")
        rows = self.rows[np.asarray(indices.cpu(), dtype=np.int64)]
        order = np.argsort(rows)  # a memory-mapped .npy reads sorted rows fastest
        block = np.asarray(self.features.feats[rows[order]], dtype=np.float32)
        out = np.empty_like(block)
        out[order] = block
        return torch.from_numpy(out).to(x0.device, non_blocking=True)

    def identity(self) -> dict[str, str]:
        return {"spec": self.spec, "name": self.features.name, "sha": self.features.sha}


def load_target(spec: str, dataset: Any, data: str, model_config: ModelConfig,
                log: Callable[[str], None] | None = None) -> AlignmentTarget:
    """One encoder of ``repa.encoder`` for ``dataset``; its token grid must be the model's."""
    kind, _ = parse_encoder(spec)
    grid = model_config.input_size // model_config.patch_size
    if kind == "features":
        target: AlignmentTarget = FeatureTarget(load_encoder(spec, data=data), len(dataset))
    else:
        latent = getattr(dataset, "latent_scale", None) is not None
        if latent and getattr(dataset, "image_files", None) is None:
            raise ValueError(f"REPA's encoder {spec!r} needs the raw images, but --data {data} holds VAE latents "
                             "only: put them in images/ beside vae-sd/ (REPA's dataset layout), or align to "
                             "precomputed encoder tokens keyed by dataset index with --encoder features:PATH "
                             f"((N, {grid * grid}, D) tokens, e.g. DINOv2 x_norm_patchtokens)")
        enc = load_encoder(spec, data=data, log=log, token_grid=grid)
        if latent:
            first = dataset.raw_images([0])
            target = RawImageTarget(enc, dataset, int(first.shape[1]), int(first.shape[-1]))
        else:
            target = ImageTarget(enc, int(dataset.channels), int(dataset.image_size))
    if target.num_tokens != model_config.num_tokens:
        side = math.isqrt(target.num_tokens)
        have = f"{side} x {side}" if side * side == target.num_tokens else str(target.num_tokens)
        raise ValueError(f"REPA aligns token i of the model with token i of the encoder, but {spec!r} gives "
                         f"{have} tokens and the model {grid} x {grid} (input {model_config.input_size}, patch "
                         f"{model_config.patch_size}): pick a patch size that gives the encoder's grid, a ViT "
                         "encoder (dinov2-..., resized to the model's grid) or features with the model's token count")
    return target


class REPATerm(LossTerm):
    """``proj_coeff * repa_loss(projectors(block encoder_depth), encoder tokens of x0)``."""

    name = "repa"

    def __init__(self, targets: Sequence[AlignmentTarget], encoder_depth: int, projector_dim: int,
                 proj_coeff: float = DEFAULT_PROJ_COEFF):
        self.targets = list(targets)
        self.encoder_depth = encoder_depth
        self.projector_dim = projector_dim
        self.proj_coeff = proj_coeff

    @classmethod
    def from_config(cls, config: TrainConfig, model_config: ModelConfig, dataset: Any,
                    log: Callable[[str], None] | None = None) -> "REPATerm":
        """Validate ``config.repa`` and load its encoders, before the model is built: the projectors'
        widths (:attr:`z_dims`) come from the encoders. ``model_config`` is the backbone without
        method parts (its depth, width and token grid are what matter)."""
        o = REPAOptions.from_dict(config.repa, model_config)
        targets = [load_target(s, dataset, config.data, model_config, log) for s in o.encoder]
        return cls(targets, o.encoder_depth, o.projector_dim, o.proj_coeff)

    @property
    def z_dims(self) -> tuple[int, ...]:
        return tuple(t.dim for t in self.targets)

    def model_flags(self) -> dict[str, Any]:
        """The backbone's REPA part: one projector per encoder, to its token width."""
        return {"z_dims": self.z_dims, "projector_dim": self.projector_dim}

    def check_model(self, model_config: ModelConfig) -> None:
        """The built model must carry these projectors (a model override must not change them)."""
        have = (model_config.z_dims, model_config.projector_dim)
        if have != (self.z_dims, self.projector_dim):
            raise ValueError(f"REPA needs projectors to z dims {list(self.z_dims)} of width {self.projector_dim}, but "
                             f"the model has z_dims {list(have[0])}, projector_dim {have[1]}: set repa.projector_dim "
                             "and repa.encoder, not model_overrides.z_dims / projector_dim")
        if not 1 <= self.encoder_depth <= model_config.depth:
            raise ValueError(f"repa.encoder_depth={self.encoder_depth} is out of range: this model has blocks "
                             f"1..{model_config.depth} (1-based)")

    def identities(self) -> list[dict[str, str]]:
        return [t.identity() for t in self.targets]

    def repa_block(self) -> int | None:
        return self.encoder_depth

    @torch.no_grad()
    def target_tokens(self, ctx: StepContext) -> list[torch.Tensor]:
        """Every encoder's tokens of the clean batch: no grad, the student's autocast (as REPA's
        ``accelerator.autocast()``)."""
        with ctx.autocast():
            return [t.tokens(ctx.x0, ctx.indices) for t in self.targets]

    def __call__(self, ctx: StepContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        targets = self.target_tokens(ctx)
        projected = [ctx.feats.repa[j] for j in range(len(self.targets))]
        per = [token_cosine_loss(p, z) for p, z in zip(projected, targets)]
        loss = torch.stack(per).mean()
        logs = {"loss_proj": loss.detach()}
        if len(per) > 1:
            logs.update({f"loss_proj{j}": v.detach() for j, v in enumerate(per)})
        return self.proj_coeff * loss, logs
