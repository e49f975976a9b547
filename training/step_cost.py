"""The per-step cost of training methods, measured side by side (the study's equal-compute axis)."""

from __future__ import annotations

import statistics
import time

import torch

from .config import TrainConfig
from .trainer import Trainer

__all__ = ["interleaved_step_cost"]


def interleaved_step_cost(configs: dict[str, TrainConfig], rounds: int = 5, steps_per_round: int = 3,
                          warmup: int = 2) -> dict[str, float]:
    """Median seconds per full training step (forward, loss, backward, clip, AdamW, EMA) of each
    config, measured side by side: rounds alternate between the methods, so a change of machine load
    hits all of them alike and their *ratio* is a cost, not an accident of scheduling."""
    trainers = {name: Trainer(cfg, quiet=True) for name, cfg in configs.items()}
    streams = {}
    for name, tr in trainers.items():
        tr.model.train()
        streams[name] = tr._batches()
        for _ in range(warmup):
            tr.train_step(streams[name])
    times: dict[str, list[float]] = {name: [] for name in trainers}
    for _ in range(rounds):
        for name, tr in trainers.items():
            for _ in range(steps_per_round):
                if tr.device.type == "cuda":
                    torch.cuda.synchronize(tr.device)
                t0 = time.perf_counter()
                tr.train_step(streams[name])
                if tr.device.type == "cuda":
                    torch.cuda.synchronize(tr.device)
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in times.items()}
