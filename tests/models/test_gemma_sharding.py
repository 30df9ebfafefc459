"""Gemma on the 8-device CPU mesh (data x fsdp x tensor = 2 x 2 x 2): sharded params, same logits as 1 device."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unifluid_jax.models import gemma, masks
from unifluid_jax.train import sharding


def _shard_shape(arr):
    shapes = {tuple(s.data.shape) for s in arr.addressable_shards}
    assert len(shapes) == 1 and len(arr.addressable_shards) == 8, shapes
    return shapes.pop()


def _forward(model, params, tokens, input_mask, mask_ar):
    return model.apply({"params": params}, tokens, input_mask, mask_ar, method="forward")


def _step(model, params, cache, full_mask, toks, pos, idx):
    def f(m):
        h, c = m(m.embed(toks), pos, masks.cache_step_mask(full_mask, idx, toks.shape[1]), cache, idx)
        return m.logits(h), c
    return nn.apply(f, model)({"params": params})


def test_sharded_params_forward_and_cache_match_single_device(mesh8):
    cfg = gemma.get_config("gemma2_tiny")
    model = gemma.Gemma(cfg)
    rules = sharding.DEFAULT_RULES
    init = functools.partial(gemma.init_params, model, seq_len=8)
    fwd = jax.jit(functools.partial(_forward, model))
    key = jax.random.key(0)
    rng = np.random.RandomState(0)
    tokens = rng.randint(0, cfg.vocab_size, size=(4, 12))
    input_mask = np.ones((4, 12), bool)
    input_mask[3, 9:] = False
    mask_ar = np.concatenate([np.zeros((4, 4), int), np.ones((4, 8), int)], axis=1)  # prefix-LM
    full_mask = masks.make_attention_mask(input_mask, mask_ar)
    positions = masks.positions_from_mask(input_mask)

    ref_params = nn.unbox(jax.jit(init)(key))  # one device
    ref = np.asarray(fwd(ref_params, tokens, input_mask, mask_ar))

    # jax.set_mesh, not `with mesh8:` -- flax only applies logical constraints when jax's abstract mesh is set
    # (with jax 0.10 / flax 0.12 a bare `with mesh:` silently turns every nn.with_logical_constraint into a no-op).
    with jax.set_mesh(mesh8), nn.logical_axis_rules(rules):
        shardings = sharding.param_shardings(mesh8, jax.eval_shape(init, key), rules)
        params = nn.unbox(jax.jit(init, out_shardings=shardings)(key))
        out = fwd(params, tokens, input_mask, mask_ar)
        assert "sharding_constraint" in fwd.lower(params, tokens, input_mask, mask_ar).as_text()  # constraints live
        # cached: prefill the prefix + 4 tokens, then one block of 4
        step = jax.jit(functools.partial(_step, model))
        cache_shardings = sharding.logical_sharding(mesh8, gemma.cache_logical_axes(cfg), rules)
        cache = jax.device_put(model.init_cache(4, 12), cache_shardings)
        first, cache = step(params, cache, full_mask, tokens[:, :8], positions[:, :8], jnp.int32(0))
        second, cache = step(params, cache, full_mask, tokens[:, 8:], positions[:, 8:], jnp.int32(8))

    # params are really sharded: vocab/heads/mlp over tensor (2), embed over fsdp (2), layers replicated
    assert _shard_shape(params["embedder"]["input_embedding"]) == (128, 32)
    attn = params["layers"]["local"]["attn"]
    assert attn["q_einsum"].shape == (2, 4, 64, 16) and _shard_shape(attn["q_einsum"]) == (2, 2, 32, 16)
    assert _shard_shape(attn["kv_einsum"]) == (2, 2, 2, 32, 16)  # kv_heads replicated by default
    assert _shard_shape(attn["attn_vec_einsum"]) == (2, 2, 16, 32)
    mlp = params["layers"]["global"]["mlp"]
    assert _shard_shape(mlp["gating_einsum"]) == (2, 2, 64, 32)
    assert _shard_shape(mlp["linear"]) == (2, 64, 32)
    assert _shard_shape(params["final_norm"]["scale"]) == (64,)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # same init values, just placed

    # the cache stays batch-sharded over data x fsdp (4) through the steps
    assert _shard_shape(cache["layers"]["local"]["k"]) == (2, 1, 12, 2, 16)
    assert _shard_shape(cache["pos"]) == (1, 12)
    valid = input_mask
    np.testing.assert_allclose(np.asarray(out)[valid], ref[valid], atol=1e-5, rtol=0)
    stepped = np.concatenate([first, second], axis=1)
    np.testing.assert_allclose(stepped[valid], ref[valid], atol=1e-5, rtol=0)
