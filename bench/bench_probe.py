"""Benchmark (1): whole-grid torch probe vs a scikit-learn LogisticRegression loop, same features.

Both run the same protocol (z-scoring, L2 sweep chosen on a 20% held-out cut, refit on the
whole train split, test accuracy). Also times the ridge screen and the ``linear-sgd`` probe (the
papers' BatchNorm + linear layer protocol, 80 epochs) on the same cells. Features are synthetic by default, shaped like a probe grid
(cells = blocks x t) with a few high-variance channels, or extracted from a checkpoint
(``--ckpt``). Prints one JSON line; numbers go to docs/benchmarks.md.

    python bench/bench_probe.py --cells 40 --n-train 2000 --n-test 1000 --dim 64 --classes 10
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings

import numpy as np
import torch


from repdyn.probe.probes import fit_probes


def synthetic(cells: int, n_train: int, n_test: int, dim: int, classes: int, seed: int = 0):
    """Class means plus noise whose strength varies by cell (some cells easy, some hard)."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(classes, dim))
    scale = np.linspace(0.15, 0.6, cells)[:, None, None]

    def draw(n):
        y = rng.integers(0, classes, n)
        x = scale * means[y][None] + rng.normal(size=(cells, n, dim))
        x[:, :, :4] *= 30.0  # massive channels
        return x.astype(np.float32), y

    return (*draw(n_train), *draw(n_test))


def from_checkpoint(ckpt: str, n_train: int, n_test: int):
    from repdyn.probe.grid import extract_grid
    from repdyn.model.checkpoint import load_checkpoint
    from repdyn.datasets.sources import make_dataset

    ck = load_checkpoint(ckpt)
    data = ck.meta.get("data") or "fashion-mnist"
    gtr = extract_grid(ck, make_dataset(data, "train"), n_samples=n_train, progress=False)
    gte = extract_grid(ck, make_dataset(data, "test"), n_samples=n_test, split="test", progress=False)
    return gtr.stack(), gtr.labels, gte.stack(), gte.labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=40)
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-test", type=int, default=1000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--ckpt", default=None, help="extract real features from this checkpoint instead")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-sklearn", action="store_true")
    ap.add_argument("--skip-linear-sgd", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.ckpt:
        xtr, ytr, xte, yte = from_checkpoint(args.ckpt, args.n_train, args.n_test)
    else:
        xtr, ytr, xte, yte = synthetic(args.cells, args.n_train, args.n_test, args.dim, args.classes)
    out = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
                      f"torch {torch.__version__}, threads {torch.get_num_threads()}",
           "device": args.device, "cells": int(xtr.shape[0]), "n_train": int(xtr.shape[1]), "dim": int(xtr.shape[2]),
           "classes": int(max(ytr.max(), yte.max()) + 1)}
    fit_probes(xtr[:2, :200], ytr[:200], xte[:2], yte, "torch", device=args.device)  # warm-up
    t0 = time.perf_counter()
    rt = fit_probes(xtr, ytr, xte, yte, "torch", device=args.device)
    out["torch_s"] = time.perf_counter() - t0
    out["torch_mean_acc"] = float(rt.accuracy.mean())
    out["torch_converged_chosen"] = float(rt.converged.mean())
    out["torch_converged_sweep"] = float(rt.sweep_converged.mean())
    out["torch_max_sweep_iterations"] = int(rt.sweep_iterations.max())
    t0 = time.perf_counter()
    rr = fit_probes(xtr, ytr, xte, yte, "ridge", device=args.device)
    out["ridge_s"] = time.perf_counter() - t0
    out["ridge_mean_acc"] = float(rr.accuracy.mean())
    if not args.skip_linear_sgd:
        fit_probes(xtr[:2, :200], ytr[:200], xte[:2], yte, "linear-sgd", device=args.device)  # warm-up
        t0 = time.perf_counter()
        rl = fit_probes(xtr, ytr, xte, yte, "linear-sgd", device=args.device)
        out["linear_sgd_s"] = time.perf_counter() - t0
        out["linear_sgd_mean_acc"] = float(rl.accuracy.mean())
        out["linear_sgd_steps"] = int(rl.protocol["steps"])
    if not args.skip_sklearn:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            rs = fit_probes(xtr, ytr, xte, yte, "sklearn")
            out["sklearn_s"] = time.perf_counter() - t0
        out["sklearn_mean_acc"] = float(rs.accuracy.mean())
        out["speedup_torch_vs_sklearn"] = out["sklearn_s"] / out["torch_s"]
        out["max_abs_acc_diff_points"] = float(100 * np.abs(rt.accuracy - rs.accuracy).max())
        out["mean_acc_diff_points"] = float(100 * (rt.accuracy - rs.accuracy).mean())
    print(json.dumps(out))


if __name__ == "__main__":
    main()
