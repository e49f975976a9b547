"""Fixtures shared by the analysis commands' tests: one feature cache, one curves run."""

from __future__ import annotations

import shutil

import pytest

from .support import CURVE_ARGS, _ok


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("analysis_cache")


# ---------------------------------------------------------------------------------------------
# similarity
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def curves_run(tiny_sra_run, tmp_path_factory, cache, small_encoder_root):
    """`probe curves` on the first two checkpoints, then again after the third one arrives."""
    run = tmp_path_factory.mktemp("curves_run")
    ckpts = sorted((tiny_sra_run / "checkpoints").glob("*.pt"))
    (run / "checkpoints").mkdir()
    for p in ckpts[:2]:
        shutil.copy(p, run / "checkpoints" / p.name)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REPDYN_CACHE", str(small_encoder_root))
        first = _ok(["curves", run, "--cache", cache, *CURVE_ARGS])
        shutil.copy(ckpts[2], run / "checkpoints" / ckpts[2].name)
        second = _ok(["curves", run, "--cache", cache, *CURVE_ARGS])
    return run, first.output, second.output
