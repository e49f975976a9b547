"""Method loss terms (SRA, DiverseDiT) added to the generation loss, chosen by config.

A method is never a copy of the model or the trainer: it is a :class:`LossTerm` (what extra
features the student forward must return, and a loss computed from them) plus the optional
backbone parts it needs (``ModelConfig`` flags). :func:`build_loss_terms` is the one registry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..config import TrainConfig
from ..models import ModelConfig
from ..objectives import Objective

__all__ = ["StepContext", "LossTerm", "build_loss_terms", "model_flags_for_method"]


@dataclass
class StepContext:
    """Everything a loss term may read in one training step (all on the training device)."""

    model: torch.nn.Module  # the unwrapped student (online) model
    ema: torch.nn.Module  # the EMA copy (SRA's teacher); never receives gradients
    objective: Objective
    x0: torch.Tensor
    eps: torch.Tensor
    t: torch.Tensor
    x_t: torch.Tensor
    y: torch.Tensor  # labels after CFG dropout, shared by student and teacher
    feats: dict[Any, torch.Tensor]  # student block outputs (1-based keys) and "head"
    step: int
    epoch: int
    autocast: Any  # a context-manager factory: the student's autocast settings
    generator: torch.Generator


class LossTerm:
    """One additive loss term. Subclasses set ``name`` and implement ``__call__``."""

    name = "term"

    def student_blocks(self) -> set[int]:
        """1-based blocks whose outputs the student forward must return."""
        return set()

    def project_block(self) -> int | None:
        """Block whose output goes through the SRA head (``feats["head"]``), if any."""
        return None

    def __call__(self, ctx: StepContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(weighted loss to add, detached scalars to log)."""
        raise NotImplementedError


def model_flags_for_method(method: str) -> dict[str, bool]:
    """Backbone parts a method needs: the SRA head and/or DiverseDiT long skips."""
    parts = set(method.split("+"))
    return {"sra_head": "sra" in parts, "long_skip": "diverse" in parts}


def build_loss_terms(config: TrainConfig, model_config: ModelConfig, objective: Objective) -> list[LossTerm]:
    """The loss terms for ``config.method``; validates method options before training starts."""
    parts = [p for p in config.method.split("+") if p != "baseline"]
    terms: list[LossTerm] = []
    for part in parts:
        if part == "sra":
            from .sra import SRATerm

            terms.append(SRATerm.from_config(config, model_config, objective))
        elif part == "diverse":
            from .diverse import DiversityTerm

            terms.append(DiversityTerm.from_config(config, model_config, objective))
        else:
            raise ValueError(f"unknown method part {part!r} in {config.method!r}")
    return terms
