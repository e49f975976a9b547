"""The layer-grid table: one probe per (block, t) cell of a train grid, scored on a test grid.

``grid_table`` turns two :class:`~repdyn.probe.grid.GridFeatures` (train, official test split) into the
tidy table ``probe layer-grid`` writes (one row per cell, with the full protocol and its hash);
``summarize`` prints it. The command itself (checkpoint in, files out) is
:mod:`repdyn.commands.layer_grid`.
"""

from __future__ import annotations

import hashlib
import json
import warnings

import numpy as np
import pandas as pd

from repdyn.probe.grid import GridFeatures
from repdyn.probe.probes import fit_probes

__all__ = ["check_probe_sizes", "grid_table", "summarize", "protocol_hash", "DEFAULT_N_TRAIN", "DEFAULT_N_TEST", "TABLE_COLUMNS",
           "TABLE_LABEL_POLICY"]

DEFAULT_N_TRAIN = 2000
DEFAULT_N_TEST = 1000
TABLE_COLUMNS = ["checkpoint", "weights", "step", "model", "method", "family", "block", "t", "log_snr", "accuracy",
                 "val_accuracy", "train_accuracy", "reg", "reg_kind", "converged", "iterations", "probe", "pooling",
                 "label_policy", "dataset", "n_train", "n_test", "holdout", "seed", "time_convention", "checkpoint_sha",
                 "protocol_hash"]


# Table spelling of the label policy: a bare "null" would be read back as NaN by pandas.read_csv.
TABLE_LABEL_POLICY = {"null": "null-class", "class": "true-class"}


def _flatten(g: GridFeatures, cells: list[tuple]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(cells, rows, D) features, labels per row and the image id per row (tokens as samples)."""
    x = g.stack(cells)
    if x.ndim == 4:  # tokens: (cells, N, T, D) -> every token is a sample with its image's label
        c, n, t, d = x.shape
        return x.reshape(c, n * t, d), np.repeat(g.labels, t), np.repeat(np.arange(n), t)
    return x, g.labels, None


def protocol_hash(proto: dict) -> str:
    return hashlib.sha256(json.dumps(proto, sort_keys=True, default=str).encode()).hexdigest()[:12]


def check_probe_sizes(n_train: int, n_available: int, num_classes: int, flag: str = "--n-train") -> int:
    """The number of training images a probe will get: asking for more than the split holds warns
    (the run uses them all, and says so before any extraction); fewer than two per class is an error
    (the held-out cut and the refit would see classes with no example)."""
    n = min(n_train, n_available)
    if n_train > n_available:
        warnings.warn(f"{flag} {n_train} is more than the {n_available} training images: using all {n_available}",
                      stacklevel=2)
    if n < 2 * num_classes:
        raise ValueError(f"{flag} {n_train} gives {n} training images for {num_classes} classes; a probe needs at "
                         f"least two per class: use {flag} >= {2 * num_classes}")
    return n


def grid_table(gtr: GridFeatures, gte: GridFeatures, probe: str = "torch", *, device: str = "cpu", seed: int = 0,
               holdout: float = 0.2, progress: bool = False, num_classes: int | None = None,
               **probe_kwargs) -> tuple[pd.DataFrame, dict]:
    """Fit one probe per cell of train / test grids; returns the tidy table and the full protocol."""
    cells = [(b, t) for t in gtr.ts for b in gtr.blocks]
    xtr, ytr, groups = _flatten(gtr, cells)
    xte, yte, _ = _flatten(gte, cells)
    res = fit_probes(xtr, ytr, xte, yte, probe, device=device, seed=seed, holdout=holdout, groups=groups,
                     num_classes=num_classes, progress=progress, **probe_kwargs)
    m = gtr.meta
    proto = {"extraction": {k: v for k, v in m.items() if k not in ("blocks", "ts")},
             "test_split": {"split": gte.meta["split"], "n_samples": gte.meta["n_samples"],
                            "indices_sha": gte.meta["indices_sha"]},
             "probe": res.protocol}
    phash = protocol_hash(proto)
    rows = []
    for i, (b, t) in enumerate(cells):
        rows.append({
            "checkpoint": m["checkpoint"], "weights": m["weights"], "step": m["step"], "model": m["model"],
            "method": m["method"], "family": m["family"], "block": int(b), "t": t, "log_snr": gtr.log_snr[t],
            "accuracy": float(res.accuracy[i]), "val_accuracy": float(res.val_accuracy[i]),
            "train_accuracy": float(res.train_accuracy[i]), "reg": float(res.reg[i]),
            "reg_kind": res.protocol["reg_kind"], "converged": bool(res.converged[i]),
            "iterations": int(res.iterations[i]), "probe": probe, "pooling": m["pooling"],
            "label_policy": TABLE_LABEL_POLICY[m["label_policy"]], "dataset": m["dataset"], "n_train": m["n_samples"],
            "n_test": gte.meta["n_samples"], "holdout": res.protocol["holdout"], "seed": m["seed"],
            "time_convention": m["time_convention"], "checkpoint_sha": m["checkpoint_sha"], "protocol_hash": phash,
        })
    df = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    # results, kept out of the protocol hash: per-(cell, strength) convergence of the sweep
    proto["probe_seconds"] = res.seconds
    proto["probe_convergence"] = {"cells": [[int(b), t] for b, t in cells], "reg_grid": res.protocol["reg_grid"],
                                  "converged": res.converged.tolist(), "iterations": res.iterations.tolist(),
                                  "sweep_converged": res.sweep_converged.tolist(),
                                  "sweep_iterations": res.sweep_iterations.tolist()}
    bad = [f"(block {int(b)}, t {t:g})" for (b, t), ok in zip(cells, res.converged) if not ok]
    if bad:
        warnings.warn(f"probe {probe}: the chosen fit did not converge in {len(bad)} of {len(cells)} cells: "
                      f"{', '.join(bad)} (see the converged / iterations columns; raise max_iter)", stacklevel=2)
    return df, proto


def summarize(df: pd.DataFrame) -> str:
    """A compact text summary: the accuracy grid (%) and the best cell."""
    grid = df.pivot_table(index="block", columns="t", values="accuracy") * 100
    grid.columns = [f"{float(c):g}" for c in grid.columns]
    best = df.loc[df["accuracy"].idxmax()]
    r = df.iloc[0]
    head = (f"{r['model']} ({r['weights']} weights, label={r['label_policy']}, probe={r['probe']}, "
            f"pooling={r['pooling']}, n_train={r['n_train']}, n_test={r['n_test']})")
    body = grid.round(1).to_string(float_format=lambda v: f"{v:5.1f}")
    tail = (f"best: block {int(best['block'])}, t={best['t']:g} (log-SNR {best['log_snr']:+.2f}): "
            f"{100 * best['accuracy']:.1f}% top-1")
    return f"{head}\ntop-1 accuracy (%), rows = block, columns = t\n{body}\n{tail}"
