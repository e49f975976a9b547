"""The (block, t) cells of a feature grid ``{(block, t): array}``, checked once for every measure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["grid_cells"]


def grid_cells(features: Mapping[tuple[Any, Any], Any], blocks: Sequence[Any] | None = None,
               ts: Sequence[Any] | None = None) -> tuple[list[Any], list[Any]]:
    """(blocks, ts) of the grid (default: every block and t present), after checking that every
    (block, t) pair is there: a measure over a grid with holes would silently compare fewer cells."""
    blocks = sorted({k[0] for k in features}) if blocks is None else list(blocks)
    ts = sorted({k[1] for k in features}) if ts is None else list(ts)
    missing = [(b, t) for b in blocks for t in ts if (b, t) not in features]
    if missing:
        raise ValueError(f"features lack cells {missing[:4]}{'...' if len(missing) > 4 else ''}")
    return blocks, ts
