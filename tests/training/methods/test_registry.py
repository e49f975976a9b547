"""Every method trains on Fashion-MNIST (finite, decreasing generation loss, its columns logged) and
its checkpoints load for probing (SRA head and long-skip fusion parameters handled).

One tiny run per method, shared by the tests of this module: SiT baseline, SiT SRA, SiT DiverseDiT
and DiT SRA+DiverseDiT (so both families and both method parts are covered) — 200 steps each.
"""

from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path

import pytest
import torch

from repdyn.model.checkpoint import load_checkpoint
from repdyn.training.config import TrainConfig
from repdyn.training.trainer import train

HAVE_FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists()
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not HAVE_FMNIST, reason="Fashion-MNIST not installed (make data)")]

STEPS, LOG_EVERY, WINDOW = 200, 10, 50
RUNS = {  # name -> (model, method)
    "sit-baseline": ("SiT-T/8", "baseline"),
    "sit-sra": ("SiT-T/8", "sra"),
    "sit-diverse": ("SiT-T/8", "diverse"),
    "dit-sra+diverse": ("DiT-T/8", "sra+diverse"),
}
SRA_COLUMNS = {"loss_align", "align_weight", "norm_head", "norm_target"}
DIV_COLUMNS = {"loss_div", "div_orth", "div_mi", "div_disp", "div_weight"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Train each method once (one intra-op thread: several times faster on a shared 2-core CPU)."""
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("methods")
    out = {}
    try:
        for name, (model, method) in RUNS.items():
            cfg = TrainConfig(model=model, method=method, model_overrides={"depth": 4, "hidden_size": 32},
                              batch_size=16, steps=STEPS, lr=1e-3, ema_decay=0.99, log_every=LOG_EVERY,
                              out=str(root / name), device="cpu", seed=0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # tensorboard / EMA-speed notes are not under test here
                ckpt = train(cfg, quiet=True)
            with open(root / name / "metrics.csv") as f:
                out[name] = (ckpt, list(csv.DictReader(f)), cfg)
    finally:
        torch.set_num_threads(n_threads)
    return out


@pytest.mark.parametrize("name", list(RUNS))
def test_method_trains_with_decreasing_generation_loss(runs, name):
    _, rows, _ = runs[name]
    assert int(rows[-1]["step"]) == STEPS
    assert all(math.isfinite(float(r[k])) for r in rows for k in r if r[k] not in ("", None))
    k = WINDOW // LOG_EVERY  # each row is the mean of LOG_EVERY steps
    first = sum(float(r["loss_gen"]) for r in rows[:k]) / k
    last = sum(float(r["loss_gen"]) for r in rows[-k:]) / k
    assert last < 0.85 * first, (name, first, last)  # observed ~0.70-0.75


@pytest.mark.parametrize("name", list(RUNS))
def test_method_logs_its_columns(runs, name):
    _, rows, cfg = runs[name]
    cols = set(rows[0])
    parts = set(cfg.method_spec.parts)
    assert {"loss", "loss_gen"} <= cols
    assert (SRA_COLUMNS <= cols) == ("sra" in parts) and (bool(SRA_COLUMNS & cols) == ("sra" in parts))
    assert (DIV_COLUMNS <= cols) == ("diverse" in parts) and (bool(DIV_COLUMNS & cols) == ("diverse" in parts))
    if "sra" in parts:
        base = 0.04 if cfg.family == "dit" else 0.2  # the official per-family lambda
        assert all(float(r["align_weight"]) == pytest.approx(base) for r in rows)
        assert all(float(r["norm_head"]) > 0 and float(r["norm_target"]) > 0 for r in rows)
        # the total is the generation loss plus the weighted alignment (plus the weighted diversity)
        r = rows[-1]
        extra = float(r["align_weight"]) * float(r["loss_align"])
        if "diverse" not in parts:
            assert float(r["loss"]) == pytest.approx(float(r["loss_gen"]) + extra, rel=1e-4)
    if "diverse" in parts:
        for r in rows:
            terms = (float(r["div_orth"]) + float(r["div_mi"]) + float(r["div_disp"])) / 3
            assert float(r["loss_div"]) == pytest.approx(terms, rel=1e-4, abs=1e-6)
            assert 0.0 <= float(r["div_weight"]) <= 1.0


@pytest.mark.parametrize("name", list(RUNS))
def test_checkpoint_loads_for_probing(runs, name):
    ckpt, _, cfg = runs[name]
    parts = set(cfg.method_spec.parts)
    state = torch.load(ckpt, weights_only=True)
    ck = load_checkpoint(ckpt)  # EMA weights, eval mode
    m = ck.model
    assert ck.meta["method"] == cfg.method and ck.ignored_keys == []
    assert (m.ap_head is not None) == ("sra" in parts)
    assert (m.skip_fusions is not None) == ("diverse" in parts)
    assert any(k.startswith("ap_head.linear1") for k in state["model"]) == ("sra" in parts)
    assert any(k.startswith("skip_fusions.") for k in state["ema"]) == ("diverse" in parts)
    for k, v in m.state_dict().items():  # every parameter, head and fusions included, came from the file
        torch.testing.assert_close(v, state["ema"][k], rtol=0, atol=0)
    # Probing path: block features of the loaded EMA, no head, stops after the deepest block.
    x = torch.randn(4, 1, 32, 32)
    t = torch.full((4,), 0.5) if ck.meta["family"] == "sit" else torch.full((4,), 500, dtype=torch.long)
    y = torch.full((4,), ck.meta["null_class"], dtype=torch.long)
    with torch.no_grad():
        feats = m.block_features(x, t, y, [1, 2, 3, 4])
        out = m(x, t, y)
    assert set(feats) == {1, 2, 3, 4} and all(torch.isfinite(f).all() for f in feats.values())
    assert torch.is_tensor(out) and torch.isfinite(out).all()
    if "diverse" in parts:  # deep blocks are the fused stream, so the fusion weights matter
        with torch.no_grad():
            m.skip_fusions[-1].linear.bias.add_(1.0)
            moved = m.block_features(x, t, y, [4])[4]
        assert not torch.allclose(moved, feats[4])
    # The online weights load too, and an SRA model probes the same with or without its head.
    online = load_checkpoint(ckpt, weights="model")
    if "sra" in parts:
        with torch.no_grad():
            a = online.model.block_features(x, t, y, [2])[2]
            online.model.ap_head = None
            b = online.model.block_features(x, t, y, [2])[2]
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_probe_grid_on_method_checkpoints(runs):
    """The probing grid extractor runs on the SRA+DiverseDiT DiT checkpoint."""
    from repdyn.probe.grid import extract_grid
    from repdyn.datasets.sources import make_dataset

    ck = load_checkpoint(runs["dit-sra+diverse"][0])
    ds = make_dataset("fashion-mnist", "test")
    g = extract_grid(ck, ds, blocks=[1, 4], ts=[100, 800], n_samples=8, batch_size=8, progress=False)
    assert g.features[(4, 800)].shape == (8, 32)
    assert all(torch.isfinite(torch.as_tensor(v)).all() for v in g.features.values())
