"""Representation similarity: CKA (biased, debiased, minibatch, RBF) and cosine matrices.

Functional core
---------------
``gram`` -> ``center`` -> ``hsic`` -> ``cka``: small pure functions on (n, n) Gram matrices, in the
order of Kornblith et al. (2019). ``cka(X, Y, debiased=False)`` on raw features (n x d1, n x d2,
numpy or torch) is the stable public entry point and returns a Python float.

Estimators (named explicitly, because the literature mixes them up)
--------------------------------------------------------------------
* ``debiased=False``: plug-in HSIC, ``<HKH, HLH>_F / (n-1)^2`` (Gretton 2005). Strongly inflated
  when d >> n: on independent Gaussian features it is far from 0.
* ``debiased=True``: unbiased HSIC (Song et al. 2012) written through the Szekely-Rizzo
  U-centring, ``<K~, L~>_F / (n (n-3))``; needs n >= 4. Close to 0 on independent data.
* Minibatch / streaming (Nguyen, Raghu, Kornblith 2021): average the per-batch unbiased HSIC over
  batches, then ``CKA = HSIC_xy / sqrt(HSIC_xx HSIC_yy)``. Batch-size robust for the debiased
  estimator (not for the biased one).

One-pass matrices
-----------------
``cka_matrix`` / ``cross_cka_matrix`` build the centred Gram of every representation in a batch,
stack them to (R, b*b) and get the whole (R x R) HSIC table with one matmul; ``CKAGrid`` wraps a
(blocks*t)^2 matrix with its keys and slices it into block x block per t and t x t per block.

All reductions run in float64 (inputs may be float16/32). Every function takes ``device`` (``None``
= CPU, ``"auto"`` = CUDA when available) so the same code runs on a GPU.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import numpy as np
import pandas as pd
import torch

from repdyn.core.runtime import resolve_device

from .cells import grid_cells

ArrayLike = Union[np.ndarray, torch.Tensor]
Reps = Union[Sequence[ArrayLike], Mapping[Hashable, ArrayLike]]

__all__ = [
    "as_features",
    "gram",
    "gram_linear",
    "gram_rbf",
    "center",
    "hsic",
    "cka",
    "cka_from_grams",
    "feature_space_linear_cka",
    "MinibatchCKA",
    "batch_slices",
    "cka_matrix",
    "cross_cka_matrix",
    "cosine_matrix",
    "CKAGrid",
    "cka_grid",
    "matrix_frame",
]


# --------------------------------------------------------------------------------------------
# input handling
# --------------------------------------------------------------------------------------------
def _device(device: str | torch.device | None) -> torch.device:
    """``None`` -> CPU (pure functions stay on the CPU unless asked), else :func:`repdyn.core.runtime.resolve_device`."""
    return torch.device("cpu") if device is None else resolve_device(device)


def as_features(
    x: ArrayLike,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float64,
    name: str = "features",
) -> torch.Tensor:
    """Convert numpy / torch input to a 2-D tensor (n, d) of ``dtype`` on ``device``.

    Shapes: (n,) -> (n, 1); (n, d) kept; (n, T, D) or more -> (n, T*D) (trailing axes flattened,
    each sample stays one row). Token tensors that should be treated as samples must be reshaped
    by the caller to (n*T, D). Raises ValueError on empty or non-finite input.
    """
    t = torch.as_tensor(x) if not isinstance(x, torch.Tensor) else x.detach()
    if t.ndim == 0:
        raise ValueError(f"{name}: expected an (n, d) array, got a scalar")
    if t.ndim == 1:
        t = t[:, None]
    elif t.ndim > 2:
        t = t.reshape(t.shape[0], -1)
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name}: empty array of shape {tuple(t.shape)}")
    t = t.to(device=_device(device), dtype=dtype)
    if not torch.isfinite(t).all():
        raise ValueError(f"{name}: contains NaN or Inf")
    return t


def _check_n(n: int, debiased: bool, what: str = "CKA") -> None:
    if debiased and n < 4:
        raise ValueError(f"debiased {what} needs n >= 4 samples, got n={n}")
    if n < 2:
        raise ValueError(f"{what} needs n >= 2 samples, got n={n}")


def _check_same_n(sizes: Sequence[int], what: str = "representations") -> int:
    if len(set(sizes)) != 1:
        raise ValueError(f"{what} have different sample counts: {sorted(set(sizes))}; rows must be the same inputs")
    return sizes[0]


# --------------------------------------------------------------------------------------------
# functional core: gram, center, hsic, cka
# --------------------------------------------------------------------------------------------
def gram_linear(x: ArrayLike, device: str | torch.device | None = None) -> torch.Tensor:
    """Linear kernel Gram matrix ``K = X X^T``.

    x: (n, d) features. Returns (n, n) float64.
    """
    x = as_features(x, device)
    return x @ x.T


def _median(v: torch.Tensor) -> torch.Tensor:
    """Median that averages the two middle values for even sizes (numpy's convention).

    ``torch.median`` returns the lower middle value and ``torch.quantile`` refuses > 2^24
    elements, so use two ``kthvalue`` calls.
    """
    v = v.reshape(-1)
    m = v.numel()
    lo = torch.kthvalue(v, (m + 1) // 2).values
    if m % 2:
        return lo
    hi = torch.kthvalue(v, m // 2 + 1).values
    return 0.5 * (lo + hi)


def gram_rbf(x: ArrayLike, threshold: float = 1.0, device: str | torch.device | None = None) -> torch.Tensor:
    """RBF (Gaussian) kernel Gram matrix with a median-distance bandwidth.

    ``K_ij = exp(-||x_i - x_j||^2 / (2 * threshold^2 * median_sq_dist))`` where the median runs
    over all n^2 squared distances (diagonal included), as in Kornblith et al.'s demo: the
    bandwidth is ``threshold`` times the median distance, so the kernel is scale invariant.

    x: (n, d). Returns (n, n) float64.
    """
    x = as_features(x, device)
    dot = x @ x.T
    sq_norms = torch.diagonal(dot)
    sq_dist = (sq_norms[:, None] + sq_norms[None, :] - 2.0 * dot).clamp_min_(0.0)
    med = _median(sq_dist)
    if med <= 0:
        raise ValueError("gram_rbf: median squared distance is 0 (constant features?)")
    return torch.exp(-sq_dist / (2.0 * threshold**2 * med))


Kernel = Literal["linear", "rbf"]


def gram(x: ArrayLike, kernel: Kernel = "linear", threshold: float = 1.0,
         device: str | torch.device | None = None) -> torch.Tensor:
    """Gram matrix of ``x`` (n, d) -> (n, n) for ``kernel`` in {"linear", "rbf"}."""
    if kernel == "linear":
        return gram_linear(x, device)
    if kernel == "rbf":
        return gram_rbf(x, threshold, device)
    raise ValueError(f"unknown kernel {kernel!r}; use 'linear' or 'rbf'")


def center(k: torch.Tensor, unbiased: bool = False) -> torch.Tensor:
    """Centre a Gram matrix (or a stack of them).

    k: (..., n, n) symmetric. Returns a new tensor of the same shape.

    * ``unbiased=False``: double centring ``H K H`` with ``H = I - 11^T/n``.
    * ``unbiased=True``: U-centring (Szekely & Rizzo 2014): zero the diagonal, subtract row and
      column sums / (n-2), add back the grand sum / ((n-1)(n-2)), zero the diagonal again. The
      Frobenius inner product of two U-centred matrices divided by n(n-3) is the unbiased HSIC
      estimator of Song et al.; needs n >= 4.
    """
    k = k.to(torch.float64)
    n = k.shape[-1]
    if unbiased:
        _check_n(n, True, "U-centring")
        eye = torch.eye(n, dtype=torch.bool, device=k.device)
        k = k.masked_fill(eye, 0.0)
        row = k.sum(-1) / (n - 2)                                  # (..., n)
        row = row - row.sum(-1, keepdim=True) / (2 * (n - 1))
        k = k - row[..., :, None] - row[..., None, :]
        return k.masked_fill_(eye, 0.0)
    row = k.mean(-1, keepdim=True)
    col = k.mean(-2, keepdim=True)
    return k - row - col + k.mean((-2, -1), keepdim=True)


def _hsic_scale(n: int, debiased: bool) -> float:
    return 1.0 / (n * (n - 3)) if debiased else 1.0 / (n - 1) ** 2


def hsic(k: torch.Tensor, l: torch.Tensor, debiased: bool = False, centered: bool = False) -> torch.Tensor:
    """HSIC between two (n, n) Gram matrices; returns a 0-d float64 tensor.

    ``debiased=False``: ``<HKH, HLH> / (n-1)^2``; ``debiased=True``: ``<K~, L~> / (n(n-3))`` with
    U-centred K~, L~ (unbiased, can be negative). Pass ``centered=True`` if k, l are already
    centred the matching way. The normalisation makes per-batch values of different batch sizes
    comparable, which the minibatch estimator relies on.
    """
    if k.shape != l.shape or k.ndim != 2 or k.shape[0] != k.shape[1]:
        raise ValueError(f"hsic: Gram matrices must both be (n, n), got {tuple(k.shape)} and {tuple(l.shape)}")
    n = k.shape[0]
    _check_n(n, debiased, "HSIC")
    if not centered:
        k, l = center(k, debiased), center(l, debiased)
    return (k.to(torch.float64) * l.to(torch.float64)).sum() * _hsic_scale(n, debiased)


def cka_from_grams(k: torch.Tensor, l: torch.Tensor, debiased: bool = False) -> float:
    """CKA from two (n, n) Gram matrices: ``HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))``."""
    n = k.shape[0]
    _check_n(n, debiased)
    kc, lc = center(k, debiased), center(l, debiased)
    xy = (kc * lc).sum()
    xx = (kc * kc).sum()
    yy = (lc * lc).sum()
    denom = torch.sqrt(xx * yy)
    if denom <= 0:
        return float("nan")
    return float(xy / denom)


def cka(
    x: ArrayLike,
    y: ArrayLike,
    debiased: bool = False,
    kernel: Kernel = "linear",
    threshold: float = 1.0,
    device: str | torch.device | None = None,
) -> float:
    """Centred kernel alignment between two representations of the same n inputs.

    x: (n, d1), y: (n, d2) -- numpy arrays or torch tensors, any float dtype (computed in fp64).
    ``debiased`` picks the unbiased HSIC (recommended whenever d is not << n). ``kernel`` is
    "linear" or "rbf" (bandwidth = ``threshold`` x median distance). Returns a Python float in
    [0, 1] for the biased estimator (the debiased one can dip slightly below 0).

    Stable public entry point: ``repdyn.analysis.similarity.cka(X, Y, debiased=False)``.
    """
    xt = as_features(x, device, name="X")
    yt = as_features(y, device, name="Y")
    _check_same_n([xt.shape[0], yt.shape[0]], "X and Y")
    _check_n(xt.shape[0], debiased)
    return cka_from_grams(gram(xt, kernel, threshold), gram(yt, kernel, threshold), debiased)


def _debiased_feature_dot(xty_sq: torch.Tensor, diag_dot: torch.Tensor, sq_x: torch.Tensor,
                          sq_y: torch.Tensor, n: int) -> torch.Tensor:
    """n(n-3) * unbiased HSIC for linear kernels, from feature-space statistics.

    For column-centred X, Y with K = XX^T, L = YY^T (so K1 = 0):
    ``<K~u, L~u> = tr(KL) - n/(n-2) sum_i K_ii L_ii + tr(K) tr(L) / ((n-1)(n-2))``
    where ``tr(KL) = ||X^T Y||_F^2`` (``xty_sq``), ``sum_i K_ii L_ii`` is ``diag_dot`` and
    ``tr(K) = ||X||_F^2`` (``sq_x``). Works elementwise on broadcastable tensors.
    """
    return xty_sq - n / (n - 2) * diag_dot + sq_x * sq_y / ((n - 1) * (n - 2))


def feature_space_linear_cka(x: ArrayLike, y: ArrayLike, debiased: bool = False,
                             device: str | torch.device | None = None) -> float:
    """Linear CKA computed in feature space: O(n d1 d2) time, no (n, n) matrix.

    x: (n, d1), y: (n, d2). Equal to ``cka(x, y, debiased)`` with the linear kernel; the right
    choice when n is large (10k+) and d is small (pooled features). Returns a float.
    """
    xt = as_features(x, device, name="X")
    yt = as_features(y, device, name="Y")
    n = _check_same_n([xt.shape[0], yt.shape[0]], "X and Y")
    _check_n(n, debiased)
    xt = xt - xt.mean(0, keepdim=True)
    yt = yt - yt.mean(0, keepdim=True)
    xy = (xt.T @ yt).square().sum()
    xx = (xt.T @ xt).square().sum()
    yy = (yt.T @ yt).square().sum()
    if debiased:
        rx, ry = xt.square().sum(1), yt.square().sum(1)        # K_ii, L_ii
        sx, sy = rx.sum(), ry.sum()
        xy = _debiased_feature_dot(xy, rx @ ry, sx, sy, n)
        xx = _debiased_feature_dot(xx, rx @ rx, sx, sx, n)
        yy = _debiased_feature_dot(yy, ry @ ry, sy, sy, n)
    denom = torch.sqrt(xx * yy)
    return float(xy / denom) if denom > 0 else float("nan")


# --------------------------------------------------------------------------------------------
# minibatch / streaming estimator (stacked Grams, one matmul per batch)
# --------------------------------------------------------------------------------------------
def _center_inplace(g: torch.Tensor, unbiased: bool) -> torch.Tensor:
    """Same result as ``center`` for one fresh (n, n) float64 Gram, without temporaries."""
    n = g.shape[0]
    if unbiased:
        g.fill_diagonal_(0.0)
        row = g.sum(1) / (n - 2)
        row -= row.sum() / (2 * (n - 1))
        g -= row[:, None]
        g -= row[None, :]
        return g.fill_diagonal_(0.0)
    row = g.mean(1)
    grand = row.mean()
    g -= row[:, None]
    g -= row[None, :]
    return g.add_(grand)


def _stacked_centered_grams(reps: Sequence[torch.Tensor], kernel: Kernel, threshold: float,
                            debiased: bool, precision: str) -> torch.Tensor:
    """(R, b*b) float64: the centred Gram of each (b, d_r) representation, flattened.

    Each Gram is written straight into its row of the stack and centred in place, so the only
    large allocation is the (R, b*b) stack itself.
    """
    b = reps[0].shape[0]
    out = torch.empty((len(reps), b * b), dtype=torch.float64, device=reps[0].device)
    for i, r in enumerate(reps):
        g = out[i].view(b, b)
        if kernel == "linear":
            if precision == "mixed":
                r32 = r.to(torch.float32)
                g.copy_(r32 @ r32.T)
            else:
                r64 = r.to(torch.float64)
                torch.matmul(r64, r64.T, out=g)
        else:
            g.copy_(gram_rbf(r, threshold, device=r.device))
        _center_inplace(g, debiased)
    return out


class MinibatchCKA:
    """Streaming CKA accumulator for R_a x R_b representation pairs (Nguyen et al. 2021).

    Each ``update`` takes one batch of b samples for every representation (same rows across
    representations), builds every centred Gram once, stacks them to (R, b*b) and adds one
    (R_a x R_b) HSIC table (a single matmul). ``compute`` averages the per-batch HSIC values and
    returns ``mean HSIC_xy / sqrt(mean HSIC_xx * mean HSIC_yy)`` as an (R_a, R_b) numpy array.

    Within one model (``cross=False``) the table is (R, R) and symmetric with a unit diagonal.
    Across two models (``cross=True``) ``update(reps_a, reps_b)`` accumulates the (R_a, R_b)
    table plus the two self-HSIC vectors. ``keep_batches=True`` stores every per-batch table so
    ``bootstrap_ci`` can resample batches.

    Debiased (default) needs b >= 4 per batch and is batch-size robust; the biased per-batch
    average depends strongly on b and is offered only for comparison.
    """

    def __init__(self, debiased: bool = True, kernel: Kernel = "linear", threshold: float = 1.0,
                 cross: bool = False, device: str | torch.device | None = None,
                 precision: Literal["double", "mixed"] = "double", keep_batches: bool = False):
        if kernel not in ("linear", "rbf"):
            raise ValueError(f"unknown kernel {kernel!r}; use 'linear' or 'rbf'")
        if precision not in ("double", "mixed"):
            raise ValueError(f"precision must be 'double' or 'mixed', got {precision!r}")
        self.debiased, self.kernel, self.threshold = debiased, kernel, threshold
        self.cross, self.device, self.precision = cross, _device(device), precision
        self.keep_batches = keep_batches
        self.reset()

    def reset(self) -> None:
        self._xy: torch.Tensor | None = None
        self._xx: torch.Tensor | None = None
        self._yy: torch.Tensor | None = None
        self._batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.n_batches = 0
        self.n_samples = 0
        self._shape: tuple[int, int] | None = None

    def _prepare(self, reps: Sequence[ArrayLike], side: str) -> list[torch.Tensor]:
        if len(reps) == 0:
            raise ValueError(f"MinibatchCKA.update: no representations given for {side}")
        dt = torch.float32 if self.precision == "mixed" else torch.float64
        ts = [as_features(r, self.device, dtype=dt, name=f"{side}[{i}]") for i, r in enumerate(reps)]
        return ts

    def update(self, reps_a: Sequence[ArrayLike], reps_b: Sequence[ArrayLike] | None = None) -> "MinibatchCKA":
        """Add one batch. reps_a: R_a arrays of shape (b, d_r) over the same b inputs (and reps_b
        of shape (b, d'_r) for ``cross=True``; the b rows must be the same inputs as in reps_a)."""
        if self.cross and reps_b is None:
            raise ValueError("MinibatchCKA(cross=True).update needs reps_b")
        if not self.cross and reps_b is not None:
            raise ValueError("MinibatchCKA(cross=False).update takes one list; use cross=True for two models")
        a = self._prepare(reps_a, "reps_a")
        b_ = self._prepare(reps_b, "reps_b") if reps_b is not None else None
        sizes = [t.shape[0] for t in a] + ([t.shape[0] for t in b_] if b_ is not None else [])
        n = _check_same_n(sizes, "representations in this batch (model A vs model B?)")
        _check_n(n, self.debiased, "minibatch CKA batch")
        shape = (len(a), len(b_) if b_ is not None else len(a))
        if self._shape is not None and shape != self._shape:
            raise ValueError(f"MinibatchCKA.update: got {shape} representations, earlier batches had {self._shape}")
        self._shape = shape
        scale = _hsic_scale(n, self.debiased)
        ga = _stacked_centered_grams(a, self.kernel, self.threshold, self.debiased, self.precision)
        xx = ga.square().sum(1) * scale                                           # (R_a,)
        if b_ is None:
            xy = (ga @ ga.T) * scale                                               # (R_a, R_a)
            yy = xx
        else:
            gb = _stacked_centered_grams(b_, self.kernel, self.threshold, self.debiased, self.precision)
            xy = (ga @ gb.T) * scale                                               # (R_a, R_b)
            yy = gb.square().sum(1) * scale
        if self._xy is None:
            self._xy, self._xx, self._yy = xy.clone(), xx.clone(), yy.clone()
        else:
            self._xy += xy
            self._xx += xx
            self._yy += yy
        if self.keep_batches:
            self._batches.append((xy.cpu(), xx.cpu(), yy.cpu()))
        self.n_batches += 1
        self.n_samples += n
        return self

    @staticmethod
    def _ratio(xy: torch.Tensor, xx: torch.Tensor, yy: torch.Tensor) -> torch.Tensor:
        denom = torch.sqrt(torch.clamp(xx[:, None] * yy[None, :], min=0.0))
        out = xy / denom
        return torch.where(denom > 0, out, torch.full_like(out, float("nan")))

    def hsic_table(self) -> np.ndarray:
        """Mean per-batch HSIC, (R_a, R_b) float64."""
        if self._xy is None:
            raise ValueError("MinibatchCKA: no batches were added")
        return (self._xy / self.n_batches).cpu().numpy()

    def compute(self) -> np.ndarray:
        """(R_a, R_b) float64 CKA matrix from the batches seen so far."""
        if self._xy is None:
            raise ValueError("MinibatchCKA: no batches were added")
        m = self._ratio(self._xy, self._xx, self._yy).cpu().numpy()
        if not self.cross:
            m = 0.5 * (m + m.T)
            np.fill_diagonal(m, 1.0)
        return m

    def bootstrap_ci(self, n_boot: int = 200, ci: float = 0.95, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Percentile bootstrap over batches: (low, high), each (R_a, R_b). Needs keep_batches."""
        if not self.keep_batches or len(self._batches) < 2:
            raise ValueError("bootstrap_ci needs keep_batches=True and at least 2 batches")
        xy = torch.stack([b[0] for b in self._batches])
        xx = torch.stack([b[1] for b in self._batches])
        yy = torch.stack([b[2] for b in self._batches])
        g = torch.Generator().manual_seed(seed)
        nb = xy.shape[0]
        reps = []
        for _ in range(n_boot):
            idx = torch.randint(0, nb, (nb,), generator=g)
            reps.append(self._ratio(xy[idx].sum(0), xx[idx].sum(0), yy[idx].sum(0)))
        stack = torch.stack(reps).numpy()
        a = (1 - ci) / 2
        return np.nanquantile(stack, a, axis=0), np.nanquantile(stack, 1 - a, axis=0)


# --------------------------------------------------------------------------------------------
# whole matrices
# --------------------------------------------------------------------------------------------
def _rep_list(reps: Reps) -> tuple[list[Any], list[Hashable]]:
    if isinstance(reps, Mapping):
        keys = list(reps.keys())
        return [reps[k] for k in keys], keys
    reps = list(reps)
    return reps, list(range(len(reps)))


def batch_slices(n: int, batch_size: int, min_last: int | None = None) -> list[slice]:
    """Contiguous batches of ``batch_size`` rows; a trailing batch smaller than ``min_last``
    (default max(4, batch_size // 2)) is merged into the previous one. The batches
    ``cka_matrix(method="minibatch")`` uses."""
    min_last = max(4, batch_size // 2) if min_last is None else min_last
    starts = list(range(0, n, batch_size))
    sl = [slice(s, min(s + batch_size, n)) for s in starts]
    if len(sl) > 1 and (sl[-1].stop - sl[-1].start) < min_last:
        last = sl.pop()
        sl[-1] = slice(sl[-1].start, last.stop)
    return sl


def _feature_space_matrix(ra: list[ArrayLike], rb: list[ArrayLike] | None, debiased: bool,
                          device: torch.device) -> np.ndarray:
    """Exact full-data linear CKA matrix in feature space (pooled features: n large, d small)."""
    def prep(reps, side):
        ts = [as_features(r, device, name=f"{side}[{i}]") for i, r in enumerate(reps)]
        return [t - t.mean(0, keepdim=True) for t in ts]

    xa = prep(ra, "reps_a")
    xb = prep(rb, "reps_b") if rb is not None else xa
    n = _check_same_n([t.shape[0] for t in xa + xb], "representations (model A vs model B?)")
    _check_n(n, debiased)
    cat_b = torch.cat(xb, 1)                                   # (n, sum d_b)
    splits = [t.shape[1] for t in xb]
    xy = torch.empty((len(xa), len(xb)), dtype=torch.float64, device=device)
    for i, x in enumerate(xa):
        prod = (x.T @ cat_b).square()                          # (d_i, sum d_b)
        xy[i] = torch.stack([c.sum() for c in prod.split(splits, dim=1)])

    def self_dot(xs):
        return torch.stack([(x.T @ x).square().sum() for x in xs])

    xx = self_dot(xa)
    yy = self_dot(xb) if rb is not None else xx
    if debiased:
        rows_a = torch.stack([x.square().sum(1) for x in xa])     # (R_a, n): K_ii per rep
        rows_b = torch.stack([x.square().sum(1) for x in xb]) if rb is not None else rows_a
        sa, sb = rows_a.sum(1), rows_b.sum(1)
        xy = _debiased_feature_dot(xy, rows_a @ rows_b.T, sa[:, None], sb[None, :], n)
        xx = _debiased_feature_dot(xx, rows_a.square().sum(1), sa, sa, n)
        yy = _debiased_feature_dot(yy, rows_b.square().sum(1), sb, sb, n)
    return MinibatchCKA._ratio(xy, xx, yy).cpu().numpy()


Method = Literal["auto", "gram", "minibatch", "feature"]


def _matrix(ra: list[ArrayLike], rb: list[ArrayLike] | None, debiased: bool, kernel: Kernel,
            threshold: float, method: Method, batch_size: int, device: str | torch.device | None,
            precision: str, max_gram_bytes: float, shuffle_seed: int | None) -> np.ndarray:
    if len(ra) == 0 or (rb is not None and len(rb) == 0):
        raise ValueError("cka_matrix: need at least one representation")
    dev = _device(device)
    sizes = [int(np.shape(r)[0]) for r in ra] + ([int(np.shape(r)[0]) for r in rb] if rb is not None else [])
    n = _check_same_n(sizes, "representations (model A vs model B?)")
    _check_n(n, debiased)
    n_reps = len(ra) + (len(rb) if rb is not None else 0)
    if method == "auto":
        method = "gram" if n_reps * n * n * 8 <= max_gram_bytes else "minibatch"
    if method == "feature":
        if kernel != "linear":
            raise ValueError("method='feature' is only defined for the linear kernel")
        return _feature_space_matrix(ra, rb, debiased, dev)
    if method not in ("gram", "minibatch"):
        raise ValueError(f"unknown method {method!r}; use auto|gram|minibatch|feature")
    acc = MinibatchCKA(debiased=debiased, kernel=kernel, threshold=threshold, cross=rb is not None,
                       device=dev, precision=precision)
    if method == "gram":
        slices = [slice(0, n)]
    else:
        if debiased and batch_size < 4:
            raise ValueError(f"debiased minibatch CKA needs batch_size >= 4, got {batch_size}")
        slices = batch_slices(n, batch_size)
    order = None
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(n)

    def take(r, s):
        if order is not None:
            idx = order[s]
            return r[torch.as_tensor(idx)] if isinstance(r, torch.Tensor) else np.asarray(r)[idx]
        return r[s]

    for s in slices:
        acc.update([take(r, s) for r in ra], [take(r, s) for r in rb] if rb is not None else None)
    return acc.compute()


def cka_matrix(
    reps: Reps,
    other: Reps | None = None,
    debiased: bool = True,
    kernel: Kernel = "linear",
    threshold: float = 1.0,
    method: Method = "auto",
    batch_size: int = 512,
    device: str | torch.device | None = None,
    precision: Literal["double", "mixed"] = "double",
    max_gram_bytes: float = 2**30,
    shuffle_seed: int | None = None,
) -> np.ndarray:
    """(R, R) CKA matrix between R representations of the same n inputs, in one pass.

    reps: list of (n, d_r) arrays/tensors or a mapping key -> array (order = mapping order).
    method:
      * "gram": full-data Grams stacked (R, n*n), one matmul -- exact, memory R*n^2*8 bytes;
      * "minibatch": Nguyen et al. estimator over contiguous batches of ``batch_size`` (a short
        tail batch is merged into the previous one); use with ``debiased=True``;
      * "feature": exact full-data linear CKA in feature space, O(n d^2) per pair, for pooled
        features with n large and d small;
      * "auto": "gram" if the stacked Grams fit in ``max_gram_bytes`` else "minibatch".
    precision "mixed" builds linear Grams in fp32 (2x faster on CPU), centring and HSIC in fp64.
    ``shuffle_seed`` permutes rows before batching (use when rows are sorted by class).
    Returns float64 numpy (R, R), symmetric, unit diagonal; with ``other`` (R_b representations of
    the same inputs, see :func:`cross_cka_matrix`) the (R, R_b) cross matrix.
    """
    ra, _ = _rep_list(reps)
    rb = _rep_list(other)[0] if other is not None else None
    return _matrix(ra, rb, debiased, kernel, threshold, method, batch_size, device, precision,
                   max_gram_bytes, shuffle_seed)


def cross_cka_matrix(reps_a: Reps, reps_b: Reps, **options: Any) -> np.ndarray:
    """(R_a, R_b) CKA between two models' representations of the *same* n inputs.

    For teacher EMA vs student online, checkpoint i vs j, SRA vs baseline: row i of ``reps_a[r]``
    and of ``reps_b[s]`` must come from the same input (and, for diffusion features, the same
    noise draw). ``options``: those of :func:`cka_matrix`. Raises ValueError on mismatched sample counts.
    """
    return cka_matrix(reps_a, other=reps_b, **options)


def cosine_matrix(
    reps: Reps,
    reps_b: Reps | None = None,
    mode: Literal["per_sample", "mean_vector"] = "per_sample",
    absolute: bool = False,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Cosine similarity between representations of pooled features (all the same width D).

    reps: R arrays of shape (n, D) (or (n, T, D): tokens are then treated as extra samples).
    * "per_sample": mean over the n rows of cos(x_i, y_i) -- each sample compared with itself
      in the other representation (normalise rows, flatten to (R, n*D), one matmul / n).
    * "mean_vector": cosine between the sample-mean vectors (DiverseDiT's orthogonality term).
    ``absolute`` takes |.| of the final value. Not invariant to rotations (unlike CKA): it compares
    the residual-stream coordinates directly, which is meaningful between blocks of one model.
    Returns (R, R_b) float64 numpy.
    """
    def prep(rs, side):
        out = []
        for i, r in enumerate(rs):
            t = torch.as_tensor(r) if not isinstance(r, torch.Tensor) else r.detach()
            t = t.reshape(-1, t.shape[-1]) if t.ndim > 2 else t
            out.append(as_features(t, device, name=f"{side}[{i}]"))
        return out

    ra, _ = _rep_list(reps)
    xa = prep(ra, "reps")
    xb = prep(_rep_list(reps_b)[0], "reps_b") if reps_b is not None else xa
    if len({t.shape[1] for t in xa + xb}) != 1:
        raise ValueError(f"cosine_matrix: representations need the same width, got {sorted({t.shape[1] for t in xa + xb})}")
    n = _check_same_n([t.shape[0] for t in xa + xb], "representations")
    if mode == "per_sample":
        fa = torch.stack([torch.nn.functional.normalize(t, dim=1).reshape(-1) for t in xa])
        fb = torch.stack([torch.nn.functional.normalize(t, dim=1).reshape(-1) for t in xb]) if reps_b is not None else fa
        m = (fa @ fb.T) / n
    elif mode == "mean_vector":
        fa = torch.nn.functional.normalize(torch.stack([t.mean(0) for t in xa]), dim=1)
        fb = torch.nn.functional.normalize(torch.stack([t.mean(0) for t in xb]), dim=1) if reps_b is not None else fa
        m = fa @ fb.T
    else:
        raise ValueError(f"unknown mode {mode!r}; use 'per_sample' or 'mean_vector'")
    m = m.abs() if absolute else m
    return m.cpu().numpy()


# --------------------------------------------------------------------------------------------
# block x t grid
# --------------------------------------------------------------------------------------------
@dataclass
class CKAGrid:
    """A CKA matrix over (block, t) cells with its keys.

    matrix: (R_a, R_b) float64; keys_a / keys_b: lists of (block, t) tuples (R_a, R_b long).
    ``block_by_block(t)`` and ``t_by_t(block)`` slice it; ``to_frame()`` gives a tidy table.
    """

    matrix: np.ndarray
    keys_a: list[tuple[Any, Any]]
    keys_b: list[tuple[Any, Any]]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def blocks(self) -> list[Any]:
        return sorted({k[0] for k in self.keys_a})

    @property
    def ts(self) -> list[Any]:
        return sorted({k[1] for k in self.keys_a})

    def _sub(self, rows: list[int], cols: list[int]) -> np.ndarray:
        return self.matrix[np.ix_(rows, cols)]

    def block_by_block(self, t: Any) -> tuple[np.ndarray, list[Any], list[Any]]:
        """(L_a, L_b) matrix at timestep t, with the block labels of rows and columns."""
        rows = [i for i, k in enumerate(self.keys_a) if k[1] == t]
        cols = [j for j, k in enumerate(self.keys_b) if k[1] == t]
        if not rows or not cols:
            raise ValueError(f"t={t!r} not in the grid")
        return self._sub(rows, cols), [self.keys_a[i][0] for i in rows], [self.keys_b[j][0] for j in cols]

    def t_by_t(self, block: Any, block_b: Any | None = None) -> tuple[np.ndarray, list[Any], list[Any]]:
        """(T_a, T_b) matrix for one block (rows: ``block``, columns: ``block_b`` or the same)."""
        block_b = block if block_b is None else block_b
        rows = [i for i, k in enumerate(self.keys_a) if k[0] == block]
        cols = [j for j, k in enumerate(self.keys_b) if k[0] == block_b]
        if not rows or not cols:
            raise ValueError(f"block {block!r} / {block_b!r} not in the grid")
        return self._sub(rows, cols), [self.keys_a[i][1] for i in rows], [self.keys_b[j][1] for j in cols]

    def to_frame(self, value: str = "cka") -> pd.DataFrame:
        """Tidy table: block_a, t_a, block_b, t_b, value (one row per cell pair)."""
        return matrix_frame(self.matrix, self.keys_a, self.keys_b, value=value)


def matrix_frame(matrix: np.ndarray, keys_a: Sequence[Any], keys_b: Sequence[Any] | None = None,
                 value: str = "value") -> pd.DataFrame:
    """Long table of an (R_a, R_b) matrix. (block, t) tuple keys become block_a, t_a, block_b, t_b
    columns; other keys become ``key_a`` / ``key_b``."""
    keys_b = keys_a if keys_b is None else keys_b
    m = np.asarray(matrix)
    if m.shape != (len(keys_a), len(keys_b)):
        raise ValueError(f"matrix shape {m.shape} does not match keys ({len(keys_a)}, {len(keys_b)})")
    ia, ib = np.meshgrid(np.arange(len(keys_a)), np.arange(len(keys_b)), indexing="ij")
    ia, ib = ia.ravel(), ib.ravel()
    cols: dict[str, Any] = {}
    for side, keys, idx in (("a", keys_a, ia), ("b", keys_b, ib)):
        if all(isinstance(k, tuple) and len(k) == 2 for k in keys):
            cols[f"block_{side}"] = [keys[i][0] for i in idx]
            cols[f"t_{side}"] = [keys[i][1] for i in idx]
        else:
            cols[f"key_{side}"] = [keys[i] for i in idx]
    cols[value] = m[ia, ib]
    return pd.DataFrame(cols)


def _grid_keys(features: Mapping[tuple[Any, Any], Any], blocks: Sequence[Any] | None,
               ts: Sequence[Any] | None) -> list[tuple[Any, Any]]:
    blocks, ts = grid_cells(features, blocks, ts)
    return [(b, t) for b in blocks for t in ts]


def cka_grid(
    features: Mapping[tuple[Any, Any], ArrayLike],
    features_b: Mapping[tuple[Any, Any], ArrayLike] | None = None,
    blocks: Sequence[Any] | None = None,
    ts: Sequence[Any] | None = None,
    **kwargs: Any,
) -> CKAGrid:
    """Full (blocks*t)^2 CKA over a ``{(block, t): (n, d)}`` grid (``repdyn.probe.grid`` features).

    Keys are ordered block-major: (b1, t1), (b1, t2), ..., so each block is a contiguous run of
    T rows. With ``features_b`` (another model / checkpoint / weights on the same inputs and
    noise) the result is the cross-model matrix. ``kwargs`` go to ``cka_matrix``.
    """
    keys_a = _grid_keys(features, blocks, ts)
    if features_b is None:
        m = cka_matrix([features[k] for k in keys_a], **kwargs)
        keys_b = keys_a
    else:
        keys_b = _grid_keys(features_b, blocks, ts)
        m = cross_cka_matrix([features[k] for k in keys_a], [features_b[k] for k in keys_b], **kwargs)
    meta = {"debiased": kwargs.get("debiased", True), "kernel": kwargs.get("kernel", "linear"),
            "method": kwargs.get("method", "auto")}
    return CKAGrid(m, keys_a, keys_b, meta)
