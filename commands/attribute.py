"""``probe attribute``: captum attribution of a trained linear probe's class logit back to the input patches."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from repdyn.analysis import plots
from repdyn.analysis.attribution import LinearProbe, backbone_feature_fn, probe_attribution
from repdyn.core.timesteps import format_t
from repdyn.probe.grid import grid_noise, load_x0, validate_blocks
from repdyn.probe.probes import CellProbe, fit_cell_probe
from repdyn.core.files import write_npz, write_table
from repdyn.model.flow import model_time

from repdyn.commands.features import FeatureSpec, cell_t, describe_grid, load_features, load_for_analysis
from repdyn.commands.outputs import Outputs, prepare_for, releases_outputs, result_identity

__all__ = ["AttributionResult", "run_attribute"]

METHODS = ("integrated_gradients", "saliency", "input_x_gradient")


@dataclass
class AttributionResult(Outputs):
    table: pd.DataFrame | None = None  # attribution.csv, one row per attributed image
    probe: CellProbe | None = None


@releases_outputs
def run_attribute(ckpt: str | os.PathLike, spec: FeatureSpec, *, block: int, t: float, weights: str = "ema",
                  images: Sequence[int] | None = None, n_train: int = 2000, target: str = "label", probe: str = "torch",
                  method: str = "integrated_gradients", n_steps: int = 32,
                  out: str | os.PathLike | None = None, pdf: bool = False,
                  overwrite: bool = False) -> AttributionResult:
    """The probe is fitted on cached (block, t) features of ``n_train`` train images with the
    layer-grid protocol and scored on ``spec.n`` test images. The attributed images are test rows
    ``images`` (default 0..5), noised to ``t`` with the *same* per-image noise as the cache, so the
    forward that is attributed is exactly the one that was probed. ``target``: "label" (the true
    class) or "pred" (the probe's prediction). Writes ``attribution.png``, ``attribution.npz`` (pixel
    and patch maps) and ``attribution.csv`` (per image)."""
    if probe not in ("torch", "ridge"):
        raise ValueError(f"--probe must be torch or ridge for attribution, got {probe!r}")
    if target not in ("label", "pred"):
        raise ValueError(f"--target must be label or pred, got {target!r}")
    if method not in METHODS:
        raise ValueError(f"--method must be {', '.join(METHODS[:-1])} or {METHODS[-1]}, got {method!r}")
    if n_train < 10 or spec.n < 2:
        raise ValueError("--n-train must be >= 10 and --n >= 2 to fit and score the probe")
    images = list(images) if images else list(range(6))
    ck = load_for_analysis(ckpt, weights, spec)
    tt = cell_t(ck, t)
    validate_blocks([block], ck.model.depth)
    res = prepare_for(ck, out, "attribute", AttributionResult, overwrite=overwrite,
                      identity=result_identity(ck, spec, block=block, t=tt, images=images, n_train=n_train,
                                               target=target, probe=probe, method=method, n_steps=n_steps))
    dtr, gtr = load_features(ck, spec, blocks=[block], ts=[tt], split="train", n=n_train)
    dte, gte = load_features(ck, spec, blocks=[block], ts=[tt], split="test")
    if max(images) >= len(dte) or min(images) < 0:
        raise ValueError(f"--images must be rows 0..{len(dte) - 1} of the test split")
    k = max(dtr.num_classes, int(gtr.labels.max()) + 1)
    cp = fit_cell_probe(gtr.features[(block, tt)], gtr.labels, gte.features[(block, tt)], gte.labels, probe,
                        num_classes=k, seed=spec.seed)
    lin = LinearProbe(cp.weight, cp.bias, cp.mean, cp.std)

    idx = np.asarray(images)
    x0 = load_x0(dte, idx, spec.seed, "test")
    cfg = ck.model.config
    eps = grid_noise(idx, (cfg.in_channels, cfg.input_size, cfg.input_size), spec.seed, "test")
    t_ours = torch.full((1,), float(tt)) if ck.family == "sit" else torch.full((1,), int(tt))
    t_model = float(model_time(t_ours, ck.time_convention)[0]) if ck.family == "sit" else int(tt)

    def noise_fn(x, e, _t):  # our convention for the corruption, the model's for its input
        return ck.objective.corrupt(x, t_ours.to(x.device).expand(len(x)), e)

    y = torch.as_tensor(np.asarray(dte.labels)[idx]) if spec.label == "class" else None
    feature_fn = backbone_feature_fn(ck.model, block, t_model, eps, noise_fn, y=y)
    labels = np.asarray(dte.labels)[idx]
    attr = probe_attribution(x0, feature_fn, lin, target=labels if target == "label" else None, method=method,
                             n_steps=n_steps, patch_size=cfg.patch_size)
    pred = attr.logits.argmax(1)
    names = getattr(dte, "class_names", None)
    meta = describe_grid(ck, gte, block=block, t=tt, probe=f"{probe}, n_train={n_train}, test acc "
                                                            f"{100 * cp.accuracy:.1f}%")
    name = f"{meta['model']} @ step {ck.step} ({meta['weights']})"
    titles = [f"test #{i}: {names[l] if names else l}\nprobe says {names[p] if names else p}"
              for i, l, p in zip(idx, labels, pred)]
    res.save("png", plots.plot_attribution(
        x0.numpy(), attr.patch, panel_titles=titles, meta=meta,
        title=f"{method.replace('_', ' ')} of the probe's {target} logit, block {block}, t={format_t(tt)}: {name}"),
        "attribution.png", pdf)
    rows = pd.DataFrame({"index": idx, "label": labels, "predicted": pred, "target": attr.target,
                         "target_logit": attr.logits[np.arange(len(idx)), attr.target],
                         "delta": attr.delta if attr.delta is not None else np.nan,
                         "patch_sum": attr.patch.reshape(len(idx), -1).sum(1), "title": titles})
    for col, v in (("block", block), ("t", tt), ("weights", ck.weights), ("step", ck.step),
                   ("checkpoint_sha", ck.sha), ("method", method), ("probe_accuracy", cp.accuracy),
                   ("probe", probe), ("probe_reg", cp.reg)):
        rows[col] = v
    res.files["npz"] = write_npz(res.out / "attribution.npz", pixel=attr.pixel, patch=attr.patch, images=idx,
                                 labels=labels, target=attr.target, logits=attr.logits)
    res.files["csv"] = write_table(rows, res.out / "attribution.csv")
    res.table, res.probe = rows, cp
    return res.finish()
