"""Benchmark: `layer-grid`'s torch probe at the papers' size, per L-BFGS iteration (not a test).

The papers probe SiT-XL/2 on ImageNet: 1000 classes, D = 1152, n_train 10 000 (REPA's protocol size).
A whole fit is far beyond a 2-core CPU, so this measures what sets its cost: one batched L-BFGS
iteration (loss, gradient and line-search evaluations) of the two stages of the protocol for one
cell, with the real shapes: the sweep (80% of the train split; one iteration of each of the 7 L2
strengths, which the solver takes one after another, warm-started) and the refit (the whole split,
one strength). Peak resident memory is read from the process. The whole
fit is then (sweep iterations + refit iterations) x these costs; the iteration counts are reported
by every `layer-grid` run (`iterations`, `converged`) and capped at ``max_iter`` (1000).

    .venv/bin/python bench/bench_probe_scale.py                  # 1000 classes, D 1152, n 10 000
    .venv/bin/python bench/bench_probe_scale.py --classes 100    # a smaller head
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from repdyn.core.runtime import machine_description, peak_rss_mib
from repdyn.probe.lbfgs import batched_logreg
from repdyn.probe.probes import DEFAULT_LAMBDAS


def per_iteration(x: torch.Tensor, y: torch.Tensor, k: int, lam: torch.Tensor, iters: int) -> float:
    """Seconds per L-BFGS iteration: ``iters`` iterations minus one (the first, with its set-up)."""
    t0 = time.perf_counter()
    batched_logreg(x, y, k, lam, max_iter=1, tol=0.0)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    batched_logreg(x, y, k, lam, max_iter=iters, tol=0.0)
    return max(time.perf_counter() - t0 - first, 1e-9) / max(iters - 1, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-train", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=1152)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--iters", type=int, default=3, help="iterations timed per stage (the first is subtracted)")
    ap.add_argument("--holdout", type=float, default=0.2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    dev = torch.device(args.device)
    n_fit = int(round(args.n_train * (1 - args.holdout)))
    means = torch.randn(args.classes, args.dim, generator=g)
    y = torch.randint(0, args.classes, (args.n_train,), generator=g)
    x = 0.3 * means[y] + torch.randn(args.n_train, args.dim, generator=g)
    xa = torch.cat([x, torch.ones(args.n_train, 1)], 1)[None].to(dev)  # (cells = 1, n, D + 1), augmented
    y = y.to(dev)
    lams = torch.tensor(DEFAULT_LAMBDAS, device=dev)[None]  # (1, strengths)
    sweep = per_iteration(xa[:, :n_fit], y[:n_fit], args.classes, lams, args.iters)
    refit = per_iteration(xa, y, args.classes, lams[:, :1], args.iters)
    gflop = 2 * 3 * n_fit * (args.dim + 1) * args.classes * lams.shape[1] / 1e9  # forward + 2 backward matmuls
    out = {"machine": machine_description(), "device": args.device, "n_train": args.n_train, "n_fit": n_fit,
           "dim": args.dim, "classes": args.classes, "strengths": int(lams.shape[1]),
           "sweep_s_per_iteration": round(sweep, 3), "refit_s_per_iteration": round(refit, 3),
           "sweep_gflop_per_evaluation": round(gflop, 1),
           "cell_hours_at_100_iterations_each": round(100 * (sweep + refit) / 3600, 2),
           "cell_hours_at_max_iter_1000": round(1000 * (sweep + refit) / 3600, 1),
           "peak_rss_mib": round(peak_rss_mib())}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
