"""DiverseDiT diversity terms (docs/methods.md, "DiverseDiT: official behaviour") and the per-pair report."""

import numpy as np
import pytest
import torch

from repdyn.analysis import diversity as D


def _feats(seed=0, n=3, t=5, d=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, t, d, generator=g, dtype=torch.float64)


def test_orthogonality_signed_cosine_of_means():
    a = _feats(0) + 1.0
    assert float(D.orthogonality(a, a)) == pytest.approx(1.0)
    assert float(D.orthogonality(a, -a)) == pytest.approx(-1.0)       # signed, not |.|
    e1 = torch.zeros(2, 3, 4, dtype=torch.float64); e1[..., 0] = 1
    e2 = torch.zeros(2, 3, 4, dtype=torch.float64); e2[..., 1] = 1
    assert float(D.orthogonality(e1, e2)) == pytest.approx(0.0)
    # pooled over batch AND tokens: only the grand mean matters
    b = a.clone(); b[0], b[1] = a[1], a[0]
    assert float(D.orthogonality(a, b)) == pytest.approx(1.0)


def test_token_cosine_abs_after_mean():
    a = _feats(1)
    assert float(D.token_cosine(a, -a)) == pytest.approx(1.0)
    b = a.clone()
    b[:, ::2] *= -1                      # flip signs of half the token positions (odd count: 3 of 5)
    per_token = torch.nn.functional.cosine_similarity(a.reshape(-1, 8), b.reshape(-1, 8), dim=1)
    assert float(D.token_cosine(a, b)) == pytest.approx(float(per_token.mean().abs()))
    assert float(D.token_cosine(a, b)) < 0.5      # mean of |cos| would be 1.0


def test_channel_dispersion_definition():
    # even channels: every column has the same L1/L2 ratio -> zero variance
    x = torch.ones(2, 4, 6, dtype=torch.float64)
    assert float(D.channel_dispersion([x, x])) == pytest.approx(0.0)
    # hand computation on a random pair
    a, b = _feats(2), _feats(3)
    def usage(f):
        flat = f.reshape(-1, f.shape[-1])
        return (flat / flat.norm(dim=0)).abs().mean(0)
    u = (usage(a) + usage(b)) / 2
    u = u / u.max()
    expected = -min(float(((u - u.mean()) ** 2).mean()) / 0.25, 1.0)
    assert float(D.channel_dispersion([a, b])) == pytest.approx(expected, rel=1e-6)
    # a peaky channel (one token active) lowers usage for that channel -> more negative
    c = torch.ones(1, 16, 4, dtype=torch.float64); c[0, 1:, 0] = 0
    assert float(D.channel_dispersion([c])) < -0.1
    assert -1.0 <= float(D.channel_dispersion([a, b, _feats(7).abs() ** 3])) <= 0.0


def test_differentiable_and_upcasts_half_precision():
    a = _feats(4, n=2, t=3, d=5).requires_grad_(True)
    b = _feats(5, n=2, t=3, d=5).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, y: D.orthogonality(x, y), (a, b))
    assert torch.autograd.gradcheck(lambda x, y: D.token_cosine(x, y), (a, b))
    assert torch.autograd.gradcheck(lambda x, y: D.channel_dispersion([x, y]), (a, b))
    h = _feats(6).to(torch.bfloat16)
    assert D.orthogonality(h, h).dtype == torch.float32  # half-precision features are upcast


def test_report_matches_pure_functions():
    rng = np.random.default_rng(0)
    blocks, ts = [1, 2, 4], [0.25, 0.75]
    feats = {(b, t): rng.normal(size=(4, 6, 8)).astype(np.float32) + 0.3 * b for b in blocks for t in ts}
    rep = D.diversity_report(feats, log_snr={0.25: 1.1, 0.75: -1.1})
    assert len(rep) == 3 * 2 and {"t", "log_snr", "block_a", "block_b", "orthogonality", "token_cosine",
                                    "dispersion", "diversity"} <= set(rep.columns)
    row = rep[(rep.t == 0.75) & (rep.block_a == 2) & (rep.block_b == 4)].iloc[0]
    a = torch.as_tensor(feats[(2, 0.75)], dtype=torch.float64)
    b = torch.as_tensor(feats[(4, 0.75)], dtype=torch.float64)
    assert row.orthogonality == pytest.approx(float(D.orthogonality(a, b)), abs=1e-9)
    assert row.token_cosine == pytest.approx(float(D.token_cosine(a, b)), abs=1e-9)
    assert row.dispersion == pytest.approx(float(D.channel_dispersion([a, b])), abs=1e-9)
    m, labels = D.pair_matrix(rep, "token_cosine", 0.75)
    assert labels == blocks and m[1, 2] == m[2, 1] == pytest.approx(row.token_cosine) and np.isnan(m[0, 0])
    disp = D.dispersion_table(feats)
    assert len(disp) == 2 * 4 and (disp.dispersion <= 0).all()
    # pooled (N, D) features are accepted (T = 1)
    pooled = {k: v.mean(1) for k, v in feats.items()}
    assert len(D.diversity_report(pooled)) == 6


def test_report_errors():
    feats = {(1, 0.5): np.zeros((2, 3, 4)), (2, 0.5): np.zeros((2, 3, 5))}
    with pytest.raises(ValueError, match="different shapes"):
        D.diversity_report(feats)
    with pytest.raises(ValueError, match="lack cells"):
        D.diversity_report({(1, 0.5): np.zeros((2, 3, 4))}, blocks=[1, 2])
    with pytest.raises(ValueError, match="same \\(N, T, D\\) shape"):
        D.token_cosine(torch.zeros(2, 3, 4), torch.zeros(2, 4, 4))
