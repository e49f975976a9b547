"""probe diversity end to end on tiny trained checkpoints: it writes its files, reads the shared
feature cache and answers bad input with one ``error:`` line (the numbers are tested in tests/analysis/)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from .support import _ok, _png

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.slow]


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
