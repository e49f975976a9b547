"""``probe train``: resolve a config (preset < YAML < flags < --set), decide the run folder, and train.

This is the one place that decides about run folders; nothing is lost or mixed:

* one writer per run folder: the pid lock of the analysis commands (:func:`repdyn.core.files.lock_folder`),
  held by rank 0 under torchrun; a lock left by a killed process is taken over;
* a folder that holds a run (checkpoints or config.yaml) is trained into again only as ``--resume`` of
  that run, or with ``--overwrite``, which starts it afresh (its checkpoints and records removed);
* ``--resume FILE`` resumes the run folder that contains it (``<run>/checkpoints/FILE``), not the
  folder recorded inside the file; a checkpoint older than the run's newest would have the later ones
  replaced, so that needs ``--overwrite`` (which removes them); a file outside a run folder needs ``--out``
  (ours continues its run there); a published DiT/SiT/REPA/SRA/DiverseDiT file, wherever it lies (the
  official trainers also write ``<exp>/checkpoints/NNNNNNN.pt``), starts a new run in ``--out`` from
  its weights (:mod:`repdyn.training.warm_start`);
* a broken newest checkpoint is named with the last good one to resume from.

Every refusal comes before anything on disk changes.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from repdyn.core.files import check_writable, lock_folder, unlock_folder
from repdyn.core.runtime import dist_info
from repdyn.model.checkpoint import CKPT_RE, list_checkpoints
from repdyn.model.torch_file import CheckpointFile, read_checkpoint
from repdyn.training.config import TrainConfig, merge_config, parse_set_overrides, resolve_config
from repdyn.training.trainer import NO_OPT_STATE, train
from repdyn.training.warm_start import WarmStart, is_own_checkpoint, is_training_checkpoint, read_warm_start

__all__ = ["TrainResult", "run_train", "RUN_RECORDS"]

# What a run writes beside checkpoints/: removed by --overwrite, and (checkpoints or config.yaml) what
# marks a folder as holding a run.
RUN_RECORDS = ("config.yaml", "metrics.csv", "tb")


@dataclass
class TrainResult:
    config: TrainConfig
    checkpoint: Path | None  # the last checkpoint (None off rank 0)
    metrics: Path


@dataclass
class _Source:
    """What ``--resume`` points at: the checkpoint file, its run folder (None outside one) and its
    config; for a published file (not one of our training checkpoints, outside a run folder) the
    file read, which a new run starts from (:mod:`repdyn.training.warm_start`)."""

    ckpt: Path
    run: Path | None
    config: dict[str, Any]
    published: CheckpointFile | None = None


def _step(path: Path) -> int:
    return int(CKPT_RE.match(path.name).group(1))


def _in_run_folder(path: Path) -> Path | None:
    """``<run>`` for ``<run>/checkpoints/NNNNNNN.pt``, else None."""
    inside = path.resolve().parent.name == "checkpoints" and CKPT_RE.match(path.name)
    return path.parent.parent if inside else None


def _same(a: Path | None, b: Path) -> bool:
    return a is not None and a.resolve() == b.resolve()


def _read_source(ckpt: Path, run: Path | None, trust: bool = False) -> _Source:
    """The checkpoint's config; a broken file of a run is named with the last good one before it."""
    try:
        file = read_checkpoint(ckpt, map_location="cpu", trust=trust)
    except ValueError as e:
        if run is None or "unreadable" not in str(e):
            raise
        raise ValueError(_broken_message(ckpt, run, str(e))) from None
    if is_training_checkpoint(file.obj):
        return _Source(ckpt, run, dict(file.obj["config"]))
    if is_own_checkpoint(file.obj):  # ours, saved without its optimiser state
        raise ValueError(f"{ckpt} {NO_OPT_STATE}: resume from a checkpoint that has it, or start the run afresh "
                         "with --overwrite")
    # A published file, even where the official trainers write theirs (<exp>/checkpoints/NNNNNNN.pt, as
    # ours): never a run of this toolkit to resume into.
    return _Source(ckpt, None, {}, published=file)


def _broken_message(ckpt: Path, run: Path, error: str) -> str:
    reason = (error.split(": ", 1)[1] if ": " in error else error).split(". ")[0].rstrip(".")  # torch's first sentence
    good = None
    for earlier in reversed([p for p in list_checkpoints(run) if _step(p) < _step(ckpt)]):
        try:
            read_checkpoint(earlier, map_location="cpu")
        except ValueError:
            continue
        good = earlier
        break
    if good is None:
        return (f"checkpoint {ckpt} is broken ({reason}) and {run} has no readable checkpoint before it; "
                f"start the run afresh with --overwrite")
    return (f"checkpoint {ckpt} is broken ({reason}); the last good checkpoint is {good}: resume from it with "
            f"--resume {good} --overwrite (removes {ckpt.name} and any later checkpoint)")


def _source(resume: str | os.PathLike, trust: bool = False) -> _Source:
    path = Path(resume)
    if path.is_dir():
        run = path.parent if path.name == "checkpoints" else path
        found = list_checkpoints(run)
        if not found:
            raise FileNotFoundError(f"no checkpoints to resume from in {path}")
        return _read_source(found[-1], run, trust)
    if not path.exists():
        raise FileNotFoundError(f"--resume {path} does not exist; give a run folder or <run>/checkpoints/NNNNNNN.pt")
    return _read_source(path, _in_run_folder(path), trust)


def _holds_run(folder: Path) -> bool:
    return bool(list_checkpoints(folder)) or (folder / "config.yaml").exists()


def _later(source: _Source) -> list[Path]:
    """The checkpoints of the source run after the one resumed (a resume would replace or mix them)."""
    return [p for p in list_checkpoints(source.run) if _step(p) > _step(source.ckpt)]


def _check_folder(out: Path, source: _Source | None, overwrite: bool) -> list[Path]:
    """Refuse what would mix or replace a run; return the checkpoints ``--overwrite`` removes."""
    if source is not None and _same(source.run, out):
        later = _later(source)
        if later and not overwrite:
            names = ", ".join(p.name for p in later)
            raise ValueError(f"{source.ckpt} is older than this run's later checkpoint(s) {names}: resuming from it "
                             f"would replace them; resume the newest with --resume {out}, or pass --overwrite to "
                             "discard the later ones")
        return later
    if _holds_run(out):
        if not overwrite:
            ckpts = list_checkpoints(out)
            what = f"{len(ckpts)} checkpoint(s), newest {ckpts[-1].name}" if ckpts else "config.yaml"
            raise ValueError(f"{out} already holds a training run ({what}); continue it with --resume {out}, start "
                             "it afresh with --overwrite, or pass another --out")
        return list_checkpoints(out)
    return []


def _span(ckpts: list[Path]) -> str:
    return ckpts[0].name if len(ckpts) == 1 else f"{ckpts[0].name}..{ckpts[-1].name}"


def _clear(out: Path, ckpts: list[Path], whole_run: bool) -> str | None:
    """Remove ``ckpts`` (and, for a fresh start, the run's records); the one line that says so."""
    for p in ckpts:
        p.unlink(missing_ok=True)
    records = []
    if whole_run:
        for name in RUN_RECORDS:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
            else:
                continue
            records.append(name)
    if not ckpts and not records:
        return None
    parts = [f"{len(ckpts)} checkpoint(s) ({_span(ckpts)})"] if ckpts else []
    parts += records
    start = "started afresh" if whole_run else "resumed"
    return f"overwrite: {start} in {out}: removed {', '.join(parts)}"


def _from_weights(cfg: TrainConfig, warm: WarmStart, overrides: dict[str, Any]) -> TrainConfig:
    """The config of a run that starts from ``warm``: its architecture and interpolant are the file's
    (and, for a method with repa, its projectors' width and block unless ``--set repa.*`` says);
    a flag that asks for another is an error, ``--set model_overrides.*`` is checked by the trainer."""
    fields = warm.config_fields()
    for name in ("model", "path"):
        asked = overrides.get(name)
        if asked is not None and name in fields and asked != fields[name]:
            raise ValueError(f"--{name} {asked} contradicts {warm.path.name}, a {fields['model']} with the "
                             f"{fields.get('path', 'DDPM')} path: drop --{name} (the architecture is the file's)")
    asked_parts = dict(overrides.get("model_overrides") or {})
    repa = {**warm.repa_defaults(), **cfg.repa} if cfg.method_spec.repa else cfg.repa  # the file's projectors
    return replace(cfg, model=fields["model"], model_overrides={**fields["model_overrides"], **asked_parts},
                   path=fields.get("path", cfg.path), init_from=str(warm.path.resolve()), repa=repa).validate()


def run_train(preset: str | None = None, config: str | os.PathLike | None = None, flags: dict[str, Any] | None = None,
              set_: list[str] | None = None, resume: str | os.PathLike | None = None,
              quiet: bool = False, overwrite: bool = False, family: str | None = None,
              num_heads: int | None = None, trust: bool = False) -> TrainResult:
    """``resume`` without ``preset`` / ``config``: the run's own config, changed only by the flags given
    (the trainer refuses changes other than length, logging and place; see
    :data:`repdyn.training.trainer.RESUMABLE_CHANGES`). The run folder is ``--out``, else (resuming) the
    folder that holds the checkpoint. A published file (``resume`` outside a run folder, not ours)
    starts a new run in ``--out`` from its weights; ``family`` / ``num_heads`` / ``trust`` read it."""
    overrides = merge_config(dict(flags or {}), parse_set_overrides(set_ or []))  # --set repa.x keeps --encoder
    source = _source(resume, trust) if resume is not None else None
    warm = None
    if source is not None:
        if overrides.get("out") is None:
            if source.published is not None:
                raise ValueError(f"{source.ckpt} is not a training checkpoint of this toolkit (a published or official "
                                 "file); pass --out to start a new run from its weights")
            if source.run is None:
                raise ValueError(f"{source.ckpt} is not inside a run folder (<run>/checkpoints/NNNNNNN.pt); pass "
                                 "--out to start a new run from it")
            overrides["out"] = str(source.run)
        if source.published is not None:
            warm = read_warm_start(source.ckpt, file=source.published, family=family, num_heads=num_heads)
            source = None  # a new run, from the file's weights
        elif preset is None and config is None:
            overrides = {**source.config, **{k: v for k, v in overrides.items() if v is not None}}
    cfg = resolve_config(preset, config, overrides)
    if warm is not None:
        cfg = _from_weights(cfg, warm, overrides)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder")
    rank = dist_info().rank
    if rank == 0:
        check_writable(out, "--out")  # a read-only place fails in one line, before the data or model are built
        lock_folder(out)  # before looking: a second writer is refused, not raced
    try:
        remove = _check_folder(out, source, overwrite)
        if rank == 0 and overwrite:
            line = _clear(out, remove, whole_run=source is None or not _same(source.run, out))
            if line:
                print(line, flush=True)
        last = train(cfg, resume=source.ckpt if source is not None else None, quiet=quiet, warm=warm)
    finally:
        if rank == 0:
            unlock_folder(out)
    return TrainResult(cfg, last, out / "metrics.csv")
