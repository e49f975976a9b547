"""The one trainer for DiT and SiT, baseline and methods (SRA / REPA / DiverseDiT as loss terms).

Single process or ``torchrun`` + DDP (NCCL on GPUs, gloo on CPU). Every random draw of a step
(t, noise, label dropout, latent posterior samples, SRA teacher time) comes from one generator per
rank whose state is checkpointed, and the data order is a function of the step, so
N steps + resume + M steps reproduces N + M steps exactly. REPA's encoders draw nothing at random
and are not in checkpoints: a resume checks that they are the same ones (content hash).
"""

from __future__ import annotations

import collections
import contextlib
import copy
import csv
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from repdyn.model.checkpoint import latest_checkpoint, list_checkpoints, save_checkpoint
from repdyn.model.torch_file import read_checkpoint
from repdyn.training.config import TrainConfig
from repdyn.training.warm_start import WarmStart, is_own_checkpoint, is_training_checkpoint, read_warm_start
from repdyn.datasets.sources import ResumableBatchSampler, make_dataset
from repdyn.training.methods import LossTerm, REPATerm, StepContext, build_loss_terms, model_flags_for_method
from repdyn.model.backbone import DiffusionTransformer, FeatureForward, model_config
from repdyn.core.files import atomic_path, atomic_write_text
from repdyn.model.objectives import make_objective
from repdyn.core.runtime import dist_info, init_distributed, resolve_device

__all__ = ["Trainer", "TrainingDiverged", "train", "config_changes", "RESUMABLE_CHANGES", "NO_OPT_STATE"]


class TrainingDiverged(ValueError):
    """The loss or gradient norm stopped being finite. A user-facing error (one line in the CLI):
    it names the step, the last checkpoint that is still good and the metrics written so far."""


# Fields a resumed run may change: how long and where it runs and logs, not what it computes.
RESUMABLE_CHANGES = ("steps", "out", "ckpt_every", "ckpt_steps", "log_every", "device", "num_workers", "compile",
                     "data_root", "opt_state")
NO_OPT_STATE = ("holds no optimiser state (opt_state: final keeps it in the final checkpoint only), so it cannot be "
                "resumed exactly")


def config_changes(old: dict, new: TrainConfig) -> list[str]:
    """``field: old -> new`` for every field a resume would silently get wrong (all but
    :data:`RESUMABLE_CHANGES`)."""
    cur = new.to_dict()
    return [f"{k}: {old.get(k)!r} -> {cur[k]!r}" for k in cur
            if k not in RESUMABLE_CHANGES and old.get(k, cur[k]) != cur[k]]


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, over all parameters (one fused foreach op)."""
    ema_params = list(ema.parameters())
    params = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)


class Trainer:
    def __init__(self, config: TrainConfig, resume: str | os.PathLike | None = None, quiet: bool = False,
                 warm: WarmStart | None = None):
        self.cfg = config.validate()
        self.quiet = quiet
        place = dist_info()
        self.rank, self.world, self.local_rank = place.rank, place.world, place.local_rank
        init_distributed(config.device)
        self.device = resolve_device(config.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        prec = config.precision if config.precision != "auto" else ("bf16" if self.device.type == "cuda" else "fp32")
        if prec in ("bf16", "fp16") and self.device.type == "cpu" and prec == "fp16":
            raise ValueError("fp16 autocast needs a CUDA device; use --precision bf16 or fp32 on CPU")
        self.precision = prec
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(prec)
        self.out = Path(config.out)

        # data
        self.dataset = make_dataset(config.data, "train", root=config.data_root, image_size=config.image_size,
                                    holdout_cut=False)
        per_rank = config.batch_size // (self.world * config.grad_accum)
        if per_rank < 1 or per_rank * self.world * config.grad_accum != config.batch_size:
            raise ValueError(f"batch_size {config.batch_size} must be divisible by world_size x grad_accum "
                             f"({self.world} x {config.grad_accum})")
        self.sampler = ResumableBatchSampler(len(self.dataset), per_rank, seed=config.seed, rank=self.rank,
                                             world_size=self.world)

        # model, EMA, objective, method terms. REPA's encoders load first: they size its projectors.
        data_fields = dict(input_size=self.dataset.image_size, in_channels=self.dataset.channels,
                           num_classes=self.dataset.num_classes)
        self.repa: REPATerm | None = None
        if config.method_spec.repa:
            plain = model_config(config.model, **{**data_fields, **config.model_overrides})
            self.repa = REPATerm.from_config(config, plain, self.dataset, log=self._say)
        overrides = {**data_fields, **model_flags_for_method(config.method, self.repa), **config.model_overrides}
        self.model_config = model_config(config.model, **overrides)
        if config.init_from is not None and resume is None:
            warm = warm or read_warm_start(config.init_from)
            warm.check(self.model_config, config.data, config.method)
        self.objective = make_objective(self.model_config.family, path=config.path, weighting=config.weighting,
                                        learn_sigma=self.model_config.learn_sigma)
        if self.model_config.family == "dit" and not self.model_config.learn_sigma:
            pass  # DDPM with fixed variance: the objective then trains eps only
        self.terms: list[LossTerm] = build_loss_terms(config, self.model_config, self.objective, repa=self.repa)

        torch.manual_seed(config.seed)  # identical initial weights on every rank
        self.model = DiffusionTransformer(self.model_config).to(self.device)
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.opt = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad], lr=config.lr,
            betas=(config.beta1, config.beta2), weight_decay=config.weight_decay,
        )
        self.scaler = torch.amp.GradScaler("cuda") if prec == "fp16" else None
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed * self.world + self.rank)
        self.step = 0
        # the logging interval in progress: running sums of this rank's logs and how many steps they hold
        # (checkpointed, so a resumed run writes the same metrics.csv rows as an uninterrupted one)
        self._window: dict[str, torch.Tensor] = {}
        self._n_window = 0
        self.warm_start: dict | None = None  # where a run started from published weights began

        if resume is not None:
            self._resume(resume)
        elif warm is not None:
            self._warm_start(warm)

        fwd: torch.nn.Module = FeatureForward(self.model)  # one training forward: prediction and features
        if self.world > 1:
            fwd = DDP(fwd, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if config.compile:
            fwd = torch.compile(fwd)
        self.forward_model = fwd

    # -- setup helpers ------------------------------------------------------------------------------
    def _say(self, line: str) -> None:
        """A setup line (e.g. the embedded encoder being trained once), on rank 0 unless quiet."""
        if self.rank == 0 and not self.quiet:
            print(line, flush=True)

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    # -- checkpoints --------------------------------------------------------------------------------
    def _gather(self, obj):
        """``obj`` of every rank, in rank order (collective under DDP)."""
        if self.world == 1:
            return [obj]
        gathered: list = [None] * self.world
        dist.all_gather_object(gathered, obj)
        return gathered

    def _meta(self) -> dict:
        gens = self._gather(self.generator.get_state().cpu())
        window = {"n": self._n_window, "sums": {k: v.detach().cpu() for k, v in self._window.items()}}
        ds = self.dataset
        return {
            **self.objective.meta(),
            "learn_sigma": self.model_config.learn_sigma,
            "model_name": self.cfg.model,
            "model_config": self.model_config.to_dict(),
            "num_classes": self.model_config.num_classes,
            "null_class": self.model_config.num_classes,
            "in_channels": self.model_config.in_channels,
            "input_size": self.model_config.input_size,
            "latent_scale": ds.latent_scale,
            "vae": getattr(ds, "vae_info", None),  # which VAE made the latents (probe encode records it)
            "data": self.cfg.data,
            "method": self.cfg.method,
            "method_config": {"sra": dict(self.cfg.sra), "diverse": dict(self.cfg.diverse),
                              "repa": dict(self.cfg.repa)},
            "repa_encoders": self.repa.identities() if self.repa is not None else None,  # not in the file
            "ema_decay": self.cfg.ema_decay,
            "world_size": self.world,
            "rng": {"generators": [g.cpu() for g in gens], "torch_cpu": torch.get_rng_state()},
            "data_position": self._position_for_step(self.step),
            "log_window": self._gather(window),  # per rank: the logging interval in progress
            "torch_version": str(torch.__version__),
            "warm_start": self.warm_start,  # None for a run from random weights
        }

    def save(self) -> Path | None:
        meta = self._meta()  # collective under DDP: every rank takes part
        path = None
        if self.rank == 0:
            state = {
                "model": self.model.state_dict(), "ema": self.ema.state_dict(),
                "steps": self.step, "epoch": meta["data_position"]["epoch"], "config": self.cfg.to_dict(), "meta": meta,
            }
            if self.cfg.opt_state == "every" or self.step >= self.cfg.steps:  # what an exact resume needs
                state["opt"] = self.opt.state_dict()
                state["scaler"] = self.scaler.state_dict() if self.scaler is not None else {}
            path = save_checkpoint(state, self.out / "checkpoints" / f"{self.step:07d}.pt")
        if self.world > 1:
            dist.barrier()
        return path

    def _resume(self, resume: str | os.PathLike) -> None:
        path = Path(resume)
        if path.is_dir():
            found = latest_checkpoint(path)
            if found is None:
                raise FileNotFoundError(f"no checkpoints to resume from in {path}")
            path = found
        state = read_checkpoint(path, map_location="cpu").obj
        if is_own_checkpoint(state) and not is_training_checkpoint(state):
            raise ValueError(f"{path} {NO_OPT_STATE}: resume from the final checkpoint, or start the run afresh")
        if not is_training_checkpoint(state):
            raise ValueError(f"{path} is not a training checkpoint of this toolkit (needs model, ema, opt, meta)")
        changed = config_changes(state["config"], self.cfg)
        if changed:  # the optimizer state would win over a new lr and the recorded config would lie
            raise ValueError(f"cannot resume {path.name} with a different config ({'; '.join(changed)}): resume "
                             "with the checkpoint's values, or start a new run in another --out")
        self._check_repa_encoders(state["meta"].get("repa_encoders"), path)
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["opt"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["steps"])  # the data position follows from the step (see _batches)
        gens = state["meta"]["rng"]["generators"]
        if len(gens) == self.world:
            self.generator.set_state(gens[self.rank].to(self.generator.get_state().device))
        elif self.rank == 0:
            print(f"warning: resuming on {self.world} ranks a run saved on {len(gens)}: random draws re-seeded")
        torch.set_rng_state(state["meta"]["rng"]["torch_cpu"])
        self._restore_window(state["meta"].get("log_window") or [])
        self.warm_start = state["meta"].get("warm_start")
        self.resumed_from = path

    def _check_repa_encoders(self, saved: list[dict] | None, path: Path) -> None:
        """REPA's targets are not in the checkpoint: the encoders a resume loads must be the run's."""
        if self.repa is None or saved is None:
            return
        for old, new in zip(saved, self.repa.identities()):
            if old.get("sha") != new["sha"]:
                raise ValueError(f"cannot resume {path.name}: REPA's encoder {new['spec']!r} is not the one the run "
                                 f"trained with (content {old.get('sha')} -> {new['sha']}); encoders are not saved in "
                                 "checkpoints: restore the run's weights or feature file (or encoder cache)")

    def _warm_start(self, warm: WarmStart) -> None:
        """A new run from a published file's weights (and AdamW moments and step count where it has
        them; see :mod:`repdyn.training.warm_start`). Says in lines what carried over."""
        notes = list(warm.notes) + warm.load_into(self.model, self.ema)
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        state, line = warm.optimizer_state(named, self.opt.state_dict())
        if state is not None:
            self.opt.load_state_dict(state)
        notes.append(line)
        self.step = warm.steps or 0
        if self.step >= self.cfg.steps:
            raise ValueError(f"{warm.path.name} has had {self.step} steps and --steps {self.cfg.steps} is the total: "
                             f"pass --steps larger than {self.step}")
        self.warm_start = {"from": str(warm.path), "sha": warm.sha, "steps": warm.steps}
        if self.rank == 0:  # what carried over is part of the run's record, printed even with --quiet
            for n in notes:
                print(f"warm start: {n}", flush=True)

    def _restore_window(self, windows: list[dict]) -> None:
        """The logging interval the checkpoint was inside: this rank's sums (their mean over the saved
        ranks when the world size changed; the all-reduced row is then the same). Older checkpoints
        carry none: the interval restarts at the checkpoint."""
        if not windows or not windows[0].get("n"):
            return
        mine = [windows[self.rank]] if len(windows) == self.world else windows
        keys = mine[0]["sums"].keys()
        self._window = {k: (sum(w["sums"][k] for w in mine) / len(mine)).to(self.device) for k in keys}
        self._n_window = int(mine[0]["n"])

    # -- one optimisation step ----------------------------------------------------------------------
    def _micro_step(self, x: torch.Tensor, y: torch.Tensor,
                    indices: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        g = self.generator
        x0 = self.dataset.finalize(x.to(self.device, non_blocking=True), g)
        y = y.to(self.device, non_blocking=True)
        t = self.objective.sample_t(x0.shape[0], self.device, g)
        eps = torch.randn(x0.shape, device=self.device, generator=g, dtype=x0.dtype)
        x_t = self.objective.corrupt(x0, t, eps)
        y_used = self.model.y_embedder.drop(y, g)
        blocks = sorted(set().union(*[term.student_blocks() for term in self.terms])) if self.terms else []
        project = next((term.project_block() for term in self.terms if term.project_block() is not None), None)
        repa = next((term.repa_block() for term in self.terms if term.repa_block() is not None), None)
        with self._autocast():
            feats = self.forward_model(x_t, t, y_used, drop_labels=False, blocks=blocks, project_block=project,
                                       repa_block=repa)
        gen_terms = self.objective.loss(feats.out.float(), x0, x_t, t, eps)
        gen_loss = gen_terms["loss"].mean()
        logs = {"loss_gen": gen_loss.detach()}
        if "vb" in gen_terms:
            logs["loss_mse"] = gen_terms["mse"].mean().detach()
            logs["loss_vb"] = gen_terms["vb"].mean().detach()
        total = gen_loss
        if self.terms:
            ctx = StepContext(model=self.model, ema=self.ema, objective=self.objective, x0=x0, eps=eps, t=t,
                              x_t=x_t, y=y_used, feats=feats, step=self.step,
                              epoch=self._position_for_step(self.step)["epoch"],
                              autocast=self._autocast, generator=g, indices=indices)
            for term in self.terms:
                extra, term_logs = term(ctx)
                total = total + extra
                # Terms may log CPU scalars or floats; keep every logged value on the training device so the
                # window of logs can be stacked and all-reduced as one tensor.
                logs.update({k: torch.as_tensor(v.detach() if torch.is_tensor(v) else float(v), dtype=torch.float32,
                                                device=self.device) for k, v in term_logs.items()})
        logs["loss"] = total.detach()
        return total, logs

    def train_step(self, batches) -> dict[str, torch.Tensor]:
        accum = self.cfg.grad_accum
        sums: dict[str, torch.Tensor] = {}
        for i in range(accum):
            x, y, idx = next(batches)
            sync = i == accum - 1
            ctx = self.forward_model.no_sync() if (self.world > 1 and not sync and hasattr(self.forward_model, "no_sync")) \
                else contextlib.nullcontext()
            with ctx:
                loss, logs = self._micro_step(x, y, idx)
                scaled = loss / accum
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            for k, v in logs.items():
                sums[k] = sums.get(k, 0) + v.float() / accum
        if self.scaler is not None:
            self.scaler.unscale_(self.opt)
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        if not (torch.isfinite(sums["loss"]) and torch.isfinite(grad_norm)):
            raise TrainingDiverged(
                f"non-finite loss or gradient at step {self.step + 1} (loss={float(sums['loss']):.4g}, "
                f"grad_norm={float(grad_norm):.4g})")
        if self.scaler is not None:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        update_ema(self.ema, self.model, self.cfg.ema_decay)
        self.step += 1
        sums["grad_norm"] = grad_norm.detach().float()
        return sums

    # -- the loop -----------------------------------------------------------------------------------
    def _batches(self):
        """(x, y, dataset indices) per micro-batch. The data position is a function of the step:
        restore it, then iterate."""
        self.sampler.load_state_dict(self._position_for_step(self.step))
        if self.cfg.num_workers > 0:
            sent: collections.deque = collections.deque()  # the loader yields batches in the order sent

            def order():
                for idx in self.sampler:
                    sent.append(idx)
                    yield idx

            loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=order(),
                                                 num_workers=self.cfg.num_workers, pin_memory=self.device.type == "cuda")
            for x, y in loader:
                yield x, y, sent.popleft()
        else:
            for idx in self.sampler:
                yield (*self.dataset.get_batch(idx), idx)

    def _position_for_step(self, step: int) -> dict:
        consumed = step * self.cfg.grad_accum
        return {"epoch": consumed // self.sampler.batches_per_epoch, "position": consumed % self.sampler.batches_per_epoch}

    def _should_save(self) -> bool:
        c = self.cfg
        return (self.step == c.steps or self.step in set(c.ckpt_steps)
                or (c.ckpt_every > 0 and self.step % c.ckpt_every == 0))

    def last_good_checkpoint(self) -> Path | None:
        """The newest checkpoint whose weights are all finite and whose last logged loss was finite."""
        losses: dict[int, float] = {}
        if self.csv_path.exists():
            with open(self.csv_path) as f:
                losses = {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f) if r.get("loss")}
        for path in reversed(list_checkpoints(self.out)):
            try:
                state = read_checkpoint(path, map_location="cpu").obj
            except ValueError:
                continue
            step = int(state.get("steps", 0))
            logged = [v for k, v in losses.items() if k <= step]
            finite = all(torch.isfinite(v).all() for w in ("model", "ema") for v in state[w].values()
                         if torch.is_tensor(v) and v.is_floating_point())
            if finite and (not logged or math.isfinite(logged[-1])):
                return path
        return None

    def _open_logs(self):
        self.out.mkdir(parents=True, exist_ok=True)
        csv_path = self.out / "metrics.csv"
        if self.rank == 0:
            for orphan in (self.out / "checkpoints").glob(".*.tmp"):  # left by a write that was killed
                orphan.unlink(missing_ok=True)
            atomic_write_text(self.out / "config.yaml", yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
            if csv_path.exists():  # drop rows past the last interval the checkpoint closed: a crashed run's,
                # and the partial row an earlier end of run wrote (its interval continues from the saved sums)
                with open(csv_path) as f:
                    rows = [r for r in csv.DictReader(f) if int(r["step"]) <= self.step - self._n_window]
                with atomic_path(csv_path) as tmp, open(tmp, "w", newline="") as f:
                    if rows:
                        w = csv.DictWriter(f, fieldnames=list(rows[0]))
                        w.writeheader()
                        w.writerows(rows)
        self.csv_path = csv_path
        self.tb = None
        if self.rank == 0:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.out / "tb"))
            except ImportError:  # tensorboard is optional at run time
                self.tb = None

    def _log(self, row: dict[str, float]) -> None:
        if self.rank != 0:
            return
        exists = self.csv_path.exists() and self.csv_path.stat().st_size > 0
        fieldnames = None
        if exists:
            with open(self.csv_path) as f:
                fieldnames = next(csv.reader(f), None)
        with open(self.csv_path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fieldnames or list(row), extrasaction="ignore")
            if not exists:
                w.writeheader()
            w.writerow(row)
        if self.tb is not None:
            for k, v in row.items():
                if k != "step":
                    self.tb.add_scalar(f"train/{k}", v, row["step"])

    def train(self) -> Path | None:
        cfg = self.cfg
        self._open_logs()
        self.model.train()
        batches = self._batches()
        bar = tqdm(total=cfg.steps, initial=self.step, desc=f"train {cfg.model} {cfg.method}",
                   disable=self.rank != 0 or self.quiet, dynamic_ncols=True)
        n_timed, t0 = 0, time.perf_counter()  # steps run by this process since the last row (for steps/s)
        last_path = None
        try:
            while self.step < cfg.steps:
                logs = self.train_step(batches)
                for k, v in logs.items():
                    self._window[k] = self._window.get(k, 0) + v
                self._n_window += 1
                n_timed += 1
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    window, n_window = self._window, self._n_window
                    vals = torch.stack([window[k] / n_window for k in sorted(window)])
                    if self.world > 1:
                        dist.all_reduce(vals)
                        vals /= self.world
                    elapsed = time.perf_counter() - t0
                    row = {"step": self.step, **{k: float(v) for k, v in zip(sorted(window), vals.tolist())},
                           "steps_per_s": n_timed / max(elapsed, 1e-9), "lr": self.opt.param_groups[0]["lr"]}
                    self._log(row)
                    bar.set_postfix(loss=f"{row['loss']:.4f}", it_s=f"{row['steps_per_s']:.2f}")
                    if self.step % cfg.log_every == 0:  # an end-of-run row mid-interval keeps the interval open
                        self._window, self._n_window = {}, 0  # for the checkpoint: a longer resume continues it
                    n_timed, t0 = 0, time.perf_counter()
                if self._should_save():
                    last_path = self.save() or last_path
        except TrainingDiverged as e:
            window, n_window = self._window, self._n_window
            if n_window and self.rank == 0:  # the steps since the last log line are metrics too
                self._log({"step": self.step, **{k: float(v / n_window) for k, v in window.items()},
                           "steps_per_s": n_timed / max(time.perf_counter() - t0, 1e-9),
                           "lr": self.opt.param_groups[0]["lr"]})
            good = self.last_good_checkpoint()
            raise TrainingDiverged(f"{e}; stopped. Last good checkpoint (finite weights and loss): "
                                   f"{good or 'none'}; metrics so far: {self.csv_path}") from None
        finally:
            bar.close()
            if self.tb is not None:
                self.tb.close()
        return last_path


def train(config: TrainConfig, resume: str | os.PathLike | None = None, quiet: bool = False,
          warm: WarmStart | None = None) -> Path | None:
    """Train with ``config``; returns the last checkpoint path (on rank 0). ``warm``: the published
    file ``config.init_from`` names, already read."""
    trainer = Trainer(config, resume=resume, quiet=quiet, warm=warm)
    try:
        return trainer.train()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
