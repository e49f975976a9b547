"""Block x timestep feature extraction with common random numbers and an optional cache.

For every t of the grid and every batch of images: corrupt x0 with the *same* noise
``eps_i`` (common random numbers), run one forward that captures every requested block
(pooled inside the hook) and stops after the deepest one. The noise for image ``i`` of split
``s`` is drawn from a generator seeded by ``(seed, s, "eps", i)`` (:mod:`repdyn.core.runtime`), so it is identical across t,
across checkpoints, across batch sizes and across ranks: differences between cells come from
the model, not from the draw.

Time: rows always carry *our* t (SiT: float in [0, 1], 1 = noise; DiT: integer step 0..T-1,
T-1 noisiest) and the canonical ``log_snr``. Foreign SiT checkpoints trained with t = 0 as
noise (willisma/SiT) get ``flow.model_time(t)`` as their input; the corruption itself always
uses our convention.

Loop order: t outer, batches inner. Every cell of one t is finished before the next t starts,
so the cache (one file per cell, committed atomically) resumes an interrupted run at the last
finished t. Under ``torchrun`` the sample list is split into contiguous shards, one per rank,
and rank 0 gathers and writes.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from repdyn.model.flow import model_time
from repdyn.core.noise import NOISE_SCHEME, noise_bank, sample_seed
from repdyn.core.runtime import dist_world, resolve_device, shard_bounds

from repdyn.probe.cache import FeatureCache, LazyFeatures
from repdyn.probe.hooks import BlockCapture, parse_pooling, pooled_dim

__all__ = ["GridFeatures", "extract_grid", "default_ts", "validate_ts", "sample_indices", "grid_noise", "load_x0",
           "validate_blocks", "LABEL_POLICIES"]

LABEL_POLICIES = ("null", "class")


@dataclass
class GridFeatures:
    """Result of :func:`extract_grid` (the contract ``analysis/`` consumes).

    ``features[(block, t)]``: float32 (N, D) for pooled features, (N, T, D) for ``tokens``
    (a lazy mapping over the cache when one was used). ``tokens[(block, t)]``: full tokens of the
    first ``keep_tokens`` images (only if asked). ``indices``: the dataset rows used, in order.
    """

    features: "dict[tuple[int, float | int], np.ndarray] | LazyFeatures"
    labels: np.ndarray
    blocks: list[int]
    ts: list
    log_snr: dict
    meta: dict
    indices: np.ndarray
    tokens: dict = field(default_factory=dict)

    def stack(self, cells: Sequence[tuple] | None = None) -> np.ndarray:
        """(cells, N, D) float32 array of the given cells (default: blocks x ts, t-major)."""
        cells = list(cells) if cells is not None else [(b, t) for t in self.ts for b in self.blocks]
        return np.stack([np.asarray(self.features[c], dtype=np.float32) for c in cells])


# ---------------------------------------------------------------------------------------------
# Grids, validation, sample sets, noise
# ---------------------------------------------------------------------------------------------


def default_ts(family: str, num_timesteps: int = 1000) -> list:
    """SiT: 0.0, 0.1, ..., 0.9 (t = 1 is pure noise, nothing to probe). DiT: 0, 100, ..., 900."""
    if family == "sit":
        return [round(0.1 * i, 1) for i in range(10)]
    if family == "dit":
        step = max(1, num_timesteps // 10)
        return list(range(0, num_timesteps, step))[:10]
    raise ValueError(f"unknown family {family!r}")


def validate_ts(ts: Sequence, family: str, num_timesteps: int = 1000) -> list:
    """Check the grid against the family's range; returns floats (SiT) or ints (DiT), deduplicated."""
    if ts is None or len(ts) == 0:
        raise ValueError("the timestep grid is empty")
    out = []
    for t in ts:
        tf = float(t)
        if not math.isfinite(tf):
            raise ValueError(f"t={t} is not a finite number")
        if family == "sit":
            if not 0.0 <= tf <= 1.0:
                raise ValueError(f"t={t} is outside the SiT range [0, 1] (t = 1 is pure noise)")
            out.append(round(tf, 6))
        else:
            if tf != int(tf) or not 0 <= tf <= num_timesteps - 1:
                raise ValueError(f"t={t} is not a DiT step: use integers in 0..{num_timesteps - 1} "
                                 f"({num_timesteps - 1} noisiest)")
            out.append(int(tf))
    seen: list = []
    for t in out:
        if t not in seen:
            seen.append(t)
    return seen


def validate_blocks(blocks: Sequence[int] | None, depth: int) -> list[int]:
    """Sorted unique blocks; ``None`` = every transformer block 1..depth. Block 0 is the input
    embedding (patch + position embedding, the stream entering block 1): the floor of a profile."""
    if blocks is None:
        return list(range(1, depth + 1))
    blocks = sorted(set(int(b) for b in blocks))
    if not blocks:
        raise ValueError("no blocks requested")
    bad = [b for b in blocks if not 0 <= b <= depth]
    if bad:
        raise ValueError(f"block {bad[0]} is out of range: this model has blocks 1..{depth} (1-based; 0 = the "
                         "input embedding)")
    return blocks


def sample_indices(n_total: int, n_samples: int | None, seed: int, split: str) -> np.ndarray:
    """The first ``n_samples`` of a permutation seeded by (seed, split), sorted.

    A prefix of a fixed permutation: growing ``n_samples`` keeps every earlier image (and, since
    noise is keyed by the image index, its noise), so sizes are nested.
    """
    if n_total < 1:
        raise ValueError(f"the {split} split is empty")
    if n_samples is None or n_samples >= n_total:
        return np.arange(n_total)
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    rng = np.random.default_rng(sample_seed(seed, split, "subset"))
    return np.sort(rng.permutation(n_total)[:n_samples])


def grid_noise(indices: Sequence[int], shape: tuple[int, ...], seed: int, split: str) -> torch.Tensor:
    """The extraction noise eps of images ``indices`` of ``split`` (stream ``(split, "eps")``)."""
    return noise_bank(indices, shape, seed, split, "eps")


def load_x0(dataset, idx: np.ndarray, seed: int, split: str) -> torch.Tensor:
    """Model-space images for rows ``idx``; latent posterior draws are per-sample seeded too."""
    x, _ = dataset.get_batch(torch.as_tensor(idx, dtype=torch.long))
    x = x.float()
    if getattr(dataset, "latent_scale", None) is not None:
        g = torch.Generator()
        rows = []
        for row, i in enumerate(idx):
            g.manual_seed(sample_seed(seed, split, "posterior", int(i)))
            rows.append(dataset.finalize(x[row : row + 1], g))
        x = torch.cat(rows)
    else:
        x = dataset.finalize(x, None)
    return x


def _labels_of(dataset, idx: np.ndarray) -> np.ndarray:
    labels = getattr(dataset, "labels", None)
    if labels is not None:
        return np.asarray(torch.as_tensor(labels)[torch.as_tensor(idx, dtype=torch.long)], dtype=np.int64)
    return np.asarray(dataset.get_batch(torch.as_tensor(idx))[1], dtype=np.int64)


def _t_key(t) -> str:
    return str(int(t)) if isinstance(t, (int, np.integer)) else f"{float(t):.6g}"


def _gather_rows(local: np.ndarray, n: int, world: int, device: torch.device) -> np.ndarray | None:
    """All-gather contiguous shards (padded to equal size) -> the full (n, ...) array on rank 0."""
    rank = dist.get_rank()
    sizes = [shard_bounds(n, r, world) for r in range(world)]
    cap = max(hi - lo for lo, hi in sizes)
    t = torch.zeros((cap, *local.shape[1:]), dtype=torch.float32, device=device)
    t[: len(local)] = torch.from_numpy(np.ascontiguousarray(local, dtype=np.float32)).to(device)
    bufs = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(bufs, t)
    if rank != 0:
        return None
    return np.concatenate([b[: hi - lo].cpu().numpy() for b, (lo, hi) in zip(bufs, sizes)])


# ---------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------


def _check_compat(ck, dataset, label_policy: str) -> None:
    cfg = ck.model.config
    shape_data = (dataset.channels, dataset.image_size, dataset.image_size)
    shape_model = (cfg.in_channels, cfg.input_size, cfg.input_size)
    if shape_data != shape_model:
        raise ValueError(f"checkpoint {getattr(ck, 'path', '?')} expects inputs of shape {shape_model} but data "
                         f"{getattr(dataset, 'name', '?')} gives {shape_data}: use data of the matching kind "
                         "(pixels vs latents, size, channels)")
    if label_policy not in LABEL_POLICIES:
        raise ValueError(f"label policy must be one of {LABEL_POLICIES}, got {label_policy!r}")
    if label_policy == "class" and dataset.num_classes > cfg.num_classes:
        raise ValueError(f"--label class feeds true labels, but the data has {dataset.num_classes} classes and the "
                         f"checkpoint knows {cfg.num_classes}; use --label null")


def extract_grid(ck, dataset, blocks: Sequence[int] | None = None, ts: Sequence | None = None,
                 n_samples: int | None = None, label_policy: str = "null", pooling: str = "mean",
                 batch_size: int = 256, seed: int = 0, device: str | torch.device = "cpu",
                 cache: FeatureCache | None = None, *, split: str | None = None,
                 indices: Sequence[int] | None = None, keep_tokens: int = 0, precision: str = "auto",
                 progress: bool = True) -> GridFeatures:
    """Features of every (block, t) cell for ``n_samples`` images of ``dataset``.

    ``ck``: a :class:`repdyn.model.checkpoint.LoadedCheckpoint` (EMA or online weights).
    ``dataset``: a dataset from ``make_dataset`` (its ``split`` is used for the noise keys).
    ``label_policy``: ``"null"`` (default; no label leakage) or ``"class"`` (true labels).
    ``pooling``: ``mean`` | ``tokens`` | ``spatialK``. ``precision``: ``auto`` (bf16 autocast on
    CUDA, fp32 on CPU) | ``fp32`` | ``bf16``. ``cache``: finished cells are read, not recomputed.
    """
    family = ck.family
    model = ck.model
    nT = ck.num_timesteps
    blocks = validate_blocks(blocks, model.depth)
    ts = validate_ts(ts if ts is not None else default_ts(family, nT), family, nT)
    parse_pooling(pooling)
    _check_compat(ck, dataset, label_policy)
    split = split or getattr(dataset, "split", "train")
    if len(dataset) == 0:
        raise ValueError(f"the {split} split of {getattr(dataset, 'name', 'the data')} is empty")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    if indices is not None:
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size == 0:
            raise ValueError("no sample indices given")
        if idx.min() < 0 or idx.max() >= len(dataset):
            raise ValueError(f"sample index out of range for a split of {len(dataset)} images")
    else:
        idx = sample_indices(len(dataset), n_samples, seed, split)
    n = len(idx)
    dev = resolve_device(device)
    if precision == "auto":
        precision = "bf16" if dev.type == "cuda" else "fp32"
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be auto, fp32 or bf16, got {precision!r}")
    conv = ck.time_convention
    rank, world = dist_world()

    labels = _labels_of(dataset, idx)
    log_snr = {t: float(ck.objective.log_snr(torch.tensor([t], dtype=torch.float64 if family == "sit" else torch.long))[0])
               for t in ts}
    hidden = model.config.hidden_size
    n_tok = model.config.num_tokens
    dim = pooled_dim(pooling, hidden)
    cell_shape = (n, n_tok, dim) if pooling == "tokens" else (n, dim)
    indices_sha = hashlib.sha256(np.ascontiguousarray(idx).tobytes()).hexdigest()[:16]
    meta = {
        "checkpoint": str(getattr(ck, "path", "")), "checkpoint_sha": getattr(ck, "sha", None),
        "weights": ck.weights, "step": getattr(ck, "step", None), "family": family,
        "model": ck.meta.get("model_name") or f"{family.upper()}-d{model.depth}-w{hidden}",
        "method": ck.meta.get("method"), "time_convention": conv,
        "dataset": getattr(dataset, "name", "?"), "split": split, "n_samples": n, "indices_sha": indices_sha,
        "split_rule": getattr(dataset, "split_rule", "official"),
        "seed": seed, "label_policy": label_policy, "pooling": pooling, "precision": precision,
        "noise": NOISE_SCHEME, "blocks": blocks, "ts": ts, "feature_dtype": "float16" if cache else "float32",
    }

    def key(b: int, t) -> dict:
        return {"checkpoint_sha": meta["checkpoint_sha"], "weights": ck.weights, "block": b, "t": _t_key(t),
                "pooling": pooling, "split": split, "split_rule": meta["split_rule"], "seed": seed,
                "dataset": meta["dataset"], "n_samples": n,
                "indices_sha": indices_sha, "label_policy": label_policy, "precision": precision,
                "time_convention": conv, "family": family, "noise": NOISE_SCHEME}

    # Which cells still need work (rank 0 decides, everyone follows).
    todo: dict = {}
    for t in ts:
        missing = [b for b in blocks if cache is None or not cache.has(key(b, t), cell_shape)]
        if missing:
            todo[t] = missing
    if world > 1:
        box = [todo]
        dist.broadcast_object_list(box, src=0)
        todo = box[0]

    lo, hi = shard_bounds(n, rank, world) if world > 1 else (0, n)
    my_idx = idx[lo:hi]
    model = model.to(dev)
    null = model.y_embedder.num_classes
    amp = torch.autocast(dev.type, dtype=torch.bfloat16) if precision == "bf16" else None
    x_shape = (model.config.in_channels, model.config.input_size, model.config.input_size)
    in_memory: dict = {}
    n_batches = math.ceil(len(my_idx) / batch_size)
    bar = tqdm(total=n_batches * len(todo), desc=f"extract {len(todo)}/{len(ts)} t x {len(blocks)} blocks",
               disable=not progress or rank != 0, dynamic_ncols=True, leave=False)
    try:
        for t in ts:
            if t not in todo:
                continue
            want = todo[t]
            # Single process: write straight into the cache (or RAM); sharded: a local buffer, gathered below.
            direct = world == 1
            sinks = {}
            for b in want:
                if direct and cache is not None:
                    sinks[b] = cache.writer(key(b, t), cell_shape)
                else:
                    sinks[b] = np.empty((len(my_idx), *cell_shape[1:]), dtype=np.float32)
            try:
                t_ours = torch.full((1,), float(t), dtype=torch.float32) if family == "sit" else torch.full((1,), int(t))
                t_in = model_time(t_ours, conv) if family == "sit" else t_ours
                for start in range(0, len(my_idx), batch_size):
                    rows = my_idx[start : start + batch_size]
                    x0 = load_x0(dataset, rows, seed, split).to(dev)
                    eps = grid_noise(rows, x_shape, seed, split).to(dev)
                    tt = t_ours.to(dev).expand(len(rows))
                    xt = ck.objective.corrupt(x0, tt, eps)
                    y = (torch.full((len(rows),), null, dtype=torch.long) if label_policy == "null"
                         else torch.as_tensor(labels[lo + start : lo + start + len(rows)])).to(dev)
                    with torch.inference_mode(), BlockCapture(model, want, pooling) as cap:
                        with amp if amp is not None else contextlib.nullcontext():
                            model(xt, t_in.to(dev).expand(len(rows)), y, drop_labels=False)
                    for b in want:
                        v = cap.outputs[b].float().cpu().numpy()
                        if isinstance(sinks[b], np.ndarray):
                            sinks[b][start : start + len(rows)] = v
                        else:
                            sinks[b].write(start, v)
                    bar.update(1)
                if direct:
                    for b in want:
                        if isinstance(sinks[b], np.ndarray):
                            in_memory[(b, t)] = sinks[b]
                        else:
                            sinks[b].commit()
                else:
                    for b in want:
                        full = _gather_rows(sinks[b], n, world, dev if dev.type == "cuda" else torch.device("cpu"))
                        if rank == 0:
                            if cache is not None:
                                w = cache.writer(key(b, t), cell_shape)
                                w.write(0, full)
                                w.commit()
                            else:
                                in_memory[(b, t)] = full
            except BaseException:
                for s in sinks.values():
                    if not isinstance(s, np.ndarray):
                        s.abort()
                raise
    finally:
        bar.close()

    tokens = {}
    if keep_tokens > 0 and rank == 0:
        tokens = _few_tokens(ck, dataset, idx[:keep_tokens], labels[:keep_tokens], blocks, ts, family, conv,
                             label_policy, seed, split, dev, amp)
    cells = [(b, t) for t in ts for b in blocks]
    if cache is not None:
        features = LazyFeatures(cache, {c: key(*c) for c in cells}) if rank == 0 else {}
    else:
        features = in_memory
    return GridFeatures(features=features, labels=labels, blocks=blocks, ts=ts, log_snr=log_snr, meta=meta,
                        indices=idx, tokens=tokens)


def _few_tokens(ck, dataset, idx, labels, blocks, ts, family, conv, label_policy, seed, split, dev, amp) -> dict:
    """Full (n, T, D) tokens of a few images per cell (PCA maps, token cosine): one small forward per t."""
    model = ck.model
    x_shape = (model.config.in_channels, model.config.input_size, model.config.input_size)
    x0 = load_x0(dataset, idx, seed, split).to(dev)
    eps = grid_noise(idx, x_shape, seed, split).to(dev)
    y = (torch.full((len(idx),), model.y_embedder.num_classes, dtype=torch.long) if label_policy == "null"
         else torch.as_tensor(labels)).to(dev)
    out = {}
    for t in ts:
        t_ours = torch.full((len(idx),), float(t)) if family == "sit" else torch.full((len(idx),), int(t))
        t_in = model_time(t_ours, conv) if family == "sit" else t_ours
        xt = ck.objective.corrupt(x0, t_ours.to(dev), eps)
        with torch.inference_mode(), BlockCapture(model, blocks, "tokens") as cap:
            with amp if amp is not None else contextlib.nullcontext():
                model(xt, t_in.to(dev), y, drop_labels=False)
        for b in blocks:
            out[(b, t)] = cap.outputs[b].float().cpu().numpy()
    return out
