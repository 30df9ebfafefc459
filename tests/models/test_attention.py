"""models/attention.py: the Pallas splash kernel (interpret mode on CPU) against the XLA einsum path for each
mask kind (causal, prefix-LM, sliding window, packed segments), softcap 50 and GQA; gradients; the Gemma
layers with a SegmentMask (unsharded and under an 8-device mesh); the errors."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unifluid_jax.config import ConfigError
from unifluid_jax.models import attention, gemma, masks
from unifluid_jax.train import sharding

T = 200  # padded to 256 inside: two 128-blocks of queries, four of (doubled) keys

# Rows of one batch, one mask kind each: (segment_ids, mask_ar) as lists of (example length, prefix length).
ROWS = {
    "causal": [(T, 0)],
    "prefix_lm": [(150, 60)],  # then 50 padding slots
    "packed": [(70, 25), (90, 1), (33, 33)],  # prefix-LM, causal, all-prefix examples; 7 padding slots
}


def _segment_mask(rows):
    seg = np.zeros((len(rows), T), np.int32)
    ar = np.zeros((len(rows), T), np.int32)
    for r, examples in enumerate(rows):
        start = 0
        for i, (length, prefix) in enumerate(examples):
            seg[r, start:start + length] = i + 1
            ar[r, start + max(prefix, 1):start + length] = 1  # prefix: one block of zeros (0 -> causal)
            ar[r, start] = 1 if prefix <= 1 else 0
            start += length
    return masks.SegmentMask(jnp.asarray(seg), jnp.asarray(ar))


def _positions(mask):
    # Slot indices: within an example they differ as the example's own positions do (the window compares
    # differences only; RoPE is outside `attend`), and across examples the segment ids already mask.
    return jnp.broadcast_to(jnp.arange(T), mask.segment_ids.shape)


def _qkv(b, n, k, h=16, seed=0):
    rng = np.random.default_rng(seed)
    # Logits of std ~10: softcap 50 bends the large ones, so a missing or misplaced cap is visible.
    q = jnp.asarray(rng.normal(size=(b, T, n, h)) * 1.6, jnp.float32)
    kk = jnp.asarray(rng.normal(size=(b, T, k, h)) * 1.6, jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, T, k, h)), jnp.float32)
    return q, kk, v


def _attend(impl, q, k, v, mask, window, cap=50.0):
    pos = _positions(mask)
    return jax.jit(lambda q, k, v: attention.attend(q, k, v, mask, pos, pos, softcap=cap, window=window,
                                                    impl=impl))(q, k, v)


def test_segment_mask_dense_is_the_fixed_layout_mask():
    input_mask = np.array([[1, 1, 1, 1, 0, 0, 1, 1], [0, 0, 1, 1, 1, 0, 1, 1]])
    mask_ar = np.array([[0, 0, 0, 1, 1, 0, 1, 1], [0, 0, 0, 0, 0, 0, 1, 1]])
    got = masks.SegmentMask(input_mask, mask_ar).dense()
    np.testing.assert_array_equal(got, masks.make_attention_mask(input_mask, mask_ar))


def test_two_halves_construction_is_the_mask_rule():
    """What splash sees (causal half + future-prefix half) equals the dense rule on every valid query row."""
    m = _segment_mask(list(ROWS.values()))
    valid = np.asarray(m.segment_ids) != 0
    got, want = np.asarray(attention.splash_visible(m)), np.asarray(m.dense())
    np.testing.assert_array_equal(got[valid], want[valid])
    attention.check_splash_mask(m)  # no error
    # Fixed layout: one example whose slots are interrupted by padding (text padding before BOI).
    fixed = masks.SegmentMask(jnp.array([[0, 0, 1, 1, 1, 0, 0, 1, 1]]), jnp.array([[0, 0, 0, 0, 1, 0, 0, 1, 1]]))
    np.testing.assert_array_equal(attention.splash_visible(fixed)[0][2:], fixed.dense()[0][2:])


def test_check_rejects_a_bidirectional_block_after_a_causal_token():
    m = masks.SegmentMask(jnp.array([[1, 1, 1, 1, 1]]), jnp.array([[0, 1, 1, 0, 0]]))  # block {2, 3, 4}
    with pytest.raises(ValueError, match="row 0 .* not the first block of its example"):
        attention.check_splash_mask(m)


@pytest.mark.parametrize("window", [None, 24], ids=["global", "sliding_window"])
def test_splash_matches_xla_per_mask_kind(window):
    """GQA (4 query heads on 2 kv heads), softcap 50; outputs within 1e-5 on every valid slot."""
    m = _segment_mask(list(ROWS.values()))
    q, k, v = _qkv(len(ROWS), 4, 2)
    want = np.asarray(_attend("xla", q, k, v, m, window))
    got = np.asarray(_attend("splash_interpret", q, k, v, m, window))
    valid = np.asarray(m.segment_ids) != 0
    for r, kind in enumerate(ROWS):
        np.testing.assert_allclose(got[r][valid[r]], want[r][valid[r]], atol=1e-5, rtol=0, err_msg=kind)
    # The cap is applied: without it the outputs differ by far more than the tolerance.
    uncapped = np.asarray(_attend("xla", q, k, v, m, window, cap=None))
    assert np.abs(uncapped - want)[valid].max() > 1e-2


@pytest.mark.slow  # the interpret-mode backward kernels: ~30 s of CPU
def test_splash_gradients_match_xla():
    """d(loss)/d(q, k, v) through the splash backward kernels (dq, dkv) in interpret mode, packed rows with
    a window, multi-query (1 kv head). Both float32 paths are ~2e-6 (relative to the largest gradient) from a
    float64 reference, so the bar is relative to the gradient scale."""
    m = _segment_mask([ROWS["packed"]])
    q, k, v = _qkv(1, 2, 1, seed=1)
    w = jnp.asarray(np.random.default_rng(2).normal(size=q.shape), jnp.float32)
    w = w * (m.segment_ids != 0)[:, :, None, None]  # padding slots' outputs are not part of the contract
    pos = _positions(m)

    def grads(impl):
        loss = lambda q, k, v: jnp.sum(attention.attend(q, k, v, m, pos, pos, softcap=50.0, window=24,
                                                        impl=impl) * w)
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

    for name, want, got in zip("qkv", grads("xla"), grads("splash_interpret")):
        scale = float(jnp.abs(want).max())
        assert scale > 0.1, name
        np.testing.assert_allclose(got, want, atol=1e-5 * scale, rtol=0, err_msg=f"d/d{name}")


def _tiny_gemma(impl):
    return gemma.get_config("gemma2_tiny", num_layers=2, sliding_window=24, attention_impl=impl)


@pytest.mark.slow  # ~30 s of CPU: four interpret-mode decoder compiles
def test_gemma_splash_matches_xla_unsharded_and_on_a_mesh(mesh8):
    """The whole decoder (scanned local + global layers) with a packed SegmentMask; then the same under an
    8-device mesh (shard_map over the batch axes, one kernel per device)."""
    m = _segment_mask([ROWS["packed"], ROWS["prefix_lm"]] * 4)
    pos = _positions(m)
    x = jnp.asarray(np.random.default_rng(3).normal(size=(8, T, 64)), jnp.float32)
    ref_model = gemma.Gemma(_tiny_gemma("xla"))
    params = nn.unbox(ref_model.init(jax.random.key(0), x[:1], pos[:1], masks.SegmentMask(
        m.segment_ids[:1], m.mask_ar[:1])))["params"]
    want, _ = ref_model.apply({"params": params}, x, pos, m)
    valid = np.asarray(m.segment_ids) != 0
    model = gemma.Gemma(_tiny_gemma("splash_interpret"))
    got, _ = jax.jit(lambda p, x: model.apply({"params": p}, x, pos, m))(params, x)
    np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want)[valid], atol=1e-5, rtol=0)

    rules = sharding.DEFAULT_RULES
    with jax.set_mesh(mesh8), nn.logical_axis_rules(rules):
        x_sh = jax.device_put(x, jax.sharding.NamedSharding(mesh8, nn.logical_to_mesh_axes(
            ("act_batch", "act_length", "act_embed"), rules)))
        fn = jax.jit(lambda p, x: model.apply({"params": p}, x, pos, m))
        text = fn.lower(params, x_sh).as_text()
        got_sh, _ = fn(params, x_sh)
    assert "shard_map" in text or "sdy.manual_computation" in text
    np.testing.assert_allclose(np.asarray(got_sh)[valid], np.asarray(want)[valid], atol=1e-5, rtol=0)


def test_errors():
    q, k, v = _qkv(1, 2, 1)
    m = _segment_mask([ROWS["causal"]])
    pos = _positions(m)
    with pytest.raises(ValueError, match="needs the mask as a masks.SegmentMask"):
        attention.attend(q, k, v, m.dense(), pos, pos, softcap=None, window=None, impl="splash")
    with pytest.raises(ValueError, match="no KV cache"):
        attention.attend(q, k[:, :100], v[:, :100], m, pos, pos[:, :100], softcap=None, window=None,
                         impl="splash")
    with pytest.raises(ConfigError, match="gemma.attention_impl.*choose one of"):
        gemma.validate_config({"variant": "gemma2_tiny", "attention_impl": "flash"})
    model = gemma.Gemma(_tiny_gemma("xla"))
    cache = model.init_cache(1, T)
    with pytest.raises(ValueError, match="with a KV cache pass the dense"):
        model.init(jax.random.key(0), jnp.zeros((1, T, 64)), pos, m, cache, 0)
