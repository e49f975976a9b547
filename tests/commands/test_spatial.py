"""probe spatial end to end on a tiny trained checkpoint (8 x 8 tokens): files written, per-image
means and standard errors, and one ``error:`` line when the grid is too small for a threshold."""

from __future__ import annotations

import pandas as pd
import pytest

from .support import _ok, _one_line_error, _png

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.slow]


def test_spatial_grid(tiny_sit_ckpt, tmp_path, cache):
    _ok(["spatial", tiny_sit_ckpt, "--t", "0.2,0.7", "--blocks", "2,4", "--n", "16", "--out", tmp_path / "s",
         "--cache", cache, "--quiet", "--device", "cpu"])
    df = pd.read_csv(tmp_path / "s" / "spatial.csv")
    assert {"block", "t", "log_snr", "metric", "mean", "se", "n", "grid", "far_dist", "dmax"} <= set(df.columns)
    assert len(df) == 2 * 2 * 3 and set(df.metric) == {"lds", "cds", "rmsc"}
    assert (df.grid == "8x8").all() and (df.n == 16).all() and (df.se >= 0).all()
    assert df[df.metric == "rmsc"]["mean"].between(0, 1).all()
    _png(tmp_path / "s" / "spatial.png")


def test_spatial_bad_input(tiny_sit_ckpt, tmp_path, cache):
    base = ["spatial", tiny_sit_ckpt, "--out", tmp_path / "bad", "--cache", cache, "--quiet", "--t", "0.5",
            "--n", "8", "--device", "cpu"]
    _one_line_error(base + ["--far-dist", "20"], "8x8 token grid has Manhattan distances up to 14 < 20")
    _one_line_error(base + ["--dmax", "15"], "pass a smaller --dmax")
    _one_line_error(base + ["--n", "1"], "--n must be >= 2")
    assert not (tmp_path / "bad" / "spatial.csv").exists()
