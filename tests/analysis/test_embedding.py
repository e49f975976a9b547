"""repdyn.analysis.embedding: UMAP of chosen cells and AlignedUMAP across t."""

import os

import numpy as np
import pytest

from repdyn.analysis import embedding as E
from repdyn.analysis import plots
from repdyn.core.files import save_figure


def _blobs(seed=0):
    rng = np.random.default_rng(seed)
    labels = np.repeat([0, 1, 2], 15)
    centres = rng.normal(size=(3, 10)) * 6
    feats = {(4, t): centres[labels] + (1 + t) * rng.normal(size=(45, 10)) for t in (0.2, 0.8)}
    return feats, labels


def test_umap_cells(tmp_path):
    """The one real UMAP run (numba JIT costs 15-35 s on the first call of a process)."""
    feats, labels = _blobs()
    emb = E.umap_cells(feats, [(4, 0.2)], n_neighbors=8, seed=0, n_epochs=50)
    e = emb[(4, 0.2)]
    assert e.shape == (45, 2) and np.isfinite(e).all()
    # classes separate: each point's nearest neighbour has its own class
    d = np.linalg.norm(e[:, None] - e[None], axis=-1) + np.eye(45) * 1e9
    assert (labels[d.argmin(1)] == labels).mean() > 0.9
    frame = E.embedding_frame(emb, labels)
    assert list(frame.columns) == ["block", "t", "sample", "x", "y", "label"] and len(frame) == 45
    p = save_figure(plots.plot_umap(emb, labels, class_names=["a", "b", "c"],
                                    meta={"model": "toy", "weights": "ema"}), tmp_path / "umap.png")
    assert p.stat().st_size > 1000


def test_aligned_umap_wiring(monkeypatch):
    """AlignedUMAP gets identity relations between consecutive t and the seed (mocked: no JIT)."""
    import umap

    seen = {}

    class FakeAligned:
        def __init__(self, **kw):
            seen["kw"] = kw

        def fit(self, xs, relations):
            seen["xs"], seen["relations"] = xs, relations
            self.embeddings_ = [x[:, :2] for x in xs]
            return self

    monkeypatch.setattr(umap, "AlignedUMAP", FakeAligned)
    feats, labels = _blobs()
    feats[(4, 0.5)] = feats[(4, 0.2)] * 2
    out = E.aligned_umap(feats, block=4, n_neighbors=8, seed=3)
    assert list(out) == [0.2, 0.5, 0.8] and out[0.5].shape == (45, 2)
    assert len(seen["relations"]) == 2 and seen["relations"][0] == {i: i for i in range(45)}
    assert seen["kw"]["random_state"] == 3 and seen["kw"]["n_components"] == 2
    np.testing.assert_allclose(seen["xs"][0].std(0), 1, atol=1e-4)          # standardised
    with pytest.raises(ValueError, match="at least 2 timesteps"):
        E.aligned_umap(feats, block=4, ts=[0.2])
    with pytest.raises(ValueError, match="sample counts differ"):
        E.aligned_umap({(1, 0.1): np.zeros((10, 3)), (1, 0.2): np.ones((9, 3))}, block=1)


@pytest.mark.skipif(not os.environ.get("REPDYN_SLOW_TESTS"), reason="real AlignedUMAP: ~50 s of numba JIT")
def test_aligned_umap_real():
    feats, labels = _blobs()
    al = E.aligned_umap(feats, block=4, n_neighbors=8, seed=0, n_epochs=50)
    assert set(al) == {0.2, 0.8} and al[0.8].shape == (45, 2) and np.isfinite(al[0.8]).all()
