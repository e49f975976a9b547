"""The study as a list of named, resumable steps: train every run, then probe, analyse and evaluate it.

Each :class:`Step` has its own "already done" check, so an interrupted study resumes at the first
unfinished step. Training and the per-step cost call the trainer directly; the analyses are the
``probe`` commands themselves, reached through :class:`StudyActions` (``repdyn.commands.demo`` binds
them), so a study step and the matching command can never drift apart.
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pandas as pd

from repdyn.core.files import atomic_write_text
from repdyn.core.runtime import machine_description
from repdyn.model.checkpoint import file_sha, list_checkpoints
from repdyn.training.config import MethodSpec, TrainConfig, resolve_config
from repdyn.training.step_cost import interleaved_step_cost
from repdyn.training.trainer import train

from .paths import StudyPaths
from .power import arm_of
from .scales import StudyConfig

__all__ = ["Step", "StudyActions", "FeatureSettings", "study_steps"]


@dataclass
class Step:
    name: str  # what the log line says, e.g. "layer-grid sra"
    kind: str  # the timing bucket: train | cost | layer_grid | curves | eval | similarity | diversity | pca
    done: Callable[[], bool]
    run: Callable[[], Any]
    run_name: str | None = None  # the training run it belongs to (None: a study-wide step)


@dataclass(frozen=True)
class FeatureSettings:
    """The images and noise an analysis step extracts features from (the study's share of a command's
    feature options): ``n`` test images of ``data``, seeded by ``seed``, cached in ``cache_dir``."""

    data: str
    n: int
    seed: int
    device: str
    cache_dir: Path
    progress: bool
    pooling: str = "mean"


class StudyActions(Protocol):
    """The ``probe`` commands a study runs; each writes its tables into ``out`` (or ``metrics``)."""

    def layer_grid(self, ckpt: Path, out: Path, *, data: str, ts: list[float], n_train: int, n_test: int,
                   device: str, cache_dir: Path, seed: int, progress: bool) -> Any: ...

    def curves(self, run_dir: Path, out: Path, features: FeatureSettings, *, student_block: int,
               teacher_block: int, t: float, t_teacher: float, n_train: int, n_test: int, n_div: int,
               encoder: str) -> Any: ...

    def evaluate(self, ckpt: Path, metrics: Path, *, n: int, data: str, device: str, sampler: str, steps: int,
                 seed: int, weights: str = "ema") -> Any: ...

    def similarity(self, ckpt: Path, out: Path, features: FeatureSettings, *, ts: list[float]) -> Any: ...

    def diversity(self, ckpt: Path, out: Path, features: FeatureSettings, *, ts: list[float]) -> Any: ...

    def pca(self, ckpt: Path, out: Path, features: FeatureSettings, *, images: list[int]) -> Any: ...


def _evaluated(metrics: Path, weights: str = "ema") -> set[str]:
    """The checkpoints (sha) evaluated on ``weights`` in the study's metrics table."""
    if not metrics.exists():
        return set()
    ev = pd.read_csv(metrics, dtype={"ckpt_sha": str})
    return set(ev.loc[ev["weights"] == weights, "ckpt_sha"] if "weights" in ev.columns else ev["ckpt_sha"])


def _curves_done(folder: Path, run_dir: Path) -> bool:
    """Every checkpoint of the run is in the curves' probe table and in their every-block table
    (alignment, spatial: added to a study whose probes are done, they are computed alone)."""
    want = {file_sha(p) for p in list_checkpoints(run_dir)}
    for name in ("curves.csv", "curves_blocks.csv"):
        csv = folder / name
        if not csv.exists() or not want <= set(pd.read_csv(csv, dtype={"checkpoint_sha": str})["checkpoint_sha"]):
            return False
    return True


def train_config(cfg: StudyConfig, method: str, out: Path, **extra: Any) -> TrainConfig:
    """The training config of one run of the study (``extra``: its seed and arm-specific fields)."""
    fields = dict(model=cfg.model, model_overrides=dict(cfg.model_overrides), method=method, data=cfg.data,
                  steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, ema_decay=cfg.ema_decay, seed=cfg.seed,
                  ckpt_every=0, ckpt_steps=cfg.ckpt_steps(), log_every=max(1, cfg.steps // 100), out=str(out),
                  device=cfg.device, opt_state=cfg.opt_state)
    if MethodSpec.parse(method).repa:  # REPA aligns to the study's encoder, the one its curves measure
        fields["repa"] = {"encoder": cfg.encoder}
    return resolve_config(None, None, {**fields, **extra})


def study_steps(cfg: StudyConfig, paths: StudyPaths, actions: StudyActions, progress: bool = True) -> list[Step]:
    """Every step of the study in order (training first; analyses read the final checkpoints)."""
    tables = paths.tables
    ks, kt, t_s, t_t = cfg.sra_cells()
    metrics = paths.eval_metrics

    def feats(n: int, **kw: Any) -> FeatureSettings:
        return FeatureSettings(data=cfg.data, n=n, seed=cfg.seed, device=cfg.device, cache_dir=paths.cache,
                               progress=progress, **kw)

    def final(run_dir: Path) -> Path:
        return run_dir / "checkpoints" / f"{cfg.steps:07d}.pt"

    steps: list[Step] = []
    for name, method, extra in cfg.run_specs():
        run_dir = paths.run_dir(name)
        tc = train_config(cfg, method, run_dir, **extra)
        steps.append(Step(f"train {name}: {cfg.model} {method}, {cfg.steps} steps", "train",
                          lambda r=run_dir: final(r).exists(),
                          lambda tc=tc, r=run_dir: train(tc, resume=r if list_checkpoints(r) else None,
                                                         quiet=not progress), name))
    # C7 compares methods at equal compute: their per-step cost, measured side by side (not wall-clock
    # of runs made one after another, which machine load decides)
    methods = {MethodSpec.parse(m).slug: MethodSpec.parse(m).name for m in cfg.methods}
    steps.append(Step("per-step cost of each method, interleaved", "cost", paths.step_cost.exists,
                      lambda: _measure_cost(cfg, methods, paths.out / "cost-runs", paths.step_cost)))
    for name, _, extra in cfg.run_specs():
        run_dir = paths.run_dir(name)
        if cfg.grid_runs is None or arm_of(name) in cfg.grid_runs:
            lg = tables / f"layer_grid_{name}"
            steps.append(Step(f"layer-grid {name}", "layer_grid", lambda lg=lg: (lg / "layer_grid.csv").exists(),
                              lambda r=run_dir, lg=lg: actions.layer_grid(
                                  final(r), lg, data=cfg.data, ts=list(cfg.grid_ts), n_train=cfg.n_train,
                                  n_test=cfg.n_test, device=cfg.device, cache_dir=paths.cache, seed=cfg.seed,
                                  progress=progress), name))
        cv = tables / f"curves_{name}"
        steps.append(Step(f"curves {name}", "curves", lambda cv=cv, r=run_dir: _curves_done(cv, r),
                          lambda cv=cv, r=run_dir: actions.curves(
                              r, cv, feats(cfg.curve_n_test), student_block=ks, teacher_block=kt, t=t_s,
                              t_teacher=t_t, n_train=cfg.curve_n_train, n_test=cfg.curve_n_test, n_div=cfg.n_div,
                              encoder=cfg.encoder),
                          name))
        for step in cfg.ckpt_steps():
            ck = run_dir / "checkpoints" / f"{step:07d}.pt"
            steps.append(Step(f"eval {name} {ck.name}", "eval", lambda ck=ck: file_sha(ck) in _evaluated(metrics),
                              lambda ck=ck: actions.evaluate(
                                  ck, metrics, n=cfg.eval_n, data=cfg.data, device=cfg.device,
                                  sampler=cfg.eval_sampler, steps=cfg.eval_steps, seed=cfg.seed), name))
        # the online weights of the final checkpoint: a cross-check beside the sampled EMA's, which
        # can lag (or, young, still be its initialisation)
        steps.append(Step(f"eval {name} {final(run_dir).name} (online weights)", "eval",
                          lambda r=run_dir: file_sha(final(r)) in _evaluated(metrics, "model"),
                          lambda r=run_dir: actions.evaluate(
                              final(r), metrics, n=cfg.eval_n, data=cfg.data, device=cfg.device,
                              sampler=cfg.eval_sampler, steps=cfg.eval_steps, seed=cfg.seed, weights="model"), name))
        if extra.get("seed", 0) != 0:  # the figures of one seed per arm
            continue
        for kind, marker, go in (
                ("similarity", "cka.csv",
                 lambda r, o: actions.similarity(final(r), o, feats(cfg.sim_n), ts=list(cfg.sim_ts))),
                ("diversity", "diversity.csv",
                 lambda r, o: actions.diversity(final(r), o, feats(cfg.n_div, pooling="tokens"), ts=list(cfg.sim_ts))),
                ("pca", "pca.npz",
                 lambda r, o: actions.pca(final(r), o, feats(max(cfg.pca_images) + 1), images=list(cfg.pca_images)))):
            out = tables / f"{kind}_{name}"
            steps.append(Step(f"{kind} {name}", kind, lambda o=out, m=marker: (o / m).exists(),
                              lambda go=go, r=run_dir, o=out: go(r, o), name))
    return steps


def _measure_cost(cfg: StudyConfig, methods: dict[str, str], scratch: Path, target: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a short-run EMA warning is irrelevant for a timing
        cost = interleaved_step_cost({arm: train_config(cfg, m, scratch / arm) for arm, m in methods.items()})
    atomic_write_text(target, json.dumps({"seconds_per_step": cost, "machine": machine_description()}, indent=1))
    shutil.rmtree(scratch, ignore_errors=True)
