"""kNN alignment between two representations of the same N inputs (Huh et al. 2024, "The Platonic
Representation Hypothesis"): mutual kNN, CKNNA, cycle kNN and unbiased CKA.

Definitions (platonic-rep, ``metrics.py`` and ``measure_alignment.py``, commit dcd76ba; written
here from the definitions, not from that code). Rows of X (N, Dx) and Y (N, Dy) are the same N
inputs. After :func:`preprocess`, ``K = X X^T`` and ``L = Y Y^T`` (inner products, i.e. cosine
similarities of the L2-normalised rows).

* ``N_X(i)``: the ``topk`` rows j != i with the largest ``K_ij`` (the row itself is excluded).
* ``mutual_knn(X, Y)  = mean_i |N_X(i) & N_Y(i)| / topk``. 1 for identical neighbourhoods; about
  ``topk / (N - 1)`` for independent representations.
* ``cycle_knn(X, Y)   = mean_i 1[i in U_{j in N_Y(i)} N_X(j)]``: go to i's neighbours in Y, and
  ask whether i is among *their* neighbours in X. Not symmetric.
* ``cknna(X, Y)       = A(K, L) / sqrt(A(K, K) A(L, L))`` with
  ``A(K, L) = HSIC_u(M o K, M o L)`` where ``M_ij = 1[j in N_X(i) and j in N_Y(i)]`` (the mask of
  the shared neighbours; not symmetric) and ``HSIC_u`` is the unbiased estimator of Song et al.
  (2012, eq. 5) applied to the masked matrices as they are:
  ``HSIC_u(A, B) = [tr(A~ B~) + 1'A~1 1'B~1 / ((N-1)(N-2)) - 2/(N-2) 1'A~B~1] / (N(N-3))``,
  ``A~`` = A with a zero diagonal. For ``A(K, K)`` the mask is ``N_X`` alone. Needs topk >= 2.
* ``unbiased_cka(X, Y)``: linear CKA with the unbiased HSIC, ``HSIC_u(K, L) / sqrt(HSIC_u(K, K)
  HSIC_u(L, L))`` -- computed by :mod:`repdyn.analysis.similarity` (U-centring, or its
  feature-space form), not re-implemented here.

Protocol (``measure_alignment.py``): every feature matrix is clipped elementwise to
``[-q, q]`` with q the 0.95 quantile of |features|, then each row is L2-normalised; topk = 10.
:func:`preprocess` does this; every metric here applies it by default (``clip_quantile=None`` and
``normalize=False`` give the bare ``metrics.py`` definitions on the raw rows).

Deliberate differences from the reference code (all documented again in docs/analysis.md):

* Precision: everything is computed in float64 (the reference uses float32, TF32 matmuls unless
  ``--precise``, or bfloat16 in ``platonic.Alignment``). Results agree to rounding; a kNN set can
  differ only where two similarities tie to float32 precision. Ties are broken by ``torch.topk``.
* ``eps``: the reference divides CKNNA and CKA by ``sqrt(.) + 1e-6``. The masked HSIC values
  shrink like 1/N (~2e-4 at N = 10 000, topk = 10), so that term lowers CKNNA by ~0.5% there, more
  at larger N, and makes ``cknna(X, X) < 1``; the default here is ``eps=0``, and ``eps=1e-6``
  reproduces the reference's numbers.
* Clip threshold: ``clip_mode="row_mean"`` (default; ``measure_alignment.py`` without
  ``--precise``) is the mean over rows of each row's linear-interpolated q-quantile of |x|;
  ``clip_mode="exact"`` (``--precise`` and ``platonic.Alignment``) is the element at index
  ``int(q * numel)`` of all sorted |x|. The reference computes the threshold once over a model's
  whole (N, layers, D) stack; here it is computed per feature matrix (per (block, t) cell), since
  the scale of a diffusion transformer's features changes strongly with t.
* CKNNA only in its default form (``unbiased=True``, not ``distance_agnostic``), and the
  reference's layer search (best score over all layer pairs) is not done here: callers score cells.

Memory: the kNN search runs over row chunks (``chunk`` rows x N similarities at a time, never the
(N, N) matrix); the metrics then only use the (N, topk) neighbour indices and similarities, so
N = 10 000 fits easily, on a GPU with ``device="cuda"`` / ``"auto"``. :func:`align_cells` scores
many cells against one reference (e.g. an external encoder) and computes the reference's
neighbourhood once.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Union

import numpy as np
import pandas as pd
import torch

from repdyn.analysis.similarity import as_features, center, feature_space_linear_cka, gram_linear, hsic

ArrayLike = Union[np.ndarray, torch.Tensor]
ClipMode = Literal["row_mean", "exact"]

__all__ = [
    "METRICS",
    "Neighbors",
    "preprocess",
    "nearest_neighbors",
    "mutual_knn",
    "cycle_knn",
    "cknna",
    "unbiased_cka",
    "align_cells",
]

METRICS = ("mutual_knn", "cknna", "cycle_knn", "unbiased_cka")
DEFAULT_CHUNK = 1024


# --------------------------------------------------------------------------------------------
# preprocessing
# --------------------------------------------------------------------------------------------
def _clip_threshold(a: torch.Tensor, q: float, mode: ClipMode, chunk: int) -> torch.Tensor:
    """The clip level of |x| for x (N, D): see :func:`preprocess`. a = |x|."""
    if mode == "exact":
        flat = a.reshape(-1)
        idx = int(q * flat.numel())                       # same float product as the definition
        return torch.kthvalue(flat, min(idx, flat.numel() - 1) + 1).values
    if mode == "row_mean":
        # torch.quantile refuses more than 2^24 elements: go over row chunks
        rows = max(1, min(chunk, (1 << 24) // a.shape[1]))
        per_row = [torch.quantile(a[r:r + rows], q, dim=1) for r in range(0, a.shape[0], rows)]
        return torch.cat(per_row).mean()
    raise ValueError(f"unknown clip_mode {mode!r}; use 'row_mean' or 'exact'")


def preprocess(
    x: ArrayLike,
    clip_quantile: float | None = 0.95,
    normalize: bool = True,
    clip_mode: ClipMode = "row_mean",
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Platonic-rep's feature preparation: clip outliers, then L2-normalise each row.

    x: (N, D) numpy array or tensor (more axes are flattened per row). Returns (N, D) float64 on
    ``device`` (None = CPU, "auto" = CUDA when available).

    * ``clip_quantile`` q (None or 1 = no clipping): clamp every entry to [-c, c] where c is
      ``clip_mode="row_mean"``: the mean over rows of the per-row q-quantile of |x| (linear
      interpolation), or ``"exact"``: the element at index ``int(q * N * D)`` of all sorted |x|.
    * ``normalize``: divide each row by ``max(||row||_2, 1e-12)``.
    """
    t = as_features(x, device, name="features")
    if clip_quantile is not None and clip_quantile != 1:
        if not 0 < clip_quantile < 1:
            raise ValueError(f"clip_quantile must be in (0, 1] or None, got {clip_quantile}")
        c = _clip_threshold(t.abs(), float(clip_quantile), clip_mode, DEFAULT_CHUNK)
        t = torch.minimum(torch.maximum(t, -c), c)
    if normalize:
        t = torch.nn.functional.normalize(t, p=2.0, dim=1, eps=1e-12)
    return t


# --------------------------------------------------------------------------------------------
# neighbourhoods
# --------------------------------------------------------------------------------------------
@dataclass
class Neighbors:
    """The topk neighbours of every row: ``indices`` (N, topk) int64 and ``sims`` (N, topk) float64
    (the inner products ``K_ij`` at those indices), both in decreasing similarity per row."""

    indices: torch.Tensor
    sims: torch.Tensor

    @property
    def n(self) -> int:
        return self.indices.shape[0]

    @property
    def topk(self) -> int:
        return self.indices.shape[1]


def _check_topk(n: int, topk: int, least: int = 1) -> None:
    if not isinstance(topk, (int, np.integer)) or topk < least:
        raise ValueError(f"topk must be an integer >= {least}, got {topk!r}")
    if topk > n - 1:
        raise ValueError(f"topk={topk} needs at least topk + 1 = {topk + 1} rows, got N={n}")


def _knn(x: torch.Tensor, topk: int, chunk: int | None) -> Neighbors:
    """kNN of prepared rows x (N, D) by inner product, self excluded, ``chunk`` rows at a time."""
    n = x.shape[0]
    _check_topk(n, topk)
    step = n if chunk is None else max(1, int(chunk))
    idx, sims = [], []
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        s = x[r0:r1] @ x.T                                            # (chunk, N)
        rows = torch.arange(r1 - r0, device=x.device)
        s[rows, rows + r0] = float("-inf")
        v, i = torch.topk(s, topk, dim=1)
        idx.append(i)
        sims.append(v)
    return Neighbors(torch.cat(idx), torch.cat(sims))


def _prepared(x: ArrayLike, clip_quantile: float | None, normalize: bool, clip_mode: ClipMode,
              device: str | torch.device | None, name: str) -> torch.Tensor:
    try:
        return preprocess(x, clip_quantile, normalize, clip_mode, device)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


def nearest_neighbors(
    x: ArrayLike,
    topk: int = 10,
    clip_quantile: float | None = 0.95,
    normalize: bool = True,
    clip_mode: ClipMode = "row_mean",
    chunk: int | None = DEFAULT_CHUNK,
    device: str | torch.device | None = None,
) -> Neighbors:
    """The topk nearest rows of every row of x (N, D) after :func:`preprocess`, by inner product
    (cosine when normalised), the row itself excluded. Builds at most ``chunk`` x N similarities
    at a time (``chunk=None``: all N rows at once). Returns :class:`Neighbors` ((N, topk) each)."""
    return _knn(_prepared(x, clip_quantile, normalize, clip_mode, device, "X"), topk, chunk)


# --------------------------------------------------------------------------------------------
# metrics from neighbourhoods
# --------------------------------------------------------------------------------------------
def _mutual_from(a: Neighbors, b: Neighbors) -> float:
    """mean_i |N_a(i) & N_b(i)| / topk. Indices within a row are distinct, so counting equal pairs
    of the (topk x topk) comparison counts the intersection."""
    shared = (a.indices[:, :, None] == b.indices[:, None, :]).sum((1, 2))
    return float(shared.to(torch.float64).mean() / a.topk)


def _cycle_from(a: Neighbors, b: Neighbors) -> float:
    """mean_i 1[i in N_a(j) for some j in N_b(i)] (a = X, b = Y)."""
    back = a.indices[b.indices]                                       # (N, topk_b, topk_a)
    me = torch.arange(a.n, device=back.device)[:, None, None]
    return float((back == me).flatten(1).any(1).to(torch.float64).mean())


def _masked_hsic(idx: torch.Tensor, valid: torch.Tensor, kv: torch.Tensor, lv: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC (Song et al. 2012, eq. 5) of two sparse, possibly non-symmetric (N, N)
    matrices A, B that share their support: row i holds ``kv[i, p]`` (A) and ``lv[i, p]`` (B) at
    column ``idx[i, p]`` wherever ``valid[i, p]``; everything else, the diagonal included, is 0.

    ``[tr(A B) + (1'A1)(1'B1)/((N-1)(N-2)) - 2/(N-2) 1'AB1] / (N(N-3))``, in O(N topk log).
    idx, valid, kv, lv: (N, topk). Returns a 0-d float64 tensor.
    """
    n, k = idx.shape
    kv = torch.where(valid, kv, torch.zeros_like(kv))
    lv = torch.where(valid, lv, torch.zeros_like(lv))
    rows = torch.arange(n, device=idx.device)[:, None].expand(n, k)
    # tr(A B) = sum_ij A_ij B_ji: find each stored (i, j) entry's transpose (j, i) in the support
    keys = torch.where(valid, rows * n + idx, torch.full_like(idx, -1)).reshape(-1)
    order = torch.argsort(keys)
    sorted_keys = keys[order]
    query = (idx * n + rows).reshape(-1)
    pos = torch.searchsorted(sorted_keys, query).clamp_max(keys.numel() - 1)
    found = (sorted_keys[pos] == query) & valid.reshape(-1)
    b_transposed = torch.where(found, lv.reshape(-1)[order[pos]], torch.zeros_like(query, dtype=lv.dtype))
    trace_ab = (kv.reshape(-1) * b_transposed).sum()
    # 1'AB1 = (column sums of A) . (row sums of B)
    col_a = torch.zeros(n, dtype=kv.dtype, device=kv.device).index_add_(0, idx.reshape(-1), kv.reshape(-1))
    row_b = lv.sum(1)
    total = trace_ab + kv.sum() * lv.sum() / ((n - 1) * (n - 2)) - 2.0 * (col_a @ row_b) / (n - 2)
    return total / (n * (n - 3))


def _cknna_from(a: Neighbors, b: Neighbors, eps: float) -> float:
    """CKNNA from the two neighbourhoods (each (N, topk) indices + similarities)."""
    n = a.n
    if n < 4:
        raise ValueError(f"cknna needs N >= 4 rows (unbiased HSIC), got N={n}")
    eq = a.indices[:, :, None] == b.indices[:, None, :]               # (N, k_a, k_b)
    shared = eq.any(2)                                                # j in N_a(i) and in N_b(i)
    l_at = b.sims.gather(1, eq.to(torch.uint8).argmax(2))             # L_ij at a's columns
    everywhere = torch.ones_like(a.indices, dtype=torch.bool)
    kl = _masked_hsic(a.indices, shared, a.sims, l_at)
    kk = _masked_hsic(a.indices, everywhere, a.sims, a.sims)
    ll = _masked_hsic(b.indices, torch.ones_like(b.indices, dtype=torch.bool), b.sims, b.sims)
    return float(kl / (torch.sqrt(kk * ll) + eps))


def _pair(x: ArrayLike, y: ArrayLike, topk: int, clip_quantile: float | None, normalize: bool,
          clip_mode: ClipMode, chunk: int | None, device) -> tuple[Neighbors, Neighbors]:
    xt = _prepared(x, clip_quantile, normalize, clip_mode, device, "X")
    yt = _prepared(y, clip_quantile, normalize, clip_mode, device, "Y")
    if xt.shape[0] != yt.shape[0]:
        raise ValueError(f"X and Y have different row counts ({xt.shape[0]} vs {yt.shape[0]}); rows must be the same inputs")
    return _knn(xt, topk, chunk), _knn(yt, topk, chunk)


def mutual_knn(
    X: ArrayLike,
    Y: ArrayLike,
    topk: int = 10,
    *,
    clip_quantile: float | None = 0.95,
    normalize: bool = True,
    clip_mode: ClipMode = "row_mean",
    chunk: int | None = DEFAULT_CHUNK,
    device: str | torch.device | None = None,
) -> float:
    """Mutual kNN alignment ``mean_i |N_X(i) & N_Y(i)| / topk`` (platonic-rep ``mutual_knn``).

    X: (N, Dx), Y: (N, Dy), numpy or torch, rows = the same inputs. Both are first passed through
    :func:`preprocess` (``clip_quantile``, ``normalize``, ``clip_mode``). In [0, 1]: 1 when every
    row has the same topk neighbours in both, about topk / (N - 1) for independent ones.
    Stable entry point. Returns a Python float.
    """
    a, b = _pair(X, Y, topk, clip_quantile, normalize, clip_mode, chunk, device)
    return _mutual_from(a, b)


def cycle_knn(
    X: ArrayLike,
    Y: ArrayLike,
    topk: int = 10,
    *,
    clip_quantile: float | None = 0.95,
    normalize: bool = True,
    clip_mode: ClipMode = "row_mean",
    chunk: int | None = DEFAULT_CHUNK,
    device: str | torch.device | None = None,
) -> float:
    """Cycle kNN ``mean_i 1[i in N_X(j) for some j in N_Y(i)]`` (platonic-rep ``cycle_knn(X, Y)``:
    Y's neighbours, then X's neighbours of those). Not symmetric in X, Y.

    X: (N, Dx), Y: (N, Dy); preprocessing as :func:`mutual_knn`. Returns a Python float in [0, 1].
    """
    a, b = _pair(X, Y, topk, clip_quantile, normalize, clip_mode, chunk, device)
    return _cycle_from(a, b)


def cknna(
    X: ArrayLike,
    Y: ArrayLike,
    topk: int = 10,
    *,
    clip_quantile: float | None = 0.95,
    normalize: bool = True,
    clip_mode: ClipMode = "row_mean",
    eps: float = 0.0,
    chunk: int | None = DEFAULT_CHUNK,
    device: str | torch.device | None = None,
) -> float:
    """Centred kernel nearest-neighbour alignment (platonic-rep ``cknna``, its default unbiased form).

    ``A(K, L) / (sqrt(A(K, K) A(L, L)) + eps)`` with ``A(K, L) = HSIC_u(M o K, M o L)``: K = X X^T,
    L = Y Y^T after :func:`preprocess`, M the mask of the neighbours shared by N_X(i) and N_Y(i)
    (the module docstring has the formula). Only the (N, topk) neighbourhoods are used, so no
    (N, N) matrix is built. X: (N, Dx), Y: (N, Dy); needs topk >= 2 and N >= 4. ``eps=1e-6``
    reproduces the reference's denominator; the default 0 gives ``cknna(X, X) == 1``.
    Stable entry point. Returns a Python float.
    """
    if isinstance(topk, (int, np.integer)) and topk < 2:
        raise ValueError(f"cknna needs topk >= 2, got {topk}")
    a, b = _pair(X, Y, topk, clip_quantile, normalize, clip_mode, chunk, device)
    return _cknna_from(a, b, eps)


def _unbiased_cka_prepared(xt: torch.Tensor, yt: torch.Tensor, eps: float) -> float:
    if eps == 0:
        # O(N Dx Dy) feature-space form: no (N, N) matrix
        return feature_space_linear_cka(xt, yt, debiased=True, device=xt.device)
    kc, lc = center(gram_linear(xt, xt.device), unbiased=True), center(gram_linear(yt, yt.device), unbiased=True)
    kl = hsic(kc, lc, debiased=True, centered=True)
    kk = hsic(kc, kc, debiased=True, centered=True)
    ll = hsic(lc, lc, debiased=True, centered=True)
    return float(kl / (torch.sqrt(kk * ll) + eps))


def unbiased_cka(
    X: ArrayLike,
    Y: ArrayLike,
    *,
    clip_quantile: float | None = 0.95,
    normalize: bool = True,
    clip_mode: ClipMode = "row_mean",
    eps: float = 0.0,
    device: str | torch.device | None = None,
) -> float:
    """Linear CKA with the unbiased HSIC (platonic-rep ``unbiased_cka``) on preprocessed features.

    X: (N, Dx), Y: (N, Dy); N >= 4. Computed by :func:`repdyn.analysis.similarity.feature_space_linear_cka`
    (``debiased=True``, O(N Dx Dy), no (N, N) matrix) -- equal to ``similarity.cka(.., debiased=True)``
    on the preprocessed rows. With ``eps > 0`` (``1e-6`` reproduces the reference's
    ``HSIC_kl / (sqrt(HSIC_kk HSIC_ll) + 1e-6)``) the (N, N) Grams are built. Returns a float.
    """
    xt = _prepared(X, clip_quantile, normalize, clip_mode, device, "X")
    yt = _prepared(Y, clip_quantile, normalize, clip_mode, device, "Y")
    if xt.shape[0] != yt.shape[0]:
        raise ValueError(f"X and Y have different row counts ({xt.shape[0]} vs {yt.shape[0]}); rows must be the same inputs")
    return _unbiased_cka_prepared(xt, yt, eps)


# --------------------------------------------------------------------------------------------
# many cells against one reference
# --------------------------------------------------------------------------------------------
def align_cells(
    Y: ArrayLike,
    cells: Mapping[Hashable, ArrayLike] | Sequence[ArrayLike],
    metrics: Sequence[str] = ("mutual_knn", "cknna", "cycle_knn"),
    topk: int = 10,
    *,
    clip_quantile: float | None = 0.95,
    normalize: bool = True,
    clip_mode: ClipMode = "row_mean",
    eps: float = 0.0,
    chunk: int | None = DEFAULT_CHUNK,
    device: str | torch.device | None = None,
) -> pd.DataFrame:
    """Score every cell X against one reference Y (e.g. an external encoder's features).

    Y: (N, Dy); cells: ``{key: X (N, Dx)}`` (e.g. ``{(block, t): features}``) or a sequence (keys
    0, 1, ...). Y is preprocessed and its neighbourhood computed once; then each cell is
    preprocessed, its kNN found ``chunk`` rows at a time (never more than chunk x N similarities;
    ``chunk=None`` = all rows at once) and every metric in ``metrics`` (a subset of
    :data:`METRICS`) scored: ``mutual_knn(X, Y)``, ``cknna(X, Y)``, ``cycle_knn(X, Y)`` (Y's
    neighbours, then the cell's), ``unbiased_cka(X, Y)``. Each value equals the single-pair
    function with the same options.

    Returns a DataFrame with one row per cell, in the order given: ``block, t`` when every key is
    a 2-tuple (else ``key``), one column per metric, ``n`` and ``topk``.
    """
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise ValueError(f"unknown metrics {unknown}; choose from {list(METRICS)}")
    items = list(cells.items()) if isinstance(cells, Mapping) else list(enumerate(cells))
    if not items:
        raise ValueError("align_cells: no cells given")
    knn_metrics = [m for m in metrics if m != "unbiased_cka"]
    if "cknna" in metrics and topk < 2:
        raise ValueError(f"cknna needs topk >= 2, got {topk}")
    yt = _prepared(Y, clip_quantile, normalize, clip_mode, device, "Y")
    n = yt.shape[0]
    nb_y = _knn(yt, topk, chunk) if knn_metrics else None
    rows = []
    for key, x in items:
        xt = _prepared(x, clip_quantile, normalize, clip_mode, yt.device, f"cell {key!r}")
        if xt.shape[0] != n:
            raise ValueError(f"cell {key!r} has {xt.shape[0]} rows, the reference Y has {n}; rows must be the same inputs")
        row: dict[str, float] = {}
        if knn_metrics:
            nb_x = _knn(xt, topk, chunk)
            if "mutual_knn" in metrics:
                row["mutual_knn"] = _mutual_from(nb_x, nb_y)
            if "cknna" in metrics:
                row["cknna"] = _cknna_from(nb_x, nb_y, eps)
            if "cycle_knn" in metrics:
                row["cycle_knn"] = _cycle_from(nb_x, nb_y)
        if "unbiased_cka" in metrics:
            row["unbiased_cka"] = _unbiased_cka_prepared(xt, yt, eps)
        rows.append(row)
    keys = [k for k, _ in items]
    if all(isinstance(k, tuple) and len(k) == 2 for k in keys):
        front = {"block": [k[0] for k in keys], "t": [k[1] for k in keys]}
    else:
        front = {"key": keys}
    values = {m: [r[m] for r in rows] for m in metrics}
    return pd.DataFrame({**front, **values, "n": n, "topk": topk})
