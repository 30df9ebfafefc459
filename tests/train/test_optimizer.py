"""optimizer.py: schedule shape, weight-decay mask (biases, norms, 1-D even when scanned), freezing."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from unifluid_jax import config as config_lib
from unifluid_jax.train import optimizer


def _section(**kw):
    s = config_lib.defaults().optimizer
    s.update(kw)
    return s


def test_warmup_then_constant_and_cosine():
    const = optimizer.schedule(_section(lr=1e-3, warmup_steps=10), 100)
    np.testing.assert_allclose([const(0), const(5), const(10), const(99)], [0, 5e-4, 1e-3, 1e-3], rtol=1e-6)
    cos = optimizer.schedule(_section(lr=1e-3, warmup_steps=10, schedule="cosine", end_lr_ratio=0.1), 110)
    np.testing.assert_allclose([cos(10), cos(60), cos(110)], [1e-3, 5.5e-4, 1e-4], rtol=1e-5)


def test_wsd_holds_then_decays_linearly_over_the_last_fraction():
    wsd = optimizer.schedule(_section(lr=1e-3, warmup_steps=10, schedule="wsd", decay_frac=0.25, end_lr_ratio=0.1),
                             100)
    steps = [0, 5, 10, 74, 75, 85, 95, 100, 120]
    np.testing.assert_allclose([wsd(s) for s in steps],
                               [0, 5e-4, 1e-3, 1e-3, 1e-3, 1e-3 - 0.9e-3 * 10 / 25, 1e-3 - 0.9e-3 * 20 / 25, 1e-4, 1e-4],
                               rtol=1e-5)


def _box(shape, names):
    return nn.LogicallyPartitioned(jax.ShapeDtypeStruct(shape, jnp.float32), names)


def test_decay_mask():
    params = {
        "embedder": {"input_embedding": _box((32, 8), ("vocab", "embed"))},
        "layers": {"attn": {"q_einsum": {"w": _box((2, 4, 8, 2), ("layers", "heads", "embed", "head_dim"))}},
                   "pre_attention_norm": {"scale": _box((2, 8), ("layers", "norm"))},
                   "gate": _box((2, 8), ("layers", "embed"))},  # 1-D per layer although 2-D stacked
        "head": {"dense": {"kernel": _box((8, 8), ("embed", "mlp")), "bias": _box((8,), ("mlp",))}},
    }
    mask = optimizer.decay_mask(_section(), params)
    assert mask["embedder"]["input_embedding"] and mask["layers"]["attn"]["q_einsum"]["w"]
    assert not mask["layers"]["pre_attention_norm"]["scale"] and not mask["layers"]["gate"]
    assert mask["head"]["dense"]["kernel"] and not mask["head"]["dense"]["bias"]
    mask = optimizer.decay_mask(_section(no_decay_regexes=("^head/", "embedder")), params)
    assert not mask["head"]["dense"]["kernel"] and not mask["embedder"]["input_embedding"]


def test_frozen_params_get_zero_updates_and_no_state():
    params = {"enc": {"w": jnp.ones((3, 4))}, "dec": {"w": jnp.ones((4, 2)), "b": jnp.ones((2,))}}
    boxed = jax.tree.map(lambda x: nn.LogicallyPartitioned(x, (None,) * x.ndim), params)
    tx, _ = optimizer.make(_section(lr=0.1, frozen_regexes=("^enc/",)), boxed, 10)
    state = tx.init(params)
    assert (3, 4) not in [np.shape(x) for x in jax.tree.leaves(state)]
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, state, params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(new["enc"]["w"], params["enc"]["w"])
    assert not np.allclose(new["dec"]["w"], params["dec"]["w"])


def test_clipping_and_ema():
    params = {"w": jnp.zeros((2, 2))}
    boxed = jax.tree.map(lambda x: nn.LogicallyPartitioned(x, (None, None)), params)
    # With b1 = b2 = 0 and eps = 1 an Adam update is g / (|g| + 1): it shows the gradient's scale.
    tx, _ = optimizer.make(_section(lr=1.0, grad_clip=1.0, b1=0.0, b2=0.0, eps=1.0, weight_decay=0.0),
                           boxed, 10)
    updates, _ = tx.update({"w": jnp.full((2, 2), 100.0)}, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], -0.5 / 1.5, rtol=1e-5)  # clipped to global norm 1: 0.5 each
    assert float(optimizer.global_norm({"a": jnp.full((4,), 2.0)})) == 4.0
    ema = optimizer.ema_update({"w": jnp.zeros(())}, {"w": jnp.ones(())}, 0.9)
    np.testing.assert_allclose(ema["w"], 0.1, rtol=1e-6)
