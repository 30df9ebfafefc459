"""SigLIP two-tower model and sigmoid loss (SPEC section 11; big_vision models/proj/image_text/two_towers.py,
text_transformer.py and trainers/proj/image_text/siglip.py).

Param tree:
    img/...   exactly models/siglip.SigLIP (pool='map'), so it loads unchanged into UniFluid's `siglip` subtree
              (`checkpoint.init_subtrees = [dict(workdir=RUN, src='img', dst='siglip')]`; UniFluid reads the
              tokens before the MAP head, whose params the partial restore leaves out).
    txt/{Embed_0/embedding (V,D), pos_embedding (1,L,D), Transformer/... (the ViT encoder of models/siglip.py),
         [MAPHead_0/...], head/{kernel (D,E), bias (E,)}}
    t (1,) log temperature, b (1,) bias.
The image tower has no projection head: its MAP output is the shared embedding and the text head projects to
the image width (big_vision's SigLIP configs with `out_dim=(None, image_width)`), so the whole image tower,
MAP head included, is a plain models/siglip.SigLIP.

Einsum letters: I image rows, J text rows, E embedding (= the image width).
"""
from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from unifluid_jax.checks import check, check_choice, check_positive, from_presets
from unifluid_jax.models import siglip

TEXT_POOLS = ("last", "map")


@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 32000
    width: int = 512
    depth: int = 12
    num_heads: int = 8
    mlp_dim: int = 2048
    pool: str = "last"  # 'last' (the token at the last position) or 'map' (MAPHead)
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat_policy: str = "none"
    layer_norm_eps: float = 1e-6

    def encoder(self) -> siglip.SigLIPConfig:
        """The same pre-LN ViT encoder (and MAP head) the image tower uses, at the text tower's sizes."""
        return siglip.SigLIPConfig(width=self.width, depth=self.depth, num_heads=self.num_heads,
                                   mlp_dim=self.mlp_dim, dtype=self.dtype, param_dtype=self.param_dtype,
                                   scan_layers=self.scan_layers, remat_policy=self.remat_policy,
                                   layer_norm_eps=self.layer_norm_eps)


TEXT_VARIANTS = {
    "B": dict(width=768, depth=12, num_heads=12, mlp_dim=3072),
    "tiny": dict(vocab_size=256, width=64, depth=2, num_heads=2, mlp_dim=128),
}


@dataclasses.dataclass(frozen=True)
class TwoTowersConfig:
    image: siglip.SigLIPConfig
    text: TextConfig
    temperature_init: float = 10.0  # t = exp(t'), t' initialised to log(temperature_init)
    bias_init: float = -10.0

    @property
    def embed_dim(self) -> int:
        return self.image.width


def config_from_dict(section) -> TwoTowersConfig:
    """{image: SigLIP section (models/siglip.py), text: {variant, fields}, temperature_init, bias_init}."""
    d = dict(section.to_dict() if hasattr(section, "to_dict") else section)
    image = siglip.config_from_dict(d.pop("image"))
    text = from_presets(TextConfig, TEXT_VARIANTS, d.pop("text", {}), "variant", "text tower")
    return TwoTowersConfig(image=image, text=text, **d)


_TEXT_FIELDS = {f.name for f in dataclasses.fields(TextConfig)} | {"variant"}
_TOP_FIELDS = {"image", "text", "temperature_init", "bias_init"}


def validate_config(section, path: str) -> None:
    d = dict(section)
    unknown = sorted(set(d) - _TOP_FIELDS)
    check(not unknown, f"{path}.{unknown[0] if unknown else ''}", f"unknown field; known: {sorted(_TOP_FIELDS)}")
    check("image" in d, f"{path}.image", "set the image tower's SigLIP section, e.g. dict(variant='tiny/8', pool='map')")
    siglip.validate_config(d["image"], f"{path}.image")
    check(siglip.config_from_dict(d["image"]).pool == "map", f"{path}.image.pool",
          "must be 'map': the MAP head's output is the image embedding")
    text = dict(d.get("text", {}))
    unknown = sorted(set(text) - _TEXT_FIELDS)
    check(not unknown, f"{path}.text.{unknown[0] if unknown else ''}",
          f"unknown text tower field; known: {sorted(_TEXT_FIELDS)}")
    if "variant" in text:
        check_choice(text["variant"], f"{path}.text.variant", TEXT_VARIANTS)
    cfg = config_from_dict(section)
    t = cfg.text
    check_positive(dataclasses.asdict(t), f"{path}.text", "vocab_size", "width", "depth", "num_heads", "mlp_dim")
    check(t.width % t.num_heads == 0, f"{path}.text.num_heads",
          f"width {t.width} is not divisible by num_heads {t.num_heads}")
    check_choice(t.pool, f"{path}.text.pool", TEXT_POOLS)
    check_choice(t.remat_policy, f"{path}.text.remat_policy", siglip.REMAT_POLICIES)
    check(cfg.temperature_init > 0, f"{path}.temperature_init", f"must be > 0, got {cfg.temperature_init}")


class TextTransformer(nn.Module):
    """tokens [B,T] int -> (pooled [B,D_txt] before the head, embedding [B,E] after it).

    Like big_vision's text tower, no attention mask: padding is a constant token that every position may
    see, and 'last' pooling reads the last position (big_vision pads with EOS; we pad with 0)."""
    cfg: TextConfig
    out_dim: int

    @nn.compact
    def __call__(self, tokens):
        c = self.cfg
        dtype, pdtype = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        if not jnp.issubdtype(tokens.dtype, jnp.integer) or tokens.ndim != 2:
            raise ValueError(f"text tokens: expected [B, T] int ids, got {tokens.dtype} {tuple(tokens.shape)}")
        embed = nn.Embed(c.vocab_size, c.width, dtype=dtype, param_dtype=pdtype,
                         embedding_init=nn.with_logical_partitioning(nn.initializers.variance_scaling(
                             1.0, "fan_in", "normal", out_axis=0), ("vocab", "embed")))
        x = embed(tokens)
        _, length, d = x.shape
        pos = self.param("pos_embedding", nn.with_logical_partitioning(
            nn.initializers.normal(1 / math.sqrt(d)), (None, "pos", "embed")), (1, length, d), pdtype)
        x = nn.with_logical_constraint(x + pos.astype(dtype), ("act_batch", "act_length", "act_embed"))
        enc = c.encoder()
        x = siglip.Transformer(enc, name="Transformer")(x)
        pooled = x[:, -1] if c.pool == "last" else siglip.MAPHead(enc, name="MAPHead_0")(x)
        emb = nn.Dense(self.out_dim, dtype=dtype, param_dtype=pdtype, name="head",
                       kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", None)),
                       bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)))(pooled)
        return pooled, emb


def _normalize(z):
    # big_vision: z / (||z|| + 1e-8), in float32 so bf16 towers still give unit vectors.
    z = z.astype(jnp.float32)
    return z / (jnp.linalg.norm(z, axis=-1, keepdims=True) + 1e-8)


class TwoTowers(nn.Module):
    """(images [B,H,W,3] in [-1,1] or None, tokens [B,T] or None) -> (zimg [B,E], ztxt [B,E], t, b).

    zimg / ztxt are L2-normalised float32 (None for a missing input); t = exp(t') is the temperature."""
    cfg: TwoTowersConfig

    @nn.compact
    def __call__(self, images=None, tokens=None):
        c = self.cfg
        zimg = ztxt = None
        if images is not None:
            _, pooled = siglip.SigLIP(c.image, name="img")(images)
            zimg = _normalize(pooled)
        if tokens is not None:
            _, emb = TextTransformer(c.text, c.embed_dim, name="txt")(tokens)
            ztxt = _normalize(emb)
        t_init, b_init = math.log(c.temperature_init), c.bias_init
        t = self.param("t", nn.with_logical_partitioning(lambda k, s: jnp.full(s, t_init, jnp.float32), (None,)),
                       (1,))
        b = self.param("b", nn.with_logical_partitioning(lambda k, s: jnp.full(s, b_init, jnp.float32), (None,)),
                       (1,))
        return zimg, ztxt, jnp.exp(t[0]), b[0]


def logits(zimg, ztxt, t, b):
    """[B_img, B_txt] = t * zimg @ ztxt.T + b (E: embedding)."""
    return t * jnp.einsum("IE,JE->IJ", zimg, ztxt) + b


def sigmoid_loss(zimg, ztxt, t, b):
    """big_vision's SigLIP loss: labels +1 on the diagonal, -1 elsewhere; -sum(log_sigmoid(labels * logits)) / n."""
    z = logits(zimg, ztxt, t, b)
    n = z.shape[0]
    labels = 2.0 * jnp.eye(n, dtype=z.dtype) - 1.0
    return -jnp.sum(jax.nn.log_sigmoid(labels * z)) / n
