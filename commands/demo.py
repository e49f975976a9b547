"""``probe demo`` (``make demo``): run (or resume) a study and write its figures and ``REPORT.md``.

The study itself (scales, steps, claim rules, figures, report) is :mod:`repdyn.study`; this command
binds the study's analysis steps to the ``probe`` commands (:class:`CommandActions`), runs the steps
and writes the outputs.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from repdyn.core.runtime import resolve_device
from repdyn.study.engine import record_run, record_study, run_in_processes, run_steps
from repdyn.study.figures import write_figures
from repdyn.study.paths import StudyPaths
from repdyn.study.plan import FeatureSettings, study_steps
from repdyn.study.report import write_report
from repdyn.study.scales import SCALES, StudyConfig
from repdyn.study.tables import load_study_tables

from .features import FeatureSpec
from .curves import run_curves
from .diversity import run_diversity
from .eval import run_eval
from .layer_grid import run_layer_grid
from .pca import run_pca
from .sample import SamplerSettings
from .similarity import run_similarity

__all__ = ["CommandActions", "run_study"]


def _spec(f: FeatureSettings) -> FeatureSpec:
    return FeatureSpec(data=f.data, split="test", n=f.n, device=f.device, cache_dir=f.cache_dir, seed=f.seed,
                       progress=f.progress, pooling=f.pooling)


class CommandActions:
    """The study's analysis steps, each the ``probe`` command of the same name (picklable, so the
    worker processes of ``--jobs`` rebuild the same steps)."""

    def layer_grid(self, ckpt: Path, out: Path, *, data: str, ts: list[float], n_train: int, n_test: int,
                   device: str, cache_dir: Path, seed: int, progress: bool) -> Any:
        spec = FeatureSpec(data=data, n=n_test, device=device, cache_dir=cache_dir, seed=seed, progress=progress)
        return run_layer_grid(ckpt, spec, ts=ts, n_train=n_train, out=out)

    def curves(self, run_dir: Path, out: Path, features: FeatureSettings, **kw: Any) -> Any:
        return run_curves(run_dir, _spec(features), out=out, **kw)

    def evaluate(self, ckpt: Path, metrics: Path, *, n: int, data: str, device: str, sampler: str, steps: int,
                 seed: int, weights: str = "ema") -> Any:
        return run_eval(ckpt, metrics, weights=weights, n=n, data=data, device=str(resolve_device(device)),
                        sampler=SamplerSettings(method=sampler, steps=steps, seed=seed, batch_size=256))

    def similarity(self, ckpt: Path, out: Path, features: FeatureSettings, *, ts: list[float]) -> Any:
        return run_similarity(ckpt, _spec(features), ts=ts, out=out)

    def diversity(self, ckpt: Path, out: Path, features: FeatureSettings, *, ts: list[float]) -> Any:
        return run_diversity(ckpt, _spec(features), ts=ts, out=out)

    def pca(self, ckpt: Path, out: Path, features: FeatureSettings, *, images: list[int]) -> Any:
        return run_pca(ckpt, _spec(features), images=images, out=out)


def run_study(out: str | os.PathLike = "runs/demo", scale: str | StudyConfig = "cpu",
              figures: str | os.PathLike = "figures", progress: bool = True,
              log: Callable[[str], None] = print, only: str | None = None, jobs: int = 1,
              **overrides: Any) -> Path | None:
    """Run (or resume) the whole study; returns the path of ``REPORT.md``.

    ``only``: run just the steps of one training run (its training, probes and evaluations), so the
    runs of a large scale can be spread over machines; copy their ``runs/`` and ``tables/`` into one
    study folder and run once more without ``only`` to gather (finished steps are skipped) and write
    the report. Returns None then.

    ``jobs``: run that many training runs at once, each in its own one-thread process; the
    study-wide steps (the interleaved per-step cost, which needs the machine to itself) run after
    them, in this process."""
    if isinstance(scale, str) and scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; use one of {', '.join(SCALES)}")
    if jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {jobs}")
    cfg = scale if isinstance(scale, StudyConfig) else SCALES[scale]
    cfg = replace(cfg, **overrides) if overrides else cfg
    paths = StudyPaths.of(out)
    paths.make()
    actions = CommandActions()
    t_all = time.perf_counter()
    steps = study_steps(cfg, paths, actions, progress)
    names = sorted({st.run_name for st in steps if st.run_name})
    if only is not None:
        if only not in names:
            raise ValueError(f"--only {only!r} is not a run of scale {cfg.name}; runs: {', '.join(names)}")
        steps = [st for st in steps if st.run_name == only]
    timings: dict[str, float] = {}
    if only is None and jobs > 1:
        timings = run_in_processes(steps, cfg, paths, actions, jobs, log)
    for k, v in run_steps(steps, log).items():
        timings[k] = timings.get(k, 0.0) + v
    timings["total"] = time.perf_counter() - t_all
    if only is not None:
        record_run(paths, only, timings)
        log(f"[done] run {only}; gather with `probe demo --scale {cfg.name} --out {paths.out}`")
        return None
    record_study(paths, cfg, timings)
    log("[figures] writing figures and REPORT.md")
    tables = load_study_tables(out)
    write_figures(tables, figures)
    return write_report(tables, figures, paths.tables)
