import numpy as np
import pytest

from unifluid_jax.models.patchify import patchify, unpatchify


def test_exact_inverse():
    rng = np.random.default_rng(0)
    lat = rng.standard_normal((2, 8, 12, 4)).astype(np.float32)
    tok = patchify(lat, 2)
    assert tok.shape == (2, 4 * 6, 16)
    np.testing.assert_array_equal(np.asarray(unpatchify(tok, 2, grid=(4, 6))), lat)
    tok2 = rng.standard_normal((3, 16, 16)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(patchify(unpatchify(tok2, 2), 2)), tok2)


def test_token_table():
    """Token k = patch (k // gw, k % gw); feature f = (c, pi, qi) channel-major."""
    b, h, w, c, p = 1, 4, 6, 3, 2
    lat = np.zeros((b, h, w, c), np.float32)
    for y in range(h):
        for x in range(w):
            for ch in range(c):
                lat[0, y, x, ch] = 1000 * ch + 10 * y + x  # unique, decodable value
    tok = np.asarray(patchify(lat, p))
    gw = w // p
    for k in range(tok.shape[1]):
        gy, gx = divmod(k, gw)
        for f in range(c * p * p):
            ch, rem = divmod(f, p * p)
            pi, qi = divmod(rem, p)
            assert tok[0, k, f] == lat[0, gy * p + pi, gx * p + qi, ch], (k, f)
    # Explicit first rows of the table for readability: token 0 covers rows 0-1, cols 0-1.
    np.testing.assert_array_equal(tok[0, 0, :4], [0, 1, 10, 11])  # channel 0: (0,0) (0,1) (1,0) (1,1)
    np.testing.assert_array_equal(tok[0, 1, :4], [2, 3, 12, 13])  # token 1: cols 2-3
    np.testing.assert_array_equal(tok[0, 3, 4:8], [1020, 1021, 1030, 1031])  # token 3 = row 1 of grid, ch 1


def test_matches_mar_nchw():
    """Same result as MAR's NCHW implementation applied to the transposed latent."""
    rng = np.random.default_rng(1)
    lat = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    x = lat.transpose(0, 3, 1, 2)
    bsz, c, h, w = x.shape
    p = 2
    x = x.reshape(bsz, c, h // p, p, w // p, p)
    x = np.einsum("nchpwq->nhwcpq", x).reshape(bsz, (h // p) * (w // p), c * p * p)
    np.testing.assert_array_equal(np.asarray(patchify(lat, 2)), x)


def test_bad_shapes():
    with pytest.raises(ValueError, match="multiple of the patch size"):
        patchify(np.zeros((1, 5, 4, 4)), 2)
    with pytest.raises(ValueError, match="square"):
        unpatchify(np.zeros((1, 6, 16)), 2)
