"""probe curves end to end on tiny trained checkpoints: it writes its files, reads the shared
feature cache and answers bad input with one ``error:`` line (the numbers are tested in tests/analysis/)."""

from __future__ import annotations

import pandas as pd
import pytest

from .support import CURVE_ARGS, _ok, _one_line_error, _png

pytestmark = [pytest.mark.usefixtures("single_thread", "small_encoder_cache"), pytest.mark.slow]


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
    blocks = pd.read_csv(run / "curves" / "curves_blocks.csv", dtype={"checkpoint_sha": str})
    # every block (1-4) x 3 checkpoints x (cknna, mutual_knn, lds, cds, rmsc)
    assert len(blocks) == 4 * 3 * 5 and set(blocks.measure) == {"cknna", "mutual_knn", "lds", "cds", "rmsc"}
    assert (blocks.weights == "ema").all() and (blocks.t == 0.5).all() and set(blocks.step) == {10, 20, 30}
    knn = blocks[blocks.measure.isin(["cknna", "mutual_knn"])]
    assert knn.reference.str.startswith("embedded-vit-fashion-mnist").all() and (knn.n == 48).all()
    assert blocks[blocks.measure == "mutual_knn"].value.between(0, 1).all()
    sp = blocks[blocks.measure.isin(["lds", "cds", "rmsc"])]
    assert (sp.n == 8).all() and sp.se.notna().all() and (sp.reference == "8x8 grid").all()
    _png(run / "curves" / "curves_blocks.png")


def test_block_measures_are_added_without_recomputing_the_probes(curves_run, tmp_path, cache):
    """The block measures have their own settings hash: other alignment settings compute only them,
    and --encoder none --no-spatial leaves them out."""
    run, _, _ = curves_run
    before = pd.read_csv(run / "curves" / "curves.csv")
    res = _ok(["curves", run, "--cache", cache, *CURVE_ARGS, "--metrics", "cknna", "--topk", "5"])
    assert "3 of 3 checkpoints computed" in res.output
    pd.testing.assert_frame_equal(pd.read_csv(run / "curves" / "curves.csv"), before)
    blocks = pd.read_csv(run / "curves" / "curves_blocks.csv")
    assert blocks.settings_hash.nunique() == 2 and len(blocks) == 60 + 4 * 3 * 4
    res = _ok(["curves", run, "--cache", cache, *CURVE_ARGS, "--encoder", "none", "--no-spatial"])
    assert "0 of 3 checkpoints computed" in res.output


def test_curves_nothing_new_and_non_sra_flags(curves_run, tiny_sit_ckpt, tmp_path, cache):
    run, _, _ = curves_run
    res = _ok(["curves", run, "--cache", cache, *CURVE_ARGS])
    assert "0 of 3 checkpoints computed" in res.output
    # a baseline run (no SRA config): blocks from default_blocks, or from the flags
    from repdyn.commands.curves import resolve_cells
    from repdyn.model.checkpoint import load_checkpoint

    c = resolve_cells(load_checkpoint(tiny_sit_ckpt))
    assert (c.student_block, c.teacher_block, c.t, c.t_teacher, c.sra, c.source) == (
        1, 3, 0.5, 0.4, False, "default_blocks (no SRA)")
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
