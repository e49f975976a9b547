"""Method loss terms (SRA, REPA, DiverseDiT) added to the generation loss, chosen by config.

A method is never a copy of the model or the trainer: it is a :class:`LossTerm` (what extra
features the student forward must return, and a loss computed from them) plus the optional
backbone parts it needs (``ModelConfig`` flags). :func:`build_loss_terms` is the one registry; the
method grammar (``sra+diverse``, ``repa+diverse``) is parsed by
:class:`repdyn.training.config.MethodSpec`. REPA's term is built first, with its encoders, because
the widths of its projectors (a backbone part) are the encoders' token widths.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from repdyn.training.config import MethodSpec, TrainConfig
from repdyn.model.backbone import ModelConfig
from repdyn.model.objectives import Objective
from repdyn.training.methods.base import LossTerm, StepContext
from repdyn.training.methods.diverse import DiverseOptions, DiversityTerm, official_pairs
from repdyn.training.methods.repa import REPAOptions, REPATerm
from repdyn.training.methods.sra import SRAOptions, SRATerm

__all__ = ["StepContext", "LossTerm", "build_loss_terms", "model_flags_for_method", "SRAOptions", "DiverseOptions",
           "REPAOptions", "REPATerm"]


def model_flags_for_method(method: str, repa: REPATerm | None = None) -> dict[str, Any]:
    """Backbone parts a method needs: the SRA head, DiverseDiT long skips and REPA's projectors
    (one per encoder of ``repa``, which a method with repa must pass)."""
    spec = MethodSpec.parse(method)
    flags: dict[str, Any] = {"sra_head": spec.sra, "long_skip": spec.diverse}
    if spec.repa:
        if repa is None:
            raise ValueError(f"--method {spec.name}: REPA's projectors are sized by its encoders; build its term "
                             "first (REPATerm.from_config) and pass it")
        flags.update(repa.model_flags())
    return flags


def build_loss_terms(config: TrainConfig, model_config: ModelConfig, objective: Objective,
                     repa: REPATerm | None = None) -> list[LossTerm]:
    """The loss terms for ``config.method`` (in the order sra, repa, diverse); validates method
    options before training starts. ``repa``: REPA's term, already built with its encoders.

    With repa+diverse, ``diverse.encoder_depth`` (which picks DiverseDiT's block pairs) defaults to
    ``repa.encoder_depth`` as the official DiverseDiT code shares one ``--encoder-depth``, unless that
    leaves no pair at this depth (small models), where it keeps its own default.
    """
    spec = MethodSpec.parse(config.method)
    terms: list[LossTerm] = []
    if spec.sra:
        terms.append(SRATerm.from_config(config, model_config, objective))
    if spec.repa:
        if repa is None:
            raise ValueError(f"--method {spec.name}: pass REPA's term, built with its encoders (REPATerm.from_config)")
        repa.check_model(model_config)
        terms.append(repa)
        if spec.diverse and "encoder_depth" not in config.diverse and model_config.depth >= 2 \
                and official_pairs(model_config.depth, repa.encoder_depth):
            config = replace(config, diverse={**config.diverse, "encoder_depth": repa.encoder_depth})
    if spec.diverse:
        terms.append(DiversityTerm.from_config(config, model_config, objective))
    return terms
