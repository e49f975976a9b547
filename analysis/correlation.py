"""Probe quality vs generation quality: join tables, correlate, bootstrap, partial out the step.

Typical use (one point per checkpoint or run)::

    joined = join_probe_metrics(probe_df, metrics_df, metric="fid", cell={"block": 8, "t": 0.5})
    table = correlate(joined["accuracy"], joined["fid"], control=joined["step"])

``correlate`` returns a tidy table with Pearson, Spearman and Kendall (tau-b) r, the classical
p-value, a percentile-bootstrap CI (resampling points with replacement), and partial Pearson /
Spearman correlations controlling for training step: accuracy and FID both improve with training,
so a raw correlation across checkpoints mostly measures "both depend on step". With fewer than 5
points a ``SmallSampleWarning`` is emitted and the ``warning`` column says so.

The checkpoints of one run are not independent draws (they share the run's initialisation, data
order and every earlier update), so an interval that resamples them says how the points scatter,
not how the relation would hold in another run. With ``groups`` (the run or training seed of each
point) the bootstrap resamples whole groups (a cluster bootstrap): the interval then speaks of
runs. Any representation measure can be the x: a column, or a measure name of a tidy table
(:func:`measure_rows`).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Union

import numpy as np
import pandas as pd
from scipy import stats

ArrayLike = Union[np.ndarray, Sequence[float], pd.Series]

__all__ = [
    "SmallSampleWarning",
    "join_probe_metrics",
    "measure_rows",
    "correlate",
    "correlate_by",
    "partial_correlation",
    "linear_fit",
    "MIN_POINTS",
]

MIN_POINTS = 5
METHODS = ("pearson", "spearman", "kendall")


class SmallSampleWarning(UserWarning):
    """Fewer than ``MIN_POINTS`` points: correlations and their CIs are unreliable."""


# --------------------------------------------------------------------------------------------
# joining
# --------------------------------------------------------------------------------------------
_DEFAULT_KEYS = ("run", "checkpoint", "step", "weights")
_MEASURE_COLUMNS = ("measure", "metric")  # tidy tables: curves_blocks.csv, alignment.csv, spatial.csv
_VALUE_COLUMNS = ("value", "mean")


def measure_rows(table: pd.DataFrame, name: str) -> pd.DataFrame:
    """The rows of representation measure ``name`` with its values in a column ``name``: the table
    itself when ``name`` is a column (``accuracy``, ``cka_student_teacher``), else the rows of a tidy
    table whose ``measure`` / ``metric`` column holds ``name`` (``cknna``, ``lds``, ...), their
    ``value`` (or ``mean``) renamed to ``name``."""
    if name in table.columns:
        return table
    for col in _MEASURE_COLUMNS:
        if col in table.columns and (table[col] == name).any():
            num = next((c for c in _VALUE_COLUMNS if c in table.columns), None)
            if num is None:
                raise ValueError(f"the table's {col} column names {name!r} but it has no value/mean column")
            return table[table[col] == name].rename(columns={num: name})
    names = sorted({str(v) for c in _MEASURE_COLUMNS if c in table.columns for v in table[c].dropna().unique()})
    have = [c for c in table.columns if pd.api.types.is_numeric_dtype(table[c])]
    raise ValueError(f"no measure {name!r}: not a column ({', '.join(have)})"
                     + (f" nor a measure of the table ({', '.join(names)})" if names else ""))


def join_probe_metrics(
    probe: pd.DataFrame,
    metrics: pd.DataFrame,
    metric: str,
    on: Sequence[str] | None = None,
    probe_value: str = "accuracy",
    cell: Mapping[str, Any] | None = None,
    agg: str | None = None,
) -> pd.DataFrame:
    """Inner-join probe results with a generation-metrics table, one row per checkpoint/run.

    probe: tidy probe table (e.g. one row per checkpoint x weights x block x t) with column
    ``probe_value``. metrics: one row per checkpoint/run with column ``metric`` (FID or any).
    on: join keys (default: those of run, checkpoint, step, weights present in both tables).
    cell: filter the probe table first, e.g. {"block": 8, "t": 0.5}. agg: if several probe rows
    remain per key (e.g. all cells), reduce them with this pandas aggregation ("max", "mean").
    Returns the joined table with columns keys..., ``probe_value``, ``metric`` (and ``step`` if
    available). Raises ValueError on a missing/empty metric column or no overlapping rows.
    """
    if metric not in metrics.columns:
        raise ValueError(f"metrics table has no column {metric!r} (columns: {list(metrics.columns)})")
    if metrics[metric].notna().sum() == 0:
        raise ValueError(f"metrics column {metric!r} is empty (no non-NaN values)")
    if probe_value not in probe.columns:
        raise ValueError(f"probe table has no column {probe_value!r} (columns: {list(probe.columns)})")
    keys = [k for k in _DEFAULT_KEYS if k in probe.columns and k in metrics.columns] if on is None else list(on)
    if not keys:
        raise ValueError("no join keys: pass on=[...] (no run/checkpoint/step/weights column in both tables)")
    for k in keys:
        if k not in probe.columns or k not in metrics.columns:
            raise ValueError(f"join key {k!r} missing from the probe or metrics table")
    p = probe
    if cell:
        for col, val in cell.items():
            if col not in p.columns:
                raise ValueError(f"cell filter column {col!r} not in the probe table")
            p = p[np.isclose(p[col], val) if pd.api.types.is_float_dtype(p[col].dtype) else (p[col] == val)]
        if p.empty:
            raise ValueError(f"no probe rows match cell={dict(cell)}")
    carried = [c for c in ("run", "step") if c in p.columns and c not in keys]  # one value per checkpoint
    if p.duplicated(keys).any():
        if agg is None:
            raise ValueError(f"several probe rows per {keys}; select one cell with cell={{...}} or pass agg='max'")
        p = p.groupby(keys + carried, as_index=False, dropna=False)[probe_value].agg(agg)
    extra = [c for c in ("step", "run") if c in metrics.columns and c not in keys and c not in p.columns]
    m = metrics[keys + [metric] + extra]
    cols = keys + [probe_value] + carried
    out = p[cols].merge(m, on=keys, how="inner").dropna(subset=[probe_value, metric])
    if out.empty:
        raise ValueError(f"probe and metrics tables share no rows on {keys}")
    return out.reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# vectorised statistics over rows of (B, n) arrays
# --------------------------------------------------------------------------------------------
def _pearson_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    xc = x - x.mean(-1, keepdims=True)
    yc = y - y.mean(-1, keepdims=True)
    den = np.sqrt((xc * xc).sum(-1) * (yc * yc).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (xc * yc).sum(-1) / den, np.nan)


def _rank_rows(x: np.ndarray) -> np.ndarray:
    return stats.rankdata(x, axis=-1)


def _kendall_rows(x: np.ndarray, y: np.ndarray, chunk: int = 256) -> np.ndarray:
    """Kendall tau-b for each row (ties handled), O(B n^2) memory in chunks."""
    x2, y2 = np.atleast_2d(x), np.atleast_2d(y)
    n = x2.shape[-1]
    iu = np.triu_indices(n, 1)
    out = np.empty(x2.shape[0])
    for s in range(0, x2.shape[0], chunk):
        xs, ys = x2[s:s + chunk], y2[s:s + chunk]
        dx = np.sign(xs[:, :, None] - xs[:, None, :])[:, iu[0], iu[1]]
        dy = np.sign(ys[:, :, None] - ys[:, None, :])[:, iu[0], iu[1]]
        num = (dx * dy).sum(-1)
        den = np.sqrt((dx != 0).sum(-1) * (dy != 0).sum(-1).astype(float))
        with np.errstate(invalid="ignore", divide="ignore"):
            out[s:s + chunk] = np.where(den > 0, num / den, np.nan)
    return out if np.ndim(x) > 1 else out[0]


def _residualize_rows(v: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Residuals of each row of v (B, n) on [1, z] (B, n, k) by least squares."""
    design = np.concatenate([np.ones(z.shape[:-1] + (1,)), z], -1)       # (B, n, k+1)
    gram = np.einsum("bnk,bnl->bkl", design, design)
    rhs = np.einsum("bnk,bn->bk", design, v)
    coef = (np.linalg.pinv(gram) @ rhs[..., None])[..., 0]              # batched, rank-safe
    return v - np.einsum("bnk,bk->bn", design, coef)


def _stat_rows(method: str, x: np.ndarray, y: np.ndarray, z: np.ndarray | None) -> np.ndarray:
    """Correlation of each row; x, y (B, n), z (B, n, k) or None."""
    if method == "pearson":
        return _pearson_rows(x, y)
    if method == "spearman":
        return _pearson_rows(_rank_rows(x), _rank_rows(y))
    if method == "kendall":
        return _kendall_rows(x, y)
    if method in ("partial_pearson", "partial_spearman"):
        if z is None:
            raise ValueError(f"{method} needs a control variable")
        if method == "partial_spearman":
            x, y = _rank_rows(x), _rank_rows(y)
            z = np.stack([_rank_rows(z[..., j]) for j in range(z.shape[-1])], -1)
        return _pearson_rows(_residualize_rows(x, z), _residualize_rows(y, z))
    raise ValueError(f"unknown method {method!r}")


def _p_value(method: str, x: np.ndarray, y: np.ndarray, r: float, k: int) -> float:
    n = len(x)
    if not np.isfinite(r):
        return float("nan")
    if method == "pearson":
        return float(stats.pearsonr(x, y).pvalue)
    if method == "spearman":
        return float(stats.spearmanr(x, y).pvalue)
    if method == "kendall":
        return float(stats.kendalltau(x, y).pvalue)
    df = n - 2 - k                                     # partial: t-test with k controls
    if df <= 0 or abs(r) >= 1:
        return float("nan") if df <= 0 else 0.0
    tstat = r * np.sqrt(df / (1 - r * r))
    return float(2 * stats.t.sf(abs(tstat), df))


def _clean(x: ArrayLike, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    return a


def partial_correlation(x: ArrayLike, y: ArrayLike, control: ArrayLike, method: str = "pearson") -> float:
    """Correlation of x and y after regressing both on ``control`` (n,) or (n, k) with an
    intercept; ``method`` "pearson" or "spearman" (ranks first)."""
    xa, ya = _clean(x, "x"), _clean(y, "y")
    z = np.asarray(control, dtype=np.float64).reshape(len(xa), -1)
    return float(_stat_rows(f"partial_{method}", xa[None], ya[None], z[None])[0])


def correlate(
    x: ArrayLike,
    y: ArrayLike,
    control: ArrayLike | None = None,
    methods: Sequence[str] = METHODS,
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: int = 0,
    x_name: str = "x",
    y_name: str = "y",
    groups: ArrayLike | None = None,
    group_name: str = "group",
) -> pd.DataFrame:
    """Pearson / Spearman / Kendall correlations with bootstrap CIs (+ partial ones with a control).

    x, y: (n,) paired values (e.g. probe accuracy and FID per checkpoint); rows with NaN in x, y
    or control are dropped. control: (n,) or (n, k) covariates (e.g. training step); adds
    "partial_pearson" and "partial_spearman" rows. CIs are percentile bootstrap intervals over
    ``n_boot`` resamples of the points (resamples where r is undefined are skipped; the count
    used is in ``n_boot_valid``). Emits ``SmallSampleWarning`` when n < 5. groups: (n,) labels (the
    run or seed of each point): the bootstrap then resamples whole groups with replacement (fewer
    than 2 groups: no interval); ``group_name`` names them in the ``boot_unit`` column.

    Returns a DataFrame: method, r, p_value, ci_low, ci_high, n, n_boot_valid, boot_unit, x, y,
    control, warning.
    """
    xa, ya = _clean(x, "x"), _clean(y, "y")
    if len(xa) != len(ya):
        raise ValueError(f"x and y have different lengths ({len(xa)} vs {len(ya)})")
    z = None
    if control is not None:
        z = np.asarray(control, dtype=np.float64).reshape(len(xa), -1)
    keep = np.isfinite(xa) & np.isfinite(ya)
    if z is not None:
        keep &= np.isfinite(z).all(1)
    labels = None
    if groups is not None:
        labels = np.asarray(groups)
        if len(labels) != len(keep):
            raise ValueError(f"groups has {len(labels)} labels for {len(keep)} points")
        labels = labels[keep]
    xa, ya = xa[keep], ya[keep]
    z = z[keep] if z is not None else None
    n = len(xa)
    if n < 3:
        raise ValueError(f"need at least 3 paired points to correlate, got {n}")
    warn = ""
    if n < MIN_POINTS:
        warn = f"only {n} points (< {MIN_POINTS}): estimates and CIs are unreliable"
        warnings.warn(warn, SmallSampleWarning, stacklevel=2)
    all_methods = list(methods) + (["partial_pearson", "partial_spearman"] if z is not None else [])
    rng = np.random.default_rng(seed)
    resamples = _resamples(rng, n, n_boot, labels)
    unit = "point" if labels is None else f"{group_name} ({len(np.unique(labels))} groups)"
    a = (1.0 - ci) / 2.0
    rows = []
    k = 0 if z is None else z.shape[1]
    for m in all_methods:
        r = float(_stat_rows(m, xa[None], ya[None], None if z is None else z[None])[0])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            boot = np.concatenate([_stat_rows(m, xa[ii], ya[ii], None if z is None else z[ii]) for ii in resamples]
                                  ) if resamples else np.array([])
        boot = boot[np.isfinite(boot)]
        lo, hi = (np.quantile(boot, [a, 1 - a]) if len(boot) else (np.nan, np.nan))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            p = _p_value(m, xa, ya, r, k if m.startswith("partial") else 0)
        rows.append({"method": m, "r": r, "p_value": p, "ci_low": float(lo), "ci_high": float(hi), "n": n,
                     "n_boot_valid": int(len(boot)), "boot_unit": unit, "x": x_name, "y": y_name,
                     "control": "yes" if (z is not None and m.startswith("partial")) else "", "warning": warn})
    return pd.DataFrame(rows)


def _resamples(rng: np.random.Generator, n: int, n_boot: int, labels: np.ndarray | None) -> list[np.ndarray]:
    """Bootstrap index sets, each a (B, m) array of B resamples of equal length m: points drawn
    with replacement, or (``labels``) whole groups drawn with replacement, resamples of equal size
    batched together. Fewer than 2 groups: none (a single run says nothing about others)."""
    if labels is None:
        return [rng.integers(0, n, size=(n_boot, n))]
    _, inv = np.unique(labels, return_inverse=True)
    members = [np.flatnonzero(inv == g) for g in range(inv.max() + 1)]
    if len(members) < 2:
        return []
    picks = rng.integers(0, len(members), size=(n_boot, len(members)))
    by_len: dict[int, list[np.ndarray]] = {}
    for row in picks:
        ii = np.concatenate([members[g] for g in row])
        by_len.setdefault(len(ii), []).append(ii)
    return [np.stack(v) for v in by_len.values()]


def correlate_by(
    joined: pd.DataFrame,
    x: str,
    y: str,
    by: Sequence[str] = ("block", "t"),
    control: str | None = "step",
    **kwargs: Any,
) -> pd.DataFrame:
    """``correlate`` within each group of ``by`` (e.g. every (block, t) cell across checkpoints).

    joined: a table with columns x, y, [control], by... Returns the concatenated tables with the
    group columns in front. Groups with fewer than 3 points are skipped.
    """
    for c in [x, y, *by] + ([control] if control else []):
        if c not in joined.columns:
            raise ValueError(f"column {c!r} not in the table (columns: {list(joined.columns)})")
    if joined[y].notna().sum() == 0:
        raise ValueError(f"column {y!r} is empty")
    out = []
    for key, g in joined.groupby(list(by), sort=True):
        if g[[x, y]].dropna().shape[0] < 3:
            continue
        key = key if isinstance(key, tuple) else (key,)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SmallSampleWarning)
            t = correlate(g[x], g[y], control=g[control] if control else None, x_name=x, y_name=y, **kwargs)
        for col, v in zip(by, key):
            t.insert(list(by).index(col), col, v)
        out.append(t)
    if not out:
        raise ValueError("no group has at least 3 points")
    return pd.concat(out, ignore_index=True)


def linear_fit(x: ArrayLike, y: ArrayLike) -> tuple[float, float]:
    """Least-squares line y = slope * x + intercept (for the scatter figure)."""
    xa, ya = _clean(x, "x"), _clean(y, "y")
    keep = np.isfinite(xa) & np.isfinite(ya)
    if keep.sum() < 2:
        raise ValueError("linear_fit needs at least 2 finite points")
    slope, intercept = np.polyfit(xa[keep], ya[keep], 1)
    return float(slope), float(intercept)
