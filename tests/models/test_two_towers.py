"""SigLIP two towers: the sigmoid loss against a float64 hand computation, the image tower's param tree is
models/siglip.SigLIP's, text pooling, sharding, config errors."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unifluid_jax.config import ConfigError
from unifluid_jax.models import siglip, two_towers
from unifluid_jax.train import sharding

SECTION = {"image": {"variant": "tiny/8", "pool": "map"}, "text": {"variant": "tiny", "vocab_size": 32}}
CFG = two_towers.config_from_dict(SECTION)
L = 12


def _inputs(b=4, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.uniform(-1, 1, (b, 32, 32, 3)).astype(np.float32),
            rng.integers(0, 32, (b, L)).astype(np.int32))


@pytest.fixture(scope="module")
def params():
    images, tokens = _inputs(1)
    return jax.jit(two_towers.TwoTowers(CFG).init)(jax.random.key(0), images, tokens)  # boxed


def _np_sigmoid_loss(zimg, ztxt, t, b):
    """SPEC 11 by hand in float64: labels +1 on the diagonal, -1 elsewhere, -sum(log sigmoid(l * z)) / n."""
    zimg, ztxt = np.float64(zimg), np.float64(ztxt)
    n = len(zimg)
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = t * float(zimg[i] @ ztxt[j]) + b
            label = 1.0 if i == j else -1.0
            total += -np.log(1.0 / (1.0 + np.exp(-label * z)))
    return total / n


def test_sigmoid_loss_matches_hand_computation():
    rng = np.random.default_rng(1)
    zimg = rng.normal(size=(5, 8)).astype(np.float32)
    ztxt = zimg + 0.5 * rng.normal(size=(5, 8)).astype(np.float32)  # positives aligned, so the sign matters
    zimg /= np.linalg.norm(zimg, axis=1, keepdims=True)
    ztxt /= np.linalg.norm(ztxt, axis=1, keepdims=True)
    for t, b in [(10.0, -10.0), (3.0, 0.5), (1.0, 2.0)]:
        got = float(two_towers.sigmoid_loss(jnp.asarray(zimg), jnp.asarray(ztxt), t, b))
        want = _np_sigmoid_loss(zimg, ztxt, t, b)
        assert abs(got - want) <= 1e-5 * max(1.0, abs(want)), (t, b, got, want)
    # Swapping one pair's text makes two positives negatives: the loss must rise.
    swapped = ztxt[[1, 0, 2, 3, 4]]
    assert float(two_towers.sigmoid_loss(zimg, swapped, 3.0, 0.5)) > _np_sigmoid_loss(zimg, ztxt, 3.0, 0.5) + 0.1


def test_model_outputs_and_init(params):
    images, tokens = _inputs(4)
    zimg, ztxt, t, b = jax.jit(two_towers.TwoTowers(CFG).apply)(params, images, tokens)
    assert zimg.shape == (4, 32) and ztxt.shape == (4, 32) and zimg.dtype == jnp.float32
    np.testing.assert_allclose(np.linalg.norm(zimg, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(ztxt, axis=1), 1.0, atol=1e-5)
    assert abs(float(t) - 10.0) < 1e-4 and float(b) == -10.0  # t = exp(log 10), b = -10 at init
    p = nn.unbox(params)["params"]
    np.testing.assert_allclose(p["t"], np.log(10.0), rtol=1e-6)
    # The image embedding is exactly SigLIP's MAP output, normalised (no projection head in the image tower).
    _, pooled = siglip.SigLIP(CFG.image).apply({"params": p["img"]}, images)
    np.testing.assert_allclose(zimg, pooled / np.linalg.norm(pooled, axis=1, keepdims=True), atol=1e-5)


def test_image_tower_is_siglip(params):
    images, _ = _inputs(1)
    ref = jax.eval_shape(siglip.SigLIP(CFG.image).init, jax.random.key(1), images)["params"]
    got = params["params"]["img"]
    assert jax.tree.structure(nn.unbox(got)) == jax.tree.structure(nn.unbox(ref))
    for a, b in zip(jax.tree.leaves(nn.unbox(got)), jax.tree.leaves(nn.unbox(ref))):
        assert a.shape == b.shape and a.dtype == b.dtype
    # Logical names too (so the tower shards like UniFluid's siglip).
    assert nn.get_partition_spec(got) == nn.get_partition_spec(ref)


def test_text_tower_pooling(params):
    _, tokens = _inputs(3)
    p = {"params": nn.unbox(params)["params"]["txt"]}
    tower = two_towers.TextTransformer(CFG.text, 32)
    apply = jax.jit(tower.apply)
    pooled, emb = apply(p, tokens)
    assert pooled.shape == (3, 64) and emb.shape == (3, 32)
    # 'last' reads the last position; no mask, so a token anywhere changes it.
    changed = tokens.copy()
    changed[:, 0] = (changed[:, 0] + 1) % 32
    assert np.abs(np.asarray(apply(p, changed)[0]) - np.asarray(pooled)).max() > 1e-4
    head = p["params"]["head"]
    np.testing.assert_allclose(emb, pooled @ nn.unbox(head["kernel"]) + nn.unbox(head["bias"]), atol=1e-5)
    map_cfg = two_towers.config_from_dict({**SECTION, "text": {**SECTION["text"], "pool": "map"}})
    tower = two_towers.TextTransformer(map_cfg.text, 32)
    pm = jax.jit(tower.init)(jax.random.key(0), tokens)
    assert "MAPHead_0" in pm["params"] and jax.jit(tower.apply)(pm, tokens)[1].shape == (3, 32)
    with pytest.raises(ValueError, match=r"expected \[B, T\] int ids"):
        tower.apply(pm, tokens.astype(np.float32))


def test_sharded_matches_single_device(params, mesh8):
    images, tokens = _inputs(8)
    params = nn.unbox(params)
    m = two_towers.TwoTowers(CFG)
    ref = jax.jit(m.apply)(params, images, tokens)
    shardings = sharding.param_shardings(mesh8, jax.eval_shape(m.init, jax.random.key(0), images, tokens))
    with jax.set_mesh(mesh8), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        sharded = jax.device_put(params, shardings)
        emb = sharded["params"]["txt"]["Embed_0"]["embedding"]
        assert emb.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
        out = jax.jit(m.apply)(sharded, images, tokens)
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(out)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_validate_config():
    two_towers.validate_config(SECTION, "model")
    for section, match in [
            ({**SECTION, "image": {"variant": "tiny/8"}}, "model.image.pool"),
            ({**SECTION, "image": {"variant": "H/14", "pool": "map"}}, "model.image.variant"),
            ({**SECTION, "text": {"variant": "huge"}}, "model.text.variant"),
            ({**SECTION, "text": {"variant": "tiny", "pool": "gap"}}, "model.text.pool"),
            ({**SECTION, "text": {"variant": "tiny", "num_heads": 3}}, "model.text.num_heads"),
            ({**SECTION, "text": {"variant": "tiny", "widht": 3}}, "model.text.widht"),
            ({**SECTION, "temperature_init": 0.0}, "model.temperature_init"),
            ({**SECTION, "out_dim": 7}, "model.out_dim"),
            ({"text": SECTION["text"]}, "model.image")]:
        with pytest.raises(ConfigError, match=match):
            two_towers.validate_config(section, "model")
