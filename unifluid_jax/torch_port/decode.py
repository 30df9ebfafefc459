"""Captioning / VQA with the PyTorch port: greedy and beam search over a transformers DynamicCache.

Prefix [SigLIP tokens | BOS question SEP] (bidirectional, prefilled once), then one answer token per step
(causal). Semantics match unifluid_jax.inference.decode: rows stop at EOS and emit PAD afterwards; beam
search keeps K beams per example, a finished beam continues with PAD at zero cost, candidates are ranked by
logprob / length^length_norm (length counts tokens up to and including EOS).
"""
from __future__ import annotations

import torch
from transformers import DynamicCache

from unifluid_jax.torch_port.generate import _pad
from unifluid_jax.torch_port.model import BOS_ID, EOS_ID, PAD_ID, UniFluidTorch, rows, sequence_masks


def question_ids(model: UniFluidTorch, questions, b: int) -> list[list[int]]:
    """[BOS question SEP] per row; None = the caption prompt the run was trained with."""
    tok = model.tokenizer
    if questions is None:
        questions = [model.config.get("caption_prompt", "caption en")] * b
    if len(questions) != b:
        raise ValueError(f"{len(questions)} questions for {b} images")
    sep = list(tok.sep_ids) if tok is not None else []
    out = []
    for i, q in enumerate(questions):
        ids = tok.encode(q) if isinstance(q, str) else [int(t) for t in q]
        if 1 + len(ids) + len(sep) >= model.config["max_text_len"]:
            raise ValueError(f"question {i} has {len(ids)} tokens: too long for max_text_len="
                             f"{model.config['max_text_len']} (BOS, SEP and an answer need room)")
        out.append([BOS_ID] + ids + sep)
    return out


class _Decoder:
    """The model as a step function over a cache: prefix -> first logits; token at step t -> next logits."""

    def __init__(self, model: UniFluidTorch, images, prefix_ids, max_new_tokens: int):
        self.model = model
        ids, valid = _pad(prefix_ids)
        b, lt = ids.shape
        und = model.und_embeddings(images) if model.vision is not None else torch.zeros(b, 0, model.config["width"])
        nu = und.shape[1]
        self.p = nu + lt
        ones = lambda k: torch.ones(b, k, dtype=torch.long)  # noqa: E731
        input_mask = torch.cat([ones(nu), valid, ones(max_new_tokens)], 1)
        mask_ar = torch.cat([torch.zeros(b, nu + lt, dtype=torch.long), ones(max_new_tokens)], 1)
        self.positions, self.masks = sequence_masks(input_mask, mask_ar, model.window)
        self.cache = DynamicCache()
        h = model.hidden(torch.cat([und, model.embed_text(ids)], 1), self.positions[:, :self.p],
                         rows(self.masks, 0, self.p), self.cache)
        last = nu + valid.sum(1) - 1
        self.first = model.logits(h[torch.arange(b), last][:, None])[:, 0]

    def step(self, tok, t: int):
        slot = self.p + t
        h = self.model.hidden(self.model.embed_text(tok[:, None]), self.positions[:, slot:slot + 1],
                              rows(self.masks, slot, 1), self.cache)
        return self.model.logits(h)[:, 0]

    def reorder(self, idx):
        self.cache.reorder_cache(idx)
        self.positions = self.positions[idx]
        self.masks = {k: m[idx] for k, m in self.masks.items()}


def greedy(dec: _Decoder, max_new_tokens: int):
    logits = dec.first
    b = logits.shape[0]
    tokens = torch.full((b, max_new_tokens), PAD_ID, dtype=torch.long)
    done = torch.zeros(b, dtype=torch.bool)
    logprob = torch.zeros(b)
    all_logits = torch.zeros(b, max_new_tokens, logits.shape[-1])  # what each token was chosen from
    for t in range(max_new_tokens):
        all_logits[:, t] = logits
        tok = torch.where(done, PAD_ID, logits.argmax(-1))
        lp = torch.log_softmax(logits, -1).gather(1, tok[:, None])[:, 0]
        logprob += torch.where(done, 0.0, lp)
        tokens[:, t] = tok
        done = done | (tok == EOS_ID)
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        logits = dec.step(tok, t)
    return {"tokens": tokens, "logprob": logprob, "logits": all_logits}


def beam(dec: _Decoder, max_new_tokens: int, beam_size: int, length_norm: float = 0.0):
    first = dec.first
    b, v = first.shape
    k = beam_size
    dec.reorder(torch.arange(b).repeat_interleave(k))
    logits = first.repeat_interleave(k, 0)
    tokens = torch.full((b, k, max_new_tokens), PAD_ID, dtype=torch.long)
    done = torch.zeros(b, k, dtype=torch.bool)
    logprob = torch.where(torch.arange(k) == 0, 0.0, float("-inf")).expand(b, k).clone()
    length = torch.zeros(b, k, dtype=torch.long)
    pad_only = torch.where(torch.arange(v) == PAD_ID, 0.0, float("-inf"))
    norm = lambda lp, n: lp / n.clamp(min=1).float() ** length_norm  # noqa: E731
    for t in range(max_new_tokens):
        lp = torch.log_softmax(logits, -1).reshape(b, k, v)
        lp = torch.where(done[..., None], pad_only, lp)
        cand = logprob[..., None] + lp
        new_len = length + (~done).long()
        _, idx = norm(cand, new_len[..., None]).reshape(b, k * v).topk(k, dim=1)
        src, tok = idx // v, idx % v
        prev_done = done.gather(1, src)
        tok = torch.where(prev_done, PAD_ID, tok)
        tokens = tokens.gather(1, src[..., None].expand(b, k, max_new_tokens)).clone()
        tokens[:, :, t] = tok
        done = prev_done | (tok == EOS_ID)
        logprob = cand.reshape(b, k * v).gather(1, idx)
        length = new_len.gather(1, src)
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        dec.reorder((torch.arange(b)[:, None] * k + src).reshape(-1))
        logits = dec.step(tok.reshape(-1), t)
    scores = norm(logprob, length)
    best = scores.argsort(dim=1, descending=True, stable=True)
    beams = tokens.gather(1, best[..., None].expand(b, k, max_new_tokens))
    return {"tokens": beams[:, 0], "score": scores.gather(1, best)[:, 0], "beams": beams}


@torch.no_grad()
def answer(model: UniFluidTorch, images, questions=None, *, method: str = "greedy", beam_size: int = 2,
           length_norm: float = 0.0, max_new_tokens: int | None = None, return_tokens: bool = False):
    """Captions (questions=None) or answers for images [B, 3, U, U] in [-1, 1] -> list of strings (and the
    token dict if return_tokens). max_new_tokens defaults to the room max_text_len leaves after the longest
    prefix, like training."""
    if method not in ("greedy", "beam"):
        raise ValueError(f"unknown method {method!r}; choose 'greedy' or 'beam'")
    prefix = question_ids(model, questions, images.shape[0])
    if max_new_tokens is None:
        max_new_tokens = max(1, model.config["max_text_len"] - max(len(p) for p in prefix))
    dec = _Decoder(model, images, prefix, max_new_tokens)
    out = greedy(dec, max_new_tokens) if method == "greedy" else beam(dec, max_new_tokens, beam_size, length_norm)
    texts = [model.tokenizer.decode(row.tolist()) for row in out["tokens"]] if model.tokenizer else None
    return (texts, out) if return_tokens else texts
