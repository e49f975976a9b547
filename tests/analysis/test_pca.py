"""Shared-basis patch-token PCA: basis, sign alignment, fixed colour scale, RGB grid."""

import numpy as np
import pytest

from repdyn.core.files import save_figure
from repdyn.analysis import pca as P


def _structured_tokens(rng, n_img=2, side=4, d=12, noise=0.1):
    """Tokens with 3 strong directions varying smoothly over the patch grid."""
    yy, xx = np.meshgrid(np.linspace(-1, 1, side), np.linspace(-1, 1, side), indexing="ij")
    fields = np.stack([xx, yy, xx * yy], -1).reshape(1, side * side, 3)
    fields = np.repeat(fields, n_img, 0) * np.array([3.0, 2.0, 1.0])
    dirs = np.linalg.qr(rng.normal(size=(d, 3)))[0].T                  # (3, d)
    return fields @ dirs + noise * rng.normal(size=(n_img, side * side, d)), dirs


def test_pca_basis_matches_svd_and_canonical_signs():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 6)) @ np.diag([5, 3, 2, 1, 0.5, 0.1])
    mean, comps, ev = P.pca_basis(x, 3)
    _, s, vt = np.linalg.svd(x - x.mean(0), full_matrices=False)
    np.testing.assert_allclose(np.abs(comps @ vt[:3].T), np.eye(3), atol=1e-10)
    np.testing.assert_allclose(ev, s[:3] ** 2 / 199)
    idx = np.abs(comps).argmax(1)
    assert (comps[np.arange(3), idx] > 0).all()
    # deterministic: the same basis for -x (signs are fixed by the convention, not the SVD)
    _, comps_neg, _ = P.pca_basis(-x, 3)
    np.testing.assert_allclose(comps_neg, comps, atol=1e-10)


def test_align_signs_without_and_with_data():
    rng = np.random.default_rng(1)
    ref = np.linalg.qr(rng.normal(size=(8, 3)))[0].T
    flipped = ref * np.array([-1, 1, -1])[:, None]
    aligned, s = P.align_signs(flipped + 0.01 * rng.normal(size=ref.shape), ref)
    np.testing.assert_array_equal(s, [-1, 1, -1])
    assert ((aligned * ref).sum(1) > 0).all()
    # with data: a second "block" whose channels are a different basis of the same signal
    x = rng.normal(size=(100, 8))
    q = np.linalg.qr(rng.normal(size=(8, 8)))[0]
    _, c1, _ = P.pca_basis(x, 3)
    _, c2, _ = P.pca_basis(x @ q, 3)
    c2_al, _ = P.align_signs(c2, c1, x @ q, x)
    p1, p2 = (x - x.mean(0)) @ c1.T, (x @ q - (x @ q).mean(0)) @ c2_al.T
    np.testing.assert_allclose(p2, p1, atol=1e-8)


def test_shared_basis_keeps_colours_comparable_along_t():
    rng = np.random.default_rng(2)
    tok, _ = _structured_tokens(rng)
    feats = {(1, 0.1): tok, (1, 0.9): 0.5 * tok, (1, 0.5): tok.copy()}
    grid = P.pca_rgb_grid(feats, basis="shared")
    a, b, c = grid.images[(1, 0.1)], grid.images[(1, 0.9)], grid.images[(1, 0.5)]
    assert a.shape == (2, 4, 4, 3) and a.min() >= 0 and a.max() <= 1
    np.testing.assert_allclose(a, c)                      # same tokens -> same colours
    assert np.ptp(b) < 0.8 * np.ptp(a)                    # fixed scale: weaker signal looks weaker
    # SRA-style per-cell PCA re-normalises each cell, hiding the difference
    per_cell = P.pca_rgb_grid(feats, basis="per_cell")
    assert np.ptp(per_cell.images[(1, 0.9)]) == pytest.approx(np.ptp(per_cell.images[(1, 0.1)]), abs=0.05)


def test_per_cell_signs_aligned_within_block():
    rng = np.random.default_rng(3)
    tok, _ = _structured_tokens(rng, noise=0.05)
    feats = {(1, t): (-1) ** i * tok + 0.05 * rng.normal(size=tok.shape) for i, t in enumerate([0.1, 0.3, 0.5])}
    grid = P.pca_rgb_grid(feats, basis="per_cell")
    first = grid.bases[(1, 0.1)].components
    for t in (0.3, 0.5):
        assert ((grid.bases[(1, t)].components * first).sum(1) > 0).all()


def test_previous_block_alignment_makes_rows_consistent():
    rng = np.random.default_rng(4)
    tok, _ = _structured_tokens(rng, noise=0.0)
    feats = {(1, 0.5): tok, (2, 0.5): -tok}           # block 2: same content, negated channels
    al = P.pca_rgb_grid(feats, align="previous_block")
    np.testing.assert_allclose(al.images[(2, 0.5)], al.images[(1, 0.5)], atol=1e-8)
    raw = P.pca_rgb_grid(feats, align="none")
    assert np.abs(raw.images[(2, 0.5)] - raw.images[(1, 0.5)]).max() > 0.3


def test_tokens_to_grid_and_errors(tmp_path):
    x = np.arange(2 * 6 * 3).reshape(2, 6, 3)
    g = P.tokens_to_grid(x, hw=(2, 3))
    assert g.shape == (2, 2, 3, 3) and g[1, 1, 0, 2] == x[1, 3, 2]
    with pytest.raises(ValueError, match="square"):
        P.tokens_to_grid(x)
    with pytest.raises(ValueError, match="token features"):
        P.pca_rgb_grid({(1, 0.5): np.zeros((4, 8))})
    from repdyn.analysis import plots
    rng = np.random.default_rng(5)
    tok, _ = _structured_tokens(rng)
    grid = P.pca_rgb_grid({(b, t): tok * b for b in (1, 2) for t in (0.2, 0.8)})
    out = save_figure(plots.plot_pca_grid(grid, inputs=rng.uniform(size=(2, 8, 8)),
                                          meta={"model": "toy", "weights": "ema"}), tmp_path / "pca", pdf=True)
    assert out.suffix == ".png" and out.stat().st_size > 1000 and out.with_suffix(".pdf").exists()
    assert not list(tmp_path.glob("*.tmp"))
