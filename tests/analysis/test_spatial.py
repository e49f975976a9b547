"""Spatial token metrics: agreement with a naive pair-loop transcription of iREPA's definitions,
smooth-vs-shuffled ordering, grid checks."""

import numpy as np
import pytest
import torch

from repdyn.analysis import spatial as S


# --------------------------------------------------------------------------------------------
# naive transcription (loops over token pairs of one image)
# --------------------------------------------------------------------------------------------
def _unit(img):
    return img / np.maximum(np.linalg.norm(img, axis=1, keepdims=True), 1e-8)


def _pairs(h, w):
    """(i, j, Manhattan distance) for every ordered pair of distinct cells of a row-major grid."""
    for i in range(h * w):
        for j in range(h * w):
            if i != j:
                yield i, j, abs(i // w - j // w) + abs(i % w - j % w)


def ref_lds(img, h, w, far=6):
    u = _unit(img)
    local = [u[i] @ u[j] for i, j, d in _pairs(h, w) if d == 1]
    distant = [u[i] @ u[j] for i, j, d in _pairs(h, w) if d >= far]
    return np.mean(local) - np.mean(distant)


def ref_cds(img, h, w, dmax=8):
    u = _unit(img)
    ds = np.arange(1, dmax + 1)
    m = np.array([np.mean([u[i] @ u[j] for i, j, d in _pairs(h, w) if d == dd]) for dd in ds])
    slope = np.polyfit(ds, m, 1)[0]
    return -slope


def ref_rmsc(img):
    u = _unit(img)
    return np.sqrt(np.mean(np.sum((u - u.mean(0)) ** 2, axis=1)))


def ref_srss(img, fg, h, w, d_pos=1, d_neg=6):
    u = _unit(img)
    if fg.sum() < 2 or (~fg).sum() < 1:
        return np.nan
    deltas = []
    for i in np.flatnonzero(fg):
        near, far = [], []
        for j in range(h * w):
            d = abs(i // w - j // w) + abs(i % w - j % w)
            if fg[j] and 1 <= d <= d_pos:
                near.append(u[i] @ u[j])
            if not fg[j] and d >= d_neg:
                far.append(u[i] @ u[j])
        if near and far:
            deltas.append(np.mean(near) - np.mean(far))
    return np.mean(deltas) if deltas else np.nan


def smooth_grid(b, h, w, d, seed=0, noise=0.3):
    """Tokens that vary smoothly over the grid: random low-frequency waves per channel + noise."""
    rng = np.random.default_rng(seed)
    r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    out = np.empty((b, h * w, d))
    for k in range(b):
        fr, fc, ph = rng.uniform(0, 0.6, (3, d)) * np.array([[1], [1], [2 * np.pi / 0.6]])
        waves = np.sin(r.reshape(-1, 1) * fr + c.reshape(-1, 1) * fc + ph)
        out[k] = waves + noise * rng.normal(size=(h * w, d))
    return out


@pytest.fixture(scope="module")
def tokens():
    rng = np.random.default_rng(5)
    return smooth_grid(3, 8, 8, 6, seed=1) + 0.5 * rng.normal(size=(3, 64, 6))


def test_lds_cds_rmsc_agree_with_reference(tokens):
    h = w = 8
    lds, cds, rmsc = S.lds(tokens), S.cds(tokens), S.rmsc(tokens)
    assert lds.shape == cds.shape == rmsc.shape == (3,) and lds.dtype == np.float64
    for b in range(3):
        assert lds[b] == pytest.approx(ref_lds(tokens[b], h, w), abs=1e-12)
        assert cds[b] == pytest.approx(ref_cds(tokens[b], h, w), abs=1e-12)
        assert rmsc[b] == pytest.approx(ref_rmsc(tokens[b]), abs=1e-12)


def test_non_square_grid_and_options():
    x = smooth_grid(2, 5, 7, 4, seed=2)                      # 5 x 7: distances up to 10
    for b in range(2):
        assert S.lds(x, far_dist=4, grid=(5, 7))[b] == pytest.approx(ref_lds(x[b], 5, 7, far=4), abs=1e-12)
        assert S.cds(x, dmax=5, grid=(5, 7))[b] == pytest.approx(ref_cds(x[b], 5, 7, dmax=5), abs=1e-12)
    # (B, H, W, D) input is the same row-major grid; batching changes nothing
    np.testing.assert_allclose(S.lds(x.reshape(2, 5, 7, 4), far_dist=4), S.lds(x, far_dist=4, grid=(5, 7)))
    np.testing.assert_allclose(S.cds(x, dmax=5, grid=(5, 7), batch_size=1), S.cds(x, dmax=5, grid=(5, 7)), atol=1e-15)
    with pytest.raises(ValueError, match="square"):
        S.lds(x)


def test_srss_agrees_with_reference(tokens):
    rng = np.random.default_rng(9)
    masks = np.zeros((3, 64), dtype=bool)
    masks[0, [r * 8 + c for r in range(1, 5) for c in range(2, 6)]] = True     # a square object
    masks[1] = rng.random(64) < 0.4
    masks[2, 10] = True                                                          # one FG token: NaN
    got = S.srss(tokens, masks)
    for b in range(3):
        want = ref_srss(tokens[b], masks[b], 8, 8)
        if np.isnan(want):
            assert np.isnan(got[b])
        else:
            assert got[b] == pytest.approx(want, abs=1e-12)
    assert np.isnan(S.srss(tokens[:1], np.ones((1, 64)))).all()                  # no background
    np.testing.assert_allclose(S.srss(tokens, torch.from_numpy(masks).reshape(3, 8, 8)), got, equal_nan=True)


def test_smooth_beats_shuffled():
    x = smooth_grid(4, 16, 16, 8, seed=3)
    perm = np.random.default_rng(0).permutation(256)
    shuffled = x[:, perm]
    assert (S.lds(x) > S.lds(shuffled) + 0.1).all()
    assert (S.cds(x) > 0).all() and (S.cds(x) > S.cds(shuffled)).all()
    # RMSC ignores positions: a permutation of the tokens leaves it unchanged
    np.testing.assert_allclose(S.rmsc(shuffled), S.rmsc(x), atol=1e-12)
    # identical tokens: no contrast, no structure
    flat = np.repeat(x[:, :1], 256, axis=1)
    np.testing.assert_allclose(S.rmsc(flat), 0.0, atol=1e-7)
    np.testing.assert_allclose(S.lds(flat), 0.0, atol=1e-12)


def test_torch_input_and_distance_profile(tokens):
    t = torch.from_numpy(tokens).float()
    np.testing.assert_allclose(S.lds(t), S.lds(tokens), atol=1e-6)
    prof, counts = S.distance_profile(tokens)
    assert prof.shape == (3, 15) and counts.shape == (15,)
    assert counts[0] == 64 and counts[1] == 2 * 2 * 8 * 7 and counts.sum() == 64 * 64
    np.testing.assert_allclose(prof[:, 0], 1.0)
    np.testing.assert_allclose(prof[:, 1] - (prof[:, 6:] * counts[6:]).sum(1) / counts[6:].sum(), S.lds(tokens))


def test_grid_too_small():
    x = np.random.default_rng(0).normal(size=(2, 16, 4))                          # 4 x 4: distances <= 6
    S.lds(x)                                                                      # far_dist 6 is reachable
    with pytest.raises(ValueError, match=r"4x4 grid has Manhattan distances up to 6 < 8"):
        S.cds(x)
    y = np.random.default_rng(0).normal(size=(2, 9, 4))                           # 3 x 3: distances <= 4
    with pytest.raises(ValueError, match="up to 4 < 6"):
        S.lds(y)
    with pytest.raises(ValueError, match="up to 4 < 6"):
        S.srss(y, np.ones((2, 9)))
    assert S.cds(y, dmax=4).shape == (2,)
    with pytest.raises(ValueError, match="dmax"):
        S.cds(y, dmax=1)
    with pytest.raises(ValueError, match="masks"):
        S.srss(x, np.ones((2, 15)))
