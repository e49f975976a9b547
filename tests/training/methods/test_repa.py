"""REPA: the loss is the official formula, the projectors are REPA's MLPs under REPA's keys, options
fail in one line, and the term trains (alone, with SRA, with DiverseDiT, SiT and DiT, several
encoders, precomputed tokens on latents) and resumes exactly.

The official code is not importable here (no network, it needs its own checkout and timm); the
references are written from its formulas: ``loss.py`` normalises both tokens per encoder and sample,
takes ``mean_flat(-(z * z_tilde).sum(-1))``, sums and divides by ``len(zs) * bsz``; ``models/sit.py``'s
``build_mlp`` is Linear-SiLU-Linear-SiLU-Linear, applied to ``x.reshape(-1, D)`` after block
``encoder_depth`` (1-based).
"""

from __future__ import annotations

import csv
import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from repdyn.model.backbone import DiffusionTransformer, model_config
from repdyn.model.checkpoint import load_checkpoint
from repdyn.model.objectives import make_objective
from repdyn.training.config import TrainConfig, resolve_config
from repdyn.training.methods import build_loss_terms
from repdyn.training.methods.diverse import official_pairs
from repdyn.training.methods.repa import REPAOptions, REPATerm, repa_loss, token_cosine_loss
from repdyn.training.trainer import Trainer, train
from tests.commands.support import _ok, _one_line_error

pytestmark = pytest.mark.usefixtures("single_thread")

HAVE_FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists()
needs_fmnist = pytest.mark.skipif(not HAVE_FMNIST, reason="Fashion-MNIST not installed (make data)")
TINY = {"depth": 2, "hidden_size": 32}
TINY_CLI = ["--set", "model_overrides.depth=2", "--set", "model_overrides.hidden_size=32", "--batch-size", "8",
            "--device", "cpu", "--quiet"]
N_DIGITS = 1437  # digits' train split


def official_proj_loss(zs: list[torch.Tensor], zs_tilde: list[torch.Tensor]) -> torch.Tensor:
    """REPA ``loss.py``'s projection loss, from its formula: per encoder, per sample."""
    total = torch.zeros((), dtype=zs[0].dtype)
    bsz = zs[0].shape[0]
    for z, z_tilde in zip(zs, zs_tilde):
        for z_j, z_tilde_j in zip(z, z_tilde):
            total = total + (-(F.normalize(z_j, dim=-1) * F.normalize(z_tilde_j, dim=-1)).sum(dim=-1)).mean()
    return total / (len(zs) * bsz)


def official_mlp(hidden: int, projector_dim: int, z_dim: int) -> nn.Sequential:
    """REPA ``models/sit.py``'s ``build_mlp``."""
    return nn.Sequential(nn.Linear(hidden, projector_dim), nn.SiLU(), nn.Linear(projector_dim, projector_dim),
                         nn.SiLU(), nn.Linear(projector_dim, z_dim))


def rows_of(run: Path) -> list[dict]:
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


def tiny_config(out: Path, **kw) -> TrainConfig:
    base = dict(method="repa", model_overrides=dict(TINY), batch_size=8, steps=2, log_every=1, ckpt_every=0,
                out=str(out), device="cpu")
    base.update(kw)
    return resolve_config("sit-tiny", overrides=base)


def quiet_train(cfg: TrainConfig, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # EMA-speed and tensorboard notes are not under test here
        return train(cfg, quiet=True, **kw)


def token_file(path: Path, n: int, tokens: int, dim: int, seed: int, shuffled: bool = False) -> np.ndarray:
    """Random (n, tokens, dim) features; ``shuffled``: an .npz whose rows are in a permuted index order."""
    feats = np.random.default_rng(seed).standard_normal((n, tokens, dim)).astype(np.float32)
    if shuffled:
        order = np.random.default_rng(seed + 1).permutation(n)
        np.savez(path, features=feats[order], indices=order)
    else:
        np.save(path, feats)
    return feats


# -- the formula and the layout ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_loss_equals_the_official_formula(dtype, atol):
    g = torch.Generator().manual_seed(0)
    zs = [torch.randn(4, 16, 24, generator=g, dtype=dtype), torch.randn(4, 16, 40, generator=g, dtype=dtype)]
    tilde = [3 * torch.randn(4, 16, 24, generator=g, dtype=dtype),
             0.1 * torch.randn(4, 16, 40, generator=g, dtype=dtype)]
    torch.testing.assert_close(repa_loss(tilde, zs), official_proj_loss(zs, tilde), rtol=0, atol=atol)
    torch.testing.assert_close(token_cosine_loss(tilde[1], zs[1]), official_proj_loss([zs[1]], [tilde[1]]),
                               rtol=0, atol=atol)
    # the cosine is over channels, per token: scaling a token does nothing, its direction everything
    assert float(token_cosine_loss(5 * zs[0], zs[0])) == pytest.approx(-1.0)
    assert float(token_cosine_loss(-zs[0], zs[0])) == pytest.approx(1.0)
    moved = tilde[0].clone()
    moved[:, 3] = zs[0][:, 3]
    assert float(token_cosine_loss(moved, zs[0])) < float(token_cosine_loss(tilde[0], zs[0]))


def test_half_precision_inputs_are_computed_in_fp32():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 8, 16, generator=g).bfloat16(), torch.randn(2, 8, 16, generator=g).bfloat16()
    out = token_cosine_loss(a, b)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, official_proj_loss([b.float()], [a.float()]), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="shapes differ"):
        token_cosine_loss(a, b[:, :4])


def test_projectors_are_repas_mlps_under_repas_keys():
    torch.manual_seed(0)
    cfg = model_config("SiT-T/4", input_size=16, in_channels=4, num_classes=10, depth=4, hidden_size=64,
                       z_dims=(48, 80), projector_dim=96)
    m = DiffusionTransformer(cfg).eval()
    expected = {}
    for j, z in enumerate((48, 80)):
        expected.update({f"projectors.{j}.0.weight": (96, 64), f"projectors.{j}.0.bias": (96,),
                         f"projectors.{j}.2.weight": (96, 96), f"projectors.{j}.2.bias": (96,),
                         f"projectors.{j}.4.weight": (z, 96), f"projectors.{j}.4.bias": (z,)})
    assert {k: tuple(v.shape) for k, v in m.state_dict().items() if k.startswith("projectors.")} == expected
    with torch.no_grad():  # adaLN-Zero would make every block an identity
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    refs = []
    for j, z in enumerate((48, 80)):
        ref = official_mlp(64, 96, z)
        ref.load_state_dict({k[len(f"projectors.{j}."):]: v for k, v in m.state_dict().items()
                             if k.startswith(f"projectors.{j}.")})
        refs.append(ref)
    x, t, y = torch.randn(3, 4, 16, 16), torch.rand(3), torch.tensor([1, 2, 10])
    with torch.no_grad():
        f = m.forward_features(x, t, y, drop_labels=False, repa_block=3)
        out = f.out
        h = m.block_features(x, t, y, [3])[3]
        n, tokens, d = h.shape
        for j, ref in enumerate(refs):
            torch.testing.assert_close(f.repa[j], ref(h.reshape(-1, d)).reshape(n, tokens, -1),
                                       rtol=0, atol=1e-6)
        plain = m(x, t, y, drop_labels=False)  # sampling: no projector runs, the output is the same
        assert torch.equal(plain, out)
        m.projectors = None
        assert torch.equal(m(x, t, y, drop_labels=False), plain)
    assert DiffusionTransformer(model_config("SiT-T/4", depth=2)).projectors is None
    with pytest.raises(ValueError, match="repa_block needs a model built with REPA projectors"):
        m.forward_features(x, t, y, repa_block=1)


# -- options -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, block, width", [("SiT-XL/2", 8, 2048), ("SiT-L/2", 8, 2048), ("SiT-B/2", 4, 2048),
                                                ("SiT-S/2", 4, 2048), ("SiT-M/4", 2, 512), ("SiT-T/4", 2, 256),
                                                ("DiT-T/4", 2, 256)])
def test_defaults(name, block, width):
    o = REPAOptions.from_dict({}, model_config(name))
    assert (o.encoder, o.encoder_depth, o.projector_dim, o.proj_coeff) == (("embedded",), block, width, 0.5)
    several = REPAOptions.from_dict({"encoder": "embedded, dinov2-vit-b:/w.pth"}, model_config(name))
    assert several.encoder == ("embedded", "dinov2-vit-b:/w.pth")
    assert REPAOptions.from_dict({"encoder": ["embedded", "features:/f.npy"]}, model_config(name)).encoder == (
        "embedded", "features:/f.npy")


@pytest.mark.parametrize("opts, message", [
    ({"encoder_dept": 2}, "unknown repa option(s) ['encoder_dept']"),
    ({"encoder_depth": 0}, "repa.encoder_depth must be an integer in 1..6, got 0"),
    ({"encoder_depth": 7}, "repa.encoder_depth must be an integer in 1..6, got 7"),
    ({"encoder_depth": 2.0}, "repa.encoder_depth must be an integer in 1..6"),
    ({"projector_dim": 0}, "repa.projector_dim must be an integer >= 1"),
    ({"proj_coeff": -1}, "repa.proj_coeff must be a finite number >= 0"),
    ({"proj_coeff": "high"}, "repa.proj_coeff must be a finite number >= 0"),
    ({"encoder": "clip"}, "unknown --encoder 'clip'"),
    ({"encoder": "embedded,embedded"}, "names an encoder twice"),
    ({"encoder": "embedded,"}, "has an empty entry"),
    ({"encoder": 3}, "repa.encoder must be an encoder spec or a list of them"),
])
def test_bad_options_are_one_line(opts, message):
    with pytest.raises(ValueError) as e:
        REPAOptions.from_dict(opts, model_config("SiT-T/4"))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_diverse_pairs_follow_the_repa_block_where_the_official_code_shares_it():
    """DiverseDiT's pair set depends on the one --encoder-depth it shares with REPA (B: 4); where that
    leaves no pair (tiny depths) the diversity loss keeps its own default, and an explicit value wins."""
    obj = make_objective("sit")

    def pairs(name, diverse=None, block=4):
        mc = model_config(name)
        cfg = TrainConfig(model=name, method="repa+diverse", diverse=diverse or {})
        terms = build_loss_terms(cfg, mc, obj, repa=REPATerm([], block, 0))  # no encoder: only the block matters
        assert [t.name for t in terms] == ["repa", "diverse"]
        return terms[1].pairs

    assert pairs("SiT-B/2") == official_pairs(12, 4) != official_pairs(12, 8)
    assert pairs("SiT-B/2", {"encoder_depth": 8}) == official_pairs(12, 8)
    assert official_pairs(6, 2) == [] and pairs("SiT-T/4", block=2) == official_pairs(6, 8)
    with pytest.raises(ValueError, match="pass REPA's term"):
        build_loss_terms(TrainConfig(method="repa"), model_config("SiT-T/4"), obj)


# -- training ------------------------------------------------------------------------------------------


@needs_fmnist
def test_trains_from_the_cli_with_no_extra_flag(tmp_path, small_encoder_cache):
    out = tmp_path / "repa"
    _ok(["train", "--preset", "sit-tiny", "--method", "repa", "--steps", "2", *TINY_CLI, "--out", out,
         "--set", "log_every=1"])
    rows = rows_of(out)
    assert [r["step"] for r in rows] == ["1", "2"]
    for r in rows:  # the total is the generation loss plus proj_coeff 0.5 times the projection loss
        assert -1 <= float(r["loss_proj"]) <= 1
        assert float(r["loss"]) == pytest.approx(float(r["loss_gen"]) + 0.5 * float(r["loss_proj"]), rel=1e-5)
    ckpt = out / "checkpoints" / "0000002.pt"
    state = torch.load(ckpt, weights_only=True)
    width = 2 * TINY["hidden_size"]  # the tiny default projector_dim; z = the embedded ViT's 64 channels
    assert {k: tuple(v.shape) for k, v in state["model"].items() if k.startswith("projectors.")} == {
        "projectors.0.0.weight": (width, 32), "projectors.0.0.bias": (width,), "projectors.0.2.weight": (width, width),
        "projectors.0.2.bias": (width,), "projectors.0.4.weight": (64, width), "projectors.0.4.bias": (64,)}
    assert state["meta"]["repa_encoders"][0]["spec"] == "embedded" and state["meta"]["method"] == "repa"
    assert not any("encoder" in k for k in state["model"])  # the encoder is never in the checkpoint
    ck = load_checkpoint(ckpt, weights="model")
    assert ck.ignored_keys == [] and ck.model.projectors is not None
    x, t, y = torch.randn(2, 1, 32, 32), torch.full((2,), 0.5), torch.full((2,), 10)
    with torch.no_grad():  # probing never touches the projectors
        assert set(ck.model.block_features(x, t, y, [1, 2])) == {1, 2}


@needs_fmnist
@pytest.mark.parametrize("model, method", [("SiT-T/4", "repa+diverse"), ("SiT-T/4", "sra+repa"), ("DiT-T/4", "repa"),
                                           ("DiT-T/4", "sra+repa+diverse")])
def test_combines_with_sra_and_diverse_for_sit_and_dit(tmp_path, small_encoder_cache, model, method):
    ckpt = quiet_train(tiny_config(tmp_path / "run", model=model, method=method))
    rows = rows_of(tmp_path / "run")
    cols = set(rows[-1])
    assert "loss_proj" in cols and ("loss_align" in cols) == ("sra" in method) and ("loss_div" in cols) == (
        "diverse" in method)
    assert all(np.isfinite(float(r["loss"])) for r in rows)
    sd = torch.load(ckpt, weights_only=True)["model"]
    assert any(k.startswith("projectors.0.4") for k in sd)
    assert any(k.startswith("ap_head.") for k in sd) == ("sra" in method)
    assert any(k.startswith("skip_fusions.") for k in sd) == ("diverse" in method)


@needs_fmnist
def test_resume_is_exact(tmp_path, small_encoder_cache):
    straight = quiet_train(tiny_config(tmp_path / "a", steps=4))
    quiet_train(tiny_config(tmp_path / "b", steps=2))
    resumed = quiet_train(tiny_config(tmp_path / "b", steps=4), resume=tmp_path / "b")
    a, b = torch.load(straight, weights_only=True), torch.load(resumed, weights_only=True)
    for part in ("model", "ema"):
        assert any(k.startswith("projectors.") for k in a[part])
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    for s_a, s_b in zip(a["opt"]["state"].values(), b["opt"]["state"].values()):
        assert torch.equal(s_a["exp_avg"], s_b["exp_avg"]) and torch.equal(s_a["exp_avg_sq"], s_b["exp_avg_sq"])
    assert [r["loss_proj"] for r in rows_of(tmp_path / "a")] == [r["loss_proj"] for r in rows_of(tmp_path / "b")]


def test_several_encoders_get_one_projector_each(tmp_path):
    """Precomputed tokens of two 'encoders' (rows in dataset order, and rows in a shuffled order
    with an index array): two projectors of their widths, the loss their mean, targets by index."""
    a = token_file(tmp_path / "a.npy", N_DIGITS, 4, 12, seed=0)
    b = token_file(tmp_path / "b.npz", N_DIGITS, 4, 20, seed=1, shuffled=True)
    cfg = tiny_config(tmp_path / "run", data="digits", repa={"encoder": f"features:{tmp_path / 'a.npy'},"
                                                                        f"features:{tmp_path / 'b.npz'}"})
    tr = Trainer(cfg, quiet=True)
    assert tr.model_config.z_dims == (12, 20) and len(tr.model.projectors) == 2
    term = tr.terms[0]
    idx = torch.tensor([5, 0, 1400, 7])
    got = [t.tokens(torch.zeros(4, 1, 8, 8), idx) for t in term.targets]
    for tokens, feats in zip(got, (a, b)):
        assert torch.equal(tokens, torch.from_numpy(feats[idx.numpy()]))
    quiet_train(cfg)
    r = rows_of(tmp_path / "run")[-1]
    assert float(r["loss_proj"]) == pytest.approx((float(r["loss_proj0"]) + float(r["loss_proj1"])) / 2, rel=1e-5)


def test_the_loader_with_workers_yields_the_indices_of_its_batches(tmp_path):
    """Precomputed targets are looked up by index: with DataLoader workers each batch still comes
    with its own indices (the same batches as without workers)."""
    token_file(tmp_path / "a.npy", N_DIGITS, 4, 8, seed=0)
    cfg = dict(data="digits", repa={"encoder": f"features:{tmp_path / 'a.npy'}"})
    plain = Trainer(tiny_config(tmp_path / "p", **cfg), quiet=True)._batches()
    workers = Trainer(tiny_config(tmp_path / "w", num_workers=1, **cfg), quiet=True)._batches()
    for _ in range(3):
        (x0, y0, i0), (x1, y1, i1) = next(plain), next(workers)
        assert torch.equal(i0, i1) and torch.equal(x0, x1) and torch.equal(y0, y1)


def test_a_changed_encoder_refuses_the_resume(tmp_path):
    token_file(tmp_path / "a.npy", N_DIGITS, 4, 8, seed=0)
    cfg = dict(data="digits", repa={"encoder": f"features:{tmp_path / 'a.npy'}"})
    quiet_train(tiny_config(tmp_path / "run", **cfg))
    token_file(tmp_path / "a.npy", N_DIGITS, 4, 8, seed=5)  # same path, other targets
    with pytest.raises(ValueError, match="REPA's encoder 'features:.*' is not the one the run trained with"):
        Trainer(tiny_config(tmp_path / "run", steps=4, **cfg), resume=tmp_path / "run", quiet=True)


def _latents(root: Path, n: int) -> None:
    """A REPA/SRA-layout latents folder: n moments (8, 4, 4), labels in dataset.json."""
    (root / "vae-sd" / "00000").mkdir(parents=True)
    labels = []
    for i in range(n):
        mom = np.concatenate([np.full((4, 4, 4), 0.1 * i), np.full((4, 4, 4), 0.5)]).astype(np.float32)
        np.save(root / "vae-sd" / "00000" / f"img{i:08d}.npy", mom)
        labels.append([f"00000/img{i:08d}.npy", i % 3])
    (root / "vae-sd" / "dataset.json").write_text(json.dumps({"labels": labels}))


@pytest.mark.slow
def test_latents_with_repas_images_folder_align_to_a_local_dinov2(tmp_path):
    """REPA's own data layout: raw images in images/ beside vae-sd/, paired by sorted order; the DINOv2
    encoder (a randomly initialised ViT-S/14 of the real class, from a local file) reads the raw image
    of each item, resized so that its patch grid is the model's token grid."""
    timm = pytest.importorskip("timm", reason="timm not installed (pip install 'repdyn[encoders]')")
    from PIL import Image

    _latents(tmp_path / "lat", 8)
    (tmp_path / "lat" / "images" / "00000").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
            tmp_path / "lat" / "images" / "00000" / f"img{i:08d}.png")
    torch.manual_seed(0)
    torch.save(timm.create_model("vit_small_patch14_dinov2", pretrained=False).state_dict(), tmp_path / "dino.pth")
    run = tmp_path / "run"
    _ok(["train", "--model", "SiT-T/2", "--data", f"latents:{tmp_path / 'lat'}", "--method", "repa", "--steps", "2",
         "--encoder", f"dinov2-vits14:{tmp_path / 'dino.pth'}", "--out", run, *TINY_CLI])
    assert -1 <= float(rows_of(run)[-1]["loss_proj"]) <= 1
    ck = torch.load(run / "checkpoints" / "0000002.pt", weights_only=True)
    assert ck["model"]["projectors.0.4.weight"].shape[0] == 384  # ViT-S/14's width
    (tmp_path / "lat" / "images" / "00000" / "img00000007.png").unlink()
    _one_line_error(["train", "--model", "SiT-T/2", "--data", f"latents:{tmp_path / 'lat'}", "--method", "repa",
                     "--steps", "1", "--out", tmp_path / "bad", *TINY_CLI], "has 7 images but vae-sd/ 8 latents")


def test_latents_need_precomputed_tokens(tmp_path):
    _latents(tmp_path / "lat", 16)
    base = ["train", "--model", "SiT-T/2", "--data", f"latents:{tmp_path / 'lat'}", "--method", "repa", "--steps", "1",
            *TINY_CLI]
    _one_line_error([*base, "--out", tmp_path / "a"], "needs the raw images, but --data latents:")
    _one_line_error([*base, "--out", tmp_path / "a"], "put them in images/ beside vae-sd/")
    token_file(tmp_path / "lat.npy", 16, 4, 8, seed=0)  # 4 x 4 latents, patch 2: 4 tokens
    _ok([*base, "--out", tmp_path / "b", "--encoder", f"features:{tmp_path / 'lat.npy'}"])
    assert float(rows_of(tmp_path / "b")[-1]["loss_proj"]) <= 1
    token_file(tmp_path / "few.npy", 16, 9, 8, seed=0)
    _one_line_error([*base, "--out", tmp_path / "c", "--encoder", f"features:{tmp_path / 'few.npy'}"],
                    "gives 3 x 3 tokens and the model 2 x 2")


@needs_fmnist
def test_configuration_errors_are_one_line(tmp_path, small_encoder_cache):
    base = ["train", "--preset", "sit-tiny", "--method", "repa", "--steps", "1", *TINY_CLI]
    _one_line_error([*base, "--out", tmp_path / "a", "--model", "SiT-T/2"],
                    "gives 8 x 8 tokens and the model 16 x 16")
    _one_line_error([*base, "--out", tmp_path / "b", "--set", "repa.encoder_depth=3"],
                    "repa.encoder_depth must be an integer in 1..2, got 3")
    _one_line_error([*base, "--out", tmp_path / "c", "--set", "repa.weight=1"], "unknown repa option(s) ['weight']")
    _one_line_error([*base, "--out", tmp_path / "d", "--set", "model_overrides.projector_dim=8"],
                    "set repa.projector_dim and repa.encoder, not model_overrides")


def test_train_help_lists_repa_and_its_encoder_flag():
    from typer.testing import CliRunner

    from repdyn.cli import app

    out = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "200"}).output
    # rich may keep the width of an earlier console: read the help text with its wrapping undone
    flat = " ".join(re.sub(r"[│╭╮╰╯─]", " ", out).split())
    assert "baseline | sra | repa | diverse" in flat and "repa+diverse" in flat and "--encoder" in flat
