"""Linear probes for a whole block x timestep grid: torch (batched L-BFGS), ridge, sklearn, cuML, k-NN.

One protocol for every backend (REPA / DINOv2 style, see ``docs/probing.md``):

1. the train split is cut into a fit part and a held-out part (``holdout`` fraction, seeded,
   by image so token-level samples of one image never straddle the cut);
2. features are standardised with the fit part's mean / std (diffusion features have a few
   "massive" channels; unscaled L-BFGS then stalls);
3. every L2 strength of the sweep is fitted, the one with the best held-out accuracy (ties: the
   lower held-out loss) is kept per cell;
4. the probe is refitted on the whole train split with that strength (DINOv2 refits on
   train + val) and scored once on the official test split.

The torch backend fits **every cell and every strength at once**: features are stacked into a
(cells, N, D) tensor, weights into (cells, D + 1, strengths, classes), and a batched L-BFGS keeps a
separate history, step size and stopping test per problem, so each (cell, strength) problem is
solved as if it were alone while every iteration is one batched matmul. The loss is
``mean cross-entropy + lam / 2 * ||W||^2`` (bias not penalised); scikit-learn's ``C`` is
``1 / (lam * n)``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["ProbeResult", "fit_probes", "CellProbe", "fit_cell_probe", "PROBES", "DEFAULT_LAMBDAS", "DEFAULT_RIDGE_ALPHAS", "holdout_split",
           "batched_logreg", "batched_ridge", "knn_predict"]

PROBES = ("torch", "ridge", "sklearn", "cuml", "knn")
DEFAULT_LAMBDAS = tuple(float(x) for x in 10.0 ** np.arange(-6, 1))  # 1e-6 .. 1
DEFAULT_RIDGE_ALPHAS = tuple(float(x) for x in 10.0 ** np.arange(-4, 4.5, 0.5))  # 1e-4 .. 1e4


@dataclass
class ProbeResult:
    """Per-cell results, in the order of the stacked input cells."""

    accuracy: np.ndarray  # top-1 on the test split
    val_accuracy: np.ndarray  # held-out accuracy at the chosen strength (nan for k-NN)
    train_accuracy: np.ndarray  # on the full train split after the refit
    reg: np.ndarray  # chosen strength (lam for logistic, alpha for ridge, nan for k-NN)
    protocol: dict = field(default_factory=dict)
    seconds: float = 0.0


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


# ----------------------------------------------------------------------------------------------
# Batched multinomial logistic regression (L-BFGS)
# ----------------------------------------------------------------------------------------------


def _loss_grad(xa: torch.Tensor, y1h: torch.Tensor, w: torch.Tensor, lam: torch.Tensor, mask: torch.Tensor):
    """Loss (C, L) and gradient (C, D+1, L, K) of mean CE + lam/2 ||W[:D]||^2 for every problem."""
    c, n, d1 = xa.shape
    _, _, l, k = w.shape
    z = torch.bmm(xa, w.reshape(c, d1, l * k)).reshape(c, n, l, k)
    lse = torch.logsumexp(z, dim=3, keepdim=True)  # (C, N, L, 1)
    yb = y1h[None, :, None, :]
    ce = (lse[..., 0] - (z * yb).sum(3)).mean(1)  # (C, L)
    p = z.sub_(lse).exp_()  # softmax, in place of the logits
    p -= yb
    g = torch.bmm(xa.transpose(1, 2), p.reshape(c, n, l * k)).reshape(c, d1, l, k) / n
    reg_w = w * mask
    loss = ce + 0.5 * lam * (reg_w * reg_w).sum((1, 3))
    g += lam[:, None, :, None] * reg_w
    return loss, g


def _pdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-problem inner product over (D+1, K) -> (C, L)."""
    return (a * b).sum((1, 3))


def batched_logreg(xa: torch.Tensor, y: torch.Tensor, num_classes: int, lam: torch.Tensor,
                   w0: torch.Tensor | None = None, max_iter: int = 200, tol: float = 1e-4, ftol: float = 1e-6,
                   history: int = 10) -> tuple[torch.Tensor, dict]:
    """Fit C x L independent L2 logistic regressions with a batched L-BFGS.

    ``xa``: (C, N, D+1) standardised features with a ones column; ``lam``: (C, L) strengths.
    Each problem keeps its own curvature pairs, Armijo backtracking step and stopping test
    (max |grad| < ``tol``, relative loss change < ``ftol`` three times in a row, or no decrease
    possible); finished problems stop moving. Returns W
    (C, D+1, L, K) and {"iterations", "converged" (C, L) bool}.
    """
    c, n, d1 = xa.shape
    l = lam.shape[1]
    k = num_classes
    dev, dt = xa.device, xa.dtype
    y1h = torch.nn.functional.one_hot(y.long(), k).to(dt)
    mask = torch.ones((1, d1, 1, 1), device=dev, dtype=dt)
    mask[:, -1] = 0  # bias row is not penalised
    w = torch.zeros((c, d1, l, k), device=dev, dtype=dt) if w0 is None else w0.clone()
    f, g = _loss_grad(xa, y1h, w, lam, mask)
    s_hist: list[torch.Tensor] = []
    y_hist: list[torch.Tensor] = []
    rho_hist: list[torch.Tensor] = []
    done = g.abs().amax((1, 3)) < tol
    gamma = torch.ones((c, l), device=dev, dtype=dt)
    # Cells whose problems have all finished are dropped from the batch (their rows are written
    # to ``w_out``), so the slowest problems do not keep the finished ones computing.
    w_out = w.clone()
    active = torch.arange(c, device=dev)
    done_out = done.clone()
    small = torch.zeros((c, l), device=dev, dtype=torch.long)  # consecutive iterations of tiny progress
    it = 0
    for it in range(1, max_iter + 1):
        cell_done = done.all(1)
        if bool(cell_done.any()):
            w_out[active[cell_done]] = w[cell_done]
            done_out[active[cell_done]] = done[cell_done]
            keep = ~cell_done
            if not bool(keep.any()):
                active = active[keep]
                break
            active = active[keep]
            xa, lam, w, f, g, done, gamma, small = (xa[keep], lam[keep], w[keep], f[keep], g[keep], done[keep], gamma[keep],
                                                     small[keep])
            s_hist = [h[keep] for h in s_hist]
            y_hist = [h[keep] for h in y_hist]
            rho_hist = [h[keep] for h in rho_hist]
            c = int(keep.sum())
        # two-loop recursion, per problem
        q = -g
        alphas = []
        for s_i, y_i, r_i in zip(reversed(s_hist), reversed(y_hist), reversed(rho_hist)):
            a_i = r_i * _pdot(s_i, q)
            q = q - a_i[:, None, :, None] * y_i
            alphas.append(a_i)
        if not s_hist:  # first step: scaled steepest descent
            gamma = 1.0 / g.abs().amax((1, 3)).clamp_min(1e-12)
        r = gamma[:, None, :, None] * q
        for (s_i, y_i, r_i), a_i in zip(zip(s_hist, y_hist, rho_hist), reversed(alphas)):
            b_i = r_i * _pdot(y_i, r)
            r = r + (a_i - b_i)[:, None, :, None] * s_i
        gd = _pdot(g, r)
        bad = gd >= 0  # not a descent direction: fall back to steepest descent for that problem
        if bool(bad.any()):
            r = torch.where(bad[:, None, :, None], -g, r)
            gd = torch.where(bad, -_pdot(g, g), gd)
        r = r * (~done)[:, None, :, None]
        # Armijo backtracking, each problem with its own step
        step = torch.ones((c, l), device=dev, dtype=dt)
        accepted = done.clone()
        w_new, f_new, g_new = w, f, g
        for _ in range(30):
            trial = w + step[:, None, :, None] * r
            f_t, g_t = _loss_grad(xa, y1h, trial, lam, mask)
            ok = (~accepted) & torch.isfinite(f_t) & (f_t <= f + 1e-4 * step * gd)
            if bool(ok.any()):
                sel = ok[:, None, :, None]
                w_new = torch.where(sel, trial, w_new)
                g_new = torch.where(sel, g_t, g_new)
                f_new = torch.where(ok, f_t, f_new)
                accepted |= ok
            if bool(accepted.all()):
                break
            step = torch.where(accepted, step, step * 0.5)
        stalled = ~accepted  # no decrease found: at the floating-point floor
        s_new, y_new = w_new - w, g_new - g
        sy = _pdot(s_new, y_new)
        valid = sy > 1e-10 * _pdot(y_new, y_new).clamp_min(1e-30)
        rho = torch.where(valid, 1.0 / sy.clamp_min(1e-30), torch.zeros_like(sy))
        s_hist.append(s_new)
        y_hist.append(y_new)
        rho_hist.append(rho)
        if len(s_hist) > history:
            s_hist.pop(0), y_hist.pop(0), rho_hist.pop(0)
        yy = _pdot(y_new, y_new)
        gamma = torch.where(valid, sy / yy.clamp_min(1e-30), gamma)
        rel = (f - f_new).abs() / f.abs().clamp_min(1e-3)
        small = torch.where(rel < ftol, small + 1, torch.zeros_like(small))
        w, f, g = w_new, f_new, g_new
        done = done | stalled | (g.abs().amax((1, 3)) < tol) | (small >= 3)
    if len(active):
        w_out[active] = w
        done_out[active] = done
    return w_out, {"iterations": it, "converged": done_out.cpu().numpy()}


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


def _fit_torch(xtr, ytr, xte, yte, k, fit, val, lambdas, device, dtype, max_iter, tol, cell_chunk):
    dev = torch.device(device)
    lam_all = torch.tensor(lambdas, dtype=dtype, device=dev)
    ytr_t = torch.as_tensor(ytr, device=dev)
    yte_t = torch.as_tensor(yte, device=dev)
    fit_t = torch.as_tensor(fit, device=dev)
    val_t = torch.as_tensor(val, device=dev)
    out = {k_: [] for k_ in ("acc", "val", "train", "reg", "iters")}
    for c0 in range(0, xtr.shape[0], cell_chunk):
        a = _to_tensor(xtr[c0 : c0 + cell_chunk], dev, dtype)
        b = _to_tensor(xte[c0 : c0 + cell_chunk], dev, dtype)
        c = a.shape[0]
        # 1) sweep on the fit part, score on the held-out part
        mu, sd = _standardise(a, a[:, fit_t])
        xf = _augment((a[:, fit_t] - mu) / sd)
        xv = _augment((a[:, val_t] - mu) / sd)
        w, info1 = batched_logreg(xf, ytr_t[fit_t], k, lam_all[None].expand(c, -1).contiguous(),
                                  max_iter=max_iter, tol=tol)
        vacc, vloss = _acc_loss(xv, w, ytr_t[val_t])
        pick = _select(vacc, vloss)  # (C,)
        del xf, xv
        # 2) refit on the whole train split with the chosen strength (warm start)
        mu, sd = _standardise(a, a)
        xa = _augment((a - mu) / sd)
        w0 = w[torch.arange(c), :, pick][:, :, None, :]  # (C, D+1, 1, K)
        lam = lam_all[pick][:, None]
        w2, info2 = batched_logreg(xa, ytr_t, k, lam, w0=w0, max_iter=max_iter, tol=tol)
        tr_acc, _ = _acc_loss(xa, w2, ytr_t)
        te_acc, _ = _acc_loss(_augment((b - mu) / sd), w2, yte_t)
        out["acc"].append(te_acc[:, 0].cpu())
        out["train"].append(tr_acc[:, 0].cpu())
        out["val"].append(vacc[torch.arange(c), pick].cpu())
        out["reg"].append(lam[:, 0].cpu())
        out["iters"].append(max(info1["iterations"], info2["iterations"]))
    return ({k_: torch.cat(v).double().numpy() for k_, v in out.items() if k_ != "iters"},
            {"max_iterations": int(max(out["iters"]))})


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
# scikit-learn / cuML loops (reference backends)
# ----------------------------------------------------------------------------------------------


def _fit_loop(xtr, ytr, xte, yte, fit, val, lambdas, make_estimator, progress_desc, progress):
    from tqdm.auto import tqdm

    out = {k_: [] for k_ in ("acc", "val", "train", "reg")}
    for ci in tqdm(range(xtr.shape[0]), desc=progress_desc, disable=not progress, leave=False, dynamic_ncols=True):
        a = np.asarray(xtr[ci], dtype=np.float64)
        b = np.asarray(xte[ci], dtype=np.float64)
        mu, sd = a[fit].mean(0), a[fit].std(0)
        sd = np.where(sd > 1e-6 * max(sd.max(), 1e-12), sd, 1.0)
        xf, xv = (a[fit] - mu) / sd, (a[val] - mu) / sd
        scores = []
        for lam in lambdas:
            est = make_estimator(1.0 / (lam * fit.sum()))
            est.fit(xf, ytr[fit])
            p = est.predict_proba(xv)
            acc = float((np.asarray(est.classes_)[np.argmax(p, 1)] == ytr[val]).mean())
            col = np.searchsorted(np.asarray(est.classes_), ytr[val])
            loss = float(-np.log(np.clip(p[np.arange(len(col)), col], 1e-12, None)).mean())
            scores.append((acc, -loss))
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
    return {k_: np.asarray(v, dtype=np.float64) for k_, v in out.items()}, {}


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
               progress: bool = False) -> ProbeResult:
    """Probe every cell of stacked features with one protocol; see the module docstring.

    ``xtr``: (cells, N, D) train features (numpy or torch), ``ytr``: (N,) labels; ``xte``,
    ``yte``: the test split. ``groups``: image id of each train row (tokens-as-samples) so the
    held-out cut is by image. ``lambdas``: L2 sweep (logistic) or alpha sweep (ridge).
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
        max_iter, tol = max_iter or 200, tol if tol is not None else 1e-4
        res, extra = _fit_torch(xtr, ytr, xte, yte, k, fit, val, lambdas, device, dtype, max_iter, tol, cell_chunk)
        proto = {"probe": "torch", "solver": "batched L-BFGS (history 10, Armijo)", "reg_kind": "l2_lambda",
                 "reg_grid": list(lambdas), "max_iter": max_iter, "tol": tol, **extra}
    elif probe == "ridge":
        lambdas = tuple(lambdas or DEFAULT_RIDGE_ALPHAS)
        res, extra = _fit_ridge(xtr, ytr, xte, yte, k, fit, val, lambdas, device, dtype, cell_chunk)
        proto = {"probe": "ridge", "solver": "closed form (eigh), one-hot targets", "reg_kind": "ridge_alpha",
                 "reg_grid": list(lambdas)}
    elif probe == "knn":
        res, extra = _fit_knn(xtr, ytr, xte, yte, k, device, dtype, cell_chunk, knn_k, knn_t)
        proto = {"probe": "knn", "solver": f"cosine k-NN (k={knn_k}, T={knn_t})", "reg_kind": "none",
                 "reg_grid": []}
    else:
        lambdas = tuple(lambdas or DEFAULT_LAMBDAS)
        max_iter, tol = max_iter or 1000, tol if tol is not None else 1e-4
        factory = _sklearn_factory if probe == "sklearn" else _cuml_factory
        res, extra = _fit_loop(np.asarray(xtr), ytr, np.asarray(xte), yte, fit, val, lambdas,
                               factory(max_iter, tol), f"{probe} probes", progress)
        proto = {"probe": probe, "solver": "LogisticRegression (lbfgs/qn), C = 1/(lambda n)", "reg_kind": "l2_lambda",
                 "reg_grid": list(lambdas), "max_iter": max_iter, "tol": tol}
    proto.update(holdout=holdout if probe != "knn" else 0.0, standardise="z-score (fit-part stats)",
                 refit="full train split", probe_seed=seed, n_train=int(len(ytr)), n_test=int(len(yte)),
                 n_fit=int(fit.sum()), num_classes=k)
    return ProbeResult(accuracy=res["acc"], val_accuracy=res["val"], train_accuracy=res["train"], reg=res["reg"],
                       protocol=proto, seconds=time.perf_counter() - t0)


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

