"""Shared tiny model + random params for the inference tests."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tests.models.unifluid_fixtures import make_batch, rows, tiny_config
from unifluid_jax.models.unifluid import UniFluid


# The diffusion head's output layer is scaled down (like a freshly initialised head, whose output layer is 0):
# with random weights the AR loop (z -> sampler -> token -> next z) is otherwise chaotic and amplifies float
# reassociation differences (cached vs uncached attention, ~1e-7 relative) beyond 1e-5 within 16 tokens.
HEAD_OUT_GAIN = 0.05


def random_params(model, batch, seed=0):
    """Random weights for every param of `model.init_all` without compiling the init (~70 s for the VAE on a
    busy CPU; shapes come from eval_shape). Norm scales are ~1, biases small, matrices ~N(0, 1/fan_in). Unlike
    the real init nothing is zero: the real diffusion head outputs exactly 0 at init, which would make the
    image tokens ignore their condition."""
    shapes = nn.unbox(jax.eval_shape(functools.partial(model.init, method=UniFluid.init_all),
                                     jax.random.PRNGKey(0), batch))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        if leaf.ndim == 1:
            base = 1.0 if "scale" in name else 0.0
            return jnp.asarray(base + 0.05 * rng.standard_normal(leaf.shape), leaf.dtype)
        fan_in = int(np.prod(leaf.shape[:-1]))
        names = [str(getattr(k, "key", k)) for k in path]
        gain = HEAD_OUT_GAIN if "head" in names and "final_layer" in names else 1.0
        return jnp.asarray(gain * rng.standard_normal(leaf.shape) / np.sqrt(fan_in), leaf.dtype)
    return jax.tree_util.tree_map_with_path(fill, shapes)


@functools.lru_cache(maxsize=None)
def tiny_model():
    """(config, model, params) of the shared tiny UniFluid config."""
    cfg = tiny_config()
    model = UniFluid(cfg)
    return cfg, model, random_params(model, rows(cfg, make_batch()))
