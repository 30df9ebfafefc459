"""Text-to-image with the PyTorch port: KV-cached AR over image tokens, MAR diffusion sampler, CFG, any order.

Step k: the hidden state at BOI (k = 0) or at the previous image token is the condition z of token p(k); the
diffusion head samples it; it is embedded with pos2d[p(k)] + next_pos2d[p(k+1)] and appended to the cache.
With guidance the unconditional rows (the empty prompt [BOS]) run in the same transformer call and both
branches are fed the same sampled token (one chain).
"""
from __future__ import annotations

import torch
from transformers import DynamicCache

from unifluid_jax.torch_port import diffusion
from unifluid_jax.torch_port.model import BOS_ID, PAD_ID, UniFluidTorch, rows, sequence_masks


def prompt_ids(model: UniFluidTorch, prompts) -> list[list[int]]:
    """Strings (with the folder's tokenizer) or id lists -> [BOS, ...] per prompt; checks they fit."""
    out = []
    for i, p in enumerate(prompts):
        ids = model.tokenizer.encode(p) if isinstance(p, str) else [int(t) for t in p]
        if 1 + len(ids) > model.config["max_text_len"]:
            raise ValueError(f"prompt {i} has {len(ids)} tokens; with BOS it must fit max_text_len="
                             f"{model.config['max_text_len']}")
        out.append([BOS_ID] + ids)
    return out


def _pad(seqs: list[list[int]]):
    """Right-padded ids [B, L] and their validity mask."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), PAD_ID, dtype=torch.long)
    valid = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        valid[i, :len(s)] = 1
    return ids, valid


@torch.no_grad()
def generate_images(model: UniFluidTorch, prompts, *, num_steps: int = 100, temperature: float = 1.0,
                    cfg_scale: float = 1.0, cfg_schedule: str = "linear", order="raster", seed: int = 0,
                    noise=None, decode: bool = True):
    """One image per prompt -> (images [B, 3, H, W] in about [-1, 1] or None, tokens [B, n, C] raster order).

    order: 'raster', 'random' (a permutation per row from `seed`) or an explicit LongTensor [B, n].
    noise: optional (x_init [n, B, C], step_noise [n, num_steps, B, C]) for AR step k (x_T and the per-step
    noise, row 0 used at the last respaced step); by default drawn from `seed`.
    """
    c = model.config
    n, ch, d = c["num_image_tokens"], c["token_dim"], c["diffusion"]
    text = prompt_ids(model, prompts)
    b = len(text)
    gen = torch.Generator().manual_seed(seed)
    if isinstance(order, str):
        if order not in ("raster", "random"):
            raise ValueError(f"unknown order {order!r}; choose 'raster', 'random' or pass a [B, n] tensor")
        order = (torch.stack([torch.randperm(n, generator=gen) for _ in range(b)]) if order == "random"
                 else torch.arange(n).expand(b, n))
    order = torch.as_tensor(order, dtype=torch.long)
    next_pos = torch.roll(order, -1, dims=1)
    has_next = (torch.arange(n) < n - 1).expand(b, n)
    guided = cfg_scale != 1.0
    if guided:
        text = text + [[BOS_ID]] * b
    ids, valid = _pad(text)
    r, lt = ids.shape
    input_mask = torch.cat([valid, torch.ones(r, 1 + n, dtype=torch.long)], 1)
    mask_ar = torch.cat([torch.zeros(r, lt, dtype=torch.long), torch.ones(r, 1 + n, dtype=torch.long)], 1)
    positions, masks = sequence_masks(input_mask, mask_ar, model.window)
    reps = 2 if guided else 1
    boi = model.boi_embedding(order[:, 0]).repeat(reps, 1, 1)
    x = torch.cat([model.embed_text(ids), boi], 1)
    cache = DynamicCache()
    z = model.hidden(x, positions[:, :lt + 1], rows(masks, 0, lt + 1), cache)[:, -1]
    sched = diffusion.Schedule(num_steps, d["schedule"], d["num_train_steps"], d["learn_sigma"])
    toks = torch.zeros(b, n, ch)
    for k in range(n):
        if noise is None:
            x_init = torch.randn(b, ch, generator=gen)
            step_noise = torch.randn(sched.num_steps, b, ch, generator=gen)
        else:
            x_init, step_noise = (torch.as_tensor(a[k], dtype=torch.float32) for a in noise)
        scale = diffusion.cfg_scale_at(k, n, cfg_scale, cfg_schedule) if guided else 1.0
        tok = diffusion.sample_token(model.head, sched, z[:b], x_init, step_noise, temperature=temperature,
                                     cfg_scale=scale, z_uncond=z[b:] if guided else None,
                                     clip_x0=d["sample_clip_x0"])
        toks[:, k] = tok
        if k == n - 1:
            break
        col = slice(k, k + 1)
        e = model.image_embeddings(tok[:, None], order[:, col], next_pos[:, col], has_next[:, col]).repeat(reps, 1, 1)
        slot = lt + 1 + k
        z = model.hidden(e, positions[:, slot:slot + 1], rows(masks, slot, 1), cache)[:, 0]
    raster = torch.empty_like(toks)
    raster.scatter_(1, order[..., None].expand(b, n, ch), toks)
    return (model.decode_tokens(raster) if decode else None), raster
