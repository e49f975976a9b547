"""The trainer: learning on Fashion-MNIST, exact resume, divergence handling, DDP (gloo), CLI."""

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.launch import torchrun_cli
from repdyn.model.checkpoint import load_checkpoint
from repdyn.training.config import resolve_config
from repdyn.training.trainer import Trainer, TrainingDiverged, train

ROOT = Path(__file__).resolve().parents[2]
HAVE_FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists()
DATA = "fashion-mnist" if HAVE_FMNIST or os.environ.get("CI") == "true" else "digits"
SMALL = {"depth": 2, "hidden_size": 64}


def cfg(tmp, **kw):
    base = dict(model="SiT-T/4", data=DATA, model_overrides=SMALL, batch_size=16, steps=6, log_every=1,
                ckpt_every=0, out=str(tmp), lr=5e-4)
    base.update(kw)
    return resolve_config("sit-tiny", overrides=base)


def read_metrics(run):
    with open(Path(run) / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("model", ["SiT-T/4", "DiT-T/4"])
def test_tiny_models_learn_on_fashion_mnist(tmp_path, model):
    if DATA != "fashion-mnist":
        pytest.skip("Fashion-MNIST not installed (make data)")
    run = tmp_path / "run"
    train(cfg(run, model=model, steps=120, batch_size=32, log_every=10, lr=1e-3), quiet=True)
    rows = read_metrics(run)
    key = "loss_mse" if model.startswith("DiT") else "loss_gen"
    first, last = float(rows[0][key]), sum(float(r[key]) for r in rows[-3:]) / 3
    assert all(torch.isfinite(torch.tensor(float(r["loss"]))) for r in rows)
    assert last < 0.6 * first, (first, last)


def test_exact_resume_matches_uninterrupted_run(tmp_path):
    straight = train(cfg(tmp_path / "a", steps=6), quiet=True)
    train(cfg(tmp_path / "b", steps=3), quiet=True)
    resumed = train(cfg(tmp_path / "b", steps=6), resume=tmp_path / "b", quiet=True)
    a, b = torch.load(straight, weights_only=True), torch.load(resumed, weights_only=True)
    for part in ("model", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    for s_a, s_b in zip(a["opt"]["state"].values(), b["opt"]["state"].values()):
        assert torch.equal(s_a["exp_avg"], s_b["exp_avg"])
    assert [r["loss"] for r in read_metrics(tmp_path / "a")] == [r["loss"] for r in read_metrics(tmp_path / "b")]


def test_metrics_after_an_interruption_equal_the_uninterrupted_run(tmp_path):
    """The logging interval in progress travels in the checkpoint: a run that ended (or was killed) inside
    an interval and was resumed writes metrics.csv row for row as one that ran straight (steps/s aside)."""
    def rows(run):
        return [{k: v for k, v in r.items() if k != "steps_per_s"} for r in read_metrics(run)]

    train(cfg(tmp_path / "a", steps=6, log_every=4, ckpt_every=3), quiet=True)  # rows at 4 and 6
    # ended at step 5, mid-interval (an end-of-run row at 5), then continued to 6
    train(cfg(tmp_path / "b", steps=5, log_every=4, ckpt_every=3), quiet=True)
    assert [r["step"] for r in rows(tmp_path / "b")] == ["4", "5"]
    train(cfg(tmp_path / "b", steps=6, log_every=4, ckpt_every=3), resume=tmp_path / "b", quiet=True)
    # killed after its row at 6 but before the checkpoint at 6: resumed from 3, inside the interval 1..4
    train(cfg(tmp_path / "c", steps=6, log_every=4, ckpt_every=3), quiet=True)
    (tmp_path / "c" / "checkpoints" / "0000006.pt").unlink()
    train(cfg(tmp_path / "c", steps=6, log_every=4, ckpt_every=3), resume=tmp_path / "c", quiet=True)
    assert [r["step"] for r in rows(tmp_path / "a")] == ["4", "6"]
    assert rows(tmp_path / "b") == rows(tmp_path / "a")
    assert rows(tmp_path / "c") == rows(tmp_path / "a")


def test_resume_refuses_a_different_model(tmp_path):
    train(cfg(tmp_path, steps=1), quiet=True)
    with pytest.raises(ValueError, match="model: 'SiT-T/4' -> 'DiT-T/4'"):
        Trainer(cfg(tmp_path, model="DiT-T/4", steps=2), resume=tmp_path)


def test_resume_refuses_changed_hyper_parameters_and_records_what_ran(tmp_path):
    """A new lr on resume would be overridden by the optimizer state while the config recorded it:
    refuse, naming every changed field; length and logging may change."""
    train(cfg(tmp_path, steps=2), quiet=True)
    before = (tmp_path / "config.yaml").read_text()
    with pytest.raises(ValueError, match=r"lr: 0.0005 -> 1000000000000.0.*ema_decay") as e:
        Trainer(cfg(tmp_path, steps=4, lr=1e12, ema_decay=0.5), resume=tmp_path)
    assert "\n" not in str(e.value) and (tmp_path / "config.yaml").read_text() == before
    train(cfg(tmp_path, steps=3, log_every=3), resume=tmp_path, quiet=True)  # allowed changes
    assert load_checkpoint(tmp_path / "checkpoints" / "0000003.pt").config["lr"] == 5e-4


def test_cli_resume_inherits_the_run_config(tmp_path):
    from typer.testing import CliRunner

    from repdyn.cli import app

    train(cfg(tmp_path, steps=2), quiet=True)
    res = CliRunner().invoke(app, ["train", "--resume", str(tmp_path), "--steps", "3", "--quiet"])
    assert res.exit_code == 0, res.output
    assert load_checkpoint(tmp_path / "checkpoints" / "0000003.pt").step == 3
    res = CliRunner().invoke(app, ["train", "--resume", str(tmp_path), "--steps", "4", "--lr", "1e12", "--quiet"])
    assert res.exit_code == 2 and "lr: 0.0005 -> 1000000000000.0" in res.output


def test_last_good_checkpoint_skips_non_finite_weights_and_orphans_go(tmp_path):
    train(cfg(tmp_path, steps=4, ckpt_every=2), quiet=True)
    bad = tmp_path / "checkpoints" / "0000004.pt"
    state = torch.load(bad, weights_only=True)
    state["model"]["pos_embed"] = torch.full_like(state["model"]["pos_embed"], float("inf"))
    torch.save(state, bad)
    (tmp_path / "checkpoints" / ".0000006.pt.abc.tmp").write_bytes(b"torn")  # a killed write
    trainer = Trainer(cfg(tmp_path, steps=6, ckpt_every=2), resume=tmp_path / "checkpoints" / "0000002.pt",
                      quiet=True)
    trainer._open_logs()
    assert trainer.last_good_checkpoint().name == "0000002.pt"
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


def test_nan_stops_with_step_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    trainer = Trainer(cfg(tmp_path, steps=10, ckpt_every=2), quiet=True)
    real = trainer._micro_step

    def poisoned(x, y, indices=None):
        loss, logs = real(x, y, indices)
        if trainer.step >= 3:
            loss = loss * float("nan")
            logs["loss"] = loss.detach()
        return loss, logs

    monkeypatch.setattr(trainer, "_micro_step", poisoned)
    with pytest.raises(TrainingDiverged, match="step 4") as err:
        trainer.train()
    assert "0000002.pt" in str(err.value) and "metrics so far" in str(err.value) and "\n" not in str(err.value)
    assert [int(r["step"]) for r in read_metrics(tmp_path)][:2] == [1, 2]  # written up to the stop
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert ckpts == ["0000002.pt"]
    assert load_checkpoint(tmp_path / "checkpoints" / "0000002.pt").step == 2


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_training_equals_eager_training(tmp_path):
    """--compile (inductor) trains the same model: same losses and weights up to float rounding, SRA
    term included (its projection head runs inside the compiled forward)."""
    over = {"depth": 2, "hidden_size": 32}
    eager = train(cfg(tmp_path / "e", steps=3, method="sra", model_overrides=over), quiet=True)
    compiled = train(cfg(tmp_path / "c", steps=3, method="sra", model_overrides=over, compile=True), quiet=True)
    le, lc = read_metrics(tmp_path / "e"), read_metrics(tmp_path / "c")
    for a, b in zip(le, lc):
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-4, abs=1e-6)
    a = torch.load(eager, weights_only=True)["model"]
    b = torch.load(compiled, weights_only=True)["model"]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_bf16_autocast_runs_on_cpu(tmp_path):
    last = train(cfg(tmp_path, steps=2, precision="bf16"), quiet=True)
    assert torch.isfinite(torch.tensor(float(read_metrics(tmp_path)[-1]["loss"])))
    assert last is not None


def _torchrun(args, out):
    torchrun_cli(["train", "--model", "SiT-T/4", "--data", DATA, "--set", "model_overrides.depth=2", "--set",
                  "model_overrides.hidden_size=64", "--batch-size", "16", "--device", "cpu", "--out", str(out),
                  "--quiet", *args], out.parent)


def test_ddp_two_processes_gloo_and_exact_resume(tmp_path):
    _torchrun(["--steps", "4"], tmp_path / "a")
    _torchrun(["--steps", "2"], tmp_path / "b")
    _torchrun(["--steps", "4", "--resume", str(tmp_path / "b")], tmp_path / "b")
    a = torch.load(tmp_path / "a" / "checkpoints" / "0000004.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoints" / "0000004.pt", weights_only=True)
    assert a["meta"]["world_size"] == 2 and len(a["meta"]["rng"]["generators"]) == 2
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_cli_reports_bad_input_in_one_line(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "repdyn", "train", *args], capture_output=True, text=True,
                              cwd=ROOT, timeout=120)

    for args, needle in [(["--model", "SiT-Q/2"], "unknown model"), (["--method", "repa+dispersive"], "unknown method"),
                         (["--precision", "fp8"], "precision"), (["--set", "nonsense=1"], "unknown config field"),
                         (["--data", "imagenet"], "unknown dataset"), (["--ckpt-every", "-3"], "--ckpt-every must be >= 0"),
                         (["--set", "log_every=0"], "--log-every >= 1")]:
        res = run(*args, "--out", str(tmp_path), "--steps", "1")
        assert res.returncode == 2, res.stderr
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], res.stderr
    assert not (tmp_path / "checkpoints").exists()
    assert "--preset" in subprocess.run([sys.executable, "-m", "repdyn", "train", "--help"],
                                        capture_output=True, text=True, cwd=ROOT).stdout


def test_opt_state_final_keeps_the_optimiser_in_the_final_checkpoint_only(tmp_path):
    """Smaller files (the gpu scale's 12 runs x 4 checkpoints): the intermediate checkpoints hold
    weights and EMA only; resuming one is a one-line error, the final one resumes exactly."""
    run = tmp_path / "run"
    train(cfg(run, steps=4, ckpt_every=2, opt_state="final"), quiet=True)
    mid, last = (torch.load(run / "checkpoints" / f"000000{s}.pt", weights_only=True) for s in (2, 4))
    assert "opt" not in mid and {"model", "ema", "meta", "config"} <= set(mid) and "opt" in last
    with pytest.raises(ValueError, match="holds no optimiser state .* cannot be resumed exactly"):
        Trainer(cfg(run, steps=6, opt_state="final"), resume=run / "checkpoints" / "0000002.pt", quiet=True)
    train(cfg(run, steps=6, opt_state="final"), resume=run, quiet=True)
    assert (run / "checkpoints" / "0000006.pt").exists()
    with pytest.raises(ValueError, match="opt_state must be every or final"):
        cfg(run, opt_state="sometimes")
