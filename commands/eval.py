"""``probe eval``: generation metrics for a checkpoint, one row in a metrics table."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from training.checkpoint import load_checkpoint
from training.evaluation import append_metrics_row, evaluate_checkpoint
from training.metrics import check_inception_weights

from .sample import SamplerSettings

__all__ = ["run_eval"]


def run_eval(ckpt_path: str | os.PathLike, metrics_csv: str | os.PathLike | None = None, *, weights: str = "ema",
             family: str | None = None, trust: bool = False, sampler: SamplerSettings | None = None,
             **kwargs: Any) -> dict[str, Any]:
    """Evaluate one checkpoint and append its row to ``metrics_csv`` (default: ``<run>/eval_metrics.csv``
    beside the run's ``checkpoints/`` folder); returns the row (with ``metrics_csv``). Sampler settings
come as ``sampler`` or as :func:`training.evaluation.evaluate_checkpoint` keywords."""
    if kwargs.get("inception_weights") is not None:
        check_inception_weights(kwargs["inception_weights"])
    ck = load_checkpoint(ckpt_path, weights=weights, family=family, trust=trust)
    row = evaluate_checkpoint(ck, **(sampler.kwargs(ck.family) if sampler else {}), **kwargs)
    metrics_csv = Path(metrics_csv) if metrics_csv is not None else ck.run_dir / "eval_metrics.csv"
    append_metrics_row(metrics_csv, row)
    row["metrics_csv"] = str(metrics_csv)
    return row
