"""probe align end to end on a tiny trained checkpoint: the embedded encoder (trained once into a
temporary cache) and precomputed features, the tidy table and heatmap, the shared feature cache, and
one ``error:`` line for bad input (the measures are tested in tests/analysis/test_alignment.py)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from .support import _n_cells, _ok, _one_line_error, _png

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.slow]

COMMON = ["--t", "0.2,0.7", "--blocks", "2,4", "--n", "64", "--quiet", "--device", "cpu"]


def test_align_embedded_encoder(tiny_sit_ckpt, tmp_path, cache, small_encoder_cache):
    _ok(["align", tiny_sit_ckpt, "--out", tmp_path / "a", "--cache", cache, *COMMON])
    df = pd.read_csv(tmp_path / "a" / "alignment.csv")
    assert list(df.columns) == ["run", "checkpoint", "checkpoint_sha", "step", "weights", "block", "t", "log_snr",
                                "metric", "value", "encoder", "topk", "n"]
    assert df.checkpoint_sha.nunique() == 1 and (df.weights == "ema").all()  # joinable with probe eval
    assert len(df) == 2 * 2 * 2 and set(df.metric) == {"cknna", "mutual_knn"}
    assert set(df.block) == {2, 4} and set(df.t) == {0.2, 0.7} and (df.n == 64).all() and (df.topk == 10).all()
    assert df.encoder.str.startswith("embedded-vit-fashion-mnist").all()
    assert df.value.between(-1, 1).all() and df[df.metric == "mutual_knn"].value.between(0, 1).all()
    _png(tmp_path / "a" / "alignment.png")
    rec = json.loads((tmp_path / "a" / "encoder.json").read_text())
    assert rec["spec"] == "embedded" and 0 <= rec["test_accuracy"] <= 1
    cells = _n_cells(cache)  # 4 grid cells + 1 encoder cell
    _ok(["align", tiny_sit_ckpt, "--out", tmp_path / "a", "--cache", cache, *COMMON])  # rerun: all cached
    assert _n_cells(cache) == cells
    assert np.allclose(pd.read_csv(tmp_path / "a" / "alignment.csv").value, df.value)


def test_align_precomputed_features_and_tokens(tiny_sit_ckpt, tmp_path, cache):
    from repdyn.datasets.sources import make_dataset

    ds = make_dataset("fashion-mnist", "test")
    x, _ = ds.get_batch(np.arange(len(ds)))
    # the images themselves as 8 x 8 "tokens" of 16 pixels: a known, label-free encoder
    toks = x.reshape(len(ds), 1, 8, 4, 8, 4).permute(0, 2, 4, 1, 3, 5).reshape(len(ds), 64, 16).numpy()
    np.save(tmp_path / "pix.npy", toks.astype(np.float32))
    args = ["align", tiny_sit_ckpt, "--encoder", f"features:{tmp_path / 'pix.npy'}", "--cache", cache, *COMMON,
            "--metrics", "cknna,mutual_knn,cycle_knn"]
    _ok([*args, "--out", tmp_path / "p"])
    df = pd.read_csv(tmp_path / "p" / "alignment.csv")
    assert len(df) == 2 * 2 * 3 and (df.encoder == "features-pix").all()
    _ok([*args, "--tokens", "--out", tmp_path / "tk"])
    tk = pd.read_csv(tmp_path / "tk" / "alignment.csv")
    assert len(tk) == 12 and tk.value.notna().all()
    _png(tmp_path / "tk" / "alignment.png")


def test_align_bad_input(tiny_sit_ckpt, tmp_path, cache):
    base = ["align", tiny_sit_ckpt, "--out", tmp_path / "bad", "--cache", cache, "--quiet", "--t", "0.5",
            "--device", "cpu"]
    _one_line_error(base + ["--n", "8"], "--n 8 is too small for --topk 10")
    _one_line_error(base + ["--metrics", "cosine"], "unknown --metrics cosine")
    _one_line_error(base + ["--encoder", "clip"], "unknown --encoder 'clip'")
    _one_line_error(base + ["--n", "64", "--encoder", f"features:{tmp_path / 'none.npy'}"], "none.npy not found")
    _one_line_error(base + ["--n", "64", "--encoder", f"dinov2-vits14:{tmp_path / 'w.pth'}"],
                    "dl.fbaipublicfiles.com/dinov2")
    np.save(tmp_path / "few.npy", np.zeros((10, 3), np.float32))
    _one_line_error(base + ["--n", "64", "--encoder", f"features:{tmp_path / 'few.npy'}"],
                    "has 10 rows but the test split has 10000 images")
    assert not (tmp_path / "bad" / "alignment.csv").exists()
