"""The unified UniFluid model (SPEC 1, 6, 7): one Gemma over [SigLIP | VAE source | text | BOI + image].

Sequence layout and masks come from `unifluid_jax.data.layout` (the data/model contract). Image tokens are
continuous: a frozen KL-VAE latent, 2x2-patchified (MAR convention), embedded by `Linear(C -> D)` plus a
learnable 2D position embedding of the token's own position and a learnable next-position embedding of the
position generated next (RAR). The hidden state at BOI predicts the first token of the order, at image slot
k the token p(k+1); a small per-token diffusion head turns that hidden state into a token.

    loss = L_visual + text_weight * L_text        (text_weight = lambda, 0.005 by default)

Shapes: B batch, S full sequence, L text slots, n image tokens, C token channels, D LLM width.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from unifluid_jax.config import check, check_choice
from unifluid_jax.data import layout
from unifluid_jax.models import diffusion as diffusion_lib
from unifluid_jax.models import gemma as gemma_lib
from unifluid_jax.models import masks
from unifluid_jax.models import order as order_lib
from unifluid_jax.models import siglip as siglip_lib
from unifluid_jax.models import vae as vae_lib
from unifluid_jax.models.patchify import patchify, unpatchify

EDIT_SOURCES = ("siglip", "vae")


@dataclasses.dataclass(frozen=True)
class UniFluidConfig:
    llm: gemma_lib.GemmaConfig
    vae: vae_lib.VAEConfig
    diffusion: diffusion_lib.DiffusionConfig
    siglip: siglip_lib.SigLIPConfig | None = None  # None: no understanding prefix (t2i-only models)
    patch_size: int = 2                  # latent patch -> one token (SPEC 4)
    max_text_len: int = 32               # text slots L (prompt, question, answer, EOS)
    text_weight: float = 0.005           # lambda in L = L_visual + lambda * L_text
    text_dropout: float = 0.1            # t2i prompt / edit instruction -> empty prompt (CFG training)
    edit_source: tuple[str, ...] = ("siglip",)  # how an edit's source image enters (SPEC 7: OPEN)
    order_mode: str = "annealed"         # 'annealed' | 'random' | 'raster'
    random_until: float = 0.3            # fraction of training with fully random orders
    raster_from: float = 0.6             # fraction from which orders are raster
    train_siglip: bool = False           # False: SigLIP features under stop_gradient (freeze its params too)
    sample_latents: bool = True          # sample the VAE posterior (MAR) rather than take its mean

    @property
    def width(self) -> int:
        return self.llm.width

    @property
    def token_dim(self) -> int:
        return self.vae.latent_channels * self.patch_size ** 2

    @property
    def grid(self) -> int:
        return self.vae.latent_size // self.patch_size

    @property
    def n_img(self) -> int:
        return self.grid ** 2

    @property
    def n_und(self) -> int:
        return 0 if self.siglip is None else self.siglip.num_patches

    @property
    def n_src(self) -> int:
        return self.n_img if "vae" in self.edit_source else 0

    @property
    def offsets(self) -> dict[str, int]:
        return layout.segment_offsets(self.n_und, self.n_src, self.max_text_len, self.n_img)

    @property
    def seq_len(self) -> int:
        return self.offsets["total"]


_SCALARS = tuple(f.name for f in dataclasses.fields(UniFluidConfig)
                 if f.name not in ("llm", "vae", "diffusion", "siglip"))


def _as_dict(section) -> dict:
    return dict(section.to_dict() if hasattr(section, "to_dict") else section)


def config_from_dict(section) -> UniFluidConfig:
    """From `config.model`: sub-sections llm / vae / diffusion / siglip (siglip None or {} disables it)."""
    d = _as_dict(section)
    llm = gemma_lib.config_from_dict(d["llm"])
    vae = vae_lib.config_from_dict(_as_dict(d["vae"]))
    sig = d.get("siglip")
    sig = siglip_lib.config_from_dict(_as_dict(sig)) if sig else None
    diff_d = {"in_channels": vae.latent_channels * d.get("patch_size", 2) ** 2, **_as_dict(d["diffusion"])}
    diff = diffusion_lib.config_from_dict(diff_d, cond_dim=llm.width)
    scalars = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in _SCALARS}
    return UniFluidConfig(llm=llm, vae=vae, diffusion=diff, siglip=sig, **scalars)


def validate_config(section, path: str = "model") -> None:
    """One clear error for an invalid `config.model` section (sub-sections are checked by their modules)."""
    d = _as_dict(section)
    for k in d:
        check(k in _SCALARS or k in ("llm", "vae", "diffusion", "siglip"), f"{path}.{k}",
              f"unknown field; known: llm, vae, diffusion, siglip, {', '.join(_SCALARS)}")
    for k in ("llm", "vae", "diffusion"):
        check(k in d, f"{path}.{k}", "required section is missing")
    gemma_lib.validate_config(d["llm"], f"{path}.llm")
    vae_lib.validate_config(d["vae"], f"{path}.vae")
    diffusion_lib.validate_config(d["diffusion"], f"{path}.diffusion")
    if d.get("siglip"):
        siglip_lib.validate_config(d["siglip"], f"{path}.siglip")
    check_choice(d.get("order_mode", "annealed"), f"{path}.order_mode", order_lib.MODES)
    ru, rf = d.get("random_until", 0.3), d.get("raster_from", 0.6)
    check(0.0 <= ru <= rf <= 1.0, f"{path}.random_until/raster_from",
          f"need 0 <= random_until <= raster_from <= 1, got {ru}, {rf}")
    for src in d.get("edit_source", ("siglip",)):
        check_choice(src, f"{path}.edit_source", EDIT_SOURCES)
    check(d.get("max_text_len", 32) >= 2, f"{path}.max_text_len", "must be >= 2 (BOS + one token)")
    check(d.get("text_weight", 0.005) >= 0, f"{path}.text_weight", "must be >= 0")
    check(0.0 <= d.get("text_dropout", 0.1) < 1.0, f"{path}.text_dropout", "must be in [0, 1)")
    cfg = config_from_dict(d)
    check(cfg.vae.latent_size is not None and cfg.vae.latent_size % cfg.patch_size == 0,
          f"{path}.patch_size", f"the VAE latent size {cfg.vae.latent_size} must be a multiple of patch_size "
          f"{cfg.patch_size} (set model.vae.image_size)")


def _init(init, names):
    return nn.with_logical_partitioning(init, names)


class UniFluid(nn.Module):
    config: UniFluidConfig

    def setup(self):
        c = self.config
        d = c.width
        self.llm = gemma_lib.Gemma(c.llm)
        self.vae = vae_lib.AutoencoderKL(c.vae)
        if c.siglip is not None:
            self.siglip = siglip_lib.SigLIP(c.siglip)
            # PaliGemma's img/head: linear with bias to the LLM width (no sqrt(D) scale on image tokens).
            self.und_proj = nn.Dense(d, dtype=c.llm.dtype, name="und_proj",
                                     kernel_init=_init(nn.initializers.lecun_normal(), (None, "embed")),
                                     bias_init=_init(nn.initializers.zeros, ("embed",)))
        self.img_in = nn.Dense(d, dtype=c.llm.dtype, name="img_in",
                               kernel_init=_init(nn.initializers.xavier_uniform(), (None, "embed")),
                               bias_init=_init(nn.initializers.zeros, ("embed",)))
        table = _init(nn.initializers.normal(0.02), ("pos", "embed"))
        self.pos2d = self.param("pos2d", table, (c.n_img, d))
        self.next_pos2d = self.param("next_pos2d", table, (c.n_img, d))
        self.boi = self.param("boi", _init(nn.initializers.normal(0.02), ("embed",)), (d,))
        self.head = diffusion_lib.DiffusionHead(c.diffusion)

    # -- images -> tokens ---------------------------------------------------------------------------------
    def image_tokens(self, images, rng=None):
        """Frozen VAE: images [B,G,G,3] in [-1,1] -> scaled latent tokens [B, n, C] (no gradient)."""
        z = self.vae.encode_latents(images, rng if self.config.sample_latents else None)
        return jax.lax.stop_gradient(patchify(z, self.config.patch_size).astype(jnp.float32))

    def decode_tokens(self, tokens):
        """Tokens [B, n, C] in raster order -> images [B,G,G,3]."""
        latent = unpatchify(tokens, self.config.patch_size)
        return self.vae.decode_latents(latent)

    def und_embeddings(self, images):
        """SigLIP tokens projected to D: [B,U,U,3] -> [B, n_und, D]."""
        tokens, _ = self.siglip(images)
        if not self.config.train_siglip:
            tokens = jax.lax.stop_gradient(tokens)
        return self.und_proj(tokens)

    # -- embeddings ---------------------------------------------------------------------------------------
    def image_embeddings(self, tokens, pos, next_pos, has_next):
        """Linear(C->D)(token) + pos2d[pos] + next_pos2d[next_pos] * has_next; leading dims broadcast."""
        dt = self.config.llm.dtype
        x = self.img_in(tokens.astype(dt)) + self.pos2d[pos].astype(dt)
        return x + jnp.where(has_next[..., None], self.next_pos2d[next_pos].astype(dt), 0)

    def boi_embedding(self, first_pos):
        """BOI + next_pos2d[p(0)]: [B] -> [B, 1, D]."""
        dt = self.config.llm.dtype
        return (self.boi.astype(dt) + self.next_pos2d[first_pos].astype(dt))[:, None]

    def gen_embeddings(self, tokens, order):
        """Raster tokens [B,n,C] + order [B,n] -> the gen segment [B, 1+n, D]: BOI, then p(0) .. p(n-1)."""
        n = self.config.n_img
        ordered = order_lib.gather_tokens(tokens, order)
        next_pos = jnp.roll(order, -1, axis=1)
        has_next = jnp.broadcast_to(jnp.arange(n) < n - 1, order.shape)
        img = self.image_embeddings(ordered, order, next_pos, has_next)
        return jnp.concatenate([self.boi_embedding(order[:, 0]), img], axis=1)

    def src_embeddings(self, tokens):
        """Edit source through the VAE (prefix): raster tokens with their own positions, no next-position."""
        n = self.config.n_img
        pos = jnp.broadcast_to(jnp.arange(n), tokens.shape[:2])
        return self.image_embeddings(tokens, pos, pos, jnp.zeros(tokens.shape[:2], bool))

    def embed_text(self, tokens):
        return self.llm.embed(tokens)

    def embed_sequence(self, batch, gen_tokens, order, src_tokens=None):
        """The full [B, S, D] input: und | src | text | gen (zeros where a segment is absent)."""
        c = self.config
        b = batch["text_tokens"].shape[0]
        parts = []
        if c.n_und:
            parts.append(self.und_embeddings(batch["image_und"]).astype(c.llm.dtype))
        if c.n_src:
            parts.append(self.src_embeddings(src_tokens))
        parts.append(self.embed_text(batch["text_tokens"]))
        parts.append(self.gen_embeddings(gen_tokens, order))
        x = jnp.concatenate(parts, axis=1)
        assert x.shape[:2] == (b, c.seq_len), (x.shape, c.seq_len)
        return x

    # -- transformer --------------------------------------------------------------------------------------
    def __call__(self, x, positions, attn_mask, cache=None, cache_index=None):
        """Embedded [B,T,D] -> (hidden [B,T,D], cache): prefill / extend share this path with training."""
        return self.llm(x, positions, attn_mask, cache, cache_index)

    def text_logits(self, hidden):
        return self.llm.logits(hidden)

    def head_apply(self, x_t, t, z):
        return self.head(x_t, t, z)

    def init_all(self, batch):
        """Touches every submodule once so `init` creates all params (VAE decoder included)."""
        c = self.config
        b = batch["text_tokens"].shape[0]
        tokens = self.image_tokens(batch["image_gen"])
        src = tokens if c.n_src else None
        x = self.embed_sequence(batch, tokens, order_lib.raster_orders(b, c.n_img), src)
        input_mask = jnp.ones(x.shape[:2], jnp.int32)
        h, _ = self(x, masks.positions_from_mask(input_mask), masks.make_attention_mask(input_mask, input_mask))
        logits = self.text_logits(h[:, :1])
        z = h[:, :1].reshape(-1, c.width)
        eps = self.head(jnp.zeros((z.shape[0], c.token_dim)), jnp.zeros((z.shape[0],), jnp.int32), z)
        return logits, eps, self.decode_tokens(tokens)

    # -- training -----------------------------------------------------------------------------------------
    def loss(self, batch, rng, step, total_steps: int):
        """(loss, metrics) for a mixed batch (fields: see data.pipeline); `step` may be traced."""
        c = self.config
        off = c.offsets
        task = batch["task"]
        b, L = batch["text_tokens"].shape
        k_lat, k_src, k_order, k_drop, k_diff = jax.random.split(rng, 5)
        gen_valid = (task == layout.T2I) | (task == layout.EDIT)

        if "gen_tokens" in batch:  # pre-extracted latent tokens (latent cache)
            gen_tokens = batch["gen_tokens"].astype(jnp.float32)
        else:
            gen_tokens = self.image_tokens(batch["image_gen"], k_lat)
        src_tokens = None
        if c.n_src:
            src_tokens = batch["src_tokens"] if "src_tokens" in batch else self.image_tokens(batch["image_src"], k_src)
        order = order_lib.sample_orders(
            k_order, b, c.n_img,
            order_lib.random_order_prob(step, total_steps, c.order_mode, c.random_until, c.raster_from))

        # CFG text dropout: a dropped t2i prompt or edit instruction becomes the empty prompt [BOS] (an edit
        # keeps its source image), which is exactly the unconditional branch generation guides against.
        drop = gen_valid & (jax.random.uniform(k_drop, (b,)) < c.text_dropout)
        text_input_mask = jnp.where(drop[:, None], batch["text_input_mask"] * (jnp.arange(L) == 0),
                                    batch["text_input_mask"])
        input_mask, mask_ar = layout.sequence_masks(
            task, text_input_mask, batch["text_mask_ar"], c.n_und, c.n_src, c.n_img, xp=jnp,
            edit_und="siglip" in c.edit_source)

        x = self.embed_sequence(batch, gen_tokens, order, src_tokens)
        h, _ = self(x, masks.positions_from_mask(input_mask), masks.make_attention_mask(input_mask, mask_ar))

        # Text: hidden at slot i predicts token i + 1 (logits only over the text segment).
        logits = self.text_logits(h[:, off["text"]:off["text"] + L - 1])
        labels = batch["text_tokens"][:, 1:]
        weights = batch["text_loss_mask"][:, 1:].astype(jnp.float32)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[..., None], axis=-1)[..., 0]
        correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
        text_loss = (nll * weights).sum() / jnp.maximum(weights.sum(), 1.0)

        # Image: hidden at BOI .. slot n-1 predicts tokens p(0) .. p(n-1).
        z = h[:, off["gen"]:off["gen"] + c.n_img].reshape(b * c.n_img, c.width)
        target = order_lib.gather_tokens(gen_tokens, order).reshape(b * c.n_img, c.token_dim)
        mask = jnp.repeat(gen_valid, c.n_img)
        visual_loss, dmetrics = diffusion_lib.diffusion_loss(
            lambda _, x_t, t, cond: self.head(x_t, t, cond), None, z, target, mask, k_diff,
            c.diffusion.batch_mul, diffusion=c.diffusion.train_diffusion())

        loss = visual_loss + c.text_weight * text_loss
        metrics = {"loss": loss, "visual_loss": visual_loss, "text_loss": text_loss,
                   "diffusion_mse": dmetrics["mse"], "diffusion_vb": dmetrics["vb"],
                   "random_order_frac": jnp.mean((order != jnp.arange(c.n_img)).any(-1).astype(jnp.float32))}
        for name in ("caption", "vqa"):
            w = weights * (task == layout.TASK_IDS[name])[:, None]
            denom = jnp.maximum(w.sum(), 1.0)
            metrics[f"{name}_text_loss"] = (nll * w).sum() / denom
            metrics[f"{name}_token_acc"] = (correct * w).sum() / denom
        for i, name in enumerate(layout.TASKS):
            metrics[f"frac_{name}"] = jnp.mean((task == i).astype(jnp.float32))
        return loss, metrics


def check_batch(config: UniFluidConfig, batch: dict[str, Any]) -> None:
    """One clear error, before compiling, for a batch that does not fit the model config."""
    c = config
    b, L = batch["text_tokens"].shape
    if L != c.max_text_len:
        raise ValueError(f"batch['text_tokens'] has {L} text slots but model.max_text_len is {c.max_text_len}; "
                         "set data.max_text_len and model.max_text_len to the same value")
    g = c.vae.image_size
    if "gen_tokens" not in batch and tuple(batch["image_gen"].shape[1:]) != (g, g, 3):
        raise ValueError(f"batch['image_gen'] has shape {tuple(batch['image_gen'].shape)}; the VAE config "
                         f"(model.vae.image_size={g}) expects [B, {g}, {g}, 3]; set data.gen_size={g}")
    if c.n_und:
        u = c.siglip.image_size
        if tuple(batch["image_und"].shape[1:]) != (u, u, 3):
            raise ValueError(f"batch['image_und'] has shape {tuple(batch['image_und'].shape)}; SigLIP "
                             f"(model.siglip.image_size={u}) expects [B, {u}, {u}, 3]; set data.und_size={u}")
    tasks = jax.device_get(batch["task"]) if not isinstance(batch["task"], jax.core.Tracer) else None
    if tasks is not None and ((tasks < 0) | (tasks >= len(layout.TASKS))).any():
        raise ValueError(f"batch['task'] has ids outside 0..{len(layout.TASKS) - 1} ({layout.TASKS})")
    gemma_lib.check_tokens(batch["text_tokens"], c.llm.vocab_size)
