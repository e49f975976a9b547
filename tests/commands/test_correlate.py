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
