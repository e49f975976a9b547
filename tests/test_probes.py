"""probe.probes on synthetic features: separable -> ~100%, shuffled -> chance, agreement with
scikit-learn, the ridge / k-NN / cuML paths."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from probe.probes import batched_ridge, fit_probes, holdout_split

pytestmark = pytest.mark.usefixtures("single_thread")

K, D = 5, 24


def _features(rng, cells, n, noise, means):
    y = rng.integers(0, K, n)
    x = means[y][None] + noise * rng.normal(size=(cells, n, D))
    x[:, :, 0] *= 40.0  # a "massive" channel and an offset: standardisation must handle them
    x[:, :, 1] += 25.0
    return x.astype(np.float32), y


@pytest.fixture(scope="module")
def hard():
    rng = np.random.default_rng(0)
    means = rng.normal(size=(K, D)) * 0.45
    xtr, ytr = _features(rng, 6, 600, 1.0, means)
    xte, yte = _features(rng, 6, 400, 1.0, means)
    return xtr, ytr, xte, yte


def test_linearly_separable_reaches_100(hard):
    rng = np.random.default_rng(1)
    means = rng.normal(size=(K, D)) * 3.0
    xtr, ytr = _features(rng, 4, 300, 0.05, means)
    xte, yte = _features(rng, 4, 200, 0.05, means)
    for probe in ("torch", "ridge", "knn"):
        r = fit_probes(xtr, ytr, xte, yte, probe)
        assert r.accuracy.min() >= 0.99, (probe, r.accuracy)


def test_shuffled_labels_give_chance(hard):
    xtr, ytr, xte, yte = hard
    r = fit_probes(xtr, np.random.default_rng(2).permutation(ytr), xte, yte, "torch")
    assert abs(r.accuracy.mean() - 1 / K) < 0.06, r.accuracy
    real = fit_probes(xtr, ytr, xte, yte, "torch")
    assert real.accuracy.min() > 0.6  # the same features do carry the labels
    assert set(real.protocol) >= {"probe", "reg_grid", "holdout", "n_train", "n_test", "standardise"}


def test_torch_within_one_point_of_sklearn(hard):
    from sklearn.linear_model import LogisticRegression

    xtr, ytr, xte, yte = hard
    lam = 1e-2
    r = fit_probes(xtr, ytr, xte, yte, "torch", lambdas=[lam])
    for c in range(len(xtr)):
        mu, sd = xtr[c].mean(0), xtr[c].std(0)
        clf = LogisticRegression(C=1.0 / (lam * len(ytr)), max_iter=1000, tol=1e-6)
        clf.fit((xtr[c] - mu) / sd, ytr)
        acc = (clf.predict((xte[c] - mu) / sd) == yte).mean()
        assert abs(r.accuracy[c] - acc) <= 0.01, (c, r.accuracy[c], acc)
    # and the full protocol (sweep + held-out choice + refit) agrees with the sklearn backend
    rs = fit_probes(xtr[:2], ytr, xte[:2], yte, "sklearn", lambdas=[1e-3, 1e-2, 1e-1])
    rt = fit_probes(xtr[:2], ytr, xte[:2], yte, "torch", lambdas=[1e-3, 1e-2, 1e-1])
    assert np.abs(rs.accuracy - rt.accuracy).max() <= 0.01


def test_ridge_matches_closed_form_primal_and_dual():
    g = torch.Generator().manual_seed(0)
    for n, d in ((50, 8), (8, 50)):
        x = torch.randn(2, n, d, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (n,), generator=g)
        w = batched_ridge(x, y, 3, torch.tensor([0.5], dtype=torch.float64))[:, 0]
        yc = torch.nn.functional.one_hot(y, 3).double()
        yc -= yc.mean(0)
        for c in range(2):
            ref = torch.linalg.solve(x[c].T @ x[c] / n + 0.5 * torch.eye(d, dtype=torch.float64), x[c].T @ yc / n)
            torch.testing.assert_close(w[c], ref)


def test_holdout_keeps_groups_together_and_tokens_probe():
    groups = np.repeat(np.arange(20), 4)
    fit, val = holdout_split(len(groups), 0.2, seed=0, groups=groups)
    assert not set(groups[fit]) & set(groups[val]) and val.sum() == 16


def test_cuml_without_gpu_and_unknown_probe(hard):
    xtr, ytr, xte, yte = hard
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuML needs a CUDA GPU; use --probe torch"):
            fit_probes(xtr, ytr, xte, yte, "cuml")
    with pytest.raises(ValueError, match="unknown probe"):
        fit_probes(xtr, ytr, xte, yte, "svm")
    with pytest.raises(ValueError, match="single class"):
        fit_probes(xtr, np.zeros_like(ytr), xte, yte, "torch")
