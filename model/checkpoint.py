"""Checkpoints: atomic writes, listing a run's files, and one loader for ours and published ones.

Our layout is the REPA/SRA one users know, ``{"model", "ema", "opt", "steps", "epoch"}``, plus
``config`` (the training config as a plain dict) and ``meta`` (family, time convention, data,
method hyper-parameters, RNG states, data position). Everything in it is tensors and plain Python
values, so ``torch.load(path, weights_only=True)`` reads it.

:func:`load_checkpoint` also takes published files: a raw state dict (facebookresearch/DiT,
willisma/SiT releases) or a ``{"model", "ema", ...}`` dict (REPA / SRA / DiverseDiT); what they are
is inferred in :mod:`repdyn.model.foreign` and recorded in ``LoadedCheckpoint.inferred`` with how
it was decided. Known training-only heads (REPA ``projectors.*``) are dropped and listed in
``ignored_keys``; any other key the model does not have is an error. ``ck.load_notes()`` says all
of it in one line per fact. Files are read by :mod:`repdyn.model.torch_file`.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from repdyn.core.files import save_torch
from repdyn.model.backbone import DiffusionTransformer, ModelConfig
from repdyn.model.foreign import TRAINING_ONLY_HEADS, foreign_layout, strip_wrapper_prefixes
from repdyn.model.objectives import Objective, make_objective
from repdyn.model.torch_file import file_sha, read_checkpoint

__all__ = ["save_checkpoint", "load_checkpoint", "LoadedCheckpoint", "list_checkpoints", "latest_checkpoint",
           "run_dir_of", "checkpoint_from", "CKPT_RE", "ema_init_fraction", "init_fraction", "warn_immature_ema",
           "file_sha"]  # file_sha: re-exported, the study's plan imports it from here

CKPT_RE = re.compile(r"^(\d+)\.pt$")


def save_checkpoint(state: dict, path: str | os.PathLike) -> Path:
    """Write ``state`` to ``path`` atomically (temp file in the same folder, fsync, rename)."""
    return save_torch(state, path)


def run_dir_of(path: str | os.PathLike) -> Path:
    """The run folder of a checkpoint: ``<run>`` for ``<run>/checkpoints/NNNNNNN.pt``, else its folder."""
    p = Path(path).resolve()
    return p.parent.parent if p.parent.name == "checkpoints" else p.parent


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """``<run>/checkpoints/NNNNNNN.pt`` sorted by step (also accepts the checkpoints folder itself)."""
    run_dir = Path(run_dir)
    folder = run_dir / "checkpoints" if (run_dir / "checkpoints").is_dir() else run_dir
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CKPT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


@dataclass
class LoadedCheckpoint:
    model: DiffusionTransformer
    weights: str
    meta: dict
    config: dict
    objective: Objective
    path: Path
    sha: str
    step: int | None
    ignored_keys: list[str] = field(default_factory=list)
    # What the loader decided itself for a foreign file: name -> "value (how)"; {} for ours.
    inferred: dict[str, str] = field(default_factory=dict)
    # Other facts the user should see, one line each (e.g. --weights model on a one-set release).
    notes: list[str] = field(default_factory=list)

    def load_notes(self) -> list[str]:
        """One line per ignored key group and per inferred fact (empty for our own checkpoints), e.g.
        ``ignored 6 training-only keys: projectors.* (REPA projector heads)``,
        ``inferred family sit from args.path_type``."""
        notes = []
        rest = list(self.ignored_keys)
        for prefix, label in TRAINING_ONLY_HEADS.items():
            hit = [k for k in rest if k.startswith(prefix)]
            if hit:
                notes.append(f"ignored {len(hit)} training-only key{'s' * (len(hit) != 1)}: {prefix}* ({label})")
                rest = [k for k in rest if not k.startswith(prefix)]
        if rest:
            more = ", ..." if len(rest) > 4 else ""
            plural = "s" * (len(rest) != 1)
            notes.append(f"ignored {len(rest)} key{plural} not in the model: {', '.join(rest[:4])}{more}")
        for name, text in self.inferred.items():
            value, sep, how = text.partition(" (")
            if sep and how.endswith(")"):
                notes.append(f"inferred {name} {value} {how[:-1]}")
            else:
                notes.append(f"inferred {name} {text}")
        return notes + list(self.notes)

    @property
    def family(self) -> str:
        """``dit`` or ``sit``."""
        return self.meta["family"]

    @property
    def num_timesteps(self) -> int:
        """DDPM steps T (DiT); 1000 where the file does not say."""
        return int(self.meta.get("num_timesteps") or 1000)

    @property
    def time_convention(self) -> str:
        """How the network reads t: ``flow-t1-noise`` (ours, REPA/SRA), ``flow-t0-noise`` (willisma/SiT),
        ``ddpm-t999-noisiest`` (DiT)."""
        return self.meta.get("time_convention") or ("flow-t1-noise" if self.family == "sit" else "ddpm-t999-noisiest")

    @property
    def num_classes(self) -> int:
        return int(self.meta.get("num_classes") or self.model.y_embedder.num_classes)

    @property
    def data(self) -> str | None:
        """The dataset spec the run trained on (None for foreign files)."""
        return self.meta.get("data")

    def dataset_inputs(self) -> dict[str, int]:
        """What the network takes, as :func:`repdyn.datasets.sources.make_dataset` keywords: data follow
        the model (a grayscale folder for a one-channel model, RGB for three; a folder's image size)."""
        cfg = self.model.config
        return {"channels": int(cfg.in_channels), "image_size": int(cfg.input_size)}

    @property
    def run_dir(self) -> Path:
        return run_dir_of(self.path)

    @property
    def run_name(self) -> str:
        return self.run_dir.name



def load_checkpoint(path: str | os.PathLike, weights: str = "ema", *, family: str | None = None,
                    time_convention: str | None = None, num_heads: int | None = None, trust: bool = False,
                    map_location: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Model (eval mode) + meta from our checkpoint or a published DiT/SiT/REPA/SRA/DiverseDiT file.

    ``weights``: "ema" (default, what papers sample and probe) or "model" (online weights).
    ``family`` / ``time_convention`` / ``num_heads``: needed only for foreign files whose layout and
    training args do not settle them; what was inferred is in ``.inferred`` / ``.load_notes()``.
    """
    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    path = Path(path)
    file = read_checkpoint(path, trust=trust, map_location=map_location)
    return checkpoint_from(file.obj, path, weights, family=family, time_convention=time_convention,
                           num_heads=num_heads, sha=file.sha)


def checkpoint_from(obj: Any, path: Path, weights: str = "ema", *, family: str | None = None,
                    time_convention: str | None = None, num_heads: int | None = None,
                    sha: str) -> LoadedCheckpoint:
    """:func:`load_checkpoint` on a file already read (``obj``): a caller that needs both weight sets
    (a warm start) reads a large file once. ``sha``: its :func:`file_sha`, taken while it was read."""
    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict or state dict")
    if family is not None and family not in ("dit", "sit"):
        raise ValueError(f"--family must be dit or sit, got {family!r}")

    if "meta" in obj and "config" in obj and "model" in obj:  # ours
        foreign = False
        meta = dict(obj["meta"])
        if family is not None and meta.get("family") not in (None, family):
            raise ValueError(f"--family {family} contradicts {path.name}: it is a {meta['family']} checkpoint "
                             "(recorded by the trainer); drop --family")
        cfg = ModelConfig.from_dict(meta["model_config"])
        if weights not in obj:
            raise ValueError(f"{path} has no {weights!r} weights; available: model, ema")
        sd = strip_wrapper_prefixes(obj[weights])
        config = dict(obj["config"])
        step = obj.get("steps")
        inferred: dict[str, str] = {}
        load_notes: list[str] = []
    else:  # foreign
        foreign = True
        layout = foreign_layout(obj, path, weights, family=family, time_convention=time_convention,
                                num_heads=num_heads)
        sd, cfg, meta, step = layout.state_dict, layout.config, layout.meta, layout.step
        inferred, load_notes = layout.inferred, layout.notes
        config = {}

    model = DiffusionTransformer(cfg)
    own = model.state_dict()
    expected = set(own)
    missing = sorted(expected - set(sd))
    if missing:
        raise ValueError(f"{path.name} is missing {len(missing)} parameter(s) for a {cfg.depth}-block "
                         f"{cfg.family.upper()} (e.g. {', '.join(missing[:4])})")
    extra = set(sd) - expected
    if foreign:
        ignored = sorted(k for k in extra if k.startswith(tuple(TRAINING_ONLY_HEADS)))
        unexpected = sorted(extra - set(ignored))
        if unexpected:
            more = f" and {len(unexpected) - 4} more" if len(unexpected) > 4 else ""
            raise ValueError(f"{path.name} has {len(unexpected)} key(s) that are neither part of a {cfg.depth}-block "
                             f"{cfg.family.upper()} nor a known training-only head: {', '.join(unexpected[:4])}{more} "
                             "(a variant this loader does not build; not loading it without them)")
    else:
        ignored = sorted(extra)
    for k in expected:
        if sd[k].shape != own[k].shape:
            raise ValueError(f"{path.name}: parameter {k} has shape {tuple(sd[k].shape)}, "
                             f"expected {tuple(own[k].shape)}")
    model.load_state_dict({k: sd[k] for k in expected})
    model.eval().requires_grad_(False)
    objective = make_objective(meta["family"], path=meta.get("path", "linear"),
                               learn_sigma=bool(meta.get("learn_sigma", True)),
                               num_timesteps=int(meta.get("num_timesteps", 1000)))
    ck = LoadedCheckpoint(model=model, weights=weights, meta=meta, config=config, objective=objective, path=path,
                          sha=sha, step=step, ignored_keys=ignored, inferred=inferred, notes=load_notes)
    warn_immature_ema(ck)
    return ck


def ema_init_fraction(ck: LoadedCheckpoint) -> float | None:
    """How much of the EMA weights is still the random initialisation: the product of the per-step
    decays since step 0 (the trainer's EMA starts as a copy of the initial model and decays at a
    constant rate). None where the file does not say (published files, a run started from published
    weights whose step count was unknown) or for the online weights."""
    decay = ck.config.get("ema_decay")
    warm = ck.meta.get("warm_start")
    if ck.weights != "ema" or decay is None or ck.step is None or (warm and warm.get("steps") is None):
        return None
    return init_fraction(decay, ck.step)


def init_fraction(decay: float | None, step: float) -> float:
    """The share of its initial weights an EMA still holds after ``step`` updates: the product of the
    per-step decays since step 0, ``decay ** step`` (the trainer's EMA starts as a copy of the
    initial model and uses a constant decay). NaN when the decay is unknown."""
    if decay is None or not math.isfinite(float(decay)) or not math.isfinite(float(step)):
        return math.nan
    return float(decay) ** float(step)


MAX_INIT_FRACTION = 0.10  # above this, probes and samples of the EMA mostly describe the initialisation


def warn_immature_ema(ck: LoadedCheckpoint) -> None:
    """Warn when probing or sampling an EMA that is still more than 10% its initialisation (any method:
    a 40-step baseline at decay 0.999 gives CKA 1.00 between all blocks and chance-level probes)."""
    frac = ema_init_fraction(ck)
    if frac is not None and frac > MAX_INIT_FRACTION:
        warnings.warn(f"{ck.path.name}: its EMA weights are still {frac:.0%} the random initialisation "
                      f"(ema_decay {ck.config['ema_decay']} over {ck.step} steps); results describe the "
                      "initialisation more than training: use a later checkpoint or --weights model", stacklevel=2)
