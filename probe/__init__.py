"""Probing DiT/SiT representations over a block x timestep grid.

* :mod:`repdyn.probe.hooks`: capture block outputs (pooled in the hook, early stop, hooks always removed);
* :mod:`repdyn.probe.grid`: :func:`extract_grid`, one forward per (batch, t), shared seeded noise;
* :mod:`repdyn.probe.cache`: fp16 on-disk cells + JSON manifest, atomic and resumable;
* :mod:`repdyn.probe.probes`: batched torch L-BFGS logistic regression, ridge screen, sklearn / cuML, k-NN;
* :mod:`repdyn.probe.layer_grid`: the layer-grid table (one probe per cell, tidy rows) and its summary.

Imports are lazy so ``import probe`` stays cheap for the CLI.
"""

from __future__ import annotations

import importlib

__all__ = ["BlockCapture", "capture_blocks", "pool_tokens", "extract_grid", "GridFeatures", "FeatureCache",
           "fit_probes", "fit_cell_probe", "ProbeResult", "grid_table", "summarize"]

_WHERE = {
    "BlockCapture": "hooks", "capture_blocks": "hooks", "pool_tokens": "hooks",
    "extract_grid": "grid", "GridFeatures": "grid", "FeatureCache": "cache",
    "fit_probes": "probes", "fit_cell_probe": "probes", "ProbeResult": "probes",
    "grid_table": "layer_grid", "summarize": "layer_grid",
}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module 'repdyn.probe' has no attribute {name!r}")
