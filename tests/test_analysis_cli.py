"""The analysis commands end to end on tiny trained checkpoints: each writes its files, reads the
shared feature cache, and answers bad input with one ``error:`` line.

Checkpoints: ``tiny_sit_ckpt`` (baseline SiT-T/4, depth 4, width 64) and ``tiny_sra_run`` (an SRA
run with 3 checkpoints) from ``conftest.py``. Sample counts are tiny: the numbers are not under
test here (``test_similarity.py`` etc. test the estimators), the wiring is.
"""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from cli import app

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.slow]

runner = CliRunner()


def _ok(args: list[str]):
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output + repr(res.exception)
    return res


def _one_line_error(args: list[str], message: str) -> None:
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 2, res.output + repr(res.exception)
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], res.output


def _png(path) -> None:
    assert path.exists() and path.read_bytes()[:4] == b"\x89PNG", path


def _n_cells(cache) -> int:
    return len(json.loads((cache / "manifest.json").read_text())["cells"])


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("analysis_cache")


# ---------------------------------------------------------------------------------------------
# similarity
# ---------------------------------------------------------------------------------------------


def test_similarity_grid_cross_model_and_cache(tiny_sit_ckpt, tmp_path, cache):
    common = ["--t", "0.2,0.7", "--n", "48", "--cache", cache, "--quiet", "--device", "cpu"]
    _ok(["similarity", tiny_sit_ckpt, "--out", tmp_path / "s", *common])
    df = pd.read_csv(tmp_path / "s" / "cka.csv")
    assert len(df) == (4 * 2) ** 2  # the full (blocks*t)^2 grid, tidy
    assert {"block_a", "t_a", "log_snr_a", "block_b", "t_b", "log_snr_b", "cka", "cosine"} <= set(df.columns)
    z = np.load(tmp_path / "s" / "cka.npz")
    m = z["cka"]
    assert m.shape == (8, 8) and np.allclose(np.diag(m), 1) and np.allclose(m, m.T)
    for name in ("cka_grid", "cka_block_by_block", "cka_t_by_t"):
        _png(tmp_path / "s" / f"{name}.png")
    cells = _n_cells(cache)
    # teacher EMA vs student online: the EMA cells come from the cache, only the online ones are new
    _ok(["similarity", tiny_sit_ckpt, "--weights", "ema", "--other-weights", "model", "--out", tmp_path / "x", *common])
    assert _n_cells(cache) == cells + 8
    x = pd.read_csv(tmp_path / "x" / "cross_cka.csv")
    assert len(x) == 64 and set(x.model_b) == {f"{tiny_sit_ckpt.name}:model"}
    same = x[(x.block_a == x.block_b) & (x.t_a == x.t_b)]
    assert same.cka.between(0.5, 1.0 + 1e-9).all()  # EMA (decay 0.9) close to the online weights
    _png(tmp_path / "x" / "cross_cka_grid.png")
    _png(tmp_path / "x" / "cross_cka_same_cell.png")
    # the same checkpoint against itself: identical features, cross CKA == within CKA
    _ok(["similarity", tiny_sit_ckpt, "--other", tiny_sit_ckpt, "--out", tmp_path / "self", *common])
    assert np.allclose(np.load(tmp_path / "self" / "cross_cka.npz")["cka"], m, atol=1e-8)
    assert _n_cells(cache) == cells + 8  # nothing re-extracted


def test_similarity_bad_input(tiny_sit_ckpt, tmp_path, cache):
    base = ["similarity", tiny_sit_ckpt, "--out", tmp_path / "bad", "--cache", cache, "--quiet", "--t", "0.5"]
    _one_line_error(base + ["--n", "3"], "too few samples for the debiased CKA")
    _one_line_error(base + ["--blocks", "9"], "block 9 is out of range")
    _one_line_error(base + ["--weights", "best"], "--weights must be ema or model")
    assert not (tmp_path / "bad" / "cka.csv").exists()


def test_cross_similarity_refuses_mismatched_samples():
    from commands.similarity import cross_similarity
    from probe.grid import GridFeatures

    def grid(n, start=0):
        rng = np.random.default_rng(n + start)
        return GridFeatures(features={(1, 0.5): rng.normal(size=(n, 8)).astype(np.float32)},
                            labels=np.zeros(n, dtype=np.int64), blocks=[1], ts=[0.5], log_snr={0.5: 0.0},
                            meta={"dataset": "fashion-mnist"}, indices=np.arange(start, start + n))

    with pytest.raises(ValueError, match="mismatched sample counts between models: 20 vs 30"):
        cross_similarity(grid(20), grid(30))
    with pytest.raises(ValueError, match="saw different images"):
        cross_similarity(grid(20), grid(20, start=5))
    assert cross_similarity(grid(20), grid(20)).matrix.shape == (1, 1)


# ---------------------------------------------------------------------------------------------
# diversity, pca, umap, attribute
# ---------------------------------------------------------------------------------------------


def test_diversity_writes_terms_for_every_pair_and_t(tiny_sit_ckpt, tmp_path, cache):
    _ok(["diversity", tiny_sit_ckpt, "--t", "0.2,0.7", "--n", "16", "--out", tmp_path, "--cache", cache, "--quiet"])
    rep = pd.read_csv(tmp_path / "diversity.csv")
    assert len(rep) == 6 * 2  # C(4, 2) block pairs x 2 t
    assert rep.orthogonality.between(-1, 1).all() and rep.token_cosine.between(0, 1).all()
    assert rep.dispersion.between(-1, 0).all() and (rep.n_tokens == 64).all()  # 32 px / patch 4 = 8x8 tokens
    np.testing.assert_allclose(rep.diversity, (rep.orthogonality + rep.token_cosine + rep.dispersion) / 3)
    disp = pd.read_csv(tmp_path / "dispersion.csv", keep_default_na=False)
    assert set(disp.block.astype(str)) == {"1", "2", "3", "4", "all"}
    _png(tmp_path / "diversity.png")
    _png(tmp_path / "diversity_vs_t.png")


def test_pca_renders_several_images(tiny_sit_ckpt, tmp_path, cache):
    _ok(["pca", tiny_sit_ckpt, "--images", "5,0,9", "--blocks", "1,4", "--t", "0.1,0.5", "--out", tmp_path,
         "--cache", cache, "--quiet"])
    z = np.load(tmp_path / "pca.npz")
    assert list(z["images"]) == [5, 0, 9]
    rgb = z["rgb_block4_t0.5"]
    assert rgb.shape == (3, 8, 8, 3) and 0 <= rgb.min() and rgb.max() <= 1
    assert z["explained_variance"].shape == (2, 3)
    _png(tmp_path / "pca.png")
    _one_line_error(["pca", tiny_sit_ckpt, "--images", "0,99999", "--out", tmp_path / "b", "--no-cache", "--quiet"],
                    "out of range")


class _FakeAlignedUMAP:
    """Stands in for ``umap.AlignedUMAP`` (its numba JIT costs ~30 s per process; the real one is
    tested in ``test_embedding_attribution.py``): slice i -> its first two principal components."""

    calls: list = []

    def __init__(self, **kw):
        self.kw = kw

    def fit(self, xs, relations):
        type(self).calls.append({"n_slices": len(xs), "relations": relations, **self.kw})
        self.embeddings_ = [np.linalg.svd(x - x.mean(0), full_matrices=False)[0][:, :2] for x in xs]
        return self


def test_umap_cells_and_aligned(tiny_sit_ckpt, tmp_path, cache, monkeypatch):
    import umap

    monkeypatch.setattr(umap, "AlignedUMAP", _FakeAlignedUMAP)
    _ok(["umap", tiny_sit_ckpt, "--cell", "2,0.2", "--aligned-block", "3", "--t", "0.2,0.7", "--n", "40",
         "--n-neighbors", "5", "--out", tmp_path, "--cache", cache, "--quiet"])
    df = pd.read_csv(tmp_path / "umap.csv")  # a real UMAP of the (2, 0.2) cell
    assert len(df) == 40 and {"block", "t", "sample", "x", "y", "label", "index"} <= set(df.columns)
    assert (df.block == 2).all() and (df.t == 0.2).all() and np.isfinite(df[["x", "y"]].to_numpy()).all()
    al = pd.read_csv(tmp_path / "umap_aligned.csv")
    assert len(al) == 80 and set(al.t) == {0.2, 0.7} and (al.block == 3).all()
    call = _FakeAlignedUMAP.calls[-1]
    assert call["n_slices"] == 2 and call["n_neighbors"] == 5 and call["relations"][0] == {i: i for i in range(40)}
    _png(tmp_path / "umap.png")
    _png(tmp_path / "umap_aligned.png")
    _one_line_error(["umap", tiny_sit_ckpt, "--cell", "2", "--out", tmp_path / "b", "--quiet"], "a cell is 'block,t'")


def test_attribute_writes_patch_maps(tiny_sit_ckpt, tmp_path, cache):
    res = _ok(["attribute", tiny_sit_ckpt, "--block", "2", "--t", "0.2", "--images", "0,1,2", "--probe", "ridge",
               "--n-train", "200", "--n-test", "64", "--n-steps", "4", "--out", tmp_path, "--cache", cache, "--quiet"])
    assert "test accuracy at block 2" in res.output
    rows = pd.read_csv(tmp_path / "attribution.csv")
    assert list(rows["index"]) == [0, 1, 2] and (rows.block == 2).all() and (rows.t == 0.2).all()
    assert rows.probe_accuracy.between(0, 1).all()
    z = np.load(tmp_path / "attribution.npz")
    assert z["patch"].shape == (3, 8, 8) and z["pixel"].shape == (3, 1, 32, 32)
    assert np.abs(z["patch"]).sum() > 0
    _png(tmp_path / "attribution.png")


def test_attribute_probe_matches_cached_features(tiny_sit_ckpt, cache):
    """The attributed forward is the probed one: feature_fn on the test images reproduces the cache."""
    import torch

    from analysis.attribution import backbone_feature_fn
    from commands.common import FeatureSpec, load_features, load_for_analysis
    from probe.grid import grid_noise, load_x0

    spec = FeatureSpec(n=8, cache_dir=cache, progress=False, device="cpu")
    ck = load_for_analysis(tiny_sit_ckpt, "ema", spec)
    ds, g = load_features(ck, spec, blocks=[2], ts=[0.2], n=8)
    x0 = load_x0(ds, g.indices, 0, "test")
    eps = grid_noise(g.indices, (1, 32, 32), 0, "test")
    fn = backbone_feature_fn(ck.model, 2, 0.2, eps, lambda x, e, t: ck.objective.corrupt(x, torch.full((len(x),), t), e))
    with torch.no_grad():
        np.testing.assert_allclose(fn(x0).numpy(), g.features[(2, 0.2)], atol=2e-2, rtol=1e-2)  # fp16 cache


# ---------------------------------------------------------------------------------------------
# curves, correlate
# ---------------------------------------------------------------------------------------------

CURVE_ARGS = ["--probe", "ridge", "--n-train", "100", "--n-test", "48", "--n-div", "8", "--quiet", "--device", "cpu"]


@pytest.fixture(scope="module")
def curves_run(tiny_sra_run, tmp_path_factory, cache):
    """`probe curves` on the first two checkpoints, then again after the third one arrives."""
    run = tmp_path_factory.mktemp("curves_run")
    ckpts = sorted((tiny_sra_run / "checkpoints").glob("*.pt"))
    (run / "checkpoints").mkdir()
    for p in ckpts[:2]:
        shutil.copy(p, run / "checkpoints" / p.name)
    first = _ok(["curves", run, "--cache", cache, *CURVE_ARGS])
    shutil.copy(ckpts[2], run / "checkpoints" / ckpts[2].name)
    second = _ok(["curves", run, "--cache", cache, *CURVE_ARGS])
    return run, first.output, second.output


def test_curves_student_teacher_and_incremental(curves_run):
    run, first, second = curves_run
    assert "2 of 2 checkpoints computed" in first and "1 of 3 checkpoints computed" in second
    # SRA config of the run: default blocks for depth 4 are 1 -> 3, t_max 0.2: t 0.5, teacher t 0.4
    assert "student block 1 @ t=0.5, teacher block 3 @ t=0.4 (SRA config)" in second
    df = pd.read_csv(run / "curves" / "curves.csv", dtype={"checkpoint_sha": str})
    assert len(df) == 6 and sorted(df.step.unique()) == [10, 20, 30]
    st = df[df.role == "student"].iloc[0]
    te = df[df.role == "teacher"].iloc[0]
    assert (st.weights, st.block, st.t) == ("model", 1, 0.5) and (te.weights, te.block, te.t) == ("ema", 3, 0.4)
    assert df.accuracy.between(0, 1).all() and df.checkpoint_sha.str.len().eq(16).all()
    sim = pd.read_csv(run / "curves" / "curves_similarity.csv")
    assert len(sim) == 3 and sim.cka_mean_offdiag.between(-0.5, 1.0 + 1e-9).all()
    assert sim[["cka_student_teacher", "orthogonality", "token_cosine", "dispersion", "diversity"]].notna().all().all()
    _png(run / "curves" / "curves.png")
    _png(run / "curves" / "curves_similarity.png")


def test_curves_nothing_new_and_non_sra_flags(curves_run, tiny_sit_ckpt, tmp_path, cache):
    run, _, _ = curves_run
    res = _ok(["curves", run, "--cache", cache, *CURVE_ARGS])
    assert "0 of 3 checkpoints computed" in res.output
    # a baseline run (no SRA config): blocks from default_blocks, or from the flags
    from commands.curves import resolve_cells
    from training.checkpoint import load_checkpoint

    ks, kt, t, tt, info = resolve_cells(load_checkpoint(tiny_sit_ckpt))
    assert (ks, kt, t, tt, info["sra"], info["source"]) == (1, 3, 0.5, 0.4, False, "default_blocks (no SRA)")
    base_run = tiny_sit_ckpt.parent.parent
    res = _ok(["curves", base_run, "--student-block", "2", "--teacher-block", "4", "--t", "0.6", "--t-teacher", "0.3",
               "--out", tmp_path / "b", "--cache", cache, *CURVE_ARGS])
    assert "student block 2 @ t=0.6, teacher block 4 @ t=0.3 (flags)" in res.output
    df = pd.read_csv(tmp_path / "b" / "curves.csv")
    assert len(df) == 2 and set(df.role) == {"student", "teacher"} and set(df.block) == {2, 4}
    with pytest.raises(ValueError, match="noisier than"):
        resolve_cells(load_checkpoint(tiny_sit_ckpt), t=0.3, t_teacher=0.6)


def test_curves_bad_input(tmp_path):
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    _one_line_error(["curves", tmp_path / "empty", "--quiet"], "no checkpoints in")
    _one_line_error(["curves", tmp_path / "missing", "--quiet"], "does not exist")


def _metrics_csv(run, path, values) -> None:
    """A metrics table with probe eval's key columns (checkpoint_keys) and a generation metric."""
    from training.checkpoint import list_checkpoints, load_checkpoint
    from training.evaluation import checkpoint_keys

    rows = [{**checkpoint_keys(load_checkpoint(p)), "fd_fashion-mnist": v}
            for p, v in zip(list_checkpoints(run), values)]
    pd.DataFrame(rows).to_csv(path, index=False)


def test_correlate_joins_on_checkpoint_sha(curves_run, tmp_path):
    run, _, _ = curves_run
    metrics = tmp_path / "eval_metrics.csv"
    _metrics_csv(run, metrics, [90.0, 70.0, 50.0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = runner.invoke(app, ["correlate", str(run / "curves" / "curves.csv"), str(metrics), "--metric",
                                  "fd_fashion-mnist", "--role", "student", "--n-boot", "200",
                                  "--out", str(tmp_path / "c"), "--pdf"])
    assert res.exit_code == 0, res.output
    assert "joined 3 checkpoints on ckpt_sha" in res.output and "only 3 points" in res.output
    tab = pd.read_csv(tmp_path / "c" / "correlation.csv")
    assert {"pearson", "spearman", "kendall"} <= set(tab.method) and (tab.n == 3).all()
    assert (tab.join_key == "ckpt_sha").all() and (tab.role == "student").all()
    joined = pd.read_csv(tmp_path / "c" / "joined.csv")
    acc = pd.read_csv(run / "curves" / "curves.csv").query("role == 'student'").sort_values("step")
    np.testing.assert_allclose(joined.sort_values("step").accuracy, acc.accuracy)
    np.testing.assert_allclose(joined.sort_values("step")["fd_fashion-mnist"], [90.0, 70.0, 50.0])
    _png(tmp_path / "c" / "correlation.png")
    assert (tmp_path / "c" / "correlation.pdf").exists()


def test_correlate_bad_input(curves_run, tmp_path):
    run, _, _ = curves_run
    curves_csv = run / "curves" / "curves.csv"
    metrics = tmp_path / "m.csv"
    _metrics_csv(run, metrics, [1.0, 2.0, 3.0])
    base = ["correlate", curves_csv, metrics, "--out", tmp_path / "c"]
    _one_line_error(base + ["--metric", "fid", "--role", "student"], "has no column 'fid'")
    _one_line_error(base + ["--metric", "fd_fashion-mnist"], "several probe rows per checkpoint")
    pd.read_csv(metrics).assign(fid=np.nan).to_csv(metrics, index=False)
    _one_line_error(base + ["--metric", "fid", "--role", "student"], "is empty")
    pd.read_csv(metrics).iloc[:2].to_csv(metrics, index=False)
    _one_line_error(base + ["--metric", "fd_fashion-mnist", "--role", "student"], "at least 3 paired points")
    _one_line_error(["correlate", curves_csv, tmp_path / "nope.csv", "--metric", "fid"], "does not exist")
    assert not (tmp_path / "c" / "correlation.csv").exists()
