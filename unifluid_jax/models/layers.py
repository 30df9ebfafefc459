"""Gemma building blocks: RMSNorm, embedder, RoPE, attention (GQA, softcap, sliding window, KV cache), GeGLU.

The attention core (XLA einsums or Pallas splash) is in models/attention.py.

Axis letters: B batch, T query length, S key length, N query heads, K kv heads, G = N // K query heads per
kv head, H head dim, D width, F mlp hidden, V vocab. Param shapes follow the official Flax Gemma layout so
checkpoint conversion is at most a transpose. Every module reads its sizes from a `GemmaConfig`.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from unifluid_jax.models.attention import MASK_VALUE, attend, softcap  # noqa: F401 (re-exported)

# Logical axes of one layer's cached keys / values [B, S, K, H].
KV_CACHE_AXES = ("act_batch", "act_length", "act_kv_heads", None)


def _param(module: nn.Module, name: str, init, shape, names, dtype):
    return module.param(name, nn.with_logical_partitioning(init, names), shape, dtype)


def _dense_init(in_axis, out_axis, batch_axis=()):
    return nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                            in_axis=in_axis, out_axis=out_axis, batch_axis=batch_axis)


class RMSNorm(nn.Module):
    """`x * rsqrt(mean(x^2) + eps) * (1 + scale)` in float32, cast back to the input dtype (HF/official)."""
    config: Any

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        scale = _param(self, "scale", nn.initializers.zeros_init(), (x.shape[-1],), ("norm",), cfg.param_dtype)
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + cfg.rms_eps)
        return (y * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)


class Embedder(nn.Module):
    """Token table `input_embedding (V, D)`, shared by the input embedding and the tied output logits."""
    config: Any

    def setup(self):
        cfg = self.config
        # std 1/sqrt(D): inputs (x sqrt(D)) have unit scale and tied logits of unit-RMS hidden states are O(1).
        init = nn.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=1, out_axis=0)
        self.input_embedding = _param(self, "input_embedding", init,
                                      (cfg.vocab_size, cfg.width), ("vocab", "embed"), cfg.param_dtype)

    def encode(self, tokens):
        cfg = self.config
        x = jnp.take(self.input_embedding, tokens, axis=0).astype(cfg.dtype)
        # sqrt(D) is rounded to the activation dtype first (bf16: sqrt(2304) = 48 exactly), as in HF/official.
        x = x * jnp.asarray(cfg.width ** 0.5, dtype=cfg.dtype)
        return nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))

    def decode(self, x):
        cfg = self.config
        logits = jnp.einsum("BTD,VD->BTV", x, self.input_embedding.astype(cfg.dtype),
                            preferred_element_type=jnp.float32)
        logits = softcap(logits, cfg.final_logit_softcap)
        return nn.with_logical_constraint(logits, ("act_batch", "act_length", "act_vocab"))


def apply_rope(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
    """Split-half RoPE (HF `rotate_half`) on x [B, T, heads, H] at integer positions [B, T]."""
    h = x.shape[-1]
    inv_freq = 1.0 / (base ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    sin = jnp.sin(angles)[:, :, None, :].astype(x.dtype)
    cos = jnp.cos(angles)[:, :, None, :].astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class Attention(nn.Module):
    """GQA/MQA self-attention. Query head n uses kv head n // (N / K).

    `attn_mask` [B, T, S] is True where a query may attend, or a masks.SegmentMask (models/attention.py; the
    splash kernel needs that form). In a local layer a key is additionally visible only when
    `q_pos - k_pos < window` (RoPE positions, so padding inside a sequence does not use up the window).
    With a cache, the T new keys/values are written at [cache_index, cache_index + T) and the queries attend
    over the whole cache (S = cache length).
    """
    config: Any
    local: bool

    @nn.compact
    def __call__(self, x, positions, attn_mask, k_positions, cache=None, cache_index=None):
        cfg = self.config
        n, k_heads, h, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.width
        dt = cfg.dtype
        w_q = _param(self, "q_einsum", _dense_init(1, (0, 2)), (n, d, h), ("heads", "embed", "head_dim"),
                     cfg.param_dtype)
        w_kv = _param(self, "kv_einsum", _dense_init(2, (1, 3), 0), (2, k_heads, d, h),
                      (None, "kv_heads", "embed", "head_dim"), cfg.param_dtype)
        w_o = _param(self, "attn_vec_einsum", _dense_init((0, 1), 2), (n, h, d), ("heads", "head_dim", "embed"),
                     cfg.param_dtype)

        q = jnp.einsum("BTD,NDH->BTNH", x, w_q.astype(dt))
        k, v = jnp.einsum("BSD,CKDH->CBSKH", x, w_kv.astype(dt))
        q = nn.with_logical_constraint(q, ("act_batch", "act_length", "act_heads", None))
        k = nn.with_logical_constraint(k, ("act_batch", "act_length", "act_kv_heads", None))
        v = nn.with_logical_constraint(v, ("act_batch", "act_length", "act_kv_heads", None))
        q = apply_rope(q, positions, cfg.rope_base) * jnp.asarray(cfg.query_scale, dt)
        k = apply_rope(k, positions, cfg.rope_base)

        new_cache = None
        if cache is not None:
            idx = (0, cache_index, 0, 0)
            new_cache = {name: nn.with_logical_constraint(
                jax.lax.dynamic_update_slice(cache[name], new.astype(cache[name].dtype), idx), KV_CACHE_AXES)
                for name, new in (("k", k), ("v", v))}
            k, v = new_cache["k"].astype(dt), new_cache["v"].astype(dt)

        out = attend(q, k, v, attn_mask, positions, k_positions, softcap=cfg.attn_logit_softcap,
                     window=cfg.sliding_window if self.local else None,
                     impl="xla" if cache is not None else cfg.attention_impl)  # decode steps: XLA
        out = nn.with_logical_constraint(out, ("act_batch", "act_length", "act_heads", None))
        out = jnp.einsum("BTNH,NHD->BTD", out, w_o.astype(dt))
        return out, new_cache


class MLP(nn.Module):
    """GeGLU: `linear(gelu_tanh(x @ gating[0]) * (x @ gating[1]))`; gating_einsum is (2, F, D)."""
    config: Any

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        f, d, dt = cfg.mlp_dim, cfg.width, cfg.dtype
        w_gate = _param(self, "gating_einsum", _dense_init(2, 1, 0), (2, f, d), (None, "mlp", "embed"),
                        cfg.param_dtype)
        w_lin = _param(self, "linear", _dense_init(0, 1), (f, d), ("mlp", "embed"), cfg.param_dtype)
        gate, up = jnp.einsum("BTD,CFD->CBTF", x, w_gate.astype(dt))
        hidden = jax.nn.gelu(gate, approximate=True) * up
        hidden = nn.with_logical_constraint(hidden, ("act_batch", "act_length", "act_mlp"))
        return jnp.einsum("BTF,FD->BTD", hidden, w_lin.astype(dt))


class Block(nn.Module):
    """`h = x + post_attn_norm(attn(pre_attn_norm(x)))`; `out = h + post_ffw_norm(mlp(pre_ffw_norm(h)))`.

    The post norms exist only when `config.post_norms` (Gemma-2).
    """
    config: Any
    local: bool

    @nn.compact
    def __call__(self, x, positions, attn_mask, k_positions, cache=None, cache_index=None):
        cfg = self.config
        y = RMSNorm(cfg, name="pre_attention_norm")(x)
        y, new_cache = Attention(cfg, self.local, name="attn")(y, positions, attn_mask, k_positions,
                                                               cache, cache_index)
        if cfg.post_norms:
            y = RMSNorm(cfg, name="post_attention_norm")(y)
        x = nn.with_logical_constraint(x + y, ("act_batch", "act_length", "act_embed"))
        y = MLP(cfg, name="mlp")(RMSNorm(cfg, name="pre_ffw_norm")(x))
        if cfg.post_norms:
            y = RMSNorm(cfg, name="post_ffw_norm")(y)
        x = nn.with_logical_constraint(x + y, ("act_batch", "act_length", "act_embed"))
        return x, new_cache


def group_kinds(config) -> tuple[str, ...]:
    """Names of the layers in one scan step: ('local', 'global') for Gemma-2, ('global',) without a window."""
    return ("local", "global") if config.sliding_window is not None else ("global",)


class LayerGroup(nn.Module):
    """One scan step: consecutive layers (a local + global pair for Gemma-2, a single layer otherwise).

    Signature is scan-friendly: (carry x, per-group cache) + broadcast arguments -> (x, new per-group cache).
    """
    config: Any

    @nn.compact
    def __call__(self, x, cache, positions, attn_mask, k_positions, cache_index):
        new_cache = {} if cache is not None else None
        for kind in group_kinds(self.config):
            x, c = Block(self.config, kind == "local", name=kind)(
                x, positions, attn_mask, k_positions, None if cache is None else cache[kind], cache_index)
            if cache is not None:
                new_cache[kind] = c
        return x, new_cache
