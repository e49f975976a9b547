"""repdyn.probe.probes on synthetic features: separable -> ~100%, shuffled -> chance, agreement with
scikit-learn (also where a weak strength needs many iterations), convergence flags and the
layer-grid warning, the ridge / k-NN / cuML / linear-sgd paths."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from repdyn.probe.probes import DEFAULT_LAMBDAS, batched_ridge, fit_probes, holdout_split

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
    # and the full protocol (sweep + held-out choice + refit) agrees with the sklearn backend. Both at
    # tol 1e-6: at the default 1e-4 the choice of cell 0 hinges on one held-out sample whose margin at
    # the optimum is 5e-4 logits, which either solver may put on either side.
    rs = fit_probes(xtr[:2], ytr, xte[:2], yte, "sklearn", lambdas=[1e-3, 1e-2, 1e-1], tol=1e-6)
    rt = fit_probes(xtr[:2], ytr, xte[:2], yte, "torch", lambdas=[1e-3, 1e-2, 1e-1], tol=1e-6)
    assert np.abs(rs.accuracy - rt.accuracy).max() <= 0.01
    assert rt.converged.all() and rs.converged.all()


def _ill_conditioned(seed, n_tr=400, n_te=400, d=32, signal=0.5):
    """Correlated features (decaying-spectrum mixing), nearly separable in 32-D with 400 samples."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) * (np.arange(1, d + 1) ** -1.5)[:, None]
    means = rng.normal(size=(K, d)) * signal

    def draw(n):
        y = rng.integers(0, K, n)
        x = (means[y] + rng.normal(size=(n, d))) @ mix
        x[:, 0] *= 30.0
        return x[None].astype(np.float32), y

    return (*draw(n_tr), *draw(n_te))


def test_weak_strength_converges_and_matches_sklearn():
    """lambda = 1e-6 on nearly separable, ill-conditioned features: the case the old 200-iteration
    unpreconditioned solver left unconverged (1.5 points off scikit-learn on seed 1)."""
    from sklearn.linear_model import LogisticRegression

    for seed in (0, 1):
        xtr, ytr, xte, yte = _ill_conditioned(seed)
        r = fit_probes(xtr, ytr, xte, yte, "torch", lambdas=[1e-6])
        assert r.converged.all() and r.sweep_converged.all(), (r.iterations, r.sweep_iterations)
        assert r.train_accuracy[0] > 0.94  # nearly separable
        a = xtr[0].astype(np.float64)
        mu, sd = a.mean(0), a.std(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # sklearn's lbfgs needs thousands of iterations here
            clf = LogisticRegression(C=1.0 / (1e-6 * len(a)), max_iter=20000, tol=1e-6).fit((a - mu) / sd, ytr)
        acc = (clf.predict((xte[0] - mu) / sd) == yte).mean()
        assert abs(r.accuracy[0] - acc) <= 0.01, (seed, r.accuracy[0], acc)
    # the whole default grid converges on the same cell, and the chosen fit is reported as such
    r = fit_probes(xtr, ytr, xte, yte, "torch")
    assert r.sweep_converged.shape == (1, len(DEFAULT_LAMBDAS)) and r.sweep_converged.all(), r.sweep_iterations
    assert r.converged.all()


def test_convergence_flags_recorded_and_warned(hard):
    from repdyn.probe.grid import GridFeatures
    from repdyn.probe.layer_grid import TABLE_COLUMNS, grid_table

    xtr, ytr, xte, yte = hard
    r = fit_probes(xtr, ytr, xte, yte, "torch")
    n_cells, n_lam = len(xtr), len(DEFAULT_LAMBDAS)
    assert r.converged.shape == r.iterations.shape == (n_cells,) and r.converged.dtype == bool
    assert r.sweep_converged.shape == r.sweep_iterations.shape == (n_cells, n_lam)
    assert r.converged.all() and r.sweep_converged.all() and (r.iterations >= 1).all()
    # starved of iterations: the flags say so
    r2 = fit_probes(xtr, ytr, xte, yte, "torch", max_iter=2)
    assert not r2.sweep_converged.all() and not r2.converged.any() and (r2.iterations <= 2).all()

    def grid(x, y, split):
        cells = [(b, t) for t in (0.1, 0.5) for b in (1, 2, 3)]
        meta = dict(checkpoint="c.pt", weights="ema", step=1, model="SiT-T/4", method="baseline", family="sit",
                    pooling="mean", label_policy="null", dataset="synthetic", n_samples=len(y), seed=0,
                    time_convention="ours", checkpoint_sha="abc", split=split, indices_sha="def")
        return GridFeatures(features={c: x[i] for i, c in enumerate(cells)}, labels=y, blocks=[1, 2, 3],
                            ts=[0.1, 0.5], log_snr={0.1: 2.0, 0.5: 0.0}, meta=meta, indices=np.arange(len(y)))

    gtr, gte = grid(xtr, ytr, "train"), grid(xte, yte, "test")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # converged fits: no warning
        df, proto = grid_table(gtr, gte)
    assert list(df.columns) == TABLE_COLUMNS and df["converged"].all() and (df["iterations"] >= 1).all()
    assert len(proto["probe_convergence"]["sweep_converged"]) == n_cells
    with pytest.warns(UserWarning, match=r"did not converge in 6 of 6 cells: \(block 1, t 0.1\)"):
        df2, _ = grid_table(gtr, gte, max_iter=2)
    assert not df2["converged"].any()
    df3, _ = grid_table(gtr, gte, "linear-sgd", epochs=5)  # the papers' protocol through the same table
    assert (df3["probe"] == "linear-sgd").all() and (df3["reg_kind"] == "none").all()
    assert df3["reg"].isna().all() and df3["val_accuracy"].isna().all() and df3["protocol_hash"].nunique() == 1
    assert df3["protocol_hash"].iloc[0] != df["protocol_hash"].iloc[0]


def test_linear_sgd_separable_batched_and_deterministic():
    rng = np.random.default_rng(3)
    means = rng.normal(size=(K, D)) * 3.0
    xtr, ytr = _features(rng, 3, 300, 0.3, means)
    xte, yte = _features(rng, 3, 200, 0.3, means)
    r = fit_probes(xtr, ytr, xte, yte, "linear-sgd")
    assert r.accuracy.min() >= 0.97, r.accuracy
    assert np.isnan(r.reg).all() and np.isnan(r.val_accuracy).all() and r.converged.all()
    p = r.protocol
    assert (p["probe"], p["epochs"], p["batch_size"], p["lr"], p["reg_kind"], p["holdout"]) == (
        "linear-sgd", 80, 4096, 1e-3, "none", 0.0)
    assert {"schedule", "optimizer", "bn"} <= set(p) and p["steps"] == 80  # 300 < 4096: one batch per epoch
    # batched over 3 cells == each cell alone, and seeded: minibatches (batch 64, shuffled, drop_last)
    # and one whole-set batch per epoch
    for kw, steps in ((dict(epochs=4, batch_size=64, lr=1e-2), 4 * (300 // 64)), (dict(epochs=3), 3)):
        rb = fit_probes(xtr, ytr, xte, yte, "linear-sgd", seed=5, **kw)
        assert rb.protocol["steps"] == steps
        for c in range(3):
            rc = fit_probes(xtr[c : c + 1], ytr, xte[c : c + 1], yte, "linear-sgd", seed=5, **kw)
            assert rc.accuracy[0] == rb.accuracy[c] and rc.train_accuracy[0] == rb.train_accuracy[c], (kw, c)
        again = fit_probes(xtr, ytr, xte, yte, "linear-sgd", seed=5, **kw)
        np.testing.assert_array_equal(again.accuracy, rb.accuracy)
        np.testing.assert_array_equal(again.train_accuracy, rb.train_accuracy)


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
    with pytest.raises(ValueError, match="linear-sgd needs epochs >= 1"):
        fit_probes(xtr, ytr, xte, yte, "linear-sgd", epochs=0)
    with pytest.raises(ValueError, match="single class"):
        fit_probes(xtr, np.zeros_like(ytr), xte, yte, "torch")


def test_probe_sizes_warn_when_capped_and_refuse_fewer_than_two_per_class():
    import warnings

    from repdyn.probe.layer_grid import check_probe_sizes

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_probe_sizes(500, 60000, 10) == 500
    with pytest.warns(UserWarning, match="--n-train 100000 is more than the 60000 training images: using all 60000"):
        assert check_probe_sizes(100000, 60000, 10) == 60000
    with pytest.raises(ValueError, match="at least two per class: use --n-train >= 20"):
        check_probe_sizes(5, 60000, 10)
