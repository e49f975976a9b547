"""probe correlate end to end on tiny trained checkpoints: it writes its files, reads the shared
feature cache and answers bad input with one ``error:`` line (the numbers are tested in tests/analysis/)."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from repdyn.cli import app

from .support import _one_line_error, _png, runner

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.slow]


def _metrics_csv(run, path, values) -> None:
    """A metrics table with probe eval's key columns (checkpoint_keys) and a generation metric."""
    from repdyn.evaluation.evaluate import checkpoint_keys
    from repdyn.model.checkpoint import list_checkpoints, load_checkpoint

    rows = [{**checkpoint_keys(load_checkpoint(p)), "fd_fashion-mnist": v}
            for p, v in zip(list_checkpoints(run), values)]
    pd.DataFrame(rows).to_csv(path, index=False)


def test_correlate_joins_on_checkpoint_sha(curves_run, tmp_path):
    run, _, _ = curves_run
    metrics = tmp_path / "eval_metrics.csv"
    _metrics_csv(run, metrics, [90.0, 70.0, 50.0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = runner.invoke(app, ["correlate", str(run / "curves" / "curves.csv"), str(metrics), "--metric",
                                  "fd_fashion-mnist", "--role", "student", "--n-boot", "200",
                                  "--out", str(tmp_path / "c"), "--pdf"])
    assert res.exit_code == 0, res.output
    assert "joined 3 checkpoints on ckpt_sha" in res.output and "only 3 points" in res.output
    tab = pd.read_csv(tmp_path / "c" / "correlation.csv")
    assert {"pearson", "spearman", "kendall"} <= set(tab.method) and (tab.n == 3).all()
    assert (tab.join_key == "ckpt_sha").all() and (tab.role == "student").all()
    joined = pd.read_csv(tmp_path / "c" / "joined.csv")
    acc = pd.read_csv(run / "curves" / "curves.csv").query("role == 'student'").sort_values("step")
    np.testing.assert_allclose(joined.sort_values("step").accuracy, acc.accuracy)
    np.testing.assert_allclose(joined.sort_values("step")["fd_fashion-mnist"], [90.0, 70.0, 50.0])
    _png(tmp_path / "c" / "correlation.png")
    assert (tmp_path / "c" / "correlation.pdf").exists()


def test_correlate_bad_input(curves_run, tmp_path):
    run, _, _ = curves_run
    curves_csv = run / "curves" / "curves.csv"
    metrics = tmp_path / "m.csv"
    _metrics_csv(run, metrics, [1.0, 2.0, 3.0])
    base = ["correlate", curves_csv, metrics, "--out", tmp_path / "c"]
    _one_line_error(base + ["--metric", "fid", "--role", "student"], "has no column 'fid'")
    _one_line_error(base + ["--metric", "fd_fashion-mnist"], "several probe rows per checkpoint")
    pd.read_csv(metrics).assign(fid=np.nan).to_csv(metrics, index=False)
    _one_line_error(base + ["--metric", "fid", "--role", "student"], "is empty")
    pd.read_csv(metrics).iloc[:2].to_csv(metrics, index=False)
    _one_line_error(base + ["--metric", "fd_fashion-mnist", "--role", "student"], "at least 3 paired points")
    _one_line_error(["correlate", curves_csv, tmp_path / "nope.csv", "--metric", "fid"], "does not exist")
    assert not (tmp_path / "c" / "correlation.csv").exists()


def test_correlate_a_tidy_measure_of_the_block_curves(curves_run, tmp_path):
    """Any measure of curves_blocks.csv (here CKNNA of block 2) against the metric; points from one
    run are resampled as checkpoints, with the warning that says why that interval is too narrow."""
    run, _, _ = curves_run
    metrics = tmp_path / "eval_metrics.csv"
    _metrics_csv(run, metrics, [90.0, 70.0, 50.0])
    blocks = pd.read_csv(run / "curves" / "curves_blocks.csv", dtype={"settings_hash": str})
    default = blocks.loc[blocks.measure == "mutual_knn", "settings_hash"].iloc[0]  # other tests add other settings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = runner.invoke(app, ["correlate", str(run / "curves" / "curves_blocks.csv"), str(metrics), "--metric",
                                  "fd_fashion-mnist", "--value", "cknna", "--cell", "2,0.5", "--n-boot", "100",
                                  "--settings-hash", default, "--out", str(tmp_path / "c")])
    assert res.exit_code == 0, res.output
    assert "all points come from one run" in res.output and "bootstrap over point" in res.output
    joined = pd.read_csv(tmp_path / "c" / "joined.csv")
    mine = blocks[(blocks.settings_hash == default) & (blocks.measure == "cknna") & (blocks.block == 2)]
    want = mine.sort_values("step").value
    np.testing.assert_allclose(joined.sort_values("step").cknna, want)


def _runs_tables(tmp_path, n_runs: int = 4):
    """A tidy measure table and a metrics table of ``n_runs`` seeded runs x 3 checkpoints."""
    rng = np.random.default_rng(1)
    rows, evals = [], []
    for r in range(n_runs):
        for step in (100, 200, 300):
            sha = f"{r:02d}{step:014d}"
            x = step / 100 + r + rng.normal(0, 0.1)
            rows.append({"run": f"sra-s{r}", "checkpoint_sha": sha, "step": step, "block": 3, "t": 0.5,
                         "measure": "lds", "value": x})
            evals.append({"run": f"sra-s{r}", "ckpt_sha": sha, "step": step, "fd": 10 - x + rng.normal(0, 0.1)})
    pd.DataFrame(rows).to_csv(tmp_path / "blocks.csv", index=False)
    pd.DataFrame(evals).to_csv(tmp_path / "eval.csv", index=False)
    return tmp_path / "blocks.csv", tmp_path / "eval.csv"


@pytest.mark.parametrize("unit, shown", [("auto", "run (4 groups)"), ("seed", "seed (4 groups)"),
                                         ("checkpoint", "point")])
def test_correlate_resamples_runs_or_seeds(tmp_path, unit, shown):
    blocks, evals = _runs_tables(tmp_path)
    res = runner.invoke(app, ["correlate", str(blocks), str(evals), "--metric", "fd", "--value", "lds",
                              "--boot-unit", unit, "--n-boot", "200", "--out", str(tmp_path / unit)])
    assert res.exit_code == 0, res.output
    tab = pd.read_csv(tmp_path / unit / "correlation.csv")
    assert (tab.boot_unit == shown).all() and (tab.n == 12).all()
    assert tab.set_index("method").loc["pearson", "r"] < -0.9


def test_correlate_measure_errors(tmp_path):
    blocks, evals = _runs_tables(tmp_path)
    base = ["correlate", blocks, evals, "--metric", "fd", "--out", tmp_path / "c"]
    _one_line_error(base + ["--value", "cknna"], "no measure 'cknna'")
    _one_line_error(base + ["--value", "lds", "--boot-unit", "runs"], "--boot-unit must be one of")
    pd.read_csv(blocks).assign(run=lambda d: d.run.str.replace("-s", "_")).to_csv(blocks, index=False)
    _one_line_error(base + ["--value", "lds", "--boot-unit", "seed"], "needs run names <arm>-s<seed>")
