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
* REPA's projectors (``projectors.*``, online and EMA) carry over when the method includes repa
  (their AdamW moments too, by name as the rest); the run's ``repa.projector_dim`` defaults to the
  file's and its encoders must give the file's target widths. A method without repa leaves them
  out with the loader's note, as probing does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from repdyn.model.backbone import MODEL_SIZES, PATCH_SIZES, ModelConfig, model_config
from repdyn.model.checkpoint import CKPT_RE, checkpoint_from
from repdyn.model.foreign import TRAINING_ONLY_HEADS, args_get, rename_official_keys, strip_wrapper_prefixes
from repdyn.model.torch_file import CheckpointFile, read_checkpoint

__all__ = ["WarmStart", "read_warm_start", "is_own_checkpoint", "is_training_checkpoint", "projector_layout"]

# Fields the data or the method decide (checked against the file, never taken from it).
_FROM_DATA = ("input_size", "in_channels", "num_classes")
_FROM_METHOD = ("long_skip", "sra_head", "z_dims", "projector_dim")
SRA_HEAD = "ap_head."  # the SRA head's keys (official SRA layout)
REPA_PROJECTORS = "projectors."  # REPA's projector MLPs (official REPA layout)
_PROJECTOR_KEY = re.compile(r"^projectors\.(\d+)\.")


def projector_layout(heads: dict[str, torch.Tensor], name: str) -> tuple[tuple[int, ...], int]:
    """(z dims, hidden width) of the REPA projectors ``projectors.{k}.{0,2,4}.*`` in ``heads``;
    a one-line error naming ``name`` where they are not REPA's Linear-SiLU-Linear-SiLU-Linear."""
    ks = sorted({int(m.group(1)) for k in heads if (m := _PROJECTOR_KEY.match(k))})
    try:
        z = tuple(int(heads[f"projectors.{k}.4.weight"].shape[0]) for k in ks)
        widths = {int(heads[f"projectors.{k}.{i}.weight"].shape[0]) for k in ks for i in (0, 2)}
    except KeyError as e:
        raise ValueError(f"{name}'s projectors.* are not REPA's projector MLPs (no {e.args[0]}); fine-tune it "
                         "with a method without repa, which leaves them out") from None
    if ks != list(range(len(ks))) or len(widths) != 1:
        raise ValueError(f"{name}'s projectors.* are not REPA's projector MLPs (indices {ks}, hidden widths "
                         f"{sorted(widths)}); fine-tune it with a method without repa, which leaves them out")
    return z, widths.pop()


def is_own_checkpoint(obj: Any) -> bool:
    """A checkpoint this toolkit's trainer wrote (with or without its optimiser state)."""
    return isinstance(obj, dict) and all(k in obj for k in ("meta", "config", "model"))


def is_training_checkpoint(obj: Any) -> bool:
    """One of our checkpoints that resumes exactly (it holds the optimiser state), as opposed to a
    published file or one saved with ``opt_state: final`` before the end."""
    return is_own_checkpoint(obj) and "opt" in obj


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
    ema_heads: dict[str, torch.Tensor] = field(default_factory=dict)  # the same heads of the EMA
    head_note: list[str] = field(default_factory=list)  # the loader's line about leaving the heads out
    repa_args: dict[str, Any] = field(default_factory=dict)  # the file's REPA training args (encoder_depth, ...)
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

    def repa_defaults(self) -> dict[str, Any]:
        """``repa`` options of a run that keeps the file's projectors: their width, and the block
        the file's training args name (``encoder_depth``); {} for a file without projectors."""
        if not any(k.startswith(REPA_PROJECTORS) for k in self.heads):
            return {}
        try:
            return {**self.repa_args, "projector_dim": projector_layout(self.heads, self.path.name)[1]}
        except ValueError:  # not REPA's MLPs: only a run with repa needs them, and check() says why
            return dict(self.repa_args)

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
        if built.z_dims and any(k.startswith(REPA_PROJECTORS) for k in self.heads):
            z, width = projector_layout(self.heads, self.path.name)
            if (z, width) != (built.z_dims, built.projector_dim):
                raise ValueError(
                    f"{self.path.name} has REPA projectors to z dims {list(z)} of width {width}, but --method "
                    f"{method} builds z dims {list(built.z_dims)} of width {built.projector_dim}: give repa.encoder "
                    f"encoders of those token widths (DINOv2-B: 768) and repa.projector_dim {width}")

    def load_into(self, model: torch.nn.Module, ema: torch.nn.Module) -> list[str]:
        """The file's weights into the run's model and EMA. A head the method adds and the file lacks
        (SRA's ``sra_head`` or REPA's projectors on a baseline release) starts from its
        initialisation, in both; a head the file has and the method does not use is left out; REPA
        projectors the run builds come from the file. Returns one line per such case."""
        notes = []
        own = model.state_dict()
        takes_heads = any(k.startswith(REPA_PROJECTORS) for k in own)
        src = {**self.model, **self.heads} if takes_heads else self.model
        src_ema = {**self.ema, **self.ema_heads} if takes_heads else self.ema
        new = sorted(k for k in own if k not in src)
        if any(not k.startswith((SRA_HEAD, REPA_PROJECTORS)) for k in new):  # check() keeps this from happening
            raise ValueError(f"{self.path.name} lacks {', '.join(new[:3])} for this model")
        dropped = sorted(k for k in self.model if k not in own)
        model.load_state_dict({k: src[k] for k in own if k in src}, strict=False)
        ema.load_state_dict(model.state_dict())  # a new head's EMA starts as its initialisation
        ema.load_state_dict({k: src_ema[k] for k in own if k in src_ema}, strict=False)
        new_sra = [k for k in new if k.startswith(SRA_HEAD)]
        new_proj = [k for k in new if k.startswith(REPA_PROJECTORS)]
        carried = [k for k in own if k.startswith(REPA_PROJECTORS) and k in src]
        if new_sra:
            notes.append(f"the SRA head ({len(new_sra)} tensors) is new: {self.path.name} has none; it starts "
                         "untrained")
        if new_proj:
            notes.append(f"the REPA projectors ({len(new_proj)} tensors) are new: {self.path.name} has none; they "
                         "start untrained")
        if carried:
            notes.append(f"REPA projectors ({len(carried)} tensors) from {self.path.name}: online and EMA")
        elif not takes_heads:
            notes.extend(self.head_note)  # the loader's line: the file's projectors are left out
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


def read_warm_start(path: str | Path, *, file: CheckpointFile | None = None, family: str | None = None,
                    num_heads: int | None = None, trust: bool = False) -> WarmStart:
    """Read a published checkpoint once for a new run (see the module docstring); ``file``: the file
    already read."""
    path = Path(path)
    if file is None:
        file = read_checkpoint(path, trust=trust, map_location="cpu")
    obj, sha = file.obj, file.sha
    if is_training_checkpoint(obj):
        raise ValueError(f"{path} is a training checkpoint of this toolkit: resume it (--resume), not a warm start")
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
    ema_raw = strip_wrapper_prefixes(obj["ema"]) if both else raw
    ema_heads = {k: v for k, v in ema_raw.items() if k.startswith(tuple(TRAINING_ONLY_HEADS))}
    steps, how = _steps(obj, path) if wrapped else (None, "")
    notes = [f"weights from {path.name}: " + ("online and EMA" if both else
                                               "its one weight set, for both the online weights and the EMA")]
    head_keys = [k for k in online.ignored_keys if k.startswith(tuple(TRAINING_ONLY_HEADS))]
    notes += replace(online, ignored_keys=[k for k in online.ignored_keys if k not in head_keys]).load_notes()
    head_note = replace(online, ignored_keys=head_keys, inferred={}, notes=[]).load_notes()
    args = obj.get("args") if wrapped else None
    repa_args = {k: v for k in ("encoder_depth",) if isinstance(v := args_get(args, k), int) and not isinstance(v, bool)}
    if heads and args_get(args, "enc_type"):
        notes.append(f"{path.name} was trained with REPA encoder(s) {args_get(args, 'enc_type')} at block "
                     f"{args_get(args, 'encoder_depth')} (its args)")
    notes.append(f"continuing its step count from {steps} ({how})" if steps is not None
                 else f"{path.name} does not say its step count: the run counts from 0")
    opt = obj.get("opt") if wrapped else None
    return WarmStart(path=path, sha=sha, model_config=online.model.config,
                     flow_path=online.meta.get("path") if online.family == "sit" else None,
                     model=online.model.state_dict(), ema=ema.model.state_dict(), heads=heads, steps=steps,
                     param_order=list(rename_official_keys(raw)[0]), opt=opt if isinstance(opt, dict) else None,
                     notes=notes, ema_heads=ema_heads, head_note=head_note, repa_args=repa_args)
