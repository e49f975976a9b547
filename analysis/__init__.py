"""repdyn analysis suite: pure measures, figures and claim rules over the (block, t) feature grid.

* measures: :mod:`~analysis.similarity` (CKA, cosine), :mod:`~analysis.diversity`, :mod:`~analysis.pca`,
  :mod:`~analysis.embedding` (UMAP), :mod:`~analysis.correlation`, :mod:`~analysis.attribution`;
* figures: :mod:`~analysis.plots` (one function per figure kind, returning a matplotlib Figure) and
  :mod:`~analysis.figures` (the study's figure recipes);
* the study: :mod:`~analysis.tables` (tables loaded once), :mod:`~analysis.claims` (the C1-C7 rules),
  :mod:`~analysis.report` (REPORT.md text).

Nothing here reads a checkpoint or writes a file: that is ``commands/``. Submodules are imported
lazily so that ``import analysis`` does not pull matplotlib, umap or captum; ``analysis.cka`` is the
stable entry point ``analysis.similarity.cka(X, Y, debiased=False)``.
"""

from __future__ import annotations

import importlib
from typing import Any

_MODULES = {"similarity", "diversity", "pca", "embedding", "correlation", "attribution", "plots", "figures", "tables",
            "claims", "report"}
__all__ = sorted(_MODULES) + ["cka"]


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        return importlib.import_module(f".{name}", __name__)
    if name == "cka":
        return importlib.import_module(".similarity", __name__).cka
    raise AttributeError(f"module 'analysis' has no attribute {name!r}")
