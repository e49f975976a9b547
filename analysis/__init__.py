"""repdyn analysis suite: similarity (CKA, cosine), diversity, PCA maps, UMAP, correlation,
attribution and figures over the (block, t) feature grid of ``probe.grid.extract_grid``.

Submodules are imported lazily (``analysis.similarity`` etc.) so that importing the package does
not pull matplotlib, umap or captum. The stable entry point ``analysis.similarity.cka(X, Y,
debiased=False)`` is re-exported here as ``analysis.cka``.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["similarity", "diversity", "pca", "embedding", "correlation", "attribution", "plots", "cka"]


def __getattr__(name: str) -> Any:
    if name in {"similarity", "diversity", "pca", "embedding", "correlation", "attribution", "plots"}:
        return importlib.import_module(f".{name}", __name__)
    if name == "cka":
        return importlib.import_module(".similarity", __name__).cka
    raise AttributeError(f"module 'analysis' has no attribute {name!r}")
