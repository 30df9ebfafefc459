"""Attention masks and RoPE positions from the compact (input_mask, mask_ar) encoding (SPEC 7, big_vision).

`input_mask` [B, T] is True on real tokens. `mask_ar` [B, T] is 1 where a new causal block starts: a run of
zeros is one bidirectional block (the prefix), all ones is plain causal attention. Query t may attend to
key s iff `cumsum(mask_ar)[s] <= cumsum(mask_ar)[t]` and both are valid. Masks are bool, True = may attend.
The sliding window of local layers is applied inside the Gemma layers (from positions), not here.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


def make_attention_mask(input_mask, mask_ar) -> jax.Array:
    """[B, T] valid, [B, T] block starts -> [B, T, T] bool (rows = queries, columns = keys)."""
    input_mask = jnp.asarray(input_mask).astype(bool)
    blocks = jnp.cumsum(jnp.asarray(mask_ar).astype(jnp.int32), axis=-1)
    allowed = blocks[:, None, :] <= blocks[:, :, None]
    valid = input_mask[:, None, :] & input_mask[:, :, None]
    return allowed & valid


class SegmentMask(NamedTuple):
    """The attention mask in its compact form, for rows that may pack several examples.

    `segment_ids` [B, T] int: 1-based example index within the row, 0 = padding. `mask_ar` [B, T] as above.
    Query t may attend to key s iff both are in the same (non-padding) example and
    `cumsum(mask_ar)[s] <= cumsum(mask_ar)[t]`. A row with one example and `segment_ids = input_mask` is the
    fixed layout: `dense()` then equals `make_attention_mask(input_mask, mask_ar)`.
    Gemma layers take either this or a dense [B, T, S] mask; the splash attention kernel needs this form.
    """
    segment_ids: jax.Array
    mask_ar: jax.Array

    def dense(self) -> jax.Array:
        """[B, T, T] bool, rows = queries, columns = keys."""
        seg = jnp.asarray(self.segment_ids).astype(jnp.int32)
        same = (seg[:, None, :] == seg[:, :, None]) & (seg != 0)[:, :, None]
        return same & make_attention_mask(jnp.ones(seg.shape, bool), self.mask_ar)


def segment_positions(segment_ids) -> jax.Array:
    """RoPE positions of packed rows: the number of valid slots of the same example before each slot (padding
    skipped, restarting at 0 for every example; padding gets 0). Segment ids must not decrease over a row's
    valid slots (layout.py). [B, T] int32."""
    seg = jnp.asarray(segment_ids).astype(jnp.int32)
    valid = seg > 0
    before = jnp.cumsum(valid.astype(jnp.int32), axis=-1) - valid  # valid slots strictly before t
    prev_max = jax.lax.cummax(jnp.pad(seg, ((0, 0), (1, 0)))[:, :-1], axis=1)
    start = valid & (seg > prev_max)  # first slot of each example
    base = jax.lax.cummax(jnp.where(start, before, 0), axis=1)
    return jnp.where(valid, before - base, 0)


def positions_from_mask(input_mask) -> jax.Array:
    """RoPE positions that skip padding: `cumsum(input_mask) - 1`, clipped at 0. [B, T] int32."""
    pos = jnp.cumsum(jnp.asarray(input_mask).astype(jnp.int32), axis=-1) - 1
    return jnp.maximum(pos, 0)


def cache_step_mask(full_mask, start, length: int) -> jax.Array:
    """Rows [start, start + length) of a [B, S, S] mask: the [B, length, S] mask for one cached step.

    Build `full_mask` once over the whole cache (e.g. make_attention_mask with mask_ar = 1 on the tokens to
    be generated) and slice it per step; `start` (the cache_index) may be traced.
    """
    b, _, s = full_mask.shape
    return jax.lax.dynamic_slice(full_mask, (0, start, 0), (b, length, s))
