"""The shared feature cache: one writer per cell, checksummed cells, finite values only."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from repdyn.probe.cache import FeatureCache

ROOT = Path(__file__).resolve().parents[2]


def _hold_cell(target: Path, seconds: float = 0) -> subprocess.Popen:
    """A second process mid-way through a cache cell: it fills and holds its own partial file."""
    code = (f"import numpy as np; from repdyn.probe.cache import FeatureCache; c = FeatureCache({str(target)!r}); "
            f"w = c.writer({{'k': 1}}, (4, 3)); w.write(0, np.ones((4, 3))); print('ready', flush=True); "
            f"import time; time.sleep({seconds})")
    p = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.stdout.readline().strip() == "ready"
    return p


def test_two_writers_of_one_cache_cell_both_succeed(tmp_path):
    cache = FeatureCache(tmp_path / "c")
    mine = cache.writer({"k": 1}, (4, 3))
    mine.write(0, np.full((4, 3), 2.0))
    other = _hold_cell(tmp_path / "c")  # fills and holds its own partial, then exits
    other.wait()
    theirs = FeatureCache(tmp_path / "c").writer({"k": 1}, (4, 3))
    theirs.write(0, np.full((4, 3), 2.0))
    theirs.commit()
    mine.commit()  # used to fail: the other writer had deleted the shared partial file
    assert cache.has({"k": 1}, (4, 3)) and float(cache.load({"k": 1}).sum()) == 24.0
    FeatureCache(tmp_path / "c")  # reopening removes partial files of dead processes
    assert not list((tmp_path / "c" / "cells").glob("*.partial.npy"))


def test_corrupted_cells_are_recomputed_and_nan_is_refused(tmp_path):
    cache = FeatureCache(tmp_path / "c")
    w = cache.writer({"k": 1}, (50, 8))
    w.write(0, np.random.default_rng(0).normal(size=(50, 8)))
    w.commit()
    path = next((tmp_path / "c" / "cells").glob("*.npy"))
    raw = bytearray(path.read_bytes())
    raw[-40:] = b"\x00" * 40  # header intact, values garbage
    path.write_bytes(bytes(raw))
    fresh = FeatureCache(tmp_path / "c")
    assert not fresh.has({"k": 1}, (50, 8))  # checksum mismatch: recompute
    with pytest.raises(ValueError, match="checksum"):
        fresh.load({"k": 1})
    bad = fresh.writer({"k": 2}, (2, 2))
    bad.write(0, np.array([[1.0, np.nan], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="non-finite") as e:
        bad.commit()
    assert "metrics.csv" in str(e.value) and "fp32" not in str(e.value)  # hints name only what exists
    assert not fresh.has({"k": 2}) and not list((tmp_path / "c" / "cells").glob("*.partial.npy"))
