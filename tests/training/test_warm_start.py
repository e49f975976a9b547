"""A new run from published weights: the file's weights, EMA, AdamW moments (matched by name, in
whatever order the file's optimiser holds them) and step count carry over; data, method and flags
that do not fit the file are one-line errors; a release without a step count starts at 0."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from repdyn.model.backbone import build_model
from repdyn.model.checkpoint import load_checkpoint
from repdyn.training.config import resolve_config
from repdyn.training.trainer import Trainer
from repdyn.training.warm_start import read_warm_start
from tests.commands.support import _ok, _one_line_error

ARCH = dict(input_size=8, in_channels=1, num_classes=10, depth=2, hidden_size=64, num_heads=4)
TRAIN = ["--data", "digits", "--batch-size", "8", "--device", "cpu", "--num-heads", "4", "--quiet"]


def _official_file(path: Path, *, steps: int | None = 7, learn_sigma: bool = False, raw: bool = False) -> dict:
    """A training checkpoint in the official REPA layout (``model``/``ema``/``opt``/``steps``, REPA
    projector heads), its keys in another order than ours and its AdamW state indexed by that order,
    as ``AdamW(model.parameters())`` in the official trainers indexes it."""
    torch.manual_seed(3)
    m = build_model("SiT-T/4", learn_sigma=learn_sigma, **ARCH)
    ema = build_model("SiT-T/4", learn_sigma=learn_sigma, **ARCH)
    heads = {"projectors.0.0.weight": torch.randn(16, 64), "projectors.0.0.bias": torch.randn(16)}
    names = list(reversed(list(m.state_dict()))) + list(heads)
    sd = {**m.state_dict(), **heads}
    model_sd = {k: sd[k] for k in names}
    ema_sd = {**{k: v for k, v in ema.state_dict().items()}, **heads}
    params = [torch.nn.Parameter(model_sd[k].clone()) for k in names]
    opt = torch.optim.AdamW(params, lr=1e-4)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    obj = model_sd if raw else {"model": model_sd, "ema": ema_sd, "opt": opt.state_dict(), "steps": steps}
    if not raw and steps is None:
        del obj["steps"]
    torch.save(obj, path)
    return {"model": model_sd, "ema": ema_sd, "opt": opt.state_dict(), "names": names}


def _trainer(tmp_path, file: Path, **kw) -> Trainer:
    warm = read_warm_start(file, num_heads=4)
    cfg = resolve_config(None, overrides=dict(data="digits", batch_size=8, steps=9, out=str(tmp_path / "run"),
                                              device="cpu", **warm.config_fields(), init_from=str(file), **kw))
    return Trainer(cfg, warm=warm)


def test_weights_ema_moments_and_step_carry_over(tmp_path):
    file = tmp_path / "0000007.pt"
    made = _official_file(file)
    tr = _trainer(tmp_path, file)
    assert tr.step == 7 and tr.warm_start["steps"] == 7
    for k, v in tr.model.state_dict().items():
        assert torch.equal(v, made["model"][k]), k
    for k, v in tr.ema.state_dict().items():
        assert torch.equal(v, made["ema"][k]), k
    state = tr.opt.state_dict()["state"]
    named = [n for n, p in tr.model.named_parameters() if p.requires_grad]
    moved = {n: state[j] for j, n in enumerate(named) if j in state}
    assert set(moved) == {n for n in named if n in made["names"]}
    for n, st in moved.items():
        i = made["names"].index(n)
        assert torch.equal(st["exp_avg"], made["opt"]["state"][i]["exp_avg"]), n
    assert tr.opt.param_groups[0]["lr"] == tr.cfg.lr  # the new run's hyper-parameters, the file's moments


def test_a_release_without_steps_starts_at_zero_with_one_weight_set(tmp_path):
    file = tmp_path / "release.pt"
    made = _official_file(file, raw=True)
    tr = _trainer(tmp_path, file)
    assert tr.step == 0 and tr.warm_start["steps"] is None
    for k, v in tr.ema.state_dict().items():
        assert torch.equal(v, made["model"][k]) and torch.equal(tr.model.state_dict()[k], v), k
    assert not tr.opt.state_dict()["state"]


def test_an_sra_run_adds_a_fresh_head_to_a_baseline_file(tmp_path):
    file = tmp_path / "0000007.pt"
    _official_file(file)
    tr = _trainer(tmp_path, file, method="sra", sra={"student_block": 1, "teacher_block": 2})
    head = [k for k in tr.model.state_dict() if k.startswith("ap_head.")]
    assert head and all(torch.equal(tr.ema.state_dict()[k], tr.model.state_dict()[k]) for k in head)


def test_fine_tune_from_the_cli_then_resume(tmp_path):
    file = tmp_path / "0000007.pt"
    made = _official_file(file)
    out = tmp_path / "ft"
    res = _ok(["train", "--resume", file, "--out", out, "--steps", "9", *TRAIN])
    assert "warm start: continuing its step count from 7" in res.output
    assert "AdamW moments of" in res.output and "projectors.*" in res.output
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["init_from"] == str(file.resolve()) and config["model"] == "SiT-S/4"
    assert config["model_overrides"]["depth"] == 2 and config["model_overrides"]["hidden_size"] == 64
    assert sorted(p.name for p in (out / "checkpoints").glob("*.pt")) == ["0000009.pt"]
    ck = load_checkpoint(out / "checkpoints" / "0000009.pt", weights="model")
    first = next(k for k in made["names"] if k.startswith("blocks.0.attn.qkv.weight"))
    assert not torch.equal(ck.model.state_dict()[first], made["model"][first])  # it trained
    assert ck.meta["warm_start"]["sha"] and ck.meta["warm_start"]["steps"] == 7
    _ok(["train", "--resume", out, "--steps", "10", "--quiet"])  # the fine-tuned run resumes as any run
    assert (out / "checkpoints" / "0000010.pt").exists()


@pytest.mark.parametrize("extra, message", [
    (["--steps", "7"], "pass --steps larger than 7"),
    (["--steps", "9", "--data", "fashion-mnist"], "is a model of input_size 8, but --data fashion-mnist gives 32"),
    (["--steps", "9", "--method", "diverse"], "needs DiverseDiT long skips"),
    (["--steps", "9", "--model", "SiT-B/2"], "--model SiT-B/2 contradicts 0000007.pt"),
    (["--steps", "9", "--set", "model_overrides.depth=4"], "has depth 2 but the config asks for 4"),
])
def test_what_does_not_fit_the_file_is_one_line(tmp_path, extra, message):
    file = tmp_path / "0000007.pt"
    _official_file(file)
    _one_line_error(["train", "--resume", file, "--out", tmp_path / "ft", *TRAIN, *extra], message)
    assert not (tmp_path / "ft" / "checkpoints").exists()


def test_a_willisma_sit_file_is_refused(tmp_path):
    """willisma/SiT reads t with 0 as noise: fine-tuning it with t = 1 as noise would reverse time."""
    file = tmp_path / "sit.pt"
    _official_file(file, learn_sigma=True, steps=None)
    _one_line_error(["train", "--resume", file, "--out", tmp_path / "ft", *TRAIN, "--family", "sit"],
                    "reads t with t = 0 as noise")


def _official_repa_file(path: Path, *, z_dims: tuple[int, ...] = (12,), projector_dim: int = 24, steps: int = 7,
                        args: dict | None = None) -> dict:
    """An official REPA training checkpoint (``model``/``ema``/``opt``/``args``/``steps``): a SiT with
    REPA's projectors (``build_mlp``: Linear-SiLU-Linear-SiLU-Linear, keys ``projectors.{k}.{0,2,4}``),
    its keys in REPA's registration order (pos_embed, embedders, blocks, projectors, final layer) and
    its AdamW state indexed by that order, as ``AdamW(model.parameters())`` in REPA's train.py."""
    torch.manual_seed(4)
    m = build_model("SiT-T/4", z_dims=z_dims, projector_dim=projector_dim, **ARCH)
    sd = m.state_dict()
    head = [k for k in sd if k.startswith("projectors.")]
    last = [k for k in sd if k.startswith("final_layer.")]
    names = [k for k in sd if k not in head and k not in last] + head + last
    model_sd = {k: sd[k] for k in names}
    ema_sd = {k: v + 0.01 * torch.randn_like(v) for k, v in model_sd.items()}  # an EMA that is not the model
    params = [torch.nn.Parameter(model_sd[k].clone()) for k in names]
    opt = torch.optim.AdamW(params, lr=1e-4)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    obj = {"model": model_sd, "ema": ema_sd, "opt": opt.state_dict(), "args": args or {}, "steps": steps}
    torch.save(obj, path)
    return {"model": model_sd, "ema": ema_sd, "opt": opt.state_dict(), "names": names}


def _digit_tokens(path: Path, dim: int) -> Path:
    """Precomputed encoder tokens of the digits training images: (1437, 2 x 2 tokens, dim)."""
    np.save(path, np.random.default_rng(dim).standard_normal((1437, 4, dim)).astype(np.float32))
    return path


def test_an_official_repa_checkpoint_fine_tunes_with_its_projectors(tmp_path):
    file = tmp_path / "0000007.pt"
    made = _official_repa_file(file, args={"encoder_depth": 1, "enc_type": "dinov2-vit-b"})
    warm = read_warm_start(file, num_heads=4)
    assert warm.repa_defaults() == {"encoder_depth": 1, "projector_dim": 24}  # the file's block and width
    repa = {**warm.repa_defaults(), "encoder": f"features:{_digit_tokens(tmp_path / 'z.npy', 12)}"}
    cfg = resolve_config(None, overrides=dict(data="digits", batch_size=8, steps=9, out=str(tmp_path / "run"),
                                              device="cpu", **warm.config_fields(), init_from=str(file),
                                              method="repa", repa=repa))
    tr = Trainer(cfg, warm=warm)
    assert tr.step == 7 and tr.model_config.z_dims == (12,) and tr.terms[0].encoder_depth == 1
    head = [k for k in made["names"] if k.startswith("projectors.")]
    assert len(head) == 6
    for k in head:  # the file's projectors, online and EMA
        assert torch.equal(tr.model.state_dict()[k], made["model"][k]) and torch.equal(tr.ema.state_dict()[k],
                                                                                        made["ema"][k]), k
    state = tr.opt.state_dict()["state"]
    named = [n for n, p in tr.model.named_parameters() if p.requires_grad]
    moved = {n: state[j] for j, n in enumerate(named) if j in state}
    assert set(head) <= set(moved) and set(moved) == {n for n in named if n in made["names"]}
    for n, st in moved.items():  # every moment where the file's optimiser had it, by name
        i = made["names"].index(n)
        assert torch.equal(st["exp_avg"], made["opt"]["state"][i]["exp_avg"]), n
        assert torch.equal(st["exp_avg_sq"], made["opt"]["state"][i]["exp_avg_sq"]), n


def test_official_repa_fine_tune_from_the_cli_then_resume(tmp_path):
    run = tmp_path / "exp" / "checkpoints"  # where REPA's train.py writes: a published file, not our run
    run.mkdir(parents=True)
    file = run / "0000007.pt"
    made = _official_repa_file(file)
    z = _digit_tokens(tmp_path / "z.npy", 12)
    out = tmp_path / "ft"
    res = _ok(["train", "--resume", file, "--out", out, "--steps", "9", "--method", "repa", "--encoder",
               f"features:{z}", *TRAIN])
    assert "warm start: REPA projectors (6 tensors) from 0000007.pt: online and EMA" in res.output
    assert "ignored" not in res.output  # the loader's note about leaving them out does not apply
    assert re.search(r"AdamW moments of (\d+) of \1 parameters", res.output)  # every one, projectors included
    ck = load_checkpoint(out / "checkpoints" / "0000009.pt", weights="model")
    assert ck.meta["method"] == "repa" and ck.config["repa"]["projector_dim"] == 24
    assert not torch.equal(ck.model.state_dict()["projectors.0.4.weight"], made["model"]["projectors.0.4.weight"])
    _ok(["train", "--resume", out, "--steps", "10", "--quiet"])  # the fine-tuned run resumes as any run
    assert (out / "checkpoints" / "0000010.pt").exists()
    other = _ok(["train", "--resume", file, "--out", tmp_path / "sra", "--steps", "9", "--method", "sra", *TRAIN])
    assert "ignored 6 training-only keys: projectors.* (REPA projector heads)" in other.output  # left out
    _one_line_error(["train", "--resume", file, "--steps", "9", *TRAIN], "pass --out to start a new run")


def test_repa_projectors_that_do_not_fit_are_one_line_and_a_baseline_file_gets_new_ones(tmp_path):
    file = tmp_path / "0000007.pt"
    _official_repa_file(file)
    wide = _digit_tokens(tmp_path / "z16.npy", 16)
    _one_line_error(["train", "--resume", file, "--out", tmp_path / "a", "--steps", "9", "--method", "repa",
                     "--encoder", f"features:{wide}", *TRAIN],
                    "has REPA projectors to z dims [12] of width 24, but --method repa builds z dims [16] of width 24")
    base = tmp_path / "base.pt"
    _official_file(base, steps=3)  # its projectors.* are not REPA's MLPs: a run with repa says so
    _one_line_error(["train", "--resume", base, "--out", tmp_path / "b", "--steps", "9", "--method", "repa",
                     "--encoder", f"features:{wide}", *TRAIN], "are not REPA's projector MLPs")
    plain = tmp_path / "plain.pt"
    torch.save(build_model("SiT-T/4", **ARCH).state_dict(), plain)  # a release without projectors
    res = _ok(["train", "--resume", plain, "--out", tmp_path / "c", "--steps", "1", "--method", "repa", "--family",
               "sit", "--encoder", f"features:{wide}", *TRAIN])
    assert "the REPA projectors (6 tensors) are new: plain.pt has none; they start untrained" in res.output


def test_official_repa_args_and_a_raw_model_dict(tmp_path):
    """REPA's train.py pickles an argparse.Namespace (read with --trust-checkpoint): its encoder_depth
    is the run's default block. A raw REPA model dict (one weight set) gives its projectors to both."""
    file = tmp_path / "0000007.pt"
    made = _official_repa_file(file, args=argparse.Namespace(encoder_depth=1, enc_type="dinov2-vit-b", model="SiT-B/2"))
    with pytest.raises(ValueError, match="--trust-checkpoint"):
        read_warm_start(file, num_heads=4)
    warm = read_warm_start(file, num_heads=4, trust=True)
    assert warm.repa_defaults() == {"encoder_depth": 1, "projector_dim": 24}
    assert any("trained with REPA encoder(s) dinov2-vit-b at block 1" in n for n in warm.notes)
    raw = tmp_path / "repa-raw.pt"
    torch.save(made["model"], raw)
    z = _digit_tokens(tmp_path / "z.npy", 12)
    warm = read_warm_start(raw, num_heads=4, family="sit")
    cfg = resolve_config(None, overrides=dict(data="digits", batch_size=8, steps=2, out=str(tmp_path / "run"),
                                              device="cpu", **warm.config_fields(), init_from=str(raw), method="repa",
                                              repa={**warm.repa_defaults(), "encoder": f"features:{z}"}))
    tr = Trainer(cfg, warm=warm)
    assert tr.step == 0 and not tr.opt.state_dict()["state"]
    for k in (k for k in made["names"] if k.startswith("projectors.")):
        assert torch.equal(tr.model.state_dict()[k], made["model"][k]) and torch.equal(tr.ema.state_dict()[k],
                                                                                        made["model"][k]), k
