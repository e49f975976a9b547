"""repdyn.model.frechet: the Frechet distance and its pieces against scipy, and its bootstrap error."""

import numpy as np
import pytest
import scipy.linalg

from repdyn.model import frechet as M


def _features(seed: int, n: int = 300, d: int = 12, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ mix + shift


def test_sqrtm_psd_matches_scipy():
    f = _features(0)
    a = np.cov(f, rowvar=False)
    r = M.sqrtm_psd(a)
    assert np.allclose(r @ r, a, atol=1e-10)
    assert np.allclose(r, scipy.linalg.sqrtm(a).real, atol=1e-8)


def test_frechet_distance_matches_independent_scipy_computation():
    f1, f2 = _features(1), _features(2, shift=0.3)
    mu1, s1 = f1.mean(0), np.cov(f1, rowvar=False)
    mu2, s2 = f2.mean(0), np.cov(f2, rowvar=False)
    ref = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2).real)
    ours = M.frechet_distance_features(f1, f2)
    assert ours > 0.5
    assert ours == pytest.approx(ref, rel=1e-7, abs=1e-9)
    assert M.trace_sqrt_product(s1, s2) == pytest.approx(np.trace(scipy.linalg.sqrtm(s1 @ s2).real), rel=1e-9)


def test_frechet_distance_of_a_set_to_itself_is_zero_and_shift_is_exact():
    f = _features(3)
    assert M.frechet_distance_features(f, f) < 1e-9
    shift = np.linspace(-1, 1, f.shape[1])
    assert M.frechet_distance_features(f, f + shift) == pytest.approx((shift**2).sum(), rel=1e-8)
    with pytest.raises(ValueError, match="mismatched"):
        M.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_fd_bootstrap_se_shrinks_with_more_samples():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(4000, 8))
    mu, sigma = M.feature_statistics(ref)
    small = M.fd_bootstrap_se(rng.normal(0.3, 1, size=(100, 8)), mu, sigma)
    large = M.fd_bootstrap_se(rng.normal(0.3, 1, size=(1600, 8)), mu, sigma)
    assert 0 < large < small / 2  # ~ 1/sqrt(n): 16x the samples, ~1/4 the error
