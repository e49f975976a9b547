"""Benchmark: training-step time of baseline, SRA, REPA, DiverseDiT and SRA+DiverseDiT, on one machine and config.

Not a test. Every method gets its own :class:`repdyn.training.trainer.Trainer` (same model, data, batch,
precision, seed); the methods are timed **interleaved** (a few steps of each, round after round)
so a change in machine load hits all of them alike, and the per-method figure is the **median**
of the full optimiser steps (forward, method terms, backward, clip, AdamW, EMA) after warm-up.

    .venv/bin/python bench/bench_methods.py                               # tiny SiT on CPU
    .venv/bin/python bench/bench_methods.py --model SiT-B/2 --data latents:data/imagenet256 \
        --batch-size 64 --device cuda --precision bf16                    # on a GPU

Reports a markdown table (ms/step, ratio to baseline) and, with ``--json``, a JSON record with the
machine. The SRA target: SRA/baseline <= 1.20 on CPU for a tiny SiT, <= 1.10 on a GPU.
With ``--full-teacher`` it also times SRA with the official full-depth teacher pass (for the
saving of the early exit). With ``repa`` among the methods it also times REPA with the encoder pass
excluded (its targets computed once and reused: the cost of precomputed ``features:PATH`` tokens
without the file read), so the encoder's share of the step is the difference. REPA uses its
default encoder, the dataset's embedded ViT (trained once and cached; ``$REPDYN_CACHE``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from repdyn.training.config import TrainConfig
from repdyn.training.methods.repa import REPATerm
from repdyn.training.methods.sra import SRATerm
from repdyn.training.trainer import Trainer


class FullTeacherSRA(SRATerm):
    """SRA with the official full teacher pass (all blocks + final layer), for comparison only."""

    @torch.no_grad()
    def teacher_features(self, ctx):
        t_teacher = ctx.objective.less_noisy(ctx.t, self.t_max, ctx.generator)
        x_teacher = ctx.objective.corrupt(ctx.x0, t_teacher, ctx.eps)
        with ctx.autocast():
            feats = ctx.ema.forward_features(x_teacher, t_teacher, ctx.y, drop_labels=False, blocks=[self.teacher_block])
        return feats.blocks[self.teacher_block], t_teacher


class CachedTargetREPA(REPATerm):
    """REPA with the encoder pass excluded: the encoders' tokens of the first batch, reused (for
    timing only: the projectors, the loss and their backward are as in training)."""

    def __init__(self, term: REPATerm):
        super().__init__(term.targets, term.encoder_depth, term.projector_dim, term.proj_coeff)
        self._cached: list[torch.Tensor] | None = None

    def target_tokens(self, ctx):
        if self._cached is None or self._cached[0].shape[0] != ctx.x0.shape[0]:
            self._cached = super().target_tokens(ctx)
        return self._cached


REPA_EXCLUDED = "repa, encoder pass excluded"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()}
    try:
        info["load_avg_1m"] = os.getloadavg()[0]
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def parse_overrides(text: str) -> dict:
    """``"depth=4,hidden_size=64"`` -> {"depth": 4, "hidden_size": 64} (model overrides of a bench)."""
    out = {}
    for item in filter(None, text.split(",")):
        k, v = item.split("=")
        out[k.strip()] = int(v) if v.strip().lstrip("-").isdigit() else v.strip()
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="SiT-T/4")
    ap.add_argument("--overrides", default="", help="model overrides, e.g. depth=4,hidden_size=64")
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--methods", default="baseline,sra,repa,diverse,sra+diverse")
    ap.add_argument("--full-teacher", action="store_true", help="also time SRA with a full-depth teacher")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps per method")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--steps-per-round", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--json", default=None, help="write the result record here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = parse_overrides(args.overrides)

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    names = list(methods) + (["sra(full teacher)"] if args.full_teacher else []) + (
        [REPA_EXCLUDED] if "repa" in methods else [])
    trainers, streams = {}, {}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in names:
            method = {"sra(full teacher)": "sra", REPA_EXCLUDED: "repa"}.get(name, name)
            cfg = TrainConfig(model=args.model, model_overrides=overrides, method=method, data=args.data,
                              batch_size=args.batch_size, steps=10**6, ema_decay=0.999, device=args.device,
                              precision=args.precision, out=str(Path(tmp) / name.replace("+", "_")), seed=0)
            tr = Trainer(cfg, quiet=True)
            if name == "sra(full teacher)":
                t = tr.terms[0]
                tr.terms = [FullTeacherSRA(t.student_block, t.teacher_block, t.t_max, t.weight, t.distance, t.beta)]
            if name == REPA_EXCLUDED:
                tr.terms = [CachedTargetREPA(tr.terms[0])]
            tr.model.train()
            trainers[name], streams[name] = tr, tr._batches()
        device = next(iter(trainers.values())).device
        for name, tr in trainers.items():
            for _ in range(args.warmup):
                tr.train_step(streams[name])
        times: dict[str, list[float]] = {n: [] for n in names}
        for _ in range(args.rounds):
            for name, tr in trainers.items():
                for _ in range(args.steps_per_round):
                    _sync(device)
                    t0 = time.perf_counter()
                    tr.train_step(streams[name])
                    _sync(device)
                    times[name].append(time.perf_counter() - t0)
        tr0 = next(iter(trainers.values()))
        mc = tr0.model_config
        sra_term = next((t for tr in trainers.values() for t in tr.terms if isinstance(t, SRATerm)), None)
        repa_term = next((t for tr in trainers.values() for t in tr.terms if isinstance(t, REPATerm)), None)

    med = {n: statistics.median(v) * 1000 for n, v in times.items()}
    base = med.get("baseline")
    record = {
        "machine": machine(), "device": str(device), "precision": tr0.precision,
        "config": {"model": args.model, "overrides": overrides, "depth": mc.depth, "hidden_size": mc.hidden_size,
                   "tokens": mc.num_tokens, "batch_size": args.batch_size, "data": args.data,
                   "sra_blocks": [sra_term.student_block, sra_term.teacher_block] if sra_term else None,
                   "repa": {"encoders": repa_term.identities(), "encoder_depth": repa_term.encoder_depth,
                            "projector_dim": repa_term.projector_dim, "z_dims": list(repa_term.z_dims)}
                   if repa_term else None,
                   "warmup": args.warmup, "timed_steps": args.rounds * args.steps_per_round},
        "median_ms": med,
        "ratio_to_baseline": {n: (m / base if base else None) for n, m in med.items()},
    }
    print(f"{args.model} {overrides or ''} batch {args.batch_size}, {device}, {tr0.precision}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); median of "
          f"{args.rounds * args.steps_per_round} steps after {args.warmup} warm-up, interleaved")
    print("| method | median ms/step | ratio to baseline |\n|---|---|---|")
    for n, m in med.items():
        r = record["ratio_to_baseline"][n]
        print(f"| {n} | {m:.1f} | {'' if r is None else f'{r:.2f}'} |")
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2))
    return record


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
