"""Text-to-image generation and editing with the unified model (SPEC 5, 6, 7, 9), KV-cached and jitted.

Each prompt is one row laid out by the training layout (unifluid_jax/layout.py) with only the segments its
task uses: t2i [text | BOI | img_0 .. img_{n-1}], edit [und | src | text | BOI | img ...]; embeddings,
positions and masks come from the training path (UniFluid.embed_rows, masks.segment_positions / SegmentMask).
Prefill runs the prompt slots (und/src/text + BOI) into a KV cache sized to the full row;
then for k = 0 .. n-1 the hidden state at the current slot (BOI for k = 0, image slot k-1 after) is the
condition z of token p(k): the diffusion head samples it (ancestral DDPM, `num_steps` respaced steps,
temperature on the injected noise), it is embedded with pos2d[p(k)] + next_pos2d[p(k+1)] and written to
the cache at its slot. The tokens are scattered back to raster order and VAE-decoded.

Classifier-free guidance runs the conditional and unconditional branches as 2B rows of the SAME transformer
call (rows [0, B) conditional, [B, 2B) the empty prompt [BOS] with everything else equal, e.g. an edit's
source image); both branches are fed the same sampled token (one chain). `use_cache=False` is the reference
path: every step recomputes the whole sequence without a cache (for tests and the benchmark); given the same
rng it draws the same noise as the cached path.

    from unifluid_jax.inference import generate
    batch = generate.prompt_batch(config, ["a red circle", "two blue squares"], tokenizer=tok)
    images, tokens = generate.generate_images(model, params, batch, jax.random.key(0), cfg_scale=3.0)

Shapes: B prompts, R = B or 2B transformer rows, S full sequence, n image tokens, C token channels, D width.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unifluid_jax import layout
from unifluid_jax.models import diffusion as diffusion_lib
from unifluid_jax.models import gemma as gemma_lib
from unifluid_jax.models import masks
from unifluid_jax.models import order as order_lib
from unifluid_jax.models.unifluid import UniFluid, UniFluidConfig

ORDERS = ("raster", "random")
CFG_SCHEDULES = ("linear", "constant")


# ----------------------------------------------------------------------------------------------------------
# Prompt batches (shared with decode.py).


def _token_ids(item, tokenizer, what: str, i: int) -> list[int]:
    if isinstance(item, str):
        if tokenizer is None:
            raise ValueError(f"{what} {i} is a string but no tokenizer was given; pass tokenizer= or token ids")
        return tokenizer.encode(item)
    try:
        return [int(t) for t in item]
    except TypeError as e:
        raise ValueError(f"{what} {i} must be a string or a sequence of token ids, got {type(item).__name__}") from e


def text_batch(task, prompts: Sequence, max_text_len: int, *, tokenizer=None, sep_ids: Sequence[int] = (),
               vocab_size: int | None = None, what: str = "prompt") -> dict[str, np.ndarray]:
    """Lays out the text segment of each prompt (no answer): text_tokens / text_input_mask / text_mask_ar [B, L]
    and task [B]. Items are strings (with `tokenizer`) or id sequences (without BOS). Raises ValueError naming
    the offending item for an empty list, a prompt that does not fit in max_text_len, or ids outside the vocab."""
    if prompts is None or len(prompts) == 0:
        raise ValueError(f"no {what}s given: pass a non-empty list of {what}s (strings or token-id lists)")
    t = layout.task_id(task)
    if sep_ids == () and tokenizer is not None and t in layout.UND_TASKS:
        sep_ids = tokenizer.sep_ids
    rows = []
    for i, item in enumerate(prompts):
        ids = _token_ids(item, tokenizer, what, i)
        if vocab_size is not None and any(not 0 <= j < vocab_size for j in ids):
            raise ValueError(f"{what} {i} has token ids outside the vocabulary [0, {vocab_size})")
        try:
            rows.append(layout.text_layout(t, ids, None, max_text_len, sep_ids=sep_ids))
        except layout.TextTooLongError as e:
            shown = repr(item) if isinstance(item, str) else f"{len(ids)} token ids"
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise ValueError(f"{what} {i} ({shown}) is too long: {len(ids)} tokens plus "
                             f"{1 + len(sep_ids)} for BOS{'/SEP' if sep_ids else ''} do not fit in "
                             f"max_text_len={max_text_len}; shorten it or raise model.max_text_len") from e
    batch = {k: np.stack([r[k] for r in rows]) for k in ("text_tokens", "text_input_mask", "text_mask_ar")}
    batch["task"] = np.full((len(rows),), t, np.int32)
    return batch


def prompt_batch(config: UniFluidConfig, prompts: Sequence, *, tokenizer=None, source_und=None,
                 source_gen=None) -> dict[str, np.ndarray]:
    """A generation batch: t2i prompts, or edit instructions when a source image is given.

    source_und: [B, U, U, 3] in [-1, 1], the edit source for SigLIP (needed if 'siglip' in edit_source).
    source_gen: [B, G, G, 3] in [-1, 1], the edit source for the VAE (needed if 'vae' in edit_source).
    """
    edit = source_und is not None or source_gen is not None
    batch = text_batch("edit" if edit else "t2i", prompts, config.max_text_len, tokenizer=tokenizer,
                       vocab_size=config.llm.vocab_size)
    b = batch["task"].shape[0]
    if edit:
        for name, img, need in (("source_und", source_und, "siglip"), ("source_gen", source_gen, "vae")):
            if need in config.edit_source and img is None:
                raise ValueError(f"editing with model.edit_source={config.edit_source} needs {name}")
            if img is not None and len(img) != b:
                raise ValueError(f"{name} has {len(img)} images for {b} prompts")
        if source_und is not None:
            batch["image_und"] = np.asarray(source_und, np.float32)
        if source_gen is not None:
            batch["image_src"] = np.asarray(source_gen, np.float32)
    return batch


# ----------------------------------------------------------------------------------------------------------
# Pieces (functional applications of the model; reused by decode.py and the benchmark).


def apply(model: UniFluid, params, method, *args):
    return model.apply(params, *args, method=method)


def generation_rows(config: UniFluidConfig, batch, guided: bool) -> dict[str, np.ndarray]:
    """The R = B (or 2B with `guided`) transformer rows of a prompt batch, laid out by unifluid_jax.layout with
    only the segments the batch's tasks use (t2i: [text | BOI + image]; edit: [und | src | text | BOI + image]).
    Guided: rows [B, 2B) are the same examples with the empty prompt [BOS] (an edit keeps its source)."""
    dims = config.dims
    b = len(batch["task"])
    exs = [{k: np.asarray(batch[k][i]) for k in batch} for i in range(b)]
    if guided:
        exs += [{**ex, **layout.text_layout(int(ex["task"]), [], None, config.max_text_len)} for ex in exs]
    uses = [dims.uses(int(t)) for t in batch["task"]]
    und, src = any(u[0] for u in uses), any(u[1] for u in uses)
    images = {}  # image fields present; gen images are generated, so the rows carry none
    if und:
        images["image_und"] = (np.shape(batch["image_und"])[1:], np.float32)
    if src:
        key = "src_tokens" if "src_tokens" in batch else "image_src"
        images[key] = (np.shape(batch[key])[1:], np.float32)
    rows, _ = layout.layout_examples(exs, layout.fixed_spec(dims, und=und, src=src), dims, layout="fixed",
                                     image_spec=images)
    return rows


def row_inputs(rows):
    """(positions [R, S], dense attention mask [R, S, S]) of laid-out rows: the training path's."""
    return (masks.segment_positions(rows["segment_ids"]),
            masks.SegmentMask(rows["segment_ids"], rows["mask_ar"]).dense())


def embed_prompt_rows(model: UniFluid, params, rows, orders) -> jax.Array:
    """The training embedding (UniFluid.embed_rows) of the rows with all-zero image tokens; the slots up to
    and including BOI (the prefill) do not depend on them. orders [R, n]."""
    c = model.config
    r = rows["tokens"].shape[0]
    src = None
    if c.n_src:
        src = rows.get("src_tokens")
        if src is None and "image_src" in rows:
            src = apply(model, params, UniFluid.image_tokens, rows["image_src"].reshape((r,) + rows["image_src"].shape[2:]))
        src = jnp.zeros((r, 1, c.n_img, c.token_dim)) if src is None else src.reshape(r, 1, c.n_img, c.token_dim)
    zeros = jnp.zeros((r, 1, c.n_img, c.token_dim), jnp.float32)
    return apply(model, params, UniFluid.embed_rows, rows, zeros, orders[:, None], src)


def _tile(x, reps: int):
    return x if reps == 1 else jnp.concatenate([x] * reps, axis=0)


def head_sampler(config: UniFluidConfig, params, *, num_steps: int, cfg_kind: str, guided: bool):
    """`sample(k, z [R, D], rng, cfg_scale, temperature) -> token [B, C]` for AR step k (traced)."""
    c = config
    head_fns = diffusion_lib.sampler_fns(diffusion_lib.DiffusionHead(c.diffusion))
    head_params = params["params"]["head"]

    def sample(k, z, rng, cfg_scale, temperature):
        b = z.shape[0] // (2 if guided else 1)
        z_u = z[b:] if guided else None
        scale = diffusion_lib.cfg_schedule(k, c.n_img, cfg_scale, cfg_kind) if guided else 1.0
        return diffusion_lib.sample(head_fns, head_params, z[:b], rng, num_steps=num_steps, temperature=temperature,
                                    cfg_scale=scale, z_uncond=z_u, in_channels=c.token_dim,
                                    schedule=c.diffusion.schedule, num_train_steps=c.diffusion.num_train_steps,
                                    learn_sigma=c.diffusion.learn_sigma, clip_x0=c.diffusion.sample_clip_x0)
    return sample


# ----------------------------------------------------------------------------------------------------------
# The generation loop.


def _generate(model: UniFluid, params, rows, rng, cfg_scale, temperature, random_order, *, num_steps: int,
              cfg_kind: str, guided: bool, use_cache: bool, return_cond: bool):
    c = model.config
    n = c.n_img
    r, s = rows["tokens"].shape
    img = s - n  # rows end with [BOI | n image slots] (generation_rows)
    reps = 2 if guided else 1
    b = r // reps
    k_order, k_sample = jax.random.split(rng)
    orders = order_lib.sample_orders(k_order, b, n, random_order)  # random_order: traced 0. or 1.
    next_pos = jnp.roll(orders, -1, axis=1)
    has_next = jnp.broadcast_to(jnp.arange(n) < n - 1, orders.shape)

    positions, full_mask = row_inputs(rows)
    x_prompt = embed_prompt_rows(model, params, rows, _tile(orders, reps))[:, :img]  # [R, img, D]
    dt = x_prompt.dtype

    sample = head_sampler(c, params, num_steps=num_steps, cfg_kind=cfg_kind, guided=guided)

    def embed_step(tok, k):  # token p(k) [B, C] -> its input embedding [R, 1, D]
        col = lambda a: jax.lax.dynamic_slice_in_dim(a, k, 1, axis=1)
        e = apply(model, params, UniFluid.image_embeddings, tok[:, None], col(orders), col(next_pos), col(has_next))
        return _tile(e.astype(dt), reps)

    toks = jnp.zeros((b, n, c.token_dim), jnp.float32)
    conds = jnp.zeros((reps * b, n if return_cond else 0, c.width), dt)

    if use_cache:
        cache = gemma_lib.init_cache(c.llm, reps * b, s)
        h, cache = apply(model, params, UniFluid.__call__, x_prompt, positions[:, :img], full_mask[:, :img],
                         cache, 0)

        def body(k, carry):
            cache, z, toks, conds = carry
            if return_cond:
                conds = jax.lax.dynamic_update_slice_in_dim(conds, z[:, None], k, axis=1)
            tok = sample(k, z, jax.random.fold_in(k_sample, k), cfg_scale, temperature)
            toks = jax.lax.dynamic_update_slice_in_dim(toks, tok[:, None], k, axis=1)
            # Writes slot img + k (the last write, at k = n - 1, only fills the cache's final slot).
            h, cache = apply(model, params, UniFluid.__call__, embed_step(tok, k),
                             jax.lax.dynamic_slice_in_dim(positions, img + k, 1, axis=1),
                             masks.cache_step_mask(full_mask, img + k, 1), cache, img + k)
            return cache, h[:, 0], toks, conds

        _, _, toks, conds = jax.lax.fori_loop(0, n, body, (cache, h[:, -1], toks, conds))
    else:
        def body(k, carry):
            toks, conds = carry
            e = apply(model, params, UniFluid.image_embeddings, toks, orders, next_pos, has_next)
            x = jnp.concatenate([x_prompt, _tile(e.astype(dt), reps)], axis=1)
            h, _ = apply(model, params, UniFluid.__call__, x, positions, full_mask)
            z = jax.lax.dynamic_index_in_dim(h, img - 1 + k, axis=1, keepdims=False)
            if return_cond:
                conds = jax.lax.dynamic_update_slice_in_dim(conds, z[:, None], k, axis=1)
            tok = sample(k, z, jax.random.fold_in(k_sample, k), cfg_scale, temperature)
            return jax.lax.dynamic_update_slice_in_dim(toks, tok[:, None], k, axis=1), conds

        toks, conds = jax.lax.fori_loop(0, n, body, (toks, conds))

    aux = {"order": orders, "tokens_in_order": toks}
    if return_cond:
        aux["cond"] = conds
    return order_lib.scatter_tokens(toks, orders), aux


@functools.lru_cache(maxsize=32)
def _compiled(config: UniFluidConfig, **static):
    return jax.jit(functools.partial(_generate, UniFluid(config), **static))


def default_decode_chunk() -> int:
    """1 on a CPU (one 256 px image's activations stay in cache: 16 images decode 1.75x faster one at a time
    than as one batch), 0 = the whole batch at once elsewhere (accelerators want the batch)."""
    return 1 if jax.default_backend() == "cpu" else 0


@functools.lru_cache(maxsize=8)
def _decoder(config: UniFluidConfig, chunk: int = 0):
    """VAE decode as its own program, shared by every generation variant (compiled once per shape); `chunk` > 0
    decodes that many images at a time (lax.map), 0 the whole batch."""
    model = UniFluid(config)

    def decode(params, tokens):
        return apply(model, params, UniFluid.decode_tokens, tokens)
    if chunk <= 0:
        return jax.jit(decode)
    return jax.jit(lambda params, tokens: jax.lax.map(lambda t: decode(params, t[None])[0], tokens,
                                                      batch_size=chunk))


def generate_images(model: UniFluid, params, batch: dict[str, Any] | Sequence, rng, *, num_steps: int = 100,
                    temperature: float = 1.0, cfg_scale: float = 1.0, cfg_schedule: str = "linear",
                    order: str = "raster", use_cache: bool = True, guided: bool | None = None,
                    return_aux: bool = False, tokenizer=None, decode_chunk: int | None = None):
    """Generates one image per prompt row of `batch` (from `prompt_batch`; a plain list of t2i prompts, strings
    with `tokenizer` or id lists, is laid out here). Returns (images [B, G, G, 3] in
    about [-1, 1], tokens [B, n, C] in raster order), plus an aux dict if `return_aux` (order [B, n],
    tokens_in_order, cond [R, n, D]: the condition z of every step for every transformer row).

    `decode_chunk`: images per VAE decode call (None: `default_decode_chunk()`; 0: the whole batch).
    cfg_scale / temperature may change without recompiling. `guided` (default: cfg_scale != 1) runs the
    unconditional branch; `order` is 'raster' or 'random' (a per-example permutation drawn from `rng`).
    Same rng -> same images; the cached and uncached paths draw identical noise.
    """
    if order not in ORDERS:
        raise ValueError(f"unknown order {order!r}; choose one of {ORDERS}")
    if cfg_schedule not in CFG_SCHEDULES:
        raise ValueError(f"unknown cfg_schedule {cfg_schedule!r}; choose one of {CFG_SCHEDULES}")
    if not 2 <= num_steps <= model.config.diffusion.num_train_steps:
        raise ValueError(f"num_steps must be in [2, {model.config.diffusion.num_train_steps}], got {num_steps}")
    if isinstance(batch, (list, tuple)):
        batch = prompt_batch(model.config, batch, tokenizer=tokenizer)
    if batch is None or "text_tokens" not in batch or len(batch["text_tokens"]) == 0:
        raise ValueError("generate_images: empty batch; build it with prompt_batch(config, prompts)")
    bad = np.setdiff1d(np.asarray(batch["task"]), np.asarray(layout.GEN_TASKS))
    if bad.size:
        raise ValueError(f"generate_images: batch has task ids {bad.tolist()}; only t2i / edit generate images")
    if (np.asarray(batch["task"]) == layout.EDIT).any():
        c = model.config
        if "siglip" in c.edit_source and c.n_und and "image_und" not in batch:
            raise ValueError("generate_images: edit rows need batch['image_und'] (the source image for SigLIP)")
        if c.n_src and not ("image_src" in batch or "src_tokens" in batch):
            raise ValueError("generate_images: edit rows need batch['image_src'] or ['src_tokens'] (VAE source)")
    if guided is None:
        guided = float(cfg_scale) != 1.0
    fn = _compiled(model.config, num_steps=int(num_steps), cfg_kind=cfg_schedule,
                   guided=bool(guided), use_cache=bool(use_cache), return_cond=bool(return_aux))
    batch = {k: np.asarray(v) for k, v in batch.items()
             if k in ("text_tokens", "text_input_mask", "text_mask_ar", "task", "image_und", "image_src",
                      "src_tokens")}
    params = nn.unbox(params)
    tokens, aux = fn(params, generation_rows(model.config, batch, bool(guided)), rng, jnp.float32(cfg_scale), jnp.float32(temperature),
                     jnp.float32(order == "random"))
    chunk = default_decode_chunk() if decode_chunk is None else int(decode_chunk)
    images = _decoder(model.config, chunk)(params, tokens)
    return (images, tokens, aux) if return_aux else (images, tokens)


def to_uint8(images) -> np.ndarray:
    """[-1, 1] float images -> uint8 [0, 255]."""
    return np.asarray(jnp.clip(jnp.round((jnp.asarray(images) + 1.0) * 127.5), 0, 255)).astype(np.uint8)
