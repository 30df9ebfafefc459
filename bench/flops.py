"""Analytic model FLOPs of a train step (Gemma LM, UniFluid, VAE), importable by benches and tools/aot.py.

    from bench import flops
    flops.train_step_flops(config)   # {'total': ..., component: ...} for one step of config.train.batch_size

Conventions (PaLM / MaxText "model FLOPs"): 2 FLOPs per multiply-add, matmuls and convolutions only (norms,
softmax, activations, RoPE, optimizer ignored); a trained part costs 3x its forward (forward + 2x backward),
a frozen part (stop_gradient) 1x; rematerialisation is NOT counted (it is hardware, not model, work).
Attention is counted over the full T x S score matrix, as the XLA path computes it (dense masks: causal,
prefix and sliding-window masking save no FLOPs there).

Per Gemma layer and sequence of T tokens (D width, N heads, K kv heads, H head dim, F mlp dim):
    projections  2 T (D N H + 2 D K H + N H D)      q, kv, out
    attention    4 T S N H                          scores QK^T (2 T S N H) + probs @ V (2 T S N H), S = T
    mlp          2 T (3 D F)                        GeGLU gate + up + down
logits: 2 T' V D over the T' positions that are decoded (all for the LM, the text slots for UniFluid).
UniFluid's sequence has a fixed layout (SigLIP | [VAE source] | text | BOI + image tokens) and every row
carries all segments (masked, not removed), so every row costs the full sequence.
"""
from __future__ import annotations

from typing import Any

TRAIN = 3  # forward + backward (2x forward)


def _get(cfg, name, default=None):
    return getattr(cfg, name, default)


# ------------------------------------------------------------------------------------------ Gemma (LLM)

def gemma_params(cfg) -> dict[str, int]:
    """Matmul parameter counts of a GemmaConfig: {'layers': non-embedding matmul params, 'embed': V * D}."""
    d, n, k, h, f = cfg.width, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
    per_layer = d * n * h + 2 * k * d * h + n * h * d + 3 * d * f
    return {"layers": cfg.num_layers * per_layer, "embed": cfg.vocab_size * d}


def gemma_forward_flops(cfg, batch: int, seq: int, logit_positions: int | None = None) -> dict[str, float]:
    """Forward FLOPs of the decoder stack over [batch, seq] plus logits at `logit_positions` per row."""
    p = gemma_params(cfg)
    tokens = batch * seq
    out = {"llm_matmul": 2.0 * p["layers"] * tokens,
           "llm_attention": 4.0 * cfg.num_layers * batch * seq * seq * cfg.num_heads * cfg.head_dim}
    lp = seq if logit_positions is None else logit_positions
    out["llm_logits"] = 2.0 * batch * lp * cfg.vocab_size * cfg.width
    return out


# ------------------------------------------------------------------------------------------ SigLIP

def siglip_forward_flops(cfg, batch: int) -> float:
    """ViT forward: patch stem + depth x (qkv/out projections, attention, mlp); MAP head if pool='map'."""
    n, d, f, p = cfg.num_patches, cfg.width, cfg.mlp_dim, cfg.patch_size
    stem = 2 * n * p * p * 3 * d
    block = 2 * 4 * n * d * d + 4 * n * n * d + 2 * 2 * n * d * f
    head = 0
    if _get(cfg, "pool", "none") == "map":  # one probe query: q, kv over n, out, mlp
        head = 2 * d * d + 2 * 2 * n * d * d + 4 * n * d + 2 * d * d + 2 * 2 * d * f
    return float(batch * (stem + cfg.depth * block + head))


# ------------------------------------------------------------------------------------------ VAE (SD layout)

def _conv(h: int, w: int, k: int, cin: int, cout: int) -> float:
    return 2.0 * h * w * k * k * cin * cout


def _resnet(h, w, cin, cout) -> float:
    return _conv(h, w, 3, cin, cout) + _conv(h, w, 3, cout, cout) + (_conv(h, w, 1, cin, cout) if cin != cout else 0)


def _mid(cfg, h, w, c) -> float:
    attn = 0.0
    if cfg.mid_attention:
        t = h * w
        attn = 4 * 2.0 * t * c * c + 4.0 * t * t * c  # q, k, v, out + scores and probs @ v (single head)
    return 2 * _resnet(h, w, c, c) + attn


def vae_encode_flops(cfg, batch: int, size: int | None = None) -> float:
    """Forward FLOPs of the VAE encoder (+ quant_conv) on [batch, size, size, 3]."""
    s = size or cfg.image_size
    chans = cfg.block_channels
    total = _conv(s, s, 3, cfg.in_channels, chans[0])
    cin = chans[0]
    for i, ch in enumerate(chans):
        for _ in range(cfg.num_res_blocks):
            total += _resnet(s, s, cin, ch)
            cin = ch
        if i != len(chans) - 1:
            s //= 2
            total += _conv(s, s, 3, ch, ch)  # stride-2 conv: output positions at the halved size
    total += _mid(cfg, s, s, cin)
    total += _conv(s, s, 3, cin, 2 * cfg.latent_channels)
    if cfg.use_quant_conv:
        total += _conv(s, s, 1, 2 * cfg.latent_channels, 2 * cfg.latent_channels)
    return batch * total


def vae_decode_flops(cfg, batch: int, size: int | None = None) -> float:
    """Forward FLOPs of (post_quant_conv +) the VAE decoder producing [batch, size, size, 3]."""
    s = (size or cfg.image_size) // cfg.downsample_factor
    chans = cfg.block_channels[::-1]
    total = _conv(s, s, 1, cfg.latent_channels, cfg.latent_channels) if cfg.use_post_quant_conv else 0.0
    total += _conv(s, s, 3, cfg.latent_channels, chans[0])
    total += _mid(cfg, s, s, chans[0])
    cin = chans[0]
    for i, ch in enumerate(chans):
        for _ in range(cfg.num_res_blocks + 1):
            total += _resnet(s, s, cin, ch)
            cin = ch
        if i != len(chans) - 1:
            s *= 2
            total += _conv(s, s, 3, ch, ch)  # nearest x2, then conv at the doubled size
    total += _conv(s, s, 3, cin, cfg.out_channels)
    return batch * total


# ------------------------------------------------------------------------------------------ diffusion head

def diffusion_head_forward_flops(cfg, cond_dim: int, rows: int) -> float:
    """MAR SimpleMLPAdaLN forward on `rows` (token x noise draw) rows: input/cond/time embeddings, depth adaLN
    blocks (modulation 3W + two W x W linears), final layer (modulation 2W + linear to out_channels)."""
    w = cfg.width
    per_row = (2 * cfg.in_channels * w + 2 * cfg.freq_dim * w + 2 * w * w + 2 * cond_dim * w
               + cfg.depth * (2 * w * 3 * w + 2 * 2 * w * w)
               + 2 * w * 2 * w + 2 * w * cfg.out_channels)
    return float(rows * per_row)


# ------------------------------------------------------------------------------------------ train steps

def lm_train_flops(gemma_cfg, batch: int, seq: int) -> dict[str, float]:
    fwd = gemma_forward_flops(gemma_cfg, batch, seq)
    return {k: TRAIN * v for k, v in fwd.items()}


def unifluid_train_flops(model_cfg, batch: int, latents_in_batch: bool = False) -> dict[str, float]:
    """One UniFluid step on `batch` rows (a models.unifluid.UniFluidConfig). Frozen VAE (forward only, unless
    the batch carries pre-extracted latents), SigLIP forward (x3 when model.train_siglip), LLM over the full
    sequence, logits over the L - 1 text slots, diffusion head on n_img x batch_mul rows per example."""
    c = model_cfg
    llm = c.llm
    out = {k: TRAIN * v for k, v in gemma_forward_flops(llm, batch, c.seq_len, c.max_text_len - 1).items()}
    if c.siglip is not None:
        out["siglip"] = (TRAIN if c.train_siglip else 1) * siglip_forward_flops(c.siglip, batch)
        out["und_proj"] = TRAIN * 2.0 * batch * c.n_und * c.siglip.width * llm.width
    img_rows = c.n_img + c.n_src  # gen tokens + VAE edit-source tokens go through img_in
    out["img_in"] = TRAIN * 2.0 * batch * img_rows * c.token_dim * llm.width
    if not latents_in_batch:
        images = batch * (2 if c.n_src else 1)
        out["vae_encode"] = vae_encode_flops(c.vae, images)
    rows = batch * c.n_img * c.diffusion.batch_mul
    out["diffusion_head"] = TRAIN * diffusion_head_forward_flops(c.diffusion, llm.width, rows)
    return out


def vae_train_flops(vae_cfg, batch: int) -> dict[str, float]:
    return {"vae_encode": TRAIN * vae_encode_flops(vae_cfg, batch),
            "vae_decode": TRAIN * vae_decode_flops(vae_cfg, batch)}


def _with_total(d: dict[str, float]) -> dict[str, float]:
    d = dict(d)
    d["total"] = float(sum(d.values()))
    return d


def train_step_flops(config: Any) -> dict[str, float]:
    """Model FLOPs of one optimizer step of an experiment config (configs/*.py), by component + 'total'.

    Gradient accumulation does not change the count (same rows per step). Unknown tasks raise ValueError."""
    batch = int(config.train.batch_size)
    task = config.task
    if task == "lm":
        from unifluid_jax.models import gemma
        from unifluid_jax.tasks import lm
        return _with_total(lm_train_flops(gemma.config_from_dict(config.gemma), batch, lm.seq_len(config.data) - 1))
    if task == "unifluid":
        from unifluid_jax.models import unifluid
        return _with_total(unifluid_train_flops(unifluid.config_from_dict(config.model), batch,
                                                bool(config.data.get("latents", ""))))
    if task == "vae":
        from unifluid_jax.tasks import vae
        return _with_total(vae_train_flops(vae.vae_config(config.vae), batch))
    raise ValueError(f"no analytic FLOP count for task {task!r} (known: lm, unifluid, vae)")


def tokens_per_step(config: Any) -> int:
    """Sequence slots processed by the LLM per step (batch x sequence length); 0 for tasks without an LLM."""
    batch = int(config.train.batch_size)
    if config.task == "lm":
        from unifluid_jax.tasks import lm
        return batch * (lm.seq_len(config.data) - 1)
    if config.task == "unifluid":
        from unifluid_jax.models import unifluid
        return batch * unifluid.config_from_dict(config.model).seq_len
    return 0
