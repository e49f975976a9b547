"""probe attribute end to end on tiny trained checkpoints: it writes its files, reads the shared
feature cache and answers bad input with one ``error:`` line (the numbers are tested in tests/analysis/)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from .support import _ok, _png

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.slow]


def test_attribute_writes_patch_maps(tiny_sit_ckpt, tmp_path, cache):
    res = _ok(["attribute", tiny_sit_ckpt, "--block", "2", "--t", "0.2", "--images", "0,1,2", "--probe", "ridge",
               "--n-train", "200", "--n-test", "64", "--n-steps", "4", "--out", tmp_path, "--cache", cache, "--quiet"])
    assert "test accuracy at block 2" in res.output
    rows = pd.read_csv(tmp_path / "attribution.csv")
    assert list(rows["index"]) == [0, 1, 2] and (rows.block == 2).all() and (rows.t == 0.2).all()
    assert rows.probe_accuracy.between(0, 1).all()
    z = np.load(tmp_path / "attribution.npz")
    assert z["patch"].shape == (3, 8, 8) and z["pixel"].shape == (3, 1, 32, 32)
    assert np.abs(z["patch"]).sum() > 0
    _png(tmp_path / "attribution.png")


def test_attribute_probe_matches_cached_features(tiny_sit_ckpt, cache):
    """The attributed forward is the probed one: feature_fn on the test images reproduces the cache."""
    import torch

    from repdyn.analysis.attribution import backbone_feature_fn
    from repdyn.commands.features import FeatureSpec, load_features, load_for_analysis
    from repdyn.probe.grid import grid_noise, load_x0

    spec = FeatureSpec(n=8, cache_dir=cache, progress=False, device="cpu")
    ck = load_for_analysis(tiny_sit_ckpt, "ema", spec)
    ds, g = load_features(ck, spec, blocks=[2], ts=[0.2], n=8)
    x0 = load_x0(ds, g.indices, 0, "test")
    eps = grid_noise(g.indices, (1, 32, 32), 0, "test")
    fn = backbone_feature_fn(ck.model, 2, 0.2, eps, lambda x, e, t: ck.objective.corrupt(x, torch.full((len(x),), t), e))
    with torch.no_grad():
        np.testing.assert_allclose(fn(x0).numpy(), g.features[(2, 0.2)], atol=2e-2, rtol=1e-2)  # fp16 cache


# ---------------------------------------------------------------------------------------------
# curves, correlate
# ---------------------------------------------------------------------------------------------
