"""Samplers on a 2-D Gaussian-mixture toy with exact velocity / noise predictors, plus the
top-level ``sample()`` on tiny networks (CFG, seeding, bad input)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from repdyn.model import samplers as S
from repdyn.core.noise import PerSampleNoise
from repdyn.model.diffusion import GaussianDiffusion
from repdyn.model.flow import make_path
from repdyn.model.backbone import build_model

# ------------------------------------------------------------------------------------------------
# Toy: isotropic Gaussian mixture in 2-D; E[x0 | x_t] and E[eps | x_t] are exact.
# ------------------------------------------------------------------------------------------------

MEANS = torch.tensor([[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]], dtype=torch.float64)
STDS = torch.tensor([0.5, 0.4, 0.6], dtype=torch.float64)
WEIGHTS = torch.tensor([0.3, 0.3, 0.4], dtype=torch.float64)


def posterior(x: torch.Tensor, a: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """E[x0 | x], E[eps | x] for x = a x0 + s eps (a, s per sample, shape (N, 1))."""
    x = x.double()
    a, s = a.double(), s.double()
    var = a**2 * STDS[None] ** 2 + s**2  # (N, K)
    diff = x[:, None, :] - a[:, :, None] * MEANS[None]  # (N, K, 2)
    logp = torch.log(WEIGHTS)[None] - (diff**2).sum(-1) / (2 * var) - torch.log(var)  # D = 2
    r = torch.softmax(logp, dim=1)[..., None]
    ex0 = MEANS[None] + (a[:, :, None] * STDS[None, :, None] ** 2 / var[..., None]) * diff
    eps = (s[:, :, None] / var[..., None]) * diff
    return (r * ex0).sum(1), (r * eps).sum(1)


def exact_velocity(x, t, y):
    t = t.double().reshape(-1, 1)
    ex0, eps = posterior(x, 1 - t, t)
    return (eps - ex0).float()


def make_exact_eps(diffusion: GaussianDiffusion):
    abar = torch.from_numpy(diffusion.alphas_cumprod)

    def fn(x, t, y):  # t: original timestep
        ab = abar[t.long()].reshape(-1, 1)
        return posterior(x, ab.sqrt(), (1 - ab).sqrt())[1].float()

    return fn


def target_moments():
    mean = (WEIGHTS[:, None] * MEANS).sum(0)
    second = sum(w * (s**2 * torch.eye(2, dtype=torch.float64) + torch.outer(m, m))
                 for w, m, s in zip(WEIGHTS, MEANS, STDS))
    return mean, second - torch.outer(mean, mean)


def check_target(x: torch.Tensor, tol: float = 0.12):
    x = x.double()
    assert torch.isfinite(x).all()
    mean, cov = target_moments()
    assert torch.allclose(x.mean(0), mean, atol=tol), (x.mean(0), mean)
    assert torch.allclose(torch.cov(x.T), cov, atol=2 * tol), (torch.cov(x.T), cov)
    frac = torch.bincount(torch.cdist(x, MEANS).argmin(1), minlength=3).double() / len(x)
    assert torch.allclose(frac, WEIGHTS, atol=0.04), frac
    # per-component spread (not collapsed to the means, not over-dispersed)
    comp = torch.cdist(x, MEANS).argmin(1)
    for k in range(3):
        sd = x[comp == k].std(0).mean()
        assert abs(sd - STDS[k]) < 0.12, (k, sd)


N = 2500


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # tiny tensors: threading overhead dominates on the shared 2-core CI box
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def x1():
    return torch.randn(N, 2, generator=torch.Generator().manual_seed(0))


Y = torch.zeros(N, dtype=torch.long)


def test_exact_posterior_matches_monte_carlo():
    # guard the toy itself: E[eps | x_t] by regression on samples agrees with the formula
    g = torch.Generator().manual_seed(1)
    comp = torch.multinomial(WEIGHTS, 20000, replacement=True, generator=g)
    x0 = MEANS[comp] + STDS[comp, None] * torch.randn(20000, 2, generator=g, dtype=torch.float64)
    eps = torch.randn(20000, 2, generator=g, dtype=torch.float64)
    t = torch.full((20000, 1), 0.5, dtype=torch.float64)
    xt = (1 - t) * x0 + t * eps
    _, e_hat = posterior(xt, 1 - t, t)
    # residual is orthogonal to functions of x_t -> mean residual ~ 0 and explains variance
    assert (eps - e_hat).mean(0).abs().max() < 0.03
    assert ((eps - e_hat) ** 2).mean() < (eps**2).mean()


def test_ode_reaches_target(x1):
    check_target(S.heun_ode(exact_velocity, x1, Y, 40))
    check_target(S.euler_ode(exact_velocity, x1, Y, 100))


def test_heun_beats_euler_at_same_steps(x1):
    xs = x1[:300]
    ref = S.heun_ode(exact_velocity, xs, Y[:300], 200).double()
    for steps in (8, 16):
        err_e = (S.euler_ode(exact_velocity, xs, Y[:300], steps).double() - ref).norm(dim=1).mean()
        err_h = (S.heun_ode(exact_velocity, xs, Y[:300], steps).double() - ref).norm(dim=1).mean()
        assert err_h < 0.5 * err_e, (steps, err_h, err_e)


def test_sde_matches_ode_in_distribution(x1):
    noise = PerSampleNoise(3, range(N), (2,))
    x_sde = S.euler_maruyama_sde(exact_velocity, x1, Y, 120, noise, make_path("linear"))
    check_target(x_sde)
    x_ode = S.heun_ode(exact_velocity, x1, Y, 40).double()
    assert (x_sde.double().mean(0) - x_ode.mean(0)).abs().max() < 0.15
    # stochastic: not the deterministic ODE map of the same start points
    assert (x_sde.double() - x_ode).norm(dim=1).mean() > 0.1


def test_sde_grid_is_repa_grid():
    g = S.sde_time_grid(5)
    assert torch.allclose(g, torch.tensor([1.0, 0.76, 0.52, 0.28, 0.04, 0.0], dtype=torch.float64))
    assert torch.allclose(S.flow_time_grid(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64))


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_ddpm_with_perfect_eps_recovers_data(x1, learn_sigma):
    base = GaussianDiffusion.linear(1000, learn_sigma=learn_sigma)
    diff = base.respaced(S.respaced_timesteps(1000, 100))
    assert diff.timestep_map[0] == 0 and diff.timestep_map[-1] == 999
    eps_fn = make_exact_eps(base)
    # learned sigma: var value -1 = posterior variance (the exact reverse variance for small steps)
    fn = eps_fn if not learn_sigma else (lambda x, t, y: torch.cat([eps_fn(x, t, y), -torch.ones_like(x)], 1))
    noise = PerSampleNoise(5, range(N), (2,))
    check_target(S.ddpm_ancestral(fn, noise.draw(), Y, diff, noise))


def test_ddpm_one_step_is_x0_prediction():
    # point-mass data: one respaced step from t = T-1 returns x0 exactly
    base = GaussianDiffusion.linear(1000, learn_sigma=False)
    diff = base.respaced(S.respaced_timesteps(1000, 1))
    x0 = torch.tensor([[0.3, -0.7]])
    ab = float(base.alphas_cumprod[999])
    xt = torch.tensor([[1.2, 0.4]])
    fn = lambda x, t, y: (x - ab**0.5 * x0) / (1 - ab) ** 0.5  # noqa: E731
    out = S.ddpm_ancestral(fn, xt, torch.zeros(1, dtype=torch.long), diff, None)
    assert torch.allclose(out, x0, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# Guidance
# ------------------------------------------------------------------------------------------------


def _lin_model(c_out: int):
    """Prediction that depends on the label: out[:, j] = x[:, j % C] * (1 + y) + j."""

    def fn(x, t, y):
        c = x.shape[1]
        cols = [x[:, j % c] * (1 + y.float().reshape(-1, *([1] * (x.ndim - 2)))) + j for j in range(c_out)]
        return torch.stack(cols, 1)

    return fn


def test_guidance_formula_interval_and_legacy_channels():
    x = torch.randn(3, 4, 2, 2)
    y = torch.tensor([0, 1, 2])
    null = 5
    fn = _lin_model(8)  # 4 prediction channels + 4 variance channels (learned sigma)
    cond, uncond = fn(x, None, y), fn(x, None, torch.full_like(y, null))
    s = 2.5
    t_in, t_out = torch.full((3,), 0.5), torch.full((3,), 0.9)
    g = S.guided_model_fn(fn, s, null, (0.0, 0.7))
    out = g(x, t_in, y)
    assert torch.allclose(out[:, :4], uncond[:, :4] + s * (cond[:, :4] - uncond[:, :4]))
    assert torch.allclose(out[:, 4:], cond[:, 4:])  # variance from the conditional pass
    assert torch.allclose(g(x, t_out, y), cond)  # outside the interval: conditional model
    legacy = S.guided_model_fn(fn, s, null, (0.0, 0.7), guide_channels=3)(x, t_in, y)
    assert torch.allclose(legacy[:, :3], out[:, :3]) and torch.allclose(legacy[:, 3:], cond[:, 3:])
    # DiT time is normalised by T - 1: t = 999 is 1.0, outside (0, 0.7)
    gd = S.guided_model_fn(fn, s, null, (0.0, 0.7), normalised_time=lambda t: t.float() / 999)
    assert torch.allclose(gd(x, torch.full((3,), 999), y), cond)
    assert torch.allclose(gd(x, torch.full((3,), 500), y)[:, :4], out[:, :4])


def test_heun_corrector_guidance_follows_the_current_t():
    """Official REPA/SRA Heun: the corrector at t_next is guided when t_cur is inside the interval.

    Toy field: v = x + 1 for the class, v = x for the null label, so guidance (scale s) turns the
    +1 into +s. Three steps 1 -> 2/3 -> 1/3 -> 0, interval [0.5, 0.7]: step 1 starts outside
    (t_cur = 1), so its corrector at 2/3 is not guided although 2/3 is inside; step 2 starts inside
    (t_cur = 2/3), so its corrector at 1/3 is guided although 1/3 is outside."""
    null, s = 1, 3.0

    def field(x, t, y):
        return x + (y != null).float().reshape(-1, 1)

    g = S.guided_model_fn(field, s, null, (0.5, 0.7))
    x0, y = torch.zeros(2, 1), torch.zeros(2, dtype=torch.long)
    out = S.heun_ode(g, x0, y, 3)

    def ref(decide_by_next: bool) -> torch.Tensor:
        x, grid = x0.clone().double(), [1.0, 2 / 3, 1 / 3, 0.0]
        guided = lambda t: 0.5 - 1e-9 <= t <= 0.7 + 1e-9  # noqa: E731
        for i, (tc, tn) in enumerate(zip(grid[:-1], grid[1:])):
            dt = tn - tc
            v = x + (s if guided(tc) else 1.0)
            xp = x + dt * v
            if i < 2:
                x = x + dt * 0.5 * (v + xp + (s if guided(tn if decide_by_next else tc) else 1.0))
            else:
                x = xp
        return x

    torch.testing.assert_close(out.double(), ref(False), rtol=0, atol=1e-6)
    assert (ref(True) - ref(False)).abs().max() > 0.03  # the old rule (decide by t_next) differs


def _tiny(name: str, **kw) -> nn.Module:
    torch.manual_seed(0)
    m = build_model(name, input_size=8, in_channels=kw.pop("in_channels", 1), num_classes=3, **kw)
    with torch.no_grad():  # zero-initialised output layers would make every sample trivial
        for p in m.parameters():
            if p.requires_grad and p.abs().sum() == 0 and p.ndim > 1:
                p.normal_(0, 0.05)
        for blk in list(m.blocks) + [m.final_layer]:
            blk.adaLN_modulation[-1].bias.normal_(0, 0.05)
    return m.eval()


def test_cfg_scale_one_equals_conditional_model():
    m = _tiny("SiT-T/4")
    meta = S.infer_meta(m)
    out = S.sample(m, n=4, method="ode-euler", steps=3, cfg_scale=1.0, seed=1, labels=[0, 1, 2, 1])
    x = PerSampleNoise(1, range(4), (1, 8, 8)).draw()
    ref = S.euler_ode(S.model_fn_from_module(m, meta), x, torch.tensor([0, 1, 2, 1]), 3)
    assert torch.allclose(out, ref, atol=1e-6)
    guided = S.sample(m, n=4, method="ode-euler", steps=3, cfg_scale=3.0, seed=1, labels=[0, 1, 2, 1])
    assert (guided - out).abs().max() > 1e-4  # guidance changes something


@pytest.mark.parametrize("name,method", [("SiT-T/4", "sde"), ("SiT-T/4", "ode-heun"), ("DiT-T/4", "ddpm")])
def test_samples_do_not_depend_on_batch_size(name, method):
    m = _tiny(name)
    kw = dict(n=5, method=method, steps=4, cfg_scale=2.0, guidance_interval=(0.0, 0.7), seed=3)
    a = S.sample(m, batch_size=2, **kw)
    b = S.sample(m, batch_size=5, **kw)
    assert a.shape == (5, 1, 8, 8) and torch.isfinite(a).all()
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)  # same draws; only BLAS batch effects
    c = S.sample(m, batch_size=5, **{**kw, "seed": 4})
    assert (a - c).abs().max() > 1e-3


def test_dit_legacy_channels_differ_on_four_channels():
    m = _tiny("DiT-T/4", in_channels=4)
    kw = dict(n=2, method="ddpm", steps=3, cfg_scale=4.0, seed=0, labels=[1, 2])
    a = S.sample(m, legacy_cfg_channels=True, **kw)
    b = S.sample(m, legacy_cfg_channels=False, **kw)
    assert a.shape == (2, 4, 8, 8)
    assert (a - b).abs().max() > 1e-4


def test_foreign_flow_convention_is_converted():
    class Foreign(nn.Module):  # willisma/SiT: t = 0 noise, velocity x0 - eps
        def forward(self, x, t, y):
            return -exact_velocity(x, 1 - t, y)

    fn = S.model_fn_from_module(Foreign(), {"family": "sit", "time_convention": "flow-t0-noise"})
    x = torch.randn(6, 2)
    t = torch.full((6,), 0.3)
    assert torch.allclose(fn(x, t, None), exact_velocity(x, t, None), atol=1e-6)


def test_resolve_labels():
    assert S.resolve_labels(None, 5, 3).tolist() == [0, 1, 2, 0, 1]
    assert S.resolve_labels("null", 2, 3).tolist() == [3, 3]
    r = S.resolve_labels("random", 50, 3, seed=1)
    assert r.min() >= 0 and r.max() <= 2 and torch.equal(r[:10], S.resolve_labels("random", 10, 3, seed=1))
    with pytest.raises(ValueError):
        S.resolve_labels([0, 7], 2, 3)


@pytest.mark.parametrize("kw,msg", [
    (dict(method="ddpm"), "DIT checkpoint"),
    (dict(method="ode-euler", steps=0), "steps"),
    (dict(method="sde", guidance_interval=(0.0, 1.5)), "guidance interval"),
    (dict(method="sde", guidance_interval=(0.8, 0.2)), "guidance interval"),
    (dict(method="ode-heun", cfg_scale=-1.0), "cfg_scale"),
    (dict(method="euler"), "unknown sampling method"),
])
def test_bad_options_give_one_line_errors(kw, msg):
    m = _tiny("SiT-T/4")
    with pytest.raises(ValueError, match=msg) as e:
        S.sample(m, n=1, **kw)
    assert "\n" not in str(e.value)


def test_dit_rejects_flow_methods():
    m = _tiny("DiT-T/4")
    with pytest.raises(ValueError, match="SIT checkpoint"):
        S.sample(m, n=1, method="sde")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_autocast_close_to_cpu():
    m = _tiny("SiT-T/4")
    kw = dict(n=4, method="sde", steps=4, seed=0)
    cpu = S.sample(m, device="cpu", **kw)
    gpu = S.sample(m, device="cuda", **kw)
    assert torch.allclose(cpu, gpu, atol=0.05)
