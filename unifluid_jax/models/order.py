"""Image-token generation order (SPEC 6, RAR): the per-example permutation and its training schedule.

An order is a permutation `p` [n] of the raster positions: the k-th generated token is the one at raster
position p(k). Training anneals from fully random orders to raster (paper section 4.1): random-order
probability 1 until `random_until` of training, falling linearly to 0 at `raster_from`, 0 afterwards.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

MODES = ("annealed", "random", "raster")


def random_order_prob(step, total_steps: int, mode: str = "annealed", random_until: float = 0.3,
                      raster_from: float = 0.6):
    """Probability that an example at `step` gets a random order (a traced step is fine)."""
    if mode == "random":
        return jnp.float32(1.0)
    if mode == "raster":
        return jnp.float32(0.0)
    if mode != "annealed":
        raise ValueError(f"unknown order mode {mode!r}; choose one of {MODES}")
    frac = jnp.asarray(step, jnp.float32) / float(max(total_steps, 1))
    span = max(raster_from - random_until, 1e-9)
    return jnp.clip((raster_from - frac) / span, 0.0, 1.0)


def sample_orders(rng, batch: int, n: int, random_prob) -> jax.Array:
    """[B, n] int32 orders: each row a uniform random permutation with prob `random_prob`, else raster."""
    k_perm, k_coin = jax.random.split(rng)
    raster = jnp.arange(n, dtype=jnp.int32)
    perms = jax.vmap(lambda k: jax.random.permutation(k, n))(jax.random.split(k_perm, batch))
    use_random = jax.random.uniform(k_coin, (batch,)) < random_prob
    return jnp.where(use_random[:, None], perms.astype(jnp.int32), raster[None])


def raster_orders(batch: int, n: int) -> jax.Array:
    return jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (batch, n))


def gather_tokens(tokens, order):
    """tokens [B, n, C] in raster order -> [B, n, C] in generation order (row k = token at p(k))."""
    return jnp.take_along_axis(tokens, order[..., None], axis=1)


def scatter_tokens(tokens_in_order, order):
    """Inverse of `gather_tokens`: generation order -> raster order."""
    inv = jnp.argsort(order, axis=-1)
    return jnp.take_along_axis(tokens_in_order, inv[..., None], axis=1)
