"""Benchmark (1b): convergence and time of the torch probe, current solver vs a baseline revision.

Runs, on the same features, ``fit_probes(..., "torch")`` of this working tree and of
``probe/probes.py`` at ``--baseline-rev`` (default HEAD, loaded with ``git show``; ``--baseline-rev
none`` skips it), then re-solves each one's L2 sweep on the fit part and checks every (cell,
strength) problem with one common test: max |grad| of ``mean CE + lam/2 ||W||^2`` < tol (1e-4, the
solvers' and scikit-learn's default), computed in float64 from the returned weights. Optionally
times the ``linear-sgd`` probe on the same cells. Prints one JSON line.

Features: real ones from a checkpoint (``--ckpt``, online weights by default, Fashion-MNIST or the
checkpoint's data; ``--save-npz`` keeps them), a saved ``--npz`` (keys xtr, ytr, xte, yte), or
synthetic (bench_probe's generator, ``--dim``).

    python bench/bench_probe_convergence.py --ckpt runs/x/checkpoints/0000400.pt --save-npz feats.npz
    python bench/bench_probe_convergence.py --npz feats.npz --threads 1 --linear-sgd
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import repdyn.probe.probes as current
from repdyn.probe.lbfgs import _loss_grad


def load_revision(rev: str):
    """probe/probes.py at a git revision, as a module."""
    src = subprocess.run(["git", "-C", ROOT, "show", f"{rev}:probe/probes.py"], check=True, capture_output=True,
                         text=True).stdout
    path = os.path.join(tempfile.mkdtemp(), "probes_baseline.py")
    with open(path, "w") as fh:
        fh.write(src)
    spec = importlib.util.spec_from_file_location("probes_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["probes_baseline"] = mod
    spec.loader.exec_module(mod)
    return mod


def features(args):
    if args.npz:
        z = np.load(args.npz)
        return z["xtr"], z["ytr"], z["xte"], z["yte"]
    if args.ckpt:
        from repdyn.probe.grid import extract_grid
        from repdyn.model.checkpoint import load_checkpoint
        from repdyn.datasets.sources import make_dataset

        ck = load_checkpoint(args.ckpt, weights=args.weights)
        data = ck.data or "fashion-mnist"
        ts = [float(t) for t in args.ts.split(",")]
        blocks = [0, *range(1, ck.model.depth + 1)]
        kw = dict(blocks=blocks, ts=ts, progress=False)
        gtr = extract_grid(ck, make_dataset(data, "train"), n_samples=args.n_train, split="train", **kw)
        gte = extract_grid(ck, make_dataset(data, "test"), n_samples=args.n_test, split="test", **kw)
        out = gtr.stack(), gtr.labels, gte.stack(), gte.labels
        if args.save_npz:
            np.savez(args.save_npz, xtr=out[0], ytr=out[1], xte=out[2], yte=out[3])
        return out
    from bench_probe import synthetic

    return synthetic(args.cells, args.n_train, args.n_test, args.dim, args.classes)


def sweep_check(mod, xtr, ytr, k, tol, **kw):
    """Each module's own sweep on the fit part; (cells, strengths) max |grad| of the returned weights."""
    lambdas = current.DEFAULT_LAMBDAS
    fit, _ = current.holdout_split(len(ytr), 0.2, 0)
    a = torch.as_tensor(xtr)
    mu, sd = current._standardise(a, a[:, torch.as_tensor(fit)])
    xf = current._augment((a[:, torch.as_tensor(fit)] - mu) / sd)
    lam = torch.tensor(lambdas, dtype=torch.float32)[None].expand(len(a), -1).contiguous()
    y = torch.as_tensor(ytr[fit])
    w, _ = mod.batched_logreg(xf, y, k, lam, **kw)
    x64, w64, lam64 = xf.double(), w.double(), lam.double()
    mask = torch.ones((1, x64.shape[2], 1, 1), dtype=torch.float64)
    mask[:, -1] = 0
    _, g = _loss_grad(x64, torch.nn.functional.one_hot(y, k).double(), w64, lam64, mask)
    return g.abs().amax((1, 3)).numpy()


def run(mod, name, xtr, ytr, xte, yte, k, tol, device):
    fit_probes = mod.fit_probes
    fit_probes(xtr[:2, :200], ytr[:200], xte[:2], yte, "torch", device=device)  # warm-up
    t0 = time.perf_counter()
    r = fit_probes(xtr, ytr, xte, yte, "torch", device=device)
    sec = time.perf_counter() - t0
    kw = {} if name == "current" else {"max_iter": r.protocol.get("max_iter", 200)}
    t1 = time.perf_counter()
    gm = sweep_check(mod, xtr, ytr, k, tol, **kw)
    sweep_sec = time.perf_counter() - t1
    lambdas = list(current.DEFAULT_LAMBDAS)
    pick = np.abs(np.log(np.asarray(r.reg, dtype=np.float64))[:, None] - np.log(lambdas)[None]).argmin(1)
    ok = gm < tol
    out = {"seconds": round(sec, 2), "sweep_only_seconds": round(sweep_sec, 2),
           "mean_acc": round(float(r.accuracy.mean()), 4),
           "sweep_converged_per_lambda": {f"{lam:g}": round(float(ok[:, j].mean()), 3)
                                          for j, lam in enumerate(lambdas)},
           "chosen_strength_converged": round(float(ok[np.arange(len(pick)), pick].mean()), 3),
           "chosen_lambda_counts": {f"{lam:g}": int((pick == j).sum()) for j, lam in enumerate(lambdas)}}
    if getattr(r, "converged", None) is not None:
        out["reported_converged"] = round(float(r.converged.mean()), 3)
        out["refit_iterations_max"] = int(r.iterations.max())
        out["sweep_iterations_max_per_lambda"] = [int(v) for v in r.sweep_iterations.max(0)]
    return out, r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--npz", default=None)
    ap.add_argument("--ckpt", default=None)
    ap.add_argument("--weights", default="model")
    ap.add_argument("--ts", default="0,0.3,0.6,0.9")
    ap.add_argument("--save-npz", default=None)
    ap.add_argument("--cells", type=int, default=20)
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-test", type=int, default=1000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--max-cells", type=int, default=None, help="use only the first cells")
    ap.add_argument("--baseline-rev", default="HEAD")
    ap.add_argument("--linear-sgd", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    xtr, ytr, xte, yte = features(args)
    if args.max_cells:
        xtr, xte = xtr[: args.max_cells], xte[: args.max_cells]
    k = int(max(ytr.max(), yte.max()) + 1)
    out = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
                      f"torch {torch.__version__}, threads {torch.get_num_threads()}",
           "load_avg_start": [round(v, 2) for v in os.getloadavg()], "device": args.device,
           "cells": int(xtr.shape[0]), "n_train": int(xtr.shape[1]), "dim": int(xtr.shape[2]), "classes": k}
    out["current"], rc = run(current, "current", xtr, ytr, xte, yte, k, 1e-4, args.device)
    if args.baseline_rev != "none":
        base = load_revision(args.baseline_rev)
        out[f"baseline_{args.baseline_rev}"], rb = run(base, "baseline", xtr, ytr, xte, yte, k, 1e-4, args.device)
        out["max_abs_acc_diff_points"] = round(float(100 * np.abs(rc.accuracy - rb.accuracy).max()), 2)
        out["chosen_strength_changed_cells"] = int((~np.isclose(rc.reg, rb.reg, rtol=1e-3)).sum())
    if args.linear_sgd:
        t0 = time.perf_counter()
        rs = current.fit_probes(xtr, ytr, xte, yte, "linear-sgd", device=args.device)
        out["linear_sgd"] = {"seconds": round(time.perf_counter() - t0, 2),
                             "mean_acc": round(float(rs.accuracy.mean()), 4),
                             "mean_acc_minus_torch_points": round(float(100 * (rs.accuracy - rc.accuracy).mean()), 2)}
    out["load_avg_end"] = [round(v, 2) for v in os.getloadavg()]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
