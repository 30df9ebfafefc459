"""Generation-order schedule and permutation helpers (SPEC 6)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unifluid_jax.models import order


@pytest.mark.parametrize("frac,expected", [
    (0.0, 1.0), (0.1, 1.0), (0.3, 1.0), (0.375, 0.75), (0.45, 0.5), (0.6, 0.0), (0.8, 0.0), (1.0, 0.0)])
def test_annealed_schedule_table(frac, expected):
    total = 1_000_000
    p = order.random_order_prob(int(frac * total), total, "annealed", 0.3, 0.6)
    np.testing.assert_allclose(float(p), expected, atol=1e-6)


@pytest.mark.parametrize("mode,expected", [("random", 1.0), ("raster", 0.0)])
def test_ablation_modes(mode, expected):
    for step in (0, 500, 1000):
        assert float(order.random_order_prob(step, 1000, mode)) == expected


def test_unknown_mode():
    with pytest.raises(ValueError, match="unknown order mode"):
        order.random_order_prob(0, 10, "spiral")


def test_sample_orders_random_raster_and_mixed():
    rng = jax.random.PRNGKey(0)
    raster = order.sample_orders(rng, 64, 16, 0.0)
    np.testing.assert_array_equal(raster, np.broadcast_to(np.arange(16), (64, 16)))
    rand = np.asarray(order.sample_orders(rng, 64, 16, 1.0))
    assert all(sorted(r) == list(range(16)) for r in rand)  # permutations
    assert (rand != np.arange(16)).any(1).mean() > 0.95
    mixed = np.asarray(order.sample_orders(rng, 4000, 16, 0.5))
    assert abs((mixed != np.arange(16)).any(1).mean() - 0.5) < 0.04


def test_gather_scatter_inverse():
    rng = jax.random.PRNGKey(1)
    tokens = jax.random.normal(rng, (3, 16, 5))
    orders = order.sample_orders(rng, 3, 16, 1.0)
    g = order.gather_tokens(tokens, orders)
    for b in range(3):
        for k in range(16):
            np.testing.assert_array_equal(g[b, k], tokens[b, orders[b, k]])
    np.testing.assert_array_equal(order.scatter_tokens(g, orders), tokens)
