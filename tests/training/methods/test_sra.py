"""SRA: teacher time, teacher = EMA without gradients, early exit, the loss by hand, options, errors."""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from pathlib import Path

import pytest
import torch

from repdyn.training.config import TrainConfig, resolve_config
from repdyn.training.methods import StepContext, build_loss_terms
from repdyn.training.methods.sra import SRATerm, default_blocks, official_weight, sra_distance
from repdyn.model.backbone import Features, build_model, model_config
from repdyn.model.objectives import make_objective

HAVE_FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists()


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: one intra-op thread is faster


def tiny(family: str = "sit", **kw):
    name = "SiT-T/8" if family == "sit" else "DiT-T/8"
    base = dict(input_size=16, in_channels=1, num_classes=10, depth=4, hidden_size=32, sra_head=True)
    base.update(kw)
    torch.manual_seed(0)
    model = build_model(name, **base)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    # Make the teacher differ from the student, as after training: the test must catch a mix-up.
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model, ema


def make_ctx(model, ema, family="sit", n=6, seed=1, autocast=contextlib.nullcontext, epoch=0, term=None):
    """A StepContext as the trainer builds it (labels already dropped, shared with the teacher)."""
    obj = make_objective(family, learn_sigma=model.config.learn_sigma)
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, 1, 16, 16, generator=g)
    eps = torch.randn(n, 1, 16, 16, generator=g)
    t = obj.sample_t(n, torch.device("cpu"), g)
    y = torch.tensor([3, 10, 1, 10, 7, 0][:n])  # 10 = null class: some labels were dropped
    x_t = obj.corrupt(x0, t, eps)
    feats = Features(out=None)
    if term is not None:
        feats = model.forward_features(x_t, t, y, drop_labels=False, blocks=sorted(term.student_blocks()),
                                       project_block=term.project_block())
    return StepContext(model=model, ema=ema, objective=obj, x0=x0, eps=eps, t=t, x_t=x_t, y=y, feats=feats,
                       step=0, epoch=epoch, autocast=autocast, generator=g), obj


# -- teacher time --------------------------------------------------------------------------------


def test_sit_teacher_time_never_noisier_and_hits_zero_where_it_should():
    obj = make_objective("sit")
    g = torch.Generator().manual_seed(0)
    t = torch.rand(20000, generator=g)
    tt = obj.less_noisy(t, 0.2, g)
    assert (tt <= t).all()
    assert (t - tt < 0.2).all()  # delta < t_max
    # Clamped to 0 only where delta can exceed t (t < t_max); never above t_max.
    assert (tt[t >= 0.2] > 0).all()
    low = t < 0.05
    assert (tt[low] == 0).float().mean() > 0.7  # P(delta > t) = 1 - t/0.2 >= 0.75 there
    assert (tt == 0).any() and tt.min() >= 0


def test_dit_teacher_time_integer_floor_one():
    obj = make_objective("dit")
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 1000, (20000,), generator=g)
    tt = obj.less_noisy(t, 0.2, g)
    assert tt.dtype == t.dtype
    pos = t >= 1
    assert (tt[pos] <= t[pos]).all()  # less or equally noisy, per sample
    assert (t[pos] - tt[pos] < 200).all()  # delta in 0..199
    assert (tt >= 1).all() and (tt <= 999).all()
    # The official floor is 1, not 0: a student at t=0 gets a teacher at t=1 (documented exception).
    assert (tt[t == 0] == 1).all()
    assert (tt[t < 20] == 1).float().mean() > 0.85
    assert (tt[t >= 200] > 1).all()


def test_term_teacher_time_is_per_sample_and_uses_ctx_generator():
    model, ema = tiny()
    term = SRATerm(2, 3, t_max=0.2)
    ctx, _ = make_ctx(model, ema, term=term)
    ctx.t = torch.tensor([0.01, 0.02, 0.5, 0.9, 0.15, 1.0])
    _, tt = term.teacher_features(ctx)
    assert (tt <= ctx.t).all() and len(set(tt.tolist())) > 3  # one delta per sample


# -- teacher: EMA, no gradient, early exit, same inputs -----------------------------------------


@pytest.mark.parametrize("family", ["sit", "dit"])
def test_no_gradient_reaches_the_ema(family):
    model, ema = tiny(family)
    term = SRATerm(1, 3)
    ctx, _ = make_ctx(model, ema, family, term=term)
    loss, _ = term(ctx)
    loss.backward()
    assert all(p.grad is None for p in ema.parameters())
    assert model.ap_head.linear1.weight.grad is not None  # the student side does learn
    target, _ = term.teacher_features(ctx)
    assert not target.requires_grad and target.grad_fn is None


@pytest.mark.parametrize("long_skip", [False, True])
def test_early_exit_teacher_equals_full_forward_block(long_skip):
    model, ema = tiny(long_skip=long_skip)
    term = SRATerm(1, 3)  # block 3 of 4 is in the fused (deep) half when long_skip is on
    ctx, obj = make_ctx(model, ema, term=term)
    state = ctx.generator.get_state()
    early, tt = term.teacher_features(ctx)
    # Full forward of the same EMA (final layer included), capturing block 3 with a hook.
    captured = {}
    h = ema.block_output_module(3).register_forward_hook(lambda m, i, o: captured.setdefault("x", o))
    with torch.no_grad():
        ema(obj.corrupt(ctx.x0, tt, ctx.eps), tt, ctx.y)
    h.remove()
    torch.testing.assert_close(early, captured["x"], rtol=0, atol=0)
    # And the time came from the shared generator (reproducible, checkpointed).
    ctx.generator.set_state(state)
    torch.testing.assert_close(obj.less_noisy(ctx.t, 0.2, ctx.generator), tt)


def test_teacher_runs_in_student_autocast():
    model, ema = tiny()
    calls = []

    @contextlib.contextmanager
    def spy():
        calls.append(torch.is_grad_enabled())
        yield

    term = SRATerm(1, 3)
    ctx, _ = make_ctx(model, ema, autocast=spy, term=term)
    term(ctx)
    assert calls == [False]  # once, inside no_grad


# -- the loss by hand -----------------------------------------------------------------------------


def _hand_smooth_l1(a, b, beta):
    d = (a - b).abs()
    return torch.where(d < beta, 0.5 * d * d / beta, d - 0.5 * beta).mean()


@pytest.mark.parametrize("distance", ["smooth-l1", "cosine", "cosine-channel"])
def test_sra_loss_equals_hand_computation(distance):
    model, ema = tiny()
    ks, kt = 1, 3
    term = SRATerm(ks, kt, t_max=0.2, weight=0.2, distance=distance, beta=0.05)
    ctx, _ = make_ctx(model, ema, term=term, seed=4)
    ctx.t = torch.tensor([0.05, 0.1, 0.3, 0.6, 0.95, 0.15])
    ctx.x_t = (1 - ctx.t.view(-1, 1, 1, 1)) * ctx.x0 + ctx.t.view(-1, 1, 1, 1) * ctx.eps
    ctx.feats = model.forward_features(ctx.x_t, ctx.t, ctx.y, drop_labels=False, project_block=ks)
    seed_state = ctx.generator.get_state()
    loss, logs = term(ctx)

    # By hand: the same generator draw gives delta; linear path x = (1 - t) x0 + t eps.
    g = torch.Generator()
    g.set_state(seed_state)
    delta = torch.rand(6, generator=g) * 0.2
    tt = (ctx.t - delta).clamp(0, 1)
    x_tt = (1 - tt.view(-1, 1, 1, 1)) * ctx.x0 + tt.view(-1, 1, 1, 1) * ctx.eps
    with torch.no_grad():
        tf = ema.forward_features(x_tt, tt, ctx.y, drop_labels=False, blocks=[kt]).blocks  # full teacher pass
        sf = model.forward_features(ctx.x_t, ctx.t, ctx.y, drop_labels=False, blocks=[ks]).blocks
    teacher = tf[kt]
    w1, b1 = model.ap_head.linear1.weight, model.ap_head.linear1.bias
    w2, b2 = model.ap_head.linear2.weight, model.ap_head.linear2.bias
    h = sf[ks] @ w1.T + b1
    head = (h * torch.sigmoid(h)) @ w2.T + b2  # Linear(D,2D) - SiLU - Linear(2D,D)
    if distance == "smooth-l1":
        dist = _hand_smooth_l1(head, teacher, 0.05)
    elif distance == "cosine":  # per token, over channels
        dist = (1 - (head * teacher).sum(-1) / (head.norm(dim=-1) * teacher.norm(dim=-1))).mean()
    else:  # per (sample, channel), over tokens
        dist = (1 - (head * teacher).sum(1) / (head.norm(dim=1) * teacher.norm(dim=1))).mean()
    torch.testing.assert_close(loss.detach(), 0.2 * dist, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logs["loss_align"], dist, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logs["norm_head"], head.norm(dim=-1).mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logs["norm_target"], teacher.norm(dim=-1).mean(), rtol=1e-5, atol=1e-6)
    assert float(logs["align_weight"]) == pytest.approx(0.2)


def test_distance_options_differ_on_the_axis():
    a = torch.randn(2, 5, 3)
    b = torch.randn(2, 5, 3)
    assert not torch.allclose(sra_distance(a, b, "cosine"), sra_distance(a, b, "cosine-channel"))
    assert float(sra_distance(a, a, "cosine")) == pytest.approx(0.0, abs=1e-6)
    assert float(sra_distance(a, a, "smooth-l1")) == 0.0
    with pytest.raises(ValueError, match="distance"):
        sra_distance(a, b, "l3")


def test_official_schedule_values():
    # SiT 256 px: 2 * 0.1 ** (1 + (epoch - 149) / 1000)
    for epoch in (0, 149):
        assert official_weight(epoch, 0.2) == 0.2
    for epoch, want in ((200, 0.178), (400, 0.112), (600, 0.071), (800, 0.045)):
        assert official_weight(epoch, 0.2) == pytest.approx(2 * 0.1 ** (1 + (epoch - 149) / 1000))
        assert official_weight(epoch, 0.2) == pytest.approx(want, abs=1e-3)
    assert official_weight(400, 0.04) == pytest.approx(0.4 * 0.1 ** (1 + 251 / 1000))  # DiT
    assert official_weight(200, 0.2, 99, 800) == pytest.approx(0.150, abs=1e-3)  # SiT 512 px


def test_schedule_follows_trainer_epoch_and_family_base():
    for fam, base in (("sit", 0.2), ("dit", 0.04)):
        name = "SiT-T/4" if fam == "sit" else "DiT-T/4"
        mc = model_config(name, sra_head=True)
        cfg = TrainConfig(model=name, method="sra", sra={"schedule": "official"}, ema_decay=0.999,
                          steps=5000)
        term = SRATerm.from_config(cfg, mc, make_objective(fam))
        assert term.current_weight(10) == pytest.approx(base)
        assert term.current_weight(400) == pytest.approx(base * 0.1 ** (251 / 1000))
    model, ema = tiny()
    term = SRATerm(1, 3, schedule="official", weight=0.2)
    ctx, _ = make_ctx(model, ema, term=term, epoch=400)
    _, logs = term(ctx)
    assert float(logs["align_weight"]) == pytest.approx(0.112, abs=1e-3)


# -- defaults and configuration errors ------------------------------------------------------------


def test_default_blocks():
    assert default_blocks(model_config("SiT-XL/2")) == (8, 20)
    assert default_blocks(model_config("DiT-XL/2")) == (8, 16)
    assert default_blocks(model_config("SiT-B/2")) == (3, 8)
    assert default_blocks(model_config("SiT-L/2")) == (6, 18)
    assert default_blocks(model_config("DiT-B/2")) == (3, 9)
    assert default_blocks(model_config("SiT-T/4")) == (2, 4)  # tiny, depth 6: teacher at 2/3 depth
    assert default_blocks(model_config("SiT-M/4")) == (2, 6)  # depth 8
    assert default_blocks(model_config("SiT-T/4", depth=4)) == (1, 3)
    assert default_blocks(model_config("SiT-T/4", depth=2)) == (1, 2)


def _build(family="sit", depth=6, **cfg_kw):
    mc = model_config("SiT-T/4" if family == "sit" else "DiT-T/4", depth=depth, sra_head=True)
    base = dict(method="sra", ema_decay=0.999, steps=5000)
    base.update(cfg_kw)
    return build_loss_terms(TrainConfig(**base), mc, make_objective(family))


def test_from_config_defaults():
    (term,) = _build()
    assert (term.student_block, term.teacher_block, term.t_max, term.weight, term.distance, term.beta) == \
        (2, 4, 0.2, 0.2, "smooth-l1", 0.05)
    assert term.project_block() == 2 and term.student_blocks() == set()


@pytest.mark.parametrize("family, weight", [("sit", 0.2), ("dit", 0.04)])
@pytest.mark.parametrize("schedule", ["constant", "official"])
def test_default_weight_is_the_official_base_of_the_family(family, weight, schedule):
    """Official SRA training: lambda base 0.2 for SiT, 0.04 for DiT, whatever the schedule."""
    from repdyn.training.methods import SRAOptions

    mc = model_config("SiT-T/8" if family == "sit" else "DiT-T/8", sra_head=True)
    assert SRAOptions.from_dict({"schedule": schedule}, mc).weight == weight
    assert SRAOptions.from_dict({"weight": 0.5}, mc).weight == 0.5


@pytest.mark.parametrize("sra, match", [
    ({"student_block": 0}, "student_block=0 is out of range"),
    ({"teacher_block": 7}, "teacher_block=7 is out of range"),
    ({"student_block": -1}, "out of range"),
    ({"teacher_block": 2.5}, "integer"),
    ({"t_max": 0}, r"t_max must be in \(0, 1\]"),
    ({"t_max": 1.5}, r"t_max must be in \(0, 1\]"),
    ({"t_max": -0.1}, r"t_max"),
    ({"distance": "l3"}, "distance"),
    ({"schedule": "cosine"}, "schedule"),
    ({"weight": -1}, "weight"),
    ({"student": 2}, "unknown sra option"),
    ({"student_block": 4, "teacher_block": 4}, "must be shallower than sra.teacher_block"),
    ({"student_block": 5, "teacher_block": 3}, "must be shallower than sra.teacher_block"),
])
def test_bad_sra_options_fail_at_config_time(sra, match):
    with pytest.raises(ValueError, match=match):
        _build(sra=sra)


def test_sra_without_ema_is_an_error():
    with pytest.raises(ValueError, match="ema_decay"):
        _build(ema_decay=0.0)


def test_slow_ema_warns_and_tiny_preset_does_not():
    with pytest.warns(UserWarning, match="keeps .* of its random initialisation"):
        _build(ema_decay=0.9999, steps=1500)
    cfg = resolve_config("sit-tiny", overrides={"method": "sra"})
    mc = model_config(cfg.model, sra_head=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_loss_terms(cfg, mc, make_objective("sit"))
    assert cfg.ema_decay == 0.999


@pytest.mark.skipif(not HAVE_FMNIST, reason="Fashion-MNIST not installed (make data)")
def test_trainer_rejects_bad_sra_before_training(tmp_path):
    from repdyn.training.trainer import Trainer

    cfg = TrainConfig(model="SiT-T/8", method="sra", sra={"teacher_block": 9}, ema_decay=0.999, steps=5,
                      out=str(tmp_path / "run"), device="cpu")
    with pytest.raises(ValueError, match="teacher_block=9 is out of range: this model has blocks 1..6"):
        Trainer(cfg, quiet=True)
    assert not (tmp_path / "run" / "metrics.csv").exists()


@pytest.mark.skipif(not HAVE_FMNIST, reason="Fashion-MNIST not installed (make data)")
def test_tiny_ema_teacher_moves(tmp_path):
    """With the tiny presets' 0.999 the teacher leaves its initialisation; 0.9999 barely does."""
    from repdyn.training.trainer import Trainer

    moved = {}
    for decay in (0.999, 0.9999):
        cfg = TrainConfig(model="SiT-T/8", method="sra", model_overrides={"depth": 2, "hidden_size": 32},
                          ema_decay=decay, steps=40, batch_size=8, lr=1e-3, out=str(tmp_path / str(decay)),
                          device="cpu", log_every=40)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tr = Trainer(cfg, quiet=True)
        init = copy.deepcopy(tr.ema.state_dict())
        tr.train()
        sd = tr.ema.state_dict()
        num = sum((sd[k] - init[k]).float().norm() ** 2 for k in init) ** 0.5
        model_sd = tr.model.state_dict()
        den = sum((model_sd[k] - init[k]).float().norm() ** 2 for k in init) ** 0.5
        moved[decay] = float(num / den)  # fraction of the student's move the teacher followed
        assert all(p.grad is None for p in tr.ema.parameters())
    # An EMA of a steadily moving model follows ~ 1 - decay^n of the path (less for a curved one).
    assert moved[0.999] > 0.005
    assert moved[0.9999] < 0.25 * moved[0.999]
    assert math.isfinite(moved[0.999])
