"""Benchmarks (2) and (3) for grid extraction.

(2) overhead: wall time of ``extract_grid`` (data, shared noise, hooks, pooling, early stop,
    writing cells) divided by T x the time of a bare forward that stops at the deepest block
    (``model.block_features`` on ready-made inputs). Goal <= 1.15.
(3) memory: peak anonymous-RSS growth of an extraction into the fp16 cache at two dataset
    sizes, each in a fresh subprocess, with full-token cells by default (so the cells are large).
    Goal: flat (the cache is filled through memory maps).

    python bench/bench_extraction.py --model SiT-T/4 --n 1024 --ts 5 --mem-sizes 2000 8000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from repdyn.probe.cache import FeatureCache
from repdyn.probe.grid import extract_grid, grid_noise, sample_indices
from repdyn.model.checkpoint import LoadedCheckpoint
from repdyn.datasets.sources import make_dataset
from repdyn.model.backbone import build_model
from repdyn.model.objectives import make_objective


def make_ck(name: str) -> LoadedCheckpoint:
    """A randomly initialised model with non-trivial blocks (adaLN-Zero would make them identities)."""
    torch.manual_seed(0)
    model = build_model(name, input_size=32, in_channels=1, num_classes=10).eval().requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    fam = model.config.family
    meta = {"family": fam, "time_convention": "flow-t1-noise" if fam == "sit" else "ddpm-t999-noisiest",
            "model_name": name, "num_timesteps": 1000}
    return LoadedCheckpoint(model=model, weights="ema", meta=meta, config={}, objective=make_objective(fam),
                            path=__import__("pathlib").Path(f"random-{name.replace('/', '_')}"), sha=f"bench-{name}",
                            step=0)


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def overhead(args) -> dict:
    ck = make_ck(args.model)
    ds = make_dataset("fashion-mnist", "train")
    ts = [round(0.9 * i / max(1, args.ts - 1), 3) for i in range(args.ts)]
    blocks = list(range(1, ck.model.depth + 1))
    idx = sample_indices(len(ds), args.n, 0, "train")
    # warm-up
    extract_grid(ck, ds, blocks=blocks, ts=ts[:1], indices=idx[: args.batch_size], batch_size=args.batch_size,
                 progress=False)
    best_bare, best_ext = float("inf"), float("inf")
    for _ in range(args.repeats):
        # bare: inputs prepared outside the timer, one stopping forward per (batch, t)
        batches = []
        for s in range(0, len(idx), args.batch_size):
            rows = idx[s : s + args.batch_size]
            x0 = ds.get_batch(torch.as_tensor(rows))[0]
            eps = grid_noise(rows, (1, 32, 32), 0, "train")
            batches.append((x0, eps))
        y = torch.full((args.batch_size,), 10)
        t0 = time.perf_counter()
        with torch.inference_mode():
            for t in ts:
                for x0, eps in batches:
                    tt = torch.full((len(x0),), t)
                    ck.model.block_features(ck.objective.corrupt(x0, tt, eps), tt, y[: len(x0)], blocks)
        best_bare = min(best_bare, time.perf_counter() - t0)
        t0 = time.perf_counter()
        extract_grid(ck, ds, blocks=blocks, ts=ts, indices=idx, batch_size=args.batch_size, progress=False)
        best_ext = min(best_ext, time.perf_counter() - t0)
    return {"model": args.model, "n": len(idx), "T": len(ts), "blocks": len(blocks), "batch_size": args.batch_size,
            "bare_forward_s": best_bare, "extract_s": best_ext, "ratio": best_ext / best_bare}


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def memory_child(n: int, model: str, cache_dir: str, pooling: str) -> dict:
    """Peak anonymous RSS (sampled every 20 ms) and peak total RSS during one cached extraction.

    Anonymous memory is what a growing dataset would blow up; file-backed pages of the memory
    maps also show in total RSS but are page cache the kernel can drop.
    """
    import threading

    ck = make_ck(model)
    ds = make_dataset("fashion-mnist", "train")
    base_anon = _status_mb("RssAnon")
    peak = {"anon": base_anon}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak["anon"] = max(peak["anon"], _status_mb("RssAnon"))
            time.sleep(0.02)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    extract_grid(ck, ds, ts=[0.5], n_samples=n, batch_size=256, pooling=pooling, cache=FeatureCache(cache_dir),
                 progress=False)
    stop.set()
    th.join()
    hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cache_mb = sum(p.stat().st_size for p in __import__("pathlib").Path(cache_dir).rglob("*.npy")) / 2**20
    return {"n": n, "pooling": pooling, "cache_on_disk_mb": round(cache_mb, 1),
            "anon_rss_before_mb": round(base_anon, 1), "anon_rss_peak_mb": round(peak["anon"], 1),
            "anon_growth_mb": round(peak["anon"] - base_anon, 1), "peak_total_rss_mb": round(hwm, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="SiT-T/4")
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--ts", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--mem-sizes", type=int, nargs="*", default=[2000, 8000])
    ap.add_argument("--mem-pooling", default="tokens", help="pooling of the memory runs (tokens: big cells)")
    ap.add_argument("--skip-overhead", action="store_true")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--cache-dir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child is not None:
        print(json.dumps(memory_child(args.child, args.model, args.cache_dir, args.mem_pooling)))
        return
    out = {"machine": f"{platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
                      f"threads {torch.get_num_threads()}"}
    if not args.skip_overhead:
        out["overhead"] = overhead(args)
    mem = []
    for n in args.mem_sizes:
        with tempfile.TemporaryDirectory() as d:
            cmd = [sys.executable, __file__, "--child", str(n), "--model", args.model, "--cache-dir", d,
                   "--mem-pooling", args.mem_pooling]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True)
            mem.append(json.loads(res.stdout.strip().splitlines()[-1]))
    out["memory"] = mem
    print(json.dumps(out))


if __name__ == "__main__":
    main()
