"""`probe train` loses nothing: one writer per run folder, no silent mixing of two runs, `--resume FILE`
resumes the run folder holding it, later checkpoints are never replaced without --overwrite, and a broken
checkpoint names the last good one. Every refusal leaves the disk as it was."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from repdyn.core.files import FOLDER_LOCK

from .support import _ok, _one_line_error, runner
from repdyn.cli import app

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--preset", "sit-tiny", "--set", "model_overrides.depth=2", "--set", "model_overrides.hidden_size=32",
        "--batch-size", "8", "--device", "cpu", "--quiet"]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (lock included) by its content hash."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def ckpts(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").glob("*.pt"))


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "repdyn", "train", *TINY, *[str(a) for a in args]]


def run_cli(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(cli(*args), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def error_line(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 2, res.stdout + res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    return lines[0]


@pytest.fixture
def run1(tmp_path) -> Path:
    """A 4-step baseline run with checkpoints at 2 and 4."""
    run = tmp_path / "run1"
    _ok(["train", *TINY, "--steps", "4", "--ckpt-every", "2", "--out", run])
    assert ckpts(run) == ["0000002.pt", "0000004.pt"]
    return run


def test_two_trainings_never_share_a_run_folder(tmp_path):
    """A baseline is training into runs/x; an SRA run into the same folder is refused (naming the pid),
    writes nothing; once the first is killed (its lock left behind) the folder can be taken over."""
    out = tmp_path / "x"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    first = subprocess.Popen(cli("--steps", "100000", "--ckpt-every", "0", "--out", out), cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (out / "config.yaml").exists():
            assert first.poll() is None and time.time() < deadline, "the first training did not start"
            time.sleep(0.2)
        line = error_line(run_cli("--method", "sra", "--seed", "3", "--steps", "2", "--out", out))
        assert f"pid {first.pid}" in line and "another probe process" in line, line
        assert yaml.safe_load((out / "config.yaml").read_text())["method"] == "baseline"
        assert not (out / "checkpoints").exists()
    finally:
        first.kill()
        first.wait()
    assert (out / FOLDER_LOCK).read_text() == str(first.pid)  # left by the killed process
    res = run_cli("--method", "sra", "--seed", "3", "--steps", "2", "--out", out, "--overwrite")
    assert res.returncode == 0, res.stderr
    assert not (out / FOLDER_LOCK).exists()
    assert yaml.safe_load((out / "config.yaml").read_text())["method"] == "sra"
    assert [r.split(",")[0] for r in (out / "metrics.csv").read_text().splitlines()[1:]] == ["2"]


def test_a_second_run_into_a_run_folder_needs_overwrite(tmp_path):
    """`train --steps 4 --out run1` then `train --method sra --seed 3 --steps 2 --out run1`: refused, one line,
    nothing changed; with --overwrite the folder holds the second run only (said in one line)."""
    run = tmp_path / "run1"
    assert run_cli("--steps", "4", "--ckpt-every", "2", "--out", run).returncode == 0
    before = snapshot(run)
    line = error_line(run_cli("--method", "sra", "--seed", "3", "--steps", "2", "--out", run))
    assert "already holds a training run" in line and "--overwrite" in line and "--resume" in line, line
    assert snapshot(run) == before
    res = run_cli("--method", "sra", "--seed", "3", "--steps", "2", "--ckpt-every", "0", "--out", run, "--overwrite")
    assert res.returncode == 0, res.stderr
    said = [ln for ln in res.stdout.splitlines() if ln.startswith("overwrite:")]
    assert len(said) == 1 and "2 checkpoint(s)" in said[0] and "metrics.csv" in said[0], res.stdout
    assert ckpts(run) == ["0000002.pt"]
    state = torch.load(run / "checkpoints" / "0000002.pt", weights_only=True)
    assert state["config"]["method"] == "sra" and state["config"]["seed"] == 3
    assert yaml.safe_load((run / "config.yaml").read_text())["seed"] == 3
    assert [r.split(",")[0] for r in (run / "metrics.csv").read_text().splitlines()[1:]] == ["2"]


def test_a_config_yaml_alone_marks_a_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("method: baseline\n")
    _one_line_error(["train", *TINY, "--steps", "1", "--out", run], "already holds a training run (config.yaml)")
    assert snapshot(run) == {"config.yaml": hashlib.sha256(b"method: baseline\n").hexdigest()}


def test_resume_file_resumes_the_run_folder_holding_it(run1, tmp_path):
    """A copy of run1's 0000002.pt resumes the copy's folder; run1 (recorded in the file) is untouched."""
    before = snapshot(run1)
    copy = tmp_path / "copy"
    (copy / "checkpoints").mkdir(parents=True)
    shutil.copy(run1 / "checkpoints" / "0000002.pt", copy / "checkpoints")
    _ok(["train", "--resume", copy / "checkpoints" / "0000002.pt", "--steps", "4", "--quiet"])
    assert ckpts(copy) == ["0000002.pt", "0000004.pt"] and (copy / "metrics.csv").exists()
    assert snapshot(run1) == before
    a = torch.load(run1 / "checkpoints" / "0000004.pt", weights_only=True)
    b = torch.load(copy / "checkpoints" / "0000004.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_resume_from_an_older_checkpoint_never_replaces_later_ones(run1):
    before = snapshot(run1)
    _one_line_error(["train", "--resume", run1 / "checkpoints" / "0000002.pt", "--steps", "4", "--quiet"],
                    "later checkpoint(s) 0000004.pt")
    assert snapshot(run1) == before
    res = _ok(["train", "--resume", run1 / "checkpoints" / "0000002.pt", "--steps", "3", "--quiet", "--overwrite"])
    assert "removed 1 checkpoint(s) (0000004.pt)" in res.output
    assert ckpts(run1) == ["0000002.pt", "0000003.pt"]
    assert snapshot(run1)["checkpoints/0000002.pt"] == before["checkpoints/0000002.pt"]  # resumed from, kept


def test_a_checkpoint_outside_a_run_folder_needs_out(run1, tmp_path):
    loose = tmp_path / "published.pt"
    shutil.copy(run1 / "checkpoints" / "0000002.pt", loose)
    before = snapshot(tmp_path)
    _one_line_error(["train", "--resume", loose, "--steps", "4", "--quiet"], "pass --out")
    assert snapshot(tmp_path) == before
    _ok(["train", "--resume", loose, "--steps", "3", "--out", tmp_path / "new", "--quiet"])
    assert ckpts(tmp_path / "new") == ["0000003.pt"]
    # a new run from it into a folder that holds a run is the same rule as any second run
    _one_line_error(["train", "--resume", loose, "--steps", "3", "--out", run1, "--quiet"], "already holds")


def test_a_broken_newest_checkpoint_names_the_last_good_one(run1):
    newest = run1 / "checkpoints" / "0000004.pt"
    newest.write_bytes(newest.read_bytes()[:3000])  # a copy cut short
    before = snapshot(run1)
    res = runner.invoke(app, ["train", "--resume", str(run1), "--steps", "6", "--quiet"])
    assert res.exit_code == 2
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.output
    good = run1 / "checkpoints" / "0000002.pt"
    assert "0000004.pt is broken" in lines[0] and f"--resume {good} --overwrite" in lines[0], lines[0]
    assert snapshot(run1) == before
    _ok(["train", "--resume", good, "--overwrite", "--steps", "4", "--quiet"])  # the advice works
    torch.load(newest, weights_only=True)


def test_a_read_only_out_is_one_line_before_anything_is_built(read_only_dir):
    _one_line_error(["train", *TINY, "--steps", "2", "--out", read_only_dir / "run"], "--out")
    assert not (read_only_dir / "run").exists()
