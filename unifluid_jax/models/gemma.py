"""Gemma-1 / Gemma-2 decoder (SPEC section 2) in Flax Linen, with scanned layers and a KV cache.

Python API (build a model, load weights, run to logits)::

    import jax, jax.numpy as jnp
    from unifluid_jax.models import gemma
    from unifluid_jax.convert import gemma as gemma_convert

    cfg = gemma.get_config("gemma2_2b", dtype="bfloat16")          # or config_from_dict(config.gemma)
    model = gemma.Gemma(cfg)
    params = gemma_convert.load_hf_checkpoint("/path/to/gemma-2-2b", cfg)   # HF save_pretrained folder
    # or: gemma_convert.params_from_hf(torch_model.state_dict(), cfg)
    #     gemma_convert.params_from_flax(orbax_tree, cfg); gemma_convert.params_from_big_vision(npz, cfg)
    # or random: params = nn.unbox(gemma.init_params(model, jax.random.key(0)))
    logits = model.apply({"params": params}, tokens, method="forward")   # causal LM, [B, T, V] float32

Lower-level entry points used by the unified model (all via `model.apply(..., method=...)`):
    embed(tokens) -> [B, T, D]                      scaled by sqrt(D); raises on ids >= vocab (outside jit)
    __call__(x, positions, attn_mask, cache=None, cache_index=None) -> (hidden [B, T, D], new_cache)
    logits(hidden) -> [B, T, V] float32             tied embedding + final softcap
    init_cache(config, batch, max_len, dtype) -> cache (a plain function, no params needed)

Masks: `attn_mask` [B, T, S] bool (True = may attend; see models/masks.py) or a masks.SegmentMask
(segment_ids, mask_ar), which `attention_impl='splash'` needs (models/attention.py). The sliding window of
local layers (even layer index) is applied inside the layers from RoPE positions: key s is visible to query
t iff `pos_t - pos_s < window`; the cache therefore also stores key positions.

Param tree (`scan_layers=True`): `embedder/input_embedding (V, D)`, `final_norm/scale (D,)`, and
`layers/{local,global}/...` with a leading layer-group axis (Gemma-2 scans (local, global) pairs, so G = L/2;
without a window only `layers/global` with G = L). Per block: `pre_attention_norm/scale`,
`attn/{q_einsum (N, D, H), kv_einsum (2, K, D, H), attn_vec_einsum (N, H, D)}`, `post_attention_norm/scale`,
`pre_ffw_norm/scale`, `mlp/{gating_einsum (2, F, D), linear (F, D)}`, `post_ffw_norm/scale` (post norms only
when `post_norms`). With `scan_layers=False` the blocks are `layer_0 .. layer_{L-1}` (official Flax names).

Cache: `{'pos': int32 [B, S], 'layers': {kind: {'k', 'v': [G, B, S, K, H]}}}` when scanned,
`{'pos', 'layers': {'layer_i': {'k', 'v': [B, S, K, H]}}}` otherwise; `cache_logical_axes(config)` gives its
logical PartitionSpecs. 'pos' holds the RoPE position of every written key (used by the sliding window).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from unifluid_jax.config import ConfigError, check
from unifluid_jax.models import attention, layers
from unifluid_jax.models.masks import SegmentMask, positions_from_mask

DTYPES = ("float32", "bfloat16", "float16")
# 'none': no rematerialisation; 'full': save nothing; otherwise a name in jax.checkpoint_policies.
REMAT_POLICIES = ("none", "full", "nothing_saveable", "everything_saveable", "dots_saveable",
                  "checkpoint_dots", "dots_with_no_batch_dims_saveable", "checkpoint_dots_with_no_batch_dims")


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
    num_layers: int
    width: int  # D
    num_heads: int  # N
    num_kv_heads: int  # K
    head_dim: int  # H
    mlp_dim: int  # F
    vocab_size: int = 256000
    query_scale: float | None = None  # None -> head_dim ** -0.5 (resolved on construction)
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    sliding_window: int | None = None  # local layers = even layer index
    post_norms: bool = False
    rms_eps: float = 1e-6
    rope_base: float = 10000.0
    dtype: str = "float32"  # compute / activation dtype
    param_dtype: str = "float32"
    remat_policy: str = "none"
    scan_layers: bool = True
    # 'xla' | 'splash' (Pallas TPU kernel; needs a SegmentMask, no cache) | 'splash_interpret' (models/attention.py)
    attention_impl: str = "xla"

    def __post_init__(self):
        for f in ("dtype", "param_dtype"):
            v = getattr(self, f)
            try:
                object.__setattr__(self, f, jnp.dtype(v).name)
            except TypeError as e:
                raise ConfigError(f"config.gemma.{f}: unknown dtype {v!r}; choose one of {list(DTYPES)}") from e
        _check_values(dataclasses.asdict(self), "gemma")
        if self.query_scale is None:
            object.__setattr__(self, "query_scale", float(self.head_dim) ** -0.5)

    @property
    def num_groups(self) -> int:
        """Scan length: layer pairs for windowed (Gemma-2) models, layers otherwise."""
        return self.num_layers // len(layers.group_kinds(self))


_GEMMA2 = dict(vocab_size=256000, attn_logit_softcap=50.0, final_logit_softcap=30.0, sliding_window=4096,
               post_norms=True)
VARIANTS: dict[str, dict[str, Any]] = {
    "gemma1_2b": dict(num_layers=18, width=2048, num_heads=8, num_kv_heads=1, head_dim=256, mlp_dim=16384,
                      vocab_size=256000),
    "gemma2_2b": dict(num_layers=26, width=2304, num_heads=8, num_kv_heads=4, head_dim=256, mlp_dim=9216,
                      **_GEMMA2),
    "gemma2_9b": dict(num_layers=42, width=3584, num_heads=16, num_kv_heads=8, head_dim=256, mlp_dim=14336,
                      **_GEMMA2),
    # 27B scales queries by (D / N)^-0.5 = 144^-0.5, not head_dim^-0.5 (SPEC 2).
    "gemma2_27b": dict(num_layers=46, width=4608, num_heads=32, num_kv_heads=16, head_dim=128, mlp_dim=36864,
                       query_scale=(4608 / 32) ** -0.5, **_GEMMA2),
    # Tiny test models.
    "gemma2_tiny": dict(num_layers=4, width=64, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=128,
                        vocab_size=256, attn_logit_softcap=50.0, final_logit_softcap=30.0, sliding_window=4,
                        post_norms=True),
    "gemma1_tiny": dict(num_layers=2, width=64, num_heads=4, num_kv_heads=1, head_dim=16, mlp_dim=128,
                        vocab_size=256),
}
_FIELDS = tuple(f.name for f in dataclasses.fields(GemmaConfig))


def _check_values(v: dict, path: str) -> None:
    """Checks a full set of GemmaConfig values; raises ConfigError naming `path.field`."""
    for f in ("num_layers", "width", "num_heads", "num_kv_heads", "head_dim", "mlp_dim", "vocab_size"):
        check(isinstance(v[f], (int, np.integer)) and v[f] > 0, f"{path}.{f}", f"must be a positive int, got {v[f]!r}")
    check(v["num_heads"] % v["num_kv_heads"] == 0, f"{path}.num_kv_heads",
          f"num_heads ({v['num_heads']}) must be divisible by num_kv_heads ({v['num_kv_heads']})")
    check(v["head_dim"] % 2 == 0, f"{path}.head_dim", f"RoPE needs an even head_dim, got {v['head_dim']}")
    w = v["sliding_window"]
    check(w is None or (isinstance(w, (int, np.integer)) and w >= 1), f"{path}.sliding_window",
          f"must be None or an int >= 1, got {w!r}")
    check(not (w is not None and v["scan_layers"] and v["num_layers"] % 2), f"{path}.num_layers",
          f"scanned Gemma-2 layers go in (local, global) pairs, so num_layers must be even, got {v['num_layers']}; "
          "use an even count or set scan_layers=False")
    for f in ("attn_logit_softcap", "final_logit_softcap", "query_scale"):
        check(v[f] is None or v[f] > 0, f"{path}.{f}", f"must be None or > 0, got {v[f]!r}")
    check(v["rms_eps"] > 0 and v["rope_base"] > 0, f"{path}.rms_eps",
          f"rms_eps and rope_base must be > 0, got {v['rms_eps']!r}, {v['rope_base']!r}")
    for f in ("dtype", "param_dtype"):
        try:
            name = jnp.dtype(v[f]).name
        except TypeError:
            name = None
        check(name in DTYPES, f"{path}.{f}", f"unknown dtype {v[f]!r}; choose one of {list(DTYPES)}")
    check(v["attention_impl"] in attention.IMPLS, f"{path}.attention_impl",
          f"unknown value {v['attention_impl']!r}; choose one of {list(attention.IMPLS)} ('splash' runs on TPU "
          "only; 'splash_interpret' is the same kernel emulated on any backend, for checks)")
    check(v["remat_policy"] in REMAT_POLICIES, f"{path}.remat_policy",
          f"unknown value {v['remat_policy']!r}; choose one of {list(REMAT_POLICIES)}")


def _merged(section: dict, path: str) -> dict:
    section = dict(section)
    variant = section.pop("variant", None)
    check(variant in VARIANTS, f"{path}.variant", f"unknown Gemma variant {variant!r}; choose one of {sorted(VARIANTS)}")
    unknown = sorted(set(section) - set(_FIELDS))
    check(not unknown, f"{path}.{unknown[0] if unknown else ''}",
          f"unknown Gemma field; valid fields: {sorted(_FIELDS)}")
    defaults = {f.name: f.default for f in dataclasses.fields(GemmaConfig)
                if f.default is not dataclasses.MISSING}
    return {**defaults, **VARIANTS[variant], **section}


def _as_dict(section) -> dict:
    return section.to_dict() if hasattr(section, "to_dict") else dict(section)


def get_config(variant: str, **overrides) -> GemmaConfig:
    """The named variant (see VARIANTS) with field overrides, e.g. get_config('gemma2_2b', dtype='bfloat16')."""
    values = _merged({"variant": variant, **overrides}, "gemma")
    return GemmaConfig(**values)


def config_from_dict(section) -> GemmaConfig:
    """From a ConfigDict/dict section like {'variant': 'gemma2_tiny', 'num_layers': 2, ...}."""
    return get_config(**_as_dict(section))


def validate_config(section, path: str = "gemma") -> None:
    """Raises ConfigError (dotted path + fix) for an invalid Gemma config section."""
    _check_values(_merged(_as_dict(section), path), path)


def check_tokens(tokens, vocab_size: int) -> None:
    """Raises ValueError if concrete token ids fall outside [0, vocab_size). No-op on traced values (jit)."""
    if isinstance(tokens, jax.core.Tracer):
        return
    arr = np.asarray(tokens)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"token ids must be integers, got dtype {arr.dtype}")
    bad = (arr < 0) | (arr >= vocab_size)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"token id {int(arr[where])} at index {where} is outside the vocabulary "
                         f"[0, {vocab_size}); check the tokenizer / vocab_size ({int(bad.sum())} bad ids)")


def _remat(cls, cfg: GemmaConfig):
    if cfg.remat_policy == "none":
        return cls
    policy = None if cfg.remat_policy == "full" else getattr(jax.checkpoint_policies, cfg.remat_policy)
    return nn.remat(cls, policy=policy, prevent_cse=not cfg.scan_layers)


def init_cache(config: GemmaConfig, batch: int, max_len: int, dtype=None) -> dict:
    """Zero KV cache for `max_len` positions; keys/values stored in `dtype` (default: config.dtype)."""
    dtype = jnp.dtype(dtype or config.dtype)
    kv_shape = (batch, max_len, config.num_kv_heads, config.head_dim)
    if config.scan_layers:
        shape = (config.num_groups,) + kv_shape
        per_layer = {kind: {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
                     for kind in layers.group_kinds(config)}
    else:
        per_layer = {f"layer_{i}": {"k": jnp.zeros(kv_shape, dtype), "v": jnp.zeros(kv_shape, dtype)}
                     for i in range(config.num_layers)}
    return {"pos": jnp.zeros((batch, max_len), jnp.int32), "layers": per_layer}


def cache_logical_axes(config: GemmaConfig) -> dict:
    """Logical PartitionSpecs for the `init_cache` tree (shard it with sharding.logical_sharding)."""
    kv = jax.sharding.PartitionSpec(*((("layers",) if config.scan_layers else ()) + layers.KV_CACHE_AXES))
    names = layers.group_kinds(config) if config.scan_layers else [f"layer_{i}" for i in range(config.num_layers)]
    return {"pos": jax.sharding.PartitionSpec("act_batch", "act_length"),
            "layers": {name: {"k": kv, "v": kv} for name in names}}


class Gemma(nn.Module):
    config: GemmaConfig

    def setup(self):
        cfg = self.config
        self.embedder = layers.Embedder(cfg)
        self.final_norm = layers.RMSNorm(cfg)
        if cfg.scan_layers:
            self.layers = nn.scan(
                _remat(layers.LayerGroup, cfg),
                variable_axes={"params": 0}, split_rngs={"params": True},
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                length=cfg.num_groups, metadata_params={nn.PARTITION_NAME: "layers"})(cfg)
        else:
            block = _remat(layers.Block, cfg)
            # A list attribute named `layer` gives the official names layer_0 .. layer_{L-1}.
            self.layer = [block(cfg, local=cfg.sliding_window is not None and i % 2 == 0)
                          for i in range(cfg.num_layers)]

    def embed(self, tokens):
        """Token ids [B, T] -> embeddings [B, T, D] * sqrt(D) in the activation dtype."""
        check_tokens(tokens, self.config.vocab_size)
        return self.embedder.encode(tokens)

    def __call__(self, x, positions, attn_mask, cache=None, cache_index=None):
        """Embedded inputs [B, T, D] -> (hidden after the final norm [B, T, D], new cache or None)."""
        cfg = self.config
        b, t = x.shape[:2]
        s = t if cache is None else cache["pos"].shape[1]
        segmented = isinstance(attn_mask, SegmentMask)
        if segmented and cache is not None:
            raise ValueError("Gemma: a SegmentMask describes a sequence attending to itself; with a KV cache "
                             f"pass the dense [B, T, S] = {(b, t, s)} mask (masks.cache_step_mask)")
        mask_shape = (tuple(attn_mask.segment_ids.shape), tuple(attn_mask.mask_ar.shape)) if segmented \
            else attn_mask.shape
        if positions.shape != (b, t) or mask_shape != (((b, t), (b, t)) if segmented else (b, t, s)):
            raise ValueError(f"Gemma: expected positions {(b, t)} and attn_mask {(b, t, s)} (or a SegmentMask of "
                             f"[B, T] = {(b, t)} arrays) for inputs {x.shape}"
                             f"{'' if cache is None else f' and a cache of length {s}'}; got positions "
                             f"{positions.shape}, attn_mask {mask_shape}")
        if cache is not None and cache_index is None:
            raise ValueError("Gemma: cache_index is required when a cache is given")
        x = nn.with_logical_constraint(x.astype(cfg.dtype), ("act_batch", "act_length", "act_embed"))
        positions = positions.astype(jnp.int32)
        if not segmented:
            attn_mask = attn_mask.astype(bool)
        elif cfg.attention_impl == "xla":
            attn_mask = attn_mask.dense()  # once, not in every layer
        if cache is None:
            k_positions, layer_cache = positions, None
        else:
            k_positions = jax.lax.dynamic_update_slice(cache["pos"], positions, (0, cache_index))
            layer_cache = cache["layers"]
        if cfg.scan_layers:
            x, new_layer_cache = self.layers(x, layer_cache, positions, attn_mask, k_positions, cache_index)
        else:
            new_layer_cache = {} if cache is not None else None
            for i, block in enumerate(self.layer):
                name = f"layer_{i}"
                x, c = block(x, positions, attn_mask, k_positions,
                             None if cache is None else layer_cache[name], cache_index)
                if cache is not None:
                    new_layer_cache[name] = c
        x = self.final_norm(x)
        new_cache = None
        if cache is not None:  # pin the cache layout so it does not drift between decoding steps
            new_cache = jax.tree.map(nn.with_logical_constraint, {"pos": k_positions, "layers": new_layer_cache},
                                     cache_logical_axes(cfg))
        return x, new_cache

    def logits(self, hidden):
        """Hidden [B, T, D] -> logits [B, T, V] float32 (tied embedding, final softcap)."""
        return self.embedder.decode(hidden)

    def forward(self, tokens, input_mask=None, mask_ar=None):
        """Plain LM: tokens [B, T] -> logits [B, T, V]. Causal unless `mask_ar` marks a prefix (masks.py)."""
        x = self.embed(tokens)
        if input_mask is None:
            input_mask = jnp.ones(tokens.shape, bool)
        if mask_ar is None:
            mask_ar = jnp.ones(tokens.shape, jnp.int32)
        mask = SegmentMask(jnp.asarray(input_mask).astype(jnp.int32), mask_ar)  # one example per row
        hidden, _ = self(x, positions_from_mask(input_mask), mask)
        return self.logits(hidden)

    def init_cache(self, batch: int, max_len: int, dtype=None) -> dict:
        return init_cache(self.config, batch, max_len, dtype)


def init_params(model: Gemma, rng, seq_len: int = 1):
    """Random params (boxed with logical axis names; `nn.unbox` them, or jit with param_shardings)."""
    return model.init(rng, jnp.zeros((1, seq_len), jnp.int32), method=Gemma.forward)["params"]
