"""The contract between the trainer and a method: :class:`StepContext` in, :class:`LossTerm` out.

Kept in a module of its own so that the method modules (``sra``, ``repa``, ``diverse``) and the
registry in ``training/methods/__init__.py`` can both import it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch

from repdyn.model.backbone import Features
from repdyn.model.objectives import Objective

__all__ = ["StepContext", "LossTerm", "check_option_names"]


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
    feats: Features  # the student forward: block outputs, SRA head, REPA projections
    step: int
    epoch: int
    autocast: Any  # a context-manager factory: the student's autocast settings
    generator: torch.Generator
    indices: torch.Tensor | None = None  # the batch's dataset indices (precomputed REPA targets)


class LossTerm:
    """One additive loss term. Subclasses set ``name`` and implement ``__call__``."""

    name = "term"

    def student_blocks(self) -> set[int]:
        """1-based blocks whose outputs the student forward must return."""
        return set()

    def project_block(self) -> int | None:
        """Block whose output goes through the SRA head (``feats.head``), if any."""
        return None

    def repa_block(self) -> int | None:
        """Block whose output goes through the REPA projectors (``feats.repa[j]``), if any."""
        return None

    def __call__(self, ctx: StepContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(weighted loss to add, detached scalars to log)."""
        raise NotImplementedError


def check_option_names(opts: dict, options_type: type, section: str) -> None:
    """One-line error naming unknown keys of a method's config section (e.g. ``sra``)."""
    names = {f.name for f in fields(options_type)}
    unknown = set(opts) - names
    if unknown:
        raise ValueError(f"unknown {section} option(s) {sorted(unknown)}; valid: {sorted(names)}")
