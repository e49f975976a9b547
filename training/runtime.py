"""Runtime helpers shared by training, extraction, sampling and analysis: device choice, joining a
torchrun process group, and the one per-sample random-number scheme.

Per-sample seeding: every random draw that belongs to one image (its diffusion noise, its latent
posterior draw, its sampling noise) comes from a CPU ``torch.Generator`` seeded by
:func:`sample_seed` of (seed, stream, index). The stream names what the draw is for
(``("train", "eps")``, ``("sample",)``...), so streams never collide, and a sample's numbers depend
only on its key: not on the batch size, the batch order, the number of ranks or the device.
:data:`NOISE_SCHEME` names the scheme; the feature cache records it in every cell key, so a change
of scheme can never silently reuse stale features.
"""

from __future__ import annotations

import atexit
import hashlib
import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["resolve_device", "machine_description", "local_rank", "dist_info", "init_distributed", "dist_world", "pid_alive", "sample_seed",
           "PerSampleNoise", "noise_bank", "NOISE_SCHEME"]

NOISE_SCHEME = "torch.Generator(blake2b(seed:stream:index)) v2"


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


def dist_info() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment (0, 1, 0 without it)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), local_rank()
    return 0, 1, 0


def init_distributed(device: str | torch.device = "auto") -> tuple[int, int]:
    """Join the torchrun process group when launched by torchrun with more than one process: NCCL
    when this rank computes on a GPU, gloo otherwise. Returns (rank, world size)."""
    _, world, _ = dist_info()
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


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs (for locks and partial files left by killed runs)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def dist_world() -> tuple[int, int]:
    """(rank, world size) of the current process group, (0, 1) outside one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# ----------------------------------------------------------------------------------------------
# Per-sample random numbers
# ----------------------------------------------------------------------------------------------


def sample_seed(seed: int, *key: object) -> int:
    """A 63-bit seed from (seed, *key); stable across processes and Python versions (unlike hash())."""
    text = ":".join(str(p) for p in (int(seed), *key))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


class PerSampleNoise:
    """One CPU generator per sample; ``draw()`` gives (B, *shape) standard normal noise for the batch.

    Each generator fills ``chunk`` draws at a time (fewer small RNG calls for a many-step sampler);
    the chunk depends on the sample shape only, never on the batch, so sample i's stream depends
    only on (seed, stream, i). Draws happen on the CPU (identical on every device), then move to
    ``device``.
    """

    def __init__(self, seed: int, indices: Sequence[int], shape: Sequence[int], stream: Sequence[object] = ("sample",),
                 device: torch.device | str = "cpu", chunk: int | None = None):
        self.shape = tuple(int(s) for s in shape)
        self.device = torch.device(device)
        self.chunk = chunk or int(min(16, max(1, 2**18 // max(1, int(np.prod(self.shape))))))
        self.generators = []
        for i in indices:
            g = torch.Generator()
            g.manual_seed(sample_seed(seed, *stream, int(i)))
            self.generators.append(g)
        self._buf: torch.Tensor | None = None
        self._pos = self.chunk

    def draw(self) -> torch.Tensor:
        if self._pos == self.chunk:
            self._buf = torch.stack([torch.randn((self.chunk, *self.shape), generator=g)
                                     for g in self.generators]).to(self.device)
            self._pos = 0
        out = self._buf[:, self._pos]
        self._pos += 1
        return out

    def generator(self, row: int) -> torch.Generator:
        """Sample ``row``'s own generator (for draws that are not normal noise, e.g. a posterior)."""
        return self.generators[row]


def noise_bank(indices: Sequence[int], shape: tuple[int, ...], seed: int, *stream: object) -> torch.Tensor:
    """(len(indices), *shape) noise, one draw per sample: row i depends only on (seed, stream, index).

    The extraction grid uses ``stream = (split, "eps")``: the same eps for an image at every t, in
    every checkpoint, whatever the batch (common random numbers)."""
    if not indices.__len__():
        return torch.empty((0, *shape))
    return PerSampleNoise(seed, indices, shape, stream=stream or ("eps",), chunk=1).draw()


def machine_description() -> str:
    """The machine a result was measured on, in words (device, torch, Python)."""
    import platform

    dev = (torch.cuda.get_device_name(0) if torch.cuda.is_available()
           else f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})")
    return f"{dev}; torch {torch.__version__}; Python {platform.python_version()}"
