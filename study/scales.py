"""The study's scales: everything that sets its size, and the named presets (``probe demo --scale``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from repdyn.model.backbone import model_config
from repdyn.training.config import MethodSpec
from repdyn.training.methods.sra import DEFAULT_T_MAX, default_blocks

__all__ = ["StudyConfig", "SCALES"]


@dataclass
class StudyConfig:
    """Everything that sets the scale of the study (recorded in ``<out>/study.json``)."""

    name: str = "cpu"
    model: str = "SiT-T/4"
    model_overrides: dict = field(default_factory=dict)
    data: str = "fashion-mnist"
    methods: tuple[str, ...] = ("baseline", "sra", "diverse")
    extra_teacher_blocks: tuple[int, ...] = ()  # extra SRA runs with other teacher blocks (C5)
    seeds: tuple[int, ...] = (0,)  # training seeds of the main arms (baseline, sra, diverse)
    extra_seeds: tuple[int, ...] = (0,)  # training seeds of the C5 and teacher-EMA arms
    teacher_ema_arms: tuple[float, ...] = ()  # extra SRA arms with another EMA (= teacher) decay
    steps: int = 1200
    n_ckpts: int = 4
    batch_size: int = 64
    lr: float = 5e-4
    ema_decay: float = 0.999
    seed: int = 0
    grid_ts: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
    grid_runs: tuple[str, ...] | None = None  # runs that get a full layer grid (None: all)
    n_train: int = 2000
    n_test: int = 1000
    curve_n_train: int = 1000  # per checkpoint, student and teacher cells
    curve_n_test: int = 500
    t_probe: float = 0.5  # student cell time for the curves; the teacher's is t - t_max / 2
    n_div: int = 48
    sim_n: int = 512
    sim_ts: tuple[float, ...] = (0.1, 0.5, 0.9)
    eval_n: int = 300
    eval_steps: int = 12
    eval_sampler: str = "ode-euler"
    pca_images: tuple[int, ...] = (0, 1, 2, 3)
    encoder: str = "embedded"  # the external encoder of the alignment curves (embedded:N: trained on N images)
    opt_state: str = "every"  # "final": only final checkpoints keep the optimiser state (disk on the GPU machine)
    device: str = "auto"

    def ckpt_steps(self) -> list[int]:
        return sorted({max(1, round(self.steps * (i + 1) / self.n_ckpts)) for i in range(self.n_ckpts)})

    def run_specs(self) -> list[tuple[str, str, dict]]:
        """(run name, method, extra config) for every training run; with several seeds a run is
        ``<arm>-s<seed>`` (repdyn.study.power.arm_of reads the arm back)."""
        def named(arm: str, seed: int, seeds: tuple[int, ...]) -> str:
            return arm if len(seeds) == 1 and seed == 0 else f"{arm}-s{seed}"

        specs = [(named(MethodSpec.parse(m).slug, s, self.seeds), MethodSpec.parse(m).name, {"seed": s})
                 for m in self.methods for s in self.seeds]
        specs += [(named(f"sra-kt{k}", s, self.extra_seeds), "sra", {"sra": {"teacher_block": k}, "seed": s})
                  for k in self.extra_teacher_blocks for s in self.extra_seeds]
        specs += [(named(f"sra-ema{d:g}", s, self.extra_seeds), "sra", {"ema_decay": d, "seed": s})
                  for d in self.teacher_ema_arms for s in self.extra_seeds]
        # the decay is also that of the sampled EMA, so each teacher-EMA arm has its own baseline
        specs += [(named(f"baseline-ema{d:g}", s, self.extra_seeds), "baseline", {"ema_decay": d, "seed": s})
                  for d in self.teacher_ema_arms for s in self.extra_seeds]
        return specs

    def sra_cells(self) -> tuple[int, int, float, float]:
        """The student / teacher cells every run's curves use: SRA's default blocks, t and mean teacher t."""
        mc = model_config(self.model, **{"input_size": 32, "in_channels": 1, "num_classes": 10,
                                         **self.model_overrides})
        ks, kt = default_blocks(mc)
        return ks, kt, self.t_probe, round(self.t_probe - DEFAULT_T_MAX / 2, 6)


SCALES: dict[str, StudyConfig] = {
    # make demo: tiny SiTs (depth 6, width 64, 8x8 tokens) on a 2-core CPU, ~15 min with installation.
    # EMA 0.995: over 600 steps a 0.999 EMA (the SRA teacher) would still be 55% initialisation.
    # The full layer grid runs on baseline and SRA only (C1-C3 use them); every run gets curves.
    # Its generation claims (C5-C7) are "not testable at this scale", its honest answer: 0.995 ** 600 =
    # 5% of the initial weights is still in the sampled EMA and 600 steps are far from the class
    # accuracy the maturity gate asks for (repdyn.study.gate).
    "cpu": StudyConfig(model_overrides={"hidden_size": 64}, steps=600, batch_size=32, lr=1e-3, ema_decay=0.995,
                       grid_runs=("baseline", "sra"), n_div=32, encoder="embedded:10000"),
    # the notebook / CI test: about a minute, only checks that every piece runs.
    "smoke": StudyConfig(name="smoke", model_overrides={"depth": 4, "hidden_size": 64},
                         methods=("baseline", "sra", "diverse", "repa"), steps=40, n_ckpts=2,
                         batch_size=32, ema_decay=0.9, grid_ts=(0.2, 0.6), n_train=200, n_test=120,
                         curve_n_train=200, curve_n_test=120, n_div=16, sim_n=64, sim_ts=(0.2, 0.6), eval_n=48,
                         eval_steps=4, pca_images=(0, 1), encoder="embedded:1000"),
    # the seeded test on CPU (issue 21's plan, docs/reproduction.md "The plan"; <= 2.5 h wall on 2 cores
    # as two one-thread processes, every run independent: `--only RUN`). Baseline vs SRA only, 5 paired
    # training seeds, trained past the maturity gate: a pilot measured SiT-T/4 width 64, batch 32, lr 1e-3,
    # EMA 0.999 at class accuracy 0.71 after 5000 steps (0.67% initial weights) and 0.82 after 10000;
    # 6000 steps leave 0.999 ** 6000 = 0.25%. Training: 5 x 6000 x (93 + 120) ms = 107 min of one core,
    # ~54 min wall on two. Evaluation n = 800 conditional samples (class-accuracy SE <= 1.8 points at any
    # accuracy), curve probes on 5000 test images (C4: the probe error below the seed spread). DiverseDiT
    # (C6), the SRA teacher-block arms (C5) and the teacher-EMA arms are dropped from this scale: their
    # claims are reported "not run at this scale".
    "cpu-repro": StudyConfig(name="cpu-repro", model_overrides={"hidden_size": 64}, methods=("baseline", "sra"),
                             steps=6000, n_ckpts=4, batch_size=32, lr=1e-3, ema_decay=0.999, seeds=(0, 1, 2, 3, 4),
                             extra_seeds=(), grid_runs=("baseline", "sra"), curve_n_test=5000, n_div=32,
                             eval_n=800),
    # one GPU (H100/H200 class) in one command of <= 10 min wall (bench/gpu_study.sh, three runs at once):
    # baseline, SRA, DiverseDiT and REPA (C8, C9: the comparison the SRA paper makes) x 3 paired seeds,
    # SiT-S/4 (12 x 384, 64 tokens) at batch 256 for 1200 steps (307k images, 1.6x what passed the maturity
    # gate on CPU with a smaller model). EMA 0.995: 0.995 ** 1200 = 0.24% initial weights at the end (the
    # gate asks < 1%), a lag of 200 steps. Sized by an estimate, NOT YET RUN: ~3.5 TFLOP per SRA step,
    # 12 x 1200 steps ~ 50 PFLOP, 3-4 min at 200-300 TFLOP/s; evaluation (1000 samples x 24 Euler steps x 4
    # checkpoints) and the probes ~2-3 min. C5 (>= 5 teacher blocks x 2 seeds) and the teacher-EMA arms do
    # not fit: "not run at this scale".
    "gpu": StudyConfig(name="gpu", model="SiT-S/4", methods=("baseline", "sra", "diverse", "repa"), steps=1200,
                       n_ckpts=4, batch_size=256, lr=3e-4, ema_decay=0.995, seeds=(0, 1, 2), extra_seeds=(),
                       grid_runs=("baseline", "sra"), n_train=10000, n_test=5000, curve_n_train=5000,
                       curve_n_test=5000, n_div=64, sim_n=1024, eval_n=1000, eval_steps=24, device="cuda",
                       opt_state="final"),
}
