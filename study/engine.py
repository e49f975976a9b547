"""Running a study's steps: skip what is done, time what runs, spread training runs over processes."""

from __future__ import annotations

import json
import multiprocessing
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

import torch

from repdyn.core.files import atomic_write_text
from repdyn.core.messages import one_line_warning

from .paths import StudyPaths
from .plan import Step, StudyActions, study_steps
from .scales import StudyConfig

__all__ = ["run_steps", "run_in_processes", "record_study", "record_run", "RUN_TIMINGS"]

Timings = dict[str, float]


def _add(total: Timings, part: Timings) -> Timings:
    for k, v in part.items():
        total[k] = total.get(k, 0.0) + v
    return total


def run_steps(steps: Sequence[Step], log: Callable[[str], None]) -> Timings:
    """Run the steps that are not done; compute seconds per step kind."""
    timings: Timings = {}
    for step in steps:
        if step.done():
            continue
        log(f"[{step.kind}] {step.name}")
        t0 = time.perf_counter()
        step.run()
        timings[step.kind] = timings.get(step.kind, 0.0) + time.perf_counter() - t0
    return timings


def run_in_processes(steps: Sequence[Step], cfg: StudyConfig, paths: StudyPaths, actions: StudyActions, jobs: int,
                     log: Callable[[str], None]) -> Timings:
    """Every unfinished training run's steps, ``jobs`` runs at a time, each in its own process on one
    thread (a tiny model barely uses a second thread: two one-thread runs on 2 cores train ~2.7x
    faster than one two-thread run after the other). ``actions`` must pickle (a module-level class)."""
    todo = [n for n in dict.fromkeys(st.run_name for st in steps if st.run_name)
            if not all(st.done() for st in steps if st.run_name == n)]
    log(f"[jobs] {len(todo)} run(s) in {min(jobs, len(todo))} processes of one thread each")
    timings: Timings = {}
    if not todo:
        return timings
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited torch thread pool
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        for part in pool.map(_run_one, [(paths, cfg, actions, n) for n in todo]):
            _add(timings, part)
    return timings


def _run_one(job: tuple[StudyPaths, StudyConfig, StudyActions, str]) -> Timings:
    """One training run's steps in a worker process, on one thread."""
    paths, cfg, actions, name = job
    torch.set_num_threads(1)
    warnings.showwarning = one_line_warning  # as the CLI prints them
    steps = [st for st in study_steps(cfg, paths, actions, progress=False) if st.run_name == name]
    return run_steps(steps, lambda msg: print(f"{msg} ({name})", flush=True))


RUN_TIMINGS = "study_timings.json"  # in a run folder: the compute of its --only sessions


def record_run(paths: StudyPaths, run: str, timings: Timings) -> None:
    """Add an ``--only`` session's compute to its run folder (one writer: the run's own session), so
    that the gathering session can count it; sessions of one run accumulate."""
    path = paths.run_dir(run) / RUN_TIMINGS
    prev = json.loads(path.read_text()) if path.exists() else {}
    total = _add(dict(prev.get("timings_s", {})), timings)
    atomic_write_text(path, json.dumps({"timings_s": total, "sessions": prev.get("sessions", 0) + 1}, indent=2))


def _run_timings(paths: StudyPaths) -> tuple[Timings, int]:
    """The compute of every run's ``--only`` sessions, summed, and how many sessions that was."""
    total: Timings = {}
    sessions = 0
    for f in sorted(paths.runs.glob(f"*/{RUN_TIMINGS}")):
        rec = json.loads(f.read_text())
        total = _add(total, rec.get("timings_s", {}))
        sessions += int(rec.get("sessions", 0))
    return total, sessions


def record_study(paths: StudyPaths, cfg: StudyConfig, timings: Timings) -> None:
    """study.json: config, the cells, the side-by-side per-step cost, and compute time summed over
    sessions of the same config (the gathering ones here, plus every run's ``--only`` sessions,
    :func:`record_run`)."""
    path: Path = paths.study
    prev = json.loads(path.read_text()) if path.exists() else {}
    same = prev.get("config") == json.loads(json.dumps(asdict(cfg), default=str))
    gathered = _add(dict(prev.get("gather_timings_s", prev.get("timings_s", {}))) if same else {}, timings)
    runs, run_sessions = _run_timings(paths)
    total = _add(dict(gathered), runs)
    ks, kt, t_s, t_t = cfg.sra_cells()
    cost = paths.step_cost
    sessions = (prev.get("gather_sessions", prev.get("sessions", 0)) if same else 0) + 1
    info = {"config": asdict(cfg), "timings_s": total, "gather_timings_s": gathered, "gather_sessions": sessions,
            "run_sessions": run_sessions, "sessions": sessions + run_sessions,
            "cells": {"student_block": ks, "teacher_block": kt, "t_student": t_s, "t_teacher": t_t},
            "step_cost": json.loads(cost.read_text())["seconds_per_step"] if cost.exists() else {}}
    atomic_write_text(path, json.dumps(info, indent=2, default=str))
