"""SigLIP ViT image encoder in the big_vision layout (SPEC section 3).

Param tree (names follow big_vision so its checkpoints map almost 1:1):
    embedding/{kernel (p,p,3,D), bias}, pos_embedding (1,n,D),
    Transformer/encoderblock/... (scan_layers, leading 'layers' axis) or Transformer/encoderblock_i/...,
    Transformer/encoder_norm, MAPHead_0/{probe, MultiHeadDotProductAttention_0, LayerNorm_0, MlpBlock_0}.

Einsum letters: B batch, T query length, S key length, N heads, H head dim, D width, F mlp.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from unifluid_jax.config import check, check_choice, check_positive, from_presets
# Same remat vocabulary as the LLM: 'none', 'full' (save nothing) or a jax.checkpoint_policies name.
from unifluid_jax.models.gemma import REMAT_POLICIES

POOLS = ("none", "map")


@dataclasses.dataclass(frozen=True)
class SigLIPConfig:
    patch_size: int = 16
    image_size: int = 224
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    pool: str = "none"  # 'none' (PaliGemma: tokens only) or 'map' (big_vision MAPHead)
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat_policy: str = "none"  # one of REMAT_POLICIES
    layer_norm_eps: float = 1e-6

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid ** 2

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads


VARIANTS: dict[str, dict[str, Any]] = {
    "B/16": dict(patch_size=16, image_size=224, width=768, depth=12, num_heads=12, mlp_dim=3072),
    "So400m/14": dict(patch_size=14, image_size=224, width=1152, depth=27, num_heads=16, mlp_dim=4304),
    # CPU test / demo sizes.
    "tiny/8": dict(patch_size=8, image_size=32, width=32, depth=2, num_heads=2, mlp_dim=64),
    "tiny/4": dict(patch_size=4, image_size=32, width=64, depth=2, num_heads=4, mlp_dim=128),
}


def get_config(variant: str, **overrides) -> SigLIPConfig:
    return config_from_dict({"variant": variant, **overrides})


_FIELDS = {f.name for f in dataclasses.fields(SigLIPConfig)}


def config_from_dict(section) -> SigLIPConfig:
    """A ConfigDict / dict section: optional `variant` plus any SigLIPConfig field as an override."""
    return from_presets(SigLIPConfig, VARIANTS, section, "variant", "SigLIP")


def validate_config(section, path: str) -> None:
    if not section:  # None / {}: no SigLIP (t2i-only model)
        return
    d = dict(section)
    variant = d.pop("variant", None)
    if variant is not None:
        check_choice(variant, f"{path}.variant", VARIANTS)
    unknown = sorted(set(d) - _FIELDS)
    check(not unknown, f"{path}.{unknown[0] if unknown else ''}",
          f"unknown SigLIP field; known fields: {sorted(_FIELDS | {'variant'})}")
    cfg = config_from_dict(section)
    check_positive(dataclasses.asdict(cfg), path, "patch_size", "image_size", "width", "depth", "num_heads",
                   "mlp_dim")
    check(cfg.image_size % cfg.patch_size == 0, f"{path}.image_size",
          f"{cfg.image_size} is not a multiple of patch_size {cfg.patch_size}")
    check(cfg.width % cfg.num_heads == 0, f"{path}.num_heads",
          f"width {cfg.width} is not divisible by num_heads {cfg.num_heads}")
    check_choice(cfg.pool, f"{path}.pool", POOLS)
    check_choice(cfg.remat_policy, f"{path}.remat_policy", REMAT_POLICIES)
    for f in ("dtype", "param_dtype"):
        v = getattr(cfg, f)
        try:
            ok = jnp.issubdtype(jnp.dtype(v), jnp.floating)
        except TypeError:
            ok = False
        check(ok, f"{path}.{f}", f"must be a float dtype name like 'float32' or 'bfloat16', got {v!r}")


def _remat_policy(name: str):
    return None if name == "full" else getattr(jax.checkpoint_policies, name)


def _constrain(x, names):
    return nn.with_logical_constraint(x, names)


def _init(init, names):
    return nn.with_logical_partitioning(init, names)


class _DenseGeneral(nn.Module):
    """nn.DenseGeneral's params (kernel (in..., out...), bias (out...)), created at their full rank.

    flax's DenseGeneral initialises a flattened 2-D kernel and reshapes it, which applies the kernel's
    logical-axis constraint to the 2-D value and fails under a mesh; this creates the real shape directly.
    Xavier fans are the products of the in / out dims, as for the flattened kernel."""
    features: tuple[int, ...]
    num_in: int
    kernel_axes: tuple
    cfg: SigLIPConfig

    @nn.compact
    def __call__(self, x):
        c, n_in, n_out = self.cfg, self.num_in, len(self.features)
        shape = tuple(x.shape[-n_in:]) + tuple(self.features)
        init = nn.initializers.xavier_uniform(in_axis=tuple(range(n_in)),
                                              out_axis=tuple(range(n_in, n_in + n_out)))
        pdtype, dtype = jnp.dtype(c.param_dtype), jnp.dtype(c.dtype)
        kernel = self.param("kernel", _init(init, self.kernel_axes), shape, pdtype)
        bias = self.param("bias", _init(nn.initializers.zeros, self.kernel_axes[n_in:]), self.features, pdtype)
        y = jnp.tensordot(x.astype(dtype), kernel.astype(dtype), axes=n_in)
        return y + bias.astype(dtype)


def _dense(features, kernel_axes, name, cfg, axis=-1):
    """DenseGeneral with logical names on kernel (in..., out...) and bias (out...)."""
    features = tuple(features) if isinstance(features, tuple) else (features,)
    num_in = len(axis) if isinstance(axis, tuple) else 1
    return _DenseGeneral(features, num_in, tuple(kernel_axes), cfg, name=name)


def _layer_norm(name, cfg):
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=jnp.dtype(cfg.dtype),
                        param_dtype=jnp.dtype(cfg.param_dtype), use_fast_variance=False, name=name,
                        scale_init=_init(nn.initializers.ones, ("norm",)),
                        bias_init=_init(nn.initializers.zeros, ("norm",)))


class Attention(nn.Module):
    """Multi-head attention with biases (big_vision MultiHeadDotProductAttention layout), no mask."""
    cfg: SigLIPConfig

    @nn.compact
    def __call__(self, q_in, kv_in):
        c = self.cfg
        nh = (c.num_heads, c.head_dim)
        q = _dense(nh, ("embed", "heads", "head_dim"), "query", c)(q_in)
        k = _dense(nh, ("embed", "heads", "head_dim"), "key", c)(kv_in)
        v = _dense(nh, ("embed", "heads", "head_dim"), "value", c)(kv_in)
        q, k, v = (_constrain(t, ("act_batch", "act_length", "act_heads", None)) for t in (q, k, v))
        logits = jnp.einsum("BTNH,BSNH->BNTS", q, k) / jnp.sqrt(c.head_dim).astype(q.dtype)
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        out = jnp.einsum("BNTS,BSNH->BTNH", probs, v)
        out = _constrain(out, ("act_batch", "act_length", "act_heads", None))
        return _dense(c.width, ("heads", "head_dim", "embed"), "out", c, axis=(-2, -1))(out)


class MlpBlock(nn.Module):
    cfg: SigLIPConfig

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        h = _dense(c.mlp_dim, ("embed", "mlp"), "Dense_0", c)(x)
        h = _constrain(nn.gelu(h, approximate=True), ("act_batch", "act_length", "act_mlp"))
        return _dense(c.width, ("mlp", "embed"), "Dense_1", c)(h)


class Encoder1DBlock(nn.Module):
    """Pre-LN transformer block; returns (x, None) so it can be scanned."""
    cfg: SigLIPConfig

    @nn.compact
    def __call__(self, x, _=None):
        c = self.cfg
        x = _constrain(x, ("act_batch", "act_length", "act_embed"))
        y = _layer_norm("LayerNorm_0", c)(x)
        x = x + Attention(c, name="MultiHeadDotProductAttention_0")(y, y)
        y = _layer_norm("LayerNorm_1", c)(x)
        x = x + MlpBlock(c, name="MlpBlock_0")(y)
        return _constrain(x, ("act_batch", "act_length", "act_embed")), None


class Transformer(nn.Module):
    cfg: SigLIPConfig

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        block = Encoder1DBlock
        if c.remat_policy != "none":
            block = nn.remat(block, policy=_remat_policy(c.remat_policy), prevent_cse=not c.scan_layers)
        if c.scan_layers:
            x, _ = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True}, length=c.depth,
                           metadata_params={nn.PARTITION_NAME: "layers"})(c, name="encoderblock")(x, None)
        else:
            for i in range(c.depth):
                x, _ = block(c, name=f"encoderblock_{i}")(x, None)
        return _layer_norm("encoder_norm", c)(x)


class MAPHead(nn.Module):
    """Multihead attention pooling (big_vision MAPHead == HF SiglipMultiheadAttentionPoolingHead)."""
    cfg: SigLIPConfig

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        probe = self.param("probe", _init(nn.initializers.xavier_uniform(), (None, None, "embed")),
                           (1, 1, c.width), jnp.dtype(c.param_dtype))
        probe = jnp.tile(probe.astype(x.dtype), (x.shape[0], 1, 1))
        x = Attention(c, name="MultiHeadDotProductAttention_0")(probe, x)
        y = _layer_norm("LayerNorm_0", c)(x)
        x = x + MlpBlock(c, name="MlpBlock_0")(y)
        return x[:, 0]


def check_images(images, image_size: int, channels: int = 3, what: str = "images") -> None:
    """Static (trace-time) shape/dtype check with an error that names the expected input."""
    expected = f"[B, {image_size}, {image_size}, {channels}] float in [-1, 1]"
    shape = tuple(getattr(images, "shape", ()))
    if len(shape) != 4 or shape[1:] != (image_size, image_size, channels):
        raise ValueError(f"{what}: expected {expected}, got shape {shape}")
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(f"{what}: expected {expected}, got dtype {images.dtype} (scale uint8 pixels to [-1, 1])")


class SigLIP(nn.Module):
    """images [B,H,W,3] in [-1,1] -> (tokens [B,N,D] after encoder_norm, pooled [B,D] or None)."""
    cfg: SigLIPConfig

    @nn.compact
    def __call__(self, images):
        c = self.cfg
        check_images(images, c.image_size, 3, "SigLIP images")
        dtype, pdtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        x = _constrain(images.astype(dtype), ("act_batch", "act_height", "act_width", None))
        x = nn.Conv(c.width, (c.patch_size, c.patch_size), strides=(c.patch_size, c.patch_size),
                    padding="VALID", dtype=dtype, param_dtype=pdtype, name="embedding",
                    # The RGB input dim (3) is not divisible by mesh axes: leave it replicated.
                    kernel_init=_init(nn.initializers.lecun_normal(), ("conv_h", "conv_w", None, "embed")),
                    bias_init=_init(nn.initializers.zeros, ("embed",)))(x)
        b, h, w, d = x.shape
        x = x.reshape(b, h * w, d)  # raster order of the patch grid
        pos = self.param("pos_embedding", _init(nn.initializers.normal(1 / d ** 0.5), (None, "pos", "embed")),
                         (1, h * w, d), pdtype)
        x = _constrain(x + pos.astype(dtype), ("act_batch", "act_length", "act_embed"))
        tokens = Transformer(c, name="Transformer")(x)
        pooled = MAPHead(c, name="MAPHead_0")(tokens) if c.pool == "map" else None
        return tokens, pooled
