"""Latent <-> token patchify in the MAR convention (SPEC section 4).

MAR (models/mar.py) works on NCHW latents: reshape (B, c, h/p, p, w/p, p), einsum 'nchpwq->nhwcpq'. Our latents
are NHWC, so the axis moves differ but the result is identical: tokens in raster order of the (h/p, w/p) grid,
each token's features ordered channel-major (c, pi, qi) with pi the row and qi the column inside the patch.
"""
from __future__ import annotations

import math

import jax.numpy as jnp


def patchify(latent, p: int):
    """latent [B,h,w,c] -> tokens [B,(h/p)*(w/p),c*p*p]."""
    if latent.ndim != 4:
        raise ValueError(f"patchify: expected latent [B, h, w, c], got shape {tuple(latent.shape)}")
    b, h, w, c = latent.shape
    if h % p or w % p:
        raise ValueError(f"patchify: latent size {h}x{w} is not a multiple of the patch size {p}")
    x = latent.reshape(b, h // p, p, w // p, p, c)
    x = jnp.transpose(x, (0, 1, 3, 5, 2, 4))  # B, h/p, w/p, c, pi, qi
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def unpatchify(tokens, p: int, grid: tuple[int, int] | None = None):
    """tokens [B,N,c*p*p] -> latent [B,h,w,c]; `grid` = (h/p, w/p), default square."""
    if tokens.ndim != 3:
        raise ValueError(f"unpatchify: expected tokens [B, N, c*p*p], got shape {tuple(tokens.shape)}")
    b, n, d = tokens.shape
    if d % (p * p):
        raise ValueError(f"unpatchify: token dim {d} is not a multiple of p*p = {p * p}")
    if grid is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"unpatchify: {n} tokens is not a square grid; pass grid=(h/p, w/p)")
        grid = (side, side)
    gh, gw = grid
    if gh * gw != n:
        raise ValueError(f"unpatchify: grid {grid} has {gh * gw} cells but there are {n} tokens")
    c = d // (p * p)
    x = tokens.reshape(b, gh, gw, c, p, p)
    x = jnp.transpose(x, (0, 1, 4, 2, 5, 3))  # B, h/p, pi, w/p, qi, c
    return x.reshape(b, gh * p, gw * p, c)
