"""The unified model: embeddings and order, loss targets, sharding, overfitting, bad input."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from unifluid_jax.config import ConfigError
from unifluid_jax.models import order as order_lib
from unifluid_jax.models import unifluid
from unifluid_jax.train import sharding

from tests.models.unifluid_fixtures import make_batch, rows, tiny_config

# One xdist worker for the whole module: its session fixture (a compiled init / a trained run) is then
# built once, not once per worker.
pytestmark = pytest.mark.xdist_group("models_unifluid")

U = unifluid.UniFluid


def _init(cfg, batch, seed=0):
    init = sharding.jit_once(lambda r: U(cfg).init(r, batch, method=U.init_all))  # eager init: ~40 s
    return nn.unbox(init(jax.random.PRNGKey(seed)))


@pytest.fixture(scope="session")  # session, not module: slow-first ordering may split the module
def setup():
    cfg = tiny_config()
    batch = rows(cfg, make_batch())
    return cfg, batch, _init(cfg, batch)


def test_layout_sizes_and_finite_loss(setup):
    cfg, batch, params = setup
    assert (cfg.n_und, cfg.n_src, cfg.n_img, cfg.token_dim) == (16, 0, 16, 16)
    assert cfg.seq_len == 16 + 8 + 1 + 16
    loss, metrics = jax.jit(lambda p, b: U(cfg).apply(p, b, jax.random.PRNGKey(1), 0, 100, method=U.loss))(
        params, batch)
    assert np.isfinite(float(loss))
    np.testing.assert_allclose(loss, metrics["visual_loss"] + 0.005 * metrics["text_loss"], rtol=1e-6)
    assert set(metrics) >= {"caption_text_loss", "vqa_token_acc", "diffusion_mse", "frac_t2i"}


def test_gen_embeddings_follow_the_order_by_hand(setup):
    cfg, batch, params = setup
    p = params["params"]
    n = cfg.n_img
    rng = np.random.default_rng(3)
    tokens = rng.normal(size=(2, n, cfg.token_dim)).astype(np.float32)
    order = np.stack([rng.permutation(n), np.arange(n)]).astype(np.int32)
    got = np.asarray(U(cfg).apply(params, jnp.asarray(tokens), jnp.asarray(order), method=U.gen_embeddings))
    w, b_ = np.asarray(p["img_in"]["kernel"]), np.asarray(p["img_in"]["bias"])
    pos, nxt, boi = (np.asarray(p[k]) for k in ("pos2d", "next_pos2d", "boi"))
    for b in range(2):
        o = order[b]
        np.testing.assert_allclose(got[b, 0], boi + nxt[o[0]], atol=1e-6)  # BOI gets next_pos2d[p(0)]
        for k in range(n):
            want = tokens[b, o[k]] @ w + b_ + pos[o[k]] + (nxt[o[k + 1]] if k + 1 < n else 0.0)
            np.testing.assert_allclose(got[b, 1 + k], want, atol=1e-5)


def test_loss_targets_follow_the_order(setup, monkeypatch):
    """BOI's output is trained toward token p(0), image slot k's output toward token p(k+1)."""
    cfg, batch, params = setup
    n = cfg.n_img
    perm = np.random.default_rng(5).permutation(n).astype(np.int32)
    monkeypatch.setattr(order_lib, "sample_orders", lambda *a, **k: jnp.asarray(perm)[None])
    seen = {}
    real = unifluid.diffusion_lib.diffusion_loss_terms

    def spy(fn, params_, z, target, t, noise, diffusion):
        seen.update(z=z, target=target)
        return real(fn, params_, z, target, t, noise, diffusion)

    monkeypatch.setattr(unifluid.diffusion_lib, "diffusion_loss_terms", spy)
    model = U(cfg)
    model.apply(params, batch, jax.random.PRNGKey(0), 0, 100, method=U.loss)

    b, g = batch["gen_start"].shape
    tokens = model.apply(params, batch["image_gen"].reshape(b * g, 64, 64, 3), method=U.image_tokens)
    tokens = tokens.reshape(b, g, n, -1)
    orders = jnp.broadcast_to(jnp.asarray(perm), (b, g, n))
    h = model.apply(params, batch, model.apply(params, batch, tokens, orders, method=U.embed_rows),
                    method=U.forward_rows)
    m = cfg.diffusion.batch_mul
    z = np.asarray(seen["z"]).reshape(b, g, m, n, -1)[:, :, 0]
    target = np.asarray(seen["target"]).reshape(b, g, m, n, -1)[:, :, 0]
    starts = np.asarray(batch["gen_start"])
    np.testing.assert_array_equal(starts[:, 0] >= 0, [1, 0, 0, 1])  # t2i, edit rows generate
    for r in (0, 3):
        for k in range(n):  # slot gen_start + k is BOI (k = 0) or image token p(k-1); it predicts p(k)
            np.testing.assert_allclose(z[r, 0, k], h[r, starts[r, 0] + k], atol=1e-5)
            np.testing.assert_array_equal(target[r, 0, k], tokens[r, 0, perm[k]])


def test_text_dropout_moved_to_the_data_config():
    section = dict(llm=dict(variant="gemma2_tiny", vocab_size=64, num_layers=2), vae=dict(preset="tiny_f8"),
                   diffusion=dict(depth=2, width=32), text_dropout=0.1)
    with pytest.raises(ConfigError, match="model.text_dropout.*data.text_dropout"):
        unifluid.validate_config(section)


def test_train_step_sharded_matches_single_device(mesh1, mesh8):
    cfg = tiny_config()
    batch = rows(cfg, make_batch(tasks=("t2i", "caption", "vqa", "edit") * 2))
    model = U(cfg)

    def run(mesh):
        with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
            abstract = jax.eval_shape(lambda r: model.init(r, batch, method=U.init_all), jax.random.PRNGKey(0))
            shardings = sharding.param_shardings(mesh, abstract)
            params = sharding.jit_once(lambda r: model.init(r, batch, method=U.init_all), out_shardings=shardings)(
                jax.random.PRNGKey(0))
            b = jax.device_put(batch, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp"))))
            step = jax.jit(jax.value_and_grad(
                lambda p, b: model.apply(p, b, jax.random.PRNGKey(2), 10, 100, method=U.loss)[0]))
            loss, grads = step(params, b)
            return params, loss, jax.device_get(nn.unbox(grads))

    p8, loss8, g8 = run(mesh8)
    _, loss1, g1 = run(mesh1)
    emb = p8["params"]["llm"]["embedder"]["input_embedding"].value
    assert emb.addressable_shards[0].data.shape == (64 // 2, 64 // 2)  # vocab on tensor, embed on fsdp
    np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), g8, g1)


@pytest.mark.slow
def test_overfit_eight_examples():
    """4 t2i + 4 caption fixed examples: text loss falls >= 10x and visual loss >= 3x."""
    cfg = tiny_config(order_mode="raster", diffusion=dict(depth=2, width=64, batch_mul=4))
    batch = rows(cfg, make_batch(tasks=("t2i",) * 4 + ("caption",) * 4, seed=1))
    model = U(cfg)
    params = _init(cfg, batch)
    opt = optax.adam(2e-3)
    state = opt.init(params)

    @jax.jit
    def step(params, state, rng):
        (loss, m), g = jax.value_and_grad(
            lambda p: model.apply(p, batch, rng, 0, 1, method=U.loss), has_aux=True)(params)
        updates, state = opt.update(g, state)
        return optax.apply_updates(params, updates), state, m

    curve = []
    for i in range(300):
        params, state, m = step(params, state, jax.random.PRNGKey(i))
        curve.append((float(m["text_loss"]), float(m["visual_loss"])))
    first = np.mean(curve[:5], axis=0)
    last = np.mean(curve[-20:], axis=0)
    print("overfit curve (text, visual) every 50 steps:", [tuple(np.round(c, 3)) for c in curve[::50]], last)
    assert last[0] <= first[0] / 10, (first, last)
    assert last[1] <= first[1] / 3, (first, last)


def test_bad_batches(setup):
    cfg, batch, _ = setup
    with pytest.raises(ValueError, match="image_gen.*model.vae.image_size=64"):
        unifluid.check_batch(cfg, {**batch, "image_gen": np.zeros((4, 1, 32, 32, 3), np.float32)})
    with pytest.raises(ValueError, match="image_und"):
        unifluid.check_batch(cfg, {**batch, "image_und": np.zeros((4, 1, 64, 64, 3), np.float32)})
    with pytest.raises(ValueError, match="laid-out row fields.*segment_ids"):
        unifluid.check_batch(cfg, {k: v for k, v in batch.items() if k != "segment_ids"})
    with pytest.raises(ValueError, match="outside the vocabulary"):
        unifluid.check_batch(cfg, {**batch, "tokens": np.full(batch["tokens"].shape, 64, np.int32)})
    with pytest.raises(ValueError, match="outside the vocabulary"):
        unifluid.check_batch(cfg, {**batch, "tgt_label": np.full(batch["tgt_label"].shape, 64, np.int32)})
