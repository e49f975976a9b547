"""probe similarity end to end on tiny trained checkpoints: it writes its files, reads the shared
feature cache and answers bad input with one ``error:`` line (the numbers are tested in tests/analysis/)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from .support import _n_cells, _ok, _one_line_error, _png

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.slow]


def test_similarity_grid_cross_model_and_cache(tiny_sit_ckpt, tmp_path, cache):
    common = ["--t", "0.2,0.7", "--n", "48", "--cache", cache, "--quiet", "--device", "cpu"]
    _ok(["similarity", tiny_sit_ckpt, "--out", tmp_path / "s", *common])
    df = pd.read_csv(tmp_path / "s" / "cka.csv")
    assert len(df) == (4 * 2) ** 2  # the full (blocks*t)^2 grid, tidy
    assert {"block_a", "t_a", "log_snr_a", "block_b", "t_b", "log_snr_b", "cka", "cosine"} <= set(df.columns)
    z = np.load(tmp_path / "s" / "cka.npz")
    m = z["cka"]
    assert m.shape == (8, 8) and np.allclose(np.diag(m), 1) and np.allclose(m, m.T)
    for name in ("cka_grid", "cka_block_by_block", "cka_t_by_t"):
        _png(tmp_path / "s" / f"{name}.png")
    cells = _n_cells(cache)
    # teacher EMA vs student online: the EMA cells come from the cache, only the online ones are new
    _ok(["similarity", tiny_sit_ckpt, "--weights", "ema", "--other-weights", "model", "--out", tmp_path / "x", *common])
    assert _n_cells(cache) == cells + 8
    x = pd.read_csv(tmp_path / "x" / "cross_cka.csv")
    assert len(x) == 64 and set(x.model_b) == {f"{tiny_sit_ckpt.name}:model"}
    same = x[(x.block_a == x.block_b) & (x.t_a == x.t_b)]
    assert same.cka.between(0.5, 1.0 + 1e-9).all()  # EMA (decay 0.9) close to the online weights
    _png(tmp_path / "x" / "cross_cka_grid.png")
    _png(tmp_path / "x" / "cross_cka_same_cell.png")
    # the same checkpoint against itself: identical features, cross CKA == within CKA
    _ok(["similarity", tiny_sit_ckpt, "--other", tiny_sit_ckpt, "--out", tmp_path / "self", *common])
    assert np.allclose(np.load(tmp_path / "self" / "cross_cka.npz")["cka"], m, atol=1e-8)
    assert _n_cells(cache) == cells + 8  # nothing re-extracted


def test_similarity_bad_input(tiny_sit_ckpt, tmp_path, cache):
    base = ["similarity", tiny_sit_ckpt, "--out", tmp_path / "bad", "--cache", cache, "--quiet", "--t", "0.5"]
    _one_line_error(base + ["--n", "3"], "too few samples for the debiased CKA")
    _one_line_error(base + ["--blocks", "9"], "block 9 is out of range")
    _one_line_error(base + ["--weights", "best"], "--weights must be ema or model")
    assert not (tmp_path / "bad" / "cka.csv").exists()


def test_cross_similarity_refuses_mismatched_samples():
    from repdyn.commands.similarity import cross_similarity
    from repdyn.probe.grid import GridFeatures

    def grid(n, start=0):
        rng = np.random.default_rng(n + start)
        return GridFeatures(features={(1, 0.5): rng.normal(size=(n, 8)).astype(np.float32)},
                            labels=np.zeros(n, dtype=np.int64), blocks=[1], ts=[0.5], log_snr={0.5: 0.0},
                            meta={"dataset": "fashion-mnist"}, indices=np.arange(start, start + n))

    with pytest.raises(ValueError, match="mismatched sample counts between models: 20 vs 30"):
        cross_similarity(grid(20), grid(30))
    with pytest.raises(ValueError, match="saw different images"):
        cross_similarity(grid(20), grid(20, start=5))
    assert cross_similarity(grid(20), grid(20)).matrix.shape == (1, 1)


# ---------------------------------------------------------------------------------------------
# diversity, pca, umap, attribute
# ---------------------------------------------------------------------------------------------
