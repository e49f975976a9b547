"""A new run from published weights: fine-tuning an official DiT / SiT / REPA / SRA / DiverseDiT file.

``probe train --resume FILE --out NEW`` with a file that is not one of our training checkpoints
starts a new run from its weights. What carries over, and why:

* the architecture is the file's (read from its tensor shapes and training args), so the run's
  ``config.yaml`` says what was trained; data and method must fit it (checked, one line each);
* the online weights and the EMA: both where the file has both, else its one weight set for both;
* the step count, where the file says it (``steps``, or the official trainers' ``NNNNNNN.pt`` name):
  the run continues it, so the EMA's remaining share of the initialisation (``decay ** step``) stays
  true and ``--steps`` is the total, as for a resume. A release without one starts at step 0;
* the AdamW moments where the file has an optimiser state, matched by parameter *name* (the
  official trainers build ``AdamW(model.parameters())``: the state is indexed in the order of the
  state dict's keys) and checked shape by shape; anything else starts them fresh, said in one line;
* training-only heads the backbone does not hold (REPA's ``projectors.*``) are kept in
  :attr:`WarmStart.heads` for the method that uses them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from repdyn.model.backbone import MODEL_SIZES, PATCH_SIZES, ModelConfig, model_config
from repdyn.model.checkpoint import (CKPT_RE, TRAINING_ONLY_HEADS, checkpoint_from, file_sha, read_checkpoint,
                                     rename_official_keys, strip_wrapper_prefixes)

__all__ = ["WarmStart", "read_warm_start", "is_training_checkpoint"]

# Fields the data or the method decide (checked against the file, never taken from it).
_FROM_DATA = ("input_size", "in_channels", "num_classes")
_FROM_METHOD = ("long_skip", "sra_head")
SRA_HEAD = "ap_head."  # the SRA head's keys (official SRA layout)


def is_training_checkpoint(obj: Any) -> bool:
    """One of our training checkpoints (resumable exactly), as opposed to a published file."""
    return isinstance(obj, dict) and all(k in obj for k in ("meta", "config", "model", "opt"))


@dataclass
class WarmStart:
    """Everything a new run takes from a published file."""

    path: Path
    sha: str
    model_config: ModelConfig
    flow_path: str | None  # SiT interpolant of the file (linear / cosine); None for DiT
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor]
    heads: dict[str, torch.Tensor]  # training-only heads (REPA projectors.*), online weights
    steps: int | None  # the file's step count, None where it does not say
    param_order: list[str] = field(default_factory=list)  # what the file's optimiser state is indexed by
    opt: dict | None = None
    notes: list[str] = field(default_factory=list)

    def config_fields(self) -> dict[str, Any]:
        """``model`` (a registry name) and ``model_overrides`` that build the file's architecture,
        and its SiT interpolant: the new run's config records what it trains."""
        cfg = self.model_config
        fam = "SiT" if cfg.family == "sit" else "DiT"
        if cfg.patch_size not in PATCH_SIZES:
            raise ValueError(f"{self.path.name} has patch size {cfg.patch_size}; the trainer builds patch sizes "
                             f"{', '.join(map(str, PATCH_SIZES))}")
        size = next((s for s, dims in MODEL_SIZES.items() if dims == (cfg.depth, cfg.hidden_size, cfg.num_heads)),
                    "S")
        name = f"{fam}-{size}/{cfg.patch_size}"
        base = model_config(name)
        skip = set(_FROM_DATA) | set(_FROM_METHOD)
        overrides = {f.name: getattr(cfg, f.name) for f in fields(ModelConfig)
                     if f.name not in skip and f.name != "family" and getattr(cfg, f.name) != getattr(base, f.name)}
        out: dict[str, Any] = {"model": name, "model_overrides": overrides}
        if self.flow_path is not None:
            out["path"] = self.flow_path
        return out

    def check(self, built: ModelConfig, data: str, method: str) -> None:
        """The trainer's model (from data, method and config) must be the file's network: a one-line
        error names the first field that differs and what decides it."""
        mine = self.model_config
        for name in _FROM_DATA:
            if getattr(built, name) != getattr(mine, name):
                raise ValueError(f"{self.path.name} is a model of {name} {getattr(mine, name)}, but --data {data} "
                                 f"gives {getattr(built, name)}: fine-tune it on data of its own shape")
        if mine.long_skip and not built.long_skip:
            raise ValueError(f"{self.path.name} has DiverseDiT long skips (skip_fusions.*); dropping them changes "
                             f"the network: fine-tune it with --method diverse (or sra+diverse), not {method}")
        if built.long_skip and not mine.long_skip:
            raise ValueError(f"--method {method} needs DiverseDiT long skips, which {self.path.name} does not have "
                             "(their fusion layers would start untrained inside a trained network): use a method "
                             "without diverse")
        for f in fields(ModelConfig):
            if f.name not in _FROM_METHOD and getattr(built, f.name) != getattr(mine, f.name):
                raise ValueError(f"{self.path.name} has {f.name} {getattr(mine, f.name)} but the config asks for "
                                 f"{getattr(built, f.name)}: drop that setting (the architecture is the file's)")

    def load_into(self, model: torch.nn.Module, ema: torch.nn.Module) -> list[str]:
        """The file's weights into the run's model and EMA. A head the method adds and the file lacks
        (SRA's ``sra_head`` on a baseline release) starts from its initialisation, in both; a head
        the file has and the method does not use is left out. Returns one line per such case."""
        notes = []
        own = model.state_dict()
        new = sorted(k for k in own if k not in self.model)
        if any(not k.startswith(SRA_HEAD) for k in new):  # check() keeps this from happening
            raise ValueError(f"{self.path.name} lacks {', '.join(new[:3])} for this model")
        dropped = sorted(k for k in self.model if k not in own)
        model.load_state_dict({k: self.model[k] for k in own if k in self.model}, strict=False)
        ema.load_state_dict(model.state_dict())  # the new head's EMA starts as its initialisation
        ema.load_state_dict({k: self.ema[k] for k in own if k in self.ema}, strict=False)
        if new:
            notes.append(f"the SRA head ({len(new)} tensors) is new: {self.path.name} has none; it starts untrained")
        if dropped:
            notes.append(f"left out {len(dropped)} tensor(s) the method does not use: "
                         f"{', '.join(sorted({k.split('.')[0] for k in dropped}))}.*")
        return notes

    def optimizer_state(self, named: list[tuple[str, torch.nn.Parameter]], template: dict) -> tuple[dict | None, str]:
        """The file's AdamW moments re-indexed for an optimiser over ``named`` (its parameters in
        order, ``template`` its own ``state_dict()``), and a line saying what happened. None (fresh
        moments) where the file has no optimiser state or it does not match the weights."""
        if self.opt is None:
            return None, f"the optimiser starts fresh: {self.path.name} holds no optimiser state"
        try:
            ids = [i for g in self.opt["param_groups"] for i in g["params"]]
            state = self.opt["state"]
        except (KeyError, TypeError):
            return None, f"the optimiser starts fresh: {self.path.name}'s 'opt' is not an optimiser state dict"
        if len(ids) != len(self.param_order):
            return None, (f"the optimiser starts fresh: {self.path.name}'s optimiser has {len(ids)} parameters, "
                          f"its weights {len(self.param_order)} (not AdamW over model.parameters())")
        by_name = {name: state.get(i) for name, i in zip(self.param_order, ids)}
        out = {}
        for j, (name, p) in enumerate(named):
            st = by_name.get(name)
            if st is None:
                continue
            moments = [v for k, v in st.items() if k in ("exp_avg", "exp_avg_sq")]
            if len(moments) != 2 or any(tuple(m.shape) != tuple(p.shape) for m in moments):
                return None, (f"the optimiser starts fresh: the moments of {name} in {self.path.name} do not fit "
                              f"its shape {tuple(p.shape)}")
            out[j] = st
        return ({"state": out, "param_groups": template["param_groups"]},
                f"AdamW moments of {len(out)} of {len(named)} parameters from {self.path.name}")


def _steps(obj: dict, path: Path) -> tuple[int | None, str]:
    if isinstance(obj.get("steps"), int):
        return int(obj["steps"]), "its 'steps'"
    m = CKPT_RE.match(path.name)
    if m and "opt" in obj and "args" in obj:  # official DiT / SiT trainers: {"model", "ema", "opt", "args"}
        return int(m.group(1)), "its name (the official trainers name checkpoints by step)"
    return None, ""


def read_warm_start(path: str | Path, *, obj: Any = None, family: str | None = None, num_heads: int | None = None,
                    trust: bool = False) -> WarmStart:
    """Read a published checkpoint once for a new run (see the module docstring); ``obj``: the file
    already read."""
    path = Path(path)
    if obj is None:
        obj = read_checkpoint(path, trust=trust, map_location="cpu")
    if is_training_checkpoint(obj):
        raise ValueError(f"{path} is a training checkpoint of this toolkit: resume it (--resume), not a warm start")
    sha = file_sha(path)
    wrapped = isinstance(obj, dict) and ("model" in obj or "ema" in obj)
    both = wrapped and "model" in obj and "ema" in obj
    online = checkpoint_from(obj, path, "model" if wrapped and "model" in obj else "ema", family=family,
                             num_heads=num_heads, sha=sha)
    ema = checkpoint_from(obj, path, "ema", family=family, num_heads=num_heads, sha=sha) if both else online
    if online.family == "sit" and online.time_convention != "flow-t1-noise":
        raise ValueError(f"{path.name} reads t with t = 0 as noise ({online.time_convention}, willisma/SiT); the "
                         "trainer uses t = 1 as noise (REPA/SRA): fine-tuning would feed it reversed times")
    raw = strip_wrapper_prefixes(obj[online.weights] if wrapped else obj)
    heads = {k: v for k, v in raw.items() if k.startswith(tuple(TRAINING_ONLY_HEADS))}
    steps, how = _steps(obj, path) if wrapped else (None, "")
    notes = [f"weights from {path.name}: " + ("online and EMA" if both else
                                               "its one weight set, for both the online weights and the EMA")]
    notes += online.load_notes()
    notes.append(f"continuing its step count from {steps} ({how})" if steps is not None
                 else f"{path.name} does not say its step count: the run counts from 0")
    opt = obj.get("opt") if wrapped else None
    return WarmStart(path=path, sha=sha, model_config=online.model.config,
                     flow_path=online.meta.get("path") if online.family == "sit" else None,
                     model=online.model.state_dict(), ema=ema.model.state_dict(), heads=heads, steps=steps,
                     param_order=list(rename_official_keys(raw)[0]), opt=opt if isinstance(opt, dict) else None,
                     notes=notes)
