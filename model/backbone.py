"""One diffusion-transformer backbone for DiT and SiT, in the official parameter layout.

Parameter names and shapes follow facebookresearch/DiT ``models.py`` (and willisma/SiT,
sihyun-yu/REPA, vvvvvjdy/SRA, which share it): ``x_embedder.proj``, ``t_embedder.mlp.{0,2}``,
``y_embedder.embedding_table`` (num_classes + 1 rows, the last is the null class),
``blocks.{i}.{attn.qkv, attn.proj, mlp.fc1, mlp.fc2, adaLN_modulation.1}``,
``final_layer.{linear, adaLN_modulation.1}`` and a frozen ``pos_embed`` parameter. Published
checkpoints therefore load with ``load_state_dict`` and no key conversion.

DiT and SiT differ only in what the output means (noise + learned variance vs velocity) and in
the time fed to the embedder (integer DDPM step vs float in [0, 1]); both feed the raw value to
the sinusoidal embedding. The method-specific parts are optional submodules of the same class:

* ``ap_head`` — the SRA projection head (name kept from the official SRA code so its
  checkpoints resume), applied to one block's output in training only;
* ``projectors`` — REPA's MLP projectors, one per external encoder (``projectors.{k}.{0,2,4}``,
  the official REPA keys and shapes), applied to one block's output in training only;
* ``skip_fusions`` — DiverseDiT long residual connections: after each deep block
  ``i >= depth // 2`` (0-based) the stream is ``Linear(LayerNorm_fp32(cat[x, skip]))`` (LayerNorm
  eps 1e-6) with the first-half outputs popped LIFO, so block ``i`` is paired with block
  ``depth - 1 - i``; the fused tensor replaces the stream. Official DiverseDiT files name these
  ``skip_linears.{j}.linear`` / ``skip_norms.{j}`` (the checkpoint loader renames them).

Block indices in the public API are **1-based block outputs** ("block k" = the residual stream
after k blocks, after any long-skip fusion), as in the SRA/REPA flags.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ModelConfig",
    "DiffusionTransformer",
    "Features",
    "FeatureForward",
    "MODEL_SIZES",
    "registry_names",
    "model_config",
    "build_model",
    "get_2d_sincos_pos_embed",
    "projector_mlp",
]


# ----------------------------------------------------------------------------------------------
# Small building blocks (names match timm's Attention / Mlp / PatchEmbed used by the official code)
# ----------------------------------------------------------------------------------------------


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class PatchEmbed(nn.Module):
    """Image (N, C, H, W) -> tokens (N, T, D) by a strided conv (timm's PatchEmbed keys)."""

    def __init__(self, input_size: int, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.grid_size = input_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, C, H, W) -> (N, D, H/p, W/p) -> (N, T, D)


class Attention(nn.Module):
    """Multi-head self-attention on fused SDPA kernels (timm's ``qkv`` / ``proj`` keys)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, T, D) tokens -> (N, T, D)."""
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (N, heads, T, D / heads)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """Two-layer MLP with tanh-GELU, as DiT (timm's ``fc1`` / ``fc2`` keys)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TimestepEmbedder(nn.Module):
    """Scalar time -> vector: sinusoidal features (raw t, no rescaling) then a 2-layer MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """t: (N,) times -> (N, D)."""
        freq = self.timestep_embedding(t, self.frequency_embedding_size)  # (N, frequency_embedding_size)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class label -> vector. Row ``num_classes`` is the null class used for CFG dropout."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def drop(self, labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Replace each label by the null class with probability ``dropout_prob``."""
        if self.dropout_prob <= 0:
            return labels
        u = torch.rand(labels.shape[0], device=labels.device, generator=generator)
        return torch.where(u < self.dropout_prob, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: torch.Tensor, drop: bool) -> torch.Tensor:
        """labels: (N,) int -> (N, D)."""
        return self.embedding_table(self.drop(labels) if drop else labels)


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x: (N, T, D) tokens, c: (N, D) conditioning (time + label) -> (N, T, D)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x: (N, T, D), c: (N, D) -> (N, T, p * p * out_channels) patch values (see ``unpatchify``)."""
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class ProjectionHead(nn.Module):
    """SRA head: Linear(D, 2D) -> SiLU -> Linear(2D, D), per token; training only."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear1 = nn.Linear(hidden_size, 2 * hidden_size)
        self.act = nn.SiLU()
        self.linear2 = nn.Linear(2 * hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.act(self.linear1(x)))


def projector_mlp(hidden_size: int, projector_dim: int, z_dim: int) -> nn.Sequential:
    """REPA projector: Linear(D, P) -> SiLU -> Linear(P, P) -> SiLU -> Linear(P, z), per token.

    An ``nn.Sequential`` so that the keys are REPA's (``0``, ``2``, ``4`` hold the Linears) and an
    official REPA checkpoint's ``projectors.{k}.*`` load without renaming.
    """
    return nn.Sequential(nn.Linear(hidden_size, projector_dim), nn.SiLU(), nn.Linear(projector_dim, projector_dim),
                         nn.SiLU(), nn.Linear(projector_dim, z_dim))


class LongSkipFusion(nn.Module):
    """DiverseDiT long residual connection: Linear(LayerNorm_fp32(cat[deep, shallow])).

    The official code (kobeshegu/DiverseDiT ``models/sit.py``) holds the same two modules as
    ``skip_norms.{j}`` (affine LayerNorm over 2D, eps 1e-6) and ``skip_linears.{j}.linear``;
    :func:`repdyn.model.checkpoint.load_checkpoint` renames those keys onto ``skip_fusions.{j}.norm`` /
    ``skip_fusions.{j}.linear``.
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.norm = nn.LayerNorm(2 * hidden_size, eps=1e-6)  # eps as the official FP32_Layernorm
        self.linear = nn.Linear(2 * hidden_size, hidden_size)

    def forward(self, deep: torch.Tensor, shallow: torch.Tensor) -> torch.Tensor:
        h = torch.cat([deep, shallow], dim=-1)
        # LayerNorm in fp32 (as the official code) so bf16/fp16 runs do not lose the statistics.
        h = F.layer_norm(h.float(), h.shape[-1:], self.norm.weight.float(), self.norm.bias.float(), self.norm.eps)
        return self.linear(h.to(deep.dtype))


# ----------------------------------------------------------------------------------------------
# Fixed 2-D sin-cos position embedding (MAE / DiT recipe)
# ----------------------------------------------------------------------------------------------


def _sincos_1d(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """(grid_size**2, embed_dim) embedding; first half encodes the row, second the column."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, 1, grid_size, grid_size)
    return np.concatenate([_sincos_1d(embed_dim // 2, grid[0]), _sincos_1d(embed_dim // 2, grid[1])], axis=1)


# ----------------------------------------------------------------------------------------------
# Configuration and registry
# ----------------------------------------------------------------------------------------------

FAMILIES = ("dit", "sit")


@dataclass(frozen=True)
class ModelConfig:
    """Every architecture field; defaults are the official ImageNet-256 latent setting."""

    family: str = "sit"
    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    num_classes: int = 1000
    learn_sigma: bool = False
    long_skip: bool = False
    sra_head: bool = False
    # REPA projectors: one per encoder, each to that encoder's token width; () builds none.
    z_dims: tuple[int, ...] = ()
    projector_dim: int = 0  # their hidden width (REPA's 2048 at the papers' sizes); 0 without projectors

    def __post_init__(self) -> None:
        # A list read back from YAML or a checkpoint compares equal to the tuple the trainer built.
        object.__setattr__(self, "z_dims", tuple(int(z) for z in self.z_dims))

    def validate(self) -> "ModelConfig":
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        if self.input_size % self.patch_size:
            raise ValueError(
                f"input_size {self.input_size} is not divisible by patch_size {self.patch_size}; "
                "pick a patch size that divides the image/latent side"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.hidden_size % 4:
            raise ValueError("hidden_size must be a multiple of 4 for the 2-D sin-cos position embedding")
        if self.long_skip and self.depth % 2:
            raise ValueError(
                f"long residual connections (DiverseDiT) pair block i with depth-1-i and need an even depth, "
                f"got depth {self.depth}"
            )
        if self.depth < 1 or self.num_classes < 1 or self.in_channels < 1:
            raise ValueError("depth, num_classes and in_channels must be >= 1")
        if any(z < 1 for z in self.z_dims) or (self.z_dims and self.projector_dim < 1):
            raise ValueError(f"REPA projectors need z_dims >= 1 and projector_dim >= 1, got z_dims {list(self.z_dims)} "
                             f"and projector_dim {self.projector_dim}")
        return self

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def num_tokens(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# (depth, hidden_size, num_heads) exactly as the official registries; "T" (tiny) and "M" (mini)
# are this project's CPU sizes.
MODEL_SIZES: dict[str, tuple[int, int, int]] = {
    "XL": (28, 1152, 16),
    "L": (24, 1024, 16),
    "B": (12, 768, 12),
    "S": (12, 384, 6),
    "M": (8, 256, 4),
    "T": (6, 128, 4),
}
PATCH_SIZES = (1, 2, 4, 8)


def registry_names() -> list[str]:
    """All registry names, e.g. ``DiT-XL/2``, ``SiT-B/4``, ``SiT-T/4``."""
    return [f"{fam}-{size}/{p}" for fam in ("DiT", "SiT") for size in MODEL_SIZES for p in PATCH_SIZES]


def model_config(name: str, **overrides) -> ModelConfig:
    """Resolve a registry name plus overrides into a validated :class:`ModelConfig`.

    DiT defaults to a learned variance (8 output channels on SD-VAE latents) as the official DiT;
    SiT defaults to the REPA/SRA layout without it (``learn_sigma=True`` gives willisma/SiT's).
    """
    try:
        fam, rest = name.split("-", 1)
        size, patch = rest.split("/")
        depth, hidden, heads = MODEL_SIZES[size]
        patch_size = int(patch)
        family = {"DiT": "dit", "SiT": "sit"}[fam]
        if patch_size not in PATCH_SIZES:
            raise KeyError(patch)
    except (ValueError, KeyError):
        close = ", ".join(n for n in registry_names() if n.endswith("/2"))
        raise ValueError(f"unknown model {name!r}; use FAMILY-SIZE/PATCH, one of: {close} (patch 1, 2, 4 or 8)") from None
    unknown = set(overrides) - {f.name for f in fields(ModelConfig)}
    if unknown:
        raise ValueError(f"unknown model field(s) {sorted(unknown)}; valid: {[f.name for f in fields(ModelConfig)]}")
    base = ModelConfig(
        family=family, patch_size=patch_size, hidden_size=hidden, depth=depth, num_heads=heads,
        learn_sigma=(family == "dit"),
    )
    return replace(base, **overrides).validate()


def build_model(name: str, **overrides) -> "DiffusionTransformer":
    """Build any registry model, e.g. ``build_model("SiT-B/2")`` or
    ``build_model("DiT-S/4", input_size=32, in_channels=1, num_classes=10)``."""
    return DiffusionTransformer(model_config(name, **overrides))


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Features:
    """One training forward: the prediction and what the method terms read beside it."""

    out: torch.Tensor  # (N, out_channels, H, W): the prediction, as forward returns it
    blocks: dict[int, torch.Tensor] = field(default_factory=dict)  # block k (1-based) -> (N, T, D)
    head: torch.Tensor | None = None  # (N, T, D): the SRA head on project_block's output
    repa: tuple[torch.Tensor, ...] = ()  # REPA projector j on repa_block's output: (N, T, z_dims[j])


class DiffusionTransformer(nn.Module):
    """DiT / SiT backbone. ``forward(x, t, y)`` as in the official code.

    ``forward`` returns the prediction only; :meth:`forward_features` also returns the residual
    stream after listed blocks (1-based), the SRA head's output and REPA's projections (a
    :class:`Features`), and :class:`FeatureForward` makes it a module's forward for DDP and
    ``torch.compile``. ``block_features`` runs only as deep as the deepest requested block
    (teacher / probing).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config.validate()
        c = self.config
        self.family = c.family
        self.in_channels = c.in_channels
        self.out_channels = c.out_channels
        self.patch_size = c.patch_size
        self.num_heads = c.num_heads
        self.learn_sigma = c.learn_sigma

        self.x_embedder = PatchEmbed(c.input_size, c.patch_size, c.in_channels, c.hidden_size)
        self.t_embedder = TimestepEmbedder(c.hidden_size)
        self.y_embedder = LabelEmbedder(c.num_classes, c.hidden_size, c.class_dropout_prob)
        num_patches = self.x_embedder.num_patches
        # A frozen Parameter (not a buffer) so that it is in the state dict, as in the official code.
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, c.hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(c.hidden_size, c.num_heads, c.mlp_ratio) for _ in range(c.depth)])
        self.final_layer = FinalLayer(c.hidden_size, c.patch_size, self.out_channels)
        self.skip_fusions = (
            nn.ModuleList([LongSkipFusion(c.hidden_size) for _ in range(c.depth // 2)]) if c.long_skip else None
        )
        self.ap_head = ProjectionHead(c.hidden_size) if c.sra_head else None
        self.projectors = (nn.ModuleList([projector_mlp(c.hidden_size, c.projector_dim, z) for z in c.z_dims])
                           if c.z_dims else None)
        self.initialize_weights()

    # -- init (adaLN-Zero, zero final layer, fixed sin-cos positions) ---------------------------
    def initialize_weights(self) -> None:
        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        if self.pos_embed.device.type != "meta":
            grid = int(self.x_embedder.num_patches**0.5)
            pos = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid)
            self.pos_embed.data.copy_(torch.from_numpy(pos).float().unsqueeze(0))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    # -- pieces -----------------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        return len(self.blocks)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p*p*C) -> (N, C, H, W)."""
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def embed(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, drop_labels: bool | None = None):
        """Tokens with positions (N, T, D), and the conditioning vector c = t_emb + y_emb (N, D)."""
        if x.ndim != 4 or x.shape[1] != self.in_channels or x.shape[-1] != self.config.input_size:
            raise ValueError(
                f"model expects input (N, {self.in_channels}, {self.config.input_size}, {self.config.input_size}), "
                f"got {tuple(x.shape)}; check the data's channels/size against the checkpoint"
            )
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        drop = self.training if drop_labels is None else drop_labels
        tokens = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, drop)
        return tokens, c

    def block_output_module(self, k: int) -> nn.Module:
        """The module whose output is the residual stream after block ``k`` (1-based).

        For deep blocks of a long-skip model that is the fusion, not the block itself; probes
        hook this so "block k" means the same thing with and without DiverseDiT.
        """
        self._check_block(k)
        i = k - 1
        if self.skip_fusions is not None and i >= self.depth // 2:
            return self.skip_fusions[i - self.depth // 2]
        return self.blocks[i]

    def _check_block(self, k: int) -> None:
        if not 1 <= k <= self.depth:
            raise ValueError(f"block {k} is out of range: this model has blocks 1..{self.depth} (1-based)")

    def run_blocks(
        self, x: torch.Tensor, c: torch.Tensor, collect: Iterable[int] = (), stop_after: int | None = None
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Run the transformer blocks on x (N, T, D) with c (N, D), returning the final stream (N, T, D)
        and the collected block outputs {k: (N, T, D)}."""
        want = set(collect)
        for k in want:
            self._check_block(k)
        half = self.depth // 2
        skips: list[torch.Tensor] = []
        feats: dict[int, torch.Tensor] = {}
        last = self.depth if stop_after is None else stop_after
        for i in range(last):
            x = self.blocks[i](x, c)
            if self.skip_fusions is not None:
                if i >= half:
                    x = self.skip_fusions[i - half](x, skips.pop())
                else:
                    skips.append(x)
            if i + 1 in want:
                feats[i + 1] = x
        return x, feats

    # -- forwards ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, *,
                drop_labels: bool | None = None) -> torch.Tensor:
        """Forward pass of DiT / SiT, as the official code's.

        x: (N, C, H, W) tensor of spatial inputs (images or latent representations of images)
        t: (N,) tensor of diffusion timesteps (DiT: integer DDPM steps; SiT: floats in [0, 1]), or a scalar
        y: (N,) tensor of class labels (``num_classes`` is the null class)
        returns: (N, out_channels, H, W); a SiT with a learned-sigma head returns only its C velocity
        channels, as willisma/SiT's forward does.

        ``drop_labels``: None applies CFG label dropout in train mode (official behaviour); the
        trainer drops labels itself (so an SRA teacher can see the same labels) and passes False.
        """
        return self.forward_features(x, t, y, drop_labels=drop_labels).out

    def forward_features(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, *,
                         drop_labels: bool | None = None, blocks: Iterable[int] = (),
                         project_block: int | None = None, repa_block: int | None = None) -> Features:
        """:meth:`forward` and what the training losses read beside it, from one pass.

        ``blocks``: 1-based blocks whose outputs (N, T, D) to return (DiverseDiT, SRA's student);
        ``project_block``: the block the SRA head reads (``head``, (N, T, D));
        ``repa_block``: the block REPA's projectors read (``repa[j]``, (N, T, z_dims[j])).
        """
        tokens, c = self.embed(x, t, y, drop_labels)  # (N, T, D), (N, D)
        wanted = set(blocks)
        collect = set(wanted)
        if project_block is not None:
            if self.ap_head is None:
                raise ValueError("project_block needs a model built with sra_head=True")
            collect.add(project_block)
        if repa_block is not None:
            if self.projectors is None:
                raise ValueError("repa_block needs a model built with REPA projectors (z_dims)")
            collect.add(repa_block)
        h, feats = self.run_blocks(tokens, c, collect)  # (N, T, D), {k: (N, T, D)}
        out = self.unpatchify(self.final_layer(h, c))  # (N, out_channels, H, W)
        if self.family == "sit" and self.learn_sigma:
            # willisma/SiT keeps the 2C head but its forward returns only the velocity channels.
            out = out[:, : self.in_channels]
        head = self.ap_head(feats[project_block]) if project_block is not None else None
        repa = tuple(projector(feats[repa_block]) for projector in self.projectors) if repa_block is not None else ()
        return Features(out=out, blocks={k: v for k, v in feats.items() if k in wanted}, head=head, repa=repa)

    def block_features(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, blocks: Iterable[int], drop_labels: bool = False
    ) -> dict[int, torch.Tensor]:
        """Outputs of ``blocks`` (1-based), stopping after the deepest one (no final layer)."""
        blocks = sorted(set(blocks))
        if not blocks:
            raise ValueError("block_features needs at least one block")
        tokens, c = self.embed(x, t, y, drop_labels)
        _, feats = self.run_blocks(tokens, c, blocks, stop_after=blocks[-1])
        return feats


class FeatureForward(nn.Module):
    """:meth:`DiffusionTransformer.forward_features` as a module's ``forward``: DDP synchronises
    gradients and ``torch.compile`` compiles only what goes through ``forward``, so the trainer
    wraps this, not a second method of the model. Holds the model as ``model`` (no parameters of
    its own)."""

    def __init__(self, model: DiffusionTransformer):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, **kw: Any) -> Features:
        return self.model.forward_features(x, t, y, **kw)
