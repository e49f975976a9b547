"""The side-by-side benchmark and the GPU check cannot rot.

* ``bench_vs_official``'s loss check is run against tiny *fake* official checkouts written into
  ``tmp_path``: they mirror the official interface (``SiT(..., ad=)`` returning
  ``(out, head, labels)``, ``SRALoss`` / ``SILoss`` drawing t, noise and the label drop from the
  global RNG in the official order) on top of our own model, so no network, no official checkout
  and no timm are needed; a deliberately wrong fake must be reported as a mismatch.
* ``bench/gpu_check.sh --dry`` runs every part on the CPU and must write every JSON key.
* With ``REPDYN_OFFICIAL_REPA`` / ``REPDYN_OFFICIAL_SRA`` pointing at real checkouts (and timm
  installed) the loss check also runs against the official code.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
import bench_vs_official as bvo  # noqa: E402
import gpu_check  # noqa: E402

TINY = {"depth": 2, "hidden_size": 32, "num_heads": 2}

_FAKE_SIT_SRA = '''
"""Test double of the official SRA SiT: our model behind the official interface (no timm)."""
import torch
from repdyn.model.backbone import DiffusionTransformer, ModelConfig

class SiT(DiffusionTransformer):
    def __init__(self, path_type="edm", input_size=32, patch_size=2, in_channels=4, hidden_size=1152,
                 decoder_hidden_size=768, depth=28, num_heads=16, mlp_ratio=4.0, class_dropout_prob=0.1,
                 num_classes=1000, use_cfg=False, **block_kwargs):
        super().__init__(ModelConfig(family="sit", input_size=input_size, patch_size=patch_size,
                                     in_channels=in_channels, hidden_size=hidden_size, depth=depth,
                                     num_heads=num_heads, mlp_ratio=mlp_ratio, class_dropout_prob=class_dropout_prob,
                                     num_classes=num_classes, sra_head=True))  # self.ap_head

    def forward(self, x, t, y, ad=4):
        p = self.y_embedder.dropout_prob
        if self.training and p > 0:  # label drop from the global RNG, inside the forward
            y = torch.where(torch.rand(y.shape[0], device=y.device) < p, self.y_embedder.num_classes, y)
        f = self.forward_features(x, t, y, drop_labels=False, blocks=[ad])
        return f.out, (self.ap_head(f.blocks[ad]) if self.training else f.blocks[ad]), y
'''

_FAKE_LOSS_SRA = '''
import torch
import torch.nn.functional as F
TEACHER_DELTA = {delta}

class SRALoss:
    def __init__(self, prediction="v", path_type="linear", weighting="uniform", latents_scale=None,
                 latents_bias=None, block_out_s=4, block_out_t=8, t_max=0.2, loss_type="sml1"):
        self.block_out_s, self.block_out_t, self.t_max = block_out_s, block_out_t, t_max

    def __call__(self, model, images, teacher, labels):
        t = torch.rand((images.shape[0], 1, 1, 1))
        t_teacher = t - TEACHER_DELTA * self.t_max * torch.rand_like(t)
        t = t.to(device=images.device, dtype=images.dtype)
        noise = torch.randn_like(images)
        out, head, used = model((1 - t) * images + t * noise, t.flatten(), y=labels, ad=self.block_out_s)
        t_teacher = t_teacher.clamp(0, 1).to(device=images.device, dtype=images.dtype)
        target = teacher((1 - t_teacher) * images + t_teacher * noise, t_teacher.flatten(), y=used,
                         ad=self.block_out_t)[1]
        gen = ((out - (noise - images)) ** 2).mean(dim=(1, 2, 3))
        return gen, F.smooth_l1_loss(head, target, beta=0.05)
'''

_FAKE_SIT_REPA = '''
"""Test double of the official REPA SiT: our model plus REPA's projectors (no timm)."""
import torch
from torch import nn
from repdyn.model.backbone import DiffusionTransformer, ModelConfig

class SiT(DiffusionTransformer):
    def __init__(self, path_type="edm", input_size=32, patch_size=2, in_channels=4, hidden_size=1152,
                 decoder_hidden_size=768, encoder_depth=8, depth=28, num_heads=16, mlp_ratio=4.0,
                 class_dropout_prob=0.1, num_classes=1000, use_cfg=False, z_dims=[768], projector_dim=2048,
                 **block_kwargs):
        super().__init__(ModelConfig(family="sit", input_size=input_size, patch_size=patch_size,
                                     in_channels=in_channels, hidden_size=hidden_size, depth=depth,
                                     num_heads=num_heads, mlp_ratio=mlp_ratio, class_dropout_prob=class_dropout_prob,
                                     num_classes=num_classes))
        self.encoder_depth = encoder_depth
        self.projectors = nn.ModuleList([nn.Sequential(nn.Linear(hidden_size, projector_dim), nn.SiLU(),
                                                       nn.Linear(projector_dim, projector_dim), nn.SiLU(),
                                                       nn.Linear(projector_dim, z)) for z in z_dims])

    def forward(self, x, t, y, return_logvar=False):
        p = self.y_embedder.dropout_prob
        if self.training and p > 0:
            y = torch.where(torch.rand(y.shape[0], device=y.device) < p, self.y_embedder.num_classes, y)
        f = self.forward_features(x, t, y, drop_labels=False, blocks=[self.encoder_depth])
        return f.out, [proj(f.blocks[self.encoder_depth]) for proj in self.projectors]
'''

_FAKE_LOSS_REPA = '''
import torch

class SILoss:
    def __init__(self, prediction="v", path_type="linear", weighting="uniform", encoders=[], accelerator=None,
                 latents_scale=None, latents_bias=None):
        pass

    def __call__(self, model, images, model_kwargs=None, zs=None):
        t = torch.rand((images.shape[0], 1, 1, 1)).to(device=images.device, dtype=images.dtype)
        noise = torch.randn_like(images)
        out, zs_tilde = model((1 - t) * images + t * noise, t.flatten(), **(model_kwargs or {}))
        gen = ((out - (noise - images)) ** 2).mean(dim=(1, 2, 3))
        proj = -sum(torch.nn.functional.cosine_similarity(z, zt, dim=-1).mean() for z, zt in zip(zs, zs_tilde))
        return gen, proj
'''


def _fake_sra(root: Path, delta: float = 1.0) -> Path:
    (root / "SiT-SRA" / "models").mkdir(parents=True)
    (root / "SiT-SRA" / "models" / "sit.py").write_text(_FAKE_SIT_SRA)
    (root / "SiT-SRA" / "loss.py").write_text(textwrap.dedent(_FAKE_LOSS_SRA).format(delta=delta))
    return root


def _fake_repa(root: Path) -> Path:
    (root / "models").mkdir(parents=True)
    (root / "models" / "sit.py").write_text(_FAKE_SIT_REPA)
    (root / "loss.py").write_text(_FAKE_LOSS_REPA)
    return root


@pytest.fixture
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_loss_check_passes_on_an_identical_official_interface(tmp_path, one_thread):
    off = bvo.load_official(_fake_sra(tmp_path / "SRA"))
    assert off.kind == "sra"
    rec = bvo.compare("SiT-T/4", "sra", off, batch_size=4, warmup=1, steps=2, overrides=TINY)
    c = rec["loss_check"]
    assert c["ok"], c
    assert c["redraw_gen_diff"] < 1e-6 and c["redraw_align_diff"] < 1e-6  # the official draws were reproduced
    assert c["out_max_abs_diff"] < 1e-5 and c["head_max_abs_diff"] < 1e-5 and c["teacher_max_abs_diff"] < 1e-5
    assert c["gen_loss_official"] > 0 and c["align_loss_official"] > 0  # non-trivial weights, not adaLN-Zero zeros
    assert rec["ours_ms"] > 0 and rec["official_ms"] > 0 and rec["ratio_ours_over_official"] > 0
    assert rec["official_only_keys"] == []


def test_repa_loss_check_on_the_official_interface(tmp_path, one_thread):
    """REPA: our projectors (REPA's keys, loaded into the official model) and our -cos loss against the
    official ones on the official targets; the real code: test_loss_check_against_the_real_official_code."""
    off = bvo.load_official(_fake_repa(tmp_path / "REPA"))
    rec = bvo.compare("SiT-T/4", "repa", off, batch_size=4, warmup=0, steps=1, overrides=TINY)
    c = rec["loss_check"]
    assert c["ok"], c
    assert c["projector_max_abs_diff"] < 1e-5 and c["align_loss_diff"] < 1e-6 and c["align_loss_official"] < 0
    assert c["weight_ours"] == c["weight_official"] == 0.5 and rec["official_only_keys"] == []
    assert "projector" in bvo.check_text(rec) and "proj" in bvo.check_text(rec)


def test_loss_check_reports_a_different_computation(tmp_path, one_thread):
    # an "official" SRA whose teacher sits at the student's t (no t - U[0, t_max) shift)
    off = bvo.load_official(_fake_sra(tmp_path / "SRA", delta=0.0))
    rec = bvo.compare("SiT-T/4", "sra", off, batch_size=4, warmup=0, steps=1, overrides=TINY)
    assert not rec["loss_check"]["ok"]
    assert rec["loss_check"]["redraw_align_diff"] > 1e-6
    assert "MISMATCH" in bvo.check_text(rec)


def test_cli_baseline_against_repa_layout_and_table(tmp_path, one_thread, capsys):
    repa, sra = _fake_repa(tmp_path / "REPA"), _fake_sra(tmp_path / "SRA")
    out = bvo.main(["--official", str(repa), "--official", str(sra), "--method", "both", "--model", "SiT-T/4",
                    "--overrides", "depth=2,hidden_size=32,num_heads=2", "--batch-size", "4", "--steps", "1",
                    "--warmup", "0", "--json", str(tmp_path / "r.json")])
    recs = {r["method"]: r for r in out["records"]}
    assert recs["baseline"]["official"]["kind"] == "repa" and recs["sra"]["official"]["kind"] == "sra"
    assert recs["baseline"]["loss_check"]["ok"] and recs["sra"]["loss_check"]["ok"]
    assert recs["baseline"]["official_only_keys"] == ["projectors"]
    text = capsys.readouterr().out
    assert "| SiT-T/4 | baseline | 4 |" in text and "| SiT-T/4 | sra | 4 |" in text
    assert json.loads((tmp_path / "r.json").read_text())["records"]


def test_official_errors_are_one_line(tmp_path):
    with pytest.raises(bvo.OfficialCodeError, match="expected a REPA checkout"):
        bvo.load_official(tmp_path)
    root = _fake_repa(tmp_path / "R")
    (root / "models" / "sit.py").write_text("from timm.surely_not_there import Attention\n")
    with pytest.raises(bvo.OfficialCodeError, match="pip install timm"):
        bvo.load_official(root)
    off, why = bvo.pick_official([], "sra")
    assert off is None and "SRA checkout" in why


def test_extraction_side_by_side_same_features(tmp_path, one_thread):
    off = bvo.load_official(_fake_sra(tmp_path / "SRA"))
    rec = bvo.compare_extraction("SiT-T/4", off, n=8, ts=[0.2, 0.6], batch_size=4, batch1_n=2, overrides=TINY,
                                 repeats=1)
    assert rec["features_max_abs_diff"] < 1e-5
    assert rec["cells"] == 4 and rec["ours_s"] > 0 and rec["official_batched_s"] > 0
    assert rec["official_strategy"].startswith("official SRA SiT")


def test_gpu_check_dry_writes_every_key(tmp_path):
    out = tmp_path / "gpu_check.json"
    repa, sra = _fake_repa(tmp_path / "REPA"), _fake_sra(tmp_path / "SRA")
    env = dict(os.environ, GPU_CHECK_DRY="1", OMP_NUM_THREADS="1", PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--out", str(out), "--official", str(repa),
                           "--official", str(sra)], capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert set(gpu_check.TOP_KEYS) <= set(res) and res["complete"] and res["mode"] == "dry", res
    assert set(gpu_check.TRAIN_KEYS) <= set(res["train"])
    assert set(gpu_check.DDP_KEYS) <= set(res["ddp"])
    assert set(gpu_check.EXTRACTION_KEYS) <= set(res["extraction"])
    assert set(gpu_check.PROBE_KEYS) <= set(res["probe"])
    assert res["ddp"]["skipped"] is None and res["ddp"]["world_size"] == 2 and res["ddp"]["ddp_wrapped"], res["ddp"]
    assert res["train"]["loss_check"]["baseline"]["ok"] and res["train"]["loss_check"]["sra"]["ok"], res["train"]
    assert set(res["train"]["speedup_vs_official"]) == {"baseline", "sra"}
    assert res["sra_overhead"]["ratio"] > 0 and res["extraction"]["img_cells_per_s"] > 0
    assert res["probe"]["torch_s"] > 0 and res["probe"]["cuml_skipped"]
    # Goal: well under a minute on 2 cores (about 10 s idle, 20 s at load average 4); the bound
    # leaves room for a loaded CI machine.
    assert res["elapsed_s"] < 90, res["elapsed_s"]


def _real(env: str, kind: str):
    path = os.environ.get(env)
    if not path:
        pytest.skip(f"set {env} to a {kind} checkout to check against the real official code")
    if importlib.util.find_spec("timm") is None:
        pytest.skip("timm is not installed (the official SiT needs it; pip install timm, benchmark only)")
    return bvo.load_official(path)


@pytest.mark.parametrize("env,kind,method", [("REPDYN_OFFICIAL_REPA", "REPA", "baseline"),
                                              ("REPDYN_OFFICIAL_REPA", "REPA", "repa"),
                                              ("REPDYN_OFFICIAL_SRA", "SRA", "sra")])
def test_loss_check_against_the_real_official_code(env, kind, method, one_thread):
    off = _real(env, kind)
    rec = bvo.compare("SiT-T/4", method, off, batch_size=4, warmup=0, steps=1, overrides=TINY)
    assert rec["loss_check"]["ok"], rec["loss_check"]


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists()
                    and os.environ.get("CI") != "true", reason="Fashion-MNIST not installed (make data)")
def test_gpu_study_dry_run_writes_the_report(tmp_path):
    """bench/gpu_study.sh, the one command of the gpu scale, run on the CPU at the smoke scale: the
    package used in place (no install), the study written, its report and tables packed for $OUT."""
    env = dict(os.environ, GPU_STUDY_DRY="1", OMP_NUM_THREADS="1", PYTHON=sys.executable,
               GPU_STUDY_DIR=str(tmp_path / "study"), TMPDIR=str(tmp_path))
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_study.sh"), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    import tarfile

    with tarfile.open(tmp_path / "out" / "gpu_study.tgz") as tar:
        names = set(tar.getnames())
    assert {"study.json", "tables/eval_metrics.csv", "figures/gpu/REPORT.md"} <= names, sorted(names)[:20]
    assert "report:" in (tmp_path / "out" / "gpu_study.log").read_text()
