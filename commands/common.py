"""What every ``probe`` command shares: how features are extracted (:class:`FeatureSpec`), loading a
checkpoint and its data under that spec, parsing cells, output folders and the result type.

``commands/`` is the only layer that reads checkpoints and writes files; the measures, figures
and claim rules it calls live in ``analysis/`` and ``probe/``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from repdyn.probe.cache import DEFAULT_CACHE, FeatureCache
from repdyn.probe.grid import GridFeatures, default_ts, extract_grid, validate_ts
from repdyn.core.timesteps import format_t
from repdyn.model.checkpoint import LoadedCheckpoint, load_checkpoint, run_dir_of
from repdyn.model.torch_file import file_sha
from repdyn.datasets.sources import make_dataset
from repdyn.core.files import (FOLDER_LOCK, atomic_write_text, check_writable, held_folders, lock_folder,
                               save_figure, unlock_folder)

__all__ = ["FeatureSpec", "Outputs", "load_for_analysis", "dataset_for", "checkpoint_columns", "load_features", "cell_t", "parse_cells",
           "spread_blocks", "analysis_ts", "default_out", "prepare_out", "describe_grid", "weights_word",
           "check_weights", "claim_output", "release_output", "result_identity", "releases_outputs", "prepare_for",
           "checkpoint_tag"]



@dataclass
class FeatureSpec:
    """How features are extracted (the protocol every command states in its titles).

    ``cache_dir=None`` disables the cache. ``split`` defaults to the official test split: the
    analyses describe the representation, they do not fit anything that could overfit it.
    """

    data: str | None = None
    split: str = "test"
    n: int = 512
    label: str = "null"
    pooling: str = "mean"
    seed: int = 0
    batch_size: int = 256
    device: str = "auto"
    cache_dir: str | os.PathLike | None = DEFAULT_CACHE
    family: str | None = None
    time_convention: str | None = None
    num_heads: int | None = None
    trust: bool = False
    progress: bool = True


@dataclass
class Outputs:
    """What a command wrote: its folder, the files by label (printed by the CLI, in order) and what
    the checkpoint loader ignored or inferred (``notes``, printed and recorded in the folder)."""

    out: Path
    files: dict[str, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def save(self, label: str, fig: Any, name: str, pdf: bool = False) -> Path:
        """Save a figure into the folder under ``label``."""
        self.files[label] = save_figure(fig, self.out / name, pdf)
        return self.files[label]

    def finish(self: "R") -> "R":
        """Record the files written (and the loader's notes) and release the folder for other processes."""
        release_output(self.out, [p.name for p in self.files.values()], self.notes)
        return self


# ----------------------------------------------------------------------------------------------
# Output folders: one writer at a time, never silently replaced
# ----------------------------------------------------------------------------------------------

OWNER_FILE = ".repdyn-output.json"  # what the folder holds: command, checkpoint(s), settings, files
LOCK_FILE = FOLDER_LOCK  # the pid of the process writing it


def releases_outputs(fn):
    """Decorator for a ``run_*``: output folders it claimed are released if it fails (a notebook
    that hit an error must not keep other processes out of the folder)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        before = held_folders()
        try:
            return fn(*args, **kwargs)
        except BaseException:
            for path in held_folders() - before:
                release_output(path)
            raise

    return wrapper


def _canonical(identity: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(identity, sort_keys=True, default=str))


def claim_output(path: Path, identity: dict[str, Any], overwrite: bool = False) -> None:
    """Create and lock ``path`` for this process, and record what it will hold.

    * a file at ``path``: error (a folder is expected);
    * a live process holding the folder: error naming its pid (two writers would mix results);
    * a folder recorded for another identity (other checkpoint, weights or settings): error unless
      ``overwrite``, which first removes the files that result recorded; the same identity (a rerun,
      a resumed study step) is fine, and so is a record of a run that failed before finishing.
    """
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {path} is a file; give a folder")
    check_writable(path, "--out")  # a read-only folder fails here, in one line, before any work
    path.mkdir(parents=True, exist_ok=True)
    lock_folder(path)  # the pid lock every command shares, train included (core/files.py)
    owner = path / OWNER_FILE
    want = _canonical(identity)
    try:
        have = json.loads(owner.read_text()) if owner.exists() else None
    except (OSError, json.JSONDecodeError):
        have = None
    if have is not None and have.get("identity") != want and have.get("files"):  # a finished result
        if not overwrite:
            release_output(path)
            old = have.get("identity", {})
            diff = sorted(k for k in set(old) | set(want) if old.get(k) != want.get(k))
            raise ValueError(f"{path} holds results of another run ({', '.join(diff)} differ); pass --overwrite to "
                             "replace them or choose another --out")
        for name in have.get("files", []):
            (path / Path(name).name).unlink(missing_ok=True)
    kept = have.get("files", []) if have is not None and have.get("identity") == want else []
    atomic_write_text(owner, json.dumps({"identity": want, "files": kept}, indent=1))


def release_output(path: Path, files: list[str] | None = None, notes: list[str] | None = None) -> None:
    """Record ``files`` as the folder's results and the loader's ``notes`` (if given), and drop this
    process's lock."""
    path = Path(path)
    owner = path / OWNER_FILE
    if files is not None and owner.exists():
        rec = json.loads(owner.read_text())
        rec["files"] = sorted(set(rec.get("files", [])) | set(files))
        if notes is not None:
            rec["checkpoint_load"] = list(notes)  # what was ignored or inferred when loading
        atomic_write_text(owner, json.dumps(rec, indent=1))
    unlock_folder(path)


def result_identity(ck: LoadedCheckpoint, spec: FeatureSpec | None = None, **settings: Any) -> dict[str, Any]:
    """What a result depends on: the checkpoint's content and weights, the extraction protocol (not
    the cache, device, batch size or progress bars) and the command's own settings."""
    proto = {k: v for k, v in asdict(spec).items() if k not in ("cache_dir", "device", "batch_size", "progress",
                                                                "trust", "num_heads")} if spec else {}
    return {"checkpoint_sha": ck.sha, "weights": ck.weights, **proto, **settings}


def check_weights(weights: str) -> str:
    if weights not in ("ema", "model"):
        raise ValueError(f"--weights must be ema or model, got {weights!r}")
    return weights


def load_for_analysis(path: str | os.PathLike, weights: str, spec: FeatureSpec) -> LoadedCheckpoint:
    return load_checkpoint(path, weights=check_weights(weights), family=spec.family,
                           time_convention=spec.time_convention, num_heads=spec.num_heads, trust=spec.trust)


def checkpoint_columns(ck: LoadedCheckpoint) -> dict[str, object]:
    """The columns that tie a result row to its checkpoint, as every probe table writes them, so
    ``probe correlate`` can join any of them with ``probe eval``'s metrics (on the content hash)."""
    return {"run": ck.run_name, "checkpoint": str(Path(ck.path).resolve()), "checkpoint_sha": ck.sha,
            "step": ck.step, "weights": ck.weights}


def dataset_for(ck: LoadedCheckpoint, spec: FeatureSpec, split: str | None = None):
    """The dataset a command analyses: ``--data`` when given, else the one the run trained on, in the
    checkpoint's channels (:meth:`LoadedCheckpoint.dataset_inputs`)."""
    return make_dataset(spec.data or ck.data or "fashion-mnist", split or spec.split, **ck.dataset_inputs())


def load_features(ck: LoadedCheckpoint, spec: FeatureSpec, *, blocks: Sequence[int] | None = None,
                  ts: Sequence | None = None, split: str | None = None, n: int | None = None,
                  pooling: str | None = None, indices: Sequence[int] | None = None,
                  dataset=None) -> tuple[Any, GridFeatures]:
    """Grid features of a loaded checkpoint under ``spec`` (overrides per call); returns (dataset, grid)."""
    ds = dataset if dataset is not None else dataset_for(ck, spec, split)
    cache = FeatureCache(spec.cache_dir) if spec.cache_dir is not None else None
    g = extract_grid(ck, ds, blocks=blocks, ts=ts, n_samples=n if n is not None else spec.n,
                     label_policy=spec.label, pooling=pooling or spec.pooling, batch_size=spec.batch_size,
                     seed=spec.seed, device=spec.device, cache=cache, split=split or spec.split, indices=indices,
                     progress=spec.progress)
    return ds, g


def cell_t(ck: LoadedCheckpoint, t) -> float | int:
    """One t in the checkpoint family's canonical form (SiT float, DiT int), validated."""
    return validate_ts([t], ck.family, ck.num_timesteps)[0]


def parse_cells(cells: Sequence[str | tuple] | None) -> list[tuple[int, float]]:
    """``["2,0.5", "4,0.3"]`` (or tuples) -> [(2, 0.5), (4, 0.3)]; a clear error otherwise."""
    out = []
    for c in cells or []:
        if isinstance(c, tuple):
            b, t = c
        else:
            parts = [p.strip() for p in str(c).replace(":", ",").split(",") if p.strip()]
            if len(parts) != 2:
                raise ValueError(f"a cell is 'block,t' (e.g. 4,0.5), got {c!r}")
            b, t = parts
        try:
            out.append((int(b), float(t)))
        except ValueError:
            raise ValueError(f"a cell is 'block,t' with an integer block and a numeric t, got {c!r}") from None
    return out


def spread_blocks(depth: int, max_blocks: int) -> list[int]:
    """All blocks for shallow models, else ``max_blocks`` evenly spaced ones including 1 and depth."""
    if depth <= max_blocks:
        return list(range(1, depth + 1))
    return sorted({int(round(x)) for x in np.linspace(1, depth, max_blocks)})


def analysis_ts(ck: LoadedCheckpoint, few: bool) -> list:
    """The layer-grid default, or SRA's PCA times (0.1, 0.3, 0.5, 0.7; DiT analogues) when ``few``."""
    if not few:
        return default_ts(ck.family, ck.num_timesteps)
    fr = (0.1, 0.3, 0.5, 0.7)
    return list(fr) if ck.family == "sit" else [int(f * ck.num_timesteps) for f in fr]


def checkpoint_tag(ckpt: str | os.PathLike, sha: str | None = None) -> str:
    """``<run>-<checkpoint stem>-<sha8>``: unique per checkpoint file even when every run names its
    checkpoints by step (``runs/sit/checkpoints/0000030.pt`` vs ``runs/dit/checkpoints/0000030.pt``)."""
    return f"{run_dir_of(ckpt).name}-{Path(ckpt).stem}-{(sha or file_sha(ckpt))[:8]}"


def default_out(root: str | os.PathLike, ckpt: str | os.PathLike, weights: str, identity: dict[str, Any],
                *parts: str, sha: str | None = None) -> Path:
    """``<root>/<run>-<ckpt stem>-<sha8>-<weights>[-<parts>]-<settings hash8>``: one folder per analysed
    checkpoint file, weights and every setting of ``identity`` that changes the result (``--t``,
    ``--other``, ``--blocks``, ...), so two commands that differ only in a setting never share one."""
    settings = {k: v for k, v in _canonical(identity).items() if k not in ("checkpoint_sha", "weights")}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return Path(root) / "-".join([checkpoint_tag(ckpt, sha), weights, *parts, digest])


R = TypeVar("R", bound=Outputs)


def prepare_out(out: str | os.PathLike | None, kind: str, ckpt, weights: str, result: type[R] = Outputs, *,
                identity: dict[str, Any] | None = None, overwrite: bool = False, sha: str | None = None) -> R:
    """The command's output folder, claimed for this process and these results, in its result type.

    Called before any heavy work. ``identity`` (the checkpoint and every setting that changes the
    results) is recorded in the folder; a folder recorded for another identity is never replaced
    unless ``overwrite`` (see :func:`claim_output`). ``Outputs.finish()`` releases the claim.
    """
    identity = {"command": kind, **(identity or {})}
    path = Path(out) if out is not None else default_out(Path("figures") / kind, ckpt, weights, identity, sha=sha)
    claim_output(path, identity, overwrite)
    return result(path)


def prepare_for(ck: LoadedCheckpoint, out: str | os.PathLike | None, kind: str, result: type[R] = Outputs, *,
                identity: dict[str, Any] | None = None, overwrite: bool = False) -> R:
    """:func:`prepare_out` for a loaded checkpoint: its default folder, and its load notes carried."""
    res = prepare_out(out, kind, ck.path, ck.weights, result, identity=identity, overwrite=overwrite, sha=ck.sha)
    res.notes = ck.load_notes()
    return res


def weights_word(weights: str) -> str:
    return "EMA" if weights == "ema" else "online"


def describe_grid(ck: LoadedCheckpoint, g: GridFeatures, **extra: Any) -> dict[str, Any]:
    """Title metadata: model, step, weights, protocol (data/split, n, label policy, pooling, seed)."""
    m = g.meta
    proto = (f"{m['dataset']}/{m['split']} n={m['n_samples']}, label={m['label_policy']}, "
             f"pooling={m['pooling']}, seed={m['seed']}")
    d = {"model": m.get("model"), "step": ck.step, "weights": weights_word(ck.weights), "protocol": proto}
    d.update({k: format_t(v) if k == "t" else v for k, v in extra.items()})
    return d
