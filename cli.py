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


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
