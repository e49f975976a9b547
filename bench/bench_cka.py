"""Benchmark: full (blocks*t)^2 debiased CKA in one pass vs a pair-by-pair loop (not a test).

Synthetic pooled features stand in for a ``repdyn.probe.grid`` cache: every (block, t) cell is a random
linear read-out of a shared latent plus cell-specific noise, so CKA values spread over (0, 1).

    .venv/bin/python bench/bench_cka.py                       # 12 blocks x 8 t, n = 10k, d = 768
    .venv/bin/python bench/bench_cka.py --n 2000 --dim 128    # quick run

Reports: one-pass minibatch time (fp64 and mixed precision), the feature-space full-data path,
a pair-by-pair loop on a few pairs extrapolated to all R(R-1)/2 pairs, and the agreement between
the methods on those pairs. Results go to stdout as a markdown table (and JSON with --json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from repdyn.analysis import similarity as S


def make_features(n: int, blocks: int, ts: int, dim: int, latent: int = 64, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, latent), dtype=np.float32)
    reps = []
    for b in range(blocks):
        wb = rng.standard_normal((latent, dim), dtype=np.float32) / np.sqrt(latent)
        for t in range(ts):
            noise_level = 0.3 + 1.5 * t / max(ts - 1, 1)
            x = z @ (wb + 0.3 * rng.standard_normal((latent, dim), dtype=np.float32) / np.sqrt(latent))
            x += noise_level * rng.standard_normal((n, dim), dtype=np.float32)
            reps.append(x)
    return reps


def pair_minibatch(x: np.ndarray, y: np.ndarray, batch: int) -> float:
    """The naive way (torch_cka style): both Grams rebuilt for every pair and batch."""
    acc = S.MinibatchCKA(debiased=True)
    for s in S.batch_slices(len(x), batch):
        acc.update([x[s], y[s]])
    return float(acc.compute()[0, 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--blocks", type=int, default=12)
    ap.add_argument("--ts", type=int, default=8)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--pairs", type=int, default=4, help="pairs timed in the pair-by-pair loop")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-mixed", action="store_true")
    ap.add_argument("--feature-reps", type=int, default=16, help="reps for the feature-space matrix (extrapolated)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    reps = make_features(args.n, args.blocks, args.ts, args.dim)
    r = len(reps)
    n_pairs = r * (r - 1) // 2
    print(f"features: {r} reps x ({args.n}, {args.dim}) float32 = {r * args.n * args.dim * 4 / 2**30:.2f} GiB, "
          f"made in {time.perf_counter() - t0:.1f} s", flush=True)
    res: dict[str, float | int | str] = {"n": args.n, "reps": r, "dim": args.dim, "batch": args.batch,
                                         "threads": args.threads, "torch": torch.__version__,
                                         "cpu": platform.processor() or platform.machine()}

    t0 = time.perf_counter()
    m = S.cka_matrix(reps, debiased=True, method="minibatch", batch_size=args.batch)
    res["one_pass_fp64_s"] = time.perf_counter() - t0
    print(f"one-pass minibatch (fp64): {res['one_pass_fp64_s']:.1f} s", flush=True)

    if not args.skip_mixed:
        t0 = time.perf_counter()
        m_mixed = S.cka_matrix(reps, debiased=True, method="minibatch", batch_size=args.batch, precision="mixed")
        res["one_pass_mixed_s"] = time.perf_counter() - t0
        res["mixed_vs_fp64_max_abs"] = float(np.abs(m_mixed - m).max())
        print(f"one-pass minibatch (fp32 Grams, fp64 HSIC): {res['one_pass_mixed_s']:.1f} s, "
              f"max |diff| vs fp64 {res['mixed_vs_fp64_max_abs']:.1e}", flush=True)

    k = min(args.feature_reps, r)
    t0 = time.perf_counter()
    m_feat = S.cka_matrix(reps[:k], debiased=True, method="feature")
    el = time.perf_counter() - t0
    res["feature_space_reps"] = k
    res["feature_space_full_s"] = el * (r / k) ** 2          # cost grows with R^2 (each pair O(n d^2))
    res["minibatch_vs_full_max_abs"] = float(np.abs(m[:k, :k] - m_feat).max())
    print(f"feature-space full-data matrix on {k} reps: {el:.1f} s -> {res['feature_space_full_s']:.0f} s for all; "
          f"minibatch vs full-data max |diff| {res['minibatch_vs_full_max_abs']:.3f}", flush=True)

    rng = np.random.default_rng(1)
    pairs = [tuple(rng.choice(r, 2, replace=False)) for _ in range(args.pairs)]
    t0 = time.perf_counter()
    loop_vals = [pair_minibatch(reps[i], reps[j], args.batch) for i, j in pairs]
    per_pair = (time.perf_counter() - t0) / len(pairs)
    res["pair_loop_s_per_pair"] = per_pair
    res["pair_loop_extrapolated_s"] = per_pair * n_pairs
    res["one_pass_vs_loop_max_abs"] = float(max(abs(v - m[i, j]) for v, (i, j) in zip(loop_vals, pairs)))
    print(f"pair-by-pair minibatch loop: {per_pair:.2f} s/pair -> {per_pair * n_pairs:.0f} s for {n_pairs} pairs; "
          f"max |diff| vs one-pass {res['one_pass_vs_loop_max_abs']:.1e}", flush=True)

    t0 = time.perf_counter()
    for i, j in pairs:
        S.feature_space_linear_cka(reps[i], reps[j], debiased=True)
    per_pair_f = (time.perf_counter() - t0) / len(pairs)
    res["pair_feature_s_per_pair"] = per_pair_f
    res["pair_feature_extrapolated_s"] = per_pair_f * n_pairs
    print(f"pair-by-pair feature-space loop: {per_pair_f:.2f} s/pair -> {per_pair_f * n_pairs:.0f} s", flush=True)

    off = m[~np.eye(r, dtype=bool)]
    res["cka_offdiag_min"], res["cka_offdiag_max"] = float(off.min()), float(off.max())
    print("\n| method | time (s) |\n|---|---|")
    print(f"| one pass, stacked minibatch, fp64 | {res['one_pass_fp64_s']:.1f} |")
    if "one_pass_mixed_s" in res:
        print(f"| one pass, stacked minibatch, fp32 Grams + fp64 HSIC | {res['one_pass_mixed_s']:.1f} |")
    print(f"| feature space, full data, exact (extrapolated from {k} reps) | {res['feature_space_full_s']:.0f} |")
    print(f"| pair loop, minibatch (extrapolated, {n_pairs} pairs) | {res['pair_loop_extrapolated_s']:.0f} |")
    print(f"| pair loop, feature space (extrapolated) | {res['pair_feature_extrapolated_s']:.0f} |")
    if hasattr(os, "getloadavg"):
        res["loadavg_1min_end"] = os.getloadavg()[0]
        print(f"load average at the end: {res['loadavg_1min_end']:.1f}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
