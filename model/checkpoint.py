"""Checkpoints: atomic writes, exact resume, and one loader for ours and published ones.

Our layout is the REPA/SRA one users know, ``{"model", "ema", "opt", "steps", "epoch"}``, plus
``config`` (the training config as a plain dict) and ``meta`` (family, time convention, data,
method hyper-parameters, RNG states, data position). Everything in it is tensors and plain Python
values, so ``torch.load(path, weights_only=True)`` reads it.

:func:`load_checkpoint` also takes published files: a raw state dict (facebookresearch/DiT,
willisma/SiT releases) or a ``{"model", "ema", ...}`` dict (REPA / SRA / DiverseDiT). Their
architecture is read off the tensor shapes; what shapes cannot say (DiT or SiT? which time
convention? how many heads?) comes from arguments, from the file's training ``args``, or from
keys that settle it, and is recorded in ``LoadedCheckpoint.inferred`` with how it was decided.
Official DiverseDiT fusions (``skip_linears.*`` / ``skip_norms.*``) are renamed onto ours
(``skip_fusions.*``); known training-only heads (REPA ``projectors.*``) are dropped and listed in
``ignored_keys``; any other key the model does not have is an error. ``ck.load_notes()`` says all
of it in one line per fact.
"""

from __future__ import annotations

import functools
import math
import os
import pickle
import pickletools
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from repdyn.core.files import save_torch, sha256_file
from repdyn.model.flow import make_path
from repdyn.model.backbone import MODEL_SIZES, DiffusionTransformer, ModelConfig, model_config
from repdyn.model.objectives import Objective, make_objective

__all__ = ["save_checkpoint", "read_checkpoint", "load_checkpoint", "LoadedCheckpoint", "list_checkpoints",
           "latest_checkpoint", "file_sha", "run_dir_of", "infer_model_config", "rename_official_keys",
           "TRAINING_ONLY_HEADS", "PickledCodeWarning", "pickled_globals",
           "checkpoint_from", "strip_wrapper_prefixes"]

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
    return sha256_file(path)[:n_hex]


def _not_torch_reason(path: Path) -> str | None:
    """Why ``path`` cannot be a ``torch.save`` file, judged from its first bytes (None: it may be one).

    ``torch.save`` writes a zip archive holding ``<name>/data.pkl`` (PyTorch >= 1.6) or, in the
    legacy format, a pickle (protocol >= 2, first byte 0x80); very old files are tar archives.
    """
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        return "the file is empty"
    if head[:4] == b"PK\x03\x04":
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in z.namelist()):
                    return "a zip archive without data.pkl"
        return None  # a (possibly truncated) torch zip: torch.load says what is wrong
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return None  # legacy torch.save (pickle)
    if len(head) >= 262 and head[257:262] == b"ustar":
        return None  # pre-1.0 tar format
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return f"it starts with {head[:12]!r}, neither a zip archive nor a pickle"
    first = text.strip().splitlines()[0][:40] if text.strip() else ""
    return f"it looks like a text file (starts {first!r})"


def _one_line(e: BaseException) -> str:
    """The informative line of an exception message (torch's weights-only errors span many lines)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in lines:
        if ln.startswith("WeightsUnpickler error:"):
            return ln
    return lines[0] if lines else type(e).__name__


class PickledCodeWarning(UserWarning):
    """A checkpoint loaded with ``trust=True`` pickles code (functions or classes beyond plain data)."""


# Pickled data classes (not code) that published training checkpoints carry: refused without trust, with
# the "pickled Python objects" message; anything else beyond torch's weights-only set is "pickled code".
_PICKLED_DATA = ("argparse.Namespace", "numpy.", "collections.", "pathlib.", "datetime.", "builtins.slice",
                 "builtins.range", "builtins.frozenset", "builtins.set", "builtins.complex", "builtins.bytearray")


@functools.lru_cache(maxsize=1)
def _weights_only_globals() -> frozenset[str]:
    """``module.name`` of what ``torch.load(weights_only=True)`` accepts (torch's allow-list)."""
    try:
        from torch import _weights_only_unpickler as wou

        names = set(wou._get_allowed_globals())
    except Exception:  # noqa: BLE001 - a private API: fall back to torch's own namespace
        names = set()
    for obj in getattr(torch.serialization, "get_safe_globals", lambda: [])():
        obj = obj[0] if isinstance(obj, tuple) else obj
        names.add(f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}")
    return frozenset(names)


_STRING_OPS = ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8", "SHORT_BINSTRING", "BINSTRING", "STRING")


def pickled_globals(path: str | os.PathLike) -> list[str] | None:
    """The ``module.name`` globals a ``torch.save`` zip file's pickle refers to, read without
    unpickling anything; None where the file is not a readable torch zip or a global cannot be
    named (only used to word messages and warnings: ``torch.load`` decides what loads)."""
    try:
        with zipfile.ZipFile(path) as z:
            member = next(n for n in z.namelist() if n == "data.pkl" or n.endswith("/data.pkl"))
            data = z.read(member)
        found: set[str] = set()
        pushed: list[str | None] = []  # what recent opcodes pushed (strings; None for anything else)
        memo: dict[int, str | None] = {}
        for op, arg, _ in pickletools.genops(data):
            name = op.name
            if name == "GLOBAL":
                found.add(str(arg).replace(" ", ".", 1))
                pushed.append(None)
            elif name == "STACK_GLOBAL":  # protocol 4+: module and name are the two strings below
                if len(pushed) < 2 or pushed[-2] is None or pushed[-1] is None:
                    return None
                found.add(f"{pushed[-2]}.{pushed[-1]}")
                pushed[-2:] = [None]
            elif name == "MEMOIZE":
                memo[len(memo)] = pushed[-1] if pushed else None
            elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[int(arg)] = pushed[-1] if pushed else None
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                pushed.append(memo.get(int(arg)))
            else:
                pushed.append(str(arg) if name in _STRING_OPS else None)
        return sorted(found)
    except Exception:  # noqa: BLE001 - legacy/tar formats or a damaged zip: torch.load will judge
        return None


def _pickled_code(names: list[str]) -> list[str]:
    """The globals of ``names`` that are code: neither torch's weights-only set nor plain data."""
    allowed = _weights_only_globals()
    return [n for n in names if n not in allowed and not n.startswith(_PICKLED_DATA)
            and not (len(allowed) < 10 and n.startswith("torch."))]  # torch's private allow-list unavailable


def _code_refused(path: Path, code: list[str]) -> ValueError:
    more = ", ..." if len(code) > 3 else ""
    return ValueError(f"{path}: this file contains pickled code ({', '.join(code[:3])}{more}); refused (pass "
                      "--trust-checkpoint only if you trust it)")


def read_checkpoint(path: str | os.PathLike, trust: bool = False, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load`` with clear one-line errors. ``trust=True`` allows pickled objects (official
    training checkpoints store an ``argparse.Namespace``) — only for files you trust. A file that
    pickles code (a ``__reduce__`` calling a function) is refused without ``trust`` and loaded with
    a :class:`PickledCodeWarning` with it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise ValueError(f"{path} is a directory, not a PyTorch checkpoint file")
    reason = _not_torch_reason(path)
    if reason is not None:
        raise ValueError(f"{path} is not a PyTorch checkpoint (unreadable by torch.load: {reason}); "
                         "pass a .pt/.pth file written by torch.save")
    names = pickled_globals(path)
    code = _pickled_code(names) if names else []
    if code and trust:
        warnings.warn(f"{path} contains pickled code ({', '.join(code[:3])}{', ...' if len(code) > 3 else ''}): "
                      "loading it runs that code (--trust-checkpoint)", PickledCodeWarning, stacklevel=2)
    try:
        return torch.load(path, map_location=map_location, weights_only=not trust)
    except pickle.UnpicklingError as e:
        m = re.search(r"unsupported global:? (?:GLOBAL )?([\w.]+)", str(e), re.IGNORECASE)
        if not trust and (m or code):
            refused = code or _pickled_code([m.group(1).rstrip(".")])  # the scan, else torch's first refusal
            if refused:
                raise _code_refused(path, refused) from None
            raise ValueError(
                f"{path} contains pickled Python objects (e.g. an argparse.Namespace, as official REPA/SRA "
                "training checkpoints do); if you trust the file, pass --trust-checkpoint (weights_only=False)"
            ) from None
        raise ValueError(f"checkpoint {path} is unreadable (corrupt or truncated?): {_one_line(e)}") from None
    except (ModuleNotFoundError, AttributeError) as e:
        raise ValueError(f"{path} pickles Python objects whose code is not importable here: {_one_line(e)}") from None
    except Exception as e:  # noqa: BLE001 - torch.load raises many types on damaged files
        raise ValueError(f"checkpoint {path} is unreadable (corrupt or truncated?): {_one_line(e)}") from None


# ----------------------------------------------------------------------------------------------
# Loading for probing / sampling
# ----------------------------------------------------------------------------------------------


# Heads that only an official training loss uses: dropped when loading, listed in ignored_keys.
# (SRA's ``ap_head.*`` is not here: it is our ``sra_head`` and loads as one.)
TRAINING_ONLY_HEADS: dict[str, str] = {"projectors.": "REPA projector heads"}

# Official DiverseDiT (kobeshegu/DiverseDiT models/sit.py) names of the long-skip fusions -> ours.
_DIVERSEDIT_RENAMES = (
    (re.compile(r"^skip_linears\.(\d+)\.linear\.(weight|bias)$"), r"skip_fusions.\1.linear.\2"),
    (re.compile(r"^skip_norms\.(\d+)\.(weight|bias)$"), r"skip_fusions.\1.norm.\2"),
)
_OFFICIAL_SKIP_PREFIXES = ("skip_linears.", "skip_norms.")


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
    # What the loader decided itself for a foreign file: name -> "value (how)"; {} for ours.
    inferred: dict[str, str] = field(default_factory=dict)
    # Other facts the user should see, one line each (e.g. --weights model on a one-set release).
    notes: list[str] = field(default_factory=list)

    def load_notes(self) -> list[str]:
        """One line per ignored key group and per inferred fact (empty for our own checkpoints), e.g.
        ``ignored 6 training-only keys: projectors.* (REPA projector heads)``,
        ``inferred family sit from args.path_type``."""
        notes = []
        rest = list(self.ignored_keys)
        for prefix, label in TRAINING_ONLY_HEADS.items():
            hit = [k for k in rest if k.startswith(prefix)]
            if hit:
                notes.append(f"ignored {len(hit)} training-only key{'s' * (len(hit) != 1)}: {prefix}* ({label})")
                rest = [k for k in rest if not k.startswith(prefix)]
        if rest:
            more = ", ..." if len(rest) > 4 else ""
            plural = "s" * (len(rest) != 1)
            notes.append(f"ignored {len(rest)} key{plural} not in the model: {', '.join(rest[:4])}{more}")
        for name, text in self.inferred.items():
            value, sep, how = text.partition(" (")
            if sep and how.endswith(")"):
                notes.append(f"inferred {name} {value} {how[:-1]}")
            else:
                notes.append(f"inferred {name} {text}")
        return notes + list(self.notes)

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

    def dataset_inputs(self) -> dict[str, int]:
        """What the network takes, as :func:`repdyn.datasets.sources.make_dataset` keywords: data follow
        the model (a grayscale folder for a one-channel model, RGB for three; a folder's image size)."""
        cfg = self.model.config
        return {"channels": int(cfg.in_channels), "image_size": int(cfg.input_size)}

    @property
    def run_dir(self) -> Path:
        return run_dir_of(self.path)

    @property
    def run_name(self) -> str:
        return self.run_dir.name


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


def _namespace_get(args: Any, name: str) -> Any:
    if args is None:
        return None
    if isinstance(args, dict):
        return args.get(name)
    return getattr(args, name, None)


def _infer_num_heads(hidden: int, args: Any) -> tuple[int, str]:
    """Heads from the training args (``num_heads``, or a registry ``model`` name of this width),
    else the official width table."""
    for name in _HEAD_ARG_NAMES:
        v = _namespace_get(args, name)
        if v is not None:
            try:
                return int(v), f"from args.{name}"
            except (TypeError, ValueError):
                raise ValueError(f"the checkpoint's args.{name} = {v!r} is not an integer; pass --num-heads") from None
    name = _namespace_get(args, "model")
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
    name = _namespace_get(args, "model")
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
    if _namespace_get(args, "path_type") is not None:
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


def load_checkpoint(path: str | os.PathLike, weights: str = "ema", *, family: str | None = None,
                    time_convention: str | None = None, num_heads: int | None = None, trust: bool = False,
                    map_location: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Model (eval mode) + meta from our checkpoint or a published DiT/SiT/REPA/SRA/DiverseDiT file.

    ``weights``: "ema" (default, what papers sample and probe) or "model" (online weights).
    ``family`` / ``time_convention`` / ``num_heads``: needed only for foreign files whose layout and
    training args do not settle them; what was inferred is in ``.inferred`` / ``.load_notes()``.
    """
    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    path = Path(path)
    obj = read_checkpoint(path, trust=trust, map_location=map_location)
    return checkpoint_from(obj, path, weights, family=family, time_convention=time_convention, num_heads=num_heads)


def checkpoint_from(obj: Any, path: Path, weights: str = "ema", *, family: str | None = None,
                    time_convention: str | None = None, num_heads: int | None = None,
                    sha: str | None = None) -> LoadedCheckpoint:
    """:func:`load_checkpoint` on a file already read (``obj``): a caller that needs both weight sets
    (a warm start) reads a large file once. ``sha``: the file's, when the caller has it."""
    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict or state dict")
    inferred: dict[str, str] = {}
    load_notes: list[str] = []
    if family is not None and family not in ("dit", "sit"):
        raise ValueError(f"--family must be dit or sit, got {family!r}")

    if "meta" in obj and "config" in obj and "model" in obj:  # ours
        foreign = False
        meta = dict(obj["meta"])
        if family is not None and meta.get("family") not in (None, family):
            raise ValueError(f"--family {family} contradicts {path.name}: it is a {meta['family']} checkpoint "
                             "(recorded by the trainer); drop --family")
        cfg = ModelConfig.from_dict(meta["model_config"])
        if weights not in obj:
            raise ValueError(f"{path} has no {weights!r} weights; available: model, ema")
        sd = strip_wrapper_prefixes(obj[weights])
        config = dict(obj["config"])
        step = obj.get("steps")
    else:  # foreign
        foreign = True
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
            flow_path, how = _sit_path(_namespace_get(args, "path_type"), time_convention)
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
        config = {}

    model = DiffusionTransformer(cfg)
    own = model.state_dict()
    expected = set(own)
    missing = sorted(expected - set(sd))
    if missing:
        raise ValueError(f"{path.name} is missing {len(missing)} parameter(s) for a {cfg.depth}-block "
                         f"{cfg.family.upper()} (e.g. {', '.join(missing[:4])})")
    extra = set(sd) - expected
    if foreign:
        ignored = sorted(k for k in extra if k.startswith(tuple(TRAINING_ONLY_HEADS)))
        unexpected = sorted(extra - set(ignored))
        if unexpected:
            more = f" and {len(unexpected) - 4} more" if len(unexpected) > 4 else ""
            raise ValueError(f"{path.name} has {len(unexpected)} key(s) that are neither part of a {cfg.depth}-block "
                             f"{cfg.family.upper()} nor a known training-only head: {', '.join(unexpected[:4])}{more} "
                             "(a variant this loader does not build; not loading it without them)")
    else:
        ignored = sorted(extra)
    for k in expected:
        if sd[k].shape != own[k].shape:
            raise ValueError(f"{path.name}: parameter {k} has shape {tuple(sd[k].shape)}, "
                             f"expected {tuple(own[k].shape)}")
    model.load_state_dict({k: sd[k] for k in expected})
    model.eval().requires_grad_(False)
    objective = make_objective(meta["family"], path=meta.get("path", "linear"),
                               learn_sigma=bool(meta.get("learn_sigma", True)),
                               num_timesteps=int(meta.get("num_timesteps", 1000)))
    ck = LoadedCheckpoint(model=model, weights=weights, meta=meta, config=config, objective=objective, path=path,
                          sha=sha or file_sha(path), step=step, ignored_keys=ignored, inferred=inferred, notes=load_notes)
    warn_immature_ema(ck)
    return ck


def ema_init_fraction(ck: LoadedCheckpoint) -> float | None:
    """How much of the EMA weights is still the random initialisation: the product of the per-step
    decays since step 0 (the trainer's EMA starts as a copy of the initial model and decays at a
    constant rate). None where the file does not say (published files, a run started from published
    weights whose step count was unknown) or for the online weights."""
    decay = ck.config.get("ema_decay")
    warm = ck.meta.get("warm_start")
    if ck.weights != "ema" or decay is None or ck.step is None or (warm and warm.get("steps") is None):
        return None
    return init_fraction(decay, ck.step)


def init_fraction(decay: float | None, step: float) -> float:
    """The share of its initial weights an EMA still holds after ``step`` updates: the product of the
    per-step decays since step 0, ``decay ** step`` (the trainer's EMA starts as a copy of the
    initial model and uses a constant decay). NaN when the decay is unknown."""
    if decay is None or not math.isfinite(float(decay)) or not math.isfinite(float(step)):
        return math.nan
    return float(decay) ** float(step)


MAX_INIT_FRACTION = 0.10  # above this, probes and samples of the EMA mostly describe the initialisation


def warn_immature_ema(ck: LoadedCheckpoint) -> None:
    """Warn when probing or sampling an EMA that is still more than 10% its initialisation (any method:
    a 40-step baseline at decay 0.999 gives CKA 1.00 between all blocks and chance-level probes)."""
    frac = ema_init_fraction(ck)
    if frac is not None and frac > MAX_INIT_FRACTION:
        warnings.warn(f"{ck.path.name}: its EMA weights are still {frac:.0%} the random initialisation "
                      f"(ema_decay {ck.config['ema_decay']} over {ck.step} steps); results describe the "
                      "initialisation more than training: use a later checkpoint or --weights model", stacklevel=2)
