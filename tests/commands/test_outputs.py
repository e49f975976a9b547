"""Results are never lost or silently wrong: unique default folders, one writer per folder, outputs
checked before any work, clear errors (the cache cells: tests/probe/test_cache.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from repdyn.cli import app

pytestmark = pytest.mark.usefixtures("single_thread")
ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()
GRID = ["--n-train", "40", "--n-test", "20", "--t", "0", "--blocks", "1", "--probe", "ridge", "--quiet"]


def _run(args):
    return runner.invoke(app, [str(a) for a in args])


def _error_line(res) -> str:
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.output
    return lines[0]


@pytest.fixture
def two_runs(tiny_sit_ckpt, tiny_dit_ckpt, tmp_path):
    """A SiT and a DiT checkpoint that share a file name, as every run names checkpoints by step."""
    paths = []
    for run, src in (("sit", tiny_sit_ckpt), ("dit", tiny_dit_ckpt)):
        dst = tmp_path / "runs" / run / "checkpoints" / "0000030.pt"
        dst.parent.mkdir(parents=True)
        shutil.copy(src, dst)
        paths.append(dst)
    return paths


def test_default_folders_are_unique_per_checkpoint(two_runs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for ck in two_runs:
        res = _run(["layer-grid", ck, "--no-cache", *GRID])
        assert res.exit_code == 0, res.output
        assert "folder:" in res.output
    folders = sorted(p.name for p in (tmp_path / "layer_grid").iterdir())
    assert len(folders) == 2 and folders[0].startswith("dit-0000030-") and folders[1].startswith("sit-0000030-")
    fams = {pd.read_csv(tmp_path / "layer_grid" / f / "layer_grid.csv").family.iloc[0] for f in folders}
    assert fams == {"sit", "dit"}


def test_a_folder_of_another_checkpoint_is_not_replaced(two_runs, tmp_path):
    sit, dit = two_runs
    out = tmp_path / "lg"
    assert _run(["layer-grid", sit, "--out", out, "--no-cache", *GRID]).exit_code == 0
    before = (out / "layer_grid.csv").read_bytes()
    line = _error_line(_run(["layer-grid", dit, "--out", out, "--no-cache", *GRID]))
    assert "holds results of another run" in line and "checkpoint_sha" in line and "--overwrite" in line
    assert (out / "layer_grid.csv").read_bytes() == before
    assert _run(["layer-grid", sit, "--out", out, "--no-cache", *GRID]).exit_code == 0  # a rerun is fine
    res = _run(["layer-grid", dit, "--out", out, "--no-cache", "--overwrite", *GRID])
    assert res.exit_code == 0, res.output
    assert pd.read_csv(out / "layer_grid.csv").family.iloc[0] == "dit"


def test_outputs_are_checked_before_any_work(tiny_sit_ckpt, tmp_path):
    cache = tmp_path / "cache"
    target = tmp_path / "a_file"
    target.write_text("not a folder")
    line = _error_line(_run(["layer-grid", tiny_sit_ckpt, "--out", target, "--cache", cache, *GRID]))
    assert "is a file" in line
    assert not (cache / "cells").exists() or not list((cache / "cells").iterdir())  # nothing was extracted
    line = _error_line(_run(["similarity", tiny_sit_ckpt, "--out", target, "--cache", cache, "--quiet"]))
    assert "is a file" in line
    png = tmp_path / "s.png"
    png.write_bytes(b"mine")
    line = _error_line(_run(["sample", tiny_sit_ckpt, "--out", png, "--n", "2", "--steps", "2", "--quiet"]))
    assert "exists" in line and png.read_bytes() == b"mine"
    res = _run(["sample", tiny_sit_ckpt, "--out", png, "--n", "2", "--steps", "2", "--quiet", "--overwrite"])
    assert res.exit_code == 0 and png.read_bytes()[:4] == b"\x89PNG"


def test_reversed_block_range_is_an_error(tiny_sit_ckpt, tmp_path):
    line = _error_line(_run(["layer-grid", tiny_sit_ckpt, "--blocks", "3-1", "--out", tmp_path / "x", "--no-cache",
                             "--quiet"]))
    assert "reversed" in line


def _hold(kind: str, target: Path, seconds: float = 30) -> subprocess.Popen:
    """A second process that holds an output folder."""
    code = {
        "folder": f"from repdyn.commands.outputs import claim_output; from pathlib import Path; "
                  f"claim_output(Path({str(target)!r}), {{'command': 'x'}}); print('ready', flush=True)",
    }[kind] + f"; import time; time.sleep({seconds})"
    p = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.stdout.readline().strip() == "ready"
    return p


def test_two_processes_never_share_an_output_folder(tiny_sit_ckpt, tmp_path):
    out = tmp_path / "busy"
    other = _hold("folder", out)
    try:
        line = _error_line(_run(["layer-grid", tiny_sit_ckpt, "--out", out, "--no-cache", *GRID]))
        assert f"pid {other.pid}" in line and "another probe process" in line
    finally:
        other.kill()
        other.wait()
    # the holder is gone (killed): its stale lock is taken over; its record is of another command
    res = _run(["layer-grid", tiny_sit_ckpt, "--out", out, "--no-cache", "--overwrite", *GRID])
    assert res.exit_code == 0, res.output
    assert not (out / ".repdyn-output.lock").exists()
    rec = json.loads((out / ".repdyn-output.json").read_text())
    assert "layer_grid.csv" in rec["files"]


def test_pca_of_a_latent_model_has_no_input_panel(tmp_path):
    """4-channel latents are no picture: the maps are drawn without the input row (was a TypeError)."""
    from repdyn.training.config import resolve_config
    from repdyn.training.trainer import train

    root = tmp_path / "lat" / "vae-sd"
    (root / "0").mkdir(parents=True)
    rng = np.random.default_rng(0)
    labels = []
    for i in range(20):
        np.save(root / "0" / f"{i}.npy", np.concatenate([rng.normal(size=(4, 8, 8)), np.full((4, 8, 8), 0.1)])
                .astype(np.float32))
        labels.append([f"0/{i}.npy", i % 2])
    (root / "dataset.json").write_text(json.dumps({"labels": labels}))
    data = f"latents:{tmp_path / 'lat'}"
    cfg = resolve_config("sit-tiny", overrides=dict(model_overrides={"depth": 2, "hidden_size": 32}, data=data,
                                                    steps=2, batch_size=4, out=str(tmp_path / "run"), device="cpu",
                                                    ckpt_every=0, log_every=1))
    ck = train(cfg, quiet=True)
    res = _run(["pca", ck, "--images", "0,1", "--out", tmp_path / "pca", "--no-cache", "--quiet"])
    assert res.exit_code == 0, res.output
    warned = [ln for ln in res.output.splitlines() if ln.startswith("warning:")]  # the CLI's one-line warnings
    split = [ln for ln in warned if "no test split" in ln]
    assert len(split) == 1 and all("no test split" in ln or "random initialisation" in ln for ln in warned), res.output
    assert (tmp_path / "pca" / "pca.png").stat().st_size > 1000


def test_default_folders_name_every_setting(tiny_sit_ckpt, tmp_path, monkeypatch):
    """The README's similarity examples, one after another on one checkpoint: each gets its own
    default folder (settings such as --t and --other are part of its name), none asks for --overwrite."""
    monkeypatch.chdir(tmp_path)
    base = ["similarity", tiny_sit_ckpt, "--n", "24", "--blocks", "1,2", "--no-cache", "--quiet"]
    for extra in (["--t", "0.1,0.5"], ["--t", "0.5"], ["--t", "0.5", "--other", tiny_sit_ckpt], ["--t", "0.5"]):
        res = _run([*base, *extra])
        assert res.exit_code == 0, res.output
    folders = sorted((tmp_path / "figures" / "similarity").iterdir())
    assert len(folders) == 3, folders  # the last command repeats the second: same folder, reused
    assert all(f.name.startswith(f"{tiny_sit_ckpt.parent.parent.name}-{tiny_sit_ckpt.stem}-") for f in folders)


@pytest.mark.parametrize("command, where", [
    ("layer-grid", "--out"), ("layer-grid", "--cache"), ("similarity", "--out"), ("similarity", "--cache"),
    ("sample", "--out"), ("sample", "--npz"), ("eval", "--metrics-csv"), ("eval", "--npz"), ("train", "--out"),
])
def test_read_only_output_is_one_line_naming_the_path(tiny_sit_ckpt, tmp_path, read_only_dir, command, where):
    """``read_only_dir`` is a chmod 0555 folder when not root; as root (chmod does not stop root) a
    read-only file system is simulated by making os.mkdir / os.open raise EROFS inside it."""
    target = read_only_dir / ("out.png" if command == "sample" and where == "--out" else
                              "x.npz" if where == "--npz" else "m.csv" if where == "--metrics-csv" else "sub")
    default = {"--out": tmp_path / "out", "--cache": tmp_path / "cache"}
    if command == "sample":
        default["--out"] = tmp_path / "s.png"
    default[where] = target
    args = {
        "layer-grid": ["layer-grid", tiny_sit_ckpt, *GRID, "--out", default["--out"], "--cache", default["--cache"]],
        "similarity": ["similarity", tiny_sit_ckpt, "--other-weights", "model", "--n", "8", "--quiet",
                       "--out", default["--out"], "--cache", default["--cache"]],
        "sample": ["sample", tiny_sit_ckpt, "--n", "2", "--steps", "2", "--quiet", "--out", default["--out"]],
        "eval": ["eval", tiny_sit_ckpt, "--n", "2", "--steps", "2", "--quiet", "--no-offline-metrics",
                 "--metrics-csv", tmp_path / "m.csv"],
        "train": ["train", "--preset", "sit-tiny", "--steps", "1", "--batch-size", "8", "--device", "cpu",
                  "--quiet", "--set", "model_overrides.depth=2", "--out", target],
    }[command]
    if command == "eval":
        args += [where, target] if where == "--npz" else []
        args[args.index("--metrics-csv") + 1] = target if where == "--metrics-csv" else tmp_path / "m.csv"
    if command == "sample" and where == "--npz":
        args += ["--npz", target]
    line = _error_line(_run(args))
    assert str(read_only_dir) in line and "not writable" in line, line
    assert "read-only file system" in line or "permission denied" in line, line
    assert not (tmp_path / "cache" / "cells").exists() or not list((tmp_path / "cache" / "cells").iterdir())
    assert not (tmp_path / "s.png").exists() and not (tmp_path / "m.csv").exists()
