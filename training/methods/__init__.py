"""Method loss terms (SRA, DiverseDiT) added to the generation loss, chosen by config.

A method is never a copy of the model or the trainer: it is a :class:`LossTerm` (what extra
features the student forward must return, and a loss computed from them) plus the optional
backbone parts it needs (``ModelConfig`` flags). :func:`build_loss_terms` is the one registry; the
method grammar (``sra+diverse``) is parsed by :class:`repdyn.training.config.MethodSpec`.
"""

from __future__ import annotations

from repdyn.training.config import MethodSpec, TrainConfig
from repdyn.model.backbone import ModelConfig
from repdyn.model.objectives import Objective
from repdyn.training.methods.base import LossTerm, StepContext
from repdyn.training.methods.diverse import DiverseOptions, DiversityTerm
from repdyn.training.methods.sra import SRAOptions, SRATerm

__all__ = ["StepContext", "LossTerm", "build_loss_terms", "model_flags_for_method", "SRAOptions", "DiverseOptions"]


def model_flags_for_method(method: str) -> dict[str, bool]:
    """Backbone parts a method needs: the SRA head and/or DiverseDiT long skips."""
    spec = MethodSpec.parse(method)
    return {"sra_head": spec.sra, "long_skip": spec.diverse}


def build_loss_terms(config: TrainConfig, model_config: ModelConfig, objective: Objective) -> list[LossTerm]:
    """The loss terms for ``config.method``; validates method options before training starts."""
    spec = MethodSpec.parse(config.method)
    terms: list[LossTerm] = []
    if spec.sra:
        terms.append(SRATerm.from_config(config, model_config, objective))
    if spec.diverse:
        terms.append(DiversityTerm.from_config(config, model_config, objective))
    return terms
