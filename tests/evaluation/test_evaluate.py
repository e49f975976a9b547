"""Evaluation: ADM npz export, metrics table, the cached dataset
classifier, torch-fidelity with a random Inception file, and evaluation end to end."""

from __future__ import annotations

import csv
import math
import multiprocessing
import os
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from torch import nn

from repdyn.commands.eval import run_eval
from repdyn.commands.sample import SamplerSettings, run_sample
from tests.launch import torchrun_cli
from repdyn.model import classifier as C
from repdyn.evaluation import evaluate as E
from repdyn.evaluation import images as I
from repdyn.evaluation import metrics as M
from repdyn.model import samplers as S
from repdyn.model.checkpoint import save_checkpoint
from repdyn.datasets.sources import make_dataset
from repdyn.model.backbone import build_model


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors; the CI box has 2 shared cores
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------


def test_to_uint8_npz_and_grid(tmp_path):
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0]).reshape(1, 1, 2, 2).repeat(5, 1, 1, 1)
    u8 = I.to_uint8(x)
    assert u8.dtype == torch.uint8 and u8[0, 0].flatten().tolist() == [0, 128, 255, 255]
    p = I.save_npz(tmp_path / "s.npz", u8, labels=[0, 1, 2, 3, 4])
    with np.load(p) as z:
        assert z["arr_0"].dtype == np.uint8 and z["arr_0"].shape == (5, 2, 2, 3)  # NHWC, RGB
        assert z["arr_1"].tolist() == [0, 1, 2, 3, 4]
    from PIL import Image

    g = Image.open(I.save_grid(tmp_path / "g.png", u8, nrow=5))
    assert g.size == (5 * 4 + 2, 4 + 2) and g.mode == "L"
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    with pytest.raises(ValueError, match="latent-space"):
        I.to_uint8(x, {"latent_scale": 0.18215})


def test_append_metrics_row_replaces_same_key(tmp_path):
    path = tmp_path / "m.csv"
    base = {"ckpt_sha": "abc", "weights": "ema", "method": "sde", "steps": 50, "cfg_scale": 1.0, "guidance_low": 0.0,
            "guidance_high": 1.0, "legacy_cfg_channels": False, "labels": "balanced", "n_samples": 100, "seed": 0}
    E.append_metrics_row(path, {**base, "fd_digits": 3.0})
    E.append_metrics_row(path, {**base, "steps": 100, "fd_digits": 2.0})
    E.append_metrics_row(path, {**base, "fd_digits": 1.5, "fid": 9.0})  # re-run: replaces the first row
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    by_steps = {r["steps"]: r for r in rows}
    assert by_steps["50"]["fd_digits"] == "1.5" and by_steps["50"]["fid"] == "9.0"
    assert by_steps["100"]["fd_digits"] == "2.0" and by_steps["100"]["fid"] == ""
    assert sorted(os.listdir(tmp_path)) == [".m.csv.lock", "m.csv"]  # no temp file left


def _append_rows(path: str, worker: int, n: int) -> None:
    for i in range(n):
        E.append_metrics_row(path, {"ckpt_sha": f"w{worker}-{i}", "weights": "ema", "fd_digits": float(i)})


def test_append_metrics_row_concurrent_writers_lose_no_row(tmp_path):
    """Two processes appending to one table (two `probe demo --only` workers) keep every row."""
    path = str(tmp_path / "m.csv")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_append_rows, args=(path, w, 25)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    with open(path, newline="") as f:
        shas = {r["ckpt_sha"] for r in csv.DictReader(f)}
    assert shas == {f"w{w}-{i}" for w in range(2) for i in range(25)}


# ------------------------------------------------------------------------------------------------
# Dataset classifier (trained once on sklearn digits, cached under $REPDYN_CACHE)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("repdyn-cache")
    with mock.patch.dict(os.environ, {"REPDYN_CACHE": str(d)}):
        yield d


@pytest.fixture(scope="module")
def digits_clf(cache_dir):
    return C.get_classifier("digits", epochs=2)


def test_classifier_is_trained_once_and_cached(cache_dir, digits_clf):
    assert digits_clf.path == cache_dir / "classifiers" / "digits.pt" and digits_clf.path.exists()
    assert digits_clf.test_accuracy > 0.8
    with mock.patch.object(C, "train_classifier", side_effect=AssertionError("retrained")):
        again = C.get_classifier("digits")
    assert again.test_accuracy == pytest.approx(digits_clf.test_accuracy)
    x = torch.randn(4, 1, 8, 8)
    assert torch.allclose(again.model.embed(x), digits_clf.model.eval().embed(x), atol=1e-6)


def test_classifier_metrics_separate_real_from_noise(digits_clf):
    test = make_dataset("digits", split="test")
    x, y = test.get_batch(torch.arange(len(test)))
    real = M.classifier_metrics(digits_clf, x, y)
    assert set(real) == {"fd_digits", "fd_digits_se", "cond_acc_digits"}
    assert real["cond_acc_digits"] == pytest.approx(digits_clf.test_accuracy, abs=1e-6)
    noise = M.classifier_metrics(digits_clf, torch.rand_like(x) * 2 - 1, y)
    assert noise["fd_digits"] > 5 * real["fd_digits"]
    assert noise["cond_acc_digits"] < 0.5
    # null-class labels (unconditional samples) are left out of the accuracy
    assert math.isnan(M.classifier_metrics(digits_clf, x[:5], torch.full((5,), 10))["cond_acc_digits"])


def test_classifier_cache_path_names(cache_dir):
    assert C.classifier_cache_path("fashion-mnist").name == "fashion-mnist.pt"
    p = C.classifier_cache_path("folder:/data/my imgs")
    assert p.parent == cache_dir / "classifiers" and p.name.startswith("folder-my-imgs-")


# ------------------------------------------------------------------------------------------------
# torch-fidelity with a random (spread-out) Inception file
# ------------------------------------------------------------------------------------------------


def _random_inception_file(path: Path) -> Path:
    """A state dict of torch-fidelity's inception-v3-compat architecture with spread-out random
    weights: He-scaled convolutions, and batch-norm statistics calibrated on two random images so
    every layer is centred (with the default init the features of all images are nearly equal)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    with mock.patch("torch.load", return_value={}), \
            mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None):
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path="none")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * math.sqrt(2.0 / m.weight[0].numel()))
            elif isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None  # cumulative average: one batch sets the statistics exactly
            elif isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / math.sqrt(m.in_features))
                m.bias.zero_()
        net.train()
        net(torch.randint(0, 256, (2, 3, 32, 32), generator=g, dtype=torch.uint8))
    torch.save(net.state_dict(), path)
    return path


def _no_network():
    def refuse(*a, **k):
        raise AssertionError("tried to download")

    return mock.patch("torch.hub.load_state_dict_from_url", refuse), mock.patch("urllib.request.urlopen", refuse)


def test_torch_fidelity_path_runs_offline_with_random_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    weights = _random_inception_file(tmp_path / "inception.pth")
    g = torch.Generator().manual_seed(0)
    gen = torch.randint(0, 256, (6, 1, 16, 16), generator=g, dtype=torch.uint8)  # grayscale -> RGB inside
    ref = (torch.rand(6, 1, 16, 16, generator=g) * 80).to(torch.uint8)  # darker: a different distribution
    p1, p2 = _no_network()
    with p1, p2:
        # FID on the 768-d layer keeps torch-fidelity's non-symmetric 2048x2048 eigvals (~30 s on one
        # core) out of CI; IS, KID and precision/recall use their standard layers.
        m = M.inception_metrics(gen, ref, weights, feature_layer_fid="768")
    assert set(m) == {"fid", "is", "is_std", "kid", "kid_std", "precision", "recall"}
    assert all(np.isfinite(v) for v in m.values())
    assert m["fid"] > 1e-3  # the features are not all identical
    assert m["is"] > 1.0 + 1e-4  # logits differ between images
    assert 0.0 <= m["precision"] <= 1.0 and 0.0 <= m["recall"] <= 1.0
    assert not (tmp_path / "torch-home").exists() or not any((tmp_path / "torch-home").rglob("*.pth"))


def test_missing_inception_weights_is_a_clear_one_line_error(tmp_path):
    x = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    for bad in (None, tmp_path / "missing.pth"):
        with pytest.raises(ValueError, match=M.INCEPTION_WEIGHTS_NAME) as e:
            M.inception_metrics(x, x, bad)
        assert "\n" not in str(e.value) and "--inception-weights" in str(e.value)


# ------------------------------------------------------------------------------------------------
# End to end: checkpoint file -> samples -> metrics row -> CSV
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    m = build_model("SiT-T/4", input_size=8, in_channels=1, num_classes=10, depth=2)
    meta = {**S.infer_meta(m), "model_config": m.config.to_dict(), "data": "digits", "latent_scale": None,
            "prediction": "velocity", "method": "baseline"}
    sd = m.state_dict()
    path = tmp_path_factory.mktemp("run") / "checkpoints" / "0000005.pt"
    save_checkpoint({"model": sd, "ema": sd, "config": {}, "meta": meta, "steps": 5, "epoch": 0}, path)
    return path


def test_run_eval_writes_a_keyed_row(tiny_ckpt, digits_clf, tmp_path):
    csv_path = tmp_path / "metrics.csv"
    kw = dict(n=12, method="ode-euler", steps=2, seed=0, batch_size=8, npz_path=tmp_path / "s.npz", progress=False)
    row = run_eval(tiny_ckpt, csv_path, **kw)
    assert row["run"] == tiny_ckpt.parent.parent.name and row["step"] == 5 and row["weights"] == "ema"
    assert row["fd_digits"] > 0 and 0.0 <= row["cond_acc_digits"] <= 1.0
    assert np.load(tmp_path / "s.npz")["arr_0"].shape == (12, 8, 8, 3)
    run_eval(tiny_ckpt, csv_path, **kw)  # same settings: replaced, not duplicated
    run_eval(tiny_ckpt, csv_path, **{**kw, "steps": 3})
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["steps"] for r in rows) == ["2", "3"]
    assert rows[0]["ckpt_sha"] == row["ckpt_sha"] and rows[0]["checkpoint"] == str(tiny_ckpt.resolve())


def test_metrics_score_the_saved_images_not_raw_sampler_output(tiny_ckpt, digits_clf):
    """An early checkpoint's raw samples lie far outside [-1, 1]; fd must score them clamped and
    quantised (what a PNG / .npz holds), not explode on the raw values."""
    from repdyn.model.checkpoint import load_checkpoint

    ck = load_checkpoint(tiny_ckpt)
    raw = 50 * torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with mock.patch.object(S, "sample", return_value=raw):
        row = E.evaluate_checkpoint(ck, n=16, steps=2, method="ode-euler", classifier=digits_clf)
    saved = I.from_uint8(I.to_uint8(raw))
    assert saved.abs().max() <= 1 and (raw.abs() > 1).float().mean() > 0.9
    want = M.classifier_metrics(digits_clf, saved, S.resolve_labels(None, 16, 10, 0))["fd_digits"]
    assert row["fd_digits"] == pytest.approx(want, rel=1e-9)
    assert row["fd_digits"] < 0.1 * M.classifier_metrics(digits_clf, raw)["fd_digits"]


def test_run_sample_writes_grid_and_npz(tiny_ckpt, tmp_path):
    out = run_sample(tiny_ckpt, tmp_path / "grid.png", n=6, npz=tmp_path / "s.npz",
                     sampler=SamplerSettings(method="sde", steps=2), progress=False)
    assert Path(out.grid).exists()
    with np.load(out.npz) as z:
        assert z["arr_0"].shape == (6, 8, 8, 3) and z["arr_1"].tolist() == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("kw,msg", [
    (dict(method="ddpm"), "DIT checkpoint"),
    (dict(steps=0), "steps"),
    (dict(guidance_interval=(-0.1, 0.7)), "guidance interval"),
    (dict(inception_weights="/nonexistent/inception.pth"), "inception-weights"),
])
def test_run_eval_bad_input(tiny_ckpt, tmp_path, kw, msg):
    with pytest.raises(ValueError, match=msg) as e:
        run_eval(tiny_ckpt, tmp_path / "m.csv", n=2, **kw)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "m.csv").exists()


def test_cli_sample_and_eval(tiny_ckpt, digits_clf, tmp_path):
    from typer.testing import CliRunner

    from repdyn.cli import app

    runner = CliRunner()
    png = tmp_path / "g.png"
    r = runner.invoke(app, ["sample", str(tiny_ckpt), "--out", str(png), "--n", "4", "--steps", "2", "--quiet",
                            "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert png.exists()
    csv_path = tmp_path / "m.csv"
    r = runner.invoke(app, ["eval", str(tiny_ckpt), "--metrics-csv", str(csv_path), "--n", "10", "--steps", "2",
                            "--method", "ode-euler", "--quiet", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "fd_digits=" in r.output and csv_path.exists()
    r = runner.invoke(app, ["sample", str(tiny_ckpt), "--method", "ddpm", "--device", "cpu"])
    assert r.exit_code == 2 and "needs a DIT checkpoint" in r.output


def test_classifier_metrics_work_with_trainable_parameters(digits_clf):
    """A classifier trained in this process has parameters that require grad: metrics must not care."""
    digits_clf.model.requires_grad_(True)
    x = torch.rand(20, 1, 8, 8) * 2 - 1
    out = M.classifier_metrics(digits_clf, x, torch.zeros(20, dtype=torch.long))
    assert np.isfinite(out["fd_digits"]) and out["fd_digits_se"] > 0


@pytest.mark.slow
def test_sharded_generation_gives_the_same_images_as_one_rank(tiny_ckpt, tmp_path):
    """probe eval under torchrun (2 gloo ranks): each rank draws a shard, rank 0 gathers; the samples
    are those of a single process (they depend on (seed, i) only)."""
    common = [str(tiny_ckpt), "--n", "10", "--steps", "2", "--method", "sde", "--batch-size", "3", "--quiet",
              "--device", "cpu", "--no-offline-metrics"]
    one = run_eval(tiny_ckpt, tmp_path / "m1.csv", n=10, steps=2, method="sde", batch_size=4, offline=False,
                   npz_path=tmp_path / "one.npz", device="cpu")
    torchrun_cli(["eval", *common, "--npz", str(tmp_path / "two.npz"), "--metrics-csv", str(tmp_path / "m2.csv")],
                 tmp_path)
    with np.load(tmp_path / "one.npz") as a, np.load(tmp_path / "two.npz") as b:
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
        np.testing.assert_array_equal(a["arr_1"], b["arr_1"])
    assert one["n_samples"] == 10


def test_sample_grid_writes_each_tile_label(tmp_path):
    """With labels, every tile gets a strip above it with its class (a reader sees whether samples
    follow their labels); the tiles themselves are unchanged."""
    from PIL import Image

    u8 = torch.full((4, 1, 8, 8), 128, dtype=torch.uint8)
    plain = np.asarray(Image.open(I.save_grid(tmp_path / "a.png", u8, nrow=2)))
    named = np.asarray(Image.open(I.save_grid(tmp_path / "b.png", u8, nrow=2, labels=[0, 1, 2, 10],
                                              label_names={10: "null"})))
    assert named.shape[0] > plain.shape[0]  # a label strip per row
    assert (named > 160).any() and not (plain > 160).any()  # the (antialiased) text is drawn
    assert (named == 128).sum() == (plain == 128).sum() == 4 * 64  # every tile kept whole


def test_classifier_cache_names_the_model_inputs_when_they_are_not_the_datas_own():
    assert C.classifier_cache_path("fashion-mnist", {"channels": 1, "image_size": 32}).name == "fashion-mnist.pt"
    rgb = C.classifier_cache_path("folder:/data/imgs", {"channels": 3, "image_size": 32})
    gray = C.classifier_cache_path("folder:/data/imgs", {"channels": 1, "image_size": 8})
    assert gray.name == rgb.stem + "-1ch-8px.pt"


def test_eval_of_a_one_channel_model_reads_a_folder_in_one_channel(tiny_ckpt, tmp_path, cache_dir):
    """The reference data and the classifier follow the checkpoint's channels and size: a grayscale
    model scored against an RGB copy of its folder would fail on the first batch."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(10):
        (tmp_path / "imgs" / f"c{c}").mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(tmp_path / "imgs" / f"c{c}" / f"{i}.png")
    spec = f"folder:{tmp_path / 'imgs'}"
    row = run_eval(tiny_ckpt, tmp_path / "m.csv", n=8, method="ode-euler", steps=2, batch_size=8, data=spec,
                   progress=False)
    name = C.metric_name(spec)
    assert 0.0 <= row[f"cond_acc_{name}"] <= 1.0
    clf = C.get_classifier(spec, make_dataset_fn=lambda s, split: make_dataset(s, split, channels=1, image_size=8))
    assert clf.path.name.endswith("-1ch-8px.pt") and clf.model.body[0].in_channels == 1
