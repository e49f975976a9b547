"""On-disk feature cache: one fp16 ``.npy`` per (block, t) cell plus a JSON manifest.

Why this layout: a cell's size is known before it is computed (N x D), so a memory-mapped
``.npy`` can be filled batch by batch and RAM stays flat however large the split is; ``.npy``
needs nothing beyond numpy to read, maps lazily (``np.load(mmap_mode="r")``), and one file per
cell means a finished cell is never rewritten when another one is added. fp16 halves the disk
cost of fp32 and is far finer than the noise of any probe on these features.

Integrity: the manifest records each cell's sha256; a cell whose bytes changed since (garbage, a
torn copy) is recomputed, and a cell with non-finite values is never committed.

Crash safety: a cell is written to ``cells/<key>.<pid>-<random>.partial.npy`` and only renamed to
``cells/<key>.npy`` (``os.replace``, atomic on POSIX) once every row is in; the manifest entry is
added after that, by an atomic rewrite of ``manifest.json`` under a file lock. A cell is "done"
only if it is in the manifest *and* its file has the recorded shape, so an interrupted extraction
resumes by recomputing only the cells that were not done, and nothing half-written ever looks
complete.

Keys: every field that changes the numbers (checkpoint content hash, weights, block, t,
pooling, split, seed, sample set, label policy, precision, ...) goes into the key dict; its
SHA-256 names the file. A cache folder written by an incompatible format raises a one-line error
instead of being silently reused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from repdyn.core.files import atomic_write_text, check_writable, exclusive_lock, pid_alive, sha256_file

__all__ = ["DEFAULT_CACHE", "FeatureCache", "CellWriter", "LazyFeatures", "cell_key", "CACHE_FORMAT", "CACHE_VERSION"]

DEFAULT_CACHE = Path(".repdyn_cache/features")  # every command's --cache default: one cache shared by all

CACHE_FORMAT = "repdyn-feature-cache"
# v2: one per-sample noise scheme for extraction and sampling (repdyn.core.noise.NOISE_SCHEME, also in
# every cell key); v1 caches hold features drawn with the older blake2b(seed:split:index) noise.
CACHE_VERSION = 2


def _canonical(fields: Mapping) -> str:
    return json.dumps(dict(fields), sort_keys=True, separators=(",", ":"), default=str)


def _file_digest(path: Path) -> str:
    """sha256 of a cell file: a cell whose bytes changed after it was written is recomputed."""
    return sha256_file(path)


def cell_key(fields: Mapping) -> str:
    """Stable 24-hex key of a cell's identifying fields (order-insensitive)."""
    return hashlib.sha256(_canonical(fields).encode()).hexdigest()[:24]


class CellWriter:
    """Fill one cell row-block by row-block through a memory map; ``commit()`` publishes it."""

    def __init__(self, cache: "FeatureCache", fields: Mapping, shape: tuple[int, ...]):
        self.cache, self.fields, self.shape = cache, dict(fields), tuple(int(s) for s in shape)
        self.key = cell_key(self.fields)
        # per-process, per-writer name: two writers of one cell never share a file (the last rename
        # wins, with identical content); leftovers of killed runs are removed by FeatureCache
        self.partial = cache.cells_dir / f"{self.key}.{os.getpid()}-{secrets.token_hex(4)}.partial.npy"
        self.final = cache.cells_dir / f"{self.key}.npy"
        self._mm = np.lib.format.open_memmap(self.partial, mode="w+", dtype=np.float16, shape=self.shape)
        self._rows_written = 0

    def write(self, start: int, values: np.ndarray) -> None:
        """Rows ``start : start + len(values)`` (any float dtype; stored as fp16)."""
        self._mm[start : start + len(values)] = values
        self._rows_written += len(values)

    def commit(self) -> None:
        if self._rows_written < self.shape[0]:
            raise RuntimeError(f"cell {self.key}: only {self._rows_written}/{self.shape[0]} rows written")
        if not np.isfinite(self._mm).all():
            self.abort()
            where = {k: self.fields.get(k) for k in ("block", "t", "weights")}
            raise ValueError(f"non-finite features (NaN/inf) in cell {where}: the model's activations overflowed; "
                             "the checkpoint has probably diverged (check the loss in its run's metrics.csv, or "
                             "probe an earlier checkpoint)")
        self._mm.flush()
        del self._mm
        digest = _file_digest(self.partial)
        os.replace(self.partial, self.final)
        self.cache._register(self.key, self.fields, self.shape, digest)

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            del self._mm
        self.partial.unlink(missing_ok=True)


class FeatureCache:
    """A folder of cached cells. ``FeatureCache(root)`` creates or opens it.

    ``has(fields)`` / ``load(fields)`` / ``writer(fields, shape)``; ``load`` returns a read-only
    fp16 memory map (convert slices with ``np.asarray(..., np.float32)`` as you need them).
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.cells_dir = self.root / "cells"
        self.manifest_path = self.root / "manifest.json"
        check_writable(self.root, "feature cache (--cache)")  # before any extraction; --no-cache skips it
        self.cells_dir.mkdir(parents=True, exist_ok=True)
        self._verified: dict[str, tuple[int, int]] = {}  # key -> (size, mtime_ns) checked this process
        if self.manifest_path.exists():
            self._check_format(self._read_manifest())
        self._remove_orphans()

    def _remove_orphans(self) -> None:
        """Partial cells of processes that no longer run (killed mid-cell)."""
        for p in self.cells_dir.glob("*.partial.npy"):
            pid = p.name.split(".")[-3].split("-")[0] if p.name.count(".") >= 3 else ""
            alive = pid.isdigit() and pid_alive(int(pid))
            if not alive:
                p.unlink(missing_ok=True)

    # -- manifest -------------------------------------------------------------------------------
    def _check_format(self, m: dict) -> None:
        if m.get("format") != CACHE_FORMAT or m.get("version") != CACHE_VERSION:
            raise ValueError(
                f"feature cache {self.root} was written by another protocol (format {m.get('format')!r} "
                f"version {m.get('version')!r}, expected {CACHE_FORMAT!r} v{CACHE_VERSION}); "
                "use another --cache folder or delete this one"
            )

    def _read_manifest(self) -> dict:
        if not self.manifest_path.exists():
            return {"format": CACHE_FORMAT, "version": CACHE_VERSION, "cells": {}}
        try:
            m = json.loads(self.manifest_path.read_text())
        except json.JSONDecodeError:
            raise ValueError(f"feature cache manifest {self.manifest_path} is not valid JSON; delete the cache folder "
                             "or pass another --cache") from None
        if not isinstance(m, dict):
            raise ValueError(f"feature cache manifest {self.manifest_path} is not a JSON object")
        return m

    def _register(self, key: str, fields: dict, shape: tuple[int, ...], digest: str) -> None:
        with exclusive_lock(self.manifest_path):  # read-modify-write of the manifest
            m = self._read_manifest()
            self._check_format(m)
            m.setdefault("cells", {})[key] = {"fields": fields, "shape": list(shape), "dtype": "float16",
                                              "file": f"cells/{key}.npy", "sha256": digest}
            atomic_write_text(self.manifest_path, json.dumps(m, indent=1, sort_keys=True, default=str))

    def entries(self) -> dict[str, dict]:
        """All manifest entries (key -> {fields, shape, dtype, file})."""
        m = self._read_manifest()
        self._check_format(m)
        return m.get("cells", {})

    # -- cells ----------------------------------------------------------------------------------
    def _entry(self, fields: Mapping) -> dict | None:
        key = cell_key(fields)
        e = self.entries().get(key)
        if e is None:
            return None
        if _canonical(e.get("fields", {})) != _canonical(json.loads(_canonical(fields))):
            raise ValueError(f"feature cache {self.root}: entry {key} was written for different settings; "
                             "the cache is inconsistent, delete it or use another --cache")
        return e

    def has(self, fields: Mapping, shape: tuple[int, ...] | None = None) -> bool:
        """True if the cell is complete (in the manifest, file present with the recorded shape).

        ``shape``: the shape the caller expects; a finished cell of another shape means the
        cache was filled under a different protocol and raises.
        """
        e = self._entry(fields)
        if e is None:
            return False
        path = self.root / e["file"]
        if not path.exists():
            return False
        try:
            on_disk = np.load(path, mmap_mode="r").shape
        except (ValueError, OSError):
            return False  # truncated file: recompute
        if list(on_disk) != list(e["shape"]) or not self._intact(cell_key(fields), path, e):
            return False
        if shape is not None and tuple(on_disk) != tuple(shape):
            raise ValueError(f"feature cache {self.root}: cell {cell_key(fields)} has shape {tuple(on_disk)}, "
                             f"expected {tuple(shape)} (written by another protocol); delete it or use another --cache")
        return True

    def _intact(self, key: str, path: Path, entry: dict) -> bool:
        """The file still has the bytes it was written with (checked once per process and file state)."""
        st = path.stat()
        state = (st.st_size, st.st_mtime_ns)
        if self._verified.get(key) == state:
            return True
        if entry.get("sha256") != _file_digest(path):
            return False
        self._verified[key] = state
        return True

    def load(self, fields: Mapping) -> np.ndarray:
        e = self._entry(fields)
        if e is None:
            raise KeyError(f"cell not in cache {self.root}: {dict(fields)}")
        path = self.root / e["file"]
        if not self._intact(cell_key(fields), path, e):
            raise ValueError(f"feature cache {self.root}: cell {cell_key(fields)} changed on disk after it was "
                             "written (checksum mismatch); run the command again to recompute it")
        return np.load(path, mmap_mode="r")

    def writer(self, fields: Mapping, shape: tuple[int, ...]) -> CellWriter:
        return CellWriter(self, fields, shape)

    def __len__(self) -> int:
        return len(self.entries())


class LazyFeatures(Mapping):
    """Mapping (block, t) -> float32 array, read from the cache only when indexed.

    Keeps :class:`~repdyn.probe.grid.GridFeatures` light: a grid of hundreds of cells costs no RAM
    until a consumer asks for a cell.
    """

    def __init__(self, cache: FeatureCache, fields_by_cell: dict[tuple, dict]):
        self._cache, self._fields = cache, fields_by_cell

    def __getitem__(self, cell: tuple) -> np.ndarray:
        return np.asarray(self._cache.load(self._fields[cell]), dtype=np.float32)

    def __iter__(self):
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)

    def raw(self, cell: tuple) -> np.ndarray:
        """The fp16 memory map itself (no copy)."""
        return self._cache.load(self._fields[cell])
