"""Gemma decoder: parity with HF transformers (eager), KV cache, config validation, bad tokens."""
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import transformers

from unifluid_jax.config import ConfigError
from unifluid_jax.convert import gemma as conv
from unifluid_jax.models import gemma, masks


def tiny_hf(kind="gemma2", seed=0, **kw):
    return _tiny_hf(kind, seed, tuple(sorted(kw.items())))


@functools.lru_cache(maxsize=None)
def _tiny_hf(kind, seed, kw):
    """A tiny HF Gemma(2)ForCausalLM with random weights large enough to exercise every op (incl. norms)."""
    base = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, attn_implementation="eager")
    if kind == "gemma2":
        base.update(sliding_window=4, query_pre_attn_scalar=16)
    base.update(dict(kw))
    torch.manual_seed(seed)
    if kind == "gemma2":
        model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**base))
    else:
        model = transformers.GemmaForCausalLM(transformers.GemmaConfig(**base))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.3 if "norm" in name else (0.5 if "embed" in name else 0.15))
    return model.eval()


def ours_from_hf(model, **overrides):
    cfg = conv.config_from_hf(model.config, **overrides)
    return gemma.Gemma(cfg), conv.params_from_hf(model.state_dict(), cfg)


@functools.partial(jax.jit, static_argnums=0)
def _forward(model, params, tokens, input_mask, mask_ar):
    return model.apply({"params": params}, tokens, input_mask, mask_ar, method="forward")


def forward(model, params, tokens, input_mask=None, mask_ar=None):
    """Jitted `Gemma.forward` (compiled once per config and shape across tests)."""
    ones = np.ones(np.shape(tokens), int)
    return np.asarray(_forward(model, params, tokens, ones.astype(bool) if input_mask is None else input_mask,
                               ones if mask_ar is None else mask_ar))


def hf_logits(model, tokens, attention_mask=None):
    with torch.no_grad():
        am = None if attention_mask is None else torch.tensor(np.asarray(attention_mask, np.int64))
        return model(input_ids=torch.tensor(np.asarray(tokens, np.int64)), attention_mask=am).logits.numpy()


TOKENS = np.random.RandomState(0).randint(0, 256, size=(2, 16))


@pytest.mark.parametrize("hf_kw", [
    dict(),  # 4:2 GQA, query scale head_dim^-0.5, window 4
    # 6:2 GQA, 27B-style query scale (D / N)^-0.5 = 8^-0.5 != head_dim^-0.5, tight softcaps (tanh nonlinear)
    dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=2, query_pre_attn_scalar=8,
         attn_logit_softcapping=2.0, final_logit_softcapping=3.0),
], ids=["gqa4to2", "gqa6to2_27bscale"])
def test_gemma2_matches_hf(hf_kw):
    model = tiny_hf("gemma2", **hf_kw)
    ours, params = ours_from_hf(model)
    assert ours.config.sliding_window == 4 and ours.config.num_heads == model.config.num_attention_heads
    assert ours.config.query_scale == pytest.approx(model.config.query_pre_attn_scalar ** -0.5)
    got = forward(ours, params, TOKENS)
    want = hf_logits(model, TOKENS)
    assert got.shape == want.shape == (2, 16, 256)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert np.abs(want).max() > 0.5  # the comparison is not trivially small


def test_gemma1_mqa_matches_hf():
    model = tiny_hf("gemma", num_key_value_heads=1, num_hidden_layers=2)
    ours, params = ours_from_hf(model)
    c = ours.config
    assert (c.num_kv_heads, c.post_norms, c.sliding_window, c.attn_logit_softcap) == (1, False, None, None)
    got = forward(ours, params, TOKENS)
    np.testing.assert_allclose(got, hf_logits(model, TOKENS), atol=1e-4, rtol=0)


def test_right_padded_batch_matches_hf():
    model = tiny_hf("gemma2")
    ours, params = ours_from_hf(model)
    input_mask = np.ones((2, 16), bool)
    input_mask[1, 11:] = False
    got = forward(ours, params, TOKENS, input_mask)
    want = hf_logits(model, TOKENS, input_mask)
    np.testing.assert_allclose(got[input_mask], want[input_mask], atol=1e-4, rtol=0)
    assert np.isfinite(got).all()  # fully masked pad rows stay finite


def test_unscanned_and_remat_agree_with_scanned():
    model = tiny_hf("gemma2")
    ref_model, ref_params = ours_from_hf(model)
    ref = forward(ref_model, ref_params, TOKENS)
    m, p = ours_from_hf(model, scan_layers=False)
    np.testing.assert_allclose(forward(m, p, TOKENS), ref, atol=1e-5, rtol=0)
    # Rematerialised scan: same loss and same gradients as without remat.
    loss = lambda m: jax.jit(jax.value_and_grad(
        lambda p: m.apply({"params": p}, TOKENS, method="forward")[..., :8].std()))
    want_l, want_g = loss(ref_model)(ref_params)
    m, p = ours_from_hf(model, remat_policy="dots_with_no_batch_dims_saveable")
    got_l, got_g = loss(m)(p)
    np.testing.assert_allclose(got_l, want_l, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), got_g, want_g)
    assert float(jnp.abs(want_g["layers"]["local"]["attn"]["q_einsum"]).max()) > 0


@functools.partial(jax.jit, static_argnums=0)
def _step(model, params, cache, full_mask, toks, pos, idx):
    """One cached extension step: T = toks.shape[1] new tokens at cache index `idx` (traced)."""
    def f(m):
        h, c = m(m.embed(toks), pos, masks.cache_step_mask(full_mask, idx, toks.shape[1]), cache, idx)
        return m.logits(h), c
    return nn.apply(f, model)({"params": params})


def _full_and_steps(model, params, tokens, input_mask, mask_ar, splits, cache_dtype=jnp.float32):
    """Full-sequence logits and the same logits computed by prefill + cached extension in `splits` blocks."""
    b, t = tokens.shape
    full_mask = masks.make_attention_mask(input_mask, mask_ar)
    positions = masks.positions_from_mask(input_mask)
    full = forward(model, params, tokens, input_mask, mask_ar)
    cache = model.init_cache(b, t, cache_dtype)
    outs, start = [], 0
    for length in splits:
        sl = slice(start, start + length)
        logits, cache = _step(model, params, cache, full_mask, tokens[:, sl], positions[:, sl], jnp.int32(start))
        outs.append(logits)
        start += length
    assert start == t
    return full, np.concatenate(outs, axis=1), cache


@pytest.mark.parametrize("splits", [[5] + [1] * 11, [5, 5, 1, 5]], ids=["token_by_token", "blocks"])
def test_cached_decoding_equals_full_forward(splits):
    model = tiny_hf("gemma2")  # window 4 < 16: decoding crosses the window boundary many times
    # the blocks case also runs the cache through rematerialised scanned layers (train config reused for decode)
    ours, params = ours_from_hf(model, remat_policy="full" if len(splits) == 4 else "none")
    input_mask = np.ones((2, 16), bool)
    full, stepped, cache = _full_and_steps(ours, params, TOKENS, input_mask, np.ones((2, 16), int), splits)
    np.testing.assert_allclose(stepped, full, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(cache["pos"], np.tile(np.arange(16), (2, 1)))
    assert cache["layers"]["local"]["k"].shape == (2, 2, 16, 2, 16)  # [G, B, S, K, H]


def test_cached_prefix_lm_with_padding_unscanned():
    # Bidirectional prefix of 5 with a pad inside, then causal tokens; unscanned cache layout; Gemma-1 MQA.
    ours, params = ours_from_hf(tiny_hf("gemma", num_key_value_heads=1, num_hidden_layers=2), scan_layers=False)
    input_mask = np.ones((2, 12), bool)
    input_mask[0, 3] = False
    mask_ar = np.concatenate([np.zeros((2, 5), int), np.ones((2, 7), int)], axis=1)
    full, stepped, cache = _full_and_steps(ours, params, TOKENS[:, :12], input_mask, mask_ar, [5, 1, 1, 5])
    np.testing.assert_allclose(stepped[input_mask], full[input_mask], atol=1e-5, rtol=0)
    assert set(cache["layers"]) == {"layer_0", "layer_1"}


def test_bf16_cache_close():
    ours, params = ours_from_hf(tiny_hf("gemma2"))
    full, stepped, cache = _full_and_steps(ours, params, TOKENS, np.ones((2, 16), bool), np.ones((2, 16), int),
                                           [5, 5, 1, 5], cache_dtype=jnp.bfloat16)
    assert cache["layers"]["global"]["v"].dtype == jnp.bfloat16
    np.testing.assert_allclose(stepped, full, atol=0.1)


def test_embed_scale_and_token_check():
    cfg = gemma.get_config("gemma2_tiny", dtype="bfloat16")
    model = gemma.Gemma(cfg)
    params = nn.unbox(jax.jit(functools.partial(gemma.init_params, model))(jax.random.key(0)))
    x = model.apply({"params": params}, jnp.array([[1, 2]]), method="embed")
    table = params["embedder"]["input_embedding"]
    assert x.dtype == jnp.bfloat16
    np.testing.assert_array_equal(x[0, 1], table[2].astype(jnp.bfloat16) * jnp.bfloat16(8.0))
    with pytest.raises(ValueError, match=r"token id 256 .*outside the vocabulary \[0, 256\)"):
        model.apply({"params": params}, np.array([[1, 256]]), method="forward")
    with pytest.raises(ValueError, match="token id -1"):
        model.apply({"params": params}, np.array([[-1, 3]]), method="embed")
    # Under jit ids are traced: no host check (and no crash).
    jax.jit(lambda t: model.apply({"params": params}, t, method="embed"))(jnp.array([[1, 2]]))


def test_variants_match_spec():
    spec = {  # layers, D, N, K, H, F, query scale, attn cap, final cap, window, post norms
        "gemma1_2b": (18, 2048, 8, 1, 256, 16384, 256 ** -0.5, None, None, None, False),
        "gemma2_2b": (26, 2304, 8, 4, 256, 9216, 256 ** -0.5, 50.0, 30.0, 4096, True),
        "gemma2_9b": (42, 3584, 16, 8, 256, 14336, 256 ** -0.5, 50.0, 30.0, 4096, True),
        "gemma2_27b": (46, 4608, 32, 16, 128, 36864, 144 ** -0.5, 50.0, 30.0, 4096, True),
    }
    for name, want in spec.items():
        c = gemma.get_config(name)
        got = (c.num_layers, c.width, c.num_heads, c.num_kv_heads, c.head_dim, c.mlp_dim, c.query_scale,
               c.attn_logit_softcap, c.final_logit_softcap, c.sliding_window, c.post_norms)
        assert got[:6] == want[:6] and got[7:] == want[7:] and got[6] == pytest.approx(want[6]), name
        assert c.vocab_size == 256000 and c.rms_eps == 1e-6 and c.rope_base == 10000.0 and c.scan_layers
    section = ml_collections.ConfigDict({"variant": "gemma2_tiny", "num_layers": 2, "dtype": "bfloat16",
                                         "attn_logit_softcap": None})
    gemma.validate_config(section, "gemma")
    c = gemma.config_from_dict(section)
    assert c.attn_logit_softcap is None
    assert (c.num_layers, c.dtype, c.num_groups) == (2, "bfloat16", 1)
    assert gemma.get_config("gemma2_tiny", head_dim=32).query_scale == 32 ** -0.5


@pytest.mark.parametrize("section,match", [
    ({"variant": "gemma3_1b"}, r"gemma\.variant: unknown Gemma variant"),
    ({"variant": "gemma2_tiny", "num_kv_heads": 3}, r"gemma\.num_kv_heads: num_heads \(4\) must be divisible"),
    ({"variant": "gemma2_tiny", "sliding_window": 0}, r"gemma\.sliding_window"),
    ({"variant": "gemma2_tiny", "width": 0}, r"gemma\.width: must be a positive int"),
    ({"variant": "gemma2_tiny", "num_layers": 3}, r"gemma\.num_layers: .*must be even"),
    ({"variant": "gemma2_tiny", "dtype": "float64"}, r"gemma\.dtype: unknown dtype"),
    ({"variant": "gemma2_tiny", "remat_policy": "sometimes"}, r"gemma\.remat_policy"),
    ({"variant": "gemma2_tiny", "num_head": 4}, r"gemma\.num_head: unknown Gemma field"),
])
def test_validate_config_errors(section, match):
    with pytest.raises(ConfigError, match=match):
        gemma.validate_config(section, "gemma")
    with pytest.raises(ConfigError, match=match):
        gemma.config_from_dict(section)


def test_odd_layers_without_scan_are_fine():
    gemma.validate_config({"variant": "gemma2_tiny", "num_layers": 3, "scan_layers": False}, "model.llm")
    cfg = gemma.get_config("gemma2_tiny", num_layers=3, scan_layers=False)
    assert dataclasses.asdict(cfg)["num_layers"] == 3
    with pytest.raises(ConfigError, match=r"config\.model\.llm\.variant"):
        gemma.validate_config({"variant": None}, "model.llm")
