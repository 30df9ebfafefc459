"""Gemma conversion: HF <-> project round trip, official Flax / big_vision import, bad checkpoints."""
import flax.linen as nn
import jax
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util

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
    return traverse_util.unflatten_dict(flat, sep="/")


# big_vision's Gemma params, declared as google-research/big_vision big_vision/models/ppp/gemma.py declares them
# (Einsum.param('w'), RMSNorm.param('scale'), Embedder.param('input_embedding'), FeedForward.param(
# 'gating_einsum', (2, features, hidden_dim)) and .param('linear', (hidden_dim, features)), Block submodule
# names, nn.scan(variable_axes={'params': 0}) under 'layers' or layers/<i> unscanned). Only the declarations:
# the tree Flax builds from them is what big_vision writes, and the fixture below must have exactly that tree.

class _BVEinsum(nn.Module):
    shape: tuple

    @nn.compact
    def __call__(self):
        return self.param("w", nn.initializers.normal(), self.shape)


class _BVBlock(nn.Module):
    n: int
    k: int
    d: int
    h: int
    f: int

    @nn.compact
    def __call__(self, x, _):
        _Norm(name="pre_attention_norm")(self.d)
        attn = _Attn(self.n, self.k, self.d, self.h, name="attn")
        attn()
        _Norm(name="pre_ffw_norm")(self.d)
        _FF(self.d, self.f, name="mlp")()
        return x, None


class _Norm(nn.Module):
    @nn.compact
    def __call__(self, d):
        return self.param("scale", nn.initializers.normal(), (d,))


class _Attn(nn.Module):
    n: int
    k: int
    d: int
    h: int

    @nn.compact
    def __call__(self):
        if self.k == self.n:
            _BVEinsum((3, self.n, self.d, self.h), name="qkv_einsum")()
        else:
            _BVEinsum((self.n, self.d, self.h), name="q_einsum")()
            _BVEinsum((2, self.k, self.d, self.h), name="kv_einsum")()
        _BVEinsum((self.n, self.h, self.d), name="attn_vec_einsum")()


class _FF(nn.Module):
    d: int
    f: int

    @nn.compact
    def __call__(self):
        self.param("gating_einsum", nn.initializers.normal(), (2, self.d, self.f))
        self.param("linear", nn.initializers.normal(), (self.f, self.d))


class _BVLayers(nn.Module):  # unscanned: layers/<i>
    depth: int
    kw: dict

    @nn.compact
    def __call__(self, x):
        for i in range(self.depth):
            x, _ = _BVBlock(**self.kw, name=str(i))(x, None)
        return x


class _BVModel(nn.Module):
    cfg: gemma.GemmaConfig
    scan: bool

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        _Embedder(c.vocab_size, c.width, name="embedder")()
        kw = dict(n=c.num_heads, k=c.num_kv_heads, d=c.width, h=c.head_dim, f=c.mlp_dim)
        if self.scan:
            nn.scan(_BVBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=c.num_layers)(
                **kw, name="layers")(x, None)
        else:
            _BVLayers(c.num_layers, kw, name="layers")(x)
        _Norm(name="final_norm")(c.width)


class _Embedder(nn.Module):
    v: int
    d: int

    @nn.compact
    def __call__(self):
        self.param("input_embedding", nn.initializers.normal(), (self.v, self.d))


def big_vision_shapes(cfg, scan=True):
    """{'layers/mlp/linear': shape, ...}: the param tree big_vision's declarations produce for this config."""
    tree = jax.eval_shape(_BVModel(cfg, scan).init, jax.random.PRNGKey(0), np.zeros((1,)))["params"]
    return {jax.tree_util.keystr(p, simple=True, separator="/"): x.shape
            for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def to_big_vision(sd, cfg, scan=True):
    """big_vision params written from HF weights (independently of conv): gating (2, D, F), no '/w' on the
    MLP, qkv_einsum when K == N; under 'params/llm' as in a PaliGemma checkpoint."""
    fused = cfg.num_kv_heads == cfg.num_heads
    per_layer = [{k.removesuffix("/w") if k.startswith("mlp/") else k: v
                  for k, v in _layer_tensors(sd, cfg, i, "DF", fused).items()} for i in range(cfg.num_layers)]
    if scan:
        flat = {f"layers/{name}": np.stack([lt[name] for lt in per_layer]) for name in per_layer[0]}
    else:
        flat = {f"layers/{i}/{name}": v for i, lt in enumerate(per_layer) for name, v in lt.items()}
    flat["embedder/input_embedding"] = sd["model.embed_tokens.weight"]
    flat["final_norm/scale"] = sd["model.norm.weight"]
    return {f"params/llm/{k}": v for k, v in flat.items()}


@pytest.mark.parametrize("kv_heads", [2, 4], ids=["q+kv", "qkv"])
@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unscanned"])
def test_big_vision_import_and_export(kv_heads, scan):
    model = tiny_hf("gemma", num_key_value_heads=kv_heads, num_hidden_layers=2)  # big_vision's Gemma is Gemma-1
    cfg = conv.config_from_hf(model.config)
    sd = np_state_dict(model)
    fixture = to_big_vision(sd, cfg, scan)
    # The fixture is exactly the tree big_vision's own declarations produce.
    assert {k.removeprefix("params/llm/"): v.shape for k, v in fixture.items()} == big_vision_shapes(cfg, scan)
    params = conv.params_from_big_vision(fixture, cfg)
    assert_trees_equal(params, conv.params_from_hf(sd, cfg))
    cfg_u = conv.config_from_hf(model.config, scan_layers=False)  # into the unscanned project layout too
    assert_trees_equal(conv.params_from_big_vision(fixture, cfg_u), conv.params_from_hf(sd, cfg_u))
    # Export writes the same tree and values back; and it round-trips.
    out = conv._flatten(conv.params_to_big_vision(params, cfg, scan=scan))
    assert sorted(out) == sorted(k.removeprefix("params/llm/") for k in fixture)
    for k, v in out.items():
        np.testing.assert_array_equal(v, fixture["params/llm/" + k], err_msg=k)
    assert_trees_equal(conv.params_from_big_vision({"llm": conv.params_to_big_vision(params, cfg, scan)}, cfg),
                       params)


@pytest.mark.parametrize("gating_layout", ["DF", "FD"])
def test_official_flax_export_round_trip(gating_layout):
    model = tiny_hf("gemma2")
    cfg = conv.config_from_hf(model.config)
    sd = np_state_dict(model)
    params = conv.params_from_hf(sd, cfg)
    tree = conv.params_to_flax(params, cfg, gating_layout=gating_layout)
    want = to_official(sd, cfg, gating_layout)  # written from the HF weights, independently of conv
    want["transformer"]["embedder"]["input_embedding"] = sd["model.embed_tokens.weight"]  # no padding rows
    got, ref = conv._flatten(tree), conv._flatten(want)
    assert sorted(got) == sorted(ref)
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
    assert_trees_equal(conv.params_from_flax(tree, cfg, gating_layout=gating_layout), params)


def test_official_flax_export_fused_qkv_gemma1():
    model = tiny_hf("gemma", num_key_value_heads=4, num_hidden_layers=2)
    cfg = conv.config_from_hf(model.config)
    params = conv.params_from_hf(np_state_dict(model), cfg)
    tree = conv.params_to_flax(params, cfg, gating_layout="FD")
    assert tree["transformer"]["layer_1"]["attn"]["qkv_einsum"]["w"].shape == (3, 4, 64, 16)
    assert_trees_equal(conv.params_from_flax(tree, cfg), params)


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
    flat = to_big_vision(sd, cfg)
    flat["params/llm/layers/attn/q_einsum/w"] = flat["params/llm/layers/attn/q_einsum/w"][:3]
    with pytest.raises(conv.CheckpointError, match=r"'layers/attn/q_einsum/w' has shape \(3, 4, 64, 16\) but "
                                                   r"the config expects \(4, 4, 64, 16\)"):
        conv.params_from_big_vision(flat, cfg)
    tree = to_official(sd, cfg, "FD")
    del tree["transformer"]["final_norm"]
    with pytest.raises(conv.CheckpointError, match=r"missing tensor 'final_norm/scale' \(expected shape \(64,\)\)"):
        conv.params_from_flax(tree, cfg)
