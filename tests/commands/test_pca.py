"""probe pca end to end on tiny trained checkpoints: it writes its files, reads the shared
feature cache and answers bad input with one ``error:`` line (the numbers are tested in tests/analysis/)."""

from __future__ import annotations

import numpy as np
import pytest

from .support import _ok, _one_line_error, _png

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.slow]


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
