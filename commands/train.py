"""``probe train``: resolve a config (preset < YAML < flags < --set) and train."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from repdyn.model.checkpoint import latest_checkpoint, read_checkpoint
from repdyn.training.config import TrainConfig, parse_set_overrides, resolve_config
from repdyn.training.trainer import train

__all__ = ["TrainResult", "run_train"]


@dataclass
class TrainResult:
    config: TrainConfig
    checkpoint: Path | None  # the last checkpoint (None off rank 0)
    metrics: Path


def _saved_config(resume: str | os.PathLike) -> dict[str, Any]:
    path = Path(resume)
    ckpt = latest_checkpoint(path) if path.is_dir() else path
    if ckpt is None:
        raise FileNotFoundError(f"no checkpoints to resume from in {path}")
    state = read_checkpoint(ckpt, map_location="cpu")
    if not isinstance(state, dict) or "config" not in state:
        raise ValueError(f"{ckpt} is not a training checkpoint of this toolkit (needs model, ema, opt, meta, config)")
    return dict(state["config"])


def run_train(preset: str | None = None, config: str | os.PathLike | None = None, flags: dict[str, Any] | None = None,
              set_: list[str] | None = None, resume: str | os.PathLike | None = None,
              quiet: bool = False) -> TrainResult:
    """``resume`` without ``preset`` / ``config``: the run's own config, changed only by the flags given
    (the trainer refuses changes other than length, logging and place; see
    :data:`repdyn.training.trainer.RESUMABLE_CHANGES`)."""
    overrides = dict(flags or {})
    overrides.update(parse_set_overrides(set_ or []))
    if resume is not None and preset is None and config is None:
        saved = _saved_config(resume)
        overrides = {**saved, **{k: v for k, v in overrides.items() if v is not None}}
    cfg = resolve_config(preset, config, overrides)
    last = train(cfg, resume=resume, quiet=quiet)
    return TrainResult(cfg, last, Path(cfg.out) / "metrics.csv")
