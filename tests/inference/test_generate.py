"""Image generation: KV-cached == uncached (raster / random order), CFG batching, determinism, bad input; the
conditions equal the training path's (UniFluid.loss on fixed-layout rows with the generated tokens)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.inference.common import tiny_model
from unifluid_jax import layout
from unifluid_jax.models import unifluid
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


def _training_conditions(monkeypatch, params, batch, tokens_raster, empty_prompt=False):
    """Teacher-forced conditions from the TRAINING path: the prompts laid out as fixed training rows (all
    segments, text padded to L: not generation's task-shaped rows) with the generated tokens as cached latents,
    through UniFluid.loss (raster orders: the last step of the annealed schedule); z captured where the loss
    hands it to the diffusion head. -> [B, n, D]."""
    cfg, model, _ = tiny_model()
    exs = [{k: np.asarray(v[i]) for k, v in batch.items()} for i in range(len(batch["task"]))]
    for ex, tok in zip(exs, np.asarray(tokens_raster)):
        ex["gen_tokens"] = tok
        if empty_prompt:
            ex.update(layout.text_layout(int(ex["task"]), [], None, cfg.max_text_len))
    rows, _ = layout.layout_examples(exs, layout.fixed_spec(cfg.dims), cfg.dims, layout="fixed")
    seen = {}
    real = unifluid.diffusion_lib.diffusion_loss_terms

    def spy(fn, p, z, target, t, noise, diffusion):
        seen["z"] = z
        return real(fn, p, z, target, t, noise, diffusion)
    monkeypatch.setattr(unifluid.diffusion_lib, "diffusion_loss_terms", spy)
    model.apply(params, rows, jax.random.PRNGKey(0), 100, 100, method=unifluid.UniFluid.loss)
    m = cfg.diffusion.batch_mul
    return np.asarray(seen["z"]).reshape(len(exs), m, cfg.n_img, -1)[:, 0]


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


def test_generation_is_seeded_and_teacher_forced_consistent(monkeypatch):
    _, model, params = tiny_model()
    img1, tok1, aux = _run(True, seed=0)
    img2, tok2, _ = _run(True, seed=0)
    img3, _, _ = _run(True, seed=1)
    np.testing.assert_array_equal(img1, img2)
    np.testing.assert_array_equal(tok1, tok2)
    assert float(jnp.max(jnp.abs(img1 - img3))) > 1e-3
    # The conditional rows' z equal one teacher-forced forward over the generated tokens (training path).
    assert (np.asarray(aux["order"]) == np.arange(16)).all()  # raster, like the reference below
    z = _training_conditions(monkeypatch, params, _batch(), tok1)
    assert float(jnp.max(jnp.abs(aux["cond"][:3] - z))) <= 1e-5


def test_task_shaped_rows():
    cfg, _, _ = tiny_model()
    t2i = G.generation_rows(cfg, G.prompt_batch(cfg, [[5, 6, 7]]), guided=False)
    kinds = t2i["kind"][0].tolist()  # [text (L) | BOI + image]: no und slots for a t2i-only batch
    assert len(kinds) == cfg.max_text_len + 1 + cfg.n_img
    assert kinds[:4] == [layout.K_TEXT] * 4 and kinds[4:8] == [layout.K_PAD] * 4
    assert kinds[8:] == [layout.K_BOI] + [layout.K_IMG] * cfg.n_img


def test_unconditional_rows_see_the_empty_prompt(monkeypatch):
    cfg, model, params = tiny_model()
    batch = _batch()
    rows = G.generation_rows(cfg, batch, guided=True)
    positions, mask = G.row_inputs(rows)
    text = (rows["kind"] == layout.K_TEXT)
    t0, boi = cfg.n_und, cfg.n_und + cfg.max_text_len  # [und | text | BOI + image] (the batch has an edit)
    np.testing.assert_array_equal(text[3:].sum(1), [1, 1, 1])  # [BOS] alone
    np.testing.assert_array_equal(rows["tokens"][3:, t0], layout.BOS_ID)
    np.testing.assert_array_equal(rows["task_count"][3:], rows["task_count"][:3])
    # The BOI row of an unconditional t2i row sees exactly BOS and itself; the edit row also its source.
    boi_row = np.asarray(mask)[:, boi]
    assert np.flatnonzero(boi_row[3]).tolist() == [t0, boi]
    assert np.flatnonzero(boi_row[5]).tolist() == list(range(cfg.n_und)) + [t0, boi]
    assert int(positions[3, boi]) == 1 and int(positions[5, boi]) == cfg.n_und + 1  # padding skipped
    # Direct run: the uncond rows' z equal the training path on the empty prompt with the same tokens.
    _, tok, aux = _run(True)
    z = _training_conditions(monkeypatch, params, batch, tok, empty_prompt=True)
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
    from tests.models.unifluid_fixtures import make_batch, rows, tiny_config
    from unifluid_jax.models.unifluid import UniFluid
    cfg = tiny_config(edit_source=("siglip", "vae"))
    model = UniFluid(cfg)
    params = random_params(model, rows(cfg, make_batch()))
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
