"""Published checkpoint layouts: what a foreign file is, read off its keys, shapes and training args.

Official DiT / SiT releases are raw state dicts; REPA / SRA / DiverseDiT training files are
``{"model", "ema", "args", ...}`` dicts. Their architecture comes from tensor shapes; what shapes
cannot say (DiT or SiT? which time convention? how many heads?) comes from arguments, from the
file's training ``args``, or from keys that settle it, and each decision is recorded with how it was
made. Official DiverseDiT fusions (``skip_linears.*`` / ``skip_norms.*``) are renamed onto ours
(``skip_fusions.*``); known training-only heads (REPA ``projectors.*``) are listed apart.
:func:`repdyn.model.checkpoint.checkpoint_from` builds the model from a :class:`ForeignLayout`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from repdyn.model.backbone import MODEL_SIZES, ModelConfig, model_config
from repdyn.model.flow import make_path

__all__ = ["TRAINING_ONLY_HEADS", "ForeignLayout", "foreign_layout", "infer_model_config", "rename_official_keys",
           "strip_wrapper_prefixes", "args_get"]


# Heads that only an official training loss uses: dropped when loading, listed in ignored_keys.
# (SRA's ``ap_head.*`` is not here: it is our ``sra_head`` and loads as one.)
TRAINING_ONLY_HEADS: dict[str, str] = {"projectors.": "REPA projector heads"}

# Official DiverseDiT (kobeshegu/DiverseDiT models/sit.py) names of the long-skip fusions -> ours.
_DIVERSEDIT_RENAMES = (
    (re.compile(r"^skip_linears\.(\d+)\.linear\.(weight|bias)$"), r"skip_fusions.\1.linear.\2"),
    (re.compile(r"^skip_norms\.(\d+)\.(weight|bias)$"), r"skip_fusions.\1.norm.\2"),
)
_OFFICIAL_SKIP_PREFIXES = ("skip_linears.", "skip_norms.")


_HEADS_BY_WIDTH = {hidden: heads for _, hidden, heads in MODEL_SIZES.values()}
_HEAD_ARG_NAMES = ("num_heads", "heads", "n_heads")
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.")


def strip_wrapper_prefixes(sd: dict) -> dict:
    """Drop wrappers' prefixes (DDP ``module.``, torch.compile ``_orig_mod.``)."""
    out = {}
    for k, v in sd.items():
        for p in ("module.", "_orig_mod."):
            while k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out


def rename_official_keys(sd: dict) -> tuple[dict, int]:
    """Official DiverseDiT fusion names -> ours: ``skip_linears.{j}.linear.*`` -> ``skip_fusions.{j}.linear.*``,
    ``skip_norms.{j}.*`` -> ``skip_fusions.{j}.norm.*`` (same modules, same index j = i - depth // 2).
    Returns the renamed dict and how many keys were renamed."""
    out, n = {}, 0
    for k, v in sd.items():
        new = k
        for pattern, repl in _DIVERSEDIT_RENAMES:
            if pattern.match(k):
                new = pattern.sub(repl, k)
                break
        if new != k:
            n += 1
            if new in sd or new in out:
                raise ValueError(f"state dict has both the official {k} and our {new}; keep one layout")
        out[new] = v
    return out, n



def args_get(args: Any, name: str) -> Any:
    """``args.name`` of a file's training args (an ``argparse.Namespace`` or a dict); None where absent."""
    if args is None:
        return None
    if isinstance(args, dict):
        return args.get(name)
    return getattr(args, name, None)


def _infer_num_heads(hidden: int, args: Any) -> tuple[int, str]:
    """Heads from the training args (``num_heads``, or a registry ``model`` name of this width),
    else the official width table."""
    for name in _HEAD_ARG_NAMES:
        v = args_get(args, name)
        if v is not None:
            try:
                return int(v), f"from args.{name}"
            except (TypeError, ValueError):
                raise ValueError(f"the checkpoint's args.{name} = {v!r} is not an integer; pass --num-heads") from None
    name = args_get(args, "model")
    if isinstance(name, str):
        try:
            reg = model_config(name)
        except ValueError:
            reg = None
        if reg is not None and reg.hidden_size == hidden:
            return reg.num_heads, f"from args.model {name!r} via the model registry"
    if hidden in _HEADS_BY_WIDTH:
        return _HEADS_BY_WIDTH[hidden], f"from the official size table for width {hidden}"
    raise ValueError(f"cannot infer num_heads for width {hidden}: not an official width and the file's training "
                     "args do not say; pass --num-heads")


def infer_model_config(sd: dict, family: str, num_heads: int | None = None, *, args: Any = None,
                       how: dict[str, str] | None = None) -> ModelConfig:
    """Architecture from state-dict shapes (the official layout; official DiverseDiT fusion names are
    accepted). ``num_heads`` None: from ``args`` (the file's training args) or the width table.
    ``how``, if given, receives ``name -> "value (how)"`` for what was inferred."""
    sd, n_renamed = rename_official_keys(sd)
    try:
        proj = sd["x_embedder.proj.weight"]  # (D, C, p, p)
        pos = sd["pos_embed"]  # (1, T, D)
        table = sd["y_embedder.embedding_table.weight"]  # (classes + 1, D)
        final = sd["final_layer.linear.weight"]  # (p*p*out, D)
        fc1 = sd["blocks.0.mlp.fc1.weight"]  # (mlp, D)
    except KeyError as e:
        raise ValueError(f"not a DiT/SiT state dict: key {e.args[0]!r} is missing") from None
    hidden, in_ch, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    grid = int(round(pos.shape[1] ** 0.5))
    depth = 1 + max(int(m.group(1)) for k in sd if (m := _BLOCK_RE.match(k)))
    out_ch = final.shape[0] // (patch * patch)
    note = how if how is not None else {}
    if num_heads is None:
        num_heads, source = _infer_num_heads(hidden, args)
        note["num_heads"] = f"{num_heads} ({source})"
    long_skip = any(k.startswith("skip_fusions.") for k in sd)
    sra_head = any(k.startswith("ap_head.") for k in sd)
    cfg = ModelConfig(
        family=family, input_size=grid * patch, patch_size=patch, in_channels=in_ch, hidden_size=hidden,
        depth=depth, num_heads=num_heads, mlp_ratio=fc1.shape[0] / hidden, num_classes=table.shape[0] - 1,
        learn_sigma=(out_ch == 2 * in_ch), long_skip=long_skip, sra_head=sra_head,
    ).validate()
    note["architecture"] = (f"depth {depth}, width {hidden}, patch {patch}, input {cfg.input_size}, {in_ch} channels, "
                            f"{cfg.num_classes} classes, learn_sigma {cfg.learn_sigma} (from tensor shapes)")
    if n_renamed:
        note["long_skip"] = (f"True (from {n_renamed} skip_linears.*/skip_norms.* keys, the official DiverseDiT "
                             "names, loaded as skip_fusions.*)")
    elif long_skip:
        note["long_skip"] = "True (from skip_fusions.* keys)"
    if sra_head:
        note["sra_head"] = "True (from ap_head.* keys: the SRA head, loaded; unused by sampling and probing)"
    return cfg


_CORE_KEYS = ("x_embedder.proj.weight", "pos_embed", "y_embedder.embedding_table.weight", "final_layer.linear.weight",
              "blocks.0.mlp.fc1.weight")


def _check_layout(sd: dict, path: Path) -> None:
    """A one-line error for a state dict that is not a DiT/SiT at all (a ResNet, a VAE, ...), checked
    before anything is asked about it (--family, --num-heads)."""
    missing = [k for k in _CORE_KEYS if k not in sd]
    if missing:
        first = ", ".join(list(sd)[:3]) + (", ..." if len(sd) > 3 else "")
        raise ValueError(f"{path.name} is not a DiT/SiT state dict: it has no {missing[0]} "
                         f"({len(missing)} of the {len(_CORE_KEYS)} DiT/SiT core keys missing; its keys: "
                         f"{first or 'none'})")


def _family_from_args(args: Any) -> tuple[str | None, str]:
    """DiT or SiT from the file's ``args.model`` name (e.g. 'SiT-XL/2'), which settles it."""
    name = args_get(args, "model")
    if isinstance(name, str) and (m := re.match(r"\s*(dit|sit)[-_/]", name, re.IGNORECASE)):
        return m.group(1).lower(), f"args.model {name!r}"
    return None, ""


def _learns_sigma(sd: dict) -> bool:
    try:
        proj, final = sd["x_embedder.proj.weight"], sd["final_layer.linear.weight"]
    except KeyError as e:
        raise ValueError(f"not a DiT/SiT state dict: key {e.args[0]!r} is missing") from None
    return final.shape[0] // (proj.shape[2] * proj.shape[3]) == 2 * proj.shape[1]


def _infer_family(sd: dict, args: Any) -> tuple[str | None, str]:
    """DiT or SiT from the training args or from keys that only one family's official code has."""
    fam, how = _family_from_args(args)
    if fam is not None:
        return fam, f"from {how}"
    if args_get(args, "path_type") is not None:
        return "sit", "from args.path_type"  # REPA / SRA / DiverseDiT / SiT args carry the interpolant
    if any(k.startswith(_OFFICIAL_SKIP_PREFIXES) for k in sd):
        return "sit", "from skip_linears.*/skip_norms.* keys: official DiverseDiT, which is SiT only"
    if any(k.startswith("projectors.") for k in sd):
        return "sit", "from projectors.* keys: REPA projector heads, SiT only"
    if any(k.startswith("ap_head.") for k in sd):
        if _learns_sigma(sd):
            return "dit", "from ap_head.* keys with a learned-sigma output: the DiT-SRA layout"
        return "sit", "from ap_head.* keys without a learned-sigma output: the SiT-SRA layout"
    return None, ""


def _sit_path(raw: Any, time_convention: str) -> tuple[str, str]:
    """Our flow path name for the file's ``args.path_type`` (official spellings, any case)."""
    if raw is None:
        return "linear", "default: the file names no path"
    key = str(raw).strip().lower()
    if key == "gvp":
        if time_convention != "flow-t0-noise":
            raise ValueError(f"path_type {raw!r} is willisma/SiT's GVP, defined with t = 0 noise, but the time "
                             f"convention is {time_convention}; pass --time-convention flow-t0-noise")
        # willisma/SiT GVP: x_t = sin(pi t/2) x0 + cos(pi t/2) eps with t = 0 noise; in our time (1 - t) that is
        # cos(pi t/2) x0 + sin(pi t/2) eps, flow.py's CosinePath.
        return "cosine", f"from args.path_type {raw!r}: willisma/SiT's GVP is flow.py's cosine path in our time"
    if key == "vp":
        raise ValueError(f"path_type {raw!r} (willisma/SiT's VP-SDE path) is not supported: training/flow.py has "
                         "linear (Linear) and cosine (GVP)")
    try:
        make_path(key)
    except ValueError:
        raise ValueError(f"unknown path_type {raw!r} in the checkpoint's args; supported: Linear/linear, "
                         "GVP (willisma/SiT, = cosine), cosine (REPA)") from None
    return key, f"from args.path_type {raw!r}"



@dataclass(frozen=True)
class ForeignLayout:
    """What a published file holds, in our terms: its state dict (renamed onto our keys, training-only
    heads still in it), the architecture, the loader's ``meta`` and what was decided on the way."""

    state_dict: dict[str, torch.Tensor]
    config: ModelConfig
    meta: dict[str, Any]
    step: int | None
    inferred: dict[str, str] = field(default_factory=dict)  # name -> "value (how)"
    notes: list[str] = field(default_factory=list)  # other facts for the user, one line each


def foreign_layout(obj: dict, path: Path, weights: str, *, family: str | None = None,
                   time_convention: str | None = None, num_heads: int | None = None) -> ForeignLayout:
    """Read a published file's ``weights`` (a raw release's one weight set) and infer what it is; one-line
    errors for what is not a DiT/SiT or contradicts the arguments."""
    inferred: dict[str, str] = {}
    load_notes: list[str] = []
    is_wrapped = "model" in obj or "ema" in obj
    if is_wrapped:
        if weights not in obj:
            raise ValueError(f"{path} has no {weights!r} weights; available: {[k for k in ('model', 'ema') if k in obj]}")
        sd = strip_wrapper_prefixes(obj[weights])
    else:
        sd = strip_wrapper_prefixes(obj)  # a raw release is a single set of weights (the EMA, for DiT/SiT)
    if not all(isinstance(k, str) and torch.is_tensor(v) for k, v in sd.items()):
        raise ValueError(f"{path} is not a state dict or a {{'model', 'ema', ...}} checkpoint dict")
    _check_layout(rename_official_keys(sd)[0], path)  # a ResNet is refused before --family is asked for
    if not is_wrapped and weights == "model":
        load_notes.append(f"--weights model: {path.name} is a raw release with one weight set (the EMA, for "
                          "DiT/SiT releases); using it, there are no separate online weights")
    args = obj.get("args") if is_wrapped else None
    step = obj.get("steps") if is_wrapped else None
    fam = family
    if fam is None:
        fam, how = _infer_family(sd, args)
        if fam is None:
            raise ValueError(f"cannot tell whether {path.name} is a DiT or a SiT checkpoint: pass --family dit|sit")
        inferred["family"] = f"{fam} ({how})"
    else:
        said, how = _family_from_args(args)
        if said is not None and said != fam:
            raise ValueError(f"--family {fam} contradicts {path.name}: its {how} says {said}; drop --family "
                             f"(or pass --family {said})")
    drop = tuple(TRAINING_ONLY_HEADS)
    cfg = infer_model_config({k: v for k, v in sd.items() if not k.startswith(drop)}, fam, num_heads,
                             args=args, how=inferred)
    sd, _ = rename_official_keys(sd)  # official DiverseDiT fusion names -> skip_fusions.*
    if fam == "sit":
        if time_convention is None:
            # willisma/SiT keeps the learned-sigma head and the t=0-noise convention; REPA/SRA drop both.
            time_convention = "flow-t0-noise" if cfg.learn_sigma else "flow-t1-noise"
            source = "inferred from layout"
            inferred["time_convention"] = (
                f"{time_convention} (from layout: learned-sigma output head, as willisma/SiT)" if cfg.learn_sigma
                else f"{time_convention} (from layout: no learned-sigma head, as REPA/SRA/DiverseDiT)")
        else:
            source = "given"
        flow_path, how = _sit_path(args_get(args, "path_type"), time_convention)
        inferred["path"] = f"{flow_path} ({how})"
    else:
        time_convention, source = "ddpm-t999-noisiest", "family"
        flow_path = "linear"
    meta = {
        "family": fam, "prediction": "velocity" if fam == "sit" else "eps", "time_convention": time_convention,
        "time_convention_source": source, "learn_sigma": cfg.learn_sigma, "num_classes": cfg.num_classes,
        "null_class": cfg.num_classes, "in_channels": cfg.in_channels, "input_size": cfg.input_size,
        "latent_scale": 0.18215 if cfg.in_channels == 4 else None, "data": None, "method": "unknown",
        "path": flow_path, "num_timesteps": 1000, "foreign": True,
        "raw_release": not is_wrapped,  # one weight set: neither "ema" nor "model" describes it
        "model_config": cfg.to_dict(),
    }
    return ForeignLayout(sd, cfg, meta, step, inferred, load_notes)
