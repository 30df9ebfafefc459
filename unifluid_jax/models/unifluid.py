"""The unified UniFluid model (SPEC 1, 6, 7): one Gemma over [SigLIP | VAE source | text | BOI + image].

The model reads laid-out rows (`unifluid_jax.layout`, the data/model contract): one example per row (fixed
layout) or several (packed); positions and masks come from the rows' segment ids (models/masks.py). Image tokens are
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
from unifluid_jax import layout
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
    def dims(self) -> layout.Dims:
        return layout.Dims(n_und=self.n_und, n_src=self.n_src, n_img=self.n_img, max_text_len=self.max_text_len,
                           edit_und="siglip" in self.edit_source)

    @property
    def offsets(self) -> dict[str, int]:
        """Segment starts of a fixed-layout row (und, src, text, gen = BOI, img, total)."""
        text = self.n_und + self.n_src
        gen = text + self.max_text_len
        return {"und": 0, "src": self.n_und, "text": text, "gen": gen, "img": gen + 1, "total": gen + 1 + self.n_img}

    @property
    def seq_len(self) -> int:
        """Slots of a fixed-layout row [und | src | text | BOI + image]."""
        return self.dims.fixed_len


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
    check("text_dropout" not in d, f"{path}.text_dropout",
          "moved to the data pipeline (per record, deterministic): set data.text_dropout instead")
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
    cfg = config_from_dict(d)
    check(cfg.vae.latent_size is not None and cfg.vae.latent_size % cfg.patch_size == 0,
          f"{path}.patch_size", f"the VAE latent size {cfg.vae.latent_size} must be a multiple of patch_size "
          f"{cfg.patch_size} (set model.vae.image_size)")


def _flat_keys(keys):
    """[B, G] keys (typed, or raw uint32 [B, G, 2]) -> [B * G] keys."""
    return keys.reshape((-1,) + keys.shape[2:])


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
        pos = jnp.broadcast_to(jnp.arange(n), tokens.shape[:-1])
        return self.image_embeddings(tokens, pos, pos, jnp.zeros(tokens.shape[:-1], bool))

    def embed_text(self, tokens):
        return self.llm.embed(tokens)

    def embed_rows(self, batch, gen_tokens, orders, src_tokens=None):
        """The [B, S, D] input of laid-out rows (layout.py): every slot takes its kind's embedding.

        gen_tokens [B, G, n, C] raster, orders [B, G, n], src_tokens [B, G, n, C] (if n_src)."""
        c = self.config
        kind, index = batch["kind"], batch["index"]
        b, s = kind.shape
        dt = c.llm.dtype
        x = self.embed_text(batch["tokens"]).astype(dt)

        def take(table, k):  # table [B, K, D]; slots of kind k read table[index]
            rows = jnp.take_along_axis(table, jnp.clip(index, 0, table.shape[1] - 1)[..., None], axis=1)
            return jnp.where((kind == k)[..., None], rows.astype(dt), x)

        if c.n_und and "image_und" in batch:  # rows without und images (t2i prompts) have no und slots
            und = batch["image_und"]
            u = und.shape[1]
            x = take(self.und_embeddings(und.reshape((b * u,) + und.shape[2:])).reshape(b, u * c.n_und, -1),
                     layout.K_UND)
        g = gen_tokens.shape[1]
        gen = self.gen_embeddings(gen_tokens.reshape((b * g,) + gen_tokens.shape[2:]), orders.reshape(b * g, -1))
        gen = gen.reshape(b, g * (1 + c.n_img), -1)
        x = take(gen, layout.K_BOI)
        x = take(gen, layout.K_IMG)
        if c.n_src:
            x = take(self.src_embeddings(src_tokens).reshape(b, g * c.n_src, -1), layout.K_SRC)
        return x

    # -- transformer --------------------------------------------------------------------------------------
    def __call__(self, x, positions, attn_mask, cache=None, cache_index=None):
        """Embedded [B,T,D] -> (hidden [B,T,D], cache): prefill / extend share this path with training."""
        return self.llm(x, positions, attn_mask, cache, cache_index)

    def text_logits(self, hidden):
        return self.llm.logits(hidden)

    def head_apply(self, x_t, t, z):
        return self.head(x_t, t, z)

    def forward_rows(self, batch, x):
        """Laid-out rows: embedded x [B, S, D] -> hidden [B, S, D] (positions / masks from the schema)."""
        mask = masks.SegmentMask(batch["segment_ids"], batch["mask_ar"])
        h, _ = self(x, masks.segment_positions(batch["segment_ids"]), mask)  # splash: SegmentMask
        return h

    def init_all(self, batch):
        """Touches every submodule once so `init` creates all params (VAE decoder included)."""
        c = self.config
        b, g = batch["gen_start"].shape
        if "gen_tokens" in batch:
            tokens = batch["gen_tokens"]
        else:
            tokens = self.image_tokens(batch["image_gen"].reshape((b * g,) + batch["image_gen"].shape[2:]))
        tokens = tokens.reshape(b, g, c.n_img, c.token_dim)
        x = self.embed_rows(batch, tokens, order_lib.raster_orders(b * g, c.n_img).reshape(b, g, c.n_img),
                            tokens if c.n_src else None)
        h = self.forward_rows(batch, x)
        logits = self.text_logits(h[:, :1])
        z = h[:, :1].reshape(-1, c.width)
        eps = self.head(jnp.zeros((z.shape[0], c.token_dim)), jnp.zeros((z.shape[0],), jnp.int32), z)
        return logits, eps, self.decode_tokens(tokens[:, 0])

    # -- training -----------------------------------------------------------------------------------------
    def _row_tokens(self, batch, image_key, token_key, keys):
        """[B, G, n, C] tokens of the row's gen (or src) images: cached, or VAE-encoded with per-image keys."""
        c = self.config
        if token_key in batch:
            return batch[token_key].astype(jnp.float32)
        images = batch[image_key]
        b, g = images.shape[:2]
        flat = images.reshape((b * g,) + images.shape[2:])
        if not c.sample_latents:
            return self.image_tokens(flat).reshape(b, g, c.n_img, c.token_dim)
        mean, logvar = self.vae.encode(flat)  # the posterior sample is drawn per image from its own key
        noise = jax.vmap(lambda k: jax.random.normal(k, mean.shape[1:], mean.dtype))(_flat_keys(keys))
        z = (mean + jnp.exp(0.5 * logvar) * noise) * c.vae.scaling_factor
        return jax.lax.stop_gradient(patchify(z, c.patch_size).astype(jnp.float32)).reshape(
            b, g, c.n_img, c.token_dim)

    def loss_terms(self, batch, rng, step, total_steps: int):
        """Per-target and per-image loss terms of laid-out rows (layout.py); `loss` reduces them.

        Every random draw of a gen image (latent sample, order, diffusion t / noise) comes from a key folded
        with its gen_uid, so an example draws the same whatever row / layout it is in."""
        c = self.config
        b, g = batch["gen_start"].shape
        n = c.n_img
        k_lat, k_src, k_order, k_diff = jax.random.split(rng, 4)
        uid = batch["gen_uid"]
        per_image = lambda k: jax.vmap(jax.vmap(lambda u: jax.random.fold_in(k, u)))(uid)  # [B, G] keys
        gen_tokens = self._row_tokens(batch, "image_gen", "gen_tokens", per_image(k_lat))
        src_tokens = self._row_tokens(batch, "image_src", "src_tokens", per_image(k_src)) if c.n_src else None
        p_random = order_lib.random_order_prob(step, total_steps, c.order_mode, c.random_until, c.raster_from)
        orders = jax.vmap(jax.vmap(lambda k: order_lib.sample_orders(k, 1, n, p_random)[0]))(per_image(k_order))

        h = self.forward_rows(batch, self.embed_rows(batch, gen_tokens, orders, src_tokens))

        # Text: logits only at the target slots (the slot before each target token).
        slot = jnp.maximum(batch["tgt_slot"], 0)
        logits = self.text_logits(jnp.take_along_axis(h, slot[..., None], axis=1)).astype(jnp.float32)
        labels = batch["tgt_label"]
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[..., None], axis=-1)[..., 0]
        correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)

        # Image: the hidden state at BOI + k (k = 0 .. n-1) predicts token p(k); one head call on all G images.
        gen_valid = batch["gen_start"] >= 0
        gslot = jnp.maximum(batch["gen_start"], 0)[..., None] + jnp.arange(n)  # [B, G, n]
        z = jnp.take_along_axis(h, gslot.reshape(b, g * n)[..., None], axis=1).reshape(b * g, n, c.width)
        target = jax.vmap(order_lib.gather_tokens)(gen_tokens, orders).reshape(b * g, n, c.token_dim)
        m = c.diffusion.batch_mul
        diffusion = c.diffusion.train_diffusion()
        t, noise = jax.vmap(lambda k: diffusion_lib.sample_t_noise(k, m * n, c.token_dim, diffusion.num_timesteps))(
            _flat_keys(per_image(k_diff)))
        tile = lambda a: jnp.tile(a, (1, m, 1)).reshape(b * g * m * n, -1)  # MAR's batch_mul repeat
        terms = diffusion_lib.diffusion_loss_terms(
            lambda _, x_t, tt, cond: self.head(x_t, tt, cond), None, tile(z), tile(target), t.reshape(-1),
            noise.reshape(b * g * m * n, -1), diffusion)
        per_img = {k: v.reshape(b, g, m * n).mean(-1) for k, v in terms.items()}
        return {"nll": nll, "correct": correct, "tgt_task": batch["tgt_task"], "visual": per_img["loss"],
                "mse": per_img["mse"], "vb": per_img["vb"], "gen_valid": gen_valid, "orders": orders}

    def loss(self, batch, rng, step, total_steps: int):
        """(loss, metrics) for a batch of laid-out rows; `step` may be traced.

            loss = mean over gen images' tokens of the diffusion loss + text_weight * mean over text targets
        """
        c = self.config
        r = self.loss_terms(batch, rng, step, total_steps)
        gv = r["gen_valid"].astype(jnp.float32)
        n_img = jnp.maximum(gv.sum(), 1.0)
        mean_img = lambda v: (v * gv).sum() / n_img
        w = (r["tgt_task"] >= 0).astype(jnp.float32)
        text_loss = (r["nll"] * w).sum() / jnp.maximum(w.sum(), 1.0)
        visual_loss = mean_img(r["visual"])
        loss = visual_loss + c.text_weight * text_loss
        is_random = (r["orders"] != jnp.arange(c.n_img)).any(-1).astype(jnp.float32)
        metrics = {"loss": loss, "visual_loss": visual_loss, "text_loss": text_loss,
                   "diffusion_mse": mean_img(r["mse"]), "diffusion_vb": mean_img(r["vb"]),
                   "random_order_frac": mean_img(is_random)}
        for name in ("caption", "vqa"):
            wt = (r["tgt_task"] == layout.TASK_IDS[name]).astype(jnp.float32)
            denom = jnp.maximum(wt.sum(), 1.0)
            metrics[f"{name}_text_loss"] = (r["nll"] * wt).sum() / denom
            metrics[f"{name}_token_acc"] = (r["correct"] * wt).sum() / denom
        counts = batch["task_count"].sum(0).astype(jnp.float32)
        for i, name in enumerate(layout.TASKS):
            metrics[f"frac_{name}"] = counts[i] / jnp.maximum(counts.sum(), 1.0)
        return loss, metrics


def check_batch(config: UniFluidConfig, batch: dict[str, Any]) -> None:
    """One clear error, before compiling, for a batch (laid-out rows) that does not fit the model config."""
    c = config
    missing = [k for k in ("tokens", "segment_ids", "kind", "index", "gen_start", "tgt_slot") if k not in batch]
    if missing:
        raise ValueError(f"batch lacks the laid-out row fields {missing}: build it with unifluid_jax.layout "
                         "(the data pipeline does, given the model's dims)")
    g = c.vae.image_size
    if "gen_tokens" not in batch and tuple(batch["image_gen"].shape[2:]) != (g, g, 3):
        raise ValueError(f"batch['image_gen'] has shape {tuple(batch['image_gen'].shape)}; the VAE config "
                         f"(model.vae.image_size={g}) expects [B, G, {g}, {g}, 3]; set data.gen_size={g}")
    if c.n_und:
        u = c.siglip.image_size
        if tuple(batch["image_und"].shape[2:]) != (u, u, 3):
            raise ValueError(f"batch['image_und'] has shape {tuple(batch['image_und'].shape)}; SigLIP "
                             f"(model.siglip.image_size={u}) expects [B, U, {u}, {u}, 3]; set data.und_size={u}")
    gemma_lib.check_tokens(batch["tokens"], c.llm.vocab_size)
    gemma_lib.check_tokens(batch["tgt_label"], c.llm.vocab_size)
