"""``probe eval``: generation metrics for a checkpoint, one row in a metrics table.

Under ``torchrun`` every rank draws a contiguous shard of the ``n`` samples (sample i depends only
on (seed, i), so the images do not depend on the number of ranks or the batch size); rank 0 gathers
them, scores and writes the row.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from repdyn.core.files import check_writable
from repdyn.core.runtime import shard_bounds
from repdyn.model import samplers
from repdyn.model.checkpoint import load_checkpoint
from repdyn.evaluation.evaluate import append_metrics_row, evaluate_checkpoint
from repdyn.evaluation.metrics import check_inception_weights
from repdyn.core.runtime import init_distributed
from repdyn.evaluation.vae import load_vae

from repdyn.commands.sample import SamplerSettings

__all__ = ["run_eval", "sharded_samples"]

_SAMPLE_KEYS = ("method", "steps", "cfg_scale", "guidance_interval", "legacy_cfg_channels", "labels", "seed",
                "batch_size")


def sharded_samples(ck: Any, n: int, rank: int, world: int, device: str, progress: bool = False,
                    **sampling: Any) -> torch.Tensor | None:
    """This rank's shard of the ``n`` samples, gathered on rank 0 (None on the other ranks)."""
    lo, hi = shard_bounds(n, rank, world)
    part = samplers.sample(ck, None, n=n, indices=range(lo, hi), device=device, progress=progress and rank == 0,
                           **sampling)
    parts: list = [None] * world
    dist.all_gather_object(parts, part)
    return torch.cat(parts) if rank == 0 else None


def run_eval(ckpt_path: str | os.PathLike, metrics_csv: str | os.PathLike | None = None, *, weights: str = "ema",
             family: str | None = None, trust: bool = False, sampler: SamplerSettings | None = None,
             vae: str | os.PathLike | None = None, num_heads: int | None = None, time_convention: str | None = None,
             **kwargs: Any) -> dict[str, Any]:
    """Evaluate one checkpoint and append its row to ``metrics_csv`` (default: ``<run>/eval_metrics.csv``
    beside the run's ``checkpoints/`` folder); returns the row (with ``metrics_csv``; {} off rank 0).
    Sampler settings come as ``sampler`` or as :func:`repdyn.evaluation.evaluate.evaluate_checkpoint`
    keywords; ``vae`` decodes a latent model's samples for the npz and Inception metrics."""
    if kwargs.get("inception_weights") is not None:
        check_inception_weights(kwargs["inception_weights"])
    device = str(kwargs.get("device", "cpu"))
    rank, world = init_distributed(device)
    ck = load_checkpoint(ckpt_path, weights=weights, family=family, num_heads=num_heads, trust=trust,
                         time_convention=time_convention)
    metrics_csv = Path(metrics_csv) if metrics_csv is not None else ck.run_dir / "eval_metrics.csv"
    if rank == 0:  # outputs checked before sampling: a read-only folder fails in seconds
        check_writable(metrics_csv, "--metrics-csv")
        if kwargs.get("npz_path") is not None:
            check_writable(kwargs["npz_path"], "--npz")
    kwargs.update(sampler.kwargs(ck.family) if sampler else {})
    if vae is not None:
        kwargs["vae"] = load_vae(vae, device)
    if world > 1:
        sampling = {k: kwargs[k] for k in _SAMPLE_KEYS if k in kwargs}
        sampling.setdefault("method", "ddpm" if ck.family == "dit" else "sde")
        kwargs["method"] = sampling["method"]
        samples = sharded_samples(ck, int(kwargs.get("n", 1000)), rank, world, device,
                                  bool(kwargs.get("progress")), **sampling)
        if rank != 0:
            return {}
        kwargs["samples"] = samples
    row = evaluate_checkpoint(ck, **kwargs)
    if ck.load_notes():
        row["checkpoint_load"] = "; ".join(ck.load_notes())  # what the loader ignored or inferred
    append_metrics_row(metrics_csv, row)
    row["metrics_csv"] = str(metrics_csv)
    row["load_notes"] = ck.load_notes()  # printed by the CLI (not a table column)
    return row
