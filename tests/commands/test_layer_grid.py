"""`probe layer-grid` end to end on a tiny trained checkpoint, and its bad-input messages."""

from __future__ import annotations

import pandas as pd
import pytest
from typer.testing import CliRunner

from repdyn.cli import app

pytestmark = pytest.mark.usefixtures("single_thread")

runner = CliRunner()


def test_layer_grid_writes_csv_and_png(tiny_sit_ckpt, tmp_path):
    out = tmp_path / "lg"
    args = ["layer-grid", str(tiny_sit_ckpt), "--n-train", "200", "--n-test", "100", "--t", "0.1,0.6",
            "--out", str(out), "--cache", str(tmp_path / "cache"), "--quiet"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    df = pd.read_csv(out / "layer_grid.csv")
    assert len(df) == 5 * 2  # one row per (block, t) cell; block 0 = the input embedding
    assert {"checkpoint", "weights", "block", "t", "log_snr", "accuracy", "probe", "pooling", "label_policy",
            "reg", "holdout", "seed", "n_train", "n_test", "protocol_hash"} <= set(df.columns)
    assert sorted(df.block.unique()) == [0, 1, 2, 3, 4] and sorted(df.t.unique()) == [0.1, 0.6]
    assert (df.weights == "ema").all() and (df.label_policy == "null-class").all() and (df.probe == "torch").all()
    assert df.accuracy.between(0, 1).all() and df.accuracy.max() > 0.3  # 10 classes: well above chance
    assert df[df.t == 0.1].log_snr.min() > df[df.t == 0.6].log_snr.max()
    png = out / "layer_grid.png"
    assert png.exists() and png.read_bytes()[:4] == b"\x89PNG"
    assert "best: block" in res.output and "layer_grid.csv" in res.output
    # the same cells again with another probe: features come from the cache, only the probe runs
    res2 = runner.invoke(app, args[:-3] + ["--probe", "ridge", "--weights", "ema", "--out", str(tmp_path / "r"),
                                          "--cache", str(tmp_path / "cache"), "--quiet"])
    assert res2.exit_code == 0, res2.output
    assert (pd.read_csv(tmp_path / "r" / "layer_grid.csv").probe == "ridge").all()


@pytest.mark.parametrize("extra, message", [
    (["--blocks", "2,9"], "block 9 is out of range"),
    (["--t", "1.5"], "outside the SiT range"),
    (["--probe", "cuml"], "cuML needs a CUDA GPU"),
    (["--data", "digits"], "expects inputs of shape"),
    (["--weights", "best"], "--weights must be ema or model"),
])
def test_layer_grid_bad_input_one_line_error(tiny_sit_ckpt, tmp_path, extra, message):
    out = tmp_path / "bad"
    res = runner.invoke(app, ["layer-grid", str(tiny_sit_ckpt), "--n-train", "20", "--n-test", "10", "--out", str(out),
                              "--no-cache", "--quiet", *extra])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], res.output
    assert not (out / "layer_grid.csv").exists()


def _gray_folder(root, n: int = 12, corrupt: bool = False):
    from PIL import Image

    for split in ("train", "test"):
        for c in range(2):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(n):
                Image.new("L", (12, 12), 60 + 120 * c + i).save(root / split / f"c{c}" / f"{i}.png")
    if corrupt:
        (root / "train" / "c1" / "3.png").write_bytes(b"not an image")


def test_layer_grid_probes_a_grayscale_folder_with_a_one_channel_model(tiny_sit_ckpt, tmp_path):
    """Channels follow the checkpoint: the Fashion-MNIST model (1 channel, 32 px) reads the folder as
    grayscale at 32 px; a corrupt image in it (all 24 train images are read) is one line naming the file."""
    _gray_folder(tmp_path / "gray")
    args = ["layer-grid", str(tiny_sit_ckpt), "--n-train", "24", "--n-test", "10", "--t", "0.5", "--blocks", "1",
            "--probe", "ridge", "--no-cache", "--quiet", "--device", "cpu"]
    res = runner.invoke(app, [*args, "--data", f"folder:{tmp_path / 'gray'}", "--out", str(tmp_path / "ok")])
    assert res.exit_code == 0, res.output
    assert len(pd.read_csv(tmp_path / "ok" / "layer_grid.csv")) == 1
    _gray_folder(tmp_path / "bad", corrupt=True)
    res = runner.invoke(app, [*args, "--data", f"folder:{tmp_path / 'bad'}", "--out", str(tmp_path / "bad_out")])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: cannot read image") and "c1/3.png" in lines[0], res.output
