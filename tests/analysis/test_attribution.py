"""repdyn.analysis.attribution: Captum attribution of a probe logit to input patches."""

import numpy as np
import pytest
import torch
from torch import nn

from repdyn.analysis import attribution as A
from repdyn.analysis import plots
from repdyn.core.files import save_figure


class PatchFeatures(nn.Module):
    """Toy frozen backbone: 2x2 patch embedding, tanh, mean-pool over tokens -> (N, D)."""

    def __init__(self, c=1, d=6, p=2):
        super().__init__()
        self.proj = nn.Conv2d(c, d, p, stride=p)
        for q in self.parameters():
            q.requires_grad_(False)

    def forward(self, x):
        return torch.tanh(self.proj(x)).flatten(2).mean(-1)


def test_integrated_gradients_to_patches(tmp_path):
    torch.manual_seed(0)
    backbone = PatchFeatures()
    probe = A.LinearProbe(torch.randn(3, 6), torch.randn(3), mean=torch.zeros(6), std=torch.full((6,), 0.5))
    x = torch.randn(2, 1, 8, 8)
    out = A.probe_attribution(x, backbone, probe, target=[1, 2], n_steps=64, patch_size=2)
    assert out.pixel.shape == (2, 1, 8, 8) and out.patch.shape == (2, 4, 4)
    np.testing.assert_allclose(out.patch.sum((1, 2)), out.pixel.sum((1, 2, 3)), rtol=1e-5, atol=1e-6)
    # completeness: attributions sum to logit(x) - logit(baseline) for the target class
    with torch.no_grad():
        gap = probe(backbone(x)) - probe(backbone(torch.zeros_like(x)))
    np.testing.assert_allclose(out.pixel.sum((1, 2, 3)), gap[[0, 1], [1, 2]].numpy(), atol=2e-3)
    assert np.abs(out.delta).max() < 2e-3
    # a patch the features never see gets no attribution
    masked = lambda inp: backbone(inp * (torch.arange(8) >= 2).float())  # noqa: E731  (columns 0-1 dropped)
    out2 = A.probe_attribution(x, masked, probe, method="saliency")
    assert np.abs(out2.patch[:, :, 0]).max() == 0 and np.abs(out2.patch).max() > 0
    p = save_figure(plots.plot_attribution(x.numpy(), out.patch, targets=out.target,
                                           meta={"model": "toy", "block": 1, "t": 0.5, "protocol": "IG, 64 steps"}),
                    tmp_path / "attr.png")
    assert p.exists()


def test_probe_from_sklearn_and_backbone_feature_fn():
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(1)
    f = rng.normal(size=(60, 5)) * 3 + 1
    y = (f[:, 0] > 1).astype(int) + (f[:, 1] > 1)
    sc = StandardScaler().fit(f)
    clf = LogisticRegression(max_iter=500).fit(sc.transform(f), y)
    probe = A.LinearProbe.from_sklearn(clf, sc)
    np.testing.assert_allclose(probe(torch.tensor(f, dtype=torch.float32)).numpy(),
                               clf.decision_function(sc.transform(f)), atol=1e-4)
    training = pytest.importorskip("repdyn.model.backbone")
    model = training.build_model("SiT-T/4", input_size=8, in_channels=1, num_classes=3)
    eps = torch.randn(1, 1, 8, 8)
    fn = A.backbone_feature_fn(model, block=2, t=0.5, noise=eps, noise_fn=lambda x, e, t: (1 - t) * x + t * e)
    x = torch.randn(3, 1, 8, 8)
    feats = fn(x)
    assert feats.shape == (3, model.config.hidden_size)
    lin = A.LinearProbe(torch.randn(3, model.config.hidden_size))
    out = A.probe_attribution(x, fn, lin, n_steps=8, patch_size=4)
    assert out.patch.shape == (3, 2, 2) and np.isfinite(out.pixel).all()
    assert all(not p.requires_grad for p in model.parameters())
