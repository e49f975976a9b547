"""Benchmark: `probe align` / `probe spatial` measures at the papers' size (not a test).

The papers' grid is SiT-XL/2: 28 blocks x 8 t, n = 10 000 images, D = 1152 against a DINOv2-B
encoder (D = 768), 16 x 16 patch tokens. Synthetic features stand in for the cache. A few cells are
measured and the whole grid extrapolated (the cost is linear in cells once the encoder's
neighbourhood is computed); peak resident memory is read from the process.

    .venv/bin/python bench/bench_align.py                    # n = 10 000, D = 1152 vs 768, 2 cells
    .venv/bin/python bench/bench_align.py --n 2000 --cells 2 # quick run
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from repdyn.analysis import alignment as A
from repdyn.analysis import spatial as SP
from repdyn.core.runtime import machine_description, peak_rss_mib


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=1152)
    ap.add_argument("--enc-dim", type=int, default=768)
    ap.add_argument("--cells", type=int, default=2, help="cells measured (the grid is extrapolated)")
    ap.add_argument("--grid-cells", type=int, default=28 * 8)
    ap.add_argument("--spatial-images", type=int, default=256, help="images whose 16x16 tokens are scored")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    latent = rng.standard_normal((args.n, 64)).astype(np.float32)
    y = latent @ rng.standard_normal((64, args.enc_dim)).astype(np.float32)
    cells = {(b, 0.5): latent @ rng.standard_normal((64, args.dim)).astype(np.float32)
             + rng.standard_normal((args.n, args.dim)).astype(np.float32) for b in range(args.cells)}
    t0 = time.perf_counter()
    A.align_cells(y, dict(list(cells.items())[:1]), metrics=("mutual_knn", "cknna"), device=args.device)
    first = time.perf_counter() - t0  # includes the encoder's neighbourhood
    t0 = time.perf_counter()
    A.align_cells(y, cells, metrics=("mutual_knn", "cknna"), device=args.device)
    per_cell = (time.perf_counter() - t0) / args.cells
    tokens = torch.randn(args.spatial_images, 256, args.dim)
    t0 = time.perf_counter()
    for f in (SP.lds, SP.cds, SP.rmsc):
        f(tokens)
    spatial = time.perf_counter() - t0
    out = {"machine": machine_description(), "n": args.n, "dim": args.dim, "enc_dim": args.enc_dim,
           "align_first_cell_s": round(first, 2), "align_per_cell_s": round(per_cell, 2),
           "align_grid_extrapolated_min": round(per_cell * args.grid_cells / 60, 1),
           "spatial_s_per_cell": round(spatial, 2), "spatial_images": args.spatial_images,
           "spatial_grid_extrapolated_min": round(spatial * args.grid_cells / 60, 1),
           "peak_rss_mib": round(peak_rss_mib())}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
