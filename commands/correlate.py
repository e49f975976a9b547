"""``probe correlate``: any representation measure vs generation quality across checkpoints or runs.

The x is a probe accuracy, a column such as ``cka_student_teacher``, or a measure of a tidy table
(``cknna``, ``lds``, ... of ``curves_blocks.csv``, ``alignment.csv``, ``spatial.csv``). Intervals
resample runs (or training seeds), not the checkpoints of one run (:mod:`repdyn.analysis.correlation`).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from repdyn.analysis import plots
from repdyn.analysis.correlation import SmallSampleWarning, correlate, join_probe_metrics, measure_rows
from repdyn.core.timesteps import format_t
from repdyn.core.files import write_table

from repdyn.model.checkpoint import run_dir_of
from repdyn.model.torch_file import file_sha
from repdyn.study.power import seed_or_none

from repdyn.commands.features import parse_cells, weights_word
from repdyn.commands.outputs import Outputs, claim_output, releases_outputs

__all__ = ["CorrelationResult", "run_correlate", "prepare_join", "JOIN_KEYS", "BOOT_UNITS"]

BOOT_UNITS = ("auto", "run", "seed", "checkpoint")


@dataclass
class CorrelationResult(Outputs):
    table: pd.DataFrame | None = None  # correlation.csv: one row per estimator
    joined: pd.DataFrame | None = None  # joined.csv: one row per checkpoint
    join_key: str = ""
    warnings: list[str] = field(default_factory=list)


# Join keys, in order of preference. Probe tables (layer_grid.csv, curves.csv) write
# ``checkpoint_sha``; ``probe eval`` (repdyn.evaluation.evaluate.checkpoint_keys) writes ``ckpt_sha``. Both
# are the same file_sha() of the checkpoint file, so the content hash is the default key: it survives
# moving or renaming run folders. ``checkpoint`` (a path) is compared after resolving it.
JOIN_KEYS = ("sha", "checkpoint", "step", "run")


def prepare_join(df: pd.DataFrame, on: str, what: str) -> pd.DataFrame:
    """Give ``df`` the canonical join column for ``on`` (``ckpt_sha``, resolved ``checkpoint``, ...)."""
    df = df.copy()
    if on == "sha":
        if "ckpt_sha" not in df.columns and "checkpoint_sha" in df.columns:
            df["ckpt_sha"] = df["checkpoint_sha"]
        if "ckpt_sha" not in df.columns:
            raise ValueError(f"the {what} table has no ckpt_sha / checkpoint_sha column; join with --on checkpoint, "
                             "step or run")
        df["ckpt_sha"] = df["ckpt_sha"].astype(str)
    elif on == "checkpoint":
        if "checkpoint" not in df.columns:
            raise ValueError(f"the {what} table has no checkpoint column")
        df["checkpoint"] = [str(Path(str(p)).resolve()) for p in df["checkpoint"]]
    elif on in ("step", "run"):
        if on not in df.columns:
            raise ValueError(f"the {what} table has no {on} column")
    else:
        raise ValueError(f"--on must be one of {', '.join(JOIN_KEYS)}, got {on!r}")
    return df


def _read_csv(path: str | os.PathLike, what: str) -> pd.DataFrame:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{what} table {p} does not exist")
    try:
        df = pd.read_csv(p, keep_default_na=False, na_values=[""])  # "null" is a label policy, not NaN
    except pd.errors.EmptyDataError:
        raise ValueError(f"{what} table {p} is empty") from None
    if df.empty:
        raise ValueError(f"{what} table {p} has no rows")
    return df


def _boot_groups(joined: pd.DataFrame, unit: str) -> tuple[np.ndarray | None, str, str]:
    """(group label per point or None, the unit's name, a warning or ""). ``auto``: runs when the
    points span several, else checkpoints, said in the warning."""
    runs = joined["run"].astype(str) if "run" in joined.columns else None
    if unit == "auto":
        unit = "run" if runs is not None and runs.nunique() > 1 else "checkpoint"
        if unit == "checkpoint":
            return None, unit, ("all points come from one run: the interval resamples its checkpoints, which are not "
                                "independent draws, so it is narrower than another run would show; correlate several "
                                "runs or seeds")
    if unit == "checkpoint":
        return None, unit, ""
    if runs is None:
        raise ValueError(f"--boot-unit {unit} needs a run column (or checkpoint paths inside run folders)")
    if unit == "run":
        return runs.to_numpy(), unit, ""
    seeds = [seed_or_none(r) for r in runs]
    if None in seeds:
        raise ValueError("--boot-unit seed needs run names <arm>-s<seed> (as the study writes them); use --boot-unit run")
    return np.array(seeds), "seed", ""


@releases_outputs
def run_correlate(probe_csv: str | os.PathLike | Sequence[str | os.PathLike], metrics_csv: str | os.PathLike, *,
                  metric: str, value: str = "accuracy", cell: str | tuple | None = None,
                  weights: str | None = None, role: str | None = None, on: str = "auto", agg: str | None = None,
                  control_step: bool = True, n_boot: int = 2000, boot_unit: str = "auto",
                  settings_hash: str | None = None,
                  out: str | os.PathLike | None = None, pdf: bool = False,
                  overwrite: bool = False) -> CorrelationResult:
    """Join a representation measure with a generation-metrics table and correlate (one point per
    checkpoint).

    ``probe_csv``: ``layer_grid.csv`` / ``curves.csv`` / ``curves_blocks.csv`` / ``alignment.csv`` /
    ``spatial.csv`` file(s) (several are concatenated: across runs); ``value``: a column or a measure
    of a tidy table. ``boot_unit``: what the bootstrap resamples: ``run`` (the default where the
    points come from several runs), ``seed`` (all arms of a training seed together; runs named
    ``<arm>-s<seed>``) or ``checkpoint`` (the default for one run, with a warning: checkpoints of
    one run are not independent). ``metrics_csv``: ``probe eval``'s table or any CSV with a key column and ``metric``.
    ``on``: ``sha`` (default when both tables have a checkpoint hash), ``checkpoint`` (path),
    ``step`` or ``run``. Weights are *not* a key: generation uses EMA weights while a student
    probe uses online ones; filter with ``weights``. Writes ``correlation.csv`` (Pearson,
    Spearman, Kendall, partial on step, bootstrap CIs), ``joined.csv`` and ``correlation.png``.
    """
    paths = [probe_csv] if isinstance(probe_csv, (str, os.PathLike)) else list(probe_csv)
    ident = {"command": "correlate", "inputs": [file_sha(p) for p in [*paths, metrics_csv] if Path(p).exists()],
             "metric": metric, "value": value, "cell": cell, "weights": weights, "role": role, "on": on, "agg": agg,
             "control_step": control_step, "n_boot": n_boot, "boot_unit": boot_unit, "settings_hash": settings_hash}
    default = Path("figures") / "correlate" / f"{metric}-{hashlib.sha256(json.dumps(ident, default=str).encode()).hexdigest()[:8]}"
    if boot_unit not in BOOT_UNITS:
        raise ValueError(f"--boot-unit must be one of {', '.join(BOOT_UNITS)}, got {boot_unit!r}")
    probe = measure_rows(pd.concat([_read_csv(p, "probe") for p in paths], ignore_index=True), value)
    if settings_hash is not None:
        if "settings_hash" not in probe.columns:
            raise ValueError("--settings-hash given but the table has no settings_hash column")
        probe = probe[probe["settings_hash"].astype(str) == str(settings_hash)]
        if probe.empty:
            raise ValueError(f"no rows of settings_hash {settings_hash} for measure {value!r}")
    if "run" not in probe.columns and "checkpoint" in probe.columns:  # layer_grid.csv: the folder names the run
        probe["run"] = [run_dir_of(str(c)).name for c in probe["checkpoint"]]
    metrics = _read_csv(metrics_csv, "metrics")
    if metric not in metrics.columns:
        cands = [c for c in metrics.columns if c.startswith(("fd_", "fid", "cond_acc", "is", "kid", "prec", "rec"))]
        raise ValueError(f"metrics table {metrics_csv} has no column {metric!r}"
                         + (f"; metric columns: {', '.join(cands)}" if cands else f" (columns: {', '.join(metrics.columns)})"))
    if pd.to_numeric(metrics[metric], errors="coerce").notna().sum() == 0:
        raise ValueError(f"metrics column {metric!r} in {metrics_csv} is empty (no numeric values)")
    metrics[metric] = pd.to_numeric(metrics[metric], errors="coerce")
    if value not in probe.columns:
        raise ValueError(f"probe table has no column {value!r} (columns: {', '.join(probe.columns)})")
    if on == "auto":
        has = lambda df: "ckpt_sha" in df.columns or "checkpoint_sha" in df.columns  # noqa: E731
        on = "sha" if has(probe) and has(metrics) else next(
            (k for k in ("checkpoint", "step", "run") if k in probe.columns and k in metrics.columns), None)
        if on is None:
            raise ValueError("the probe and metrics tables share no key column (ckpt_sha/checkpoint_sha, checkpoint, "
                             "step, run); add one to the metrics CSV")
    probe = prepare_join(probe, on, "probe")
    metrics = prepare_join(metrics, on, "metrics")
    key = "ckpt_sha" if on == "sha" else on
    filt: dict[str, Any] = {}
    if cell is not None:
        (b, t), = parse_cells([cell])
        filt.update(block=b, t=t)
    for col, v in (("weights", weights), ("role", role)):
        if v is not None:
            if col not in probe.columns:
                raise ValueError(f"--{col} given but the probe table has no {col} column")
            filt[col] = v
    if "step" in metrics.columns and "step" in probe.columns and key != "step":
        metrics = metrics.drop(columns="step")  # keep the probe table's step (same checkpoint)
    metrics = metrics.drop_duplicates(subset=[key], keep="last")
    try:
        joined = join_probe_metrics(probe, metrics, metric, on=[key], probe_value=value, cell=filt or None, agg=agg)
    except ValueError as e:
        msg = str(e)
        if "several probe rows" in msg:
            hashes = sorted(probe["settings_hash"].astype(str).unique()) if "settings_hash" in probe.columns else []
            if len(hashes) > 1:
                raise ValueError(f"the table holds results of {len(hashes)} settings ({', '.join(hashes)}): keep one "
                                 "with --settings-hash") from None
            raise ValueError("several probe rows per checkpoint: choose one with --cell BLOCK,T (and --weights / "
                             "--role for curves.csv), or reduce with --agg max") from None
        raise
    if metric == value:
        raise ValueError("--metric and --value name the same column")
    control = joined["step"] if control_step and "step" in joined.columns and joined["step"].nunique() > 1 else None
    groups, unit, note = _boot_groups(joined, boot_unit)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SmallSampleWarning)
        table = correlate(joined[value], joined[metric], control=control, n_boot=n_boot, x_name=value, y_name=metric,
                          groups=groups, group_name=unit)
    small = [str(w.message) for w in caught if issubclass(w.category, SmallSampleWarning)] + ([note] if note else [])
    table.insert(0, "join_key", key)
    for col, v in filt.items():
        table[col] = v
    first = probe.iloc[0]
    desc = []
    if cell is not None:
        desc.append(f"block {filt['block']}, t={format_t(filt['t'])}")
    if weights or role:
        desc.append(" ".join(x for x in (role, weights_word(weights) if weights else None) if x))
    meta = {"model": first.get("model") if "model" in probe.columns else None,
            "protocol": (f"{first.get('probe', '?')} probe, label={first.get('label_policy', '?')}, "
                         f"n_train={first.get('n_train', '?')}") if "probe" in probe.columns else None,
            "join": f"{key}, n={len(joined)}", "intervals": f"bootstrap over {table['boot_unit'].iloc[0]}"}
    lab = (joined["step"] if "step" in joined.columns else joined[key]).tolist()
    res = CorrelationResult(Path(out) if out is not None else default)
    claim_output(res.out, ident, overwrite)  # after the inputs are validated: a typo creates no folder
    res.warnings, res.join_key = small, key
    pct = value in ("accuracy", "val_accuracy", "train_accuracy")  # drawn in %, as every other figure
    res.save("png", plots.plot_correlation(
        joined[value] * (100 if pct else 1), joined[metric], table,
        xlabel=(f"probe {value} (%)" if pct else value) + (f" ({', '.join(desc)})" if desc else ""), ylabel=metric,
        point_labels=[f"{int(s)}" if isinstance(s, (int, float, np.integer, np.floating)) and s == s else str(s)[:8]
                      for s in lab],
        hue=joined["step"] if "step" in joined.columns else None,
        title=f"{'Probe ' if pct else ''}{value} vs {metric}" + (f" ({', '.join(desc)})" if desc else ""),
        meta=meta),
        "correlation.png", pdf)
    res.files["joined_csv"] = write_table(joined, res.out / "joined.csv")
    res.files["csv"] = write_table(table, res.out / "correlation.csv")
    res.table, res.joined = table, joined
    return res.finish()
