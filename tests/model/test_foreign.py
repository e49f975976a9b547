"""Published checkpoint layouts the loader must read correctly, or refuse in one line.

The official-DiverseDiT file is built here from its documented layout (kobeshegu/DiverseDiT at
5fedda17, models/sit.py): long-residual fusions ``skip_linears.{j}.linear`` (Linear 2D -> D) and
``skip_norms.{j}`` (affine LayerNorm over the 2D concat, eps 1e-6), REPA ``projectors.*``. After
block i of the second half the stream becomes Linear(LayerNorm(cat[block i output, output of block
depth-1-i])), replacing the stream; t in [0, 1] is fed raw with t = 1 noise. The reference forward
below implements that from the raw tensors; only the blocks, embedders and final layer are borrowed
from the loaded model.
"""

import argparse
import zipfile

import pytest
import torch
import torch.nn.functional as F

from repdyn.model.checkpoint import load_checkpoint
from repdyn.model.backbone import build_model

HIDDEN, HEADS, DEPTH, PATCH, SIZE, CH, CLASSES = 64, 2, 4, 4, 16, 4, 10
PROJ_DIM, Z_DIM = 32, 16


def _random_backbone(name="SiT-T/4", seed=0, **kw):
    """Random weights (adaLN-Zero broken, so every block and the output do something)."""
    torch.manual_seed(seed)
    opts = dict(input_size=SIZE, in_channels=CH, num_classes=CLASSES)
    opts.update(kw)
    m = build_model(name, **opts)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return {k: v.clone() for k, v in m.state_dict().items()}


def official_diversedit_sd(seed=0):
    """A SiT state dict in the official DiverseDiT layout: no skip_fusions.*, official fusion names,
    a REPA projector (Linear-SiLU-Linear-SiLU-Linear, keys 0, 2, 4)."""
    sd = _random_backbone(seed=seed, hidden_size=HIDDEN, num_heads=HEADS, depth=DEPTH)
    assert not any(k.startswith("skip_") for k in sd)
    g = torch.Generator().manual_seed(seed + 1)
    for j in range(DEPTH // 2):
        sd[f"skip_linears.{j}.linear.weight"] = torch.randn(HIDDEN, 2 * HIDDEN, generator=g) / (2 * HIDDEN) ** 0.5
        sd[f"skip_linears.{j}.linear.bias"] = 0.1 * torch.randn(HIDDEN, generator=g)
        sd[f"skip_norms.{j}.weight"] = 1 + 0.2 * torch.randn(2 * HIDDEN, generator=g)
        sd[f"skip_norms.{j}.bias"] = 0.2 * torch.randn(2 * HIDDEN, generator=g)
    for idx, (i, o) in zip((0, 2, 4), ((HIDDEN, PROJ_DIM), (PROJ_DIM, PROJ_DIM), (PROJ_DIM, Z_DIM))):
        sd[f"projectors.0.{idx}.weight"] = torch.randn(o, i, generator=g) / i**0.5
        sd[f"projectors.0.{idx}.bias"] = torch.randn(o, generator=g)
    return sd


def reference_forward(model, sd, x, t, y, mode="official", encoder_depth=3):
    """Prediction, every block's stream and the REPA projector output, from the official layout.

    ``mode`` "official"; the wrong readings used to show the test can tell them apart: "no-skip"
    (fusions ignored: what the loader built before), "added" (fusion added to the stream), "swapped"
    (shallow first in the concat).
    """
    half = DEPTH // 2
    tokens = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=PATCH)
    h = tokens.flatten(2).transpose(1, 2) + sd["pos_embed"]
    c = model.t_embedder(t) + sd["y_embedder.embedding_table.weight"][y]  # t raw, no rescaling
    skips, streams, z = [], [], None
    for i in range(DEPTH):
        h = model.blocks[i](h, c)
        if i < half:
            skips.append(h)
        elif mode != "no-skip":
            j, shallow = i - half, skips.pop()
            cat = torch.cat([shallow, h] if mode == "swapped" else [h, shallow], dim=-1)
            cat = F.layer_norm(cat.float(), (2 * HIDDEN,), sd[f"skip_norms.{j}.weight"], sd[f"skip_norms.{j}.bias"],
                               eps=1e-6)
            fused = F.linear(cat, sd[f"skip_linears.{j}.linear.weight"], sd[f"skip_linears.{j}.linear.bias"])
            h = h + fused if mode == "added" else fused
        streams.append(h)
        if i + 1 == encoder_depth:
            z = h
            for idx in (0, 2, 4):
                z = F.linear(z, sd[f"projectors.0.{idx}.weight"], sd[f"projectors.0.{idx}.bias"])
                z = F.silu(z) if idx < 4 else z
    out = model.final_layer(h, c)  # (N, T, p * p * C)
    n, g = out.shape[0], SIZE // PATCH
    img = out.reshape(n, g, g, PATCH, PATCH, CH).permute(0, 5, 1, 3, 2, 4).reshape(n, CH, SIZE, SIZE)
    return img, streams, z


def _inputs(n=3):
    g = torch.Generator().manual_seed(5)
    return torch.randn(n, CH, SIZE, SIZE, generator=g), torch.rand(n, generator=g), torch.tensor([0, 3, 9])[:n]


def _training_dict(ema, online, **args):
    return {"model": online, "ema": ema, "opt": {"state": {}, "param_groups": []},
            "args": argparse.Namespace(**args), "steps": 40}


@pytest.fixture(scope="module")
def official_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("official")
    ema = official_diversedit_sd(seed=0)
    online = {k: v + 0.01 for k, v in ema.items()}
    torch.save(ema, d / "raw.pt")
    args = dict(model="SiT-T/4", path_type="linear", encoder_depth=3, num_heads=HEADS, proj_coeff=0.5)
    torch.save(_training_dict({f"module.{k}": v for k, v in ema.items()}, online, **args), d / "train.pt")
    return d, ema, online


@pytest.mark.parametrize("kind", ["raw", "train"])
def test_official_diversedit_matches_reference_forward(official_files, kind):
    d, ema, _ = official_files
    ck = (load_checkpoint(d / "raw.pt", num_heads=HEADS) if kind == "raw"
          else load_checkpoint(d / "train.pt", trust=True))
    m = ck.model
    assert m.config.long_skip and m.skip_fusions is not None and len(m.skip_fusions) == DEPTH // 2
    assert (m.config.hidden_size, m.config.num_heads, m.config.depth) == (HIDDEN, HEADS, DEPTH)
    assert ck.family == "sit" and ck.time_convention == "flow-t1-noise" and ck.meta["path"] == "linear"
    assert sorted(ck.ignored_keys) == sorted(k for k in ema if k.startswith("projectors."))
    x, t, y = _inputs()
    with torch.no_grad():
        ref, streams, z = reference_forward(m, ema, x, t, y)
        f = m.forward_features(x, t, y, blocks=range(1, DEPTH + 1))
        out, feats = f.out, f.blocks
        torch.testing.assert_close(m(x, t, y), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        hooked = {}
        for k in range(1, DEPTH + 1):
            torch.testing.assert_close(feats[k], streams[k - 1], atol=1e-5, rtol=1e-5)
            m.block_output_module(k).register_forward_hook(lambda mod, i, o, k=k: hooked.__setitem__(k, o))
        m(x, t, y)
        for k in range(1, DEPTH + 1):
            torch.testing.assert_close(hooked[k], streams[k - 1], atol=1e-5, rtol=1e-5)
        # REPA's projector (encoder_depth 3, after the first fusion) reads what our block 3 features are
        zz = feats[3]
        for idx in (0, 2, 4):
            zz = F.linear(zz, ema[f"projectors.0.{idx}.weight"], ema[f"projectors.0.{idx}.bias"])
            zz = F.silu(zz) if idx < 4 else zz
        torch.testing.assert_close(zz, z, atol=1e-5, rtol=1e-5)
        # the reference is sensitive to the layout: any other reading of the fusions differs clearly
        scale = ref.abs().mean()
        for mode in ("no-skip", "added", "swapped"):
            wrong, _, _ = reference_forward(m, ema, x, t, y, mode=mode)
            assert (wrong - ref).abs().mean() > 0.05 * scale, mode


def test_official_training_dict_weights_and_step(official_files):
    d, ema, online = official_files
    ck = load_checkpoint(d / "train.pt", weights="model", trust=True)
    assert ck.step == 40 and ck.weights == "model"
    torch.testing.assert_close(ck.model.skip_fusions[1].linear.weight, online["skip_linears.1.linear.weight"])
    torch.testing.assert_close(ck.model.skip_fusions[0].norm.bias, online["skip_norms.0.bias"])
    assert ck.model.skip_fusions[0].norm.eps == 1e-6
    ema_ck = load_checkpoint(d / "train.pt", trust=True)
    torch.testing.assert_close(ema_ck.model.blocks[2].attn.qkv.weight, ema["blocks.2.attn.qkv.weight"])


@pytest.mark.parametrize("extra", ["blocks.0.attn.q_norm.weight", "factorization_head.0.weight", "foo"])
def test_unknown_extra_key_is_a_one_line_error(tmp_path, extra):
    sd = official_diversedit_sd()
    sd[extra] = torch.zeros(HIDDEN)
    torch.save(sd, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="nor a known training-only head") as e:
        load_checkpoint(tmp_path / "x.pt", num_heads=HEADS)
    assert extra in str(e.value) and "\n" not in str(e.value)
    assert "projectors" not in str(e.value)  # the known heads are not the problem


def test_both_fusion_layouts_at_once_is_an_error(tmp_path):
    sd = official_diversedit_sd()
    sd["skip_fusions.0.norm.weight"] = sd["skip_norms.0.weight"].clone()
    torch.save(sd, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="skip_norms.0.weight"):
        load_checkpoint(tmp_path / "x.pt", num_heads=HEADS)


def _willisma_dict(path_type):
    sd = _random_backbone("SiT-T/4", learn_sigma=True)  # willisma/SiT: learned-sigma head, width 128
    return _training_dict(sd, sd, model="SiT-T/4", path_type=path_type, prediction="velocity")


@pytest.mark.parametrize("spelling,ours", [("Linear", "linear"), ("LINEAR", "linear"), ("GVP", "cosine"),
                                           ("gvp", "cosine"), ("cosine", "cosine")])
def test_official_path_spellings(tmp_path, spelling, ours):
    torch.save(_willisma_dict(spelling), tmp_path / "sit.pt")
    ck = load_checkpoint(tmp_path / "sit.pt", trust=True)
    assert ck.meta["path"] == ours and ck.time_convention == "flow-t0-noise"
    assert ck.objective.path == ours
    assert ck.inferred["path"].startswith(f"{ours} (from args.path_type {spelling!r}")


def test_unsupported_paths_are_one_line_errors(tmp_path):
    torch.save(_willisma_dict("VP"), tmp_path / "vp.pt")
    with pytest.raises(ValueError, match="'VP'.*not supported") as e:
        load_checkpoint(tmp_path / "vp.pt", trust=True)
    assert "\n" not in str(e.value)
    torch.save(_willisma_dict("GVP"), tmp_path / "gvp.pt")  # GVP is defined with t = 0 noise
    with pytest.raises(ValueError, match="flow-t0-noise"):
        load_checkpoint(tmp_path / "gvp.pt", trust=True, time_convention="flow-t1-noise")
    torch.save(_willisma_dict("Bridge"), tmp_path / "b.pt")
    with pytest.raises(ValueError, match="unknown path_type 'Bridge'"):
        load_checkpoint(tmp_path / "b.pt", trust=True)


def test_family_from_keys(tmp_path):
    sra = _random_backbone("SiT-T/4", sra_head=True)  # SiT-SRA: ap_head, no learned sigma
    torch.save(sra, tmp_path / "sit_sra.pt")
    ck = load_checkpoint(tmp_path / "sit_sra.pt")
    assert ck.family == "sit" and ck.model.ap_head is not None and "ap_head" in ck.inferred["family"]
    torch.testing.assert_close(ck.model.ap_head.linear2.weight, sra["ap_head.linear2.weight"])

    dit_sra = _random_backbone("DiT-T/4", sra_head=True)  # DiT-SRA: ap_head and the learned-sigma output
    torch.save(dit_sra, tmp_path / "dit_sra.pt")
    ck = load_checkpoint(tmp_path / "dit_sra.pt")
    assert ck.family == "dit" and ck.time_convention == "ddpm-t999-noisiest"

    repa = _random_backbone("SiT-T/4")
    repa["projectors.0.0.weight"] = torch.zeros(PROJ_DIM, 128)
    torch.save(repa, tmp_path / "repa.pt")
    ck = load_checkpoint(tmp_path / "repa.pt")
    assert ck.family == "sit" and "projectors" in ck.inferred["family"]
    assert ck.ignored_keys == ["projectors.0.0.weight"]

    torch.save(official_diversedit_sd(), tmp_path / "div.pt")
    assert "skip_linears" in load_checkpoint(tmp_path / "div.pt", num_heads=HEADS).inferred["family"]


@pytest.mark.parametrize("name,family", [("DiT-T/4", "dit"), ("SiT-T/4", "sit")])
def test_family_from_args_model(tmp_path, name, family):
    sd = _random_backbone(name)
    torch.save(_training_dict(sd, sd, model=name, global_batch_size=256), tmp_path / "ck.pt")  # no path_type
    ck = load_checkpoint(tmp_path / "ck.pt", trust=True)
    assert ck.family == family and ck.inferred["family"] == f"{family} (from args.model {name!r})"
    assert load_checkpoint(tmp_path / "ck.pt", trust=True, family=family).inferred.get("family") is None


def test_num_heads_from_args(tmp_path):
    sd = official_diversedit_sd()
    torch.save(_training_dict(sd, sd, path_type="linear", num_heads=HEADS), tmp_path / "a.pt")
    ck = load_checkpoint(tmp_path / "a.pt", trust=True)
    assert ck.model.config.num_heads == HEADS and ck.inferred["num_heads"] == f"{HEADS} (from args.num_heads)"

    tiny = _random_backbone("SiT-T/4")
    torch.save(_training_dict(tiny, tiny, model="SiT-T/4"), tmp_path / "b.pt")
    ck = load_checkpoint(tmp_path / "b.pt", trust=True)
    assert ck.model.config.num_heads == 4 and "model registry" in ck.inferred["num_heads"]

    # a registry name of another width does not settle it; neither does a raw file
    torch.save(_training_dict(sd, sd, model="SiT-T/4", path_type="linear"), tmp_path / "c.pt")
    torch.save(sd, tmp_path / "d.pt")
    for p, trust in ((tmp_path / "c.pt", True), (tmp_path / "d.pt", False)):
        with pytest.raises(ValueError, match="width 64.*--num-heads") as e:
            load_checkpoint(p, trust=trust)
        assert "\n" not in str(e.value)
    assert "num_heads" not in load_checkpoint(tmp_path / "d.pt", num_heads=HEADS).inferred  # given, not inferred


@pytest.mark.parametrize("content", [b"epoch,loss\n1,0.5\n", b"hello world\n", b"", b'{"model": 1}',
                                     "caf\u00e9 not torch".encode(), b"\x00\x01\x02binary"])
@pytest.mark.parametrize("trust", [False, True])
def test_non_pytorch_file_is_a_one_line_error(tmp_path, content, trust):
    p = tmp_path / "notes.pt"
    p.write_bytes(content)
    with pytest.raises(ValueError, match="is not a PyTorch checkpoint") as e:
        load_checkpoint(p, trust=trust, family="sit")
    assert str(e.value).startswith(str(p)) and "\n" not in str(e.value)


def test_zip_that_is_not_a_checkpoint(tmp_path):
    p = tmp_path / "images.zip"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("a.txt", "x")
    with pytest.raises(ValueError, match="is not a PyTorch checkpoint.*data.pkl"):
        load_checkpoint(p)


def test_load_notes(official_files, tmp_path):
    d, _, _ = official_files
    notes = load_checkpoint(d / "train.pt", trust=True).load_notes()
    assert "ignored 6 training-only keys: projectors.* (REPA projector heads)" in notes
    assert "inferred family sit from args.model 'SiT-T/4'" in notes
    assert f"inferred num_heads {HEADS} from args.num_heads" in notes
    assert any(n.startswith("inferred long_skip True from 8 skip_linears.*/skip_norms.* keys") for n in notes)
    assert any(n.startswith("inferred time_convention flow-t1-noise from layout") for n in notes)
    assert "inferred path linear from args.path_type 'linear'" in notes
    assert all("\n" not in n for n in notes)

    raw = load_checkpoint(d / "raw.pt", num_heads=HEADS)
    assert any(n.startswith("inferred family sit from skip_linears.*") for n in raw.load_notes())
    assert not any(n.startswith("inferred num_heads") for n in raw.load_notes())
    assert set(raw.inferred) >= {"family", "time_convention", "path", "long_skip", "architecture"}
    assert all(v.endswith(")") and " (" in v for v in raw.inferred.values())


# ------------------------------------------------------------------------------------------------
# The published layouts through the CLI: load, print what was inferred and ignored, record it
# ------------------------------------------------------------------------------------------------


def _fmnist_sd(**kw):
    return _random_backbone(input_size=32, in_channels=1, hidden_size=HIDDEN, num_heads=HEADS, depth=DEPTH, **kw)


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("layout", ["willisma-raw", "willisma-train", "repa-raw", "sra-train"])
def test_layer_grid_on_published_layouts_prints_what_it_inferred(layout, tmp_path):
    import json

    from typer.testing import CliRunner

    from repdyn.cli import app

    if layout.startswith("willisma"):
        sd = _fmnist_sd(learn_sigma=True)  # willisma/SiT keeps the learned-sigma head (t = 0 is noise)
    elif layout == "repa-raw":
        sd = _fmnist_sd(learn_sigma=False)
        g = torch.Generator().manual_seed(3)
        sd.update({"projectors.0.0.weight": torch.randn(8, HIDDEN, generator=g), "projectors.0.0.bias": torch.zeros(8)})
    else:
        sd = _fmnist_sd(learn_sigma=False, sra_head=True)
    path = tmp_path / f"{layout}.pt"
    flags = []
    if layout == "willisma-train":
        torch.save(_training_dict(sd, sd, model="SiT-XL/2", path_type="Linear"), path)  # as its train.py writes
        flags = ["--trust-checkpoint", "--num-heads", str(HEADS)]  # its args do not carry the heads
    elif layout == "sra-train":
        torch.save(_training_dict(sd, sd, model="SiT-T/4", path_type="linear", num_heads=HEADS), path)
        flags = ["--trust-checkpoint"]
    else:
        torch.save(sd, path)
        flags = ["--num-heads", str(HEADS)]  # a raw file at a non-standard width cannot say
        if layout == "willisma-raw":  # nor can a raw DiT/SiT release (the same keys and shapes) say its family
            flags += ["--family", "sit"]
    out = tmp_path / "lg"
    res = CliRunner().invoke(app, ["layer-grid", str(path), "--n-train", "30", "--n-test", "20", "--t", "0.5",
                                   "--blocks", "1", "--probe", "ridge", "--no-cache", "--quiet", "--out", str(out),
                                   *flags])
    assert res.exit_code == 0, res.output
    notes = [ln for ln in res.output.splitlines() if ln.startswith("note:")]
    assert any("inferred" in n for n in notes), res.output
    if layout == "repa-raw":
        assert any("ignored" in n and "projectors" in n for n in notes), res.output
    proto = json.loads((out / "layer_grid.protocol.json").read_text())["checkpoint_load"]
    assert proto["notes"] == [n.removeprefix("note: ") for n in notes] and proto["inferred"]
    conv = proto["inferred"].get("time_convention", "")
    assert ("flow-t0-noise" in conv) == layout.startswith("willisma")
