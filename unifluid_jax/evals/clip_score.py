"""CLIP score of generated images against their prompts, with a Flax port of transformers' CLIPModel towers.

    score = mean over pairs of 100 * max(cos(E_image, E_text), 0)

which is the convention of T2I papers that report "CLIP score" via torchmetrics' CLIPScore (its
`100 * max(cos, 0)`, averaged); Hessel et al.'s CLIPScore is the same cosine with w = 2.5 instead of 100.
The number depends on the CLIP checkpoint (ViT-B/32, ViT-L/14, ...): always report which.

Towers (transformers CLIPTextTransformer / CLIPVisionTransformer, pre-LN ViT blocks): text = token +
position embeddings, causal self-attention, final LayerNorm, pooled at the first EOS token (at the largest
token id for configs with the legacy eos_token_id 2), linear projection without bias; vision = conv patch
embedding without bias + class token + positions, pre LayerNorm, blocks, post LayerNorm on the class
token, projection. Module names mirror transformers' so convert/clip.py maps tensors by rule.
Shapes: B batch, T tokens, N heads, H head dim, D width, F mlp width, P patch size.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
_ACTS = {"quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
         "gelu": lambda x: jax.nn.gelu(x, approximate=False),
         "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
         "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True)}
_HP = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class TowerConfig:
    width: int
    layers: int
    heads: int
    mlp: int
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    text: TowerConfig
    vision: TowerConfig
    vocab_size: int
    max_text_len: int
    eos_token_id: int
    image_size: int
    patch_size: int
    projection_dim: int
    image_mean: tuple = OPENAI_MEAN
    image_std: tuple = OPENAI_STD


class Block(nn.Module):
    """transformers CLIPEncoderLayer: x + attn(ln1(x)), then x + mlp(ln2(x))."""
    cfg: TowerConfig
    causal: bool

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        B, T, D = x.shape
        H = D // c.heads
        dense = lambda f, name: nn.Dense(f, precision=_HP, name=name)  # noqa: E731
        h = nn.LayerNorm(c.layer_norm_eps, name="layer_norm1")(x)
        q, k, v = (dense(D, f"{n}_proj")(h).reshape(B, T, c.heads, H) for n in ("q", "k", "v"))
        logits = jnp.einsum("BTNH,BSNH->BNTS", q * H ** -0.5, k, precision=_HP)
        if self.causal:
            logits = jnp.where(jnp.tril(jnp.ones((T, T), bool)), logits, jnp.finfo(logits.dtype).min)
        attn = jnp.einsum("BNTS,BSNH->BTNH", jax.nn.softmax(logits, -1), v, precision=_HP).reshape(B, T, D)
        x = x + dense(D, "out_proj")(attn)
        h = nn.LayerNorm(c.layer_norm_eps, name="layer_norm2")(x)
        return x + dense(D, "fc2")(_ACTS[c.hidden_act](dense(c.mlp, "fc1")(h)))


class Encoder(nn.Module):
    cfg: TowerConfig
    causal: bool = False

    @nn.compact
    def __call__(self, x):
        for i in range(self.cfg.layers):
            x = Block(self.cfg, self.causal, name=f"layers_{i}")(x)
        return x


class TextTower(nn.Module):
    cfg: CLIPConfig

    @nn.compact
    def __call__(self, tokens):
        c, t = self.cfg, self.cfg.text
        T = tokens.shape[1]
        emb = nn.Embed(c.vocab_size, t.width, name="token_embedding")(tokens)
        pos = self.param("position_embedding", nn.initializers.normal(0.02), (c.max_text_len, t.width))
        x = Encoder(t, causal=True, name="encoder")(emb + pos[:T])
        x = nn.LayerNorm(t.layer_norm_eps, name="final_layer_norm")(x)
        if c.eos_token_id == 2:  # transformers' legacy rule: EOS is the largest token id
            eos = jnp.argmax(tokens, -1)
        else:
            eos = jnp.argmax(tokens == c.eos_token_id, -1)
        return x[jnp.arange(x.shape[0]), eos]


class VisionTower(nn.Module):
    cfg: CLIPConfig

    @nn.compact
    def __call__(self, pixels):
        """pixels: [B, S, S, 3] normalised (see `preprocess`)."""
        c, v = self.cfg, self.cfg.vision
        P = c.patch_size
        x = nn.Conv(v.width, (P, P), strides=P, padding="VALID", use_bias=False, precision=_HP,
                    name="patch_embedding")(pixels)
        x = x.reshape(x.shape[0], -1, v.width)
        cls = self.param("class_embedding", nn.initializers.normal(0.02), (v.width,))
        x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, v.width)), x], 1)
        pos = self.param("position_embedding", nn.initializers.normal(0.02), (x.shape[1], v.width))
        x = nn.LayerNorm(v.layer_norm_eps, name="pre_layrnorm")(x + pos)
        x = Encoder(v, name="encoder")(x)
        return nn.LayerNorm(v.layer_norm_eps, name="post_layernorm")(x[:, 0])


class CLIP(nn.Module):
    """Projected (not normalised) embeddings: `text(tokens [B, T]) -> [B, E]`, `image(pixels) -> [B, E]`."""
    cfg: CLIPConfig

    def setup(self):
        self.text_model = TextTower(self.cfg)
        self.vision_model = VisionTower(self.cfg)
        self.text_projection = nn.Dense(self.cfg.projection_dim, use_bias=False, precision=_HP)
        self.visual_projection = nn.Dense(self.cfg.projection_dim, use_bias=False, precision=_HP)
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(2.6592), ())

    def text(self, tokens):
        return self.text_projection(self.text_model(tokens))

    def image(self, pixels):
        return self.visual_projection(self.vision_model(pixels))

    def __call__(self, tokens, pixels):
        return self.text(tokens), self.image(pixels)


def preprocess(images, cfg: CLIPConfig) -> np.ndarray:
    """uint8 [B, H, W, 3] -> normalised float32 [B, S, S, 3], as CLIPImageProcessor: shortest side resized to
    S (PIL bicubic), centre crop S x S, / 255, (x - mean) / std."""
    from PIL import Image
    S = cfg.image_size
    out = []
    for im in np.asarray(images):
        h, w = im.shape[:2]
        # transformers' get_resize_output_image_size: the short side becomes S, the long one int(S * long / short)
        nh, nw = (S, int(S * w / h)) if h <= w else (int(S * h / w), S)
        r = np.asarray(Image.fromarray(im).resize((nw, nh), resample=Image.BICUBIC))
        top, left = (nh - S) // 2, (nw - S) // 2
        out.append(r[top:top + S, left:left + S])
    x = np.stack(out).astype(np.float32) / 255.0
    return ((x - np.asarray(cfg.image_mean, np.float32)) / np.asarray(cfg.image_std, np.float32)).astype(np.float32)


def cosine(text_emb, image_emb) -> np.ndarray:
    t = np.asarray(text_emb, np.float64)
    i = np.asarray(image_emb, np.float64)
    return (t * i).sum(-1) / (np.linalg.norm(t, axis=-1) * np.linalg.norm(i, axis=-1))


def score_from_cosines(cos) -> float:
    """Mean of 100 * max(cos, 0)."""
    return float(np.mean(100.0 * np.maximum(np.asarray(cos, np.float64), 0.0)))


def clip_score(text_emb, image_emb) -> float:
    """CLIP score of matching (text, image) embedding rows."""
    return score_from_cosines(cosine(text_emb, image_emb))


class Scorer:
    """CLIP score of uint8 images against prompts with a loaded checkpoint (convert/clip.py `load`)."""

    def __init__(self, cfg: CLIPConfig, params, tokenizer):
        self.cfg, self.params, self.tokenizer = cfg, params, tokenizer
        model = CLIP(cfg)
        self._text = jax.jit(lambda p, t: model.apply(p, t, method=CLIP.text))
        self._image = jax.jit(lambda p, x: model.apply(p, x, method=CLIP.image))

    def tokens(self, prompts) -> np.ndarray:
        """CLIP tokenizer ids padded / truncated to the model's length (the causal mask makes padding after
        EOS irrelevant, so no attention mask is needed)."""
        ids = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                             max_length=self.cfg.max_text_len)["input_ids"]
        return np.asarray(ids, np.int32)

    def embeddings(self, images, prompts) -> tuple[np.ndarray, np.ndarray]:
        if len(images) != len(prompts):
            raise ValueError(f"CLIP score: {len(images)} images for {len(prompts)} prompts")
        return (np.asarray(self._text(self.params, self.tokens(prompts))),
                np.asarray(self._image(self.params, preprocess(images, self.cfg))))

    def cosines(self, images, prompts) -> np.ndarray:
        return cosine(*self.embeddings(images, prompts))
