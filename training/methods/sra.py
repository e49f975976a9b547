"""SRA (self-representation alignment) as a :class:`~repdyn.training.methods.LossTerm`.

The student's block ``k_s`` output goes through the projection head (``ap_head``, a backbone part
built by ``model_flags_for_method``) and is pulled towards the raw block ``k_t`` output of the
**sampling EMA** (the teacher) run on the same x0, the same noise and the same post-dropout labels
at a less noisy time ``t_T <= t``. The teacher runs under ``no_grad`` in the student's autocast
dtype and stops after block ``k_t`` (identical features, cheaper than the official full pass).

Official-code facts, paper/code differences and the project's choices: ``docs/methods.md``,
"SRA: official behaviour and our choices". User documentation:
``docs/methods.md``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from repdyn.training.config import TrainConfig
from repdyn.model.backbone import ModelConfig
from repdyn.model.objectives import Objective
from repdyn.training.methods.base import LossTerm, StepContext, check_option_names

__all__ = ["SRATerm", "SRAOptions", "default_blocks", "sra_distance", "official_weight", "DISTANCES", "SCHEDULES"]

DISTANCES = ("smooth-l1", "cosine", "cosine-channel")
SCHEDULES = ("constant", "official")

# (family, depth, width) -> (student block, teacher block), 1-based, from the official README /
# paper ablation. Other sizes use the maintainer's rule of thumb (depth/4 -> 3 depth/4).
_BLOCK_TABLE: dict[tuple[str, int, int], tuple[int, int]] = {
    ("sit", 28, 1152): (8, 20),  # SiT-XL
    ("dit", 28, 1152): (8, 16),  # DiT-XL
    ("sit", 12, 768): (3, 8),  # SiT-B
}

# Official lambda bases of the SRA training scripts: SiT 0.2, DiT 0.04 (256 px); the default for both schedules.
_OFFICIAL_BASE = {"sit": 0.2, "dit": 0.04}

DEFAULT_T_MAX = 0.2  # the teacher's time is t - U[0, t_max): paper and README value for SiT and DiT


def default_blocks(model_config: ModelConfig) -> tuple[int, int]:
    """(k_s, k_t), 1-based: the official table for SiT-XL, DiT-XL, SiT-B; else ``round(depth/4)`` ->
    ``round(3 depth/4)`` (Python's round, halves to even), kept inside 1..depth with k_t > k_s.

    Depth 6 (the tiny ``T`` size) gives 2 -> 4: 4.5 rounds to 4, which puts the teacher at 2/3 of
    the depth, as SiT-B's 3 -> 8 (the official pairs sit at 0.57-0.71 of the depth). Depth 8 (``M``)
    gives 2 -> 6, depth 4 1 -> 3, depth 24 (L) 6 -> 18, DiT-B 3 -> 9.
    """
    c = model_config
    key = (c.family, c.depth, c.hidden_size)
    if key in _BLOCK_TABLE:
        return _BLOCK_TABLE[key]
    if c.depth < 2:
        raise ValueError(f"SRA needs a model with at least 2 blocks (student below teacher), got depth {c.depth}")
    ks = max(1, round(c.depth / 4))
    kt = min(c.depth, max(ks + 1, round(3 * c.depth / 4)))
    return ks, kt


def sra_distance(student: torch.Tensor, teacher: torch.Tensor, distance: str = "smooth-l1",
                 beta: float = 0.05) -> torch.Tensor:
    """Alignment distance between (N, T, D) head output and teacher features, in fp32.

    * ``smooth-l1``: ``smooth_l1(beta)`` averaged over batch, tokens and channels (the paper);
    * ``cosine``: ``1 - cos`` per token over channels, averaged (REPA / Self-Flow axis);
    * ``cosine-channel``: ``1 - cos`` per (sample, channel) over the tokens, averaged (what the
      official SRA code's ``F.cosine_similarity`` default ``dim=1`` computes on (N, T, D)).
    """
    if student.shape != teacher.shape:
        raise ValueError(f"SRA student {tuple(student.shape)} and teacher {tuple(teacher.shape)} shapes differ")
    s, t = student.float(), teacher.float()
    if distance == "smooth-l1":
        return F.smooth_l1_loss(s, t, beta=beta)
    if distance == "cosine":
        return (1 - F.cosine_similarity(s, t, dim=-1)).mean()
    if distance == "cosine-channel":
        return (1 - F.cosine_similarity(s, t, dim=1)).mean()
    raise ValueError(f"unknown SRA distance {distance!r}; use one of {', '.join(DISTANCES)}")


def official_weight(epoch: int, base: float, decay_start: int = 149, decay_epochs: float = 1000.0) -> float:
    """The official code's epoch schedule: ``base`` up to ``decay_start``, then
    ``base * 0.1 ** ((epoch - decay_start) / decay_epochs)``.

    With base 0.2 this is SiT-256's ``2 * 0.1 ** (1 + (epoch - 149) / 1000)`` (0.178 at epoch 200,
    0.112 at 400); DiT uses base 0.04; the 512-px variant is decay_start 99, decay_epochs 800.
    """
    if epoch <= decay_start:
        return base
    return base * 0.1 ** ((epoch - decay_start) / decay_epochs)


def _number(opts: dict, key: str, default: float) -> float:
    val = opts.get(key, default)
    if isinstance(val, bool) or not isinstance(val, (int, float)) or not math.isfinite(val):
        raise ValueError(f"sra.{key} must be a finite number, got {val!r}")
    return float(val)


def _block(opts: dict, key: str, default: int, depth: int) -> int:
    val = opts.get(key, default)
    if isinstance(val, bool) or not isinstance(val, int):
        raise ValueError(f"sra.{key} must be an integer block number (1-based), got {val!r}")
    if not 1 <= val <= depth:
        raise ValueError(f"sra.{key}={val} is out of range: this model has blocks 1..{depth} (1-based)")
    return val


@dataclass(frozen=True)
class SRAOptions:
    """SRA's options (``config.sra``), validated against the model in one place.

    Defaults: the blocks of :func:`default_blocks`, ``t_max`` 0.2, smooth-L1 with beta 0.05, and
    the official base weight of the family (SiT 0.2, DiT 0.04) for both schedules.
    """

    student_block: int
    teacher_block: int
    t_max: float = DEFAULT_T_MAX
    weight: float = 0.2
    distance: str = "smooth-l1"
    beta: float = 0.05
    schedule: str = "constant"
    decay_start: int = 149
    decay_epochs: float = 1000.0

    @classmethod
    def from_dict(cls, opts: dict | None, model_config: ModelConfig) -> "SRAOptions":
        opts = dict(opts or {})
        check_option_names(opts, cls, "sra")
        depth = model_config.depth
        ks_def, kt_def = default_blocks(model_config) if depth >= 2 else (1, 1)
        ks = _block(opts, "student_block", ks_def, depth)
        kt = _block(opts, "teacher_block", kt_def, depth)
        if depth >= 2 and ks >= kt:
            raise ValueError(f"sra.student_block ({ks}) must be shallower than sra.teacher_block ({kt}): SRA aligns "
                             "an early student block with a later teacher block")
        t_max = _number(opts, "t_max", DEFAULT_T_MAX)
        if not 0 < t_max <= 1:
            raise ValueError(f"sra.t_max must be in (0, 1], got {t_max}")
        distance = opts.get("distance", "smooth-l1")
        if distance not in DISTANCES:
            raise ValueError(f"sra.distance must be one of {', '.join(DISTANCES)}, got {distance!r}")
        schedule = opts.get("schedule", "constant")
        if schedule not in SCHEDULES:
            raise ValueError(f"sra.schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
        weight = _number(opts, "weight", _OFFICIAL_BASE[model_config.family])
        beta = _number(opts, "beta", 0.05)
        decay_start = opts.get("decay_start", 149)
        if isinstance(decay_start, bool) or not isinstance(decay_start, int) or decay_start < 0:
            raise ValueError(f"sra.decay_start must be an integer epoch >= 0, got {decay_start!r}")
        decay_epochs = _number(opts, "decay_epochs", 1000.0)
        if weight < 0 or beta <= 0 or decay_epochs <= 0:
            raise ValueError(f"sra.weight must be >= 0 and sra.beta, sra.decay_epochs > 0 "
                             f"(got weight={weight}, beta={beta}, decay_epochs={decay_epochs})")
        return cls(ks, kt, t_max, weight, distance, beta, schedule, decay_start, decay_epochs)


class SRATerm(LossTerm):
    """``lambda(epoch) * distance(ap_head(student block k_s), EMA block k_t at t_T)``."""

    name = "sra"

    def __init__(self, student_block: int, teacher_block: int, t_max: float = DEFAULT_T_MAX, weight: float = 0.2,
                 distance: str = "smooth-l1", beta: float = 0.05, schedule: str = "constant",
                 decay_start: int = 149, decay_epochs: float = 1000.0):
        self.student_block = student_block
        self.teacher_block = teacher_block
        self.t_max = t_max
        self.weight = weight
        self.distance = distance
        self.beta = beta
        self.schedule = schedule
        self.decay_start = decay_start
        self.decay_epochs = decay_epochs

    @classmethod
    def from_config(cls, config: TrainConfig, model_config: ModelConfig, objective: Objective) -> "SRATerm":
        """Validate ``config.sra`` (and the EMA teacher) against the model, before any training."""
        options = SRAOptions.from_dict(config.sra, model_config)
        if not model_config.sra_head:
            raise ValueError("SRA needs the projection head: build the model with sra_head=True "
                             "(do not override model_overrides.sra_head to false)")
        if config.ema_decay <= 0:
            raise ValueError(f"SRA's teacher is the EMA, but ema_decay is {config.ema_decay}: the teacher would be "
                             "the student itself; set ema_decay in (0, 1), e.g. 0.999 for tiny runs, 0.9999 for papers")
        kept = config.ema_decay ** config.steps
        if kept > 0.5 and config.init_from is None:  # a teacher from published weights is not random
            warnings.warn(
                f"ema_decay {config.ema_decay} over {config.steps} steps: the SRA teacher (the EMA) keeps "
                f"{kept:.0%} of its random initialisation at the end; use a faster EMA for short runs "
                f"(ema_decay <= {0.5 ** (1 / config.steps):.5f} keeps at most half; the tiny presets use 0.999 "
                f"for 1500+ steps)", stacklevel=2)
        return cls(**asdict(options))

    def project_block(self) -> int | None:
        return self.student_block

    def current_weight(self, epoch: int) -> float:
        """lambda at ``epoch`` (the trainer's 0-based epoch, as the official loop index)."""
        if self.schedule == "constant":
            return self.weight
        return official_weight(epoch, self.weight, self.decay_start, self.decay_epochs)

    @torch.no_grad()
    def teacher_features(self, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
        """(teacher block k_t output, teacher time): same x0, eps and labels, t_T <= t, no grad,
        the student's autocast, stopping after block k_t."""
        t_teacher = ctx.objective.less_noisy(ctx.t, self.t_max, ctx.generator)
        x_teacher = ctx.objective.corrupt(ctx.x0, t_teacher, ctx.eps)
        with ctx.autocast():
            feats = ctx.ema.block_features(x_teacher, t_teacher, ctx.y, [self.teacher_block], drop_labels=False)
        return feats[self.teacher_block], t_teacher

    def __call__(self, ctx: StepContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        head = ctx.feats.head
        target, _ = self.teacher_features(ctx)
        align = sra_distance(head, target, self.distance, self.beta)
        lam = self.current_weight(ctx.epoch)
        logs = {
            "loss_align": align.detach(),
            "align_weight": lam,
            "norm_head": head.detach().float().norm(dim=-1).mean(),
            "norm_target": target.float().norm(dim=-1).mean(),
        }
        return lam * align, logs
