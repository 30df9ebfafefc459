"""Image generation: KV-cached == uncached (raster / random order), CFG batching, determinism, bad input."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.inference.common import tiny_model
from unifluid_jax.data import layout
from unifluid_jax.inference import generate as G

STEPS = 3  # diffusion steps per token: enough to exercise the sampler, cheap to compile


@functools.lru_cache(maxsize=None)
def _batch():
    cfg, _, _ = tiny_model()
    u = cfg.siglip.image_size
    src = np.random.default_rng(0).uniform(-1, 1, (1, u, u, 3)).astype(np.float32)
    t2i = G.prompt_batch(cfg, [[5, 6, 7], [9, 10, 11, 12, 13]])
    edit = G.prompt_batch(cfg, [[20, 21]], source_und=src)
    batch = {k: np.concatenate([t2i[k], edit[k]]) for k in t2i}
    batch["image_und"] = np.concatenate([np.zeros_like(src), np.zeros_like(src), src])
    return batch


def _run(use_cache, cfg_scale=3.0, order="raster", seed=0, guided=None, batch=None):
    _, model, params = tiny_model()
    return G.generate_images(model, params, _batch() if batch is None else batch, jax.random.PRNGKey(seed),
                             num_steps=STEPS, cfg_scale=cfg_scale, order=order, use_cache=use_cache,
                             guided=guided, return_aux=True)


@functools.lru_cache(maxsize=None)
def _teacher_forced():
    _, model, _ = tiny_model()
    return jax.jit(functools.partial(G.condition_states, model))


def _rel(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.maximum(1.0, jnp.max(jnp.abs(b))))


@pytest.mark.parametrize("order", ["raster", "random"])
def test_cached_equals_uncached(order):
    img_c, tok_c, aux_c = _run(True, order=order)
    img_u, tok_u, aux_u = _run(False, order=order)
    np.testing.assert_array_equal(aux_c["order"], aux_u["order"])
    if order == "random":  # a per-example permutation, not raster
        assert (np.asarray(aux_c["order"]) != np.arange(16)).any(axis=1).all()
        assert len({tuple(r) for r in np.asarray(aux_c["order"])}) == 3
    # Conditions z (unit-scale hidden states, both CFG branches) agree to 1e-5 absolute. An untrained head makes
    # the ancestral sampler amplify (tokens reach ~1e4: x0 = x_t / sqrt(abar) with a wrong eps), so the tokens
    # are compared relative to their scale.
    assert float(jnp.max(jnp.abs(aux_c["cond"] - aux_u["cond"]))) <= 1e-5
    assert _rel(tok_c, tok_u) <= 1e-5
    assert float(jnp.max(jnp.abs(img_c - img_u))) <= 1e-5
    assert img_c.shape == (3, 64, 64, 3) and tok_c.shape == (3, 16, 16)
    # Tokens depend on the condition: different prompts give different images.
    assert float(jnp.max(jnp.abs(tok_c[0] - tok_c[1]))) > 1e-3


def test_generation_is_seeded_and_teacher_forced_consistent():
    _, model, params = tiny_model()
    img1, tok1, aux = _run(True, seed=0)
    img2, tok2, _ = _run(True, seed=0)
    img3, _, _ = _run(True, seed=1)
    np.testing.assert_array_equal(img1, img2)
    np.testing.assert_array_equal(tok1, tok2)
    assert float(jnp.max(jnp.abs(img1 - img3))) > 1e-3
    # The conditional rows' z equal one teacher-forced forward over the generated tokens (training path).
    z = _teacher_forced()(params, _batch(), aux["tokens_in_order"], aux["order"])
    assert float(jnp.max(jnp.abs(aux["cond"][:3] - z))) <= 1e-5


def test_unconditional_rows_see_the_empty_prompt():
    cfg, model, params = tiny_model()
    batch = _batch()
    rows, task = G.guided_rows(batch, True)
    positions, mask = G.sequence_inputs(cfg, task, rows["text_input_mask"], rows["text_mask_ar"])
    off = cfg.offsets
    text = np.asarray(rows["text_input_mask"])
    np.testing.assert_array_equal(text[3:], np.eye(1, cfg.max_text_len, dtype=text.dtype).repeat(3, 0))
    np.testing.assert_array_equal(np.asarray(rows["text_tokens"])[3:, 0], layout.BOS_ID)
    np.testing.assert_array_equal(np.asarray(task)[3:], batch["task"])
    # The BOI row of an unconditional t2i row sees exactly BOS and itself; the edit row also its source.
    boi = np.asarray(mask)[:, off["gen"]]
    assert np.flatnonzero(boi[3]).tolist() == [off["text"], off["gen"]]
    assert np.flatnonzero(boi[5]).tolist() == list(range(cfg.n_und)) + [off["text"], off["gen"]]
    # Direct run: the uncond rows' z equal a teacher-forced forward on the empty prompt with the same tokens.
    _, _, aux = _run(True)
    empty = G.prompt_batch(cfg, [[], [], []])
    empty["task"] = batch["task"]
    empty["image_und"] = batch["image_und"]
    z = _teacher_forced()(params, empty, aux["tokens_in_order"], aux["order"])
    assert float(jnp.max(jnp.abs(aux["cond"][3:] - z))) <= 1e-5


def test_cfg_scale_one_equals_conditional_branch():
    img_g, tok_g, aux_g = _run(True, cfg_scale=1.0, guided=True)
    img_c, tok_c, aux_c = _run(True, cfg_scale=1.0, guided=False)
    assert aux_g["cond"].shape[0] == 6 and aux_c["cond"].shape[0] == 3
    assert float(jnp.max(jnp.abs(aux_g["cond"][:3] - aux_c["cond"]))) <= 1e-5
    assert _rel(tok_g, tok_c) <= 1e-5
    assert float(jnp.max(jnp.abs(img_g - img_c))) <= 1e-5
    # And guidance matters when the scale is not 1.
    _, tok_3, _ = _run(True, cfg_scale=3.0)
    assert _rel(tok_3, tok_c) > 1e-3


def test_bad_input():
    cfg, model, params = tiny_model()
    with pytest.raises(ValueError, match="no prompts given"):
        G.prompt_batch(cfg, [])
    with pytest.raises(ValueError, match="no prompts given"):
        G.generate_images(model, params, [], jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match=r"prompt 1 .*too long.*max_text_len=8"):
        G.prompt_batch(cfg, [[5], list(range(5, 13))])
    with pytest.raises(ValueError, match="prompt 0 is a string but no tokenizer"):
        G.prompt_batch(cfg, ["a cat"])
    with pytest.raises(ValueError, match="prompt 1 has token ids outside"):
        G.prompt_batch(cfg, [[5], [999]])
    with pytest.raises(ValueError, match="unknown order"):
        G.generate_images(model, params, G.prompt_batch(cfg, [[5]]), jax.random.PRNGKey(0), order="spiral")
    with pytest.raises(ValueError, match="only t2i / edit"):
        b = G.prompt_batch(cfg, [[5]])
        b["task"] = np.array([layout.CAPTION], np.int32)
        G.generate_images(model, params, b, jax.random.PRNGKey(0))


def test_vae_source_editing_cached_equals_uncached():
    """Edit source through the VAE too (n_src slots after the SigLIP ones): cached == uncached, and the VAE
    source reaches the image tokens (another source image changes them; so does the SigLIP one)."""
    from tests.inference.common import random_params
    from tests.models.unifluid_fixtures import make_batch, tiny_config
    from unifluid_jax.models.unifluid import UniFluid
    cfg = tiny_config(edit_source=("siglip", "vae"))
    model = UniFluid(cfg)
    params = random_params(model, make_batch())
    assert cfg.n_src == 16 and cfg.seq_len == tiny_model()[0].seq_len + 16
    u, g = cfg.siglip.image_size, cfg.vae.image_size
    r = np.random.default_rng(1)
    und, gen = r.uniform(-1, 1, (2, u, u, 3)).astype(np.float32), r.uniform(-1, 1, (2, g, g, 3)).astype(np.float32)

    def run(use_cache, source_und=und, source_gen=gen):
        batch = G.prompt_batch(cfg, [[5], [6, 7]], source_und=source_und, source_gen=source_gen)
        return G.generate_images(model, params, batch, jax.random.PRNGKey(0), num_steps=STEPS, cfg_scale=3.0,
                                 use_cache=use_cache, return_aux=True)
    img_c, tok_c, aux_c = run(True)
    img_u, tok_u, aux_u = run(False)
    assert img_c.shape == (2, g, g, 3) and aux_c["cond"].shape == (4, 16, cfg.width)
    assert float(jnp.max(jnp.abs(aux_c["cond"] - aux_u["cond"]))) <= 1e-5
    assert _rel(tok_c, tok_u) <= 1e-5
    # Row 0's VAE source replaced by row 1's: row 0 changes, row 1 (same inputs) does not.
    _, tok_g, _ = run(True, source_gen=gen[[1, 1]])
    assert _rel(tok_g[0], tok_c[0]) > 1e-3
    np.testing.assert_allclose(tok_g[1], tok_c[1], rtol=1e-5, atol=1e-5)
    _, tok_s, _ = run(True, source_und=und[[1, 1]])
    assert _rel(tok_s[0], tok_c[0]) > 1e-3
    with pytest.raises(ValueError, match="needs source_gen"):
        G.prompt_batch(cfg, [[5]], source_und=und[:1])

def test_chunked_vae_decode_equals_batched():
    cfg, _, params = tiny_model()
    tokens = jnp.asarray(np.random.default_rng(3).normal(size=(3, cfg.n_img, cfg.token_dim)), jnp.float32)
    whole = G._decoder(cfg, 0)(params, tokens)
    for chunk in (1, 2):  # 2 leaves a remainder of 1
        np.testing.assert_allclose(G._decoder(cfg, chunk)(params, tokens), whole, atol=1e-5)
