"""Samplers for SiT (flow ODE / SDE) and DiT (DDPM ancestral), with classifier-free guidance.

Everything is written against a plain ``model_fn(x, t, y) -> prediction`` so that a toy with an
exact velocity or noise predictor can be plugged in (tests) and the network wrapper (time
convention, velocity sign, autocast) lives in one place (:func:`model_fn_from_module`).

Time conventions inside this module:

* flow samplers pass our float t (1 = pure noise) to ``model_fn``; the prediction is the velocity
  d x_t / dt in that convention;
* the DDPM sampler passes the *original* integer timestep (0..T-1, T-1 noisiest) even when the
  schedule is respaced, as the network was trained on those values.

Guidance intervals are given in normalised noise time (1 = pure noise): SiT t, DiT t / (T - 1).

Per-sample seeding (:class:`repdyn.core.noise.PerSampleNoise`, stream ``("sample",)``): sample ``i``
owns a generator seeded from ``(seed, "sample", i)``; its initial noise and every SDE / DDPM noise
draw come from it, in a fixed order, so a sample does not depend on the batch it was drawn in.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from repdyn.model.diffusion import GaussianDiffusion
from repdyn.model.flow import FlowPath, make_path, model_time, model_velocity_sign
from repdyn.core.noise import PerSampleNoise

__all__ = [
    "METHODS",
    "ModelFn",
    "validate_options",
    "infer_meta",
    "resolve_labels",
    "model_fn_from_module",
    "guided_model_fn",
    "flow_time_grid",
    "sde_time_grid",
    "respaced_timesteps",
    "euler_ode",
    "heun_ode",
    "euler_maruyama_sde",
    "ddpm_ancestral",
    "sample",
]

ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# method -> family that can run it
METHODS: dict[str, str] = {"ode-euler": "sit", "ode-heun": "sit", "sde": "sit", "ddpm": "dit"}
SDE_LAST_T = 0.04  # REPA/SRA: the stochastic part stops here, then one drift-only step to 0.


# ------------------------------------------------------------------------------------------------
# Options, meta, labels
# ------------------------------------------------------------------------------------------------


def validate_options(family: str, method: str, steps: int, cfg_scale: float,
                     guidance_interval: tuple[float, float], num_timesteps: int | None = None) -> None:
    """Raise a one-line ValueError for sampler options that cannot work with this checkpoint."""
    if method not in METHODS:
        raise ValueError(f"unknown sampling method {method!r}; use one of {sorted(METHODS)}")
    if METHODS[method] != family:
        ok = sorted(m for m, f in METHODS.items() if f == family)
        raise ValueError(f"method {method!r} needs a {METHODS[method].upper()} checkpoint but this one is "
                         f"family {family!r}; use one of {ok}")
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if method == "ddpm" and num_timesteps is not None and steps > num_timesteps:
        raise ValueError(f"steps={steps} exceeds the checkpoint's {num_timesteps} diffusion timesteps; "
                         f"use steps <= {num_timesteps}")
    if not np.isfinite(cfg_scale) or cfg_scale < 0:
        raise ValueError(f"cfg_scale must be a finite number >= 0 (1 = no guidance), got {cfg_scale!r}")
    low, high = guidance_interval
    if not (0.0 <= low <= high <= 1.0):
        raise ValueError(f"guidance interval ({low}, {high}) must satisfy 0 <= low <= high <= 1 "
                         "(normalised noise time, 1 = pure noise)")


def infer_meta(model: nn.Module) -> dict[str, Any]:
    """Checkpoint-style meta for a bare model (our conventions: SiT t=1 noise, DiT T=1000)."""
    c = model.config
    family = c.family
    return {
        "family": family,
        "time_convention": "flow-t1-noise" if family == "sit" else "ddpm-t999-noisiest",
        "learn_sigma": c.learn_sigma,
        "num_classes": c.num_classes,
        "null_class": c.num_classes,
        "in_channels": c.in_channels,
        "input_size": c.input_size,
        "path": "linear",
        "num_timesteps": 1000,
    }


def resolve_labels(labels: Any, n: int, num_classes: int, seed: int = 0) -> torch.Tensor:
    """Conditioning labels for ``n`` samples.

    ``None`` gives class-balanced labels (i mod K: low-variance class-conditional metrics),
    ``"random"`` seeded uniform labels, ``"null"`` the null class (unconditional), an int one class
    for all, a sequence one label per sample.
    """
    if labels is None:
        return torch.arange(n, dtype=torch.long) % num_classes
    if isinstance(labels, str):
        if labels == "random":
            rng = np.random.default_rng([int(seed), 7919])
            return torch.from_numpy(rng.integers(0, num_classes, size=n)).long()
        if labels == "null":
            return torch.full((n,), num_classes, dtype=torch.long)
        raise ValueError(f"labels must be None, 'random', 'null', an int or a sequence, got {labels!r}")
    if isinstance(labels, (int, np.integer)):
        out = torch.full((n,), int(labels), dtype=torch.long)
    else:
        out = torch.as_tensor(np.asarray(labels), dtype=torch.long).reshape(-1)
        if out.numel() != n:
            raise ValueError(f"got {out.numel()} labels for {n} samples; pass one label per sample")
    if out.numel() and (out.min() < 0 or out.max() > num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1} (or {num_classes} = null class)")
    return out


# ------------------------------------------------------------------------------------------------
# Model wrappers
# ------------------------------------------------------------------------------------------------


def _autocast(device: torch.device, enabled: bool):
    if enabled and device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def model_fn_from_module(model: nn.Module, meta: dict[str, Any], autocast: bool = True) -> ModelFn:
    """Wrap a network as ``model_fn(x, t, y)`` in this module's time conventions (fp32 output).

    Flow checkpoints trained in the foreign ``flow-t0-noise`` convention get ``1 - t`` and a
    negated velocity, so every sampler sees the t = 1-noise velocity.
    """
    family = meta["family"]
    conv = meta.get("time_convention") or ("flow-t1-noise" if family == "sit" else "ddpm-t999-noisiest")

    if family == "sit":
        sign = model_velocity_sign(conv)

        def fn(x, t, y):
            with _autocast(x.device, autocast):
                out = model(x, model_time(t, conv), y)
            return sign * out.float()
    else:
        def fn(x, t, y):
            with _autocast(x.device, autocast):
                out = model(x, t, y)
            return out.float()
    return fn


def guided_model_fn(model_fn: ModelFn, cfg_scale: float, null_class: int,
                    guidance_interval: tuple[float, float] = (0.0, 1.0),
                    normalised_time: Callable[[torch.Tensor], torch.Tensor] = lambda t: t.float(),
                    guide_channels: int | None = None) -> ModelFn:
    """Classifier-free guidance ``uncond + s (cond - uncond)`` inside the interval, else cond.

    ``guide_channels``: how many leading output channels are guided; ``None`` = all prediction
    channels (x's channels; a learned-variance tail is taken from the conditional pass, as DiT).
    ``3`` reproduces the DiT/SiT repos' legacy behaviour. A scale of exactly 1 is the
    conditional model (no extra pass). The returned function takes an optional ``guide_t``: the time
    whose position in the interval decides guidance (default: ``t`` itself).
    """
    if cfg_scale == 1.0:
        return model_fn
    low, high = guidance_interval

    def fn(x, t, y, guide_t=None):
        tn = normalised_time(t if guide_t is None else guide_t)
        active = (tn >= low - 1e-9) & (tn <= high + 1e-9)
        if not bool(active.any()):
            return model_fn(x, t, y)
        n, c = x.shape[0], x.shape[1]
        k = c if guide_channels is None else min(guide_channels, c)
        out = model_fn(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null_class)]))
        cond, uncond = out[:n], out[n:]
        guided = uncond[:, :k] + cfg_scale * (cond[:, :k] - uncond[:, :k])
        mask = active.reshape(-1, *([1] * (x.ndim - 1)))
        head = torch.where(mask, guided, cond[:, :k])
        return torch.cat([head, cond[:, k:]], dim=1)

    fn.takes_guide_t = True  # Heun's corrector decides guidance at the current t (official samplers)
    return fn


# ------------------------------------------------------------------------------------------------
# Time grids
# ------------------------------------------------------------------------------------------------


def flow_time_grid(steps: int) -> torch.Tensor:
    """ODE grid 1 -> 0 in ``steps`` equal steps (float64)."""
    return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)


def sde_time_grid(steps: int, t_last: float = SDE_LAST_T) -> torch.Tensor:
    """REPA/SRA SDE grid: ``linspace(1, t_last, steps)`` then 0 (last step drift only)."""
    return torch.cat([torch.linspace(1.0, t_last, steps, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])


def respaced_timesteps(num_timesteps: int, steps: int) -> np.ndarray:
    """Evenly spaced original timesteps, always including 0 and T-1 (one step: T-1 only)."""
    if steps == 1:
        return np.array([num_timesteps - 1])
    return np.unique(np.round(np.linspace(0, num_timesteps - 1, steps)).astype(np.int64))


# ------------------------------------------------------------------------------------------------
# Flow samplers (t = 1 noise -> t = 0 data)
# ------------------------------------------------------------------------------------------------


def _tvec(t: float, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), float(t), device=x.device, dtype=torch.float32)


@torch.no_grad()
def euler_ode(model_fn: ModelFn, x: torch.Tensor, y: torch.Tensor, steps: int) -> torch.Tensor:
    """Euler on the probability-flow ODE dx/dt = v(x, t) from t = 1 to 0 (``steps`` NFE)."""
    grid = flow_time_grid(steps).tolist()
    x = x.float()
    for t_cur, t_next in zip(grid[:-1], grid[1:]):
        x = x + (t_next - t_cur) * model_fn(x, _tvec(t_cur, x), y)
    return x


@torch.no_grad()
def heun_ode(model_fn: ModelFn, x: torch.Tensor, y: torch.Tensor, steps: int) -> torch.Tensor:
    """Heun (trapezoidal corrector); the last step is plain Euler as REPA/SRA (2 steps - 1 NFE).

    As in the official REPA/SRA sampler, whether the corrector evaluation at ``t_next`` is guided is
    decided by the *current* ``t_cur`` (so a step that starts inside the guidance interval is guided
    in both of its evaluations)."""
    grid = flow_time_grid(steps).tolist()
    x = x.float()
    by_current = getattr(model_fn, "takes_guide_t", False)
    for i, (t_cur, t_next) in enumerate(zip(grid[:-1], grid[1:])):
        dt = t_next - t_cur
        v = model_fn(x, _tvec(t_cur, x), y)
        x_pred = x + dt * v
        if i < steps - 1:
            kw = {"guide_t": _tvec(t_cur, x)} if by_current else {}
            v_next = model_fn(x_pred, _tvec(t_next, x), y, **kw)
            x = x + dt * 0.5 * (v + v_next)
        else:
            x = x_pred
    return x


def _score_from_velocity(path: FlowPath, x: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """grad log p_t(x) = -E[eps | x_t] / sigma(t), with E[eps | x_t] solved from (x_t, v)."""
    _, eps = path.x0_eps_from_velocity(x, v, t)
    _, sigma = path.alpha_sigma(t.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype))
    return -eps / sigma


@torch.no_grad()
def euler_maruyama_sde(model_fn: ModelFn, x: torch.Tensor, y: torch.Tensor, steps: int,
                       noise: PerSampleNoise | None, path: FlowPath | None = None,
                       t_last: float = SDE_LAST_T) -> torch.Tensor:
    """Reverse SDE dx = [v - w/2 score] dt + sqrt(w) dW with w(t) = 2t, Euler-Maruyama on the
    REPA/SRA grid (``steps`` NFE); the final step t_last -> 0 applies the drift only."""
    path = path or make_path("linear")
    grid = sde_time_grid(steps, t_last).tolist()
    x = x.float()
    for i, (t_cur, t_next) in enumerate(zip(grid[:-1], grid[1:])):
        dt = t_next - t_cur
        t = _tvec(t_cur, x)
        v = model_fn(x, t, y)
        w = 2.0 * t_cur
        drift = v - 0.5 * w * _score_from_velocity(path, x, v, t)
        x = x + dt * drift
        if i < len(grid) - 2:
            z = noise.draw() if noise is not None else torch.randn_like(x)
            x = x + (w * abs(dt)) ** 0.5 * z
    return x


# ------------------------------------------------------------------------------------------------
# DDPM ancestral sampling (DiT)
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def ddpm_ancestral(model_fn: ModelFn, x: torch.Tensor, y: torch.Tensor, diffusion: GaussianDiffusion,
                   noise: PerSampleNoise | None, clip_denoised: bool = False) -> torch.Tensor:
    """Ancestral sampling over a (respaced) process; ``model_fn`` sees original timesteps.

    The model output is eps (C channels) or eps + variance values (2C, learned sigma), as
    :meth:`GaussianDiffusion.p_mean_variance` expects; no noise is added at the last step.
    """
    x = x.float()
    tmap = torch.as_tensor(diffusion.timestep_map, dtype=torch.long)
    for i in reversed(range(diffusion.num_timesteps)):
        idx = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
        t_orig = torch.full_like(idx, int(tmap[i]))
        out = model_fn(x, t_orig, y)
        if i > 0:
            mean, log_var, _, _ = diffusion.p_mean_variance(out, x, idx, clip_denoised=clip_denoised)
            z = noise.draw() if noise is not None else torch.randn_like(x)
            x = mean + torch.exp(0.5 * log_var) * z
        else:  # last step: the posterior mean, no variance needed
            eps, _ = diffusion.split_output(out, x.shape[1])
            x0 = diffusion.predict_x0_from_eps(x, idx, eps)
            x = diffusion.q_posterior(x0.clamp(-1, 1) if clip_denoised else x0, x, idx)[0]
    return x


# ------------------------------------------------------------------------------------------------
# Top level
# ------------------------------------------------------------------------------------------------


def _unpack(ck_or_model: Any, meta: dict | None) -> tuple[nn.Module, dict]:
    if isinstance(ck_or_model, nn.Module):
        model = ck_or_model
        base = infer_meta(model) if hasattr(model, "config") else {}
    elif hasattr(ck_or_model, "model"):
        model = ck_or_model.model
        base = dict(getattr(ck_or_model, "meta", None) or {})
    else:
        raise ValueError("sample() needs a Checkpoint (from load_checkpoint) or an nn.Module")
    merged = {**base, **(meta or {})}
    if "family" not in merged:
        raise ValueError("cannot tell the model family: pass meta={'family': 'dit'|'sit', ...}")
    return model, merged


def _one_batch(fn: ModelFn, method: str, steps: int, noise: PerSampleNoise, y: torch.Tensor,
               path: FlowPath | None, diffusion: GaussianDiffusion | None, clip_denoised: bool) -> torch.Tensor:
    x = noise.draw()
    if method == "ode-euler":
        return euler_ode(fn, x, y, steps)
    if method == "ode-heun":
        return heun_ode(fn, x, y, steps)
    if method == "sde":
        return euler_maruyama_sde(fn, x, y, steps, noise, path)
    return ddpm_ancestral(fn, x, y, diffusion, noise, clip_denoised)


@torch.no_grad()
def sample(ck_or_model: Any, meta: dict | None = None, n: int = 16, labels: Any = None,
           method: str = "ode-euler", steps: int = 50, cfg_scale: float = 1.0,
           guidance_interval: tuple[float, float] = (0.0, 1.0), legacy_cfg_channels: bool = False,
           seed: int = 0, batch_size: int = 64, device: str | torch.device = "cpu",
           autocast: bool = True, clip_denoised: bool = False, progress: bool = False,
           indices: Sequence[int] | None = None) -> torch.Tensor:
    """Draw ``n`` samples; returns a CPU float32 tensor (n, C, H, W) in model space.

    ``indices``: draw only these of the ``n`` samples (a shard under torchrun); sample i is the same
    whatever the shard, batch size or device (its noise and label depend on (seed, i) only).

    ``ck_or_model``: a Checkpoint (``.model``, ``.meta``) or a bare model (meta inferred from its
    config; ``meta`` entries override). ``labels``: see :func:`resolve_labels`. ``method``:
    ``ode-euler`` | ``ode-heun`` | ``sde`` (SiT) or ``ddpm`` (DiT, ``steps`` respaced steps).
    """
    model, meta = _unpack(ck_or_model, meta)
    family = meta["family"]
    num_timesteps = int(meta.get("num_timesteps") or 1000)
    validate_options(family, method, steps, cfg_scale, tuple(guidance_interval), num_timesteps)
    if n < 1 or batch_size < 1:
        raise ValueError(f"n and batch_size must be >= 1, got n={n}, batch_size={batch_size}")
    if int(seed) < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    num_classes = int(meta.get("num_classes") or model.y_embedder.num_classes)
    null_class = int(meta.get("null_class", num_classes))
    y_all = resolve_labels(labels, n, num_classes, seed)
    device = torch.device(device)
    model.eval().to(device)

    side = int(meta.get("input_size") or model.config.input_size)
    shape = (int(meta.get("in_channels") or model.in_channels), side, side)
    path = diffusion = None
    if family == "sit":
        path = make_path(meta.get("path") or "linear")
        norm_t = lambda t: t.float()  # noqa: E731
    else:
        learn_sigma = bool(meta.get("learn_sigma", model.config.learn_sigma))
        base = GaussianDiffusion.linear(num_timesteps, learn_sigma=learn_sigma)
        diffusion = base.respaced(respaced_timesteps(num_timesteps, steps))
        norm_t = lambda t: t.float() / (num_timesteps - 1)  # noqa: E731
    fn = guided_model_fn(model_fn_from_module(model, meta, autocast), cfg_scale, null_class,
                         tuple(guidance_interval), norm_t, 3 if legacy_cfg_channels else None)

    rows = list(range(n)) if indices is None else [int(i) for i in indices]
    if rows and (min(rows) < 0 or max(rows) >= n):
        raise ValueError(f"sample indices must lie in 0..{n - 1}")
    out = []
    bar = _progress(len(rows), progress, f"sampling {method}")
    for start in range(0, len(rows), batch_size):
        idx = rows[start: start + batch_size]
        noise = PerSampleNoise(seed, idx, shape, device=device)
        y = y_all[idx].to(device)
        out.append(_one_batch(fn, method, steps, noise, y, path, diffusion, clip_denoised).float().cpu())
        bar.update(len(idx))
    bar.close()
    return torch.cat(out) if out else torch.empty((0, *shape))


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="img")
