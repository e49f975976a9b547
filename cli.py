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
_SMethod = Annotated[Optional[str], typer.Option(help=_METHOD_HELP)]
_SSteps = Annotated[int, typer.Option(help="Sampling steps (DDPM: respaced steps out of 1000).")]
_SCfg = Annotated[float, typer.Option(help="Classifier-free guidance scale (1 = none).")]
_SLow = Annotated[float, typer.Option(help="Guide only while t >= this (t normalised, 1 = noise).")]
_SHigh = Annotated[float, typer.Option(help="Guide only while t <= this (REPA/SRA use 0.7).")]
_SLegacy = Annotated[bool, typer.Option("--legacy-cfg/--no-legacy-cfg", help="Guide only the first 3 channels, "
                                        "as the DiT/SiT repos do.")]
_SLabels = Annotated[Optional[str], typer.Option(help="balanced | random | null | CLASS | comma list.")]
_SSeed = Annotated[int, typer.Option(help="Seed; sample i depends only on (seed, i).")]
_SBatch = Annotated[int, typer.Option(help="Samples per forward batch.")]
_SDevice = Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")]
_SWeights = Annotated[str, typer.Option(help="ema | model")]
_SFamily = Annotated[Optional[str], typer.Option(help="dit | sit, for foreign checkpoints that do not say.")]
_STrust = Annotated[bool, typer.Option(help="Allow pickled objects (official training checkpoints).")]
_SQuiet = Annotated[bool, typer.Option(help="No progress bar.")]


@app.command()
@friendly_errors
def sample(
    ckpt: Annotated[Path, typer.Argument(help="Checkpoint file (ours, or a published DiT/SiT/REPA/SRA file).")],
    out: Annotated[Path, typer.Option(help="PNG grid to write.")] = Path("samples.png"),
    npz: Annotated[Optional[Path], typer.Option(help="Also write an ADM-evaluator .npz (arr_0 uint8 NHWC, arr_1 labels).")] = None,
    n: Annotated[int, typer.Option(help="Number of samples.")] = 64,
    method: _SMethod = None,
    steps: _SSteps = 50,
    cfg_scale: _SCfg = 1.0,
    guidance_low: _SLow = 0.0,
    guidance_high: _SHigh = 1.0,
    legacy_cfg: _SLegacy = False,
    labels: _SLabels = None,
    seed: _SSeed = 0,
    batch_size: _SBatch = 64,
    device: _SDevice = "auto",
    weights: _SWeights = "ema",
    family: _SFamily = None,
    trust_checkpoint: _STrust = False,
    quiet: _SQuiet = False,
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
    method: _SMethod = None,
    steps: _SSteps = 50,
    cfg_scale: _SCfg = 1.0,
    guidance_low: _SLow = 0.0,
    guidance_high: _SHigh = 1.0,
    legacy_cfg: _SLegacy = False,
    labels: _SLabels = None,
    seed: _SSeed = 0,
    batch_size: _SBatch = 64,
    device: _SDevice = "auto",
    weights: _SWeights = "ema",
    family: _SFamily = None,
    trust_checkpoint: _STrust = False,
    quiet: _SQuiet = False,
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


# ----------------------------------------------------------------------------------------------
# similarity, diversity, pca, umap, attribute, curves, correlate (analysis/commands.py, analysis/dynamics.py)
# ----------------------------------------------------------------------------------------------

_ACkpt = Annotated[Path, typer.Argument(help="Checkpoint file (ours, or a published DiT/SiT/REPA/SRA file).")]
_AData = Annotated[Optional[str], typer.Option(help="fashion-mnist | digits | folder:PATH | latents:PATH "
                                               "(default: the checkpoint's dataset).")]
_AWeights = Annotated[str, typer.Option(help="ema | model (online weights).")]
_ABlocks = Annotated[Optional[list[str]], typer.Option(help="1-based blocks: 1,4,8 or 1-6 (default: all).")]
_ATs = Annotated[Optional[list[str]], typer.Option("--t", help="Timesteps in our convention (SiT 0..1, 1 = noise; "
                                                   "DiT 0..999), e.g. 0,0.3,0.6 (default: the layer-grid grid).")]
_ASplit = Annotated[str, typer.Option(help="train | test (which split's images are analysed).")]
_ALabel = Annotated[str, typer.Option(help="null (no label leakage, default) | class (true labels).")]
_ASeed = Annotated[int, typer.Option(help="Seed of the image subset and the shared noise bank.")]
_ABatch = Annotated[int, typer.Option(help="Images per forward.")]
_ADevice = Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")]
_ACache = Annotated[Optional[Path], typer.Option(help="Feature cache folder (shared with layer-grid).")]
_ANoCache = Annotated[bool, typer.Option("--no-cache", help="Do not read or write the feature cache.")]
_AFamily = Annotated[Optional[str], typer.Option(help="dit | sit, for foreign checkpoints that do not say.")]
_ATime = Annotated[Optional[str], typer.Option(help="flow-t1-noise | flow-t0-noise (foreign SiT).")]
_ATrust = Annotated[bool, typer.Option(help="Allow pickled objects (official training checkpoints).")]
_APdf = Annotated[bool, typer.Option("--pdf", help="Also write every figure as PDF.")]
_AQuiet = Annotated[bool, typer.Option(help="No progress bars.")]
_DEFAULT_CACHE = Path(".repdyn_cache/features")


def _spec(data, split, n, label, pooling, seed, batch_size, device, cache, no_cache, family, time_convention,
          trust, quiet):
    from analysis.commands import FeatureSpec

    return FeatureSpec(data=data, split=split, n=n, label=label, pooling=pooling, seed=seed, batch_size=batch_size,
                       device=device, cache_dir=None if no_cache else cache, family=family,
                       time_convention=time_convention, trust=trust, progress=not quiet)


def _ints(values: Optional[list[str]], flag: str) -> Optional[list[int]]:
    try:
        return [int(v) for v in _split_list(values)] or None
    except ValueError:
        raise ValueError(f"{flag} expects integers, e.g. 0,5,9") from None


def _echo_files(files: dict) -> None:
    for k, v in files.items():
        if isinstance(v, Path) and k != "out":
            typer.echo(f"{k + ':':<15} {v}")


@app.command()
@friendly_errors
def similarity(
    ckpt: _ACkpt,
    other: Annotated[Optional[Path], typer.Option(help="Second checkpoint for a cross-model matrix (checkpoint i "
                                                  "vs j, SRA vs baseline).")] = None,
    other_weights: Annotated[Optional[str], typer.Option(help="Weights of the second model (default: --weights); "
                                                         "--weights ema --other-weights model = teacher EMA vs "
                                                         "student online.")] = None,
    weights: _AWeights = "ema", blocks: _ABlocks = None, t: _ATs = None,
    n: Annotated[int, typer.Option(help="Images (rows of every cell; debiased CKA needs >= 4).")] = 512,
    biased: Annotated[bool, typer.Option("--biased", help="Plug-in (biased) CKA instead of the debiased one.")] = False,
    cka_method: Annotated[str, typer.Option(help="auto | gram | minibatch | feature (see cka_matrix).")] = "auto",
    data: _AData = None, split: _ASplit = "test", label: _ALabel = "null", seed: _ASeed = 0, batch_size: _ABatch = 256,
    device: _ADevice = "auto", out: Annotated[Optional[Path], typer.Option(help="Output folder (default: "
                                                                        "figures/similarity/<run>-<ckpt>-<weights>).")] = None,
    cache: _ACache = _DEFAULT_CACHE, no_cache: _ANoCache = False, family: _AFamily = None, time_convention: _ATime = None,
    trust_checkpoint: _ATrust = False, pdf: _APdf = False, quiet: _AQuiet = False,
) -> None:
    """CKA + cosine over the (block, t) grid: cka.csv/.npz, full-grid, block x block and t x t heatmaps.

    Examples: `probe similarity ckpt.pt --t 0.1,0.5,0.9`,
    `probe similarity ckpt.pt --weights ema --other-weights model` (teacher EMA vs student online),
    `probe similarity runs/sra/checkpoints/0004000.pt --other runs/base/checkpoints/0004000.pt`.
    """
    from analysis.commands import run_similarity

    spec = _spec(data, split, n, label, "mean", seed, batch_size, device, cache, no_cache, family, time_convention,
                 trust_checkpoint, quiet)
    files = run_similarity(ckpt, spec, weights=weights, other=other, other_weights=other_weights,
                           blocks=_parse_blocks(blocks), ts=_parse_ts(t), debiased=not biased, method=cka_method,
                           out=out, pdf=pdf)
    _echo_files(files)


@app.command()
@friendly_errors
def diversity(
    ckpt: _ACkpt, weights: _AWeights = "ema", blocks: _ABlocks = None, t: _ATs = None,
    n: Annotated[int, typer.Option(help="Images (token features: keep it modest).")] = 128,
    pooling: Annotated[str, typer.Option(help="tokens (DiverseDiT's definition) | mean (per-image terms).")] = "tokens",
    data: _AData = None, split: _ASplit = "test", label: _ALabel = "null", seed: _ASeed = 0, batch_size: _ABatch = 64,
    device: _ADevice = "auto", out: Annotated[Optional[Path], typer.Option(help="Output folder (default: "
                                                                        "figures/diversity/<run>-<ckpt>-<weights>).")] = None,
    cache: _ACache = _DEFAULT_CACHE, no_cache: _ANoCache = False, family: _AFamily = None, time_convention: _ATime = None,
    trust_checkpoint: _ATrust = False, pdf: _APdf = False, quiet: _AQuiet = False,
) -> None:
    """DiverseDiT's three terms for every block pair and t: diversity.csv, dispersion.csv, figures.

    Example: `probe diversity ckpt.pt --t 0.1,0.5,0.9 --n 128`.
    """
    from analysis.commands import run_diversity

    spec = _spec(data, split, n, label, pooling, seed, batch_size, device, cache, no_cache, family, time_convention,
                 trust_checkpoint, quiet)
    _echo_files(run_diversity(ckpt, spec, weights=weights, blocks=_parse_blocks(blocks), ts=_parse_ts(t), out=out,
                              pdf=pdf))


@app.command()
@friendly_errors
def pca(
    ckpt: _ACkpt, weights: _AWeights = "ema",
    images: Annotated[Optional[list[str]], typer.Option(help="Row indices of --split shown side by side "
                                                        "(default 0,1,2,3).")] = None,
    blocks: Annotated[Optional[list[str]], typer.Option(help="1-based blocks (default: all, or 7 spread over a "
                                                        "deep model).")] = None,
    t: Annotated[Optional[list[str]], typer.Option("--t", help="Timesteps (default SiT 0.1,0.3,0.5,0.7 as SRA; "
                                                   "DiT 100,300,500,700).")] = None,
    basis: Annotated[str, typer.Option(help="shared (one basis + colour scale per block across t) | per_cell "
                                       "(SRA's per-cell PCA).")] = "shared",
    data: _AData = None, split: _ASplit = "test", label: _ALabel = "null", seed: _ASeed = 0, batch_size: _ABatch = 64,
    device: _ADevice = "auto", out: Annotated[Optional[Path], typer.Option(help="Output folder (default: "
                                                                        "figures/pca/<run>-<ckpt>-<weights>).")] = None,
    cache: _ACache = _DEFAULT_CACHE, no_cache: _ANoCache = False, family: _AFamily = None, time_convention: _ATime = None,
    trust_checkpoint: _ATrust = False, pdf: _APdf = False, quiet: _AQuiet = False,
) -> None:
    """Patch-token PCA as RGB maps (rows = blocks, columns = t), several images side by side: pca.png, pca.npz.

    Example: `probe pca ckpt.pt --images 0,7,42 --t 0.1,0.3,0.5,0.7`.
    """
    from analysis.commands import run_pca

    spec = _spec(data, split, 0, label, "tokens", seed, batch_size, device, cache, no_cache, family, time_convention,
                 trust_checkpoint, quiet)
    _echo_files(run_pca(ckpt, spec, weights=weights, images=_ints(images, "--images"), blocks=_parse_blocks(blocks),
                        ts=_parse_ts(t), basis=basis, out=out, pdf=pdf))


@app.command()
@friendly_errors
def umap(
    ckpt: _ACkpt, weights: _AWeights = "ema",
    cell: Annotated[Optional[list[str]], typer.Option(help="A (block,t) cell, e.g. --cell 4,0.5 (repeatable).")] = None,
    aligned_block: Annotated[Optional[int], typer.Option(help="AlignedUMAP of this block across --t.")] = None,
    t: Annotated[Optional[list[str]], typer.Option("--t", help="Timesteps of the aligned UMAP (default SiT "
                                                   "0.1,0.3,0.5,0.7; DiT 100..700).")] = None,
    n: Annotated[int, typer.Option(help="Images (points per panel).")] = 1000,
    n_neighbors: Annotated[int, typer.Option(help="UMAP n_neighbors.")] = 15,
    min_dist: Annotated[float, typer.Option(help="UMAP min_dist.")] = 0.1,
    umap_seed: Annotated[Optional[int], typer.Option(help="UMAP random_state (seeded = single-threaded).")] = 0,
    data: _AData = None, split: _ASplit = "test", label: _ALabel = "null", seed: _ASeed = 0, batch_size: _ABatch = 256,
    device: _ADevice = "auto", out: Annotated[Optional[Path], typer.Option(help="Output folder (default: "
                                                                        "figures/umap/<run>-<ckpt>-<weights>).")] = None,
    cache: _ACache = _DEFAULT_CACHE, no_cache: _ANoCache = False, family: _AFamily = None, time_convention: _ATime = None,
    trust_checkpoint: _ATrust = False, pdf: _APdf = False, quiet: _AQuiet = False,
) -> None:
    """UMAP of mean-pooled features for chosen cells, and AlignedUMAP across t for one block.

    Examples: `probe umap ckpt.pt --cell 2,0.1 --cell 2,0.5 --cell 6,0.5`,
    `probe umap ckpt.pt --aligned-block 4 --t 0.1,0.3,0.5,0.7`.
    """
    from analysis.commands import run_umap

    spec = _spec(data, split, n, label, "mean", seed, batch_size, device, cache, no_cache, family, time_convention,
                 trust_checkpoint, quiet)
    _echo_files(run_umap(ckpt, spec, weights=weights, cells=_split_cells(cell), aligned_block=aligned_block,
                         ts=_parse_ts(t), n_neighbors=n_neighbors, min_dist=min_dist, umap_seed=umap_seed, out=out,
                         pdf=pdf))


def _split_cells(values: Optional[list[str]]) -> list[str]:
    """`--cell 4,0.5 --cell 6,0.3` (one cell per flag; also `4:0.5;6:0.3`)."""
    return [c.strip() for v in values or [] for c in str(v).split(";") if c.strip()]


@app.command()
@friendly_errors
def attribute(
    ckpt: _ACkpt,
    block: Annotated[int, typer.Option(help="1-based block whose probe is attributed.")],
    t: Annotated[float, typer.Option("--t", help="Timestep of the cell (our convention).")],
    weights: _AWeights = "ema",
    images: Annotated[Optional[list[str]], typer.Option(help="Test rows to attribute (default 0..5).")] = None,
    target: Annotated[str, typer.Option(help="label (true class logit) | pred (the probe's prediction).")] = "label",
    method: Annotated[str, typer.Option(help="integrated_gradients | saliency | input_x_gradient")] = "integrated_gradients",
    n_steps: Annotated[int, typer.Option(help="Integrated-gradients steps.")] = 32,
    probe: Annotated[str, typer.Option(help="torch (L-BFGS logistic, the layer-grid default) | ridge.")] = "torch",
    n_train: Annotated[int, typer.Option(help="Train images for the probe.")] = 2000,
    n_test: Annotated[int, typer.Option(help="Test images to score the probe.")] = 1000,
    data: _AData = None, label: _ALabel = "null", seed: _ASeed = 0, batch_size: _ABatch = 256,
    device: _ADevice = "auto", out: Annotated[Optional[Path], typer.Option(help="Output folder (default: "
                                                                        "figures/attribution/<run>-<ckpt>-<weights>).")] = None,
    cache: _ACache = _DEFAULT_CACHE, no_cache: _ANoCache = False, family: _AFamily = None, time_convention: _ATime = None,
    trust_checkpoint: _ATrust = False, pdf: _APdf = False, quiet: _AQuiet = False,
) -> None:
    """Captum attribution of a trained linear probe's class logit back to the input patches.

    Example: `probe attribute ckpt.pt --block 4 --t 0.3 --images 0,1,2,3`.
    """
    from analysis.commands import run_attribute

    spec = _spec(data, "test", n_test, label, "mean", seed, batch_size, device, cache, no_cache, family,
                 time_convention, trust_checkpoint, quiet)
    files = run_attribute(ckpt, spec, block=block, t=t, weights=weights, images=_ints(images, "--images"),
                          n_train=n_train, target=target, probe=probe, method=method, n_steps=n_steps, out=out, pdf=pdf)
    typer.echo(f"probe ({probe}) test accuracy at block {block}, t={t:g}: {100 * files['probe']['accuracy']:.1f}%")
    _echo_files(files)


@app.command()
@friendly_errors
def curves(
    run_dir: Annotated[Path, typer.Argument(help="Run folder (with checkpoints/NNNNNNN.pt) or the checkpoints folder.")],
    student_block: Annotated[Optional[int], typer.Option(help="Student block k_s (default: the run's SRA config, "
                                                         "else default_blocks).")] = None,
    teacher_block: Annotated[Optional[int], typer.Option(help="Teacher block k_t (same defaults).")] = None,
    t: Annotated[Optional[float], typer.Option("--t", help="Student time (default SiT 0.5, DiT T/2).")] = None,
    t_teacher: Annotated[Optional[float], typer.Option(help="Teacher time (default t - t_max/2, SRA's mean "
                                                       "shift).")] = None,
    probe: Annotated[str, typer.Option(help="torch | ridge | sklearn | cuml | knn")] = "torch",
    n_train: Annotated[int, typer.Option(help="Train images per probe.")] = 2000,
    n_test: Annotated[int, typer.Option(help="Test images (probe accuracy and CKA).")] = 1000,
    n_div: Annotated[int, typer.Option(help="Images for the token-level diversity terms.")] = 64,
    similarity_weights: Annotated[str, typer.Option(help="Weights for the CKA / diversity curves: ema | model.")] = "ema",
    data: _AData = None, label: _ALabel = "null", seed: _ASeed = 0, batch_size: _ABatch = 256,
    device: _ADevice = "auto",
    out: Annotated[Optional[Path], typer.Option(help="Output folder (default: RUN_DIR/curves).")] = None,
    cache: _ACache = _DEFAULT_CACHE, no_cache: _ANoCache = False, family: _AFamily = None, time_convention: _ATime = None,
    trust_checkpoint: _ATrust = False, pdf: _APdf = False, quiet: _AQuiet = False,
) -> None:
    """Training dynamics: student vs teacher probe accuracy, CKA and diversity for every checkpoint of a run.

    Student = online weights, block k_s, time t; teacher = EMA, block k_t, time t_teacher. Results are
    cached per checkpoint (sha): only checkpoints not yet in curves.csv are computed.

    Examples: `probe curves runs/sit-sra`, `probe curves runs/sit-base --student-block 2 --teacher-block 4`.
    """
    from analysis.dynamics import run_curves

    spec = _spec(data, "test", n_test, label, "mean", seed, batch_size, device, cache, no_cache, family,
                 time_convention, trust_checkpoint, quiet)
    files = run_curves(run_dir, spec, student_block=student_block, teacher_block=teacher_block, t=t,
                       t_teacher=t_teacher, probe=probe, n_train=n_train, n_test=n_test, n_div=n_div,
                       similarity_weights=similarity_weights, out=out, pdf=pdf)
    (ks, ts_), (kt, tt) = files["student"], files["teacher"]
    typer.echo(f"{files['computed']} of {files['checkpoints']} checkpoints computed (others cached); "
               f"student block {ks} @ t={ts_}, teacher block {kt} @ t={tt} ({files['info']['source']})")
    _echo_files(files)
    for _, r in files["table"].iterrows():
        typer.echo(f"  step {int(r['step']):>8}  {r['role']:<7}  {100 * r['accuracy']:5.1f}%")


@app.command()
@friendly_errors
def correlate(
    probe_csv: Annotated[list[Path], typer.Argument(help="Probe table(s): layer_grid.csv or curves.csv (several: "
                                                    "across runs), then the metrics CSV last.")],
    metric: Annotated[str, typer.Option(help="Metrics column, e.g. fd_fashion-mnist, fid, or any column of your "
                                        "CSV (e.g. ADM evaluator numbers).")],
    cell: Annotated[Optional[str], typer.Option(help="Probe cell 'block,t' (needed when a table has several cells "
                                                "per checkpoint).")] = None,
    weights: Annotated[Optional[str], typer.Option(help="Keep only probe rows of these weights (ema | model).")] = None,
    role: Annotated[Optional[str], typer.Option(help="curves.csv: student | teacher.")] = None,
    value: Annotated[str, typer.Option(help="Probe column to correlate (accuracy, or e.g. cka_student_teacher "
                                       "from curves_similarity.csv).")] = "accuracy",
    on: Annotated[str, typer.Option(help="Join key: auto | sha (checkpoint content hash: checkpoint_sha in probe "
                                    "tables, ckpt_sha in probe eval) | checkpoint (path) | step | run.")] = "auto",
    agg: Annotated[Optional[str], typer.Option(help="Reduce several probe rows per checkpoint (max | mean) "
                                               "instead of choosing --cell.")] = None,
    no_control: Annotated[bool, typer.Option("--no-control", help="No partial correlation on training step.")] = False,
    n_boot: Annotated[int, typer.Option(help="Bootstrap resamples for the CIs.")] = 2000,
    out: Annotated[Optional[Path], typer.Option(help="Output folder (default: figures/correlate).")] = Path("figures/correlate"),
    pdf: _APdf = False,
) -> None:
    """Probe quality vs generation quality across checkpoints or runs: correlation.csv, joined.csv, scatter + fit.

    Example: `probe correlate runs/sra/curves/curves.csv runs/sra/eval_metrics.csv --metric fd_fashion-mnist
    --role student`.
    """
    from analysis.commands import run_correlate

    if len(probe_csv) < 2:
        raise ValueError("give the probe table(s) and then the metrics CSV: probe correlate PROBE_CSV METRICS_CSV")
    files = run_correlate(probe_csv[:-1], probe_csv[-1], metric=metric, value=value, cell=cell, weights=weights,
                          role=role, on=on, agg=agg, control_step=not no_control, n_boot=n_boot, out=out, pdf=pdf)
    for w in files["warnings"]:
        typer.echo(f"warning: {w}", err=True)
    tab = files["table"]
    typer.echo(f"joined {len(files['joined'])} checkpoints on {files['join_key']}")
    for _, r in tab.iterrows():
        typer.echo(f"  {r['method']:<17} r={r['r']:+.3f}  95% CI [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]  "
                   f"p={r['p_value']:.3g}")
    _echo_files(files)


@app.command()
@friendly_errors
def demo(
    out: Annotated[Path, typer.Option(help="Study folder: runs/, tables/, cache/, study.json.")] = Path("runs/demo"),
    figures: Annotated[Path, typer.Option(help="Where figures and REPORT.md go.")] = Path("figures"),
    scale: Annotated[str, typer.Option(help="cpu (make demo: 14 min on 2 cores with installation) | smoke (about a minute; the tests) | "
                                       "gpu (SiT-S/2 on one GPU; wall time not yet measured)")] = "cpu",
    device: Annotated[Optional[str], typer.Option(help="Override the scale's device (auto | cpu | cuda).")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
) -> None:
    """The main job: train baseline / SRA / DiverseDiT, probe, analyse, evaluate, and judge claims C1-C7.

    Resumable: finished steps are skipped. Writes every figure and REPORT.md into --figures.
    """
    from analysis.study import SCALES, run_study

    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; use one of {', '.join(SCALES)}")
    report = run_study(out, scale, figures=figures, progress=not quiet,
                       **({"device": device} if device is not None else {}))
    typer.echo(f"report: {report}")


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
