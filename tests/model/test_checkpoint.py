"""Checkpoint loading: ours, published layouts (raw DiT/SiT, REPA/SRA dicts), bad files."""

import argparse
import os
import warnings

import pytest
import torch

from repdyn.model.checkpoint import load_checkpoint, save_checkpoint
from repdyn.model.pickled import PickledCodeWarning, pickled_globals
from repdyn.model.backbone import build_model


def _official_sd(name, **kw):
    torch.manual_seed(0)
    return build_model(name, input_size=16, num_classes=10, **kw).state_dict()


def test_raw_dit_release_loads_with_family_flag(tmp_path):
    sd = _official_sd("DiT-S/4")  # learned sigma, 4 latent channels, 12 x 384, 6 heads
    p = tmp_path / "DiT-S-4.pt"
    torch.save(sd, p)
    with pytest.raises(ValueError, match="--family dit"):
        load_checkpoint(p)
    ck = load_checkpoint(p, family="dit")
    assert ck.meta["family"] == "dit" and ck.meta["learn_sigma"] and ck.model.config.num_heads == 6
    assert ck.meta["time_convention"] == "ddpm-t999-noisiest"
    for k, v in ck.model.state_dict().items():
        assert torch.equal(v, sd[k])


def test_willisma_sit_layout_gets_mirrored_time(tmp_path):
    p = tmp_path / "SiT.pt"
    torch.save(_official_sd("SiT-S/4", learn_sigma=True), p)
    ck = load_checkpoint(p, family="sit")
    assert ck.meta["time_convention"] == "flow-t0-noise" and ck.meta["time_convention_source"] == "inferred from layout"
    assert load_checkpoint(p, family="sit", time_convention="flow-t1-noise").meta["time_convention"] == "flow-t1-noise"


def test_repa_sra_dict_reports_extra_keys(tmp_path):
    sd = _official_sd("SiT-S/4", sra_head=True)
    sd["projectors.0.0.weight"] = torch.zeros(3, 3)  # a REPA projector
    ema = {f"module.{k}": v for k, v in sd.items()}  # DDP prefix, as some releases have
    p = tmp_path / "sra.pt"
    torch.save({"model": sd, "ema": ema, "opt": {}, "args": argparse.Namespace(path_type="linear"), "steps": 7}, p)
    with pytest.raises(ValueError, match="pickled Python objects .*--trust-checkpoint"):
        load_checkpoint(p)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PickledCodeWarning)  # a Namespace is data, not code: no warning
        ck = load_checkpoint(p, trust=True)  # args carries path_type -> SiT, REPA convention
    assert ck.meta["family"] == "sit" and ck.meta["time_convention"] == "flow-t1-noise"
    assert ck.ignored_keys == ["projectors.0.0.weight"] and ck.step == 7
    assert ck.model.ap_head is not None


def test_missing_and_misshapen_keys_are_named(tmp_path):
    sd = _official_sd("SiT-S/4")
    del sd["blocks.3.attn.qkv.weight"]
    torch.save(sd, tmp_path / "a.pt")
    with pytest.raises(ValueError, match="blocks.3.attn.qkv.weight"):
        load_checkpoint(tmp_path / "a.pt", family="sit")
    sd = _official_sd("SiT-S/4")
    sd["blocks.0.mlp.fc2.bias"] = torch.zeros(5)
    torch.save(sd, tmp_path / "b.pt")
    with pytest.raises(ValueError, match="blocks.0.mlp.fc2.bias"):
        load_checkpoint(tmp_path / "b.pt", family="sit")


def test_corrupt_and_truncated_files(tmp_path):
    good = tmp_path / "good.pt"
    torch.save(_official_sd("SiT-S/4"), good)
    data = good.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    for name in ("trunc.pt", "junk.pt"):
        with pytest.raises(ValueError, match="unreadable"):
            load_checkpoint(tmp_path / name, family="sit")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "absent.pt")
    with pytest.raises(ValueError, match="weights must be"):
        load_checkpoint(good, weights="student")


def test_atomic_save_leaves_old_file_on_failure(tmp_path):
    p = tmp_path / "ck.pt"
    save_checkpoint({"a": torch.ones(2)}, p)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("serialisation failed")

    with pytest.raises(RuntimeError):
        save_checkpoint({"a": Boom()}, p)
    assert torch.equal(torch.load(p, weights_only=True)["a"], torch.ones(2))
    assert [f.name for f in tmp_path.iterdir()] == ["ck.pt"]  # no temp file left behind


def test_our_long_skip_checkpoint_loads_without_notes(tmp_path):
    torch.manual_seed(0)
    m = build_model("SiT-T/4", input_size=16, in_channels=1, num_classes=3, depth=4, long_skip=True, sra_head=True)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    sd = m.state_dict()
    assert {"skip_fusions.1.norm.weight", "skip_fusions.1.norm.bias", "skip_fusions.1.linear.weight"} <= set(sd)
    meta = {"family": "sit", "model_config": m.config.to_dict(), "path": "linear", "learn_sigma": False,
            "time_convention": "flow-t1-noise", "num_timesteps": 1000, "method": "diverse"}
    p = tmp_path / "0000010.pt"
    save_checkpoint({"model": sd, "ema": sd, "opt": {}, "steps": 10, "epoch": 0, "config": {}, "meta": meta}, p)
    ck = load_checkpoint(p)
    assert ck.inferred == {} and ck.load_notes() == [] and ck.ignored_keys == []
    with pytest.raises(ValueError, match="--family dit contradicts 0000010.pt: it is a sit checkpoint"):
        load_checkpoint(p, family="dit")
    x, t, y = torch.randn(2, 1, 16, 16), torch.rand(2), torch.tensor([0, 2])
    torch.testing.assert_close(ck.model(x, t, y), m.eval()(x, t, y))


@pytest.mark.parametrize("decay,steps,weights,warns", [(0.999, 40, "ema", True), (0.999, 5000, "ema", False),
                                                       (0.999, 40, "model", False), (0.9, 30, "ema", False)])
def test_an_ema_that_is_mostly_its_initialisation_warns(tmp_path, decay, steps, weights, warns):
    """Any method: the warning follows decay ** steps (> 10% of the initial weights left), not SRA."""
    import warnings

    from repdyn.model.checkpoint import ema_init_fraction

    m = build_model("SiT-T/4", input_size=8, in_channels=1, num_classes=3, depth=2)
    meta = {"family": "sit", "model_config": m.config.to_dict(), "path": "linear", "learn_sigma": False,
            "time_convention": "flow-t1-noise", "num_timesteps": 1000, "method": "baseline"}
    p = tmp_path / f"{steps:07d}.pt"
    sd = m.state_dict()
    save_checkpoint({"model": sd, "ema": sd, "opt": {}, "steps": steps, "epoch": 0,
                     "config": {"ema_decay": decay, "method": "baseline"}, "meta": meta}, p)
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        ck = load_checkpoint(p, weights=weights)
    hits = [w for w in got if "random initialisation" in str(w.message)]
    assert bool(hits) == warns, [str(w.message) for w in got]
    if weights == "ema":
        assert ema_init_fraction(ck) == pytest.approx(decay ** steps)
    if warns:
        assert f"{decay ** steps:.0%}" in str(hits[0].message) and "--weights model" in str(hits[0].message)


class _RunsCode:
    """Pickles as a call of os.path.join: harmless here, but code all the same."""

    def __reduce__(self):
        return (os.path.join, ("a", "b"))


@pytest.mark.parametrize("protocol", [2, 4])  # GLOBAL (torch's default) and STACK_GLOBAL opcodes
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's note on protocol 4
def test_pickled_code_is_refused_by_name_and_warned_about_when_trusted(tmp_path, protocol):
    sd = _official_sd("SiT-S/4")
    p = tmp_path / "code.pt"
    torch.save({"model": sd, "ema": sd, "extra": _RunsCode()}, p, pickle_protocol=protocol)
    assert "posixpath.join" in pickled_globals(p) or "ntpath.join" in pickled_globals(p)
    with pytest.raises(ValueError, match=r"this file contains pickled code \(\w+path\.join\); refused \(pass "
                                         r"--trust-checkpoint only if you trust it\)") as e:
        load_checkpoint(p, family="sit")
    assert "unreadable" not in str(e.value) and "\n" not in str(e.value)
    with pytest.warns(PickledCodeWarning, match="contains pickled code .*join"):
        ck = load_checkpoint(p, family="sit", trust=True)
    assert ck.family == "sit"


def test_non_dit_state_dict_is_refused_before_family_is_asked(tmp_path):
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))  # a ResNet's first layers
    p = tmp_path / "resnet.pt"
    torch.save(net.state_dict(), p)
    for family in (None, "sit"):
        with pytest.raises(ValueError, match=r"resnet\.pt is not a DiT/SiT state dict: it has no "
                                             r"x_embedder\.proj\.weight .*its keys: 0\.weight"):
            load_checkpoint(p, family=family)


def test_family_flag_contradicting_the_file_is_an_error(tmp_path):
    sd = _official_sd("SiT-S/4")
    p = tmp_path / "sit.pt"
    torch.save({"model": sd, "ema": sd, "args": {"model": "SiT-XL/2"}}, p)  # a plain dict: weights-only readable
    with pytest.raises(ValueError, match=r"--family dit contradicts sit\.pt: its args.model 'SiT-XL/2' says sit"):
        load_checkpoint(p, family="dit")
    assert load_checkpoint(p, family="sit").family == "sit"
    assert load_checkpoint(p).inferred["family"].startswith("sit (from args.model")


def test_weights_model_on_a_raw_release_is_noted(tmp_path):
    p = tmp_path / "raw.pt"
    torch.save(_official_sd("SiT-S/4"), p)
    notes = load_checkpoint(p, family="sit", weights="model").load_notes()
    assert any(n.startswith("--weights model: raw.pt is a raw release with one weight set") for n in notes)
    ck = load_checkpoint(p, family="sit")
    assert not any("--weights model" in n for n in ck.load_notes())
    assert ck.meta["raw_release"]  # figures name its weights "release", not "ema"
