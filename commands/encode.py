"""``probe encode``: an image folder -> SD-VAE latents in the REPA/SRA layout that ``--data latents:PATH``
reads (``vae-sd/<group>/img<index>.npy`` moments (2C, h, w) plus ``vae-sd/dataset.json`` labels).

``SRC/<class>/<image>`` becomes ``OUT/vae-sd``; an ImageNet-style tree ``SRC/train/<class>/...`` and
``SRC/val/<class>/...`` (or ``test/``) becomes ``OUT/vae-sd`` and ``OUT/test/vae-sd``, the test split
``latents:`` expects. Images get ADM's centre crop; ``flip`` adds a horizontally flipped copy of each; ``images`` also
writes each centre-cropped image as ``images/<group>/img<index>.png`` beside ``vae-sd/`` (REPA's
layout, paired with the latents by sorted order: what REPA's image encoder reads).
Finished files are skipped (resume after an interruption); under ``torchrun`` rank r encodes every
world-th image and rank 0 writes ``dataset.json`` once all ranks are done.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from repdyn.datasets.sources import list_class_folders
from repdyn.core.files import atomic_write_bytes, atomic_write_text
from repdyn.core.runtime import init_distributed
from repdyn.evaluation.vae import center_crop_arr, load_vae

__all__ = ["EncodeResult", "run_encode"]

GROUP = 1000  # files per sub-folder, as REPA's preprocessing writes them


@dataclass
class EncodeResult:
    out: Path
    splits: dict[str, int]  # latents folder -> number of files
    encoded: int  # files written by this call over all ranks (the others existed: resumed)
    rank: int = 0  # this process's rank under torchrun (the CLI prints on rank 0 only)


def _split_dirs(src: Path, out: Path) -> list[tuple[Path, Path]]:
    if (src / "train").is_dir():
        pairs = [(src / "train", out / "vae-sd")]
        test = next((src / d for d in ("val", "test") if (src / d).is_dir()), None)
        return pairs + ([(test, out / "test" / "vae-sd")] if test is not None else [])
    return [(src, out / "vae-sd")]


def _listing(root: Path) -> tuple[list[tuple[Path, int]], list[str]]:
    files, classes = list_class_folders(root)
    if not files:
        raise ValueError(f"no images under {root}")
    return files, classes


def _save_npy(path: Path, arr: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, arr)
    atomic_write_bytes(path, buf.getvalue())


def run_encode(src: str | os.PathLike, out: str | os.PathLike, vae: str | os.PathLike, *, resolution: int = 256,
               flip: bool = False, images: bool = False, batch_size: int = 32, device: str = "auto",
               progress: bool = True) -> EncodeResult:
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise FileNotFoundError(f"image folder {src} does not exist")
    if resolution < 8 or resolution % 8:
        raise ValueError(f"--resolution must be a multiple of 8 (256 or 512 for the papers), got {resolution}")
    from PIL import Image

    rank, world = init_distributed(device)
    model = load_vae(vae, device)
    pairs = _split_dirs(src, out)
    listings = [(_listing(s), dst) for s, dst in pairs]
    encoded, sizes = 0, {}
    for (files, classes), dst in listings:
        items = [(f, c, False) for f, c in files] + ([(f, c, True) for f, c in files] if flip else [])
        names = [f"{i // GROUP:05d}/img{i:08d}.npy" for i in range(len(items))]
        img_dir = dst.parent / "images"

        def done(i: int) -> bool:
            return (dst / names[i]).exists() and (not images or (img_dir / names[i]).with_suffix(".png").exists())

        mine = [i for i in range(len(items)) if i % world == rank and not done(i)]
        bar = tqdm(total=len(mine), desc=f"encode {dst}", disable=not progress or rank != 0, unit="img")
        for s in range(0, len(mine), batch_size):
            rows = mine[s: s + batch_size]
            pix = []
            for i in rows:
                f, _, flipped = items[i]
                arr = center_crop_arr(Image.open(f), resolution)
                pix.append(arr[:, ::-1] if flipped else arr)
            x = torch.from_numpy(np.stack(pix).copy()).permute(0, 3, 1, 2).float() / 127.5 - 1.0
            moments = model.encode_moments(x, batch_size).numpy()
            for i, m, arr in zip(rows, moments, pix):
                _save_npy(dst / names[i], m.astype(np.float32))
                if images:
                    buf = io.BytesIO()
                    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG")
                    atomic_write_bytes((img_dir / names[i]).with_suffix(".png"), buf.getvalue())
            encoded += len(rows)
            bar.update(len(rows))
        bar.close()
        if world > 1:
            dist.barrier()
        if rank == 0:
            meta = {"labels": [[n, int(c)] for n, (_, c, _) in zip(names, items)], "class_names": classes,
                    "vae": model.info, "resolution": resolution, "flip": flip, "source": str(src)}
            atomic_write_text(dst / "dataset.json", json.dumps(meta))
        sizes[str(dst)] = len(items)
    if world > 1:
        counts: list[int | None] = [None] * world
        dist.all_gather_object(counts, encoded)  # an object gather works on gloo and NCCL alike
        encoded = sum(c or 0 for c in counts)
    return EncodeResult(out, sizes, encoded, rank)
