"""UniFluid in PyTorch from an export folder (see unifluid_jax/convert/unifluid.py): transformers Gemma-2 and
SigLIP, diffusers AutoencoderKL, and the UniFluid-specific weights. Imports nothing from JAX.

One example's sequence (the model's math, independent of how the JAX trainer packs rows):
    understanding  [SigLIP tokens | BOS question SEP] bidirectional prefix, then [answer EOS] causal
    generation     [BOS prompt] bidirectional prefix, then [BOI | image tokens in generation order] causal
Rows of a batch are padded in the text segment; RoPE positions count only valid tokens and padding is masked,
so padding changes nothing. Masks are built from (input_mask, mask_ar) like big_vision's PaliGemma: key s is
visible to query t iff cumsum(mask_ar)[s] <= cumsum(mask_ar)[t], both are valid, and for the sliding-window
(local) layers pos_t - pos_s < window. They go to transformers as a dict of additive 4D masks per layer type
(eager attention: the SDPA path ignores Gemma-2's softcap), with a DynamicCache of full layers.

Shapes: B rows, T new tokens, S keys, D LLM width, C token channels, n image tokens.
"""
from __future__ import annotations

import json
import os

import torch
from torch import nn

from unifluid_jax.torch_port.diffusion import DiffusionHead

PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3


def sequence_masks(input_mask, mask_ar, window: int | None):
    """(positions [B, S] long, {'full_attention', 'sliding_attention'}: additive [B, 1, S, S] float32)."""
    valid = input_mask.bool()
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    blocks = mask_ar.long().cumsum(-1)
    allowed = (blocks[:, None, :] <= blocks[:, :, None]) & valid[:, None, :] & valid[:, :, None]
    neg = torch.finfo(torch.float32).min
    full = torch.zeros(allowed.shape, dtype=torch.float32).masked_fill(~allowed, neg)[:, None]
    if window is None:
        return positions, {"full_attention": full, "sliding_attention": full}
    near = (positions[:, :, None] - positions[:, None, :]) < window
    local = torch.zeros(allowed.shape, dtype=torch.float32).masked_fill(~(allowed & near), neg)[:, None]
    return positions, {"full_attention": full, "sliding_attention": local}


def rows(masks: dict, start: int, length: int) -> dict:
    """Query rows [start, start + length) and key columns [0, start + length) of every mask (a cached step)."""
    return {k: m[:, :, start:start + length, :start + length] for k, m in masks.items()}


class UniFluidTorch(nn.Module):
    """The unified model; `generate` (text-to-image) and `caption` / `answer` are in generate.py / decode.py
    and bound here as methods."""

    def __init__(self, lm, vision, vae, config: dict, tensors: dict[str, torch.Tensor], tokenizer=None):
        super().__init__()
        self.lm, self.vision, self.vae, self.config, self.tokenizer = lm, vision, vae, config, tokenizer
        c, d = config, config["width"]
        self.img_in = nn.Linear(c["token_dim"], d)
        self.pos2d = nn.Parameter(torch.zeros(c["num_image_tokens"], d))
        self.next_pos2d = nn.Parameter(torch.zeros(c["num_image_tokens"], d))
        self.boi = nn.Parameter(torch.zeros(d))
        if vision is not None:
            self.und_proj = nn.Linear(vision.config.hidden_size, d)
        h = c["diffusion"]
        self.head = DiffusionHead(h["in_channels"], h["width"], d, h["depth"], h["freq_dim"], h["learn_sigma"])
        missing, unexpected = self.load_state_dict(tensors, strict=False)
        own = [k for k in missing if not k.startswith(("lm.", "vision.", "vae."))]
        if own or unexpected:
            raise ValueError(f"unifluid/model.safetensors does not match its config.json: missing {own}, "
                             f"unexpected {unexpected}")
        self.window = getattr(lm.config, "sliding_window", None) if lm.config.model_type == "gemma2" else None

    @classmethod
    def from_folder(cls, folder: str, dtype=torch.float32) -> "UniFluidTorch":
        """Loads DIR (language_model/, vision_encoder/, vae/, unifluid/) with transformers / diffusers."""
        import diffusers
        import transformers
        from safetensors.torch import load_file
        with open(os.path.join(folder, "unifluid", "config.json")) as f:
            config = json.load(f)
        lm_cls = transformers.AutoModelForCausalLM
        lm = lm_cls.from_pretrained(os.path.join(folder, "language_model"), attn_implementation="eager",
                                    dtype=dtype)
        vision = None
        if config.get("num_und_tokens"):
            vision = transformers.SiglipVisionModel.from_pretrained(os.path.join(folder, "vision_encoder"),
                                                                    dtype=dtype)
        vae = diffusers.AutoencoderKL.from_pretrained(os.path.join(folder, "vae"), torch_dtype=dtype)
        tokenizer = None
        tok_path = os.path.join(folder, "language_model", "tokenizer.model")
        if os.path.exists(tok_path):
            from unifluid_jax.data.tokenizer import Tokenizer  # sentencepiece only, no JAX
            tokenizer = Tokenizer(tok_path)
        tensors = load_file(os.path.join(folder, "unifluid", "model.safetensors"))
        return cls(lm, vision, vae, config, tensors, tokenizer).eval()

    # -- embeddings ------------------------------------------------------------------------------------------
    def und_embeddings(self, images):
        """images [B, 3, U, U] in [-1, 1] -> SigLIP tokens projected to D [B, n_und, D]."""
        return self.und_proj(self.vision(pixel_values=images).last_hidden_state)

    def embed_text(self, ids):
        """Token ids [B, T] -> [B, T, D] (transformers' Gemma embedding scales by sqrt(D))."""
        return self.lm.get_input_embeddings()(ids)

    def image_embeddings(self, tokens, pos, next_pos, has_next):
        """img_in(token) + pos2d[pos] + next_pos2d[next_pos] where has_next; [B, k, C] -> [B, k, D]."""
        x = self.img_in(tokens) + self.pos2d[pos]
        return x + torch.where(has_next[..., None], self.next_pos2d[next_pos], torch.zeros_like(x))

    def boi_embedding(self, first_pos):
        """BOI + next_pos2d[p(0)]: [B] -> [B, 1, D]."""
        return (self.boi + self.next_pos2d[first_pos])[:, None]

    # -- transformer -----------------------------------------------------------------------------------------
    def hidden(self, x, positions, masks, cache=None):
        """Embedded [B, T, D] -> final-normed hidden states [B, T, D]; `cache` (a DynamicCache) is extended."""
        mask = masks if self.lm.config.model_type == "gemma2" else masks["full_attention"]
        out = self.lm.model(inputs_embeds=x, position_ids=positions, attention_mask=mask, past_key_values=cache,
                            use_cache=cache is not None)
        return out.last_hidden_state

    def logits(self, hidden):
        """Tied output embedding + final softcap, float32 [B, T, V]."""
        logits = self.lm.lm_head(hidden).float()
        cap = getattr(self.lm.config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits

    def decode_tokens(self, tokens):
        """Raster tokens [B, n, C] -> images [B, 3, H, W] (MAR unpatchify, channel-major patches; VAE decode)."""
        c = self.config
        p, g, ch = c["patch_size"], c["grid"], c["latent_channels"]
        b = tokens.shape[0]
        latent = tokens.reshape(b, g, g, ch, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, ch, g * p, g * p)
        return self.vae.decode(latent / self.vae.config.scaling_factor).sample

    def generate(self, *args, **kwargs):
        from unifluid_jax.torch_port import generate
        return generate.generate_images(self, *args, **kwargs)

    def caption(self, images, **kwargs):
        from unifluid_jax.torch_port import decode
        return decode.answer(self, images, None, **kwargs)

    def answer(self, images, questions, **kwargs):
        from unifluid_jax.torch_port import decode
        return decode.answer(self, images, questions, **kwargs)
