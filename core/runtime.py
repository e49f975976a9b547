"""Runtime helpers shared by training, extraction, sampling and analysis: device choice, joining a
torchrun process group, sharding work over its ranks, and describing the machine.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["resolve_device", "machine_description", "peak_rss_mib", "local_rank", "DistInfo", "dist_info", "init_distributed", "dist_world",
           "shard_bounds"]


# ----------------------------------------------------------------------------------------------
# Devices and process groups
# ----------------------------------------------------------------------------------------------


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` -> this rank's CUDA device when available, else CPU; ``cuda`` without an index ->
    this rank's GPU. Asking for CUDA on a machine without it is a one-line error."""
    if device is None or str(device) == "auto":
        return torch.device(f"cuda:{local_rank()}" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device} requested but no CUDA device is available; use --device cpu")
        if dev.index is None:
            dev = torch.device(f"cuda:{local_rank()}")
    return dev


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a torchrun launch."""

    rank: int
    world: int  # the number of processes
    local_rank: int  # the rank on this machine (its GPU index)


def dist_info() -> DistInfo:
    """This process's rank, world size and local rank from torchrun's environment (0, 1, 0 without it)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), local_rank())
    return DistInfo(0, 1, 0)


def init_distributed(device: str | torch.device = "auto") -> tuple[int, int]:
    """Join the torchrun process group when launched by torchrun with more than one process: NCCL
    when this rank computes on a GPU, gloo otherwise. Returns (rank, world size)."""
    world = dist_info().world
    if world > 1 and dist.is_available() and not dist.is_initialized():
        use_nccl = torch.cuda.is_available() and resolve_device(device).type == "cuda"
        if use_nccl:
            torch.cuda.set_device(local_rank())
        dist.init_process_group("nccl" if use_nccl else "gloo")
        # a rank that finishes first (e.g. after handing its shard to rank 0) must not exit with the
        # group alive: gloo's threads then abort the process ("terminate called ..."), failing torchrun
        atexit.register(_destroy_group)
    return dist_world()


def _destroy_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def dist_world() -> tuple[int, int]:
    """(rank, world size) of the current process group, (0, 1) outside one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous shard [lo, hi) of n positions for ``rank`` (sizes differ by at most one)."""
    base, extra = divmod(n, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, in MiB (Linux reports KiB), for the benchmarks."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine_description() -> str:
    """The machine a result was measured on, in words (device, torch, Python)."""
    import platform

    dev = (torch.cuda.get_device_name(0) if torch.cuda.is_available()
           else f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})")
    return f"{dev}; torch {torch.__version__}; Python {platform.python_version()}"
