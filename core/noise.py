"""The one per-sample random-number scheme shared by training, extraction and sampling.

Per-sample seeding: every random draw that belongs to one image (its diffusion noise, its latent
posterior draw, its sampling noise) comes from a CPU ``torch.Generator`` seeded by
:func:`sample_seed` of (seed, stream, index). The stream names what the draw is for
(``("train", "eps")``, ``("sample",)``...), so streams never collide, and a sample's numbers depend
only on its key: not on the batch size, the batch order, the number of ranks or the device.
:data:`NOISE_SCHEME` names the scheme; the feature cache records it in every cell key, so a change
of scheme can never silently reuse stale features.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["sample_seed", "PerSampleNoise", "noise_bank", "NOISE_SCHEME"]

NOISE_SCHEME = "torch.Generator(blake2b(seed:stream:index)) v2"


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
