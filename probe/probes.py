"""Linear probes for a whole block x timestep grid: torch (batched L-BFGS), ridge, sklearn, cuML, k-NN,
and linear-sgd (the papers' BatchNorm + linear layer protocol); the batched L-BFGS solver is
:mod:`repdyn.probe.lbfgs`.

One protocol for every backend except linear-sgd (REPA / DINOv2 style, see ``docs/probing.md``):

1. the train split is cut into a fit part and a held-out part (``holdout`` fraction, seeded,
   by image so token-level samples of one image never straddle the cut);
2. features are standardised with the fit part's mean / std (diffusion features have a few
   "massive" channels; unscaled L-BFGS then stalls);
3. every L2 strength of the sweep is fitted, the one with the best held-out accuracy (ties: the
   lower held-out loss) is kept per cell;
4. the probe is refitted on the whole train split with that strength (DINOv2 refits on
   train + val) and scored once on the official test split.

The torch backend fits **every cell at once**: features are stacked into a (cells, N, D) tensor,
weights into (cells, D + 1, strengths, classes), and a batched L-BFGS keeps a separate history,
step size and stopping test per problem, so each (cell, strength) problem is solved as if it were
alone while every iteration is one batched matmul. The strengths are solved from the strongest to
the weakest, each warm-started at the previous solution, and the solver works in each cell's
``X^T X`` eigenbasis with a diagonal preconditioner (diffusion features are very ill-conditioned
even after z-scoring). Every problem reports whether it converged (max |grad| < ``tol``); see
:class:`ProbeResult`. The loss is ``mean cross-entropy + lam / 2 * ||W||^2`` (bias not
penalised); scikit-learn's ``C`` is ``1 / (lam * n)``.

``linear-sgd`` is the MAE linear-probe recipe that SRA and REPA report (BatchNorm1d without
affine, one linear layer, AdamW with cosine lr, a fixed number of epochs, scored on test, no
strength search), for all cells in one batched computation.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from .lbfgs import batched_logreg

__all__ = ["ProbeResult", "fit_probes", "CellProbe", "fit_cell_probe", "PROBES", "DEFAULT_LAMBDAS", "DEFAULT_RIDGE_ALPHAS",
           "holdout_split", "batched_ridge", "knn_predict"]

PROBES = ("torch", "ridge", "sklearn", "cuml", "knn", "linear-sgd")
DEFAULT_LAMBDAS = tuple(float(x) for x in 10.0 ** np.arange(-6, 1))  # 1e-6 .. 1
DEFAULT_RIDGE_ALPHAS = tuple(float(x) for x in 10.0 ** np.arange(-4, 4.5, 0.5))  # 1e-4 .. 1e4


@dataclass
class ProbeResult:
    """Per-cell results, in the order of the stacked input cells.

    ``converged``: the chosen fit converged (torch: max |grad| < tol in both the chosen strength's
    sweep fit and the refit; sklearn / cuML: both stopped before ``max_iter``; closed-form and
    fixed-schedule probes (ridge, knn, linear-sgd): always True). ``iterations``: iterations of the
    refit (linear-sgd: optimiser steps; closed form: 0; -1: not reported). ``sweep_converged`` /
    ``sweep_iterations``: (cells, strengths) for every strength of ``protocol["reg_grid"]``, in that
    order (empty second axis for probes without a sweep).
    """

    accuracy: np.ndarray  # top-1 on the test split
    val_accuracy: np.ndarray  # held-out accuracy at the chosen strength (nan for k-NN, linear-sgd)
    train_accuracy: np.ndarray  # on the full train split after the refit
    reg: np.ndarray  # chosen strength (lam for logistic, alpha for ridge, nan for k-NN, linear-sgd)
    protocol: dict = field(default_factory=dict)
    seconds: float = 0.0
    converged: np.ndarray | None = None  # (cells,) bool
    iterations: np.ndarray | None = None  # (cells,) int
    sweep_converged: np.ndarray | None = None  # (cells, strengths) bool
    sweep_iterations: np.ndarray | None = None  # (cells, strengths) int


# ----------------------------------------------------------------------------------------------
# Shared protocol pieces
# ----------------------------------------------------------------------------------------------


def holdout_split(n: int, frac: float, seed: int, groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks (fit, held-out) over n samples; whole groups (images) go to one side."""
    if not 0.0 < frac < 1.0:
        raise ValueError(f"holdout fraction must be in (0, 1), got {frac}")
    g = np.arange(n) if groups is None else np.asarray(groups)
    uniq = np.unique(g)
    if len(uniq) < 2:
        raise ValueError("need at least 2 training images to hold some out")
    rng = np.random.default_rng(seed)
    n_val = max(1, int(round(frac * len(uniq))))
    val_groups = rng.permutation(uniq)[:n_val]
    val = np.isin(g, val_groups)
    return ~val, val


def _standardise(x: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean / std over samples of ``ref`` (C, N, D) -> (C, 1, D); constant channels get std 1."""
    mu = ref.mean(dim=1, keepdim=True)
    sd = ref.std(dim=1, keepdim=True, unbiased=False)
    sd = torch.where(sd > 1e-6 * sd.amax(dim=2, keepdim=True).clamp_min(1e-12), sd, torch.ones_like(sd))
    return mu, sd


def _to_tensor(x, device, dtype) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=dtype)
    return torch.as_tensor(np.asarray(x), dtype=dtype, device=device)


def _check_inputs(xtr, ytr, xte, yte) -> None:
    if xtr.ndim != 3 or xte.ndim != 3:
        raise ValueError("features must be stacked as (cells, N, D)")
    if xtr.shape[0] != xte.shape[0] or xtr.shape[2] != xte.shape[2]:
        raise ValueError(f"train {tuple(xtr.shape)} and test {tuple(xte.shape)} features disagree in cells or width")
    if xtr.shape[1] != len(ytr) or xte.shape[1] != len(yte):
        raise ValueError("features and labels disagree in the number of samples")
    if xtr.shape[1] == 0 or xte.shape[1] == 0:
        raise ValueError("empty train or test split")
    if len(np.unique(np.asarray(ytr))) < 2:
        raise ValueError("the training labels have a single class: nothing to probe")


def _acc_loss(xa: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Accuracy and mean CE (C, L) of weights (C, D+1, L, K) on (C, M, D+1)."""
    c, m, d1 = xa.shape
    _, _, l, k = w.shape
    z = torch.bmm(xa, w.reshape(c, d1, l * k)).reshape(c, m, l, k)
    acc = (z.argmax(3) == y[None, :, None]).float().mean(1)
    ce = torch.nn.functional.cross_entropy(z.permute(0, 3, 1, 2), y[None, :, None].expand(c, m, l).long(),
                                           reduction="none").mean(1)
    return acc, ce


def _augment(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones((*x.shape[:2], 1), device=x.device, dtype=x.dtype)], dim=2)


def _select(acc: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
    """Best strength per cell: highest held-out accuracy, ties broken by the lower held-out loss."""
    best = acc.amax(1, keepdim=True)
    cand = torch.where(acc >= best - 1e-9, -loss, torch.full_like(loss, -math.inf))
    return cand.argmax(1)


def _fit_torch(xtr, ytr, xte, yte, k, fit, val, lambdas, device, dtype, max_iter, tol, cell_chunk, progress=False):
    dev = torch.device(device)
    lam_all = torch.tensor(lambdas, dtype=dtype, device=dev)
    ytr_t = torch.as_tensor(ytr, device=dev)
    yte_t = torch.as_tensor(yte, device=dev)
    fit_t = torch.as_tensor(fit, device=dev)
    val_t = torch.as_tensor(val, device=dev)
    keys = ("acc", "val", "train", "reg", "converged", "iterations", "sweep_converged", "sweep_iterations")
    out = {k_: [] for k_ in keys}
    n_cells = xtr.shape[0]
    # progress in (sweep, refit) stages per chunk of cells: a grid's fit can take minutes on a CPU
    bar = tqdm(total=2 * math.ceil(n_cells / cell_chunk), disable=not progress, leave=False, dynamic_ncols=True,
               desc=f"fit {n_cells} torch probes x {len(lambdas)} strengths")
    for c0 in range(0, n_cells, cell_chunk):
        a = _to_tensor(xtr[c0 : c0 + cell_chunk], dev, dtype)
        b = _to_tensor(xte[c0 : c0 + cell_chunk], dev, dtype)
        c = a.shape[0]
        # 1) sweep on the fit part (strongest to weakest, warm-started), score on the held-out part
        mu, sd = _standardise(a, a[:, fit_t])
        xf = _augment((a[:, fit_t] - mu) / sd)
        xv = _augment((a[:, val_t] - mu) / sd)
        w, info1 = batched_logreg(xf, ytr_t[fit_t], k, lam_all[None].expand(c, -1).contiguous(),
                                  max_iter=max_iter, tol=tol)
        vacc, vloss = _acc_loss(xv, w, ytr_t[val_t])
        pick = _select(vacc, vloss)  # (C,)
        del xf, xv
        bar.update(1)
        # 2) refit on the whole train split with the chosen strength (warm start)
        mu, sd = _standardise(a, a)
        xa = _augment((a - mu) / sd)
        w0 = w[torch.arange(c), :, pick][:, :, None, :]  # (C, D+1, 1, K)
        lam = lam_all[pick][:, None]
        w2, info2 = batched_logreg(xa, ytr_t, k, lam, w0=w0, max_iter=max_iter, tol=tol)
        tr_acc, _ = _acc_loss(xa, w2, ytr_t)
        te_acc, _ = _acc_loss(_augment((b - mu) / sd), w2, yte_t)
        p = pick.cpu().numpy()
        out["acc"].append(te_acc[:, 0].double().cpu().numpy())
        out["train"].append(tr_acc[:, 0].double().cpu().numpy())
        out["val"].append(vacc[torch.arange(c), pick].double().cpu().numpy())
        out["reg"].append(lam[:, 0].double().cpu().numpy())
        out["converged"].append(info1["converged"][np.arange(c), p] & info2["converged"][:, 0])
        out["iterations"].append(info2["iterations"][:, 0])
        out["sweep_converged"].append(info1["converged"])
        out["sweep_iterations"].append(info1["iterations"])
        bar.update(1)
    bar.close()
    return {k_: np.concatenate(v) for k_, v in out.items()}, {}


# ----------------------------------------------------------------------------------------------
# Closed-form ridge on one-hot targets (fast screen)
# ----------------------------------------------------------------------------------------------


def batched_ridge(x: torch.Tensor, y: torch.Tensor, k: int, alphas: torch.Tensor) -> torch.Tensor:
    """Ridge weights for every alpha from one eigendecomposition per cell.

    Minimises ``1/N ||X W - Y_c||^2 + alpha ||W||^2`` on standardised X (C, N, D) and centred
    one-hot Y; primal (D x D) when D <= N, dual (N x N kernel) otherwise. Returns (C, L, D, K);
    add the class means (the intercept) when predicting.
    """
    c, n, d = x.shape
    y1h = torch.nn.functional.one_hot(y.long(), k).to(x.dtype)
    yc = y1h - y1h.mean(0, keepdim=True)
    if d <= n:
        cov = torch.bmm(x.transpose(1, 2), x) / n  # (C, D, D)
        s, v = torch.linalg.eigh(cov)
        b = torch.bmm(v.transpose(1, 2), torch.matmul(x.transpose(1, 2), yc) / n)  # (C, D, K)
        scaled = b[:, None] / (s[:, None, :, None] + alphas[None, :, None, None])  # (C, L, D, K)
        return torch.einsum("cde,clek->cldk", v, scaled)
    gram = torch.bmm(x, x.transpose(1, 2)) / n  # (C, N, N)
    s, u = torch.linalg.eigh(gram)
    b = torch.matmul(u.transpose(1, 2), yc) / n  # (C, N, K)
    scaled = b[:, None] / (s[:, None, :, None] + alphas[None, :, None, None])  # (C, L, N, K)
    dual = torch.einsum("cne,clek->clnk", u, scaled)
    return torch.einsum("cnd,clnk->cldk", x, dual)


def _fit_ridge(xtr, ytr, xte, yte, k, fit, val, alphas, device, dtype, cell_chunk):
    dev = torch.device(device)
    al = torch.tensor(alphas, dtype=dtype, device=dev)
    ytr_t, yte_t = torch.as_tensor(ytr, device=dev), torch.as_tensor(yte, device=dev)
    fit_t, val_t = torch.as_tensor(fit, device=dev), torch.as_tensor(val, device=dev)
    prior_fit = torch.nn.functional.one_hot(ytr_t[fit_t].long(), k).to(dtype).mean(0)
    prior_all = torch.nn.functional.one_hot(ytr_t.long(), k).to(dtype).mean(0)
    out = {k_: [] for k_ in ("acc", "val", "train", "reg")}
    for c0 in range(0, xtr.shape[0], cell_chunk):
        a = _to_tensor(xtr[c0 : c0 + cell_chunk], dev, dtype)
        b = _to_tensor(xte[c0 : c0 + cell_chunk], dev, dtype)
        c = a.shape[0]
        mu, sd = _standardise(a, a[:, fit_t])
        w = batched_ridge((a[:, fit_t] - mu) / sd, ytr_t[fit_t], k, al)  # (C, L, D, K)
        zv = torch.einsum("cnd,cldk->clnk", (a[:, val_t] - mu) / sd, w) + prior_fit
        vacc = (zv.argmax(3) == ytr_t[val_t][None, None]).float().mean(2)  # (C, L)
        vmse = ((zv - torch.nn.functional.one_hot(ytr_t[val_t].long(), k).to(dtype)) ** 2).mean((2, 3))
        pick = _select(vacc, vmse)
        mu, sd = _standardise(a, a)
        xs = (a - mu) / sd
        w_all = batched_ridge(xs, ytr_t, k, al)[torch.arange(c), pick]  # (C, D, K)
        tr = ((torch.bmm(xs, w_all) + prior_all).argmax(2) == ytr_t[None]).float().mean(1)
        te = ((torch.bmm((b - mu) / sd, w_all) + prior_all).argmax(2) == yte_t[None]).float().mean(1)
        out["acc"].append(te.cpu())
        out["train"].append(tr.cpu())
        out["val"].append(vacc[torch.arange(c), pick].cpu())
        out["reg"].append(al[pick].cpu())
    return {k_: torch.cat(v).double().numpy() for k_, v in out.items()}, {}


# ----------------------------------------------------------------------------------------------
# k-NN (DINOv2 style: cosine, k = 20, T = 0.07, softmax-weighted votes)
# ----------------------------------------------------------------------------------------------


def knn_predict(train: torch.Tensor, ytr: torch.Tensor, query: torch.Tensor, k_classes: int, k: int = 20,
                temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Predicted labels (C, M) for L2-normalised ``train`` (C, N, D) and ``query`` (C, M, D)."""
    k = min(k, train.shape[1])
    preds = []
    for m0 in range(0, query.shape[1], chunk):
        sims = torch.bmm(query[:, m0 : m0 + chunk], train.transpose(1, 2))  # (C, m, N)
        top, idx = sims.topk(k, dim=2)
        w = torch.exp(top / temperature)
        votes = torch.zeros((*top.shape[:2], k_classes), device=train.device, dtype=train.dtype)
        votes.scatter_add_(2, ytr[idx].long(), w)
        preds.append(votes.argmax(2))
    return torch.cat(preds, dim=1)


def _fit_knn(xtr, ytr, xte, yte, k, device, dtype, cell_chunk, knn_k, knn_t):
    dev = torch.device(device)
    ytr_t, yte_t = torch.as_tensor(ytr, device=dev), torch.as_tensor(yte, device=dev)
    out = {k_: [] for k_ in ("acc", "train")}
    for c0 in range(0, xtr.shape[0], cell_chunk):
        a = _to_tensor(xtr[c0 : c0 + cell_chunk], dev, dtype)
        b = _to_tensor(xte[c0 : c0 + cell_chunk], dev, dtype)
        mu, sd = _standardise(a, a)
        an = torch.nn.functional.normalize((a - mu) / sd, dim=2)
        bn = torch.nn.functional.normalize((b - mu) / sd, dim=2)
        out["acc"].append((knn_predict(an, ytr_t, bn, k, knn_k, knn_t) == yte_t[None]).float().mean(1).cpu())
        out["train"].append(torch.full((a.shape[0],), float("nan")))
    res = {k_: torch.cat(v).double().numpy() for k_, v in out.items()}
    nan = np.full(len(res["acc"]), np.nan)
    res.update(val=nan, reg=nan.copy())
    return res, {}


# ----------------------------------------------------------------------------------------------
# The papers' protocol: BatchNorm (no affine) + one linear layer, AdamW, cosine lr, fixed epochs
# ----------------------------------------------------------------------------------------------


def _cosine_lr(lr: float, step: int, total: int) -> float:
    """Cosine decay from ``lr`` at step 0 towards 0 at step ``total`` (per optimiser step, no warm-up)."""
    return 0.5 * lr * (1.0 + math.cos(math.pi * step / max(total, 1)))


def _fit_linear_sgd(xtr, ytr, xte, yte, k, device, dtype, cell_chunk, seed, epochs, batch_size, lr, weight_decay,
                    bn_eps=1e-6, bn_momentum=0.1):
    """Every cell's BatchNorm1d(affine=False) + Linear head trained at once on stacked (C, N, D) features.

    All cells share the seeded initial weights (MAE's ``trunc_normal_(std=0.01)``, bounds +-2, zero bias) and
    the seeded batch order, and each cell's loss only reaches its own weights, so a cell's
    result does not depend on which other cells are in the batch. AdamW is
    :class:`torch.optim.AdamW` on the stacked (C, D, K) / (C, K) parameters (element-wise, so the
    same as one optimiser per cell); the gradients of the mean cross-entropy are written in closed form.
    """
    if epochs < 1 or batch_size < 1 or not lr > 0:
        raise ValueError(f"linear-sgd needs epochs >= 1, batch_size >= 1 and lr > 0, got {epochs}, {batch_size}, {lr}")
    dev = torch.device(device)
    n = len(ytr)
    d = xtr.shape[2]
    bs = min(batch_size, n)
    per_epoch = n // bs  # full batches; the remainder of each epoch's permutation is dropped (MAE's drop_last)
    total = epochs * per_epoch
    gen = torch.Generator().manual_seed(int(seed))
    w_init = torch.nn.init.trunc_normal_(torch.empty(d, k, dtype=torch.float64), std=0.01, a=-2.0, b=2.0,
                                         generator=gen).to(dtype)
    ytr_t, yte_t = torch.as_tensor(ytr, device=dev), torch.as_tensor(yte, device=dev)
    y1h = torch.nn.functional.one_hot(ytr_t.long(), k).to(dtype)
    out = {k_: [] for k_ in ("acc", "train")}
    for c0 in range(0, xtr.shape[0], cell_chunk):
        a = _to_tensor(xtr[c0 : c0 + cell_chunk], dev, dtype)
        b = _to_tensor(xte[c0 : c0 + cell_chunk], dev, dtype)
        c = a.shape[0]
        w = w_init.to(dev)[None].repeat(c, 1, 1).requires_grad_(False)
        bias = torch.zeros((c, k), device=dev, dtype=dtype)
        opt = torch.optim.AdamW([w, bias], lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
        run_mean = torch.zeros((c, 1, d), device=dev, dtype=dtype)
        run_var = torch.ones((c, 1, d), device=dev, dtype=dtype)
        whole = bs == n  # one batch of every sample: its order does not matter, its BatchNorm statistics are fixed
        if whole:
            mean_all = a.mean(1, keepdim=True)
            var_all = a.var(1, keepdim=True, unbiased=False)
            xn_all = (a - mean_all) / torch.sqrt(var_all + bn_eps)
        step = 0
        pgen = torch.Generator().manual_seed(int(seed) + 1)  # batch order: the same stream for every chunk
        for _ in range(epochs):
            perm = None if whole else torch.randperm(n, generator=pgen).to(dev)
            for s0 in range(0, per_epoch * bs, bs):
                if whole:
                    mean, var, xn, yb = mean_all, var_all, xn_all, y1h
                else:
                    idx = perm[s0 : s0 + bs]
                    xb = a[:, idx]  # (C, B, D)
                    mean = xb.mean(1, keepdim=True)
                    var = xb.var(1, keepdim=True, unbiased=False)
                    xn = (xb - mean) / torch.sqrt(var + bn_eps)
                    yb = y1h[idx]
                # running statistics, as BatchNorm1d in training mode (unbiased variance, momentum 0.1)
                run_mean.mul_(1 - bn_momentum).add_(bn_momentum * mean)
                run_var.mul_(1 - bn_momentum).add_(bn_momentum * var * (bs / max(bs - 1, 1)))
                z = torch.baddbmm(bias[:, None], xn, w)  # (C, B, K)
                z -= z.amax(2, keepdim=True)  # softmax by hand: torch.softmax over 10 classes is ~6x slower on CPU
                z.exp_()
                z /= z.sum(2, keepdim=True)
                dz = (z - yb[None]) / bs  # d mean-CE / d logits
                w.grad = torch.bmm(xn.transpose(1, 2), dz)
                bias.grad = dz.sum(1)
                for group in opt.param_groups:
                    group["lr"] = _cosine_lr(lr, step, total)
                opt.step()
                step += 1
        with torch.no_grad():  # BatchNorm in eval mode: running statistics
            def _acc(x, y):
                z = torch.baddbmm(bias[:, None], (x - run_mean) / torch.sqrt(run_var + bn_eps), w)
                return (z.argmax(2) == y[None]).double().mean(1).cpu().numpy()

            out["acc"].append(_acc(b, yte_t))
            out["train"].append(_acc(a, ytr_t))
    res = {k_: np.concatenate(v) for k_, v in out.items()}
    nan = np.full(len(res["acc"]), np.nan)
    res.update(val=nan, reg=nan.copy(), converged=np.ones(len(nan), dtype=bool),
               iterations=np.full(len(nan), total, dtype=np.int64))
    return res, {"steps": total, "steps_per_epoch": per_epoch, "batch_size_used": bs}


# ----------------------------------------------------------------------------------------------
# scikit-learn / cuML loops (reference backends)
# ----------------------------------------------------------------------------------------------


def _n_iter(est) -> int:
    """Iterations an estimator reports (-1: not reported)."""
    n = getattr(est, "n_iter_", None)
    return int(np.max(np.asarray(n))) if n is not None and np.size(n) else -1


def _fit_loop(xtr, ytr, xte, yte, fit, val, lambdas, make_estimator, max_iter, progress_desc, progress):
    keys = ("acc", "val", "train", "reg", "converged", "iterations", "sweep_converged", "sweep_iterations")
    out = {k_: [] for k_ in keys}
    for ci in tqdm(range(xtr.shape[0]), desc=progress_desc, disable=not progress, leave=False, dynamic_ncols=True):
        a = np.asarray(xtr[ci], dtype=np.float64)
        b = np.asarray(xte[ci], dtype=np.float64)
        mu, sd = a[fit].mean(0), a[fit].std(0)
        sd = np.where(sd > 1e-6 * max(sd.max(), 1e-12), sd, 1.0)
        xf, xv = (a[fit] - mu) / sd, (a[val] - mu) / sd
        scores, its = [], []
        for lam in lambdas:
            est = make_estimator(1.0 / (lam * fit.sum()))
            est.fit(xf, ytr[fit])
            p = est.predict_proba(xv)
            acc = float((np.asarray(est.classes_)[np.argmax(p, 1)] == ytr[val]).mean())
            col = np.searchsorted(np.asarray(est.classes_), ytr[val])
            loss = float(-np.log(np.clip(p[np.arange(len(col)), col], 1e-12, None)).mean())
            scores.append((acc, -loss))
            its.append(_n_iter(est))
        best = max(range(len(lambdas)), key=lambda i: scores[i])
        lam = lambdas[best]
        mu, sd = a.mean(0), a.std(0)
        sd = np.where(sd > 1e-6 * max(sd.max(), 1e-12), sd, 1.0)
        est = make_estimator(1.0 / (lam * len(a)))
        est.fit((a - mu) / sd, ytr)
        out["acc"].append(float((np.asarray(est.predict((b - mu) / sd)) == yte).mean()))
        out["train"].append(float((np.asarray(est.predict((a - mu) / sd)) == ytr).mean()))
        out["val"].append(scores[best][0])
        out["reg"].append(lam)
        # converged: stopped before max_iter (unknown iteration counts, -1, count as converged)
        sweep_conv = [i < max_iter for i in its]
        out["sweep_converged"].append(sweep_conv)
        out["sweep_iterations"].append(its)
        out["iterations"].append(_n_iter(est))
        out["converged"].append(sweep_conv[best] and _n_iter(est) < max_iter)
    res = {k_: np.asarray(v, dtype=np.float64) for k_, v in out.items() if k_ in ("acc", "val", "train", "reg")}
    res.update(converged=np.asarray(out["converged"], dtype=bool),
               iterations=np.asarray(out["iterations"], dtype=np.int64),
               sweep_converged=np.asarray(out["sweep_converged"], dtype=bool),
               sweep_iterations=np.asarray(out["sweep_iterations"], dtype=np.int64))
    return res, {}


def _sklearn_factory(max_iter: int, tol: float):
    from sklearn.linear_model import LogisticRegression

    return lambda C: LogisticRegression(C=C, max_iter=max_iter, tol=tol)


def _cuml_factory(max_iter: int, tol: float):
    if not torch.cuda.is_available():
        raise ValueError("cuML needs a CUDA GPU; use --probe torch")
    try:
        from cuml.linear_model import LogisticRegression  # type: ignore[import-not-found]
    except ImportError:
        raise ValueError("cuML is not installed: pip install 'repdyn[cuml]' on a CUDA 12 machine, "
                         "or use --probe torch") from None
    return lambda C: LogisticRegression(C=C, max_iter=max_iter, tol=tol, output_type="numpy")


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------


def fit_probes(xtr, ytr, xte, yte, probe: str = "torch", *, num_classes: int | None = None,
               device: str = "cpu", seed: int = 0, holdout: float = 0.2, groups: np.ndarray | None = None,
               lambdas: Sequence[float] | None = None, max_iter: int | None = None, tol: float | None = None,
               dtype: torch.dtype = torch.float32, cell_chunk: int = 64, knn_k: int = 20, knn_t: float = 0.07,
               epochs: int = 80, batch_size: int = 4096, lr: float = 1e-3, weight_decay: float = 0.0,
               progress: bool = False) -> ProbeResult:
    """Probe every cell of stacked features with one protocol; see the module docstring.

    ``xtr``: (cells, N, D) train features (numpy or torch), ``ytr``: (N,) labels; ``xte``,
    ``yte``: the test split. ``groups``: image id of each train row (tokens-as-samples) so the
    held-out cut is by image. ``lambdas``: L2 sweep (logistic) or alpha sweep (ridge).
    ``max_iter`` / ``tol``: the logistic solvers' limits (torch: 1000 / 1e-4 on max |grad|).
    ``epochs``, ``batch_size``, ``lr``, ``weight_decay``: the ``linear-sgd`` probe (the papers'
    protocol: BatchNorm without affine + linear layer, AdamW, cosine lr to 0, no held-out search).
    """
    if probe not in PROBES:
        raise ValueError(f"unknown probe {probe!r}; use one of {', '.join(PROBES)}")
    ytr = np.asarray(ytr, dtype=np.int64)
    yte = np.asarray(yte, dtype=np.int64)
    _check_inputs(xtr, ytr, xte, yte)
    k = int(num_classes if num_classes is not None else max(ytr.max(), yte.max()) + 1)
    if probe == "cuml":  # fail fast, before any work
        _cuml_factory(1, 1.0)
    fit, val = holdout_split(len(ytr), holdout, seed, groups)
    if len(np.unique(ytr[fit])) < 2:
        raise ValueError("the fit part of the train split has a single class; use more training samples")
    t0 = time.perf_counter()
    if probe == "torch":
        lambdas = tuple(lambdas or DEFAULT_LAMBDAS)
        max_iter, tol = max_iter or 1000, tol if tol is not None else 1e-4
        res, extra = _fit_torch(xtr, ytr, xte, yte, k, fit, val, lambdas, device, dtype, max_iter, tol, cell_chunk,
                                progress)
        proto = {"probe": "torch", "reg_kind": "l2_lambda", "reg_grid": list(lambdas), "max_iter": max_iter, "tol": tol,
                 "solver": "batched L-BFGS (history 10), preconditioned in the X^T X eigenbasis, Armijo / "
                           "approximate-Wolfe backtracking; sweep solved strongest to weakest, warm-started",
                 "convergence": "max |grad| < tol (mean CE + lam/2 ||W||^2, original feature basis)",
                 "dtype": str(dtype).removeprefix("torch.")}
    elif probe == "ridge":
        lambdas = tuple(lambdas or DEFAULT_RIDGE_ALPHAS)
        res, extra = _fit_ridge(xtr, ytr, xte, yte, k, fit, val, lambdas, device, dtype, cell_chunk)
        proto = {"probe": "ridge", "solver": "closed form (eigh), one-hot targets", "reg_kind": "ridge_alpha",
                 "reg_grid": list(lambdas)}
    elif probe == "knn":
        res, extra = _fit_knn(xtr, ytr, xte, yte, k, device, dtype, cell_chunk, knn_k, knn_t)
        proto = {"probe": "knn", "solver": f"cosine k-NN (k={knn_k}, T={knn_t})", "reg_kind": "none",
                 "reg_grid": []}
    elif probe == "linear-sgd":
        res, extra = _fit_linear_sgd(xtr, ytr, xte, yte, k, device, dtype, cell_chunk, seed, epochs, batch_size, lr,
                                     weight_decay)
        proto = {"probe": "linear-sgd", "reg_kind": "none", "reg_grid": [],
                 "solver": "BatchNorm1d(affine=False) + Linear, cross-entropy, fixed schedule (MAE linear probe)",
                 "epochs": epochs, "batch_size": batch_size, "lr": lr,
                 "schedule": "cosine decay to 0 per optimiser step, no warm-up",
                 "optimizer": f"torch.optim.AdamW(betas=(0.9, 0.999), eps=1e-8, weight_decay={weight_decay})",
                 "bn": "BatchNorm1d(affine=False, eps=1e-6, momentum=0.1): batch statistics in training, "
                       "running statistics for train / test accuracy",
                 "init": "weight trunc_normal_(std=0.01), bias 0; the same for every cell",
                 "batches": "seeded permutation per epoch, full batches only (drop_last); one batch of all "
                            "samples when N <= batch_size", "dtype": str(dtype).removeprefix("torch."), **extra}
    else:
        lambdas = tuple(lambdas or DEFAULT_LAMBDAS)
        max_iter, tol = max_iter or 1000, tol if tol is not None else 1e-4
        factory = _sklearn_factory if probe == "sklearn" else _cuml_factory
        res, extra = _fit_loop(np.asarray(xtr), ytr, np.asarray(xte), yte, fit, val, lambdas,
                               factory(max_iter, tol), max_iter, f"{probe} probes", progress)
        proto = {"probe": probe, "solver": "LogisticRegression (lbfgs/qn), C = 1/(lambda n)", "reg_kind": "l2_lambda",
                 "reg_grid": list(lambdas), "max_iter": max_iter, "tol": tol,
                 "convergence": "stopped before max_iter"}
    no_sweep = probe in ("knn", "linear-sgd")
    proto.update(holdout=0.0 if no_sweep else holdout,
                 standardise="BatchNorm1d (batch statistics)" if probe == "linear-sgd" else "z-score (fit-part stats)",
                 refit="none (trained once on the full train split)" if probe == "linear-sgd" else "full train split",
                 probe_seed=seed, n_train=int(len(ytr)), n_test=int(len(yte)),
                 n_fit=int(len(ytr)) if no_sweep else int(fit.sum()), num_classes=k)
    cells = len(res["acc"])
    n_reg = len(proto["reg_grid"])
    ones, zeros = np.ones((cells, n_reg), dtype=bool), np.zeros((cells, n_reg), dtype=np.int64)
    return ProbeResult(accuracy=res["acc"], val_accuracy=res["val"], train_accuracy=res["train"], reg=res["reg"],
                       protocol=proto, seconds=time.perf_counter() - t0,
                       converged=np.asarray(res.get("converged", np.ones(cells, dtype=bool)), dtype=bool),
                       iterations=np.asarray(res.get("iterations", np.zeros(cells, dtype=np.int64)), dtype=np.int64),
                       sweep_converged=np.asarray(res.get("sweep_converged", ones), dtype=bool),
                       sweep_iterations=np.asarray(res.get("sweep_iterations", zeros), dtype=np.int64))


@dataclass
class CellProbe:
    """One cell's fitted probe: ``logits = ((f - mean) / std) @ weight.T + bias``, with its scores."""

    weight: torch.Tensor  # (K, D)
    bias: torch.Tensor  # (K,)
    mean: torch.Tensor  # (D,)
    std: torch.Tensor  # (D,)
    probe: str
    accuracy: float
    val_accuracy: float
    reg: float


def fit_cell_probe(xtr, ytr, xte, yte, probe: str = "torch", *, num_classes: int | None = None,
                   seed: int = 0) -> CellProbe:
    """The layer-grid protocol for one (N, D) cell, returning the probe's weights (for attribution).

    :func:`fit_probes` chooses the strength on the held-out cut and scores the test split; the
    weights are then refitted on the whole standardised train split with that strength, as its refit
    step does: batched L-BFGS logistic regression (``torch``) or closed-form ridge on one-hot targets
    (``ridge``, whose class scores are the regression outputs plus the class priors).
    """
    if probe not in ("torch", "ridge"):
        raise ValueError(f"a refitted cell probe is torch or ridge, got {probe!r}")
    xtr = np.asarray(xtr, dtype=np.float32)
    ytr = np.asarray(ytr, dtype=np.int64)
    res = fit_probes(xtr[None], ytr, np.asarray(xte, dtype=np.float32)[None], yte, probe, num_classes=num_classes,
                     seed=seed, device="cpu")
    k = int(res.protocol["num_classes"])
    a = torch.as_tensor(xtr)[None]
    y = torch.as_tensor(ytr)
    mu, sd = _standardise(a, a)
    xs = (a - mu) / sd
    if probe == "torch":
        xa = torch.cat([xs, torch.ones((1, a.shape[1], 1))], dim=2)
        w, _ = batched_logreg(xa, y, k, torch.tensor([[float(res.reg[0])]]))
        w = w[0, :, 0, :]  # (D+1, K)
        weight, bias = w[:-1].T.contiguous(), w[-1]
    else:
        w = batched_ridge(xs, y, k, torch.tensor([float(res.reg[0])]))[0, 0]  # (D, K)
        weight = w.T.contiguous()
        bias = torch.nn.functional.one_hot(y.long(), k).float().mean(0)
    return CellProbe(weight, bias, mu[0, 0], sd[0, 0], probe, float(res.accuracy[0]), float(res.val_accuracy[0]),
                     float(res.reg[0]))

