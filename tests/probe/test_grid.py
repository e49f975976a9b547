"""repdyn.probe.grid / repdyn.probe.cache: shared noise, equality with the model's own features, DiT/SiT time
handling, cache reuse and resume after an interruption, bad input."""

from __future__ import annotations

import json

from pathlib import Path

import numpy as np
import pytest
import torch

from repdyn.probe.cache import FeatureCache
from repdyn.probe.grid import extract_grid, grid_noise, sample_indices
from repdyn.model.checkpoint import load_checkpoint
from repdyn.datasets.sources import make_dataset

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def fm_train():
    return make_dataset("fashion-mnist", "train")


class CountingData:
    """Wraps a dataset: counts get_batch calls and can fail on the n-th one (an interruption)."""

    def __init__(self, ds, fail_at: int | None = None):
        self.ds, self.fail_at, self.calls = ds, fail_at, 0

    def __getattr__(self, name):
        return getattr(self.ds, name)

    def __len__(self):
        return len(self.ds)

    def get_batch(self, idx):
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise KeyboardInterrupt("simulated interruption")
        return self.ds.get_batch(idx)


def test_noise_bank_is_per_sample_and_seeded():
    a = grid_noise([5, 9, 11], (1, 4, 4), 0, "train")
    b = grid_noise([11, 5], (1, 4, 4), 0, "train")  # other batch, other order
    torch.testing.assert_close(a[0], b[1], rtol=0, atol=0)
    torch.testing.assert_close(a[2], b[0], rtol=0, atol=0)
    assert not torch.equal(a[0], grid_noise([5], (1, 4, 4), 1, "train")[0])
    assert not torch.equal(a[0], grid_noise([5], (1, 4, 4), 0, "test")[0])
    small = sample_indices(1000, 50, 0, "train")
    big = sample_indices(1000, 200, 0, "train")
    assert set(small) <= set(big) and len(np.unique(big)) == 200  # nested subsets


def test_features_match_manual_forward_and_are_reproducible(tiny_sit_ckpt, fm_train):
    ck = load_checkpoint(tiny_sit_ckpt)
    g1 = extract_grid(ck, fm_train, blocks=[2, 4], ts=[0.0, 0.5], n_samples=40, batch_size=16, progress=False)
    g2 = extract_grid(ck, fm_train, blocks=[2, 4], ts=[0.0, 0.5], n_samples=40, batch_size=40, progress=False)
    for cell in g1.features:
        # batch size does not matter: same images, same noise; only the matmul kernels of a smaller last
        # batch may round differently (1 ulp), so the bound is fp32 rounding, not bit equality
        np.testing.assert_allclose(g1.features[cell], g2.features[cell], rtol=0, atol=1e-6)
    assert g1.features[(2, 0.5)].shape == (40, 64) and g1.features[(2, 0.5)].dtype == np.float32
    idx = torch.as_tensor(g1.indices[:7])
    x0, y = fm_train.get_batch(idx)
    np.testing.assert_array_equal(g1.labels[:7], y.numpy())
    eps = grid_noise(g1.indices[:7], (1, 32, 32), 0, "train")
    t = torch.full((7,), 0.5)
    with torch.no_grad():
        ref = ck.model.block_features(ck.objective.corrupt(x0, t, eps), t, torch.full((7,), 10), [4])[4].mean(1)
    np.testing.assert_allclose(g1.features[(4, 0.5)][:7], ref.numpy(), rtol=1e-5, atol=1e-5)
    assert g1.log_snr[0.0] == float("inf") and g1.log_snr[0.5] == pytest.approx(0.0)
    assert g1.meta["label_policy"] == "null" and g1.meta["weights"] == "ema"
    # another seed draws other noise -> other features at t > 0
    g3 = extract_grid(ck, fm_train, blocks=[4], ts=[0.5], n_samples=40, seed=1, progress=False)
    assert not np.allclose(g3.features[(4, 0.5)], g1.features[(4, 0.5)])
    # true labels are an explicit, recorded option that changes the features
    gc = extract_grid(ck, fm_train, blocks=[4], ts=[0.5], n_samples=40, label_policy="class", progress=False)
    assert gc.meta["label_policy"] == "class" and not np.allclose(gc.features[(4, 0.5)], g1.features[(4, 0.5)])


def test_foreign_t0_noise_convention_feeds_mirrored_time(tiny_sit_ckpt, fm_train):
    ck = load_checkpoint(tiny_sit_ckpt)
    ref = extract_grid(ck, fm_train, blocks=[3], ts=[0.3], n_samples=12, progress=False)
    ck.meta["time_convention"] = "flow-t0-noise"  # pretend it is a willisma/SiT checkpoint
    g = extract_grid(ck, fm_train, blocks=[3], ts=[0.3], n_samples=12, progress=False)
    idx = torch.as_tensor(g.indices)
    x0, _ = fm_train.get_batch(idx)
    eps = grid_noise(g.indices, (1, 32, 32), 0, "train")
    xt = ck.objective.corrupt(x0, torch.full((12,), 0.3), eps)  # our convention for the corruption
    with torch.no_grad():
        fed = ck.model.block_features(xt, torch.full((12,), 0.7), torch.full((12,), 10), [3])[3].mean(1)
    np.testing.assert_allclose(g.features[(3, 0.3)], fed.numpy(), rtol=1e-5, atol=1e-5)
    assert g.meta["time_convention"] == "flow-t0-noise" and g.ts == [0.3]  # rows keep our t
    assert not np.allclose(g.features[(3, 0.3)], ref.features[(3, 0.3)])


def test_dit_integer_steps_and_log_snr(tiny_dit_ckpt, fm_train):
    ck = load_checkpoint(tiny_dit_ckpt)
    g = extract_grid(ck, fm_train, blocks=[1, 4], ts=[0, 500, 900], n_samples=10, progress=False)
    assert g.ts == [0, 500, 900] and all(isinstance(t, int) for t in g.ts)
    assert g.log_snr[0] > g.log_snr[500] > g.log_snr[900]
    assert g.features[(4, 900)].shape == (10, 64)
    with pytest.raises(ValueError, match="not a DiT step"):
        extract_grid(ck, fm_train, ts=[1000], n_samples=4, progress=False)
    with pytest.raises(ValueError, match="not a DiT step"):
        extract_grid(ck, fm_train, ts=[0.5], n_samples=4, progress=False)


def test_cache_reuse_and_resume_after_interruption(tiny_sit_ckpt, fm_train, tmp_path):
    ck = load_checkpoint(tiny_sit_ckpt)
    kw = dict(blocks=[1, 4], ts=[0.1, 0.4, 0.7], n_samples=30, batch_size=10, progress=False)
    ref = extract_grid(ck, fm_train, **kw)
    cache = FeatureCache(tmp_path / "c")
    # 3 batches per t: the 5th data access is the 2nd batch of t=0.4 -> t=0.1 is finished, t=0.4 is not
    broken = CountingData(fm_train, fail_at=5)
    with pytest.raises(KeyboardInterrupt):
        extract_grid(ck, broken, cache=cache, **kw)
    assert len(cache) == 2  # only the two cells of t=0.1 are complete
    assert not list((tmp_path / "c" / "cells").glob("*.partial.npy"))  # nothing half-written left behind
    resumed = CountingData(fm_train)
    g = extract_grid(ck, resumed, cache=cache, **kw)
    assert resumed.calls == 6  # t=0.4 and t=0.7 only; t=0.1 was not recomputed
    assert len(cache) == 6
    for cell in ref.features:
        np.testing.assert_allclose(g.features[cell], ref.features[cell], rtol=2e-3, atol=2e-3)  # fp16 on disk
    again = CountingData(fm_train)
    extract_grid(ck, again, cache=FeatureCache(tmp_path / "c"), **kw)
    assert again.calls == 0  # same cells asked again: all read from the cache
    # other weights -> other cells
    ck_online = load_checkpoint(tiny_sit_ckpt, weights="model")
    other = CountingData(fm_train)
    extract_grid(ck_online, other, cache=cache, **kw)
    assert other.calls == 9 and len(cache) == 12


def test_bad_input_is_a_clear_error(tiny_sit_ckpt, fm_train, tmp_path):
    ck = load_checkpoint(tiny_sit_ckpt)
    with pytest.raises(ValueError, match=r"expects inputs of shape \(1, 32, 32\).*\(1, 8, 8\)"):
        extract_grid(ck, make_dataset("digits", "train"), n_samples=4, progress=False)
    with pytest.raises(ValueError, match="block 5 is out of range"):
        extract_grid(ck, fm_train, blocks=[5], n_samples=4, progress=False)
    with pytest.raises(ValueError, match=r"outside the SiT range \[0, 1\]"):
        extract_grid(ck, fm_train, ts=[1.2], n_samples=4, progress=False)
    with pytest.raises(ValueError, match="no sample indices"):
        extract_grid(ck, fm_train, indices=[], progress=False)
    with pytest.raises(ValueError, match="label policy"):
        extract_grid(ck, fm_train, label_policy="cond", n_samples=4, progress=False)
    bad = tmp_path / "old"
    bad.mkdir()
    (bad / "manifest.json").write_text(json.dumps({"format": "something-else", "version": 7, "cells": {}}))
    with pytest.raises(ValueError, match="written by another protocol"):
        FeatureCache(bad)


def _dist_worker(rank: int, world: int, port: int, ckpt: str, out: str) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        ck = load_checkpoint(ckpt)
        g = extract_grid(ck, make_dataset("fashion-mnist", "train"), blocks=[2, 4], ts=[0.2, 0.7], n_samples=21,
                         batch_size=4, device="cpu", progress=False)
        if rank == 0:
            np.savez(out, **{f"{b}_{t}": g.features[(b, t)] for b, t in g.features})
    finally:
        dist.destroy_process_group()


def test_sharded_extraction_on_two_gloo_ranks_matches_one_process(tiny_sit_ckpt, fm_train, tmp_path, monkeypatch):
    import socket

    import torch.multiprocessing as mp

    # spawned ranks unpickle _dist_worker by its module name, tests.probe.test_grid, with this process's
    # sys.path: let them find tests/ (undone after the test)
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2]))

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "rank0.npz"
    mp.spawn(_dist_worker, args=(2, port, str(tiny_sit_ckpt), str(out)), nprocs=2, join=True)
    ref = extract_grid(load_checkpoint(tiny_sit_ckpt), fm_train, blocks=[2, 4], ts=[0.2, 0.7], n_samples=21,
                       progress=False)
    got = np.load(out)
    for b, t in ref.features:
        np.testing.assert_allclose(got[f"{b}_{t}"], ref.features[(b, t)], rtol=1e-5, atol=1e-6)
