"""The GPU check: one run, one JSON. Body of ``bench/gpu_check.sh`` (see there for usage).

Parts (each writes its section; the JSON is rewritten after every part, so a run cut short still
leaves what it measured, with ``"complete": false``):

* ``train``: bf16 training step of SiT-B/2 on 4x32x32 latents (batch 256): ours baseline and SRA
  (``Trainer.train_step``), the official REPA baseline / SRA step when ``--official`` names the
  checkouts (``bench_vs_official.compare``: loss check first, then interleaved timing), and our
  baseline with ``torch.compile`` when time allows;
* ``sra_overhead``: our SRA step / our baseline step;
* ``ddp``: ``torchrun`` on every visible GPU (``Trainer`` under DDP, NCCL), images/s and the
  per-GPU scaling against the single-process step;
* ``extraction``: ``extract_grid`` over every block x 8 t of a random-weight SiT-XL/2 on 4x32x32
  inputs (bf16), cells x images per second;
* ``probe``: the torch probe on those features (all cells), and cuML on a few of the same cells
  against torch on the same cells (skipped with the reason when cuML is missing);
* ``peak_gpu_memory_gb``: per part and overall.

``--dry`` (or ``GPU_CHECK_DRY=1``) runs every part on tiny sizes on the CPU (DDP: 2 gloo
processes) and writes the same keys, so the script is exercised by the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import bench_vs_official as bvo  # noqa: E402

TOP_KEYS = ("mode", "device", "machine", "config", "train", "sra_overhead", "ddp", "extraction", "probe",
            "peak_gpu_memory_gb", "goals", "elapsed_s", "complete")
TRAIN_KEYS = ("model", "batch_size", "precision", "ours_baseline_ms", "ours_baseline_img_per_s", "ours_sra_ms",
              "ours_sra_img_per_s", "official_baseline_ms", "official_sra_ms", "speedup_vs_official",
              "loss_check", "ours_compiled_baseline_ms", "official_skipped", "records")
DDP_KEYS = ("world_size", "backend", "per_rank_batch", "ms_per_step", "img_per_s", "img_per_s_per_rank",
            "scaling_efficiency", "skipped")
EXTRACTION_KEYS = ("model", "n", "blocks", "ts", "cells", "batch_size", "precision", "seconds", "img_cells_per_s",
                   "forward_img_per_s")
PROBE_KEYS = ("cells", "n_train", "n_test", "dim", "torch_s", "torch_cells_per_s", "torch_mean_acc", "cuml_cells",
              "cuml_s", "torch_same_cells_s", "cuml_mean_acc", "max_abs_acc_diff_points", "cuml_skipped")

SIZES = {
    "gpu": dict(train_model="SiT-B/2", train_overrides={}, batch=256, warmup=5, steps=20, precision="bf16",
                ddp_steps=15, ddp_warmup=3, ext_model="SiT-XL/2", ext_overrides={}, ext_n=4096, ext_ts=8,
                ext_batch=256, probe_test=1024, cuml_cells=8, n_files=4096, budget_s=450),
    "dry": dict(train_model="SiT-T/4", train_overrides={"depth": 2, "hidden_size": 32, "num_heads": 2}, batch=4,
                warmup=1, steps=2, precision="fp32", ddp_steps=2, ddp_warmup=1, ext_model="SiT-XL/2",
                ext_overrides={"depth": 2, "hidden_size": 32, "num_heads": 2}, ext_n=24, ext_ts=2, ext_batch=16,
                probe_test=8, cuml_cells=2, n_files=24, budget_s=50),
}


def _reset_peak(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)


def _peak(dev: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None


def _slim(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k != "profile"}


# ----------------------------------------------------------------------------------------------
# Parts
# ----------------------------------------------------------------------------------------------


def part_train(sz: dict, officials: list, dev: torch.device, data_dir: Path, deadline: float, compile_ok: bool,
               peaks: dict) -> tuple[dict, dict]:
    out = {k: None for k in TRAIN_KEYS}
    out.update(model=sz["train_model"], batch_size=sz["batch"], precision=sz["precision"], records={},
               speedup_vs_official={}, loss_check={})
    reasons = []
    for method in ("baseline", "sra"):
        off, why = bvo.pick_official(officials, method) if officials else (None, "no --official given")
        if off is None:
            reasons.append(f"{method}: {why}")
        _reset_peak(dev)
        rec = bvo.compare(sz["train_model"], method, off, batch_size=sz["batch"], precision=sz["precision"],
                          device=str(dev), warmup=sz["warmup"], steps=sz["steps"], data_dir=data_dir,
                          overrides=sz["train_overrides"])
        peaks[f"train_{method}"] = _peak(dev)
        out["records"][method] = _slim(rec)
        out[f"ours_{method}_ms"] = rec["ours_ms"]
        out[f"ours_{method}_img_per_s"] = rec["ours_img_per_s"]
        if "official_ms" in rec:
            out[f"official_{method}_ms"] = rec["official_ms"]
            out["speedup_vs_official"][method] = rec["official_ms"] / rec["ours_ms"]
            out["loss_check"][method] = rec.get("loss_check")
    out["official_skipped"] = "; ".join(reasons) or None
    if compile_ok and time.time() < deadline - 180:
        _reset_peak(dev)
        try:
            rec = bvo.compare(sz["train_model"], "baseline", None, batch_size=sz["batch"], precision=sz["precision"],
                              device=str(dev), warmup=sz["warmup"], steps=sz["steps"], data_dir=data_dir,
                              overrides=sz["train_overrides"], compile_ours=True)
            out["ours_compiled_baseline_ms"] = rec["ours_ms"]
            peaks["train_compiled"] = _peak(dev)
        except Exception as e:  # noqa: BLE001 - a compile failure is a result, not a crash of the check
            out["ours_compiled_baseline_ms"] = None
            out["compile_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    else:
        out["compile_skipped"] = "dry mode" if not compile_ok else "not enough time left"
    sra = {"ours_baseline_ms": out["ours_baseline_ms"], "ours_sra_ms": out["ours_sra_ms"],
           "ratio": out["ours_sra_ms"] / out["ours_baseline_ms"],
           "blocks": out["records"]["sra"].get("blocks"), "goal": "<= 1.10 on a GPU"}
    return out, sra


def part_ddp(sz: dict, dev: torch.device, data_dir: Path, single_img_per_s: float, dry: bool, deadline: float) -> dict:
    out = {k: None for k in DDP_KEYS}
    world = torch.cuda.device_count() if dev.type == "cuda" else 2
    out.update(world_size=world, backend="nccl" if dev.type == "cuda" else "gloo", per_rank_batch=sz["batch"])
    if world < 1:
        out["skipped"] = "no GPU visible"
        return out
    with tempfile.TemporaryDirectory() as tmp:
        res_path = Path(tmp) / "ddp.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
               str(Path(__file__).resolve()), "--ddp-worker", "--data", str(data_dir), "--json", str(res_path),
               "--device", "cuda" if dev.type == "cuda" else "cpu"] + (["--dry"] if dry else [])
        env = dict(os.environ, OMP_NUM_THREADS="1")
        failures = []
        for attempt in range(2):  # one retry: a rendezvous can fail transiently on a busy machine
            timeout = max(30.0, deadline - time.time())
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=str(ROOT))
            except subprocess.TimeoutExpired:
                out["skipped"] = f"torchrun did not finish in {timeout:.0f} s"
                return out
            if proc.returncode == 0 and res_path.exists():
                break
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            failures.append(f"rc {proc.returncode}: {' | '.join(tail)[:400]}")
        else:
            out["skipped"] = "torchrun failed twice: " + " || ".join(failures)
            return out
        out["failed_attempts"] = failures
        res = json.loads(res_path.read_text())
    out.update(res)
    out["img_per_s_per_rank"] = out["img_per_s"] / world
    out["scaling_efficiency"] = out["img_per_s_per_rank"] / single_img_per_s if single_img_per_s else None
    if world == 1:
        out["note"] = "one GPU visible: torchrun with one process, the DDP wrapper is not used"
    return out


def ddp_worker(args) -> None:
    """One torchrun rank: Trainer (DDP when world > 1) on the shared latents folder."""
    from repdyn.training.config import TrainConfig
    from repdyn.training.trainer import Trainer

    sz = SIZES["dry" if args.dry else "gpu"]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = TrainConfig(model=sz["train_model"], model_overrides=sz["train_overrides"], method="baseline",
                          data=f"latents:{args.data}", batch_size=sz["batch"] * world, steps=10**6,
                          device=args.device, precision=sz["precision"], out=tmp, seed=0)
        tr = Trainer(cfg, quiet=True)
        tr.model.train()
        batches = tr._batches()
        for _ in range(sz["ddp_warmup"]):
            tr.train_step(batches)
        times = []
        for _ in range(sz["ddp_steps"]):
            bvo._sync(tr.device)
            t0 = time.perf_counter()
            tr.train_step(batches)
            bvo._sync(tr.device)
            times.append(time.perf_counter() - t0)
        med = float(np.median(times))
        if tr.world > 1:
            t = torch.tensor([med], device=tr.device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            med = float(t)
        if tr.rank == 0:
            Path(args.json).write_text(json.dumps({"ms_per_step": med * 1000, "img_per_s": cfg.batch_size / med,
                                                   "steps": sz["ddp_steps"], "ddp_wrapped": tr.world > 1,
                                                   "peak_gpu_memory_gb_rank0": _peak(tr.device)}))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def part_extraction(sz: dict, dev: torch.device, data_dir: Path, peaks: dict):
    from repdyn.probe.grid import extract_grid
    from repdyn.model.checkpoint import LoadedCheckpoint
    from repdyn.datasets.sources import make_dataset
    from repdyn.model.backbone import DiffusionTransformer, model_config
    from repdyn.model.objectives import make_objective

    ds = make_dataset(f"latents:{data_dir}", "train", holdout_cut=False)
    cfg = model_config(sz["ext_model"], in_channels=ds.channels, input_size=ds.image_size,
                       num_classes=ds.num_classes, **sz["ext_overrides"])
    torch.manual_seed(0)
    model = DiffusionTransformer(cfg)
    bvo.perturb_(model, 0)
    model = model.eval().requires_grad_(False).to(dev)
    ck = LoadedCheckpoint(model=model, weights="ema", meta={"family": "sit", "time_convention": "flow-t1-noise",
                                                            "model_name": sz["ext_model"]},
                          config={}, objective=make_objective("sit"), path=Path("random"), sha="gpu-check", step=0)
    n = min(sz["ext_n"], len(ds))
    ts = [round(i / sz["ext_ts"], 4) for i in range(sz["ext_ts"])]
    blocks = list(range(1, cfg.depth + 1))
    precision = "bf16" if dev.type == "cuda" else "fp32"
    idx = np.arange(n)
    extract_grid(ck, ds, blocks=blocks, ts=ts[:1], indices=idx[: sz["ext_batch"]], batch_size=sz["ext_batch"],
                 device=dev, precision=precision, progress=False)  # warm-up
    _reset_peak(dev)
    bvo._sync(dev)
    t0 = time.perf_counter()
    g = extract_grid(ck, ds, blocks=blocks, ts=ts, indices=idx, batch_size=sz["ext_batch"], device=dev,
                     precision=precision, progress=False)
    bvo._sync(dev)
    sec = time.perf_counter() - t0
    peaks["extraction"] = _peak(dev)
    out = {"model": sz["ext_model"], "overrides": sz["ext_overrides"] or None, "depth": cfg.depth,
           "hidden_size": cfg.hidden_size, "tokens": cfg.num_tokens, "input": [cfg.in_channels, 32, 32], "n": n,
           "blocks": len(blocks), "ts": ts, "cells": len(blocks) * len(ts), "batch_size": sz["ext_batch"],
           "precision": precision, "seconds": sec, "img_cells_per_s": n * len(blocks) * len(ts) / sec,
           "forward_img_per_s": n * len(ts) / sec, "weights": "random (perturbed init)"}
    return out, g


def part_probe(sz: dict, dev: torch.device, g, peaks: dict, deadline: float) -> dict:
    from repdyn.probe.probes import fit_probes

    out = {k: None for k in PROBE_KEYS}
    x = g.stack()  # (cells, N, D), t-major
    y = np.asarray(g.labels)
    n_test = sz["probe_test"]
    xtr, ytr, xte, yte = x[:, :-n_test], y[:-n_test], x[:, -n_test:], y[-n_test:]
    out.update(cells=int(x.shape[0]), n_train=int(xtr.shape[1]), n_test=int(n_test), dim=int(x.shape[2]))
    pdev = str(dev)
    fit_probes(xtr[:1], ytr, xte[:1], yte, "torch", device=pdev)  # warm-up
    _reset_peak(dev)
    bvo._sync(dev)
    t0 = time.perf_counter()
    rt = fit_probes(xtr, ytr, xte, yte, "torch", device=pdev)
    bvo._sync(dev)
    out["torch_s"] = time.perf_counter() - t0
    peaks["probe"] = _peak(dev)
    out["torch_cells_per_s"] = out["cells"] / out["torch_s"]
    out["torch_mean_acc"] = float(rt.accuracy.mean())
    k = min(sz["cuml_cells"], out["cells"])
    out["cuml_cells"] = k
    sel = np.linspace(0, out["cells"] - 1, k).round().astype(int)
    if dev.type != "cuda":
        out["cuml_skipped"] = "no CUDA device (dry mode): cuML needs a GPU"
    elif time.time() > deadline - 45:
        out["cuml_skipped"] = "not enough time left"
    else:
        try:
            import cuml  # type: ignore[import-not-found]  # noqa: F401
        except ImportError:
            out["cuml_skipped"] = "cuML is not installed (pip install 'repdyn[cuml]' on a CUDA 12 machine)"
    if out["cuml_skipped"] is None:
        t0 = time.perf_counter()
        rts = fit_probes(xtr[sel], ytr, xte[sel], yte, "torch", device=pdev)
        bvo._sync(dev)
        out["torch_same_cells_s"] = time.perf_counter() - t0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            rc = fit_probes(xtr[sel], ytr, xte[sel], yte, "cuml", device=pdev)
            out["cuml_s"] = time.perf_counter() - t0
        out["cuml_mean_acc"] = float(rc.accuracy.mean())
        out["max_abs_acc_diff_points"] = float(100 * np.abs(rts.accuracy - rc.accuracy).max())
        out["speedup_torch_vs_cuml"] = out["cuml_s"] / out["torch_same_cells_s"]
    return out


# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry", action="store_true", default=os.environ.get("GPU_CHECK_DRY", "") not in ("", "0"),
                    help="tiny sizes on the CPU (also GPU_CHECK_DRY=1)")
    ap.add_argument("--official", action="append", default=[], metavar="PATH", help="REPA and/or SRA checkout")
    ap.add_argument("--out", default="gpu_check.json", help="the JSON to write")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile timing")
    ap.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--data", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--device", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.ddp_worker:
        ddp_worker(args)
        return 0
    start = time.time()
    mode = "dry" if args.dry else "gpu"
    sz = SIZES[mode]
    deadline = start + sz["budget_s"]
    if args.dry:
        torch.set_num_threads(min(2, os.cpu_count() or 1))
        dev = torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            print("error: no CUDA device; run with --dry (or GPU_CHECK_DRY=1) for the CPU dry mode", file=sys.stderr)
            return 2
        dev = torch.device("cuda:0")
    try:
        officials = [bvo.load_official(p) for p in args.official]
    except bvo.OfficialCodeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out_path = Path(args.out)
    res: dict = {k: None for k in TOP_KEYS}
    peaks: dict = {}
    res.update(mode=mode, device=str(dev), machine=bvo.machine(), complete=False,
               config={k: v for k, v in sz.items()}, peak_gpu_memory_gb=peaks,
               goals={"official_speedup_bf16": ">= 1.3 (official ms / ours ms, per method)",
                      "sra_overhead_gpu": "<= 1.10", "met": None})

    def write():
        res["elapsed_s"] = time.time() - start
        tmp = out_path.with_suffix(out_path.suffix + ".tmp")
        tmp.write_text(json.dumps(res, indent=2, default=str))
        os.replace(tmp, out_path)

    write()
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = bvo.make_latents(Path(tmp) / "latents", sz["n_files"])
        print(f"[gpu_check {mode}] train ...", file=sys.stderr, flush=True)
        res["train"], res["sra_overhead"] = part_train(sz, officials, dev, data_dir, deadline,
                                                       compile_ok=not args.dry and not args.no_compile, peaks=peaks)
        write()
        print(f"[gpu_check {mode}] ddp ...", file=sys.stderr, flush=True)
        res["ddp"] = part_ddp(sz, dev, data_dir, res["train"]["ours_baseline_img_per_s"], args.dry,
                              deadline=start + sz["budget_s"] * 0.8)
        write()
        print(f"[gpu_check {mode}] extraction ...", file=sys.stderr, flush=True)
        res["extraction"], grid = part_extraction(sz, dev, data_dir, peaks)
        write()
        print(f"[gpu_check {mode}] probe ...", file=sys.stderr, flush=True)
        res["probe"] = part_probe(sz, dev, grid, peaks, deadline)
        del grid
    sp = res["train"]["speedup_vs_official"]
    res["goals"]["met"] = ({m: v >= 1.3 for m, v in sp.items()} if sp else None)
    peaks["max"] = max((v for v in peaks.values() if isinstance(v, float)), default=None)
    res["complete"] = True
    write()
    print(json.dumps({"out": str(out_path), "elapsed_s": round(res["elapsed_s"], 1), "mode": mode}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
