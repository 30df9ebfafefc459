"""Text decoding (captioning / VQA) with the unified model (SPEC 7, 9): greedy, sampling, beam search.

The prompt is one row laid out by the training layout (unifluid_jax/layout.py) with the segments caption /
vqa use, [SigLIP tokens | BOS question SEP] (bidirectional), P slots; answer token t then goes at slot P + t
of a decode area after it (S = P + T) with RoPE position len(prefix) + t, which is exactly what training
computes for the answer (positions skip padding and padding is masked). The prefix is prefilled into a KV cache of length S; each step feeds one token.

The search cores are model-free: they drive a callback

    logits_fn(state, tokens [N] int32, t) -> (logits [N, V] for the token after `tokens`, new state)

(feeding answer token t), start from `first_logits` [B, V] (the prefill's prediction of answer token 0)
and stop at EOS: finished rows emit PAD and their score stops changing. `beam_search` also needs
`reorder_fn(state, rows [M]) -> state` that gathers state rows (to tile B rows into B*K beams and to follow
the surviving beams). The model's cached and uncached (`use_cache=False`, full recompute per step;
reference for tests) callbacks are built by `model_callbacks`.

    from unifluid_jax.inference import decode
    batch = decode.question_batch(config, images, None, task="caption", tokenizer=tok)
    out = decode.decode_text(model, params, batch, method="beam", beam_size=2)
    texts = decode.detokenize(tok, out["tokens"])

Shapes: B examples, K beams, N = B or B*K rows, T max new tokens, V vocab, S cache length, D width.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unifluid_jax import layout
from unifluid_jax.inference import generate as gen_lib
from unifluid_jax.models import gemma as gemma_lib
from unifluid_jax.models import masks
from unifluid_jax.models import order as order_lib
from unifluid_jax.models.unifluid import UniFluid, UniFluidConfig

METHODS = ("greedy", "sample", "beam")
NEG_INF = -jnp.inf


# ----------------------------------------------------------------------------------------------------------
# Token selection and the two search cores (model-free).


def filter_logits(logits, *, top_k: int = 0, top_p=1.0):
    """Sets logits outside the top-k (k > 0) and outside the top-p nucleus to -inf. [N, V] float32.

    The nucleus keeps the smallest set of most likely tokens whose probability reaches top_p (always >= 1)."""
    logits = logits.astype(jnp.float32)
    if top_k and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, NEG_INF, logits)
    srt = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(srt, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly more likely than each sorted token
    keep = (before < top_p) | (top_p >= 1.0)  # top_p 1 keeps everything despite cumsum rounding
    cutoff = jnp.min(jnp.where(keep, srt, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits < cutoff, NEG_INF, logits)


def select_tokens(rng, logits, *, greedy: bool, temperature=1.0, top_k: int = 0, top_p=1.0):
    """Greedy argmax, or a categorical draw from softmax(filtered logits / temperature). [N, V] -> [N]."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    filtered = filter_logits(logits / jnp.maximum(temperature, 1e-6), top_k=top_k, top_p=top_p)
    return jax.random.categorical(rng, filtered, axis=-1).astype(jnp.int32)


def sample_loop(logits_fn: Callable, state, first_logits, rng=None, *, max_new_tokens: int, greedy: bool = True,
                temperature=1.0, top_k: int = 0, top_p=1.0, eos_id: int = layout.EOS_ID,
                pad_id: int = layout.PAD_ID, return_logits: bool = False) -> dict[str, jax.Array]:
    """Greedy / sampled decoding of up to `max_new_tokens` per row; stops once every row emitted EOS.

    Returns tokens [B, T] (PAD after EOS), logprob [B] (sum of the model's log-softmax of the emitted tokens,
    before temperature / filtering), length [B] (tokens up to and including EOS) and, if `return_logits`,
    logits [B, T, V] (the distribution each token was chosen from; zeros after the loop stopped)."""
    b, v = first_logits.shape
    t_max = max_new_tokens
    rng = jax.random.key(0) if rng is None else rng
    carry = dict(t=jnp.int32(0), state=state, logits=first_logits.astype(jnp.float32),
                 tokens=jnp.full((b, t_max), pad_id, jnp.int32), done=jnp.zeros((b,), bool),
                 logprob=jnp.zeros((b,), jnp.float32), length=jnp.zeros((b,), jnp.int32),
                 all_logits=jnp.zeros((b, t_max if return_logits else 0, v), jnp.float32))

    def cond(c):
        return (c["t"] < t_max) & ~jnp.all(c["done"])

    def body(c):
        t, logits, done = c["t"], c["logits"], c["done"]
        tok = select_tokens(jax.random.fold_in(rng, t), logits, greedy=greedy, temperature=temperature,
                            top_k=top_k, top_p=top_p)
        tok = jnp.where(done, pad_id, tok)
        lp = jnp.take_along_axis(jax.nn.log_softmax(logits), tok[:, None], axis=-1)[:, 0]
        out = dict(c, t=t + 1, done=done | (tok == eos_id),
                   tokens=jax.lax.dynamic_update_slice_in_dim(c["tokens"], tok[:, None], t, axis=1),
                   logprob=c["logprob"] + jnp.where(done, 0.0, lp), length=c["length"] + (~done))
        if return_logits:
            out["all_logits"] = jax.lax.dynamic_update_slice_in_dim(c["all_logits"], logits[:, None], t, axis=1)
        out["logits"], out["state"] = logits_fn(c["state"], tok, t)
        out["logits"] = out["logits"].astype(jnp.float32)
        return out

    c = jax.lax.while_loop(cond, body, carry)
    res = {"tokens": c["tokens"], "logprob": c["logprob"], "length": c["length"]}
    if return_logits:
        res["logits"] = c["all_logits"]
    return res


def _gather_rows(tree, rows):
    return jax.tree.map(lambda x: jnp.take(x, rows, axis=0), tree)


def length_normalized(logprob, length, alpha):
    """logprob / length^alpha (alpha 0: raw log-probability; 1: per-token average)."""
    return logprob / jnp.maximum(length, 1).astype(jnp.float32) ** alpha


def beam_search(logits_fn: Callable, state, first_logits, *, beam_size: int, max_new_tokens: int,
                length_norm: float = 0.0, eos_id: int = layout.EOS_ID, pad_id: int = layout.PAD_ID,
                reorder_fn: Callable | None = None) -> dict[str, jax.Array]:
    """Beam search over the callback; `state` and `first_logits` have B rows (one per example).

    Every beam extends by one token per step; a finished beam (emitted EOS) has the single continuation PAD at
    zero cost, so it competes with its final score. Candidates are ranked by the length-normalised score
    logprob / length^length_norm (length counts tokens up to and including EOS; length_norm 0 ranks by raw
    log-probability, and beam_size 1 is then exactly greedy). Stops when all beams are finished.

    Returns tokens [B, T] and score / logprob / length [B] of the best beam, and beams [B, K, T] with
    beam_scores [B, K] (sorted best first).
    """
    b, v = first_logits.shape
    k, t_max = beam_size, max_new_tokens
    if not 1 <= k <= v:
        raise ValueError(f"beam_size must be in [1, vocab size {v}], got {k}")
    reorder_fn = reorder_fn or _gather_rows
    # Tile to B*K rows (beam-major within an example); only beam 0 is live at the start, so the first step's
    # top-K are K distinct continuations of the prompt.
    rows = jnp.repeat(jnp.arange(b), k)
    carry = dict(t=jnp.int32(0), state=reorder_fn(state, rows),
                 logits=jnp.take(first_logits.astype(jnp.float32), rows, axis=0),
                 tokens=jnp.full((b, k, t_max), pad_id, jnp.int32), done=jnp.zeros((b, k), bool),
                 logprob=jnp.where(jnp.arange(k) == 0, 0.0, NEG_INF) * jnp.ones((b, 1), jnp.float32),
                 length=jnp.zeros((b, k), jnp.int32))
    pad_only = jnp.where(jnp.arange(v) == pad_id, 0.0, NEG_INF)

    def cond(c):
        return (c["t"] < t_max) & ~jnp.all(c["done"])

    def body(c):
        t, done = c["t"], c["done"]
        lp = jax.nn.log_softmax(c["logits"]).reshape(b, k, v)
        lp = jnp.where(done[..., None], pad_only, lp)
        cand = c["logprob"][..., None] + lp  # [B, K, V]
        new_len = c["length"] + (~done)
        rank = length_normalized(cand, new_len[..., None], length_norm)
        _, idx = jax.lax.top_k(rank.reshape(b, k * v), k)  # [B, K]
        beam, tok = idx // v, (idx % v).astype(jnp.int32)
        prev_done = jnp.take_along_axis(done, beam, axis=1)
        tok = jnp.where(prev_done, pad_id, tok)
        tokens = jnp.take_along_axis(c["tokens"], beam[..., None], axis=1)
        state = reorder_fn(c["state"], (jnp.arange(b)[:, None] * k + beam).reshape(-1))
        logits, state = logits_fn(state, tok.reshape(-1), t)
        return dict(t=t + 1, state=state, logits=logits.astype(jnp.float32),
                    tokens=jax.lax.dynamic_update_slice_in_dim(tokens, tok[..., None], t, axis=2),
                    done=prev_done | (tok == eos_id),
                    logprob=jnp.take_along_axis(cand.reshape(b, k * v), idx, axis=1),
                    length=jnp.take_along_axis(new_len, beam, axis=1))

    c = jax.lax.while_loop(cond, body, carry)
    scores = length_normalized(c["logprob"], c["length"], length_norm)
    best_first = jnp.argsort(-scores, axis=1)
    take = lambda x: jnp.take_along_axis(x, best_first if x.ndim == 2 else best_first[..., None], axis=1)
    beams, scores, logprob, length = (take(x) for x in (c["tokens"], scores, c["logprob"], c["length"]))
    return {"tokens": beams[:, 0], "score": scores[:, 0], "logprob": logprob[:, 0], "length": length[:, 0],
            "beams": beams, "beam_scores": scores}


# ----------------------------------------------------------------------------------------------------------
# The model as a callback.


def text_rows(config: UniFluidConfig, batch) -> dict[str, np.ndarray]:
    """One row per question, laid out by unifluid_jax.layout with the segments caption / vqa use: [und | text]."""
    dims = config.dims
    exs = [{k: np.asarray(batch[k][i]) for k in batch} for i in range(len(batch["task"]))]
    images = {"image_und": (np.shape(batch["image_und"])[1:], np.float32)} if config.n_und else {}
    rows, _ = layout.layout_examples(exs, layout.fixed_spec(dims, src=False, gen=False), dims, layout="fixed",
                                     image_spec=images)
    return rows


def _text_sequence(model: UniFluid, params, rows, max_new_tokens: int):
    """(x_prefix [B, P, D], positions [B, S], full mask [B, S, S], index of the last prefix slot [B]): the
    training path's embeddings / positions / masks of the rows, extended by S - P causal answer slots."""
    c = model.config
    b, p = rows["tokens"].shape
    answer = jnp.ones((b, max_new_tokens), jnp.int32)  # the answer continues the row's example, causally
    seg = jnp.concatenate([rows["segment_ids"], answer], axis=1)
    mask_ar = jnp.concatenate([rows["mask_ar"], answer], axis=1)
    orders = order_lib.raster_orders(b, c.n_img)
    x_prefix = gen_lib.embed_prompt_rows(model, params, rows, orders)
    last = jnp.max(jnp.where(rows["segment_ids"] > 0, jnp.arange(p), -1), axis=1)
    return (x_prefix, masks.segment_positions(seg), masks.SegmentMask(seg, mask_ar).dense(), last)


def _logits(model, params, h):
    return gen_lib.apply(model, params, UniFluid.text_logits, h)


def model_callbacks(model: UniFluid, params, batch, max_new_tokens: int, use_cache: bool = True):
    """(logits_fn, state, first_logits [B, V], reorder_fn) for the search cores (see the module docstring)."""
    c = model.config
    p = batch["tokens"].shape[1]
    s = p + max_new_tokens
    x_prefix, positions, full_mask, last = _text_sequence(model, params, batch, max_new_tokens)
    b = x_prefix.shape[0]
    at_last = lambda h: jnp.take_along_axis(h, last[:, None, None], axis=1)

    def embed(tokens):
        return gen_lib.apply(model, params, UniFluid.embed_text, tokens).astype(x_prefix.dtype)

    if use_cache:
        cache = gemma_lib.init_cache(c.llm, b, s)
        h, cache = gen_lib.apply(model, params, UniFluid.__call__, x_prefix, positions[:, :p], full_mask[:, :p],
                                 cache, 0)
        first = _logits(model, params, at_last(h))[:, 0]
        state = {"cache": cache, "positions": positions[:, p:], "mask": full_mask[:, p:]}
        kv_axis = 1 if c.llm.scan_layers else 0  # scanned caches are [G, B, S, K, H]

        def logits_fn(st, tok, t):
            col = lambda a: jax.lax.dynamic_slice_in_dim(a, t, 1, axis=1)
            h, cache = gen_lib.apply(model, params, UniFluid.__call__, embed(tok[:, None]), col(st["positions"]),
                                     col(st["mask"]), st["cache"], p + t)
            return _logits(model, params, h)[:, 0], {**st, "cache": cache}

        def reorder_fn(st, rows):
            cache = {"pos": jnp.take(st["cache"]["pos"], rows, axis=0),
                     "layers": jax.tree.map(lambda x: jnp.take(x, rows, axis=kv_axis), st["cache"]["layers"])}
            return {"cache": cache, "positions": jnp.take(st["positions"], rows, axis=0),
                    "mask": jnp.take(st["mask"], rows, axis=0)}
    else:
        state = {"x_prefix": x_prefix, "answer": jnp.full((b, max_new_tokens), layout.PAD_ID, jnp.int32),
                 "positions": positions, "mask": full_mask}

        def forward(st):  # the whole sequence, no cache
            x = jnp.concatenate([st["x_prefix"], embed(st["answer"])], axis=1)
            h, _ = gen_lib.apply(model, params, UniFluid.__call__, x, st["positions"], st["mask"])
            return h

        first = _logits(model, params, at_last(forward(state)))[:, 0]

        def logits_fn(st, tok, t):
            st = {**st, "answer": jax.lax.dynamic_update_slice_in_dim(st["answer"], tok[:, None], t, axis=1)}
            h = jax.lax.dynamic_index_in_dim(forward(st), p + t, axis=1)
            return _logits(model, params, h)[:, 0], st

        reorder_fn = _gather_rows
    return logits_fn, state, first, reorder_fn


def _decode(model, params, batch, rng, temperature, top_p, *, method: str, max_new_tokens: int, top_k: int,
            beam_size: int, length_norm: float, use_cache: bool, return_logits: bool):
    logits_fn, state, first, reorder_fn = model_callbacks(model, params, batch, max_new_tokens, use_cache)
    if method == "beam":
        return beam_search(logits_fn, state, first, beam_size=beam_size, max_new_tokens=max_new_tokens,
                           length_norm=length_norm, reorder_fn=reorder_fn)
    return sample_loop(logits_fn, state, first, rng, max_new_tokens=max_new_tokens, greedy=method == "greedy",
                       temperature=temperature, top_k=top_k, top_p=top_p, return_logits=return_logits)


@functools.lru_cache(maxsize=32)
def _compiled(config: UniFluidConfig, **static):
    return jax.jit(functools.partial(_decode, UniFluid(config), **static))


# ----------------------------------------------------------------------------------------------------------
# Public API.


def question_batch(config: UniFluidConfig, images, questions: Sequence | None = None, *, task: str = "caption",
                   tokenizer=None, sep_ids: Sequence[int] | None = None,
                   caption_prompt: str | Sequence[int] = "caption en") -> dict[str, np.ndarray]:
    """A caption / vqa decoding batch: images [B, U, U, 3] in [-1, 1] (SigLIP size) and questions (strings
    with `tokenizer`, or id lists). For captioning `questions` may be None: every row gets `caption_prompt`."""
    t = layout.task_id(task)
    if t not in layout.UND_TASKS:
        raise ValueError(f"question_batch: task must be 'caption' or 'vqa', got {task!r}")
    if images is None or len(images) == 0:
        raise ValueError("no images given: pass a non-empty [B, U, U, 3] array")
    if questions is None:
        if t != layout.CAPTION:
            raise ValueError("vqa needs one question per image")
        questions = [caption_prompt] * len(images)
    if len(questions) == 0:
        raise ValueError("no questions given: pass one question (string or token-id list) per image")
    if len(questions) != len(images):
        raise ValueError(f"{len(questions)} questions for {len(images)} images")
    if sep_ids is None:
        sep_ids = tokenizer.sep_ids if tokenizer is not None else ()
    batch = gen_lib.text_batch(t, questions, config.max_text_len, tokenizer=tokenizer, sep_ids=sep_ids,
                               vocab_size=config.llm.vocab_size, what="question")
    if config.n_und:
        u = config.siglip.image_size
        images = np.asarray(images, np.float32)
        if images.shape[1:] != (u, u, 3):
            raise ValueError(f"images have shape {images.shape}; SigLIP expects [B, {u}, {u}, 3]")
        batch["image_und"] = images
    return batch


def decode_text(model: UniFluid, params, batch: dict[str, Any], rng=None, *, method: str = "greedy",
                max_new_tokens: int | None = None, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                beam_size: int = 1, length_norm: float = 0.0, use_cache: bool = True,
                return_logits: bool = False) -> dict[str, np.ndarray]:
    """Decodes an answer per row of `batch` (from `question_batch`). Returns numpy arrays: tokens [B, T] (PAD
    after EOS), length [B], logprob [B]; plus score / beams / beam_scores for beam search and logits [B, T, V]
    with `return_logits` (greedy / sample only).

    method: 'greedy' (default), 'sample' (temperature, top_k, top_p; needs rng) or 'beam' (beam_size,
    length_norm alpha: rank by logprob / length^alpha). max_new_tokens defaults to the room the text segment
    leaves after the longest prompt (answers are at most that long in training), EOS included.
    """
    if method not in METHODS:
        raise ValueError(f"unknown decoding method {method!r}; choose one of {METHODS}")
    if batch is None or "text_tokens" not in batch or len(batch["text_tokens"]) == 0:
        raise ValueError("decode_text: empty batch; build it with question_batch(config, images, questions)")
    c = model.config
    bad = np.setdiff1d(np.asarray(batch["task"]), np.asarray(layout.UND_TASKS))
    if bad.size:
        raise ValueError(f"decode_text: batch has task ids {bad.tolist()}; only caption / vqa decode text")
    if c.n_und and "image_und" not in batch:
        raise ValueError("decode_text: batch['image_und'] (the image to describe) is missing")
    if method == "sample" and rng is None:
        raise ValueError("decode_text: method='sample' needs an rng")
    if max_new_tokens is None:
        max_new_tokens = max(1, c.max_text_len - int(np.asarray(batch["text_input_mask"]).sum(1).max()))
    if method == "beam" and beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    fn = _compiled(c, method=method, max_new_tokens=int(max_new_tokens), top_k=int(top_k),
                   beam_size=int(beam_size) if method == "beam" else 1,
                   length_norm=float(length_norm) if method == "beam" else 0.0,
                   use_cache=bool(use_cache), return_logits=bool(return_logits) and method != "beam")
    batch = {k: np.asarray(v) for k, v in batch.items()
             if k in ("text_tokens", "text_input_mask", "text_mask_ar", "task", "image_und")}
    rng = jax.random.key(0) if rng is None else rng
    out = fn(nn.unbox(params), text_rows(c, batch), rng, jnp.float32(temperature), jnp.float32(top_p))
    return jax.tree.map(np.asarray, out)


def detokenize(tokenizer, tokens) -> list[str]:
    """tokens [B, T] -> strings via `tokenizer.decode` (which drops pad/bos and stops at EOS)."""
    return [tokenizer.decode([int(i) for i in row]) for row in np.asarray(tokens)]
