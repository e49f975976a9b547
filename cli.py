"""`probe`: train DiT/SiT models and look inside them. Typer only: parse flags, call, print.

Each command calls one ``commands.<name>.run_<name>`` and prints what it returned. Options that
several commands share are declared once below (``Opt*``), so their names, defaults and help read
the same everywhere; the flags that close every feature command (cache, foreign checkpoints, --pdf,
--overwrite, --quiet) are added by ``@feature_options`` and arrive as one ``FeatureOptions``, which
builds the command's ``FeatureSpec``. Imports of the heavy layers happen inside the commands, so ``probe --help``
stays fast.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from repdyn.core.messages import one_line_warning
from repdyn.probe.cache import DEFAULT_CACHE  # light: numpy and the standard library

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


def _error_line(e: BaseException) -> str:
    """The one line of an expected error. An error re-raised by a DataLoader worker carries the
    worker's traceback in its message: only its last line (the original message) is kept."""
    msg = str(e).strip().strip('"') or type(e).__name__
    if "Original Traceback" in msg:
        last = msg.strip().splitlines()[-1]
        msg = last.split(": ", 1)[1] if ": " in last and last.split(": ", 1)[0].endswith("Error") else last
    return msg


def _not_writable_line(e: OSError) -> str | None:
    """``error: ...`` text for an OSError that says a path cannot be written (read-only file system,
    permission denied), naming the path; None for other OSErrors (those keep their traceback)."""
    from repdyn.core.files import not_writable_reason

    reason = not_writable_reason(e)
    if reason is None:
        return None
    name = e.filename if e.filename is not None else e.filename2
    if name is None:
        return f"cannot write: {reason}; choose a writable --out / --cache location"
    path = Path(os.fsdecode(name))
    if reason == "permission denied" and path.exists() and not os.access(path, os.R_OK):
        return f"cannot read {path}: permission denied"
    if not path.exists() and path.name.startswith(".") and path.suffix in (".tmp", ".lock"):
        path = path.parent  # a temp or lock file beside the output: the folder is what is not writable
    at = path
    while not at.exists() and at != at.parent:
        at = at.parent
    where = "" if at == path else f" at {at}"
    return f"{path} is not writable ({reason}{where}): choose a writable location (--out / --cache) or fix its permissions"


def friendly_errors(fn):
    """Turn expected user errors into `error: ...` on one line and exit code 2 (no traceback): bad
    values and missing files, and paths that cannot be written (read-only folder, permission denied).
    Warnings print as one `warning: ...` line."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            with warnings.catch_warnings():
                warnings.showwarning = one_line_warning
                return fn(*args, **kwargs)
        except (ValueError, FileNotFoundError, KeyError) as e:
            typer.echo(f"error: {_error_line(e)}", err=True)
            raise typer.Exit(code=2) from None
        except OSError as e:  # PermissionError, EROFS: one line naming the path; anything else is a bug
            line = _not_writable_line(e)
            if line is None:
                raise
            typer.echo(f"error: {line}", err=True)
            raise typer.Exit(code=2) from None

    return wrapper


# ----------------------------------------------------------------------------------------------
# Shared options (declared once)
# ----------------------------------------------------------------------------------------------


OptCkpt = Annotated[Path, typer.Argument(help="Checkpoint file (ours, or a published DiT/SiT/REPA/SRA file).")]
OptData = Annotated[Optional[str], typer.Option(help="fashion-mnist | digits | folder:PATH | latents:PATH "
                                                "(default: the checkpoint's dataset, else fashion-mnist).")]
OptWeights = Annotated[str, typer.Option(help="ema | model (online weights).")]
OptBlocks = Annotated[Optional[list[str]], typer.Option(help="1-based blocks: 1,4,8 or 1-6 (default: all).")]
OptTs = Annotated[Optional[list[str]], typer.Option("--t", help="Timesteps in our convention: SiT 0..1 (1 = noise), "
                                                    "e.g. 0,0.3,0.6; DiT 0..999 (999 noisiest), e.g. 0,250,500.")]
OptSplit = Annotated[str, typer.Option(help="train | test (which split's images are analysed).")]
OptLabel = Annotated[str, typer.Option(help="null (no label leakage, default) | class (true labels).")]
OptSeed = Annotated[int, typer.Option(help="Seed of the image subset, the shared noise bank and the held-out cut.")]
OptBatch = Annotated[int, typer.Option(help="Images per forward.")]
OptDevice = Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")]
OptCache = Annotated[Optional[Path], typer.Option(help="Feature cache folder (fp16 cells, shared by every command, "
                                                  "resumable); default: .repdyn_cache/ features.", show_default=False)]
OptNoCache = Annotated[bool, typer.Option("--no-cache", help="Do not read or write the feature cache.")]
OptFamily = Annotated[Optional[str], typer.Option(help="dit | sit, for foreign checkpoints that do not say.")]
OptTime = Annotated[Optional[str], typer.Option(help="flow-t1-noise | flow-t0-noise (foreign SiT).")]
OptNumHeads = Annotated[Optional[int], typer.Option(help="Attention heads, for foreign checkpoints whose width is "
                                                   "outside the official table and whose args do not say.")]
OptTrust = Annotated[bool, typer.Option("--trust-checkpoint", help="Allow pickled objects (official training "
                                        "checkpoints); only for files you trust.")]
_ENCODERS = ("embedded (a small ViT trained once on the dataset, cached) | dinov2-vits14:PATH (vitb14, vitl14, vitg14, "
             "-reg) | timm:NAME:PATH | features:PATH (.npy/.npz/.safetensors). Local files only.")
OptEncoder = Annotated[str, typer.Option(help=_ENCODERS)]
OptAlignMetrics = Annotated[Optional[list[str]], typer.Option(help="cknna, mutual_knn, cycle_knn, unbiased_cka "
                                                              "(default: cknna,mutual_knn).")]
OptTopk = Annotated[int, typer.Option(help="Neighbours of the kNN metrics (platonic-rep: 10).")]
OptFarDist = Annotated[int, typer.Option(help="LDS: distant pairs are >= this many patches apart (iREPA 6).")]
OptDmax = Annotated[int, typer.Option(help="CDS: fit the cosine decay over distances 1..dmax (iREPA 8).")]
OptPdf = Annotated[bool, typer.Option("--pdf", help="Also write every figure as PDF.")]
OptQuiet = Annotated[bool, typer.Option("--quiet", help="No progress bars.")]
OptOverwrite = Annotated[bool, typer.Option("--overwrite", help="Replace results that the output folder (or file) "
                                            "holds for another checkpoint or settings.")]
OptProbe = Annotated[str, typer.Option(help="torch (batched L-BFGS) | ridge (fast screen) | sklearn | cuml | knn")]
OptNTrain = Annotated[int, typer.Option(help="Train images for the probes (fit + held-out L2 choice).")]
OptNTest = Annotated[int, typer.Option(help="Images of the official test split (accuracy).")]

OptMethod = Annotated[Optional[str], typer.Option(help="sde | ode-euler | ode-heun (SiT), ddpm (DiT); default: sde "
                                                  "for SiT, ddpm for DiT.")]
OptSteps = Annotated[int, typer.Option(help="Sampling steps (DDPM: respaced steps out of 1000).")]
OptCfg = Annotated[float, typer.Option(help="Classifier-free guidance scale (1 = none).")]
OptLow = Annotated[float, typer.Option(help="Guide only while t >= this (t normalised, 1 = noise).")]
OptHigh = Annotated[float, typer.Option(help="Guide only while t <= this (REPA/SRA use 0.7).")]
OptLegacy = Annotated[bool, typer.Option("--legacy-cfg", help="Guide only the first 3 channels, "
                                         "as the DiT/SiT repos do.")]
OptLabels = Annotated[Optional[str], typer.Option(help="balanced | random | null | CLASS | comma list.")]
OptSampleSeed = Annotated[int, typer.Option(help="Seed; sample i depends only on (seed, i).")]


def _split_list(values: Optional[list[str]]) -> list[str]:
    """`--blocks 1,2 --blocks 5` -> ["1", "2", "5"] (comma lists and repeats both work)."""
    return [v.strip() for item in values or [] for v in str(item).split(",") if v.strip()]


def _parse_blocks(values: Optional[list[str]]) -> Optional[list[int]]:
    out: list[int] = []
    for v in _split_list(values):
        try:
            if "-" in v.lstrip("-"):
                lo, hi = (int(p) for p in v.split("-", 1))
                if lo > hi:
                    raise ValueError(f"--blocks range {v!r} is reversed or empty; write it low-high, e.g. {hi}-{lo}")
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(v))
        except ValueError as e:
            if "reversed" in str(e):
                raise
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


def _ints(values: Optional[list[str]], flag: str) -> Optional[list[int]]:
    try:
        return [int(v) for v in _split_list(values)] or None
    except ValueError:
        raise ValueError(f"{flag} expects integers, e.g. 0,5,9") from None


@dataclass
class FeatureOptions:
    """The options that close every feature command, in this order: the feature cache, how a foreign
    checkpoint is read, and what is written (``--pdf``, ``--overwrite``) and shown (``--quiet``)."""

    cache: Optional[Path]
    no_cache: bool
    family: Optional[str]
    time_convention: Optional[str]
    num_heads: Optional[int]
    trust_checkpoint: bool
    pdf: bool = False
    overwrite: bool = False
    quiet: bool = False

    def spec(self, *, data: Optional[str], split: str, n: int, label: str, pooling: str, seed: int, batch_size: int,
             device: str) -> Any:
        """The :class:`repdyn.commands.features.FeatureSpec` of these options and the command's own."""
        from repdyn.commands.features import FeatureSpec

        return FeatureSpec(data=data, split=split, n=n, label=label, pooling=pooling, seed=seed, batch_size=batch_size,
                           device=device, cache_dir=None if self.no_cache else self.cache, family=self.family,
                           time_convention=self.time_convention, num_heads=self.num_heads, trust=self.trust_checkpoint,
                           progress=not self.quiet)


# (name, option, default) of FeatureOptions' flags, in the order --help lists them
_FEATURE_TAIL = (("cache", OptCache, DEFAULT_CACHE), ("no_cache", OptNoCache, False), ("family", OptFamily, None),
                 ("time_convention", OptTime, None), ("num_heads", OptNumHeads, None),
                 ("trust_checkpoint", OptTrust, False), ("pdf", OptPdf, False), ("overwrite", OptOverwrite, False),
                 ("quiet", OptQuiet, False))


def feature_options(*, pdf: bool = True, overwrite: bool = True):
    """Close a command's options with :class:`FeatureOptions`' flags (``pdf`` / ``overwrite``: whether it
    has those two) and hand them to it as one keyword argument ``opts``, so every feature command
    declares them once and in the same order."""
    tail = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default, annotation=option)
            for name, option, default in _FEATURE_TAIL
            if (name != "pdf" or pdf) and (name != "overwrite" or overwrite)]

    def decorate(fn):
        sig = inspect.signature(fn, eval_str=True)
        own = [p for p in sig.parameters.values() if p.name != "opts"]

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            opts = FeatureOptions(**{p.name: kwargs.pop(p.name) for p in tail})
            return fn(*args, opts=opts, **kwargs)

        params = [*own, *tail]
        wrapper.__signature__ = sig.replace(parameters=params)  # what typer reads: the flags, in order
        wrapper.__annotations__ = {**{p.name: p.annotation for p in params}, "return": sig.return_annotation}
        return wrapper

    return decorate


def _sampler(method, steps, cfg_scale, guidance_low, guidance_high, legacy_cfg, labels, seed, batch_size):
    from repdyn.commands.sample import SamplerSettings
    from repdyn.evaluation.evaluate import parse_labels

    return SamplerSettings(method=method, steps=steps, cfg_scale=cfg_scale,
                           guidance_interval=(guidance_low, guidance_high), legacy_cfg_channels=legacy_cfg,
                           labels=parse_labels(labels), seed=seed, batch_size=batch_size)


def _echo_notes(notes: list[str]) -> None:
    """What the checkpoint loader ignored or inferred (also recorded with the results)."""
    for note in notes:
        typer.echo(f"note: {note}", err=True)


def _echo_files(res: Any) -> None:
    _echo_notes(getattr(res, "notes", []))
    typer.echo(f"{'folder:':<15} {res.out}")
    for k, v in res.files.items():
        typer.echo(f"{k + ':':<15} {v}")


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
    method: Annotated[Optional[str], typer.Option(help="baseline | sra | repa | diverse, or parts joined by + "
                                                  "(sra+diverse, repa+diverse, sra+repa, sra+repa+diverse).")] = None,
    encoder: Annotated[Optional[str], typer.Option(help="REPA's encoder(s), comma-separated: embedded (default: "
                                                   "the dataset's small ViT) | dinov2-vitb14:PATH | timm:NAME:PATH | "
                                                   "features:PATH (tokens by dataset index; the route on latents). "
                                                   "Same as --set repa.encoder=...")] = None,
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
    resume: Annotated[Optional[Path], typer.Option(help="Run folder, or a checkpoint in <run>/checkpoints/, to resume that run from "
                                                  "(exact); a checkpoint elsewhere needs --out (a new run from it: "
                                                  "a published DiT/SiT/REPA/SRA file is fine-tuned).")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override any field: --set sra.teacher_block=5 "
                                                      "--set model_overrides.depth=4 (repeatable).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Start the run folder afresh (its checkpoints and "
                                            "records removed); with --resume of an older checkpoint, discard the "
                                            "later ones.")] = False,
    family: OptFamily = None, num_heads: OptNumHeads = None, trust_checkpoint: OptTrust = False,
    quiet: OptQuiet = False,
) -> None:
    """Train a DiT or SiT (baseline, +SRA, +REPA, +DiverseDiT or combinations); writes checkpoints and metrics.

    Examples: `probe train --preset sit-tiny --out runs/sit`,
    `probe train --preset dit-tiny --method sra --steps 3000`,
    `probe train --preset sit-tiny --method repa+diverse` (REPA to the embedded encoder),
    `probe train --resume exps/repa/checkpoints/0400000.pt --out runs/ft --method repa --encoder
    dinov2-vitb14:PATH --data folder:PATH --trust-checkpoint` (an official REPA checkpoint, with its
    projectors),
    `probe train --resume SiT-XL-2-256.pt --out runs/ft --data latents:PATH --method sra` (fine-tune),
    `torchrun --nproc_per_node 8 -m repdyn train --preset sit-b2-imagenet --method sra`.
    """
    from repdyn.commands.train import run_train

    flags = dict(model=model, data=data, method=method, steps=steps, out=out, batch_size=batch_size, lr=lr,
                 ema_decay=ema_decay, precision=precision, ckpt_every=ckpt_every, seed=seed, device=device,
                 compile=compile, repa={"encoder": encoder} if encoder is not None else None)
    res = run_train(preset, config, flags, set_, resume=resume, quiet=quiet, overwrite=overwrite, family=family,
                    num_heads=num_heads, trust=trust_checkpoint)
    if res.checkpoint is not None:
        typer.echo(f"checkpoint: {res.checkpoint}\nmetrics:    {res.metrics}")


# ----------------------------------------------------------------------------------------------
# layer-grid
# ----------------------------------------------------------------------------------------------


@app.command("layer-grid")
@friendly_errors
@feature_options(pdf=False)
def layer_grid(
    ckpt: OptCkpt, data: OptData = None,
    blocks: Annotated[Optional[list[str]], typer.Option(help="Blocks: 1,4,8 or 0-6 (0 = the input embedding, the "
                                                        "profile's floor; default: 0 and every block).")] = None, t: OptTs = None, weights: OptWeights = "ema",
    label: OptLabel = "null", probe: OptProbe = "torch",
    pooling: Annotated[str, typer.Option(help="mean | tokens (tokens as samples) | spatialK (e.g. spatial2).")] = "mean",
    n_train: OptNTrain = 2000, n_test: OptNTest = 1000, seed: OptSeed = 0, batch_size: OptBatch = 256,
    device: OptDevice = "auto",
    out: Annotated[Optional[Path], typer.Option(help="Output folder (default: under layer_grid/, named by run, "
                                                "checkpoint, its hash, weights, label, probe and a hash of the "
                                                "settings).")] = None,
    *, opts: FeatureOptions,
) -> None:
    """Linear-probe accuracy for every (block, t) cell: writes layer_grid.csv, a heatmap PNG and the protocol.

    Default t: SiT 0..0.9 step 0.1, DiT 0..900 step 100.
    Examples: `probe layer-grid runs/sit/checkpoints/0001500.pt`,
    `probe layer-grid ckpt.pt --blocks 1-6 --t 0,0.2,0.5 --weights model --label class --probe ridge`,
    `torchrun --nproc_per_node 4 -m repdyn layer-grid SiT-XL-2-256.pt --family sit --data latents:data/in256`.
    """
    from repdyn.commands.layer_grid import run_layer_grid
    from repdyn.probe.layer_grid import summarize

    spec = opts.spec(data=data, split="test", n=n_test, label=label, pooling=pooling, seed=seed, batch_size=batch_size,
                     device=device)
    res = run_layer_grid(ckpt, spec, weights=weights, blocks=_parse_blocks(blocks), ts=_parse_ts(t), probe=probe,
                         n_train=n_train, out=out, overwrite=opts.overwrite)
    if res.csv is None:  # a non-zero torchrun rank
        return
    _echo_notes(res.notes)
    typer.echo(summarize(res.table))
    typer.echo(f"folder:   {res.csv.parent}\ntable:    {res.csv}\nheatmap:  {res.png}\nprotocol: {res.protocol}")


# ----------------------------------------------------------------------------------------------
# sample, eval
# ----------------------------------------------------------------------------------------------


@app.command()
@friendly_errors
def sample(
    ckpt: OptCkpt,
    out: Annotated[Path, typer.Option(help="PNG grid to write.")] = Path("samples.png"),
    npz: Annotated[Optional[Path], typer.Option(help="Also write an ADM-evaluator .npz (arr_0 uint8 NHWC, arr_1 labels).")] = None,
    n: Annotated[int, typer.Option(help="Number of samples.")] = 64,
    method: OptMethod = None, steps: OptSteps = 50, cfg_scale: OptCfg = 1.0, guidance_low: OptLow = 0.0,
    guidance_high: OptHigh = 1.0, legacy_cfg: OptLegacy = False, labels: OptLabels = None, seed: OptSampleSeed = 0,
    batch_size: Annotated[int, typer.Option(help="Samples per forward batch.")] = 64, device: OptDevice = "auto",
    weights: OptWeights = "ema", family: OptFamily = None, time_convention: OptTime = None,
    num_heads: OptNumHeads = None, trust_checkpoint: OptTrust = False,
    vae: Annotated[Optional[Path], typer.Option(help="Local AutoencoderKL folder that decodes a latent checkpoint's "
                                                "samples (e.g. a copy of sd-vae-ft-ema).")] = None,
    overwrite: OptOverwrite = False, quiet: OptQuiet = False,
) -> None:
    """Sample from a checkpoint: a PNG grid and optionally an ADM .npz (latent models: decoded with --vae).

    Example: `probe sample runs/sit/checkpoints/0005000.pt --n 64 --method sde --steps 250 --cfg-scale 1.8
    --guidance-high 0.7 --npz samples.npz`.
    """
    from repdyn.commands.sample import run_sample
    from repdyn.core.runtime import resolve_device

    res = run_sample(ckpt, out, n=n, npz=npz, weights=weights, family=family, trust=trust_checkpoint,
                     sampler=_sampler(method, steps, cfg_scale, guidance_low, guidance_high, legacy_cfg, labels, seed,
                                      batch_size),
                     device=str(resolve_device(device)), progress=not quiet, overwrite=overwrite, vae=vae,
                     num_heads=num_heads, time_convention=time_convention)
    _echo_notes(res.notes)
    typer.echo(f"{res.n} samples ({res.method}, {res.steps} steps) -> {res.grid}" + (f", {res.npz}" if res.npz else ""))


@app.command(name="eval")
@friendly_errors
def eval_(
    ckpts: Annotated[list[Path], typer.Argument(help="Checkpoint file(s); each gets one row.")],
    metrics_csv: Annotated[Optional[Path], typer.Option(help="Metrics table to append to (default: "
                                                        "eval_metrics.csv in the run folder).")] = None,
    n: Annotated[int, typer.Option(help="Number of generated samples.")] = 1000,
    data: Annotated[Optional[str], typer.Option(help="Dataset for reference statistics (default: the checkpoint's).")] = None,
    inception_weights: Annotated[Optional[Path], typer.Option(help="torch-fidelity's Inception weights "
                                                              "file (its name is in the README): adds FID, IS, KID, "
                                                              "precision/recall.")] = None,
    n_ref: Annotated[Optional[int], typer.Option(help="Real images for the Inception metrics (default: n).")] = None,
    offline: Annotated[bool, typer.Option("--offline-metrics/--no-offline-metrics", help="fd_<data> and "
                                          "cond_acc_<data> from the project's cached dataset classifier.")] = True,
    npz: Annotated[Optional[Path], typer.Option(help="Also write the samples as an ADM .npz (one checkpoint only).")] = None,
    method: OptMethod = None, steps: OptSteps = 50, cfg_scale: OptCfg = 1.0, guidance_low: OptLow = 0.0,
    guidance_high: OptHigh = 1.0, legacy_cfg: OptLegacy = False, labels: OptLabels = None, seed: OptSampleSeed = 0,
    batch_size: Annotated[int, typer.Option(help="Samples per forward batch.")] = 64, device: OptDevice = "auto",
    vae: Annotated[Optional[Path], typer.Option(help="Local AutoencoderKL folder: decodes a latent model's samples "
                                                "for --npz and the Inception metrics.")] = None,
    ref: Annotated[Optional[Path], typer.Option(help="Reference images for the Inception metrics: an ADM evaluator "
                                                ".npz (arr_0 reference batch) or an image folder (default: the "
                                                "dataset's train split; latent models need one).")] = None,
    weights: OptWeights = "ema", family: OptFamily = None, time_convention: OptTime = None,
    num_heads: OptNumHeads = None, trust_checkpoint: OptTrust = False, quiet: OptQuiet = False,
) -> None:
    """Generation metrics for checkpoint(s), one CSV row each, keyed by checkpoint and sampler settings.

    Always (offline): fd_<data> and cond_acc_<data>, in the feature space of a small classifier the
    project trains once per dataset (not FID). With --inception-weights: FID, IS, KID, precision/recall
    against --ref. Latent models: --vae decodes. Under torchrun the samples are drawn in shards.
    Example: `torchrun --nproc_per_node 8 -m repdyn eval ckpt.pt --n 50000 --vae sd-vae-ft-ema --ref
    VIRTUAL_imagenet256_labeled.npz --inception-weights weights-inception-2015-12-05-6726825d.pth`.
    """
    from repdyn.commands.eval import run_eval
    from repdyn.core.runtime import resolve_device

    if npz is not None and len(ckpts) > 1:
        raise ValueError("--npz takes one checkpoint; run probe eval once per checkpoint to export samples")
    sampler = _sampler(method, steps, cfg_scale, guidance_low, guidance_high, legacy_cfg, labels, seed, batch_size)
    for ckpt in ckpts:
        row = run_eval(ckpt, metrics_csv, weights=weights, family=family, trust=trust_checkpoint, sampler=sampler, n=n,
                       device=str(resolve_device(device)), data=data, inception_weights=inception_weights, n_ref=n_ref,
                       offline=offline, npz_path=npz, progress=not quiet, log=lambda m: typer.echo(m, err=True),
                       vae=vae, reference=ref, num_heads=num_heads, time_convention=time_convention)
        if not row:  # a non-zero torchrun rank: rank 0 reports
            continue
        _echo_notes(row.get("load_notes", []))
        shown = {k: v for k, v in row.items() if k.startswith(("fd_", "cond_acc_")) or k in ("fid", "is", "kid",
                                                                                               "precision", "recall")}
        typer.echo(f"{Path(ckpt).name} step {row['step']}: "
                   + ", ".join(f"{k}={v:.4g}" for k, v in shown.items()) + f" -> {row['metrics_csv']}")


@app.command()
@friendly_errors
def encode(
    src: Annotated[Path, typer.Argument(help="Image folder: SRC/<class>/<image>, or SRC/train/... and SRC/val/... "
                                        "(ImageNet layout).")],
    out: Annotated[Path, typer.Option(help="Latents folder (read back with --data latents:OUT).")],
    vae: Annotated[Path, typer.Option(help="Local AutoencoderKL folder (config.json + weights), e.g. a copy of "
                                      "stabilityai/sd-vae-ft-ema.")],
    resolution: Annotated[int, typer.Option(help="ADM centre crop size in pixels (256 or 512 in the papers).")] = 256,
    flip: Annotated[bool, typer.Option("--flip", help="Also store a horizontally flipped copy of every image.")] = False,
    images: Annotated[bool, typer.Option("--images", help="Also write the centre-cropped images to OUT/images/ "
                                         "(REPA's layout: its image encoder reads them).")] = False,
    batch_size: Annotated[int, typer.Option(help="Images per VAE forward.")] = 32,
    device: OptDevice = "auto", quiet: OptQuiet = False,
) -> None:
    """Encode images to SD-VAE latents in the REPA/SRA layout (vae-sd/*.npy moments + dataset.json).

    Resumable (finished files are skipped); shards over ranks under torchrun.
    Example: `probe encode data/imagenet --out data/in256 --vae weights/sd-vae-ft-ema --resolution 256`.
    """
    from repdyn.commands.encode import run_encode

    res = run_encode(src, out, vae, resolution=resolution, flip=flip, images=images, batch_size=batch_size,
                     device=device,
                     progress=not quiet)
    if res.rank != 0:
        return
    for folder, n in res.splits.items():
        typer.echo(f"{n:>8} latents in {folder}")
    typer.echo(f"encoded {res.encoded} (others existed); use --data latents:{res.out}")


# ----------------------------------------------------------------------------------------------
# similarity, diversity, pca, umap, align, spatial, attribute, curves, correlate
# ----------------------------------------------------------------------------------------------


def _out_opt(kind: str):
    return Annotated[Optional[Path], typer.Option(help=f"Output folder (default: under figures/{kind}/, named by "
                                                  "run, checkpoint, its hash, weights and a hash of the settings).")]


OutSimilarity, OutDiversity, OutPca, OutUmap, OutAttribution, OutAlign, OutSpatial = (
    _out_opt(k) for k in ("similarity", "diversity", "pca", "umap", "attribution", "align", "spatial"))


@app.command()
@friendly_errors
@feature_options()
def similarity(
    ckpt: OptCkpt,
    other: Annotated[Optional[Path], typer.Option(help="Second checkpoint for a cross-model matrix (checkpoint i "
                                                  "vs j, SRA vs baseline).")] = None,
    other_weights: Annotated[Optional[str], typer.Option(help="Weights of the second model (default: --weights); "
                                                         "--weights ema --other-weights model = teacher EMA vs "
                                                         "student online.")] = None,
    weights: OptWeights = "ema", blocks: OptBlocks = None, t: OptTs = None,
    n: Annotated[int, typer.Option(help="Images (rows of every cell; debiased CKA needs >= 4).")] = 512,
    biased: Annotated[bool, typer.Option("--biased", help="Plug-in (biased) CKA instead of the debiased one.")] = False,
    cka_method: Annotated[str, typer.Option(help="auto | gram | minibatch | feature (see cka_matrix).")] = "auto",
    data: OptData = None, split: OptSplit = "test", label: OptLabel = "null", seed: OptSeed = 0,
    batch_size: OptBatch = 256, device: OptDevice = "auto", out: OutSimilarity = None,
    *, opts: FeatureOptions,
) -> None:
    """CKA + cosine over the (block, t) grid: cka.csv/.npz, full-grid, block x block and t x t heatmaps.

    Examples: `probe similarity ckpt.pt --t 0.1,0.5,0.9`,
    `probe similarity ckpt.pt --weights ema --other-weights model` (teacher EMA vs student online),
    `probe similarity runs/sra/checkpoints/0004000.pt --other runs/base/checkpoints/0004000.pt`.
    """
    from repdyn.commands.similarity import run_similarity

    spec = opts.spec(data=data, split=split, n=n, label=label, pooling="mean", seed=seed, batch_size=batch_size,
                     device=device)
    _echo_files(run_similarity(ckpt, spec, weights=weights, other=other, other_weights=other_weights,
                               blocks=_parse_blocks(blocks), ts=_parse_ts(t), debiased=not biased, method=cka_method,
                               out=out, pdf=opts.pdf, overwrite=opts.overwrite))


@app.command()
@friendly_errors
@feature_options()
def diversity(
    ckpt: OptCkpt, weights: OptWeights = "ema", blocks: OptBlocks = None, t: OptTs = None,
    n: Annotated[int, typer.Option(help="Images (token features: keep it modest).")] = 128,
    pooling: Annotated[str, typer.Option(help="tokens (DiverseDiT's definition) | mean (per-image terms).")] = "tokens",
    data: OptData = None, split: OptSplit = "test", label: OptLabel = "null", seed: OptSeed = 0,
    batch_size: OptBatch = 64, device: OptDevice = "auto", out: OutDiversity = None,
    *, opts: FeatureOptions,
) -> None:
    """DiverseDiT's three terms for every block pair and t: diversity.csv, dispersion.csv, figures.

    Example: `probe diversity ckpt.pt --t 0.1,0.5,0.9 --n 128`.
    """
    from repdyn.commands.diversity import run_diversity

    spec = opts.spec(data=data, split=split, n=n, label=label, pooling=pooling, seed=seed, batch_size=batch_size,
                     device=device)
    _echo_files(run_diversity(ckpt, spec, weights=weights, blocks=_parse_blocks(blocks), ts=_parse_ts(t), out=out,
                              pdf=opts.pdf, overwrite=opts.overwrite))


@app.command()
@friendly_errors
@feature_options()
def pca(
    ckpt: OptCkpt, weights: OptWeights = "ema",
    images: Annotated[Optional[list[str]], typer.Option(help="Row indices of --split shown side by side "
                                                        "(default 0,1,2,3).")] = None,
    blocks: Annotated[Optional[list[str]], typer.Option(help="1-based blocks (default: all, or 7 spread over a "
                                                        "deep model).")] = None,
    t: Annotated[Optional[list[str]], typer.Option("--t", help="Timesteps (default SiT 0.1,0.3,0.5,0.7 as SRA; "
                                                   "DiT 100,300,500,700).")] = None,
    basis: Annotated[str, typer.Option(help="shared (one basis + colour scale per block across t) | per_cell "
                                       "(SRA's per-cell PCA).")] = "shared",
    data: OptData = None, split: OptSplit = "test", label: OptLabel = "null", seed: OptSeed = 0,
    batch_size: OptBatch = 64, device: OptDevice = "auto", out: OutPca = None,
    *, opts: FeatureOptions,
) -> None:
    """Patch-token PCA as RGB maps (rows = blocks, columns = t), several images side by side: pca.png, pca.npz.

    Example: `probe pca ckpt.pt --images 0,7,42 --t 0.1,0.3,0.5,0.7`.
    """
    from repdyn.commands.pca import run_pca

    spec = opts.spec(data=data, split=split, n=0, label=label, pooling="tokens", seed=seed, batch_size=batch_size,
                     device=device)
    _echo_files(run_pca(ckpt, spec, weights=weights, images=_ints(images, "--images"), blocks=_parse_blocks(blocks),
                        ts=_parse_ts(t), basis=basis, out=out, pdf=opts.pdf, overwrite=opts.overwrite))


@app.command()
@friendly_errors
@feature_options()
def umap(
    ckpt: OptCkpt, weights: OptWeights = "ema",
    cell: Annotated[Optional[list[str]], typer.Option(help="A (block,t) cell, e.g. --cell 4,0.5 (repeatable).")] = None,
    aligned_block: Annotated[Optional[int], typer.Option(help="AlignedUMAP of this block across --t.")] = None,
    t: Annotated[Optional[list[str]], typer.Option("--t", help="Timesteps of the aligned UMAP (default SiT "
                                                   "0.1,0.3,0.5,0.7; DiT 100..700).")] = None,
    n: Annotated[int, typer.Option(help="Images (points per panel).")] = 1000,
    n_neighbors: Annotated[int, typer.Option(help="UMAP n_neighbors.")] = 15,
    min_dist: Annotated[float, typer.Option(help="UMAP min_dist.")] = 0.1,
    umap_seed: Annotated[Optional[int], typer.Option(help="UMAP random_state (seeded = single-threaded).")] = 0,
    data: OptData = None, split: OptSplit = "test", label: OptLabel = "null", seed: OptSeed = 0,
    batch_size: OptBatch = 256, device: OptDevice = "auto", out: OutUmap = None,
    *, opts: FeatureOptions,
) -> None:
    """UMAP of mean-pooled features for chosen cells, and AlignedUMAP across t for one block.

    Examples: `probe umap ckpt.pt --cell 2,0.1 --cell 2,0.5 --cell 6,0.5`,
    `probe umap ckpt.pt --aligned-block 4 --t 0.1,0.3,0.5,0.7`.
    """
    from repdyn.commands.umap import run_umap

    spec = opts.spec(data=data, split=split, n=n, label=label, pooling="mean", seed=seed, batch_size=batch_size,
                     device=device)
    cells = [c.strip() for v in cell or [] for c in str(v).split(";") if c.strip()]  # also "4:0.5;6:0.3"
    _echo_files(run_umap(ckpt, spec, weights=weights, cells=cells, aligned_block=aligned_block, ts=_parse_ts(t),
                         n_neighbors=n_neighbors, min_dist=min_dist, umap_seed=umap_seed, out=out, pdf=opts.pdf,
                         overwrite=opts.overwrite))


@app.command()
@friendly_errors
@feature_options()
def align(
    ckpt: OptCkpt,
    encoder: OptEncoder = "embedded",
    weights: OptWeights = "ema", blocks: OptBlocks = None, t: OptTs = None,
    n: Annotated[int, typer.Option(help="Images (rows of every cell; more than --topk).")] = 512,
    tokens: Annotated[bool, typer.Option("--tokens", help="Each image is its patch tokens concatenated (cells and "
                                         "encoder) instead of mean-pooled cells vs the encoder's pooled "
                                         "vector.")] = False,
    metrics: OptAlignMetrics = None, topk: OptTopk = 10,
    data: OptData = None, split: OptSplit = "test", label: OptLabel = "null", seed: OptSeed = 0,
    batch_size: OptBatch = 256, device: OptDevice = "auto", out: OutAlign = None,
    *, opts: FeatureOptions,
) -> None:
    """kNN alignment (CKNNA, mutual kNN) of every (block, t) cell with an external encoder: alignment.csv/.png.

    Examples: `probe align ckpt.pt --t 0.1,0.5,0.9`,
    `probe align ckpt.pt --encoder dinov2-vits14:weights/dinov2_vits14_pretrain.pth --metrics cknna`.
    """
    from repdyn.commands.align import run_align

    spec = opts.spec(data=data, split=split, n=n, label=label, pooling="tokens" if tokens else "mean", seed=seed,
                     batch_size=batch_size, device=device)
    _echo_files(run_align(ckpt, spec, encoder=encoder, weights=weights, blocks=_parse_blocks(blocks), ts=_parse_ts(t),
                          metrics=metrics, topk=topk, out=out, pdf=opts.pdf, overwrite=opts.overwrite))


@app.command()
@friendly_errors
@feature_options()
def spatial(
    ckpt: OptCkpt, weights: OptWeights = "ema", blocks: OptBlocks = None, t: OptTs = None,
    n: Annotated[int, typer.Option(help="Images (token features: keep it modest).")] = 128,
    far_dist: OptFarDist = 6, dmax: OptDmax = 8,
    data: OptData = None, split: OptSplit = "test", label: OptLabel = "null", seed: OptSeed = 0,
    batch_size: OptBatch = 64, device: OptDevice = "auto", out: OutSpatial = None,
    *, opts: FeatureOptions,
) -> None:
    """Spatial structure of patch tokens (iREPA LDS, CDS, RMSC) per (block, t) cell: spatial.csv/.png.

    Example: `probe spatial ckpt.pt --t 0.1,0.5,0.9 --n 128`.
    """
    from repdyn.commands.spatial import run_spatial

    spec = opts.spec(data=data, split=split, n=n, label=label, pooling="tokens", seed=seed, batch_size=batch_size,
                     device=device)
    _echo_files(run_spatial(ckpt, spec, weights=weights, blocks=_parse_blocks(blocks), ts=_parse_ts(t),
                            far_dist=far_dist, dmax=dmax, out=out, pdf=opts.pdf, overwrite=opts.overwrite))


@app.command()
@friendly_errors
@feature_options()
def attribute(
    ckpt: OptCkpt,
    block: Annotated[int, typer.Option(help="1-based block whose probe is attributed.")],
    t: Annotated[float, typer.Option("--t", help="Timestep of the cell (our convention).")],
    weights: OptWeights = "ema",
    images: Annotated[Optional[list[str]], typer.Option(help="Test rows to attribute (default 0..5).")] = None,
    target: Annotated[str, typer.Option(help="label (true class logit) | pred (the probe's prediction).")] = "label",
    method: Annotated[str, typer.Option(help="integrated_gradients | saliency | input_x_gradient")] = "integrated_gradients",
    n_steps: Annotated[int, typer.Option(help="Integrated-gradients steps.")] = 32,
    probe: Annotated[str, typer.Option(help="torch (L-BFGS logistic, the layer-grid default) | ridge.")] = "torch",
    n_train: OptNTrain = 2000, n_test: OptNTest = 1000,
    data: OptData = None, label: OptLabel = "null", seed: OptSeed = 0, batch_size: OptBatch = 256,
    device: OptDevice = "auto", out: OutAttribution = None,
    *, opts: FeatureOptions,
) -> None:
    """Captum attribution of a trained linear probe's class logit back to the input patches.

    Example: `probe attribute ckpt.pt --block 4 --t 0.3 --images 0,1,2,3`.
    """
    from repdyn.commands.attribute import run_attribute

    spec = opts.spec(data=data, split="test", n=n_test, label=label, pooling="mean", seed=seed, batch_size=batch_size,
                     device=device)
    res = run_attribute(ckpt, spec, block=block, t=t, weights=weights, images=_ints(images, "--images"),
                        n_train=n_train, target=target, probe=probe, method=method, n_steps=n_steps, out=out,
                        pdf=opts.pdf, overwrite=opts.overwrite)
    typer.echo(f"probe ({probe}) test accuracy at block {block}, t={t:g}: {100 * res.probe.accuracy:.1f}%")
    _echo_files(res)


@app.command()
@friendly_errors
@feature_options(overwrite=False)
def curves(
    run_dir: Annotated[Path, typer.Argument(help="Run folder (with checkpoints/NNNNNNN.pt) or the checkpoints folder.")],
    student_block: Annotated[Optional[int], typer.Option(help="Student block k_s (default: the run's SRA config, "
                                                         "else default_blocks).")] = None,
    teacher_block: Annotated[Optional[int], typer.Option(help="Teacher block k_t (same defaults).")] = None,
    t: Annotated[Optional[float], typer.Option("--t", help="Student time (default SiT 0.5, DiT T/2).")] = None,
    t_teacher: Annotated[Optional[float], typer.Option(help="Teacher time (default t - t_max/2, SRA's mean "
                                                       "shift).")] = None,
    probe: OptProbe = "torch", n_train: OptNTrain = 2000,
    n_test: Annotated[int, typer.Option(help="Test images (probe accuracy and CKA).")] = 1000,
    n_div: Annotated[int, typer.Option(help="Images for the token-level diversity terms.")] = 64,
    similarity_weights: Annotated[str, typer.Option(help="Weights for the CKA / diversity curves: ema | model.")] = "ema",
    encoder: Annotated[str, typer.Option(help="Every block's alignment over training with this encoder: auto (the "
                                         "embedded one for image data, none for latents) | none | any "
                                         "--encoder of probe align.")] = "auto",
    metrics: OptAlignMetrics = None, topk: OptTopk = 10,
    spatial: Annotated[bool, typer.Option("--spatial/--no-spatial", help="Every block's LDS / CDS / RMSC over "
                                          "training (tokens of --n-div images).")] = True,
    far_dist: OptFarDist = 6, dmax: OptDmax = 8,
    data: OptData = None, label: OptLabel = "null", seed: OptSeed = 0, batch_size: OptBatch = 256,
    device: OptDevice = "auto",
    out: Annotated[Optional[Path], typer.Option(help="Output folder (default: RUN_DIR/curves).")] = None,
    *, opts: FeatureOptions,
) -> None:
    """Training dynamics: student vs teacher probe accuracy, CKA, diversity, and every block's alignment with an
    encoder and spatial structure, for every checkpoint of a run.

    Student = online weights, block k_s, time t; teacher = EMA, block k_t, time t_teacher; every block at t on
    the --similarity-weights. Results are cached per checkpoint (sha): only what is missing is computed.

    Examples: `probe curves runs/sit-sra`, `probe curves runs/sit-base --student-block 2 --teacher-block 4`.
    """
    from repdyn.commands.curves import run_curves

    spec = opts.spec(data=data, split="test", n=n_test, label=label, pooling="mean", seed=seed, batch_size=batch_size,
                     device=device)
    res = run_curves(run_dir, spec, student_block=student_block, teacher_block=teacher_block, t=t, t_teacher=t_teacher,
                     probe=probe, n_train=n_train, n_test=n_test, n_div=n_div, similarity_weights=similarity_weights,
                     encoder=encoder, align_metrics=metrics, topk=topk, spatial=spatial, far_dist=far_dist, dmax=dmax,
                     out=out, pdf=opts.pdf)
    (ks, ts_), (kt, tt) = res.student, res.teacher
    typer.echo(f"{res.computed} of {res.checkpoints} checkpoints computed (others cached); "
               f"student block {ks} @ t={ts_}, teacher block {kt} @ t={tt} ({res.source})")
    _echo_files(res)
    for _, r in res.table.iterrows():
        typer.echo(f"  step {int(r['step']):>8}  {r['role']:<7}  {100 * r['accuracy']:5.1f}%")


@app.command()
@friendly_errors
def correlate(
    probe_csv: Annotated[list[Path], typer.Argument(help="Measure table(s): layer_grid.csv, curves.csv, "
                                                    "curves_similarity.csv, curves_blocks.csv, alignment.csv or "
                                                    "spatial.csv (several: across runs), then the metrics CSV last.")],
    metric: Annotated[str, typer.Option(help="Metrics column, e.g. fd_fashion-mnist, fid, or any column of your "
                                        "CSV (e.g. ADM evaluator numbers).")],
    cell: Annotated[Optional[str], typer.Option(help="Probe cell 'block,t' (needed when a table has several cells "
                                                "per checkpoint).")] = None,
    weights: Annotated[Optional[str], typer.Option(help="Keep only probe rows of these weights (ema | model).")] = None,
    role: Annotated[Optional[str], typer.Option(help="curves.csv: student | teacher.")] = None,
    value: Annotated[str, typer.Option(help="The representation measure: a column (accuracy, cka_student_teacher) "
                                       "or a measure of a tidy table (cknna, mutual_knn, lds, cds, rmsc).")] = "accuracy",
    on: Annotated[str, typer.Option(help="Join key: auto | sha (checkpoint content hash: checkpoint_sha in probe "
                                    "tables, ckpt_sha in probe eval) | checkpoint (path) | step | run.")] = "auto",
    agg: Annotated[Optional[str], typer.Option(help="Reduce several probe rows per checkpoint (max | mean) "
                                               "instead of choosing --cell.")] = None,
    no_control: Annotated[bool, typer.Option("--no-control", help="No partial correlation on training step.")] = False,
    n_boot: Annotated[int, typer.Option(help="Bootstrap resamples for the CIs.")] = 2000,
    boot_unit: Annotated[str, typer.Option(help="What the bootstrap resamples: auto (runs when there are several, "
                                           "else checkpoints, with a warning) | run | seed | checkpoint.")] = "auto",
    settings_hash: Annotated[Optional[str], typer.Option(help="Keep only rows of these settings (curves tables "
                                                         "hold every settings' rows).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Output folder (default: figures/correlate/<metric>-<hash of "
                                                "the inputs and options>).")] = None,
    overwrite: OptOverwrite = False,
    pdf: OptPdf = False,
) -> None:
    """Any representation measure vs generation quality across checkpoints or runs: correlation.csv, joined.csv,
    scatter + fit. Intervals resample runs (or seeds), not the checkpoints of one run.

    Examples: `probe correlate runs/sra/curves/curves.csv runs/sra/eval_metrics.csv --metric fd_fashion-mnist
    --role student`; `probe correlate runs/*/curves/curves_blocks.csv all_eval.csv --metric fd_fashion-mnist
    --value cknna --cell 4,0.5 --boot-unit seed`.
    """
    from repdyn.commands.correlate import run_correlate

    if len(probe_csv) < 2:
        raise ValueError("give the probe table(s) and then the metrics CSV: probe correlate PROBE_CSV METRICS_CSV")
    res = run_correlate(probe_csv[:-1], probe_csv[-1], metric=metric, value=value, cell=cell, weights=weights,
                        role=role, on=on, agg=agg, control_step=not no_control, n_boot=n_boot, boot_unit=boot_unit,
                        settings_hash=settings_hash, out=out, pdf=pdf, overwrite=overwrite)
    for w in res.warnings:
        typer.echo(f"warning: {w}", err=True)
    typer.echo(f"joined {len(res.joined)} checkpoints on {res.join_key}; intervals: bootstrap over "
               f"{res.table['boot_unit'].iloc[0]}")
    for _, r in res.table.iterrows():
        typer.echo(f"  {r['method']:<17} r={r['r']:+.3f}  95% CI [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]  "
                   f"p={r['p_value']:.3g}")
    _echo_files(res)


@app.command()
@friendly_errors
def demo(
    out: Annotated[Path, typer.Option(help="Study folder: runs/, tables/, cache/, study.json.")] = Path("runs/demo"),
    figures: Annotated[Path, typer.Option(help="Where figures and REPORT.md go.")] = Path("figures"),
    scale: Annotated[str, typer.Option(help="cpu (make demo, one seed: verdicts say what it cannot detect) | smoke "
                                       "(about a minute; the tests) | cpu-repro (the seeded test on CPU, "
                                       "~2 h on 2 shared cores) | gpu (3 arms x 3 seeds on one GPU, "
                                       "bench/gpu_study.sh; not yet run)")] = "cpu",
    only: Annotated[Optional[str], typer.Option(help="Run just this training run's steps (e.g. sra-s1), to "
                                                "spread a scale over machines; gather by running again without "
                                                "it.")] = None,
    device: Annotated[Optional[str], typer.Option(help="Override the scale's device (auto | cpu | cuda).")] = None,
    jobs: Annotated[int, typer.Option(help="Training runs at once, each a one-thread process (CPU: the number "
                                           "of cores; one GPU: 2-3 small runs share it).")] = 1,
    quiet: OptQuiet = False,
) -> None:
    """The main job: train baseline / SRA / DiverseDiT / REPA, probe, analyse, evaluate, and judge claims C1-C9.

    Resumable: finished steps are skipped. Writes every figure and REPORT.md into --figures.
    """
    from repdyn.commands.demo import run_study

    report = run_study(out, scale, figures=figures, progress=not quiet, only=only, jobs=jobs,
                       **({"device": device} if device is not None else {}))
    if report is not None:
        typer.echo(f"report: {report}")


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
