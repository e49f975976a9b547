"""``probe train``: resolve a config (preset < YAML < flags < --set) and train."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.config import TrainConfig, parse_set_overrides, resolve_config
from training.trainer import train

__all__ = ["TrainResult", "run_train"]


@dataclass
class TrainResult:
    config: TrainConfig
    checkpoint: Path | None  # the last checkpoint (None off rank 0)
    metrics: Path


def run_train(preset: str | None = None, config: str | os.PathLike | None = None, flags: dict[str, Any] | None = None,
              set_: list[str] | None = None, resume: str | os.PathLike | None = None,
              quiet: bool = False) -> TrainResult:
    overrides = dict(flags or {})
    overrides.update(parse_set_overrides(set_ or []))
    cfg = resolve_config(preset, config, overrides)
    last = train(cfg, resume=resume, quiet=quiet)
    return TrainResult(cfg, last, Path(cfg.out) / "metrics.csv")
