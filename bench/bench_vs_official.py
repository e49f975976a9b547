"""Benchmark: our trainer and extraction against the official REPA / SRA code, side by side.

Not a test. The official code is an input: ``--official PATH`` names a checkout of
sihyun-yu/REPA (``models/sit.py``, ``loss.py``) and/or vvvvvjdy/SRA (``SiT-SRA/models/sit.py``,
``SiT-SRA/loss.py``, ``pca-vis/``); its files are imported at run time with ``importlib`` and
nothing of it lives in this repository. The official SiT needs ``timm`` (benchmark only, not a
project dependency).

Per (model, method):

1. **Same config, same weights.** Our ``Trainer`` builds the model; its weights are perturbed
   (adaLN-Zero would make every block an identity and the output zero) and loaded into the
   official SiT (same state-dict keys; REPA's ``projectors`` are the only extra keys, kept small
   with ``--projector-dim`` / ``--z-dim`` and their forward is part of the official step).
2. **Loss check first.** The official loss samples t, noise and the label drop from the global
   RNG. We seed it, run the official loss, re-seed and redraw in the official order (SRA:
   t, teacher delta on the CPU, noise and label drop on the data's device; REPA: t, noise, drop),
   recompute the official loss from the official model's outputs with those draws (proves the
   redraw), and run *our* model, objective and SRA term on the same tensors. Reported: max abs
   difference of the forward outputs (and SRA head / teacher features) and of the losses. The
   check runs in fp32; a timing of two different computations is no comparison.
3. **Timing.** One full optimiser step each: ours is ``Trainer.train_step`` (posterior sample,
   forward, loss, SRA teacher + head, backward, clip, AdamW, EMA); the official step is its
   ``loss_fn`` + backward + ``clip_grad_norm_`` + AdamW + the official per-parameter EMA loop
   (emulated: ``train.py`` imports accelerate/diffusers and cannot be imported alone), with the
   forward under autocast + fp32 outputs as ``accelerator.prepare`` makes it under mixed precision
   and the SRA teacher (the un-prepared EMA) in fp32, as in the official SRA ``train.py``.
   Steps are interleaved (ours, official, official, ours, ...), median of ``--steps`` each after
   ``--warmup``.

``--extraction``: our one-pass grid extraction (``extract_grid``: one forward per batch and t,
every block captured and pooled in hooks, stop after the deepest) against the strategy of the
official ``pca-vis/getfeature.py`` (``get_f``: one full forward of the official SiT per
(image, block, t), ``model(x_t, t, y, ad=block)[1]``), on the same images, noise and cells.

    .venv/bin/python bench/bench_vs_official.py --official /tmp/official/REPA --official /tmp/official/SRA \
        --method both --model SiT-T/4,SiT-S/2 --batch-size 16 --threads 2
    .venv/bin/python bench/bench_vs_official.py --official /tmp/official/SRA --extraction --model SiT-T/4
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import importlib.util
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_methods import _sync, parse_overrides  # noqa: E402
from bench_methods import machine as _methods_machine  # noqa: E402
from repdyn.probe.grid import extract_grid, grid_noise, load_x0
from repdyn.model.checkpoint import LoadedCheckpoint
from repdyn.training.config import TrainConfig
from repdyn.datasets.sources import SD_VAE_SCALE, make_dataset
from repdyn.training.methods.base import StepContext
from repdyn.training.methods.repa import DEFAULT_PROJ_COEFF, REPATerm, repa_loss
from repdyn.training.methods.sra import SRATerm, default_blocks
from repdyn.model.backbone import model_config
from repdyn.training.trainer import Trainer

TIMM_HINT = ("the official SiT imports timm (Attention, Mlp, PatchEmbed): install it into the venv for the "
             "benchmark only with `.venv/bin/pip install timm` (it is not a project dependency)")


class OfficialCodeError(ValueError):
    """A one-line user error about --official (missing files, missing timm)."""


# ----------------------------------------------------------------------------------------------
# The official code, imported from the user's checkout
# ----------------------------------------------------------------------------------------------


@dataclass
class Official:
    kind: str  # "repa" | "sra"
    root: Path
    sit: ModuleType
    loss: ModuleType


def _import_file(path: Path, tag: str) -> ModuleType:
    name = f"_official_{tag}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise OfficialCodeError(f"cannot import {path}")
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] == "timm":
            raise OfficialCodeError(TIMM_HINT) from None
        raise OfficialCodeError(f"importing {path} failed: {e}") from None
    return mod


def load_official(path: str | os.PathLike) -> Official:
    """A REPA checkout (``models/sit.py`` + ``loss.py``) or an SRA checkout (``SiT-SRA/...``)."""
    root = Path(path).expanduser().resolve()
    if (root / "SiT-SRA" / "models" / "sit.py").is_file():
        base = root / "SiT-SRA"
    elif (root / "models" / "sit.py").is_file():
        base = root
    else:
        raise OfficialCodeError(f"--official {root}: expected a REPA checkout (models/sit.py, loss.py) or an SRA "
                                "checkout (SiT-SRA/models/sit.py, SiT-SRA/loss.py)")
    if not (base / "loss.py").is_file():
        raise OfficialCodeError(f"--official {root}: {base / 'loss.py'} is missing")
    src = (base / "models" / "sit.py").read_text()
    kind = "sra" if "ap_head" in src else "repa"
    sit = _import_file(base / "models" / "sit.py", f"{kind}_sit")
    loss = _import_file(base / "loss.py", f"{kind}_loss")
    need = "SRALoss" if kind == "sra" else "SILoss"
    if not hasattr(sit, "SiT") or not hasattr(loss, need):
        raise OfficialCodeError(f"--official {root}: models/sit.py must define SiT and loss.py {need}")
    return Official(kind, root, sit, loss)


def build_official_model(off: Official, cfg, encoder_depth: int, projector_dim: int, z_dim: int) -> torch.nn.Module:
    """The official SiT with our config. Built through ``SiT(...)`` (not the registry) with
    ``decoder_hidden_size = hidden_size``: the official registry leaves it at 768 for SiT-S, whose
    final layer then cannot run on width 384, and has no T size."""
    kw = dict(path_type="linear", input_size=cfg.input_size, patch_size=cfg.patch_size, in_channels=cfg.in_channels,
              hidden_size=cfg.hidden_size, decoder_hidden_size=cfg.hidden_size, depth=cfg.depth,
              num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, class_dropout_prob=cfg.class_dropout_prob,
              num_classes=cfg.num_classes, use_cfg=True, qk_norm=False, fused_attn=True)
    if off.kind == "repa":
        kw.update(encoder_depth=encoder_depth, z_dims=[z_dim], projector_dim=projector_dim)
    return off.sit.SiT(**kw)


def load_same_weights(ours: torch.nn.Module, official: torch.nn.Module) -> list[str]:
    """Load our state dict into the official model; returns the official-only keys (projectors /
    an unused SRA head). Any other mismatch is an error."""
    missing, unexpected = official.load_state_dict(ours.state_dict(), strict=False)
    extra_ok = ("projectors.", "ap_head.")
    bad_missing = [k for k in missing if not k.startswith(extra_ok)]
    if unexpected or bad_missing:
        raise OfficialCodeError(f"state dicts differ: ours-only {unexpected[:5]}, official-only {bad_missing[:5]}")
    return list(missing)


class Prepared(torch.nn.Module):
    """What ``accelerator.prepare(model)`` does to the forward under mixed precision: autocast,
    then tensor outputs back to fp32. Identity for fp32."""

    def __init__(self, model: torch.nn.Module, amp_dtype: torch.dtype | None, device_type: str):
        super().__init__()
        self.model, self.amp_dtype, self.device_type = model, amp_dtype, device_type

    def forward(self, *args, **kwargs):
        if self.amp_dtype is None:
            return self.model(*args, **kwargs)
        with torch.autocast(self.device_type, dtype=self.amp_dtype):
            out = self.model(*args, **kwargs)

        def fp32(o):
            if torch.is_tensor(o) and o.is_floating_point():
                return o.float()
            if isinstance(o, (list, tuple)):
                return type(o)(fp32(v) for v in o)
            return o

        return fp32(out)


@torch.no_grad()
def official_ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """The official ``update_ema`` (emulated): a Python loop over ``named_parameters`` (pos_embed
    included), ``mul_(decay).add_(p, alpha=1 - decay)`` per tensor."""
    ema_params = dict(ema.named_parameters())
    for name, p in model.named_parameters():
        ema_params[name.replace("module.", "")].mul_(decay).add_(p.data, alpha=1 - decay)


def posterior(moments: torch.Tensor) -> torch.Tensor:
    """The official ``sample_posterior`` on SD-VAE moments (scale 0.18215, bias 0), global RNG."""
    mean, std = moments.chunk(2, dim=1)
    return (mean + std * torch.randn_like(mean)) * SD_VAE_SCALE


class OfficialStep:
    """One official training step: ``loss_fn`` + backward + clip + AdamW + EMA loop."""

    def __init__(self, off: Official, model: torch.nn.Module, method: str, *, blocks: tuple[int, int],
                 t_max: float, weight: float, amp_dtype, device: torch.device, lr: float, betas, weight_decay: float,
                 clip: float, ema_decay: float, z_dim: int, batch_size: int, num_tokens: int):
        self.off, self.model, self.method = off, model, method
        self.ema = copy.deepcopy(model).requires_grad_(False).eval()
        self.fwd = Prepared(model, amp_dtype, device.type)
        self.ks, self.kt = blocks
        self.weight, self.clip, self.ema_decay = weight, clip, ema_decay
        if method == "sra":
            self.loss_fn = off.loss.SRALoss(prediction="v", path_type="linear", weighting="uniform",
                                            block_out_s=self.ks, block_out_t=self.kt, t_max=t_max, loss_type="sml1")
        else:
            self.loss_fn = off.loss.SILoss(prediction="v", path_type="linear", weighting="uniform")
            g = torch.Generator().manual_seed(1)
            self.zs = [torch.randn(batch_size, num_tokens, z_dim, generator=g).to(device)]  # REPA encoder targets
        self.opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, weight_decay=weight_decay, eps=1e-8)

    def losses(self, x: torch.Tensor, y: torch.Tensor, fwd=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(denoising loss mean, SRA alignment / REPA projection loss mean or None), drawing t/noise/drop
        as the official code."""
        fwd = fwd or self.fwd
        if self.method == "sra":
            gen, align = self.loss_fn(fwd, x, self.ema, y)
            return gen.mean(), align.mean()
        gen, proj = self.loss_fn(fwd, x, dict(y=y), zs=self.zs)  # the baseline: projector and proj loss run, unused
        return gen.mean(), (proj.mean() if self.method == "repa" else None)

    def step(self, moments: torch.Tensor, y: torch.Tensor) -> float:
        with torch.no_grad():
            x = posterior(moments)
        gen, align = self.losses(x, y)
        loss = gen if align is None else gen + self.weight * align
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        official_ema_update(self.ema, self.model, self.ema_decay)
        return float(loss.detach())


# ----------------------------------------------------------------------------------------------
# Data and our side
# ----------------------------------------------------------------------------------------------


def make_latents(root: Path, n: int, channels: int = 4, size: int = 32, classes: int = 10, seed: int = 0) -> Path:
    """A REPA/SRA-layout latents folder (``vae-sd/*.npy`` moments + ``dataset.json``) with
    class-dependent means (so probes have a signal), about unit variance after the 0.18215 scale."""
    d = root / "vae-sd"
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    patterns = rng.normal(size=(classes, channels, size, size)).astype(np.float32)
    labels = []
    for i in range(n):
        y = i % classes
        mean = (0.7 * patterns[y] + 0.7 * rng.normal(size=patterns[y].shape)) / SD_VAE_SCALE
        std = np.full_like(mean, 0.05 / SD_VAE_SCALE)
        np.save(d / f"{i:06d}.npy", np.concatenate([mean, std]).astype(np.float32))
        labels.append([f"{i:06d}.npy", int(y)])
    (d / "dataset.json").write_text(json.dumps({"labels": labels}))
    return root


def perturb_(model: torch.nn.Module, seed: int = 0, scale: float = 0.02) -> None:
    """Non-trivial random weights (adaLN-Zero and the zero final layer would hide every block)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g).to(p.device, p.dtype))


class _FixedTeacherTime:
    """Our objective with ``less_noisy`` returning a given teacher time (the official draw)."""

    def __init__(self, objective, t_teacher: torch.Tensor):
        self._objective, self._t = objective, t_teacher

    def less_noisy(self, t, t_max, generator=None):
        return self._t

    def __getattr__(self, name):
        return getattr(self._objective, name)


def machine() -> dict:
    """bench_methods' machine record, with all three load averages and the GPU count."""
    info = _methods_machine()
    info.pop("load_avg_1m", None)
    with contextlib.suppress(OSError):
        info["load_avg"] = [round(v, 2) for v in os.getloadavg()]
    if torch.cuda.is_available():
        info["gpu_count"] = torch.cuda.device_count()
    return info


def load_avg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


# ----------------------------------------------------------------------------------------------
# Loss check
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _strict_fp32():
    """No TF32 matmuls while checking (the trainers enable it on CUDA; it would blur the check)."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def loss_check(trainer: Trainer, ostep: OfficialStep, moments: torch.Tensor, y: torch.Tensor, seed: int = 1234) -> dict:
    """Same batch, t, noise and label drop through both sides, fp32 (see the module docstring)."""
    with _strict_fp32():
        return _loss_check(trainer, ostep, moments, y, seed)


def _loss_check(trainer: Trainer, ostep: OfficialStep, moments: torch.Tensor, y: torch.Tensor, seed: int) -> dict:
    dev = moments.device
    model, ema, objective = trainer.model, trainer.ema, trainer.objective
    om, oema = ostep.model, ostep.ema
    sra, repa = ostep.method == "sra", ostep.method == "repa"
    with torch.no_grad():
        torch.manual_seed(seed + 1)
        x0 = posterior(moments)
        # (a) the official loss as it runs, with its own draws from the seeded global RNG
        torch.manual_seed(seed)
        off_gen, off_align = ostep.losses(x0, y, fwd=om)
        # (b) the same draws, redrawn in the official order
        torch.manual_seed(seed)
        n = x0.shape[0]
        t4 = torch.rand((n, 1, 1, 1))
        delta = torch.rand_like(t4) if sra else None
        t4 = t4.to(device=dev, dtype=x0.dtype)
        noise = torch.randn_like(x0)
        p = om.y_embedder.dropout_prob
        drop = (torch.rand(n, device=dev) < p) if p > 0 else torch.zeros(n, dtype=torch.bool, device=dev)
        y_used = torch.where(drop, torch.full_like(y, om.y_embedder.num_classes), y)
        t = t4.flatten()
        x_t = (1 - t4) * x0 + t4 * noise  # linear path: alpha = 1 - t, sigma = t (t = 1 noise)
        target = noise - x0
        # official model outputs on these tensors (its own label drop off: labels are already dropped)
        om.y_embedder.dropout_prob = 0.0
        try:
            if sra:
                o_out, o_head, _ = om(x_t, t, y_used, ad=ostep.ks)
            else:
                o_out, o_zs = om(x_t, t, y_used)
        finally:
            om.y_embedder.dropout_prob = p
        rep_gen = ((o_out - target) ** 2).mean(dim=(1, 2, 3)).mean()
        res = {}
        if sra:
            t_teacher = (t4 - ostep.loss_fn.t_max * delta.to(dev)).clamp(0, 1).to(x0.dtype)
            x_teacher = (1 - t_teacher) * x0 + t_teacher * noise
            o_teacher = oema(x_teacher, t_teacher.flatten(), y_used, ad=ostep.kt)[1]
            rep_align = F.smooth_l1_loss(o_head, o_teacher, beta=0.05)
        # (c) ours: our model, objective and SRA / REPA term on the same tensors
        term = next((tm for tm in trainer.terms if isinstance(tm, SRATerm)), None)
        rterm = next((tm for tm in trainer.terms if isinstance(tm, REPATerm)), None)
        # the forward the timed step runs (the torch.compile'd one with --compile: its fusions reorder
        # float operations, so the check then shows rounding-level differences instead of 0)
        feats = trainer.forward_model(x_t, t, y_used, drop_labels=False,
                                      project_block=term.student_block if term else None,
                                      repa_block=rterm.encoder_depth if rterm else None)
        out = feats.out
        our_gen = objective.loss(out.float(), x0, x_t, t, noise)["loss"].mean()
        res.update(out_max_abs_diff=float((out - o_out).abs().max()),
                   gen_loss_ours=float(our_gen), gen_loss_official=float(off_gen),
                   gen_loss_diff=float((our_gen - off_gen).abs()),
                   redraw_gen_diff=float((rep_gen - off_gen).abs()))
        total_ours, total_off = our_gen, off_gen
        if sra:
            ctx = StepContext(model=model, ema=ema, objective=_FixedTeacherTime(objective, t_teacher.flatten()),
                              x0=x0, eps=noise, t=t, x_t=x_t, y=y_used, feats=feats, step=0, epoch=0,
                              autocast=contextlib.nullcontext, generator=None)
            extra, logs = term(ctx)
            our_teacher, _ = term.teacher_features(ctx)
            res.update(head_max_abs_diff=float((feats.head - o_head).abs().max()),
                       teacher_max_abs_diff=float((our_teacher - o_teacher).abs().max()),
                       align_loss_ours=float(logs["loss_align"]), align_loss_official=float(off_align),
                       align_loss_diff=float((logs["loss_align"] - off_align).abs()),
                       redraw_align_diff=float((rep_align - off_align).abs()),
                       weight_ours=float(term.weight), weight_official=ostep.weight)
            total_ours = our_gen + extra
            total_off = off_gen + ostep.weight * off_align
        if repa:
            # our projectors and formula against the official ones, on the official targets zs (the
            # encoder is not part of the comparison: both sides align to the same fixed tokens)
            ours_proj = repa_loss(feats.repa, ostep.zs)
            res.update(projector_max_abs_diff=float((feats.repa[0] - o_zs[0]).abs().max()),
                       align_loss_ours=float(ours_proj), align_loss_official=float(off_align),
                       align_loss_diff=float((ours_proj - off_align).abs()),
                       redraw_align_diff=float((repa_loss(o_zs, ostep.zs) - off_align).abs()),
                       weight_ours=float(rterm.proj_coeff), weight_official=ostep.weight)
            total_ours = our_gen + rterm.proj_coeff * ours_proj
            total_off = off_gen + ostep.weight * off_align
        res["total_loss_diff"] = float((total_ours - total_off).abs())
    scale = max(1.0, abs(res["gen_loss_official"]))
    diffs = [res["gen_loss_diff"], res["total_loss_diff"], res.get("align_loss_diff", 0.0)]
    res["ok"] = bool(max(diffs) <= 1e-5 * scale and res["out_max_abs_diff"] <= 1e-4
                     and res["redraw_gen_diff"] <= 1e-6 * scale and res.get("redraw_align_diff", 0.0) <= 1e-6)
    return res


# ----------------------------------------------------------------------------------------------
# One (model, method) comparison
# ----------------------------------------------------------------------------------------------


def _profile(fn, rows: int, device: torch.device) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        _sync(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    avgs = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0), reverse=True)
    total = sum(getattr(e, key, 0) for e in avgs) or 1
    return [{"op": e.key, "self_ms": round(getattr(e, key, 0) / 1000, 2), "share": round(getattr(e, key, 0) / total, 3),
             "calls": e.count} for e in avgs[:rows]]


def compare(model_name: str, method: str, official: Official | None, *, batch_size: int = 16,
            precision: str = "fp32", device: str = "cpu", warmup: int = 3, steps: int = 10, seed: int = 0,
            projector_dim: int = 64, z_dim: int = 32, data_dir: Path | None = None, profile_rows: int = 0,
            compile_ours: bool = False, check: bool = True, overrides: dict | None = None) -> dict:
    """Time our training step (and the official one when ``official`` is given) for one config."""
    overrides = dict(overrides or {})
    with contextlib.ExitStack() as stack:
        if data_dir is None:
            data_dir = make_latents(Path(stack.enter_context(tempfile.TemporaryDirectory())), max(batch_size, 32))
        out_dir = stack.enter_context(tempfile.TemporaryDirectory())
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")
        repa = {}
        if method == "repa":  # our targets: fixed token features per item (the encoder is not compared)
            n_items = len(make_dataset(f"latents:{data_dir}", "train", holdout_cut=False))
            shape = model_config(model_name, input_size=32, in_channels=4, **overrides)
            feats = np.random.default_rng(seed).standard_normal((n_items, shape.num_tokens, z_dim)).astype(np.float32)
            targets = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "repa-targets.npy"
            np.save(targets, feats)
            repa = {"encoder": f"features:{targets}", "projector_dim": projector_dim,
                    "encoder_depth": default_blocks(shape)[0]}
        cfg = TrainConfig(model=model_name, model_overrides=overrides, method=method, data=f"latents:{data_dir}",
                          batch_size=batch_size, steps=10**6, ema_decay=0.9999, device=device, precision=precision,
                          out=out_dir, seed=seed, compile=compile_ours, repa=repa)
        tr = Trainer(cfg, quiet=True)
        tr.model.train()
        perturb_(tr.model, seed)
        tr.ema.load_state_dict(tr.model.state_dict())
        dev = tr.device
        mc = tr.model_config
        moments, y = tr.dataset.get_batch(torch.arange(batch_size))
        moments, y = moments.to(dev), y.to(dev)
        batches = itertools.repeat((moments, y, torch.arange(batch_size)))
        term = next((t for t in tr.terms if isinstance(t, SRATerm)), None)
        ks, kt = (term.student_block, term.teacher_block) if term else default_blocks(mc)
        rec = {"model": model_name, "method": method, "batch_size": batch_size, "precision": tr.precision,
               "device": str(dev), "depth": mc.depth, "hidden_size": mc.hidden_size, "tokens": mc.num_tokens,
               "in_channels": mc.in_channels, "input_size": mc.input_size, "blocks": [ks, kt] if term else None,
               "compile_ours": compile_ours, "load_avg_before": load_avg()}
        ostep = None
        if official is not None:
            omodel = build_official_model(official, mc, encoder_depth=ks, projector_dim=projector_dim,
                                          z_dim=z_dim).to(dev)
            rec["official_only_keys"] = sorted({k.split(".")[0] for k in load_same_weights(tr.model, omodel)})
            omodel.train()
            amp = tr.amp_dtype
            ostep = OfficialStep(official, omodel, method, blocks=(ks, kt), t_max=term.t_max if term else 0.2,
                                 weight=term.weight if term else (DEFAULT_PROJ_COEFF if method == "repa" else 0.0),
                                 amp_dtype=amp, device=dev, lr=cfg.lr,
                                 betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay, clip=cfg.grad_clip,
                                 ema_decay=cfg.ema_decay, z_dim=z_dim, batch_size=batch_size, num_tokens=mc.num_tokens)
            rec["official"] = {"kind": official.kind, "root": str(official.root),
                               "projector_dim": projector_dim if official.kind == "repa" else None,
                               "z_dim": z_dim if official.kind == "repa" else None}
            if check:
                rec["loss_check"] = loss_check(tr, ostep, moments, y)
        sides = {"ours": lambda: tr.train_step(batches)}
        if ostep is not None:
            sides["official"] = lambda: ostep.step(moments, y)
        for i in range(warmup):
            for name, fn in sides.items():
                t0 = time.perf_counter()
                fn()
                if i == 0:  # the first step pays for torch.compile (with --compile) and allocator warm-up
                    rec[f"{name}_first_step_s"] = time.perf_counter() - t0
        times: dict[str, list[float]] = {k: [] for k in sides}
        order = list(sides)
        for i in range(steps):
            for name in (order if i % 2 == 0 else order[::-1]):
                _sync(dev)
                t0 = time.perf_counter()
                sides[name]()
                _sync(dev)
                times[name].append(time.perf_counter() - t0)
        rec["ours_ms"] = statistics.median(times["ours"]) * 1000
        rec["ours_img_per_s"] = batch_size / (rec["ours_ms"] / 1000)
        if "official" in times:
            rec["official_ms"] = statistics.median(times["official"]) * 1000
            rec["official_img_per_s"] = batch_size / (rec["official_ms"] / 1000)
            rec["ratio_ours_over_official"] = rec["ours_ms"] / rec["official_ms"]
        rec["timed_steps"] = steps
        rec["warmup"] = warmup
        rec["load_avg_after"] = load_avg()
        if dev.type == "cuda":
            rec["peak_gpu_mem_gb"] = torch.cuda.max_memory_allocated(dev) / 2**30
        if profile_rows:
            rec["profile"] = {name: _profile(fn, profile_rows, dev) for name, fn in sides.items()}
    return rec


def check_text(rec: dict) -> str:
    c = rec.get("loss_check")
    if not c:
        return "not run"
    parts = [f"out {c['out_max_abs_diff']:.1e}", f"gen {c['gen_loss_diff']:.1e}"]
    if "head_max_abs_diff" in c:
        parts += [f"head {c['head_max_abs_diff']:.1e}", f"teacher {c['teacher_max_abs_diff']:.1e}"]
    if "projector_max_abs_diff" in c:
        parts.append(f"projector {c['projector_max_abs_diff']:.1e}")
    if "align_loss_diff" in c:
        parts.append(f"{'proj' if 'projector_max_abs_diff' in c else 'align'} {c['align_loss_diff']:.1e}")
    parts.append(f"total {c['total_loss_diff']:.1e}")
    return ("ok" if c["ok"] else "MISMATCH") + " (max abs diff: " + ", ".join(parts) + ")"


def table(records: list[dict]) -> str:
    lines = ["| model | method | batch | ours ms | official ms | ours/official | official code | loss check (fp32) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in records:
        if "skipped" in r:
            lines.append(f"| {r['model']} | {r['method']} | | | | | | skipped: {r['skipped']} |")
            continue
        off = r.get("official_ms")
        off_txt = "" if off is None else f"{off:.1f}"
        ratio_txt = "" if off is None else f"{r['ratio_ours_over_official']:.2f}"
        method = r["method"] + (f" (compiled; first step {r['ours_first_step_s']:.0f} s)"
                                if r.get("compile_ours") and "ours_first_step_s" in r else "")
        lines.append(f"| {r['model']} | {method} | {r['batch_size']} | {r['ours_ms']:.1f} | {off_txt} | "
                     f"{ratio_txt} | {r.get('official', {}).get('kind', '')} | {check_text(r)} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Extraction side by side
# ----------------------------------------------------------------------------------------------


def compare_extraction(model_name: str, official: Official | None, *, n: int = 256, ts: list[float] | None = None,
                       blocks: list[int] | None = None, batch_size: int = 128, batch1_n: int | None = 64,
                       device: str = "cpu", seed: int = 0, overrides: dict | None = None,
                       data_dir: Path | None = None, repeats: int = 3) -> dict:
    """Our ``extract_grid`` vs the pca-vis ``get_f`` strategy on the same images, noise and cells.

    Official side (inputs prepared outside its timer, which favours it): for every cell
    (block, t), a full forward of the official SRA SiT in eval mode, ``model(x_t, t, y, ad=block)[1]``
    (all blocks and the final layer run; the block's tokens are returned), mean-pooled as ours:
    batched over the images (``official_batched_s``) and, as ``get_f`` does it, one image per
    forward (``official_batch1_s``, on the first ``batch1_n`` images, scaled to ``n``, one run).
    Ours and the batched official pass alternate ``repeats`` times; medians are reported. The
    VAE encode of ``get_f`` is left out on both sides (the inputs are latents). Without an SRA
    checkout the official strategy is emulated with our model's full forward per cell.
    """
    ts = ts or [0.1, 0.3, 0.5, 0.7]
    dev = torch.device(device)
    with contextlib.ExitStack() as stack:
        if data_dir is None:
            data_dir = make_latents(Path(stack.enter_context(tempfile.TemporaryDirectory())), n)
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")
        ds = make_dataset(f"latents:{data_dir}", "train", holdout_cut=False)
        cfg = model_config(model_name, in_channels=ds.channels, input_size=ds.image_size,
                           num_classes=ds.num_classes, **(overrides or {}))
        from repdyn.model.backbone import DiffusionTransformer
        from repdyn.model.objectives import make_objective

        torch.manual_seed(seed)
        model = DiffusionTransformer(cfg)
        perturb_(model, seed)
        model = model.eval().requires_grad_(False).to(dev)
        blocks = blocks or list(range(1, cfg.depth + 1))
        ck = LoadedCheckpoint(model=model, weights="ema", meta={"family": "sit", "time_convention": "flow-t1-noise",
                                                                "model_name": model_name},
                              config={}, objective=make_objective("sit"), path=Path("random"), sha=f"bench-{model_name}",
                              step=0)
        idx = np.arange(n)

        def ours_pass():
            return extract_grid(ck, ds, blocks=blocks, ts=ts, indices=idx, batch_size=batch_size, device=dev,
                                precision="fp32", progress=False)

        use_official = official is not None and official.kind == "sra"
        if use_official:
            om = build_official_model(official, cfg, 1, 0, 0).to(dev)
            load_same_weights(model, om)
            om = om.eval().requires_grad_(False)

            def feature(x_t, tt, yy, b):
                return om(x_t, tt, yy, ad=b)[1]
        else:
            def feature(x_t, tt, yy, b):
                return model.forward_features(x_t, tt, yy, drop_labels=False, blocks=[b]).blocks[b]

        x0 = load_x0(ds, idx, seed, "train").to(dev)
        eps = grid_noise(idx, (cfg.in_channels, cfg.input_size, cfg.input_size), seed, "train").to(dev)
        y_null = torch.full((n,), cfg.num_classes, dtype=torch.long, device=dev)

        def official_pass(rows: np.ndarray, bs: int) -> dict:
            feats = {}
            with torch.inference_mode():
                for t in ts:
                    for b in blocks:
                        outs = []
                        for s in range(0, len(rows), bs):
                            r = torch.as_tensor(rows[s: s + bs], device=dev)
                            tt = torch.full((len(r),), float(t), device=dev)
                            x_t = (1 - tt.view(-1, 1, 1, 1)) * x0[r] + tt.view(-1, 1, 1, 1) * eps[r]
                            outs.append(feature(x_t, tt, y_null[r], b).mean(dim=1))
                        feats[(b, t)] = torch.cat(outs).float().cpu().numpy()
            return feats

        # warm-up both on one batch, then interleave (ours, official, official, ours, ...): median
        extract_grid(ck, ds, blocks=blocks, ts=ts[:1], indices=idx[:batch_size], batch_size=batch_size,
                     device=dev, precision="fp32", progress=False)
        official_pass(idx[:batch_size], batch_size)
        times: dict[str, list[float]] = {"ours": [], "official": []}
        for i in range(repeats):
            for side in (("ours", "official") if i % 2 == 0 else ("official", "ours")):
                _sync(dev)
                t0 = time.perf_counter()
                if side == "ours":
                    g = ours_pass()
                else:
                    off_feats = official_pass(idx, batch_size)
                _sync(dev)
                times[side].append(time.perf_counter() - t0)
        ours_s, off_batched_s = statistics.median(times["ours"]), statistics.median(times["official"])
        diff = max(float(np.abs(np.asarray(g.features[c]) - off_feats[c]).max()) for c in off_feats)
        rec = {"model": model_name, "n": n, "ts": ts, "blocks": blocks, "cells": len(ts) * len(blocks),
               "batch_size": batch_size, "device": str(dev), "tokens": cfg.num_tokens, "depth": cfg.depth,
               "official_strategy": ("official SRA SiT, full forward per (block, t) as pca-vis get_f"
                                     if use_official else "emulated with our model: full forward per (block, t)"),
               "repeats": repeats, "ours_s": ours_s, "official_batched_s": off_batched_s,
               "ours_all_s": times["ours"], "official_batched_all_s": times["official"],
               "ratio_official_batched_over_ours": off_batched_s / ours_s, "features_max_abs_diff": diff,
               "load_avg": load_avg()}
        if batch1_n:
            m = min(batch1_n, n)
            t0 = time.perf_counter()
            official_pass(idx[:m], 1)
            _sync(dev)
            b1 = (time.perf_counter() - t0) * n / m
            rec.update(official_batch1_images=m, official_batch1_s=b1, ratio_official_batch1_over_ours=b1 / ours_s)
    return rec


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def pick_official(officials: list[Official], method: str) -> tuple[Official | None, str | None]:
    """SRA needs the SRA code (its SiT + SRALoss); the baseline the REPA code (its SiT + SILoss)."""
    want = "sra" if method == "sra" else "repa"
    for o in officials:
        if o.kind == want:
            return o, None
    return None, (f"needs an {'SRA' if want == 'sra' else 'REPA'} checkout in --official "
                  f"(the {'SRA loss' if want == 'sra' else 'plain flow-matching SILoss'} lives there)")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--official", action="append", default=[], metavar="PATH",
                    help="a REPA or SRA checkout (repeat for both)")
    ap.add_argument("--method", default="both", choices=["baseline", "sra", "repa", "both", "all"],
                    help="both: baseline and sra; all: baseline, sra and repa")
    ap.add_argument("--model", default="SiT-T/4", help="comma-separated registry names, e.g. SiT-T/4,SiT-S/2")
    ap.add_argument("--overrides", default="", help="model overrides for every model, e.g. depth=2,hidden_size=32")
    ap.add_argument("--batch-size", default="16", help="one batch size, or one per model (comma-separated)")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per side (median)")
    ap.add_argument("--projector-dim", type=int, default=64, help="REPA projector width (its forward runs it)")
    ap.add_argument("--z-dim", type=int, default=32, help="REPA target dim")
    ap.add_argument("--profile", type=int, default=0, metavar="N", help="also profile one step of each: top N ops")
    ap.add_argument("--compile", action="store_true", help="torch.compile our forward (TrainConfig.compile)")
    ap.add_argument("--no-check", action="store_true", help="skip the loss check")
    ap.add_argument("--extraction", action="store_true", help="run the extraction comparison instead")
    ap.add_argument("--extract-n", type=int, default=256)
    ap.add_argument("--extract-ts", default="0.1,0.3,0.5,0.7")
    ap.add_argument("--extract-blocks", default="", help="comma-separated 1-based blocks (default: all)")
    ap.add_argument("--extract-batch", type=int, default=128)
    ap.add_argument("--extract-batch1-n", type=int, default=64, help="images for the batch-1 get_f timing (0: skip)")
    ap.add_argument("--extract-repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = parse_overrides(args.overrides)
    try:
        officials = [load_official(p) for p in args.official]
    except OfficialCodeError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    models = [m.strip() for m in args.model.split(",") if m.strip()]
    out: dict = {"machine": machine(), "argv": sys.argv[1:] if argv is None else argv}

    if args.extraction:
        sra_off = next((o for o in officials if o.kind == "sra"), None)
        ts = [float(t) for t in args.extract_ts.split(",")]
        blocks = [int(b) for b in args.extract_blocks.split(",")] if args.extract_blocks else None
        recs = [compare_extraction(m, sra_off, n=args.extract_n, ts=ts, blocks=blocks, batch_size=args.extract_batch,
                                   batch1_n=args.extract_batch1_n, device=args.device, overrides=overrides,
                                   repeats=args.extract_repeats)
                for m in models]
        out["extraction"] = recs
        print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.device}; load {load_avg()}")
        print("| model | cells (blocks x t) | images | ours s | official batched s | ratio | official batch-1 s "
              "| ratio | features max abs diff |\n|---|---|---|---|---|---|---|---|---|")
        for r in recs:
            b1 = r.get("official_batch1_s")
            b1_txt = "" if b1 is None else f"{b1:.2f}"
            b1_ratio = "" if b1 is None else f"{r['ratio_official_batch1_over_ours']:.1f}x"
            print(f"| {r['model']} | {r['cells']} ({len(r['blocks'])} x {len(r['ts'])}) | {r['n']} | {r['ours_s']:.2f} | "
                  f"{r['official_batched_s']:.2f} | {r['ratio_official_batched_over_ours']:.2f}x | {b1_txt} | "
                  f"{b1_ratio} | {r['features_max_abs_diff']:.1e} |")
            print(f"official strategy: {r['official_strategy']}")
    else:
        batch_sizes = [int(b) for b in args.batch_size.split(",")]
        if len(batch_sizes) == 1:
            batch_sizes *= len(models)
        if len(batch_sizes) != len(models):
            raise SystemExit("error: give one --batch-size or one per model")
        methods = {"both": ["baseline", "sra"], "all": ["baseline", "sra", "repa"]}.get(args.method, [args.method])
        records = []
        for m, bs in zip(models, batch_sizes):
            for meth in methods:
                off, why = pick_official(officials, meth)
                if officials and off is None:
                    records.append({"model": m, "method": meth, "skipped": why})
                    continue
                records.append(compare(m, meth, off, batch_size=bs, precision=args.dtype, device=args.device,
                                       warmup=args.warmup, steps=args.steps, projector_dim=args.projector_dim,
                                       z_dim=args.z_dim, profile_rows=args.profile, compile_ours=args.compile,
                                       check=not args.no_check, overrides=overrides))
                r = records[-1]
                print(f"  {m} {meth}: ours {r['ours_ms']:.1f} ms"
                      + (f", official {r['official_ms']:.1f} ms" if "official_ms" in r else "")
                      + f" (load {r['load_avg_before']} -> {r['load_avg_after']})", file=sys.stderr)
        out["records"] = records
        print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.device}, {args.dtype}; "
              f"median of {args.steps} interleaved steps per side after {args.warmup} warm-up; "
              f"load average now {load_avg()}")
        print(table(records))
        for r in records:
            for side, ops in (r.get("profile") or {}).items():
                print(f"\ntop ops, one step, {r['model']} {r['method']} {side}:")
                for o in ops:
                    print(f"  {o['self_ms']:8.2f} ms  {100 * o['share']:5.1f}%  x{o['calls']:<5d} {o['op']}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))
    return out


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
