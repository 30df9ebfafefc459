"""Gemma conversion: HF <-> project round trip, official Flax / big_vision import, bad checkpoints."""
import flax.linen as nn
import jax
import numpy as np
import pytest
import torch
import transformers

from unifluid_jax.convert import gemma as conv
from unifluid_jax.models import gemma


def tiny_hf(kind="gemma2", **kw):
    base = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, attn_implementation="eager")
    if kind == "gemma2":
        base.update(sliding_window=4, query_pre_attn_scalar=16)
    base.update(kw)
    torch.manual_seed(1)
    cls, cfg_cls = ((transformers.Gemma2ForCausalLM, transformers.Gemma2Config) if kind == "gemma2"
                    else (transformers.GemmaForCausalLM, transformers.GemmaConfig))
    model = cls(cfg_cls(**base))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model.eval()


def np_state_dict(model):
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.shape == y.shape and x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("kind,scan", [("gemma2", True), ("gemma2", False), ("gemma", True)])
def test_hf_round_trip_exact(kind, scan):
    model = tiny_hf(kind, num_key_value_heads=1) if kind == "gemma" else tiny_hf(kind)
    cfg = conv.config_from_hf(model.config, scan_layers=scan)
    sd = np_state_dict(model)
    params = conv.params_from_hf(model.state_dict(), cfg)  # torch tensors in
    # the converted tree has exactly the shapes and dtypes of a fresh init of the same config
    ref = nn.unbox(jax.eval_shape(lambda: gemma.init_params(gemma.Gemma(cfg), jax.random.key(0))))
    assert jax.tree.map(lambda x: (x.shape, x.dtype), params) == jax.tree.map(lambda x: (x.shape, x.dtype), ref)
    back = conv.params_to_hf(params, cfg)
    assert sorted(back) == sorted(sd)
    for k in sd:
        assert back[k].shape == sd[k].shape and back[k].dtype == sd[k].dtype, k
        np.testing.assert_array_equal(back[k], sd[k], err_msg=k)
    # and the exported dict loads into HF strictly
    fresh = type(model)(model.config)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)


def test_bf16_torch_tensors_convert_exactly():
    model = tiny_hf("gemma2").to(torch.bfloat16)
    cfg = conv.config_from_hf(model.config, param_dtype="bfloat16")
    params = conv.params_from_hf(model.state_dict(), cfg)
    back = conv.params_to_hf(params, cfg)
    w = model.state_dict()["model.layers.1.self_attn.o_proj.weight"]
    np.testing.assert_array_equal(back["model.layers.1.self_attn.o_proj.weight"].astype(np.float32),
                                  w.float().numpy())


def test_save_pretrained_folder_both_ways(tmp_path):
    model = tiny_hf("gemma2")
    cfg = conv.config_from_hf(model.config)
    model.save_pretrained(tmp_path / "hf")
    params = conv.load_hf_checkpoint(str(tmp_path / "hf"), cfg)
    assert_trees_equal(params, conv.params_from_hf(model.state_dict(), cfg))
    conv.save_hf_checkpoint(params, cfg, str(tmp_path / "ours"))
    reloaded = transformers.Gemma2ForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager")
    assert conv.config_from_hf(reloaded.config) == cfg
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(reloaded.state_dict()[k].numpy(), v.numpy(), err_msg=k)


# ---------------------------------------------------------------- official Flax / big_vision layouts

def _layer_tensors(sd, cfg, i, gating_layout, fused_qkv):
    """The official per-layer tensors, written directly from HF weights (independently of conv)."""
    n, k, h, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.width
    p = f"model.layers.{i}."
    heads = lambda name, m: sd[f"{p}self_attn.{name}.weight"].reshape(m, h, d).transpose(0, 2, 1)
    gating = np.stack([sd[f"{p}mlp.gate_proj.weight"], sd[f"{p}mlp.up_proj.weight"]])  # (2, F, D)
    out = {
        "attn/attn_vec_einsum/w": sd[f"{p}self_attn.o_proj.weight"].reshape(d, n, h).transpose(1, 2, 0),
        "mlp/gating_einsum/w": gating.transpose(0, 2, 1) if gating_layout == "DF" else gating,
        "mlp/linear/w": sd[f"{p}mlp.down_proj.weight"].T,
        "pre_attention_norm/scale": sd[f"{p}input_layernorm.weight"],
    }
    if fused_qkv:
        out["attn/qkv_einsum/w"] = np.stack([heads("q_proj", n), heads("k_proj", k), heads("v_proj", k)])
    else:
        out["attn/q_einsum/w"] = heads("q_proj", n)
        out["attn/kv_einsum/w"] = np.stack([heads("k_proj", k), heads("v_proj", k)])
    if cfg.post_norms:
        out.update({"post_attention_norm/scale": sd[f"{p}post_attention_layernorm.weight"],
                    "pre_ffw_norm/scale": sd[f"{p}pre_feedforward_layernorm.weight"],
                    "post_ffw_norm/scale": sd[f"{p}post_feedforward_layernorm.weight"]})
    else:
        out["pre_ffw_norm/scale"] = sd[f"{p}post_attention_layernorm.weight"]
    return out


def _padded_embedding(sd, rows=128):
    e = sd["model.embed_tokens.weight"]
    return np.concatenate([e, np.random.RandomState(0).randn(rows, e.shape[1]).astype(e.dtype)])


def to_official(sd, cfg, gating_layout, fused_qkv=False):
    """Nested orbax-style tree {'transformer': {'layer_0': {'attn': {'q_einsum': {'w': ...}}}}}."""
    flat = {"transformer/embedder/input_embedding": _padded_embedding(sd),
            "transformer/final_norm/scale": sd["model.norm.weight"]}
    for i in range(cfg.num_layers):
        for name, arr in _layer_tensors(sd, cfg, i, gating_layout, fused_qkv).items():
            flat[f"transformer/layer_{i}/{name}"] = arr
    tree = {}
    for key, arr in flat.items():
        node = tree
        *parents, leaf = key.split("/")
        for q in parents:
            node = node.setdefault(q, {})
        node[leaf] = arr
    return tree


def to_big_vision(sd, cfg, gating_layout):
    per_layer = [_layer_tensors(sd, cfg, i, gating_layout, False) for i in range(cfg.num_layers)]
    flat = {f"params/llm/layers/{name}": np.stack([lt[name] for lt in per_layer]) for name in per_layer[0]}
    flat["params/llm/embedder/input_embedding"] = _padded_embedding(sd)
    flat["params/llm/final_norm/scale"] = sd["model.norm.weight"]
    return flat


@pytest.mark.parametrize("gating_layout", ["DF", "FD"])
def test_official_flax_and_big_vision_import_equal_hf_import(gating_layout):
    model = tiny_hf("gemma2")
    cfg = conv.config_from_hf(model.config)
    sd = np_state_dict(model)
    from_hf = conv.params_from_hf(sd, cfg)
    assert_trees_equal(conv.params_from_flax(to_official(sd, cfg, gating_layout), cfg), from_hf)
    assert_trees_equal(conv.params_from_big_vision(to_big_vision(sd, cfg, gating_layout), cfg), from_hf)
    # unscanned target layout too
    cfg_u = conv.config_from_hf(model.config, scan_layers=False)
    assert_trees_equal(conv.params_from_big_vision(to_big_vision(sd, cfg, gating_layout), cfg_u),
                       conv.params_from_hf(sd, cfg_u))


def test_official_flax_fused_qkv_gemma1():
    model = tiny_hf("gemma", num_key_value_heads=4, num_hidden_layers=2)  # K == N: qkv_einsum
    cfg = conv.config_from_hf(model.config)
    sd = np_state_dict(model)
    tree = to_official(sd, cfg, "FD", fused_qkv=True)
    assert tree["transformer"]["layer_0"]["attn"]["qkv_einsum"]["w"].shape == (3, 4, 64, 16)
    assert_trees_equal(conv.params_from_flax(tree, cfg), conv.params_from_hf(sd, cfg))


# ------------------------------------------------------------------------------------------ bad input

def test_missing_and_misshaped_tensors_are_named():
    model = tiny_hf("gemma2")
    cfg = conv.config_from_hf(model.config)
    sd = np_state_dict(model)
    name = "model.layers.2.mlp.up_proj.weight"
    missing = {k: v for k, v in sd.items() if k != name}
    with pytest.raises(conv.CheckpointError, match=rf"missing tensor '{name}' \(expected shape \(96, 64\)\)"):
        conv.params_from_hf(missing, cfg)
    bad = dict(sd, **{"model.layers.1.self_attn.k_proj.weight": np.zeros((64, 64), np.float32)})
    with pytest.raises(conv.CheckpointError, match=r"'model\.layers\.1\.self_attn\.k_proj\.weight' has shape "
                                                   r"\(64, 64\) but the config expects \(32, 64\)"):
        conv.params_from_hf(bad, cfg)
    with pytest.raises(conv.CheckpointError, match=r"unexpected tensor.*model\.layers\.2"):
        conv.params_from_hf(sd, conv.config_from_hf(model.config, num_layers=2))
    flat = to_big_vision(sd, cfg, "FD")
    flat["params/llm/layers/attn/q_einsum/w"] = flat["params/llm/layers/attn/q_einsum/w"][:3]
    with pytest.raises(conv.CheckpointError, match=r"'layers/attn/q_einsum/w' has shape \(3, 4, 64, 16\) but "
                                                   r"the config expects \(4, 4, 64, 16\)"):
        conv.params_from_big_vision(flat, cfg)
    tree = to_official(sd, cfg, "FD")
    del tree["transformer"]["final_norm"]
    with pytest.raises(conv.CheckpointError, match=r"missing tensor 'final_norm/scale' \(expected shape \(64,\)\)"):
        conv.params_from_flax(tree, cfg)
