"""probe umap end to end on tiny trained checkpoints: it writes its files, reads the shared
feature cache and answers bad input with one ``error:`` line (the numbers are tested in tests/analysis/)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from .support import _ok, _one_line_error, _png

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.slow]


class _FakeAlignedUMAP:
    """Stands in for ``umap.AlignedUMAP`` (its numba JIT costs ~30 s per process; the real one is
    tested in ``test_embedding_attribution.py``): slice i -> its first two principal components."""

    calls: list = []

    def __init__(self, **kw):
        self.kw = kw

    def fit(self, xs, relations):
        type(self).calls.append({"n_slices": len(xs), "relations": relations, **self.kw})
        self.embeddings_ = [np.linalg.svd(x - x.mean(0), full_matrices=False)[0][:, :2] for x in xs]
        return self


def test_umap_cells_and_aligned(tiny_sit_ckpt, tmp_path, cache, monkeypatch):
    import umap

    monkeypatch.setattr(umap, "AlignedUMAP", _FakeAlignedUMAP)
    _ok(["umap", tiny_sit_ckpt, "--cell", "2,0.2", "--aligned-block", "3", "--t", "0.2,0.7", "--n", "40",
         "--n-neighbors", "5", "--out", tmp_path, "--cache", cache, "--quiet"])
    df = pd.read_csv(tmp_path / "umap.csv")  # a real UMAP of the (2, 0.2) cell
    assert len(df) == 40 and {"block", "t", "sample", "x", "y", "label", "index"} <= set(df.columns)
    assert (df.block == 2).all() and (df.t == 0.2).all() and np.isfinite(df[["x", "y"]].to_numpy()).all()
    al = pd.read_csv(tmp_path / "umap_aligned.csv")
    assert len(al) == 80 and set(al.t) == {0.2, 0.7} and (al.block == 3).all()
    call = _FakeAlignedUMAP.calls[-1]
    assert call["n_slices"] == 2 and call["n_neighbors"] == 5 and call["relations"][0] == {i: i for i in range(40)}
    _png(tmp_path / "umap.png")
    _png(tmp_path / "umap_aligned.png")
    _one_line_error(["umap", tiny_sit_ckpt, "--cell", "2", "--out", tmp_path / "b", "--quiet"], "a cell is 'block,t'")
