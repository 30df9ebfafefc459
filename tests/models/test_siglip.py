"""SigLIP: parity with transformers SiglipVisionModel, big_vision layouts, scan/remat, sharding, input errors."""
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from unifluid_jax.config import ConfigError
from unifluid_jax.convert import siglip as convert
from unifluid_jax.models import siglip
from unifluid_jax.train import sharding

CFG = siglip.get_config("tiny/8", pool="map")  # 32 px, 4x4 = 16 tokens, width 32, depth 2, 2 heads


@pytest.fixture(scope="module")
def reference():
    from transformers import SiglipVisionConfig, SiglipVisionModel
    hf_cfg = SiglipVisionConfig(**convert.hf_config(CFG))
    assert hf_cfg.vision_use_head and hf_cfg.hidden_act == "gelu_pytorch_tanh"
    torch.manual_seed(0)
    tm = SiglipVisionModel(hf_cfg).eval()
    with torch.no_grad():  # perturb so norms/biases are not at their trivial init
        for p in tm.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = _images(4)
    with torch.no_grad():
        out = tm(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
    return tm, convert.from_hf(tm.state_dict(), CFG), x, out.last_hidden_state.numpy(), out.pooler_output.numpy()


def _images(b=2, size=32, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (b, size, size, 3)).astype(np.float32)


def _apply(cfg):
    return jax.jit(siglip.SigLIP(cfg).apply)


def test_matches_transformers(reference):
    _, params, x, tokens_ref, pooled_ref = reference
    tokens, pooled = _apply(CFG)(params, x)
    assert tokens.shape == (4, 16, 32) and pooled.shape == (4, 32)
    np.testing.assert_allclose(tokens, tokens_ref, atol=1e-4, rtol=0)
    np.testing.assert_allclose(pooled, pooled_ref, atol=1e-4, rtol=0)


def _bv_reference(sd, cfg, scanned):
    """The big_vision checkpoint layout written out by hand from the HF tensors (SPEC section 3 names)."""
    d, n, h = cfg.width, cfg.num_heads, cfg.head_dim
    t = {k: v.numpy() for k, v in sd.items()}
    bv = {"img/embedding/kernel": t["embeddings.patch_embedding.weight"].transpose(2, 3, 1, 0),
          "img/embedding/bias": t["embeddings.patch_embedding.bias"],
          "img/pos_embedding": t["embeddings.position_embedding.weight"][None],
          "img/Transformer/encoder_norm/scale": t["post_layernorm.weight"],
          "img/Transformer/encoder_norm/bias": t["post_layernorm.bias"],
          "img/head/kernel": np.zeros((d, 7), np.float32),  # PaliGemma-style projection: not the encoder's
          "img/head/bias": np.zeros((7,), np.float32),
          "txt/Encoder_0/foo": np.zeros((3,), np.float32)}  # other towers are ignored

    def attn(prefix, get):
        out = {}
        for name, (w, b) in get.items():
            if name == "out":
                out[f"{prefix}/out/kernel"], out[f"{prefix}/out/bias"] = w.T.reshape(n, h, d), b
            else:
                out[f"{prefix}/{name}/kernel"] = w.T.reshape(d, n, h)
                out[f"{prefix}/{name}/bias"] = b.reshape(n, h)
        return out

    def mlp(prefix, src):
        return {f"{prefix}/Dense_0/kernel": t[f"{src}.fc1.weight"].T, f"{prefix}/Dense_0/bias": t[f"{src}.fc1.bias"],
                f"{prefix}/Dense_1/kernel": t[f"{src}.fc2.weight"].T, f"{prefix}/Dense_1/bias": t[f"{src}.fc2.bias"]}

    layers = []
    for i in range(cfg.depth):
        s = f"encoder.layers.{i}"
        layer = {"LayerNorm_0/scale": t[f"{s}.layer_norm1.weight"], "LayerNorm_0/bias": t[f"{s}.layer_norm1.bias"],
                 "LayerNorm_1/scale": t[f"{s}.layer_norm2.weight"], "LayerNorm_1/bias": t[f"{s}.layer_norm2.bias"]}
        layer |= attn("MultiHeadDotProductAttention_0", {
            k: (t[f"{s}.self_attn.{k[0]}_proj.weight" if k != "out" else f"{s}.self_attn.out_proj.weight"],
                t[f"{s}.self_attn.{k[0]}_proj.bias" if k != "out" else f"{s}.self_attn.out_proj.bias"])
            for k in ("query", "key", "value", "out")})
        layer |= mlp("MlpBlock_0", f"{s}.mlp")
        layers.append(layer)
    if scanned:
        bv |= {f"img/Transformer/encoderblock/{k}": np.stack([l[k] for l in layers]) for k in layers[0]}
    else:
        bv |= {f"img/Transformer/encoderblock_{i}/{k}": v for i, l in enumerate(layers) for k, v in l.items()}
    wq, wk, wv = np.split(t["head.attention.in_proj_weight"], 3)
    bq, bk, bv_ = np.split(t["head.attention.in_proj_bias"], 3)
    bv |= attn("img/MAPHead_0/MultiHeadDotProductAttention_0", {
        "query": (wq, bq), "key": (wk, bk), "value": (wv, bv_),
        "out": (t["head.attention.out_proj.weight"], t["head.attention.out_proj.bias"])})
    bv |= mlp("img/MAPHead_0/MlpBlock_0", "head.mlp")
    bv |= {"img/MAPHead_0/probe": t["head.probe"], "img/MAPHead_0/LayerNorm_0/scale": t["head.layernorm.weight"],
           "img/MAPHead_0/LayerNorm_0/bias": t["head.layernorm.bias"]}
    return bv


@pytest.mark.parametrize("scanned", [False, True])
def test_big_vision_layouts(reference, scanned):
    tm, params, x, tokens_ref, pooled_ref = reference
    converted = convert.from_big_vision(_bv_reference(tm.state_dict(), CFG, scanned), CFG)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(converted)):
        np.testing.assert_array_equal(a, b)
    assert jax.tree.structure(params) == jax.tree.structure(converted)
    tokens, pooled = _apply(CFG)(converted, x)
    np.testing.assert_allclose(tokens, tokens_ref, atol=1e-4, rtol=0)
    np.testing.assert_allclose(pooled, pooled_ref, atol=1e-4, rtol=0)


def test_looped_layout_and_remat_match(reference):
    _, params, x, tokens_ref, pooled_ref = reference
    looped = dataclasses.replace(CFG, scan_layers=False)
    lp = convert.set_layout(params, scan_layers=False)
    assert "encoderblock_1" in lp["params"]["Transformer"]
    tokens, pooled = _apply(looped)(lp, x)
    np.testing.assert_allclose(tokens, tokens_ref, atol=1e-4, rtol=0)
    # Remat changes memory, not values: same loss and grads as without it.
    remat = dataclasses.replace(CFG, remat_policy="dots_with_no_batch_dims_saveable")

    def loss(cfg, p):
        t, pooled = siglip.SigLIP(cfg).apply(p, x)
        return jnp.mean(t ** 2) + jnp.mean(pooled ** 2)

    g0 = jax.jit(jax.grad(functools.partial(loss, CFG)))(params)
    g1 = jax.jit(jax.grad(functools.partial(loss, remat)))(params)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)


def test_pool_none_and_bf16(reference):
    _, params, x, tokens_ref, _ = reference
    cfg = dataclasses.replace(CFG, pool="none")
    p = {"params": {k: v for k, v in params["params"].items() if k != "MAPHead_0"}}
    tokens, pooled = _apply(cfg)(p, x)
    assert pooled is None
    np.testing.assert_allclose(tokens, tokens_ref, atol=1e-4, rtol=0)
    tokens16, _ = _apply(dataclasses.replace(cfg, dtype="bfloat16"))(p, x)
    assert tokens16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(tokens16, np.float32), tokens_ref, atol=0.15)


def test_variants():
    for name, n, d, depth in [("B/16", 196, 768, 12), ("So400m/14", 256, 1152, 27)]:
        cfg = siglip.get_config(name)
        assert cfg.num_patches == n and cfg.width == d and cfg.depth == depth
    cfg = siglip.get_config("So400m/14")
    x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    variables = jax.eval_shape(siglip.SigLIP(cfg).init, jax.random.key(0), x)
    tokens, pooled = jax.eval_shape(siglip.SigLIP(cfg).apply, variables, x)
    assert tokens.shape == (1, 256, 1152) and pooled is None
    count = sum(np.prod(p.shape) for p in jax.tree.leaves(nn.unbox(variables)))
    assert 395e6 < count < 420e6, count  # So400m without the MAP head: ~400M


def test_sharded_matches_single_device(reference, mesh8):
    _, params, x, _, _ = reference
    m = siglip.SigLIP(CFG)
    ref = jax.jit(m.apply)(params, x)
    shardings = sharding.param_shardings(mesh8, jax.eval_shape(m.init, jax.random.key(0), x))
    with jax.set_mesh(mesh8), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        sharded = jax.device_put(params, shardings)
        q = sharded["params"]["Transformer"]["encoderblock"]["MultiHeadDotProductAttention_0"]["query"]["kernel"]
        assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
        out = jax.jit(m.apply)(sharded, x)
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(out)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_bad_inputs(reference):
    _, params, _, _, _ = reference
    apply = siglip.SigLIP(CFG).apply
    with pytest.raises(ValueError, match=r"expected \[B, 32, 32, 3\] float in \[-1, 1\], got shape \(2, 64, 64, 3\)"):
        apply(params, _images(2, 64))
    with pytest.raises(ValueError, match=r"expected \[B, 32, 32, 3\].*got shape \(2, 32, 32, 4\)"):
        apply(params, np.zeros((2, 32, 32, 4), np.float32))
    with pytest.raises(ValueError, match=r"expected \[B, 32, 32, 3\].*got dtype uint8"):
        apply(params, np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match=r"got shape \(32, 32, 3\)"):  # checked at trace time under jit too
        jax.jit(apply)(params, np.zeros((32, 32, 3), np.float32))


def test_validate_config():
    siglip.validate_config({"variant": "So400m/14"}, "siglip")
    siglip.validate_config({"variant": "tiny/8", "pool": "map", "remat_policy": "checkpoint_dots"}, "siglip")
    for section, match in [({"variant": "H/14"}, "siglip.variant"),
                           ({"variant": "B/16", "pool": "gap"}, "siglip.pool"),
                           ({"variant": "B/16", "num_heads": 7}, "siglip.num_heads"),
                           ({"variant": "B/16", "image_size": 225}, "siglip.image_size"),
                           ({"variant": "B/16", "remat_policy": "some"}, "siglip.remat_policy"),
                           ({"variant": "B/16", "widht": 3}, "siglip.widht"),
                           ({"variant": "B/16", "dtype": "int32"}, "siglip.dtype")]:
        with pytest.raises(ConfigError, match=match):
            siglip.validate_config(section, "siglip")
    assert siglip.config_from_dict({"variant": "B/16", "pool": "map"}) == siglip.get_config("B/16", pool="map")
