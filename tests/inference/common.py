"""Shared tiny model + params for the inference tests (random weights, made non-degenerate)."""
import functools

import flax.linen as nn
import jax
import numpy as np

from tests.models.unifluid_fixtures import make_batch, tiny_config
from unifluid_jax.models.unifluid import UniFluid


@functools.lru_cache(maxsize=None)
def tiny_model():
    """(config, model, params). Zero-initialised leaves (diffusion-head adaLN / final layer, biases) get small
    random values: at init the head outputs exactly 0, which would make the image tokens ignore the condition."""
    cfg = tiny_config()
    model = UniFluid(cfg)
    params = nn.unbox(jax.jit(functools.partial(model.init, method=UniFluid.init_all))(
        jax.random.PRNGKey(0), make_batch()))
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    leaves = [x + 0.05 * jax.random.normal(k, x.shape, x.dtype) if not np.any(np.asarray(x)) else x
              for x, k in zip(leaves, keys)]
    return cfg, model, jax.tree.unflatten(treedef, leaves)
