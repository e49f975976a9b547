"""Where a command writes: its output folder, claimed for one process and one result, never
silently replaced, named by the checkpoint and every setting that changes the result.

A folder records what it holds (``.repdyn-output.json``: command, checkpoint, settings, files) and
is locked while written (the pid lock of :mod:`repdyn.core.files`), so two writers never mix
results and a rerun with other settings never passes for this one.
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

from repdyn.core.files import (FOLDER_LOCK, atomic_write_text, check_writable, held_folders, lock_folder,
                               save_figure, unlock_folder)
from repdyn.model.checkpoint import LoadedCheckpoint, run_dir_of
from repdyn.model.torch_file import file_sha

from repdyn.commands.features import FeatureSpec

__all__ = ["Outputs", "OWNER_FILE", "LOCK_FILE", "FIGURES_ROOT", "releases_outputs", "claim_output",
           "release_output", "result_identity", "checkpoint_tag", "default_out", "prepare_out", "prepare_for"]


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


OWNER_FILE = ".repdyn-output.json"  # what the folder holds: command, checkpoint(s), settings, files
LOCK_FILE = FOLDER_LOCK  # the pid of the process writing it
FIGURES_ROOT = Path("figures")  # default folders: <FIGURES_ROOT>/<command>/<checkpoint, weights, settings>


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
                identity: dict[str, Any] | None = None, overwrite: bool = False, sha: str | None = None,
                root: str | os.PathLike | None = None, parts: Sequence[str] = ()) -> R:
    """The command's output folder, claimed for this process and these results, in its result type.

    Called before any heavy work. ``identity`` (the checkpoint and every setting that changes the
    results) is recorded in the folder; a folder recorded for another identity is never replaced
    unless ``overwrite`` (see :func:`claim_output`). ``Outputs.finish()`` releases the claim.
    Without ``out`` the folder is :func:`default_out` under ``root`` (default ``figures/<kind>``),
    its name carrying ``parts`` (settings worth reading in a folder name).
    """
    identity = {"command": kind, **(identity or {})}
    root = FIGURES_ROOT / kind if root is None else root
    path = Path(out) if out is not None else default_out(root, ckpt, weights, identity, *parts, sha=sha)
    claim_output(path, identity, overwrite)
    return result(path)


def prepare_for(ck: LoadedCheckpoint, out: str | os.PathLike | None, kind: str, result: type[R] = Outputs, *,
                identity: dict[str, Any] | None = None, overwrite: bool = False,
                root: str | os.PathLike | None = None, parts: Sequence[str] = ()) -> R:
    """:func:`prepare_out` for a loaded checkpoint: its default folder, and its load notes carried."""
    res = prepare_out(out, kind, ck.path, ck.weights, result, identity=identity, overwrite=overwrite, sha=ck.sha,
                      root=root, parts=parts)
    res.notes = ck.load_notes()
    return res
