"""`probe`: train DiT/SiT models and look inside them. A thin layer: parse, call, summarise.

Each command's work lives in ``training/``, ``probe/`` or ``analysis/``; this file only turns
flags into calls and errors into one-line messages.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(
    name="probe",
    help="Train DiT/SiT diffusion transformers (baseline, SRA, DiverseDiT) and probe their representations "
    "over a block x timestep grid.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Train DiT/SiT diffusion transformers and probe their representations (block x timestep)."""


def friendly_errors(fn):
    """Turn expected user errors into `error: ...` on one line and exit code 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, FileNotFoundError, KeyError) as e:
            msg = str(e).strip().strip('"') or type(e).__name__
            typer.echo(f"error: {msg}", err=True)
            raise typer.Exit(code=2) from None

    return wrapper


# ----------------------------------------------------------------------------------------------
# train
# ----------------------------------------------------------------------------------------------


@app.command()
@friendly_errors
def train(
    preset: Annotated[Optional[str], typer.Option(help="Named preset: sit-tiny, dit-tiny, sit-mini, "
                                                  "sit-b2-imagenet, sit-xl2-imagenet, dit-xl2-imagenet.")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="YAML file of config fields (over the preset).")] = None,
    model: Annotated[Optional[str], typer.Option(help="Registry name, e.g. SiT-B/2, DiT-XL/2, SiT-T/4 (tiny).")] = None,
    data: Annotated[Optional[str], typer.Option(help="fashion-mnist | digits | folder:PATH | latents:PATH")] = None,
    method: Annotated[Optional[str], typer.Option(help="baseline | sra | diverse | sra+diverse")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Optimizer steps in total (a resumed run continues to this).")] = None,
    out: Annotated[Optional[str], typer.Option(help="Run folder: checkpoints/, metrics.csv, tb/, config.yaml.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Global batch size (all ranks, all accumulation steps).")] = None,
    lr: Annotated[Optional[float], typer.Option(help="AdamW learning rate.")] = None,
    ema_decay: Annotated[Optional[float], typer.Option(help="EMA decay (also the SRA teacher's).")] = None,
    precision: Annotated[Optional[str], typer.Option(help="auto | fp32 | bf16 | fp16")] = None,
    ckpt_every: Annotated[Optional[int], typer.Option(help="Checkpoint every N steps (0: only at the end).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed for weights, data order and noise.")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto | cpu | cuda | cuda:N")] = None,
    compile: Annotated[Optional[bool], typer.Option("--compile/--no-compile", help="torch.compile the model.")] = None,
    resume: Annotated[Optional[Path], typer.Option(help="Checkpoint file or run folder to resume from (exact).")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override any field: --set sra.teacher_block=5 "
                                                      "--set model_overrides.depth=4 (repeatable).")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Train a DiT or SiT (baseline, +SRA, +DiverseDiT or both); writes checkpoints and metrics.

    Examples: `probe train --preset sit-tiny --out runs/sit`,
    `probe train --preset dit-tiny --method sra --steps 3000`,
    `torchrun --nproc_per_node 8 cli.py train --preset sit-b2-imagenet --method sra`.
    """
    from training.config import parse_set_overrides, resolve_config
    from training.trainer import train as run_training

    flags = dict(model=model, data=data, method=method, steps=steps, out=out, batch_size=batch_size, lr=lr,
                 ema_decay=ema_decay, precision=precision, ckpt_every=ckpt_every, seed=seed, device=device,
                 compile=compile)
    flags.update(parse_set_overrides(set_ or []))
    cfg = resolve_config(preset, config, flags)
    last = run_training(cfg, resume=resume, quiet=quiet)
    if last is not None:
        typer.echo(f"checkpoint: {last}\nmetrics:    {Path(cfg.out) / 'metrics.csv'}")


# ----------------------------------------------------------------------------------------------
# (further commands are added below: layer-grid, similarity, diversity, pca, umap, curves,
#  correlate, attribute, sample, eval)
# ----------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# layer-grid (probe/layer_grid.py)
# ----------------------------------------------------------------------------------------------


def _split_list(values: Optional[list[str]]) -> list[str]:
    """`--blocks 1,2 --blocks 5` -> ["1", "2", "5"] (comma lists and repeats both work)."""
    return [v.strip() for item in values or [] for v in str(item).split(",") if v.strip()]


def _parse_blocks(values: Optional[list[str]]) -> Optional[list[int]]:
    out: list[int] = []
    for v in _split_list(values):
        try:
            if "-" in v.lstrip("-"):
                lo, hi = v.split("-", 1)
                out.extend(range(int(lo), int(hi) + 1))
            else:
                out.append(int(v))
        except ValueError:
            raise ValueError(f"--blocks expects integers or ranges like 1-4, got {v!r}") from None
    return out or None


def _parse_ts(values: Optional[list[str]]) -> Optional[list[float]]:
    out: list[float] = []
    for v in _split_list(values):
        try:
            out.append(float(v))
        except ValueError:
            raise ValueError(f"--t expects numbers, got {v!r}") from None
    return out or None


@app.command("layer-grid")
@friendly_errors
def layer_grid(
    ckpt: Annotated[Path, typer.Argument(help="Checkpoint file (ours, or a published DiT/SiT/REPA/SRA file).")],
    data: Annotated[Optional[str], typer.Option(help="fashion-mnist | digits | folder:PATH | latents:PATH "
                                                "(default: the checkpoint's dataset, else fashion-mnist).")] = None,
    blocks: Annotated[Optional[list[str]], typer.Option(help="1-based blocks: 1,4,8 or 1-6 (default: all).")] = None,
    t: Annotated[Optional[list[str]], typer.Option("--t", help="Timesteps in our convention, e.g. 0,0.3,0.6 "
                                                   "(SiT, 1 = noise) or 0,250,500 (DiT). Default: SiT 0..0.9 "
                                                   "step 0.1, DiT 0..900 step 100.")] = None,
    weights: Annotated[str, typer.Option(help="ema | model (online weights).")] = "ema",
    label: Annotated[str, typer.Option(help="null (no label leakage, default) | class (true labels).")] = "null",
    probe: Annotated[str, typer.Option(help="torch (batched L-BFGS) | ridge (fast screen) | sklearn | cuml | knn")] = "torch",
    pooling: Annotated[str, typer.Option(help="mean | tokens (tokens as samples) | spatialK (e.g. spatial2).")] = "mean",
    n_train: Annotated[int, typer.Option(help="Train images (probe fit + held-out L2 choice).")] = 2000,
    n_test: Annotated[int, typer.Option(help="Images of the official test split (accuracy).")] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of the image subsets, the noise bank and the held-out cut.")] = 0,
    batch_size: Annotated[int, typer.Option(help="Images per forward.")] = 256,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    out: Annotated[Optional[Path], typer.Option(help="Output folder (default: layer_grid/<ckpt>-<weights>-<label>-<probe>).")] = None,
    cache: Annotated[Optional[Path], typer.Option(help="Feature cache folder (fp16 cells, reused and resumable).")] = Path(".repdyn_cache/features"),
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Do not read or write the feature cache.")] = False,
    family: Annotated[Optional[str], typer.Option(help="dit | sit, for foreign checkpoints that do not say.")] = None,
    time_convention: Annotated[Optional[str], typer.Option(help="flow-t1-noise | flow-t0-noise (foreign SiT).")] = None,
    trust_checkpoint: Annotated[bool, typer.Option(help="Allow pickled objects (official training checkpoints).")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
) -> None:
    """Linear-probe accuracy for every (block, t) cell: writes layer_grid.csv, a heatmap PNG and the protocol.

    Examples: `probe layer-grid runs/sit/checkpoints/0001500.pt`,
    `probe layer-grid ckpt.pt --blocks 1-6 --t 0,0.2,0.5 --weights model --label class --probe ridge`,
    `torchrun --nproc_per_node 4 cli.py layer-grid SiT-XL-2-256.pt --family sit --data latents:data/in256`.
    """
    from probe.layer_grid import run_layer_grid, summarize

    res = run_layer_grid(ckpt, data=data, blocks=_parse_blocks(blocks), ts=_parse_ts(t), weights=weights, label=label,
                         probe=probe, device=device, n_train=n_train, n_test=n_test, pooling=pooling, seed=seed,
                         batch_size=batch_size, out_dir=out, cache_dir=None if no_cache else cache, family=family,
                         time_convention=time_convention, trust=trust_checkpoint, progress=not quiet)
    if res.csv is None:  # a non-zero torchrun rank
        return
    typer.echo(summarize(res.table))
    typer.echo(f"table:    {res.csv}\nheatmap:  {res.png}\nprotocol: {res.protocol}")


# ----------------------------------------------------------------------------------------------
# sample, eval (training/samplers.py, training/evaluation.py)
# ----------------------------------------------------------------------------------------------

_METHOD_HELP = "sde | ode-euler | ode-heun (SiT), ddpm (DiT); default: sde for SiT, ddpm for DiT."


@app.command()
@friendly_errors
def sample(
    ckpt: Annotated[Path, typer.Argument(help="Checkpoint file (ours, or a published DiT/SiT/REPA/SRA file).")],
    out: Annotated[Path, typer.Option(help="PNG grid to write.")] = Path("samples.png"),
    npz: Annotated[Optional[Path], typer.Option(help="Also write an ADM-evaluator .npz (arr_0 uint8 NHWC, arr_1 labels).")] = None,
    n: Annotated[int, typer.Option(help="Number of samples.")] = 64,
    method: Annotated[Optional[str], typer.Option(help=_METHOD_HELP)] = None,
    steps: Annotated[int, typer.Option(help="Sampling steps (DDPM: respaced steps out of 1000).")] = 50,
    cfg_scale: Annotated[float, typer.Option(help="Classifier-free guidance scale (1 = none).")] = 1.0,
    guidance_low: Annotated[float, typer.Option(help="Guide only while t >= this (t normalised, 1 = noise).")] = 0.0,
    guidance_high: Annotated[float, typer.Option(help="Guide only while t <= this (REPA/SRA use 0.7).")] = 1.0,
    legacy_cfg: Annotated[bool, typer.Option("--legacy-cfg/--no-legacy-cfg", help="Guide only the first 3 "
                                             "channels, as the DiT/SiT repos do.")] = False,
    labels: Annotated[Optional[str], typer.Option(help="balanced | random | null | CLASS | comma list.")] = None,
    seed: Annotated[int, typer.Option(help="Seed; sample i depends only on (seed, i).")] = 0,
    batch_size: Annotated[int, typer.Option(help="Samples per forward batch.")] = 64,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    weights: Annotated[str, typer.Option(help="ema | model")] = "ema",
    family: Annotated[Optional[str], typer.Option(help="dit | sit, for foreign checkpoints that do not say.")] = None,
    trust_checkpoint: Annotated[bool, typer.Option(help="Allow pickled objects (official training checkpoints).")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Sample from a checkpoint: a PNG grid and optionally an ADM .npz.

    Example: `probe sample runs/sit/checkpoints/0005000.pt --n 64 --method sde --steps 250 --cfg-scale 1.8
    --guidance-high 0.7 --npz samples.npz`.
    """
    from training.evaluation import parse_labels, resolve_device, run_sample

    res = run_sample(ckpt, out, n=n, npz=npz, weights=weights, family=family, trust=trust_checkpoint, method=method,
                     steps=steps, cfg_scale=cfg_scale, guidance_interval=(guidance_low, guidance_high),
                     legacy_cfg_channels=legacy_cfg, labels=parse_labels(labels), seed=seed, batch_size=batch_size,
                     device=resolve_device(device), progress=not quiet)
    typer.echo(f"{res['n']} samples ({res['method']}, {res['steps']} steps) -> {res['grid']}"
               + (f", {res['npz']}" if "npz" in res else ""))


@app.command(name="eval")
@friendly_errors
def eval_(
    ckpts: Annotated[list[Path], typer.Argument(help="Checkpoint file(s); each gets one row.")],
    metrics_csv: Annotated[Optional[Path], typer.Option(help="Metrics table to append to (default: "
                                                        "<run>/eval_metrics.csv).")] = None,
    n: Annotated[int, typer.Option(help="Number of generated samples.")] = 1000,
    data: Annotated[Optional[str], typer.Option(help="Dataset for reference statistics (default: the checkpoint's).")] = None,
    inception_weights: Annotated[Optional[Path], typer.Option(help="torch-fidelity Inception file "
                                                              "(weights-inception-2015-12-05-6726825d.pth): adds "
                                                              "FID, IS, KID, precision/recall.")] = None,
    n_ref: Annotated[Optional[int], typer.Option(help="Real images for the Inception metrics (default: n).")] = None,
    offline: Annotated[bool, typer.Option("--offline-metrics/--no-offline-metrics", help="fd_<data> and "
                                          "cond_acc_<data> from the project's cached dataset classifier.")] = True,
    npz: Annotated[Optional[Path], typer.Option(help="Also write the samples as an ADM .npz (one checkpoint only).")] = None,
    method: Annotated[Optional[str], typer.Option(help=_METHOD_HELP)] = None,
    steps: Annotated[int, typer.Option(help="Sampling steps (DDPM: respaced steps out of 1000).")] = 50,
    cfg_scale: Annotated[float, typer.Option(help="Classifier-free guidance scale (1 = none).")] = 1.0,
    guidance_low: Annotated[float, typer.Option(help="Guide only while t >= this (t normalised, 1 = noise).")] = 0.0,
    guidance_high: Annotated[float, typer.Option(help="Guide only while t <= this (REPA/SRA use 0.7).")] = 1.0,
    legacy_cfg: Annotated[bool, typer.Option("--legacy-cfg/--no-legacy-cfg", help="Guide only the first 3 "
                                             "channels, as the DiT/SiT repos do.")] = False,
    labels: Annotated[Optional[str], typer.Option(help="balanced | random | null | CLASS | comma list.")] = None,
    seed: Annotated[int, typer.Option(help="Seed; sample i depends only on (seed, i).")] = 0,
    batch_size: Annotated[int, typer.Option(help="Samples per forward batch.")] = 64,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    weights: Annotated[str, typer.Option(help="ema | model")] = "ema",
    family: Annotated[Optional[str], typer.Option(help="dit | sit, for foreign checkpoints that do not say.")] = None,
    trust_checkpoint: Annotated[bool, typer.Option(help="Allow pickled objects (official training checkpoints).")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Generation metrics for checkpoint(s), one CSV row each, keyed by checkpoint and sampler settings.

    Always (offline): fd_<data> and cond_acc_<data>, in the feature space of a small classifier the
    project trains once per dataset (not FID). With --inception-weights: FID, IS, KID, precision/recall.
    """
    from training.evaluation import parse_labels, resolve_device, run_eval

    if npz is not None and len(ckpts) > 1:
        raise ValueError("--npz takes one checkpoint; run probe eval once per checkpoint to export samples")
    for ckpt in ckpts:
        row = run_eval(ckpt, metrics_csv, weights=weights, family=family, trust=trust_checkpoint, n=n, method=method,
                       steps=steps, cfg_scale=cfg_scale, guidance_interval=(guidance_low, guidance_high),
                       legacy_cfg_channels=legacy_cfg, labels=parse_labels(labels), seed=seed, batch_size=batch_size,
                       device=resolve_device(device), data=data, inception_weights=inception_weights, n_ref=n_ref,
                       offline=offline, npz_path=npz, progress=not quiet, log=lambda m: typer.echo(m, err=True))
        shown = {k: v for k, v in row.items() if k.startswith(("fd_", "cond_acc_")) or k in ("fid", "is", "kid",
                                                                                               "precision", "recall")}
        typer.echo(f"{Path(ckpt).name} step {row['step']}: "
                   + ", ".join(f"{k}={v:.4g}" for k, v in shown.items()) + f" -> {row['metrics_csv']}")


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
