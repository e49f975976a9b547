"""The papers' latent setting on a tiny AutoencoderKL built here (random weights, published layout):
images -> probe encode -> latents: -> train -> sample -> decode. No downloads."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from repdyn.cli import app
from tests.launch import torchrun_cli

diffusers = pytest.importorskip("diffusers", reason="diffusers is in the test extra")
pytestmark = pytest.mark.usefixtures("single_thread")
runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    """A 3-level AutoencoderKL (32 px -> 4 x 8 x 8 latents), saved as sd-vae-ft-ema is laid out."""
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
                                  down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                                  block_out_channels=(8, 8, 8), layers_per_block=1, sample_size=32)
    path = tmp_path_factory.mktemp("vae") / "sd-vae-tiny"
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 2)):
        for c in ("cat", "dog"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return root


def test_encode_round_trip_and_resume(tiny_vae, images, tmp_path):
    from repdyn.datasets.sources import make_dataset
    from repdyn.evaluation.vae import center_crop_arr, load_vae

    out = tmp_path / "lat"
    res = runner.invoke(app, ["encode", str(images), "--out", str(out), "--vae", str(tiny_vae), "--resolution", "32",
                              "--flip", "--quiet", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    tr, te = make_dataset(f"latents:{out}", "train"), make_dataset(f"latents:{out}", "test")
    assert (len(tr), len(te)) == (24, 8) and tr.split_rule == "official"  # 12 images + flips; val -> test
    assert (tr.channels, tr.image_size, tr.class_names) == (4, 8, ["cat", "dog"])
    meta = json.loads((out / "vae-sd" / "dataset.json").read_text())
    assert meta["vae"]["scale"] == 0.18215 and meta["resolution"] == 32
    # what encode wrote is the AutoencoderKL's own posterior of the ADM-cropped image
    from PIL import Image

    vae = load_vae(tiny_vae, "cpu")
    first = sorted((images / "train" / "cat").glob("*.png"))[0]
    x = torch.from_numpy(center_crop_arr(Image.open(first), 32).copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    dist = vae.model.encode(x).latent_dist
    moments, _ = tr.get_batch(torch.tensor([0]))
    torch.testing.assert_close(moments, torch.cat([dist.mean, dist.std], 1), rtol=1e-4, atol=1e-5)
    # decode(encode(x)) is the AutoencoderKL's own reconstruction
    z = dist.mean * 0.18215
    torch.testing.assert_close(vae.decode(z), vae.model.decode(dist.mean).sample.clamp(-1, 1), rtol=1e-4, atol=1e-5)
    # resume: finished files are skipped
    res = runner.invoke(app, ["encode", str(images), "--out", str(out), "--vae", str(tiny_vae), "--resolution", "32",
                              "--flip", "--quiet", "--device", "cpu"])
    assert res.exit_code == 0 and "encoded 0" in res.output
    # --images adds REPA's images/ folder (resuming: only the images are new), paired with the latents
    res = runner.invoke(app, ["encode", str(images), "--out", str(out), "--vae", str(tiny_vae), "--resolution", "32",
                              "--flip", "--images", "--quiet", "--device", "cpu"])
    assert res.exit_code == 0 and "encoded 32" in res.output
    tr = make_dataset(f"latents:{out}", "train")
    raw = tr.raw_images(torch.tensor([0, 12]))  # the first image and its flipped copy
    assert raw.dtype == torch.uint8 and tuple(raw.shape) == (2, 3, 32, 32)
    crop = torch.from_numpy(center_crop_arr(Image.open(first), 32).copy()).permute(2, 0, 1)
    assert torch.equal(raw[0], crop) and torch.equal(raw[1], crop.flip(-1))


@pytest.mark.slow
def test_encode_under_two_ranks_writes_what_one_process_writes(tiny_vae, images, tmp_path):
    """probe encode under torchrun (2 gloo ranks): rank r encodes every 2nd image, rank 0 writes
    dataset.json after the barrier; the folder equals a single process's, file by file."""
    args = [str(images), "--vae", str(tiny_vae), "--resolution", "32", "--flip", "--quiet", "--device", "cpu",
            "--batch-size", "3"]
    assert runner.invoke(app, ["encode", *args, "--out", str(tmp_path / "one")]).exit_code == 0
    res = torchrun_cli(["encode", *args, "--out", str(tmp_path / "two")], tmp_path)
    assert res.stdout.count("encoded 32 ") == 1  # rank 0 reports the total; each rank wrote its half
    one = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*.npy"))
    two = sorted(p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*.npy"))
    assert one == two and len(one) == 32  # (12 train + 4 val) images and their flips
    for rel in one:
        np.testing.assert_allclose(np.load(tmp_path / "one" / rel), np.load(tmp_path / "two" / rel), rtol=1e-5,
                                   atol=1e-6)
    metas = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("dataset.json"))
    assert [str(m) for m in metas] == ["test/vae-sd/dataset.json", "vae-sd/dataset.json"]
    for rel in metas:
        assert json.loads((tmp_path / "one" / rel).read_text()) == json.loads((tmp_path / "two" / rel).read_text())


@pytest.fixture(scope="module")
def latent_ckpt(tiny_vae, images, tmp_path_factory):
    """images -> probe encode -> a latent SiT trained 2 steps on them (the papers' pipeline, tiny)."""
    from repdyn.training.config import resolve_config
    from repdyn.training.trainer import train

    root = tmp_path_factory.mktemp("latent_run")
    out = root / "lat"
    assert runner.invoke(app, ["encode", str(images), "--out", str(out), "--vae", str(tiny_vae), "--resolution",
                               "32", "--quiet", "--device", "cpu"]).exit_code == 0
    cfg = resolve_config("sit-tiny", overrides=dict(model_overrides={"depth": 2, "hidden_size": 32},
                                                    data=f"latents:{out}", steps=2, batch_size=4, device="cpu",
                                                    out=str(root / "run"), ckpt_every=0, log_every=1))
    return train(cfg, quiet=True)


def test_latent_model_trains_and_samples_through_the_vae(tiny_vae, latent_ckpt, tmp_path):
    from repdyn.model.checkpoint import load_checkpoint

    ck = latent_ckpt

    assert load_checkpoint(ck).meta["vae"]["config_sha"]
    png = tmp_path / "s.png"
    res = runner.invoke(app, ["sample", str(ck), "--out", str(png), "--npz", str(tmp_path / "s.npz"), "--n", "4",
                              "--steps", "2", "--vae", str(tiny_vae), "--quiet", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    with np.load(tmp_path / "s.npz") as z:
        assert z["arr_0"].shape == (4, 32, 32, 3) and z["arr_0"].dtype == np.uint8  # decoded pixels, NHWC
    res = runner.invoke(app, ["sample", str(ck), "--out", str(tmp_path / "x.png"), "--n", "2", "--quiet"])
    assert res.exit_code == 2 and "pass --vae PATH" in res.output


def test_vae_bad_inputs(tmp_path, tiny_vae):
    from repdyn.evaluation.vae import load_vae

    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_vae(tmp_path / "missing")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(FileNotFoundError, match="no weights"):
        load_vae(tmp_path / "noweights")
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="not an AutoencoderKL"):
        load_vae(tmp_path / "unet")


def test_probe_eval_of_a_latent_model_decodes_and_scores_against_an_adm_npz(tiny_vae, latent_ckpt, tmp_path,
                                                                               monkeypatch):
    """encode -> train -> eval: fd in latent space, the npz and the Inception metrics on decoded pixels
    against an ADM-layout reference batch (the real torch-fidelity path with a random Inception file)."""
    import functools

    from .test_evaluate import _random_inception_file
    from repdyn.evaluation import evaluate as E
    from repdyn.evaluation.metrics import inception_metrics

    monkeypatch.setenv("REPDYN_CACHE", str(tmp_path / "cache"))
    # the 768-d FID layer keeps the 2048x2048 eigendecomposition (~30 s on one core) out of CI
    monkeypatch.setattr(E, "inception_metrics", functools.partial(inception_metrics, feature_layer_fid="768"))
    ck = latent_ckpt
    ref = tmp_path / "VIRTUAL_tiny.npz"
    batch = np.random.default_rng(0).integers(0, 255, (8, 32, 32, 3), dtype=np.uint8)
    np.savez(ref, arr_0=batch)
    weights = _random_inception_file(tmp_path / "inception.pth")
    args = ["eval", str(ck), "--n", "8", "--steps", "2", "--method", "ode-euler", "--quiet", "--device", "cpu",
            "--metrics-csv", str(tmp_path / "m.csv")]
    res = runner.invoke(app, args + ["--inception-weights", str(weights)])
    assert res.exit_code == 2 and "pass --vae" in res.output  # latents must be decoded
    res = runner.invoke(app, args + ["--inception-weights", str(weights), "--vae", str(tiny_vae)])
    assert res.exit_code == 2 and "pass --ref" in res.output  # and need pixels to compare with
    bad = tmp_path / "bad.npz"
    np.savez(bad, mu=np.zeros(3))
    res = runner.invoke(app, args + ["--inception-weights", str(weights), "--ref", str(bad), "--vae", str(tiny_vae)])
    assert res.exit_code == 2 and "no ADM reference batch" in res.output and not (tmp_path / "m.csv").exists()
    res = runner.invoke(app, args + ["--inception-weights", str(weights), "--ref", str(ref), "--vae", str(tiny_vae),
                                     "--npz", str(tmp_path / "s.npz")])
    assert res.exit_code == 0, res.output
    import pandas as pd

    row = pd.read_csv(tmp_path / "m.csv").iloc[0]
    assert np.isfinite(row["fid"]) and row["n_ref"] == 8 and row["reference"] == str(ref)
    assert np.isfinite(row["sfid"]) and np.isfinite(row["fid_adm"]) and row["reference_stats"].startswith("computed")
    assert np.isfinite(row[[c for c in row.index if c.startswith("fd_")][0]])
    with np.load(tmp_path / "s.npz") as z:
        assert z["arr_0"].shape == (8, 32, 32, 3)
        gen = torch.from_numpy(z["arr_0"]).permute(0, 3, 1, 2)
    # with the statistics in the npz (ADM's layout) they are used, and sFID is the Frechet distance
    # of the 2023-d spatial features (first 7 channels of Mixed_6d's 1x1 branch, 17 x 17)
    from repdyn.evaluation.metrics import adm_features, adm_reference_stats
    from repdyn.model.frechet import frechet_distance, feature_statistics

    stats = adm_reference_stats(torch.from_numpy(batch).permute(0, 3, 1, 2), weights)
    assert stats["mu_s"].shape == (17 * 17 * 7,) and stats["mu"].shape == (2048,)
    np.savez(ref, arr_0=batch, **stats)
    res = runner.invoke(app, args + ["--inception-weights", str(weights), "--ref", str(ref), "--vae", str(tiny_vae),
                                     "--seed", "0"])
    assert res.exit_code == 0, res.output
    row = pd.read_csv(tmp_path / "m.csv").iloc[-1]
    assert row["reference_stats"].startswith("npz")
    _, spatial = adm_features(gen, weights)
    want = frechet_distance(*feature_statistics(spatial), stats["mu_s"], stats["sigma_s"])
    assert row["sfid"] == pytest.approx(want, rel=1e-6)
    # the probes read the same latents (official test split from val/) and join the metrics by hash
    res = runner.invoke(app, ["layer-grid", str(ck), "--n-train", "12", "--n-test", "4", "--t", "0.5", "--blocks",
                              "1", "--probe", "ridge", "--out", str(tmp_path / "lg"), "--no-cache", "--quiet"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["correlate", str(tmp_path / "lg" / "layer_grid.csv"), str(tmp_path / "m.csv"),
                              "--metric", "sfid", "--cell", "1,0.5", "--n-boot", "10", "--out", str(tmp_path / "c")])
    assert "need at least 3 paired points to correlate, got 1" in res.output  # joined on the hash: 1 checkpoint


def test_latents_of_another_shape_are_a_one_line_error(latent_ckpt, tmp_path):
    """A latent checkpoint given pixel data (or latents of another size): one line, nothing written."""
    res = runner.invoke(app, ["layer-grid", str(latent_ckpt), "--data", "fashion-mnist", "--n-train", "10",
                              "--n-test", "5", "--out", str(tmp_path / "lg"), "--no-cache", "--quiet"])
    errors = [ln for ln in res.output.strip().splitlines() if not ln.startswith("warning:")]
    assert res.exit_code == 2 and "cannot be converted to the 4 channel(s) the model takes" in res.output, res.output
    assert len(errors) == 1 and errors[0].startswith("error:") and not (tmp_path / "lg" / "layer_grid.csv").exists()
