"""Where a study keeps its parts: one dataclass, built once from the study folder."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["StudyPaths"]


@dataclass(frozen=True)
class StudyPaths:
    """``out/runs/<run>`` (training runs), ``out/tables`` (every CSV behind the figures),
    ``out/cache`` (block features), ``out/study.json`` (config, timings, cells)."""

    out: Path

    @classmethod
    def of(cls, out: str | os.PathLike) -> StudyPaths:
        return cls(Path(out))

    @property
    def runs(self) -> Path:
        return self.out / "runs"

    @property
    def tables(self) -> Path:
        return self.out / "tables"

    @property
    def cache(self) -> Path:
        return self.out / "cache"

    @property
    def study(self) -> Path:
        return self.out / "study.json"

    @property
    def eval_metrics(self) -> Path:
        return self.tables / "eval_metrics.csv"

    @property
    def step_cost(self) -> Path:
        return self.tables / "step_cost.json"

    def run_dir(self, run: str) -> Path:
        return self.runs / run

    def make(self) -> None:
        for p in (self.runs, self.tables, self.cache):
            p.mkdir(parents=True, exist_ok=True)
