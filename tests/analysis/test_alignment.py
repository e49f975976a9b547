"""kNN alignment metrics: agreement with a naive transcription of platonic-rep's definitions,
properties (identity, chance level, invariances), batching and chunking."""

import numpy as np
import pytest
import torch

from repdyn.analysis import alignment as A


# --------------------------------------------------------------------------------------------
# naive transcription of the published definitions (loops and dense matrices)
# --------------------------------------------------------------------------------------------
def ref_prepare(x, q=0.95, mode="row_mean"):
    """Clip to the q quantile of |x| (mean of per-row quantiles, or the sorted element at
    int(q * size)), then L2-normalise every row."""
    a = np.abs(x)
    if mode == "row_mean":
        c = np.mean([np.quantile(row, q) for row in a])
    else:
        c = np.sort(a.ravel())[int(q * a.size)]
    x = np.clip(x, -c, c)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def ref_neighbours(x, k):
    """For each row i, the k other rows with the largest inner product (list of lists)."""
    s = x @ x.T
    n = len(x)
    return [sorted((j for j in range(n) if j != i), key=lambda j: -s[i, j])[:k] for i in range(n)]


def ref_hsic_unbiased(k, l):
    """Song et al. (2012) eq. 5 on (possibly non-symmetric) matrices, diagonal zeroed."""
    m = len(k)
    kt, lt = k.copy(), l.copy()
    np.fill_diagonal(kt, 0.0)
    np.fill_diagonal(lt, 0.0)
    ones = np.ones(m)
    value = (np.trace(kt @ lt) + kt.sum() * lt.sum() / ((m - 1) * (m - 2))
             - 2.0 / (m - 2) * ones @ kt @ lt @ ones)
    return value / (m * (m - 3))


def ref_mask(nbrs, n):
    m = np.zeros((n, n))
    for i, row in enumerate(nbrs):
        for j in row:
            m[i, j] = 1.0
    return m


def ref_metrics(x, y, k, eps=0.0, mode="row_mean"):
    xp, yp = ref_prepare(x, mode=mode), ref_prepare(y, mode=mode)
    n = len(x)
    nx, ny = ref_neighbours(xp, k), ref_neighbours(yp, k)
    mutual = np.mean([len(set(a) & set(b)) / k for a, b in zip(nx, ny)])
    cycle = np.mean([any(i in nx[j] for j in ny[i]) for i in range(n)])
    kk, ll = xp @ xp.T, yp @ yp.T
    mx, my = ref_mask(nx, n), ref_mask(ny, n)
    both = mx * my
    cknna = ref_hsic_unbiased(both * kk, both * ll) / (
        np.sqrt(ref_hsic_unbiased(mx * kk, mx * kk) * ref_hsic_unbiased(my * ll, my * ll)) + eps)
    ucka = ref_hsic_unbiased(kk, ll) / (np.sqrt(ref_hsic_unbiased(kk, kk) * ref_hsic_unbiased(ll, ll)) + eps)
    return {"mutual_knn": mutual, "cycle_knn": cycle, "cknna": cknna, "unbiased_cka": ucka}


@pytest.fixture(scope="module")
def pair():
    """Two related representations of the same 48 inputs (a noisy linear map, different widths)."""
    rng = np.random.default_rng(7)
    x = rng.standard_t(df=3, size=(48, 9))            # heavy tails, so clipping matters
    y = x @ rng.normal(size=(9, 12)) + 0.8 * rng.normal(size=(48, 12))
    return x, y


@pytest.mark.parametrize("mode", ["row_mean", "exact"])
def test_agrees_with_reference_definitions(pair, mode):
    x, y = pair
    k = 6
    ref = ref_metrics(x, y, k, mode=mode)
    assert 0.2 < ref["mutual_knn"] < 0.9 and 0.2 < ref["cknna"] < 0.99       # a non-trivial case
    opts = dict(clip_mode=mode, chunk=5)
    assert A.mutual_knn(x, y, k, **opts) == pytest.approx(ref["mutual_knn"], abs=1e-12)
    assert A.cycle_knn(x, y, k, **opts) == pytest.approx(ref["cycle_knn"], abs=1e-12)
    assert A.cycle_knn(y, x, k, **opts) == pytest.approx(ref_metrics(y, x, k, mode=mode)["cycle_knn"], abs=1e-12)
    assert A.cknna(x, y, k, **opts) == pytest.approx(ref["cknna"], abs=1e-10)
    opts.pop("chunk")
    assert A.unbiased_cka(x, y, **opts) == pytest.approx(ref["unbiased_cka"], abs=1e-10)


def test_reference_eps_reproduced(pair):
    x, y = pair
    ref = ref_metrics(x, y, 6, eps=1e-6)
    assert A.cknna(x, y, 6, eps=1e-6) == pytest.approx(ref["cknna"], abs=1e-10)
    assert A.unbiased_cka(x, y, eps=1e-6) == pytest.approx(ref["unbiased_cka"], abs=1e-10)
    # the feature-space path (eps=0) and the Gram path agree
    assert A.unbiased_cka(x, y) == pytest.approx(A.unbiased_cka(x, y, eps=1e-300), abs=1e-12)


def test_preprocess(pair):
    x, _ = pair
    for mode in ("row_mean", "exact"):
        p = A.preprocess(x, clip_mode=mode)
        assert p.dtype == torch.float64 and p.shape == x.shape
        np.testing.assert_allclose(p.numpy(), ref_prepare(x, mode=mode), atol=1e-12)
    raw = A.preprocess(x, clip_quantile=None, normalize=False).numpy()
    np.testing.assert_allclose(raw, x)
    assert torch.allclose(A.preprocess(x, clip_quantile=None).norm(dim=1), torch.ones(len(x), dtype=torch.float64))
    with pytest.raises(ValueError):
        A.preprocess(x, clip_quantile=1.5)
    with pytest.raises(ValueError):
        A.preprocess(x, clip_mode="median")


def test_identical_and_independent():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 16))
    assert A.mutual_knn(x, x) == 1.0
    assert A.cknna(x, x) == pytest.approx(1.0, abs=1e-12)
    assert A.unbiased_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    y = rng.normal(size=(400, 16))
    chance = 10 / 399
    assert abs(A.mutual_knn(x, y) - chance) < 0.01
    assert abs(A.cknna(x, y)) < 0.1
    assert abs(A.unbiased_cka(x, y)) < 0.05


def test_invariances(pair):
    x, y = pair
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(9, 9)))
    # rotations: without elementwise clipping (which depends on the basis) nothing changes
    bare = dict(clip_quantile=None)
    for f in (A.mutual_knn, A.cknna, A.cycle_knn):
        assert f(x @ q, y, 6, **bare) == pytest.approx(f(x, y, 6, **bare), abs=1e-12)
    assert A.unbiased_cka(x @ q, y, **bare) == pytest.approx(A.unbiased_cka(x, y, **bare), abs=1e-12)
    # isotropic scaling: invariant under the full protocol (the clip level scales too)
    for f in (A.mutual_knn, A.cknna, A.cycle_knn):
        assert f(3.7 * x, 0.2 * y, 6) == pytest.approx(f(x, y, 6), abs=1e-12)
    assert A.unbiased_cka(3.7 * x, y) == pytest.approx(A.unbiased_cka(x, y), abs=1e-12)


def test_inputs_outputs_and_errors(pair):
    x, y = pair
    v = A.mutual_knn(torch.from_numpy(x).float(), torch.from_numpy(y).float(), topk=6)
    assert isinstance(v, float) and v == pytest.approx(A.mutual_knn(x, y, 6), abs=1e-12)
    assert isinstance(A.cknna(x, y), float)
    with pytest.raises(ValueError, match="topk"):
        A.mutual_knn(x, y, topk=48)
    with pytest.raises(ValueError, match="topk"):
        A.cknna(x, y, topk=1)
    with pytest.raises(ValueError, match="row counts"):
        A.mutual_knn(x, y[:-1])
    with pytest.raises(ValueError, match="NaN"):
        A.mutual_knn(np.full((48, 3), np.nan), y)


def test_chunked_equals_unchunked(pair):
    x, y = pair
    whole = A.nearest_neighbors(x, 6, chunk=None)
    parts = A.nearest_neighbors(x, 6, chunk=7)
    assert torch.equal(whole.indices, parts.indices) and torch.equal(whole.sims, parts.sims)
    for f in (A.mutual_knn, A.cknna, A.cycle_knn):
        assert f(x, y, 6, chunk=1) == f(x, y, 6, chunk=None)


def test_align_cells_equals_per_cell(pair):
    x, y = pair
    rng = np.random.default_rng(3)
    cells = {(b, t): x * (1 + b) + t * rng.normal(size=x.shape) for b in (0, 2) for t in (0.1, 0.5)}
    df = A.align_cells(y, cells, metrics=A.METRICS, topk=6, chunk=11)
    assert list(df.columns) == ["block", "t", *A.METRICS, "n", "topk"]
    assert list(zip(df.block, df.t)) == list(cells)
    for row, (key, c) in zip(df.itertuples(), cells.items()):
        assert row.mutual_knn == A.mutual_knn(c, y, 6)
        assert row.cknna == pytest.approx(A.cknna(c, y, 6), abs=1e-12)
        assert row.cycle_knn == A.cycle_knn(c, y, 6)
        assert row.unbiased_cka == pytest.approx(A.unbiased_cka(c, y), abs=1e-12)
    seq = A.align_cells(y, list(cells.values()), metrics=["mutual_knn"], topk=6)
    assert list(seq.columns) == ["key", "mutual_knn", "n", "topk"] and list(seq.key) == [0, 1, 2, 3]
    np.testing.assert_array_equal(seq.mutual_knn.to_numpy(), df.mutual_knn.to_numpy())
    with pytest.raises(ValueError, match="unknown metrics"):
        A.align_cells(y, cells, metrics=["svcca"])
    with pytest.raises(ValueError, match="rows"):
        A.align_cells(y, {"a": x[:-2]})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_matches_cpu(pair):
    x, y = pair
    df_cpu = A.align_cells(y, {"a": x}, metrics=A.METRICS, topk=6)
    df_gpu = A.align_cells(y, {"a": x}, metrics=A.METRICS, topk=6, device="cuda")
    for m in A.METRICS:
        assert df_gpu[m].iloc[0] == pytest.approx(df_cpu[m].iloc[0], abs=1e-9)
