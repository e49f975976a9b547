"""Batched multinomial logistic regression by L-BFGS: many independent (cell, strength) problems in
one tensor program.

Written by hand because no library solves thousands of small, ill-conditioned logistic regressions
at once on a GPU or CPU: each problem keeps its own L-BFGS history, step size and stopping test,
while every iteration is one batched matmul. The solver works in each cell's ``X^T X`` eigenbasis
with a diagonal preconditioner (diffusion features are very ill-conditioned even after z-scoring).
The loss is ``mean cross-entropy + lam / 2 * ||W[:D]||^2`` (bias not penalised).
"""

from __future__ import annotations


import torch

__all__ = ["batched_logreg"]


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


def _eigbasis(xa: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvectors (C, D, D) and eigenvalues (C, D) of the feature block's second moment ``X^T X / N``."""
    xf = xa[:, :, :-1]
    s, v = torch.linalg.eigh(torch.bmm(xf.transpose(1, 2), xf) / xa.shape[1])
    return v, s.clamp_min(0)


def _rotate(w: torch.Tensor, v: torch.Tensor | None, back: bool = False) -> torch.Tensor:
    """Weights (C, D+1, L, K) into the eigenbasis (``V^T W``) or back (``V W``); the bias row is unchanged."""
    if v is None:
        return w
    feat = torch.einsum("cde,cdlk->celk" if not back else "ced,cdlk->celk", v, w[:, :-1])
    return torch.cat([feat, w[:, -1:]], dim=1)


def _gmax(g: torch.Tensor, v: torch.Tensor | None) -> torch.Tensor:
    """max |gradient| per problem (C, L), in the original feature basis (the test scikit-learn uses)."""
    return _rotate(g, v, back=True).abs().amax((1, 3))


def _lbfgs(xa, y1h, lam, w, curv, v, max_iter, tol, ftol, history):
    """Preconditioned batched L-BFGS on (possibly rotated) features; see :func:`batched_logreg`."""
    c, n, d1 = xa.shape
    l = lam.shape[1]
    k = y1h.shape[1]
    dev, dt = xa.device, xa.dtype
    mask = torch.ones((1, d1, 1, 1), device=dev, dtype=dt)
    mask[:, -1] = 0  # bias row is not penalised
    # Diagonal inverse-curvature guess: the Hessian at uniform class probabilities is
    # (X^T X / N) (x) (I - 11^T / K) / K, diagonal in the eigenbasis, plus lam on the weights.
    denom = curv[:, :, None] / k + lam[:, None, :] * mask[0, :, :, 0][None]
    pre = (1.0 / denom.clamp_min(1e-8 * denom.amax(1, keepdim=True).clamp_min(1e-30)))[..., None]  # (C, D+1, L, 1)
    w = torch.zeros((c, d1, l, k), device=dev, dtype=dt) if w is None else w.clone()
    f, g = _loss_grad(xa, y1h, w, lam, mask)
    gm = _gmax(g, v)
    conv = gm < tol
    done = conv.clone()
    iters = torch.zeros((c, l), device=dev, dtype=torch.long)
    stalled = torch.zeros((c, l), device=dev, dtype=torch.bool)
    small = torch.zeros((c, l), device=dev, dtype=torch.long)  # consecutive iterations of tiny loss change
    s_hist: list[torch.Tensor] = []
    y_hist: list[torch.Tensor] = []
    rho_hist: list[torch.Tensor] = []
    eps_f = 10 * torch.finfo(dt).eps
    # Cells whose problems have all finished are dropped from the batch (their rows are written
    # to the outputs), so the slowest problems do not keep the finished ones computing.
    out = {"w": w.clone(), "conv": conv.clone(), "gm": gm.clone(), "iters": iters.clone(), "stalled": stalled.clone()}
    active = torch.arange(c, device=dev)

    def _write(sel):
        idx = active[sel]
        for name, val in (("w", w), ("conv", conv), ("gm", gm), ("iters", iters), ("stalled", stalled)):
            out[name][idx] = val[sel]

    for _ in range(max_iter):
        cell_done = done.all(1)
        if bool(cell_done.any()):
            _write(cell_done)
            keep = ~cell_done
            active = active[keep]
            if not len(active):
                break
            xa, lam, w, f, g, gm, done, conv, iters, stalled, small, pre = (
                t[keep] for t in (xa, lam, w, f, g, gm, done, conv, iters, stalled, small, pre))
            v = v[keep] if v is not None else None
            s_hist = [h[keep] for h in s_hist]
            y_hist = [h[keep] for h in y_hist]
            rho_hist = [h[keep] for h in rho_hist]
            c = len(active)
        iters += (~done).long()
        # two-loop recursion, per problem, with the diagonal preconditioner as the initial inverse Hessian
        q = g.clone()
        alphas = []
        for s_i, y_i, r_i in zip(reversed(s_hist), reversed(y_hist), reversed(rho_hist)):
            a_i = r_i * _pdot(s_i, q)
            q -= a_i[:, None, :, None] * y_i
            alphas.append(a_i)
        if s_hist:
            y_n, s_n = y_hist[-1], s_hist[-1]
            gamma = _pdot(s_n, y_n) / _pdot(y_n, pre * y_n).clamp_min(1e-30)
            gamma = torch.where(rho_hist[-1] > 0, gamma, torch.ones_like(gamma))
        else:
            gamma = torch.ones((c, l), device=dev, dtype=dt)
        r = gamma[:, None, :, None] * pre * q
        for (s_i, y_i, r_i), a_i in zip(zip(s_hist, y_hist, rho_hist), reversed(alphas)):
            b_i = r_i * _pdot(y_i, r)
            r += (a_i - b_i)[:, None, :, None] * s_i
        r = -r
        gd = _pdot(g, r)
        bad = ~(gd < 0)  # not a descent direction: fall back to the preconditioned gradient for that problem
        if bool(bad.any()):
            pg = pre * g
            r = torch.where(bad[:, None, :, None], -pg, r)
            gd = torch.where(bad, -_pdot(g, pg), gd)
        r = r * (~done)[:, None, :, None]
        # Backtracking line search, each problem with its own step: Armijo, or (where the loss change
        # is at rounding level) the approximate Wolfe test of Hager & Zhang on the directional derivative,
        # which stays exact when float32 can no longer resolve the decrease of the loss.
        step = torch.ones((c, l), device=dev, dtype=dt)
        accepted = done.clone()
        w_new, f_new, g_new = w, f, g
        for _ in range(30):
            trial = w + step[:, None, :, None] * r
            f_t, g_t = _loss_grad(xa, y1h, trial, lam, mask)
            armijo = f_t <= f + 1e-4 * step * gd
            approx_wolfe = (f_t <= f + eps_f * f.abs()) & (_pdot(g_t, r) <= -(1 - 2e-4) * gd)
            ok = (~accepted) & torch.isfinite(f_t) & (armijo | approx_wolfe)
            if bool(ok.any()):
                sel = ok[:, None, :, None]
                w_new = torch.where(sel, trial, w_new)
                g_new = torch.where(sel, g_t, g_new)
                f_new = torch.where(ok, f_t, f_new)
                accepted |= ok
            if bool(accepted.all()):
                break
            step = torch.where(accepted, step, step * 0.5)
        stuck = ~accepted  # no acceptable step: at the floating-point floor
        s_new, y_new = w_new - w, g_new - g
        sy = _pdot(s_new, y_new)
        valid = sy > 1e-10 * _pdot(y_new, y_new).clamp_min(1e-30)
        s_hist.append(s_new)
        y_hist.append(y_new)
        rho_hist.append(torch.where(valid, 1.0 / sy.clamp_min(1e-30), torch.zeros_like(sy)))
        if len(s_hist) > history:
            s_hist.pop(0), y_hist.pop(0), rho_hist.pop(0)
        rel = (f - f_new).abs() / f.abs().clamp_min(1e-3)
        small = torch.where(rel < ftol, small + 1, torch.zeros_like(small))
        w, f, g = w_new, f_new, g_new
        gm = torch.where(done, gm, _gmax(g, v))
        conv = conv | (~done & (gm < tol))
        stalled = stalled | (~done & stuck & ~conv)
        done = done | conv | stuck | (small >= 3)
    if len(active):
        _write(torch.ones(len(active), dtype=torch.bool, device=dev))
    return out


def batched_logreg(xa: torch.Tensor, y: torch.Tensor, num_classes: int, lam: torch.Tensor,
                   w0: torch.Tensor | None = None, max_iter: int = 1000, tol: float = 1e-4, ftol: float = 0.0,
                   history: int = 10, precondition: bool = True, warm_path: bool = True) -> tuple[torch.Tensor, dict]:
    """Fit C x L independent L2 logistic regressions with a batched, preconditioned L-BFGS.

    ``xa``: (C, N, D+1) standardised features with a ones column; ``lam``: (C, L) strengths.
    Each problem keeps its own curvature pairs, line-search step and stopping test. It has
    **converged** when max |grad| < ``tol`` in the original feature basis (scikit-learn's test
    for its lbfgs solver on the same mean-loss objective); it also stops, unconverged, when no step
    decreases the loss (the floating-point floor), after ``ftol`` (relative loss change below it
    three times in a row; 0 = off) or at ``max_iter``.

    Conditioning: ``precondition`` solves in the eigenbasis of each cell's ``X^T X / N`` (an
    orthogonal change of variables: the same problem and the same L2 norm) with the Hessian's
    diagonal at uniform class probabilities, ``s_j / K + lam``, as L-BFGS's initial inverse
    Hessian. ``warm_path`` (without ``w0``, L > 1): the strengths are solved one at a time from the
    strongest to the weakest (by the first cell's order), each started at the solution of the one
    before; otherwise all columns are solved together from ``w0`` (or zero).

    Returns W (C, D+1, L, K) and ``{"iterations": (C, L) int, "converged": (C, L) bool,
    "grad_max": (C, L) float, "stalled": (C, L) bool}`` (numpy).
    """
    c, n, d1 = xa.shape
    l = lam.shape[1]
    k = num_classes
    dev, dt = xa.device, xa.dtype
    y1h = torch.nn.functional.one_hot(y.long(), k).to(dt)
    v = None
    curv = torch.ones((c, d1), device=dev, dtype=dt)
    if precondition and d1 > 1:
        v, s = _eigbasis(xa)
        xa = torch.cat([torch.bmm(xa[:, :, :-1], v), xa[:, :, -1:]], dim=2)
        curv = torch.cat([s, (xa[:, :, -1:] ** 2).mean(1)], dim=1)
    lam = lam.to(device=dev, dtype=dt)
    args = (max_iter, tol, ftol, history)
    if warm_path and l > 1 and w0 is None:
        order = torch.argsort(lam[0], descending=True).tolist()
        w = torch.zeros((c, d1, l, k), device=dev, dtype=dt)
        stats = {name: torch.zeros((c, l), device=dev, dtype=tp) for name, tp in
                 (("iters", torch.long), ("conv", torch.bool), ("gm", dt), ("stalled", torch.bool))}
        prev = None
        for j in order:
            o = _lbfgs(xa, y1h, lam[:, j : j + 1].contiguous(), prev, curv, v, *args)
            w[:, :, j] = o["w"][:, :, 0]
            for name in stats:
                stats[name][:, j] = o[name][:, 0]
            prev = o["w"]
        o = {"w": w, **stats}
    else:
        o = _lbfgs(xa, y1h, lam, _rotate(w0, v) if w0 is not None else None, curv, v, *args)
    info = {"iterations": o["iters"].cpu().numpy(), "converged": o["conv"].cpu().numpy(),
            "grad_max": o["gm"].double().cpu().numpy(), "stalled": o["stalled"].cpu().numpy()}
    return _rotate(o["w"], v, back=True), info
