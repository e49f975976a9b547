"""DiverseDiT: long-skip pairing and parameters, the three diversity terms by hand, pair set,
adaptive weight, config errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from repdyn.training.config import TrainConfig
from repdyn.training.methods import StepContext, build_loss_terms
from repdyn.training.methods.diverse import (DiversityTerm, adaptive_weight, dispersion, diversity_loss, mi_proxy,
    official_pairs, orthogonality)
from repdyn.model.backbone import Features, build_model, model_config
from repdyn.model.objectives import make_objective

HAVE_FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists()


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: one intra-op thread is faster


def tiny(family="sit", depth=6, long_skip=True, **kw):
    torch.manual_seed(0)
    name = "SiT-T/8" if family == "sit" else "DiT-T/8"
    model = build_model(name, input_size=16, in_channels=1, num_classes=10, depth=depth, hidden_size=32,
                        long_skip=long_skip, **kw)
    # Non-zero adaLN so the blocks are not identities at init (the pairing test must see differences).
    with torch.no_grad():
        for b in model.blocks:
            b.adaLN_modulation[-1].weight.normal_(0, 0.1)
    return model


def inputs(n=3, family="sit"):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 16, 16, generator=g)
    t = torch.rand(n, generator=g) if family == "sit" else torch.randint(0, 1000, (n,), generator=g)
    return x, t, torch.arange(n) % 10


# -- long residual connections --------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sit", "dit"])
def test_lrc_pairs_block_i_with_block_L_minus_1_minus_i(family):
    depth = 6
    model = tiny(family, depth).eval()
    outs, received = {}, {}
    for i, blk in enumerate(model.blocks):
        blk.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o))
    for j, fus in enumerate(model.skip_fusions):
        fus.register_forward_hook(lambda m, a, o, j=j: received.__setitem__(j, (a[0], a[1], o)))
    x, t, y = inputs(family=family)
    with torch.no_grad():
        feats = model.forward_features(x, t, y, blocks=range(1, depth + 1)).blocks
    half = depth // 2
    assert len(received) == half
    for i in range(half, depth):  # 0-based deep block i
        deep, shallow, fused = received[i - half]
        torch.testing.assert_close(deep, outs[i], rtol=0, atol=0)  # concat order [deep, shallow]
        torch.testing.assert_close(shallow, outs[depth - 1 - i], rtol=0, atol=0)
        torch.testing.assert_close(feats[i + 1], fused, rtol=0, atol=0)  # the fusion replaces the stream
    for i in range(half):
        torch.testing.assert_close(feats[i + 1], outs[i], rtol=0, atol=0)
    # Distinct shallow inputs, so the pairing really is checked (blocks are not identities).
    assert not torch.allclose(outs[0], outs[half - 1])


def test_lrc_fusion_formula_and_fp32_layernorm():
    model = tiny()
    fus = model.skip_fusions[0]
    with torch.no_grad():
        fus.norm.weight.normal_(1, 0.1)
        fus.norm.bias.normal_(0, 0.1)
    deep, shallow = torch.randn(2, 4, 32), torch.randn(2, 4, 32)
    h = torch.cat([deep, shallow], -1)
    mu, var = h.mean(-1, keepdim=True), h.var(-1, unbiased=False, keepdim=True)
    normed = (h - mu) / torch.sqrt(var + fus.norm.eps) * fus.norm.weight + fus.norm.bias
    want = normed @ fus.linear.weight.T + fus.linear.bias
    torch.testing.assert_close(fus(deep, shallow), want, rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # statistics in fp32, the Linear in bf16
        out = fus(deep.bfloat16(), shallow.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), want, rtol=0.05, atol=0.05)


def test_lrc_parameter_names_and_checkpoint_compat():
    with_lrc, without = tiny(depth=4), tiny(depth=4, long_skip=False)
    keys = [k for k in with_lrc.state_dict() if k.startswith("skip_fusions.")]
    assert sorted(keys) == sorted(f"skip_fusions.{j}.{p}.{w}" for j in range(2) for p in ("norm", "linear")
                                  for w in ("weight", "bias"))
    assert with_lrc.state_dict()["skip_fusions.0.norm.weight"].shape == (64,)
    assert with_lrc.state_dict()["skip_fusions.0.linear.weight"].shape == (32, 64)
    assert not any(k.startswith("skip_fusions.") for k in without.state_dict())
    # A checkpoint without fusions loads into a model without them (strict); the backbone keys are shared.
    fresh = build_model("SiT-T/8", input_size=16, in_channels=1, num_classes=10, depth=4, hidden_size=32)
    fresh.load_state_dict(without.state_dict())
    base = {k: v for k, v in with_lrc.state_dict().items() if not k.startswith("skip_fusions.")}
    assert set(base) == set(without.state_dict())


def test_odd_depth_lrc_is_a_config_error():
    with pytest.raises(ValueError, match="even depth"):
        model_config("SiT-T/4", depth=5, long_skip=True)
    with pytest.raises(ValueError, match="even depth"):
        DiversityTerm.from_config(TrainConfig(method="diverse"), _unchecked_config(depth=5, long_skip=True),
                                  make_objective("sit"))


def _unchecked_config(**kw):
    """A ModelConfig that skipped validate(), to reach the term's own check."""
    from dataclasses import replace

    return replace(model_config("SiT-T/4"), **kw)


@pytest.mark.skipif(not HAVE_FMNIST, reason="Fashion-MNIST not installed (make data)")
def test_trainer_rejects_odd_depth_lrc_before_training(tmp_path):
    from repdyn.training.trainer import Trainer

    cfg = TrainConfig(model="SiT-T/8", method="diverse", model_overrides={"depth": 5}, steps=3,
                      out=str(tmp_path / "run"), device="cpu")
    with pytest.raises(ValueError, match="even depth"):
        Trainer(cfg, quiet=True)
    assert not (tmp_path / "run" / "metrics.csv").exists()


def test_features_only_when_asked():
    model = tiny().eval()
    x, t, y = inputs()
    out = model(x, t, y)  # the sampling / probing call: a tensor, no collected features
    assert torch.is_tensor(out)
    term = DiversityTerm(6, official_pairs(6))
    assert term.student_blocks() == set(range(1, 7)) and term.project_block() is None


# -- the three terms on small fixed tensors --------------------------------------------------------

A = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])  # (N=1, T=2, D=2)
B = torch.tensor([[[0.0, 1.0], [1.0, 1.0]]])


def test_orthogonality_by_hand():
    # means: A -> (1, 0), B -> (0.5, 1); cosine = 0.5 / sqrt(1.25)
    assert float(orthogonality(A, B)) == pytest.approx(0.5 / math.sqrt(1.25), rel=1e-6)
    assert float(orthogonality(A, -A)) == pytest.approx(-1.0)  # signed, not absolute
    # pooled over batch and tokens together
    a2 = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    b2 = torch.tensor([[[1.0, 1.0]], [[1.0, 1.0]]])
    assert float(orthogonality(a2, b2)) == pytest.approx(1.0)


def test_mi_proxy_by_hand():
    # token 1: (1,0).(0,1) -> 0; token 2: (1,0).(1,1)/sqrt2 -> 1/sqrt2; mean then abs
    assert float(mi_proxy(A, B)) == pytest.approx(0.5 / math.sqrt(2), rel=1e-6)
    assert float(mi_proxy(A, -A)) == pytest.approx(1.0)  # absolute value of the mean
    c = torch.tensor([[[1.0, 0.0], [-1.0, 0.0]]])
    assert float(mi_proxy(A, c)) == pytest.approx(0.0, abs=1e-7)  # opposite tokens cancel before abs


def test_dispersion_by_hand():
    # Block B, columns over tokens: c0 = (0, 1) -> usage 1/2; c1 = (1, 1) -> usage 1/sqrt2.
    u = torch.tensor([0.5, 1 / math.sqrt(2)])
    u = u / u.max()
    var = ((u - u.mean()) ** 2).mean()
    assert float(dispersion([B])) == pytest.approx(-float(var) / 0.25, rel=1e-5)
    assert float(dispersion(B)) == float(dispersion([B]))
    # Two blocks: usages averaged before the max-normalisation. A: c0 = (1,1) -> 1/sqrt2, c1 = (0,0) -> 0.
    ua = torch.tensor([1 / math.sqrt(2), 0.0])
    ub = torch.tensor([0.5, 1 / math.sqrt(2)])
    m = (ua + ub) / 2
    m = m / m.max()
    var2 = ((m - m.mean()) ** 2).mean()
    assert float(dispersion([A, B])) == pytest.approx(-float(var2) / 0.25, rel=1e-5)
    # A fully one-sided usage reaches the bound -1 (variance 0.25 of a {0, 1} pair)
    assert float(dispersion([A])) == pytest.approx(-1.0, rel=1e-6)
    assert float(dispersion([torch.ones(2, 3, 4)])) == pytest.approx(0.0, abs=1e-7)


def test_diversity_loss_is_the_mean_and_differentiable():
    g = torch.Generator().manual_seed(0)
    feats = {k: torch.randn(2, 5, 4, generator=g, requires_grad=True) for k in (1, 2, 3)}
    pairs = [(1, 2), (1, 3)]
    out = diversity_loss(feats, pairs)
    orth = (orthogonality(feats[1], feats[2]) + orthogonality(feats[1], feats[3])) / 2
    mi = (mi_proxy(feats[1], feats[2]) + mi_proxy(feats[1], feats[3])) / 2
    disp = dispersion([feats[1], feats[2], feats[3]])
    for got, want in ((out.orthogonality, orth), (out.mi_proxy, mi), (out.dispersion, disp),
                      (out.loss, (orth + mi + disp) / 3)):
        torch.testing.assert_close(got, want)
    out.loss.backward()
    assert all(f.grad is not None and torch.isfinite(f.grad).all() for f in feats.values())
    with pytest.raises(ValueError, match="no features for block"):
        diversity_loss(feats, [(1, 7)])
    with pytest.raises(ValueError, match=r"\(N, T, D\)"):
        orthogonality(torch.zeros(2, 3), torch.zeros(2, 3))


# -- pair set and weight -------------------------------------------------------------------------


def test_official_pairs():
    # encoder depth 8: 0-based (1, 2..11) = 1-based (2, 3..12), for XL / L / B depths
    for depth in (28, 24, 12):
        assert official_pairs(depth) == [(2, j) for j in range(3, 13)]
    # encoder depth 4 on 12 blocks: 0-based (5, 6..11) and (6, 7..10)
    assert official_pairs(12, 4) == [(6, j) for j in range(7, 13)] + [(7, j) for j in range(8, 12)]
    # tiny depth 6: start 1 -> (1, 2..5), (2, 3..5), (3, 4..5), (4, 5) in 0-based
    assert official_pairs(6) == [(2, 3), (2, 4), (2, 5), (2, 6), (3, 4), (3, 5), (3, 6), (4, 5), (4, 6), (5, 6)]
    # a negative official start (depth 4: m = 6, start -3) is clamped to 0: all 6 pairs, no self-pairs
    assert official_pairs(4) == [(1, 2), (1, 3), (1, 4), (2, 3), (2, 4), (3, 4)]
    for depth in (2, 4, 6, 8, 12, 28):
        p = official_pairs(depth)
        assert len(p) == min(10, depth * (depth - 1) // 2) and len(set(p)) == len(p)
        assert all(1 <= a < b <= depth for a, b in p)


def test_adaptive_weight_rule():
    assert float(adaptive_weight(0.6)) == 1.0
    assert float(adaptive_weight(0.3)) == pytest.approx(0.4)  # (0.3 - 0.1) / 0.5
    assert float(adaptive_weight(0.5)) == pytest.approx(0.8)
    assert float(adaptive_weight(0.1)) == 0.0 and float(adaptive_weight(-0.2)) == 0.0
    v = torch.tensor(0.3, requires_grad=True)
    assert adaptive_weight(v).requires_grad  # official: built from the live loss
    assert not adaptive_weight(v, detach=True).requires_grad


@pytest.mark.parametrize("value, official, detached", [(0.3, 1.0, 0.4), (0.45, 1.6, 0.7), (0.6, 1.0, 1.0),
                                                        (0.05, 0.0, 0.0)])
def test_adaptive_weight_gradient_multiplier(value, official, detached):
    """d(w(L) L)/dL: the official live weight gives (2L - 0.1) / 0.5 in the band, the detached one w."""
    for detach, want in ((False, official), (True, detached)):
        v = torch.tensor(value, requires_grad=True)
        (adaptive_weight(v, detach=detach) * v).backward()
        assert float(v.grad) == pytest.approx(want, rel=1e-5), (detach, value)


def _ctx(feats):
    return StepContext(model=None, ema=None, objective=None, x0=None, eps=None, t=None, x_t=None, y=None,
                       feats=Features(out=None, blocks=feats), step=0, epoch=0, autocast=None, generator=None)


@pytest.mark.parametrize("detach", [False, True])
def test_term_weight_gradient_and_logs_terms(detach):
    g = torch.Generator().manual_seed(1)
    # Aligned features (high MI) so L_div lands in the adaptive band.
    base = torch.randn(2, 4, 8, generator=g)
    feats = {k: (base + 0.8 * torch.randn(2, 4, 8, generator=g)).requires_grad_() for k in range(1, 5)}
    term = DiversityTerm(4, [(1, 2), (3, 4)], detach_weight=detach)
    loss, logs = term(_ctx(feats))
    value = float(logs["loss_div"])
    assert 0.1 < value < 0.5, value
    w = (value - 0.1) / 0.5
    assert float(logs["div_weight"]) == pytest.approx(w, rel=1e-5)
    assert set(logs) == {"loss_div", "div_orth", "div_mi", "div_disp", "div_weight"}
    assert float(logs["loss_div"]) == pytest.approx(
        (float(logs["div_orth"]) + float(logs["div_mi"]) + float(logs["div_disp"])) / 3, rel=1e-5)
    loss.backward()
    got = feats[1].grad.clone()
    for f in feats.values():
        f.grad = None
    diversity_loss(feats, [(1, 2), (3, 4)]).loss.backward()
    # detached: w * dL/dx; official: d(w L)/dx = (2 L - 0.1) / 0.5 * dL/dx
    mult = w if detach else (2 * value - 0.1) / 0.5
    torch.testing.assert_close(got, mult * feats[1].grad, rtol=1e-4, atol=1e-7)
    const = DiversityTerm(4, [(1, 2)], weight_mode="constant", weight=0.25)
    loss_c, logs_c = const(_ctx(feats))
    assert float(logs_c["div_weight"]) == 0.25
    assert float(loss_c.detach()) == pytest.approx(0.25 * float(logs_c["loss_div"]), rel=1e-6)


def _build(depth=6, **diverse):
    mc = model_config("SiT-T/4", depth=depth, long_skip=True)
    return build_loss_terms(TrainConfig(method="diverse", diverse=diverse), mc, make_objective("sit"))


def test_from_config_defaults_and_override():
    (term,) = _build()
    assert term.pairs == official_pairs(6) and term.weight_mode == "adaptive" and not term.detach_weight
    (term,) = _build(detach_weight=True)
    assert term.detach_weight
    (term,) = _build(pairs=[[1, 6], [2, 5]], weight_mode="constant", weight=0.01)
    assert term.pairs == [(1, 6), (2, 5)] and term.weight == 0.01
    (term,) = _build(depth=12, encoder_depth=4)
    assert term.pairs == official_pairs(12, 4)


@pytest.mark.parametrize("opts, match", [
    ({"pairs": [[0, 2]]}, r"out of range: blocks are 1..6"),
    ({"pairs": [[1, 7]]}, r"out of range"),
    ({"pairs": [[2, 2]]}, "itself"),
    ({"pairs": [[1, 2, 3]]}, r"\[a, b\]"),
    ({"pairs": []}, "empty"),
    ({"weight_mode": "fixed"}, "weight_mode"),
    ({"weight": -1.0}, "weight"),
    ({"low": 0.6}, "below"),
    ({"encoder_depth": -1}, "encoder_depth"),
    ({"pair": [[1, 2]]}, "unknown diverse option"),
    ({"detach_weight": "yes"}, "detach_weight"),
])
def test_bad_diverse_options(opts, match):
    with pytest.raises(ValueError, match=match):
        _build(**opts)
