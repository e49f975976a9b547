"""Checkpoints: atomic writes, exact resume, and one loader for ours and published ones.

Our layout is the REPA/SRA one users know, ``{"model", "ema", "opt", "steps", "epoch"}``, plus
``config`` (the training config as a plain dict) and ``meta`` (family, time convention, data,
method hyper-parameters, RNG states, data position). Everything in it is tensors and plain Python
values, so ``torch.load(path, weights_only=True)`` reads it.

:func:`load_checkpoint` also takes published files: a raw state dict (facebookresearch/DiT,
willisma/SiT releases) or a ``{"model", "ema", ...}`` dict (REPA / SRA / DiverseDiT). Their
architecture is read off the tensor shapes; what shapes cannot say (DiT or SiT? which time
convention?) comes from arguments, or is inferred and recorded as inferred.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .files import save_torch
from .models import MODEL_SIZES, DiffusionTransformer, ModelConfig
from .objectives import Objective, make_objective

__all__ = ["save_checkpoint", "read_checkpoint", "load_checkpoint", "LoadedCheckpoint", "list_checkpoints",
           "latest_checkpoint", "file_sha", "run_dir_of"]

CKPT_RE = re.compile(r"^(\d+)\.pt$")


def save_checkpoint(state: dict, path: str | os.PathLike) -> Path:
    """Write ``state`` to ``path`` atomically (temp file in the same folder, fsync, rename)."""
    return save_torch(state, path)


def run_dir_of(path: str | os.PathLike) -> Path:
    """The run folder of a checkpoint: ``<run>`` for ``<run>/checkpoints/NNNNNNN.pt``, else its folder."""
    p = Path(path).resolve()
    return p.parent.parent if p.parent.name == "checkpoints" else p.parent


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """``<run>/checkpoints/NNNNNNN.pt`` sorted by step (also accepts the checkpoints folder itself)."""
    run_dir = Path(run_dir)
    folder = run_dir / "checkpoints" if (run_dir / "checkpoints").is_dir() else run_dir
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CKPT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def file_sha(path: str | os.PathLike, n_hex: int = 16) -> str:
    """Content hash (sha256 prefix): cache keys must change when the weights change."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:n_hex]


def read_checkpoint(path: str | os.PathLike, trust: bool = False, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load`` with clear errors. ``trust=True`` allows pickled objects (official training
    checkpoints store an ``argparse.Namespace``) — only for files you trust."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=not trust)
    except pickle.UnpicklingError as e:
        if not trust and "Unsupported global" in str(e):
            raise ValueError(
                f"{path} contains pickled Python objects (e.g. an argparse.Namespace, as official REPA/SRA "
                "training checkpoints do); if you trust the file, pass --trust-checkpoint (weights_only=False)"
            ) from None
        raise ValueError(f"checkpoint {path} is unreadable (corrupt or truncated?): {e}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"checkpoint {path} is unreadable (corrupt or truncated?): {str(e).splitlines()[0]}") from None


# ----------------------------------------------------------------------------------------------
# Loading for probing / sampling
# ----------------------------------------------------------------------------------------------


@dataclass
class LoadedCheckpoint:
    model: DiffusionTransformer
    weights: str
    meta: dict
    config: dict
    objective: Objective
    path: Path
    sha: str
    step: int | None
    ignored_keys: list[str] = field(default_factory=list)

    @property
    def family(self) -> str:
        """``dit`` or ``sit``."""
        return self.meta["family"]

    @property
    def num_timesteps(self) -> int:
        """DDPM steps T (DiT); 1000 where the file does not say."""
        return int(self.meta.get("num_timesteps") or 1000)

    @property
    def time_convention(self) -> str:
        """How the network reads t: ``flow-t1-noise`` (ours, REPA/SRA), ``flow-t0-noise`` (willisma/SiT),
        ``ddpm-t999-noisiest`` (DiT)."""
        return self.meta.get("time_convention") or ("flow-t1-noise" if self.family == "sit" else "ddpm-t999-noisiest")

    @property
    def num_classes(self) -> int:
        return int(self.meta.get("num_classes") or self.model.y_embedder.num_classes)

    @property
    def data(self) -> str | None:
        """The dataset spec the run trained on (None for foreign files)."""
        return self.meta.get("data")

    @property
    def run_dir(self) -> Path:
        return run_dir_of(self.path)

    @property
    def run_name(self) -> str:
        return self.run_dir.name


_HEADS_BY_WIDTH = {hidden: heads for _, hidden, heads in MODEL_SIZES.values()}
_BACKBONE_PREFIXES = ("x_embedder.", "t_embedder.", "y_embedder.", "pos_embed", "blocks.", "final_layer.",
                      "skip_fusions.", "ap_head.")


def _strip_prefixes(sd: dict) -> dict:
    """Drop wrappers' prefixes (DDP ``module.``, torch.compile ``_orig_mod.``)."""
    out = {}
    for k, v in sd.items():
        for p in ("module.", "_orig_mod."):
            while k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out


def infer_model_config(sd: dict, family: str, num_heads: int | None = None) -> ModelConfig:
    """Architecture from state-dict shapes (the official layout)."""
    try:
        proj = sd["x_embedder.proj.weight"]  # (D, C, p, p)
        pos = sd["pos_embed"]  # (1, T, D)
        table = sd["y_embedder.embedding_table.weight"]  # (classes + 1, D)
        final = sd["final_layer.linear.weight"]  # (p*p*out, D)
    except KeyError as e:
        raise ValueError(f"not a DiT/SiT state dict: key {e.args[0]!r} is missing") from None
    hidden, in_ch, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    grid = int(round(pos.shape[1] ** 0.5))
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    out_ch = final.shape[0] // (patch * patch)
    if num_heads is None:
        if hidden not in _HEADS_BY_WIDTH:
            raise ValueError(f"cannot infer num_heads for width {hidden}; pass num_heads")
        num_heads = _HEADS_BY_WIDTH[hidden]
    mlp_hidden = sd["blocks.0.mlp.fc1.weight"].shape[0]
    return ModelConfig(
        family=family, input_size=grid * patch, patch_size=patch, in_channels=in_ch, hidden_size=hidden,
        depth=depth, num_heads=num_heads, mlp_ratio=mlp_hidden / hidden, num_classes=table.shape[0] - 1,
        learn_sigma=(out_ch == 2 * in_ch), long_skip=any(k.startswith("skip_fusions.") for k in sd),
        sra_head=any(k.startswith("ap_head.") for k in sd),
    ).validate()


def _namespace_get(args: Any, name: str) -> Any:
    return getattr(args, name, None) if args is not None and not isinstance(args, dict) else (args or {}).get(name)


def load_checkpoint(path: str | os.PathLike, weights: str = "ema", *, family: str | None = None,
                    time_convention: str | None = None, num_heads: int | None = None, trust: bool = False,
                    map_location: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Model (eval mode) + meta from our checkpoint or a published DiT/SiT/REPA/SRA file.

    ``weights``: "ema" (default, what papers sample and probe) or "model" (online weights).
    ``family`` / ``time_convention``: needed only for foreign files whose layout is ambiguous.
    """
    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    path = Path(path)
    obj = read_checkpoint(path, trust=trust, map_location=map_location)
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict or state dict")

    if "meta" in obj and "config" in obj and "model" in obj:  # ours
        meta = dict(obj["meta"])
        cfg = ModelConfig.from_dict(meta["model_config"])
        if weights not in obj:
            raise ValueError(f"{path} has no {weights!r} weights; available: model, ema")
        sd = _strip_prefixes(obj[weights])
        config = dict(obj["config"])
        step = obj.get("steps")
    else:  # foreign
        is_wrapped = "model" in obj or "ema" in obj
        if is_wrapped:
            if weights not in obj:
                raise ValueError(f"{path} has no {weights!r} weights; available: {[k for k in ('model', 'ema') if k in obj]}")
            sd = _strip_prefixes(obj[weights])
        else:
            sd = _strip_prefixes(obj)
            if weights == "model":
                pass  # a raw release is a single set of weights (the EMA, for DiT/SiT)
        args = obj.get("args") if is_wrapped else None
        step = obj.get("steps") if is_wrapped else None
        fam = family
        if fam is None and _namespace_get(args, "path_type") is not None:
            fam = "sit"  # REPA / SRA / DiverseDiT args carry the interpolant
        if fam is None:
            raise ValueError(f"cannot tell whether {path.name} is a DiT or a SiT checkpoint: pass --family dit|sit")
        cfg = infer_model_config({k: v for k, v in sd.items() if k.startswith(_BACKBONE_PREFIXES)}, fam, num_heads)
        if fam == "sit":
            if time_convention is None:
                # willisma/SiT keeps the learned-sigma head and the t=0-noise convention; REPA/SRA drop both.
                time_convention = "flow-t0-noise" if cfg.learn_sigma else "flow-t1-noise"
                source = "inferred from layout"
            else:
                source = "given"
        else:
            time_convention, source = "ddpm-t999-noisiest", "family"
        meta = {
            "family": fam, "prediction": "velocity" if fam == "sit" else "eps", "time_convention": time_convention,
            "time_convention_source": source, "learn_sigma": cfg.learn_sigma, "num_classes": cfg.num_classes,
            "null_class": cfg.num_classes, "in_channels": cfg.in_channels, "input_size": cfg.input_size,
            "latent_scale": 0.18215 if cfg.in_channels == 4 else None, "data": None, "method": "unknown",
            "path": _namespace_get(args, "path_type") or "linear", "num_timesteps": 1000, "foreign": True,
            "model_config": cfg.to_dict(),
        }
        config = {}

    model = DiffusionTransformer(cfg)
    expected = set(model.state_dict())
    missing = sorted(expected - set(sd))
    if missing:
        raise ValueError(f"{path.name} is missing {len(missing)} parameter(s) for a {cfg.depth}-block "
                         f"{cfg.family.upper()} (e.g. {', '.join(missing[:4])})")
    ignored = sorted(set(sd) - expected)
    for k in expected:
        if sd[k].shape != model.state_dict()[k].shape:
            raise ValueError(f"{path.name}: parameter {k} has shape {tuple(sd[k].shape)}, "
                             f"expected {tuple(model.state_dict()[k].shape)}")
    model.load_state_dict({k: sd[k] for k in expected})
    model.eval().requires_grad_(False)
    objective = make_objective(meta["family"], path=meta.get("path", "linear"),
                               learn_sigma=bool(meta.get("learn_sigma", True)),
                               num_timesteps=int(meta.get("num_timesteps", 1000)))
    return LoadedCheckpoint(model=model, weights=weights, meta=meta, config=config, objective=objective, path=path,
                            sha=file_sha(path), step=step, ignored_keys=ignored)
