"""Training configuration: one dataclass, named presets, YAML files and ``key=value`` overrides.

Precedence: preset < YAML file < explicit flags / ``--set key=value``. The resolved config is
stored in every checkpoint as a plain dict (so ``torch.load(weights_only=True)`` can read it) and
written to ``<out>/config.yaml``.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

__all__ = ["TrainConfig", "MethodSpec", "PRESETS", "METHODS", "resolve_config", "parse_set_overrides", "merge_config"]

METHODS = ("baseline", "sra", "repa", "diverse", "sra+repa", "sra+diverse", "repa+diverse", "sra+repa+diverse")


@dataclass(frozen=True)
class MethodSpec:
    """The method grammar, parsed in one place: ``baseline`` or ``+``-joined parts (``sra``,
    ``repa``, ``diverse``), e.g. ``sra+diverse``. Parts are written in a fixed order (sra, repa,
    diverse), so the name is canonical: ``diverse+repa`` is ``repa+diverse``."""

    sra: bool = False
    repa: bool = False
    diverse: bool = False

    PARTS = ("sra", "repa", "diverse")

    @classmethod
    def parse(cls, text: str | None) -> "MethodSpec":
        text = (text or "baseline").strip()
        parts = [p.strip() for p in text.split("+") if p.strip()]
        bad = [p for p in parts if p not in cls.PARTS + ("baseline",)]
        if bad or not parts or ("baseline" in parts and len(parts) > 1) or len(set(parts)) != len(parts):
            raise ValueError(f"unknown method {text!r}; use one of {', '.join(METHODS)}")
        return cls(**{p: p in parts for p in cls.PARTS})

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(p for p in self.PARTS if getattr(self, p))

    @property
    def name(self) -> str:
        """``baseline`` or the parts in canonical order, e.g. ``sra``, ``repa+diverse``."""
        return "+".join(self.parts) or "baseline"

    @property
    def slug(self) -> str:
        """The name as a file or run name (``sra-diverse``)."""
        return self.name.replace("+", "-")


@dataclass
class TrainConfig:
    # what to train
    model: str = "SiT-T/4"
    model_overrides: dict[str, Any] = field(default_factory=dict)  # depth, hidden_size, num_heads, ...
    method: str = "baseline"
    sra: dict[str, Any] = field(default_factory=dict)  # student_block, teacher_block, t_max, weight, distance, ...
    diverse: dict[str, Any] = field(default_factory=dict)  # pairs, weight_mode, weight, ...
    repa: dict[str, Any] = field(default_factory=dict)  # encoder, encoder_depth, projector_dim, proj_coeff
    # data
    data: str = "fashion-mnist"
    data_root: str | None = None
    image_size: int = 32
    # objective
    path: str = "linear"  # SiT interpolant: linear | cosine
    weighting: str = "uniform"  # SiT t sampling: uniform | lognormal
    # optimisation
    steps: int = 1000
    batch_size: int = 64  # global, across ranks and accumulation steps
    grad_accum: int = 1
    lr: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.999
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
    compile: bool = False
    # bookkeeping
    seed: int = 0
    init_from: str | None = None  # a published checkpoint the run started from (training/warm_start.py)
    out: str = "runs/default"
    ckpt_every: int = 0  # 0: only at the end
    opt_state: str = "every"  # which checkpoints keep the optimiser state: every | final (smaller files, no mid-run resume)
    ckpt_steps: list[int] = field(default_factory=list)  # extra steps to checkpoint (training-dynamics curves)
    log_every: int = 10
    device: str = "auto"
    num_workers: int = 0

    def validate(self) -> "TrainConfig":
        self.method = MethodSpec.parse(self.method).name
        if self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("steps, batch_size and grad_accum must be >= 1")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} must be divisible by grad_accum {self.grad_accum}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.opt_state not in ("every", "final"):
            raise ValueError(f"opt_state must be every or final, got {self.opt_state!r}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        if self.lr <= 0 or self.grad_clip < 0:
            raise ValueError("lr must be > 0 and grad_clip >= 0")
        if self.ckpt_every < 0 or self.log_every < 1 or any(int(s) < 1 for s in self.ckpt_steps):
            raise ValueError(f"--ckpt-every must be >= 0 (0: only at the end), --log-every >= 1 and ckpt_steps >= 1; "
                             f"got ckpt_every={self.ckpt_every}, log_every={self.log_every}, "
                             f"ckpt_steps={self.ckpt_steps}")
        return self

    @property
    def method_spec(self) -> MethodSpec:
        return MethodSpec.parse(self.method)

    @property
    def family(self) -> str:
        return "dit" if self.model.startswith("DiT") else "sit"

    def to_dict(self) -> dict:
        return copy.deepcopy(asdict(self))

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown config field(s) {sorted(unknown)}; valid fields: {sorted(names)}")
        return cls(**copy.deepcopy(d))


# Tiny presets run on a laptop CPU in minutes. EMA 0.999 instead of the paper's 0.9999: over a few
# thousand steps a 0.9999 EMA (and so the SRA teacher) would barely leave its initialisation.
_TINY = dict(model_overrides={}, data="fashion-mnist", batch_size=64, lr=2e-4, ema_decay=0.999, steps=1500,
             ckpt_every=500, log_every=25)
PRESETS: dict[str, dict[str, Any]] = {
    "sit-tiny": dict(_TINY, model="SiT-T/4"),
    "dit-tiny": dict(_TINY, model="DiT-T/4"),
    "sit-mini": dict(_TINY, model="SiT-M/4", steps=4000, ckpt_every=1000),
    "sit-b2-imagenet": dict(model="SiT-B/2", data="latents:data/imagenet256", batch_size=256, lr=1e-4,
                            ema_decay=0.9999, steps=400_000, ckpt_every=50_000, log_every=100),
    "sit-xl2-imagenet": dict(model="SiT-XL/2", data="latents:data/imagenet256", batch_size=256, lr=1e-4,
                             ema_decay=0.9999, steps=400_000, ckpt_every=50_000, log_every=100),
    "dit-xl2-imagenet": dict(model="DiT-XL/2", data="latents:data/imagenet256", batch_size=256, lr=1e-4,
                             ema_decay=0.9999, steps=400_000, ckpt_every=50_000, log_every=100),
}


def _coerce(text: str) -> Any:
    """Parse a ``--set`` value with YAML rules (numbers, bools, lists) so `lr=2e-4` is a float."""
    return yaml.safe_load(text)


def parse_set_overrides(items: list[str]) -> dict[str, Any]:
    """``["sra.teacher_block=5", "lr=2e-4"]`` -> nested dict."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        node = out
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = _coerce(value)
    return out


def merge_config(base: dict, extra: dict) -> dict:
    """``extra`` over ``base``, nested sections merged key by key (``--set repa.x`` keeps ``--encoder``)."""
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_config(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def resolve_config(preset: str | None = None, yaml_path: str | Path | None = None,
                   overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Preset, then YAML, then overrides (flags and ``--set``), validated."""
    d: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; use one of {', '.join(PRESETS)}")
        d = merge_config(d, PRESETS[preset])
    if yaml_path is not None:
        p = Path(yaml_path)
        if not p.exists():
            raise FileNotFoundError(f"config file {p} does not exist")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{p} must hold a mapping of config fields")
        d = merge_config(d, loaded)
    d = merge_config(d, {k: v for k, v in (overrides or {}).items() if v is not None})
    return TrainConfig.from_dict(d).validate()
