"""Pure measures and plots over the (block, t) feature grid, for any user (the study's rules are
:mod:`repdyn.study`).

* measures: :mod:`~repdyn.analysis.similarity` (CKA, cosine), :mod:`~repdyn.analysis.diversity`, :mod:`~repdyn.analysis.pca`,
  :mod:`~repdyn.analysis.embedding` (UMAP), :mod:`~repdyn.analysis.correlation`, :mod:`~repdyn.analysis.attribution`,
  :mod:`~repdyn.analysis.alignment` (mutual kNN, CKNNA, cycle kNN, unbiased CKA against another
  representation), :mod:`~repdyn.analysis.spatial` (LDS, CDS, RMSC, SRSS of patch-token grids);
* figures: :mod:`~repdyn.analysis.plots` (one function per figure kind, returning a matplotlib Figure).

Nothing here reads a checkpoint or writes a file: that is ``commands/``. Submodules are imported
lazily so that ``import repdyn.analysis`` does not pull matplotlib, umap or captum; ``repdyn.analysis.cka`` is the
stable entry point ``repdyn.analysis.similarity.cka(X, Y, debiased=False)``.
"""

from __future__ import annotations

import importlib
from typing import Any

_MODULES = {"alignment", "spatial", "similarity", "diversity", "pca", "embedding", "correlation", "attribution", "plots"}
__all__ = sorted(_MODULES) + ["cka"]


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        return importlib.import_module(f".{name}", __name__)
    if name == "cka":
        return importlib.import_module(".similarity", __name__).cka
    raise AttributeError(f"module 'repdyn.analysis' has no attribute {name!r}")
