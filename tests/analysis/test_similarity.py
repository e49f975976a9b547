"""CKA core: reference values, invariances, estimator bias, minibatch and one-pass matrices."""

import numpy as np
import pytest
import torch

from repdyn.analysis import similarity as S


@pytest.fixture(scope="module")
def demo_xy():
    """Kornblith et al. demo data: numpy seed 1337, X = randn(100, 10), Y = randn(100, 10) + X."""
    np.random.seed(1337)
    x = np.random.randn(100, 10)
    y = np.random.randn(100, 10) + x
    return x, y


def test_reference_values(demo_xy):
    x, y = demo_xy
    assert S.cka(x, y) == pytest.approx(0.55761, abs=1e-5)
    assert S.cka(x, y, debiased=True) == pytest.approx(0.51346, abs=1e-5)
    assert S.cka(x, y, kernel="rbf", threshold=0.5) == pytest.approx(0.65483, abs=1e-5)
    assert S.feature_space_linear_cka(x, y) == pytest.approx(0.55761, abs=1e-5)
    assert S.feature_space_linear_cka(x, y, debiased=True) == pytest.approx(0.51346, abs=1e-5)
    # stable entry point: tensors, float32, returns a Python float
    v = S.cka(torch.from_numpy(x).float(), torch.from_numpy(y).float(), debiased=False)
    assert isinstance(v, float) and v == pytest.approx(0.55761, abs=1e-5)
    from repdyn import analysis
    assert analysis.cka(x, y) == pytest.approx(0.55761, abs=1e-5)


def test_functional_core_pieces(demo_xy):
    x, y = demo_xy
    k, l = S.gram(x), S.gram(y)
    assert k.shape == (100, 100) and k.dtype == torch.float64
    kc = S.center(k)
    assert torch.allclose(kc.sum(0), torch.zeros(100, dtype=torch.float64), atol=1e-9)
    ku = S.center(k, unbiased=True)
    assert torch.all(torch.diagonal(ku) == 0)
    r = S.hsic(k, l) / torch.sqrt(S.hsic(k, k) * S.hsic(l, l))
    assert float(r) == pytest.approx(S.cka(x, y), abs=1e-12)
    r_u = S.hsic(k, l, True) / torch.sqrt(S.hsic(k, k, True) * S.hsic(l, l, True))
    assert float(r_u) == pytest.approx(S.cka(x, y, debiased=True), abs=1e-12)
    # RBF bandwidth uses numpy's median convention (mean of the two middle values)
    xs = torch.from_numpy(x)
    d2 = torch.cdist(xs, xs).square().numpy()
    g = S.gram_rbf(x, threshold=1.0).numpy()
    np.testing.assert_allclose(g, np.exp(-d2 / (2 * np.median(d2))), atol=1e-10)


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_invariance_rotation_and_scale(demo_xy, debiased, kernel):
    x, y = demo_xy
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(10, 10)))
    base = S.cka(x, y, debiased=debiased, kernel=kernel)
    assert S.cka(x @ q, y, debiased=debiased, kernel=kernel) == pytest.approx(base, abs=1e-9)
    assert S.cka(7.5 * x, 0.01 * y, debiased=debiased, kernel=kernel) == pytest.approx(base, abs=1e-9)
    # a non-orthogonal linear map changes it (the test can fail)
    a = np.diag(np.linspace(0.1, 10, 10))
    assert abs(S.cka(x @ a, y, debiased=debiased, kernel=kernel) - base) > 1e-3


def test_debiased_near_zero_on_independent_data():
    rng = np.random.default_rng(1)
    biased, unbiased = [], []
    for _ in range(5):
        x, y = rng.normal(size=(64, 256)), rng.normal(size=(64, 256))
        biased.append(S.cka(x, y))
        unbiased.append(S.cka(x, y, debiased=True))
    assert np.mean(biased) > 0.5           # plug-in estimator dominated by d >> n bias
    assert abs(np.mean(unbiased)) < 0.03


def test_minibatch_matches_full_data():
    rng = np.random.default_rng(2)
    n = 2048
    z = rng.normal(size=(n, 8))
    x = z @ rng.normal(size=(8, 48)) + 2.0 * rng.normal(size=(n, 48))
    y = z[:, :4] @ rng.normal(size=(4, 32)) + 2.0 * rng.normal(size=(n, 32))
    full = S.feature_space_linear_cka(x, y, debiased=True)
    mb = S.cka_matrix([x, y], method="minibatch", batch_size=256)[0, 1]
    assert mb == pytest.approx(full, abs=0.02)
    # the streaming accumulator gives the same as cka_matrix(method="minibatch")
    acc = S.MinibatchCKA(debiased=True, keep_batches=True)
    for s in range(0, n, 256):
        acc.update([x[s:s + 256], y[s:s + 256]])
    assert acc.compute()[0, 1] == pytest.approx(mb, abs=1e-12)
    lo, hi = acc.bootstrap_ci(n_boot=100)
    assert lo[0, 1] <= mb <= hi[0, 1]
    # the biased per-batch average is far from the full-data value at this batch size
    mb_biased = S.cka_matrix([x, y], debiased=False, method="minibatch", batch_size=64)[0, 1]
    assert abs(mb_biased - S.feature_space_linear_cka(x, y)) > 0.05


def _grid_features(rng, blocks=(1, 2, 3), ts=(0.2, 0.8), n=40):
    base = rng.normal(size=(n, 6))
    return {(b, t): base @ rng.normal(size=(6, 5 + b)) + t * rng.normal(size=(n, 5 + b)) for b in blocks for t in ts}


@pytest.mark.parametrize("debiased", [False, True])
def test_one_pass_grid_equals_pairwise(debiased):
    rng = np.random.default_rng(3)
    feats = _grid_features(rng)
    grid = S.cka_grid(feats, debiased=debiased, method="gram")
    keys = grid.keys_a
    assert keys[:2] == [(1, 0.2), (1, 0.8)] and len(keys) == 6
    pair = np.array([[S.cka(feats[a], feats[b], debiased=debiased) for b in keys] for a in keys])
    np.testing.assert_allclose(grid.matrix, pair, atol=1e-10)
    np.testing.assert_allclose(S.cka_grid(feats, debiased=debiased, method="feature").matrix, pair, atol=1e-10)
    # minibatch one-pass equals a pair-by-pair loop over the same batches
    mb = S.cka_grid(feats, debiased=debiased, method="minibatch", batch_size=20).matrix
    cg = {k: [S.center(S.gram(feats[k][s:s + 20]), debiased) for s in (0, 20)] for k in keys}

    def pair_mb(a, b):    # per-batch HSIC averaged over the two batches, then the CKA ratio
        h = lambda u, v: sum(S.hsic(x, y, debiased, centered=True) for x, y in zip(cg[u], cg[v]))  # noqa: E731
        return float(h(a, b) / torch.sqrt(h(a, a) * h(b, b)))
    ref = np.array([[pair_mb(a, b) for b in keys] for a in keys])
    np.testing.assert_allclose(mb, ref, atol=1e-10)
    # views
    m, rows, cols = grid.block_by_block(0.8)
    assert rows == [1, 2, 3] and m[0, 2] == pytest.approx(pair[1, 5])
    m, rows, _ = grid.t_by_t(2)
    assert rows == [0.2, 0.8] and m[0, 1] == pytest.approx(pair[2, 3])
    frame = grid.to_frame()
    assert list(frame.columns) == ["block_a", "t_a", "block_b", "t_b", "cka"] and len(frame) == 36


def test_cross_model_matrix_and_cosine():
    rng = np.random.default_rng(4)
    a = [rng.normal(size=(30, 8)) for _ in range(3)]
    b = [x + 0.5 * rng.normal(size=x.shape) for x in a[:2]]
    m = S.cross_cka_matrix(a, b, debiased=True)
    assert m.shape == (3, 2)
    ref = np.array([[S.cka(x, y, debiased=True) for y in b] for x in a])
    np.testing.assert_allclose(m, ref, atol=1e-10)
    np.testing.assert_allclose(S.cross_cka_matrix(a, b, method="feature"), ref, atol=1e-10)
    c = S.cosine_matrix(a)
    manual = np.mean(np.sum(a[0] * a[1], 1) / np.linalg.norm(a[0], axis=1) / np.linalg.norm(a[1], axis=1))
    assert c[0, 1] == pytest.approx(manual) and c[0, 0] == pytest.approx(1.0)
    mv = S.cosine_matrix(a, mode="mean_vector")
    ma, mb = a[0].mean(0), a[2].mean(0)
    assert mv[0, 2] == pytest.approx(ma @ mb / np.linalg.norm(ma) / np.linalg.norm(mb))


def test_bad_input_errors():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(10, 3)), rng.normal(size=(9, 3))
    with pytest.raises(ValueError, match="different sample counts"):
        S.cka(x, y)
    with pytest.raises(ValueError, match="different sample counts"):
        S.cross_cka_matrix([x], [y])
    with pytest.raises(ValueError, match="n >= 4"):
        S.cka(x[:3], x[:3], debiased=True)
    with pytest.raises(ValueError, match="batch_size >= 4"):
        S.cka_matrix([x, x], method="minibatch", batch_size=3)
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        S.cka(bad, x)
    with pytest.raises(ValueError, match="same width"):
        S.cosine_matrix([x, rng.normal(size=(10, 4))])
