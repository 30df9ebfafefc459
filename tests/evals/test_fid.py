"""Frechet distance: equals a direct numpy/scipy computation; ~0 for identical sets, > 0 when shifted."""
import warnings

import numpy as np
import pytest
from scipy import linalg

from unifluid_jax.data import shapes
from unifluid_jax.evals import fid


def _direct(a, b):
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean)


def test_feature_stats_streaming_matches_numpy():
    x = np.random.default_rng(0).normal(size=(500, 16)) * 3 + 1
    st = fid.FeatureStats()
    for i in range(0, 500, 64):
        st.update(x[i:i + 64])
    np.testing.assert_allclose(st.mean(), x.mean(0), atol=1e-10)
    np.testing.assert_allclose(st.cov(), np.cov(x, rowvar=False), atol=1e-9)


def test_fd_matches_direct_and_limits():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(400, 12))
    b = rng.normal(size=(300, 12)) @ rng.normal(size=(12, 12)) * 0.5 + 0.3
    ident = lambda x: x  # noqa: E731
    assert fid.compute_fd(ident, a, b, batch_size=50) == pytest.approx(_direct(a, b), rel=1e-8)
    assert abs(fid.compute_fd(ident, a, a)) < 1e-6
    shift = np.arange(12) * 0.1
    # A pure shift leaves the covariance: FD = |shift|^2.
    assert fid.compute_fd(ident, a, a + shift) == pytest.approx((shift ** 2).sum(), rel=1e-6)


def test_singular_covariance(monkeypatch):
    rng = np.random.default_rng(2)
    a = np.zeros((50, 8))
    a[:, :3] = rng.normal(size=(50, 3))  # rank-deficient covariance
    st = fid.FeatureStats().update(a)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        val = fid.frechet_distance(st.mean(), st.cov(), st.mean(), st.cov())
    assert np.isfinite(val) and abs(val) < 1e-3
    # When sqrtm of the product is not finite, both covariances get eps * I (pytorch-fid's fallback).
    calls, real_sqrtm = [], linalg.sqrtm

    def fake_sqrtm(m):
        calls.append(m)
        return np.full_like(m, np.nan) if len(calls) == 1 else real_sqrtm(m)

    monkeypatch.setattr(fid.linalg, "sqrtm", fake_sqrtm)
    s1, s2 = st.cov(), st.cov() * 2
    with pytest.warns(UserWarning, match="singular product"):
        val = fid.frechet_distance(st.mean(), s1, st.mean(), s2, eps=1e-3)
    offset = np.eye(8) * 1e-3
    np.testing.assert_allclose(calls[1], (s1 + offset) @ (s2 + offset))
    assert np.isfinite(val)


def test_shapes_feature_fd():
    imgs = lambda split, n: np.stack([shapes.render(shapes.scene_for_index(split, i)) for i in range(n)])  # noqa: E731
    a, b = imgs("train", 100), imgs("val", 100)
    # A "model" that only draws red objects is far from the data.
    red = np.where(b.any(-1, keepdims=True), np.array([255, 0, 0], np.uint8), b)
    fa, fb, fred = (fid.shapes_features(x) for x in (a, b, red))
    assert fa.shape == (100, 9 * 8 + 3 * 64) and fa.dtype == np.float64
    ident = lambda x: x  # noqa: E731
    with warnings.catch_warnings():  # many feature dims are constant on shapes data: singular covariances
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        same = fid.compute_fd(ident, fa, fa)
        real = fid.compute_fd(ident, fa, fb)
        bad = fid.compute_fd(ident, fa, fred)
        # End to end on images: float [-1, 1] input streamed as an iterable of batches.
        as_float = b.astype(np.float32) / 127.5 - 1.0
        end_to_end = fid.compute_fd(fid.shapes_features, a, iter([as_float[:60], as_float[60:]]))
    assert abs(same) < 1e-6 and 0 < real < bad
    assert end_to_end == pytest.approx(real, rel=1e-6)
