"""Probe vs generation-quality correlation: values, partial correlation, CI coverage, joins."""

import warnings


import numpy as np
import pandas as pd
import pytest
from scipy import stats

from repdyn.core.files import save_figure
from repdyn.analysis import correlation as C


def test_point_estimates_match_scipy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=25)
    y = 0.6 * x + rng.normal(size=25)
    y[3] = y[4]                                    # a tie
    t = C.correlate(x, y, n_boot=200).set_index("method")
    assert t.loc["pearson", "r"] == pytest.approx(stats.pearsonr(x, y).statistic)
    assert t.loc["spearman", "r"] == pytest.approx(stats.spearmanr(x, y).statistic)
    assert t.loc["kendall", "r"] == pytest.approx(stats.kendalltau(x, y).statistic)
    assert t.loc["pearson", "p_value"] == pytest.approx(stats.pearsonr(x, y).pvalue)
    assert (t["ci_low"] <= t["r"]).all() and (t["r"] <= t["ci_high"]).all()


def test_partial_correlation_removes_step_confound():
    rng = np.random.default_rng(1)
    step = np.linspace(0, 1, 40)
    acc = step + 0.2 * rng.normal(size=40)
    fid = -step + 0.2 * rng.normal(size=40)       # both driven by training step only
    t = C.correlate(acc, fid, control=step, n_boot=300).set_index("method")
    assert t.loc["pearson", "r"] < -0.7
    assert abs(t.loc["partial_pearson", "r"]) < 0.35
    assert t.loc["partial_pearson", "ci_low"] < 0 < t.loc["partial_pearson", "ci_high"]
    # closed form for one control
    r = np.corrcoef([acc, fid, step])
    expected = (r[0, 1] - r[0, 2] * r[1, 2]) / np.sqrt((1 - r[0, 2] ** 2) * (1 - r[1, 2] ** 2))
    assert C.partial_correlation(acc, fid, step) == pytest.approx(expected)


def test_bootstrap_ci_coverage_roughly_nominal():
    """95% percentile-bootstrap CIs contain the population value in roughly 95% of datasets."""
    rng = np.random.default_rng(2)
    rho = 0.5
    truth = {"pearson": rho, "spearman": 6 / np.pi * np.arcsin(rho / 2), "kendall": 2 / np.pi * np.arcsin(rho)}
    hits = {m: 0 for m in truth}
    reps = 80
    cov = [[1, rho], [rho, 1]]
    for i in range(reps):
        xy = rng.multivariate_normal([0, 0], cov, size=40)
        t = C.correlate(xy[:, 0], xy[:, 1], n_boot=400, seed=i).set_index("method")
        for m, v in truth.items():
            hits[m] += t.loc[m, "ci_low"] <= v <= t.loc[m, "ci_high"]
    for m in truth:
        assert 0.82 <= hits[m] / reps <= 1.0, (m, hits[m] / reps)


def test_small_sample_warning_and_errors():
    with pytest.warns(C.SmallSampleWarning, match="only 4 points"):
        t = C.correlate([1, 2, 3, 4], [2, 1, 4, 3], n_boot=50)
    assert t["warning"].str.contains("unreliable").all()
    with warnings.catch_warnings():
        warnings.simplefilter("error", C.SmallSampleWarning)
        C.correlate(np.arange(6.0), np.arange(6.0) ** 2, n_boot=50)          # no warning at n >= 5
    with pytest.raises(ValueError, match="at least 3"):
        C.correlate([1, 2], [1, 2])
    with pytest.raises(ValueError, match="different lengths"):
        C.correlate([1, 2, 3], [1, 2, 3, 4])


def _tables():
    probe = pd.DataFrame({"checkpoint": np.repeat(["a", "b", "c", "d", "e", "f"], 2),
                          "step": np.repeat([1, 2, 3, 4, 5, 6], 2) * 1000,
                          "block": [4, 8] * 6, "t": [0.5] * 12,
                          "accuracy": np.linspace(0.3, 0.9, 12)})
    metrics = pd.DataFrame({"checkpoint": list("abcdef"), "fid": [50, 40, 33, 30, 28, 27.0]})
    return probe, metrics


def test_join_probe_metrics():
    probe, metrics = _tables()
    j = C.join_probe_metrics(probe, metrics, "fid", cell={"block": 8, "t": 0.5})
    assert list(j.columns) == ["checkpoint", "accuracy", "step", "fid"] and len(j) == 6
    assert j.loc[j.checkpoint == "c", "accuracy"].item() == pytest.approx(probe.accuracy[5])
    jm = C.join_probe_metrics(probe, metrics, "fid", agg="max")
    assert len(jm) == 6
    with pytest.raises(ValueError, match="several probe rows"):
        C.join_probe_metrics(probe, metrics, "fid")
    with pytest.raises(ValueError, match="no column 'is'"):
        C.join_probe_metrics(probe, metrics, "is")
    with pytest.raises(ValueError, match="empty"):
        C.join_probe_metrics(probe, metrics.assign(fid=np.nan), "fid", cell={"block": 8})
    with pytest.raises(ValueError, match="share no rows"):
        C.join_probe_metrics(probe, metrics.assign(checkpoint=list("uvwxyz")), "fid", cell={"block": 8})
    by = C.correlate_by(probe.merge(metrics, on="checkpoint"), "accuracy", "fid", by=["block"], n_boot=100)
    assert set(by["block"]) == {4, 8} and "partial_pearson" in set(by["method"])


def test_correlation_figure(tmp_path):
    from repdyn.analysis import plots
    rng = np.random.default_rng(3)
    x = rng.uniform(0.4, 0.9, 8)
    y = 60 - 40 * x + rng.normal(size=8)
    t = C.correlate(x, y, control=np.arange(8), n_boot=200)
    p = save_figure(plots.plot_correlation(x, y, t, hue=np.arange(8) * 1000,
                               point_labels=[f"{i}k" for i in range(8)], meta={"model": "SiT-T", "block": 4, "t": 0.5}), tmp_path / "corr.png")
    assert p.exists() and p.stat().st_size > 1000


def test_cluster_bootstrap_speaks_of_runs_not_checkpoints():
    """Four runs, eight checkpoints each, that differ only by run-level offsets in x and y (the
    pseudo-replication of checkpoints): resampling checkpoints gives a tight interval above 0;
    resampling runs shows that four runs cannot pin the relation down."""
    from repdyn.analysis.correlation import correlate

    rng = np.random.default_rng(0)
    run = np.repeat(["a", "b", "c", "d"], 8)
    x = np.repeat([0.0, 1, 2, 3], 8) + rng.normal(0, 0.15, 32)
    y = np.repeat([0.0, 2, 1, 3], 8) + rng.normal(0, 0.15, 32)
    points = correlate(x, y, methods=["pearson"]).iloc[0]
    runs = correlate(x, y, methods=["pearson"], groups=run, group_name="run").iloc[0]
    assert points["r"] == runs["r"]  # the estimate is the same; only its interval changes
    assert points["boot_unit"] == "point" and runs["boot_unit"] == "run (4 groups)"
    assert points["ci_low"] > 0.4 and runs["ci_low"] < 0 < runs["ci_high"]
    one = correlate(x[:8], y[:8], methods=["pearson"], groups=run[:8]).iloc[0]
    assert np.isnan(one["ci_low"]) and one["n_boot_valid"] == 0  # one run: no interval over runs


def test_measure_rows_reads_tidy_tables():
    from repdyn.analysis.correlation import measure_rows

    tidy = pd.DataFrame({"block": [1, 1, 2], "measure": ["cknna", "lds", "cknna"], "value": [0.1, 0.2, 0.3]})
    rows = measure_rows(tidy, "cknna")
    assert rows["cknna"].tolist() == [0.1, 0.3]
    spatial = pd.DataFrame({"metric": ["lds"], "mean": [0.5]})
    assert measure_rows(spatial, "lds")["lds"].tolist() == [0.5]
    assert measure_rows(tidy, "value") is tidy
    with pytest.raises(ValueError, match="no measure 'rmsc'.*cknna, lds"):
        measure_rows(tidy, "rmsc")
