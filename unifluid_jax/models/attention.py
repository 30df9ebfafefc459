"""The attention core of the Gemma layers: softmax(softcap(q k^T) + mask) v, by XLA einsums or Pallas splash.

`attend(q, k, v, mask, positions, k_positions, softcap=, window=, impl=)` with q [B, T, N, H] (RoPE'd and
scaled), k / v [B, S, K, H] (query head n uses kv head n // (N / K)), returns [B, T, N, H].

impl (GemmaConfig.attention_impl):
- 'xla': einsums over the full [T, S] score matrix with a dense [B, T, S] mask (a `masks.SegmentMask` is
  densified). The local window is `pos_t - pos_s < window` on RoPE positions. Works with a KV cache.
- 'splash': jax.experimental.pallas.ops.tpu.splash_attention (flash attention that skips fully masked
  blocks; no [T, S] logits in HBM). TPU only, no KV cache (training / full-sequence forward), and the mask
  must be a SegmentMask. 'splash_interpret' runs the same kernels in Pallas interpret mode (any backend;
  slow, for checking the masks on CPU).

Splash takes one static mask plus segment ids (q ids [T] and kv ids [S] may differ: a pair is visible iff
the static mask allows it and the ids are equal); the prefix-LM rule is data-dependent, so the keys and
values are concatenated twice (kv length 2T):
- first half (kv slot s < T): static causal mask s <= t (local layers: and t - s < window); kv ids =
  segment ids. This is every past key of the same example: cumsum(mask_ar) is non-decreasing, so
  blocks[s] <= blocks[t] holds for every s <= t.
- second half (kv slot T + s): static strictly-future mask s > t; kv ids = segment id on the slots of each
  example's FIRST block (its bidirectional prefix) and a never-matching id elsewhere. For s > t,
  blocks[s] <= blocks[t] means blocks[s] == blocks[t], i.e. s is in t's block; that block is the prefix
  exactly when only an example's first block has more than one token (prefix-LM: prefix, then causal).
  `check_splash_mask` verifies that on concrete masks. Future keys need no window (t - s < 0 < window).
Padding (segment 0) queries see padding keys of the first half, so no row is fully masked (their outputs
differ from the XLA path's, which averages all keys there; valid slots never see padding in either).
The local window counts slots, not positions: equal to the XLA rule when an example has no padding inside
(packed rows) or when the window covers the whole sequence (window >= T).
The sequence is padded to a multiple of the kernel block inside; padded slots have their own id.
"""
from __future__ import annotations

import concurrent.futures
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from unifluid_jax.models.masks import SegmentMask

IMPLS = ("xla", "splash", "splash_interpret")
# Large finite negative for masked logits: a fully masked row (padding) softmaxes to a uniform row, not NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
_PAD_ID, _NO_ID = -1, -2  # kv ids of the padded slots / of second-half keys no query may see


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    return x if cap is None else cap * jnp.tanh(x / cap)


def attend(q, k, v, mask, positions, k_positions, *, softcap: float | None, window: int | None,
           impl: str = "xla") -> jax.Array:
    """q [B, T, N, H], k / v [B, S, K, H], mask [B, T, S] bool or SegmentMask -> [B, T, N, H].

    `window` (local layers) or None; positions [B, T] / k_positions [B, S] are used by the XLA path."""
    if impl == "xla":
        dense = mask.dense() if isinstance(mask, SegmentMask) else mask
        return xla_attention(q, k, v, dense, positions, k_positions, softcap, window)
    if impl not in IMPLS:
        raise ValueError(f"attention impl {impl!r} is unknown; choose one of {list(IMPLS)}")
    if not isinstance(mask, SegmentMask):
        raise ValueError(f"attention_impl={impl!r} needs the mask as a masks.SegmentMask(segment_ids, mask_ar), "
                         f"got a dense array {getattr(mask, 'shape', None)}; pass a SegmentMask or use 'xla'")
    if k.shape[1] != q.shape[1]:
        raise ValueError(f"attention_impl={impl!r} attends a sequence to itself (no KV cache); got T={q.shape[1]} "
                         f"queries and S={k.shape[1]} keys (decoding with a cache uses the 'xla' path)")
    check_splash_mask(mask)
    return splash_attention(q, k, v, mask, softcap, window, interpret=impl == "splash_interpret")


def xla_attention(q, k, v, mask, positions, k_positions, cap, window):
    """Dense einsum attention: mask [B, T, S] bool; the local window on RoPE positions."""
    b, t, n, h = q.shape
    k_heads = k.shape[2]
    q = q.reshape(b, t, k_heads, n // k_heads, h)
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32)
    logits = softcap(logits, cap)  # before the mask (SPEC 2)
    if window is not None:
        mask = mask & (positions[:, :, None] - k_positions[:, None, :] < window)
    logits = jnp.where(mask[:, None, None, :, :], logits, MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("BKGTS,BSKH->BTKGH", probs, v).reshape(b, t, n, h)


# ------------------------------------------------------------------------------------------ splash


def prefix_slots(mask: SegmentMask) -> jax.Array:
    """[B, T] bool: the slot is in the first mask_ar block of its example (its prefix); False on padding."""
    seg = jnp.asarray(mask.segment_ids).astype(jnp.int32)
    blocks = jnp.cumsum(jnp.asarray(mask.mask_ar).astype(jnp.int32), axis=-1)
    b, t = seg.shape
    ids = jnp.clip(seg, 0, t)  # example index <= T; segments need not be contiguous (fixed-layout padding)
    first = jnp.full((b, t + 1), jnp.iinfo(jnp.int32).max, jnp.int32)
    first = first.at[jnp.arange(b)[:, None], ids].min(blocks)
    return (seg != 0) & (blocks == jnp.take_along_axis(first, ids, axis=1))


def splash_visible(mask: SegmentMask) -> jax.Array:
    """[B, T, T] bool: what the two-halves construction lets query t see (valid query rows only)."""
    seg = jnp.asarray(mask.segment_ids).astype(jnp.int32)
    t = seg.shape[1]
    same = (seg[:, :, None] == seg[:, None, :]) & (seg != 0)[:, :, None]
    past = jnp.tril(jnp.ones((t, t), bool))
    future_id = jnp.where(prefix_slots(mask), seg, _NO_ID)
    return same & past | (seg[:, :, None] == future_id[:, None, :]) & ~past


def check_splash_mask(mask: SegmentMask) -> None:
    """ValueError if the splash construction differs from the mask's rule (a bidirectional block that is
    not an example's first block). No-op on traced values (inside jit); the data layout guarantees it there."""
    if any(isinstance(x, jax.core.Tracer) for x in mask):
        return
    with jax.ensure_compile_time_eval():  # concrete constants inside a jit trace stay concrete
        bad = np.asarray(jnp.any(splash_visible(mask) != mask.dense(), axis=(1, 2)))
    if bad.any():
        row = int(np.argmax(bad))
        raise ValueError(f"splash attention: row {row} of the SegmentMask has a bidirectional mask_ar block "
                         "(a run of mask_ar = 0 after a 1) that is not the first block of its example; splash "
                         "supports prefix-LM examples (one prefix, then causal tokens). Use attention_impl='xla'")


def block_size(t: int) -> int:
    """Kernel block (q and kv) for a sequence of t slots: a multiple of the 128 TPU lanes."""
    return 512 if t >= 4096 else 256 if t >= 1024 else 128


def _two_halves_mask(t: int, window: int | None):
    """The static [T, 2T] mask: causal (+ window) on the first half, strictly future on the second."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib

    class TwoHalvesMask(mask_lib._ComputableMask):  # computed in the kernel: no [T, 2T] array in memory
        def __init__(self):
            self.window = window

            def fn(q_ids, kv_ids):
                past = (kv_ids < t) & (q_ids >= kv_ids)
                if window is not None:
                    past = past & (q_ids - kv_ids < window)
                return past | ((kv_ids >= t) & (kv_ids - t > q_ids))

            super().__init__(shape=(t, 2 * t), mask_function=fn)

        def __eq__(self, other):
            return isinstance(other, TwoHalvesMask) and (self.shape, self.window) == (other.shape, other.window)

        def __hash__(self):
            return hash((TwoHalvesMask, self.shape, self.window))

    return TwoHalvesMask()


@functools.lru_cache(maxsize=32)
def _kernel(t: int, heads: int, window: int | None, cap: float | None, interpret: bool):
    """The kernel for [heads, t] queries; its block tables are concrete arrays shared by every trace."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    bs = block_size(t)
    sizes = splash.BlockSizes(block_q=bs, block_kv=bs, block_kv_compute=bs, block_q_dkv=bs, block_kv_dkv=bs,
                              block_kv_dkv_compute=bs, block_q_dq=bs, block_kv_dq=bs)
    mask = splash.MultiHeadMask([_two_halves_mask(t, window)] * heads)
    build = functools.partial(splash.make_splash_mha, mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                              attn_logits_soft_cap=cap, mask_value=MASK_VALUE, interpret=interpret)
    # Built in a fresh thread: JAX's trace state is per thread, so the tables (made with jnp.array) are
    # concrete even when the first call comes from inside jit / scan / remat (they would leak as tracers).
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(build).result()


def splash_segment_ids(mask: SegmentMask, t_pad: int) -> tuple[jax.Array, jax.Array]:
    """q ids [B, T_pad] and kv ids [B, 2 T_pad] of the two-halves construction (see the module doc)."""
    seg = jnp.asarray(mask.segment_ids).astype(jnp.int32)
    pad = ((0, 0), (0, t_pad - seg.shape[1]))
    q_ids = jnp.pad(seg, pad, constant_values=_PAD_ID)
    future = jnp.pad(jnp.where(prefix_slots(mask), seg, _NO_ID), pad, constant_values=_NO_ID)
    return q_ids, jnp.concatenate([q_ids, future], axis=1)


def splash_attention(q, k, v, mask: SegmentMask, cap, window, interpret: bool = False):
    """The splash path of `attend` (validated there). Under a mesh, one kernel per device (shard_map over
    the batch axes and, when sharded, the heads)."""
    b, t, n, h = q.shape
    k_heads = k.shape[2]
    bs = block_size(t)
    t_pad = bs * math.ceil(t / bs)
    q_ids, kv_ids = splash_segment_ids(mask, t_pad)
    pad = ((0, 0), (0, t_pad - t), (0, 0), (0, 0))
    q = jnp.pad(q, pad).transpose(0, 2, 1, 3)  # [B, N, T_pad, H]
    k, v = (jnp.concatenate([x, x], axis=2) for x in (jnp.pad(x, pad).transpose(0, 2, 1, 3) for x in (k, v)))

    batch_axes, head_axes = _mesh_axes()
    mesh = jax.sharding.get_abstract_mesh()
    size = lambda axes: math.prod(mesh.shape[a] for a in axes) if axes else 1
    if b % size(batch_axes):  # e.g. the batch-1 trace of model.init: replicated
        batch_axes = None
    tp = size(head_axes)
    if n % tp:
        head_axes, tp = None, 1
    if tp > 1 and k_heads % tp:  # kv heads cannot follow the query heads' split: give every query head its own
        k, v = (jnp.repeat(x, n // k_heads, axis=1) for x in (k, v))

    def local(q, k, v, q_ids, kv_ids):
        from jax.experimental.pallas.ops.tpu import splash_attention as splash
        kernel = _kernel(t_pad, q.shape[1], window, cap, interpret)
        return jax.vmap(lambda *a: kernel(*a[:3], segment_ids=splash.SegmentIds(*a[3:])))(q, k, v, q_ids, kv_ids)

    if batch_axes or head_axes:
        P = jax.sharding.PartitionSpec
        qkv = P(batch_axes, head_axes, None, None)
        ids = P(batch_axes, None)
        local = jax.shard_map(local, in_specs=(qkv, qkv, qkv, ids, ids), out_specs=qkv, check_vma=False)
    out = local(q, k, v, q_ids, kv_ids)
    return out.transpose(0, 2, 1, 3)[:, :t]


def _mesh_axes():
    """Mesh axes (of the current mesh, > 1 device) of the logical 'act_batch' / 'act_heads' activations."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None, None
    spec = nn.logical_to_mesh_axes(("act_batch", "act_heads"))

    def used(x):
        axes = tuple(a for a in ((x,) if isinstance(x, str) else (x or ())) if mesh.shape.get(a, 1) > 1)
        return axes or None
    return used(spec[0]), used(spec[1])
