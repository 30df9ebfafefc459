"""Gemma weight conversion: project params <-> HF transformers, official Flax and big_vision layouts.

Python API::

    from unifluid_jax.models import gemma
    from unifluid_jax.convert import gemma as conv

    cfg = gemma.get_config("gemma2_2b")                  # or conv.config_from_hf(hf_model.config)
    params = conv.params_from_hf(hf_model.state_dict(), cfg)          # torch tensors or numpy arrays
    params = conv.load_hf_checkpoint("/path/to/save_pretrained_dir", cfg)   # *.safetensors
    params = conv.params_from_flax(official_tree_or_flat_dict, cfg)   # 'transformer/layer_0/attn/q_einsum/w'
    params = conv.params_from_big_vision(flat_or_tree, cfg)           # 'llm/layers/mlp/linear' (big_vision)
    tree = conv.params_to_flax(params, cfg)                           # official Flax tree ('transformer/...')
    tree = conv.params_to_big_vision(params, cfg)                     # big_vision / PaliGemma 'llm' tree
    state_dict = conv.params_to_hf(params, cfg)                       # numpy arrays, HF names
    conv.save_hf_checkpoint(params, cfg, "/out/dir")                  # model.safetensors + config.json
    logits = gemma.Gemma(cfg).apply({"params": params}, tokens, method="forward")

Project params come back unboxed (jnp arrays in cfg.param_dtype) in the tree layout of `cfg.scan_layers`
(see models/gemma.py). A missing or mis-shaped tensor raises CheckpointError naming the tensor and both
shapes. HF layouts (SPEC 2): q/k/v `(heads*H, D)`, o `(D, N*H)`, gate/up `(F, D)`, down `(D, F)`; lm_head is
tied (accepted if equal to the embedding, dropped on save). In Gemma-1 HF checkpoints
`post_attention_layernorm` is the pre-FFW norm (there are no post norms).
"""
from __future__ import annotations

import glob
import json
import os
from collections.abc import Callable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from unifluid_jax.models import layers as gemma_layers
from unifluid_jax.models.gemma import GemmaConfig, get_config


class CheckpointError(ValueError):
    """A checkpoint does not match the config: missing, unexpected or mis-shaped tensors."""


# ----------------------------------------------------------------------------------------- helpers

def _to_numpy(t) -> np.ndarray:
    if hasattr(t, "detach"):  # torch tensor; bf16 has no numpy dtype -> reinterpret the bits (exact)
        import torch
        t = t.detach().cpu()
        if t.dtype == torch.bfloat16:
            import ml_dtypes
            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()
    return np.asarray(t)


def _flatten(tree, prefix: str = "") -> dict[str, np.ndarray]:
    """Nested dicts -> {'a/b/c': array}; flat dicts pass through (keys may already contain '/')."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "/"))
        else:
            out[key] = v
    return out


class _Source:
    """Named tensors with shape checks whose errors name the tensor; tracks which names were used."""

    def __init__(self, tensors: Mapping, what: str):
        self.tensors, self.what, self.used = dict(tensors), what, set()

    def has(self, name: str) -> bool:
        return name in self.tensors

    def shape(self, name: str) -> tuple:
        self._require(name, None)
        return tuple(np.shape(self.tensors[name]))

    def _require(self, name, shape):
        if name not in self.tensors:
            exp = "" if shape is None else f" (expected shape {tuple(shape)})"
            raise CheckpointError(f"{self.what}: missing tensor {name!r}{exp}")

    def get(self, name: str, shape: tuple) -> np.ndarray:
        self._require(name, shape)
        arr = _to_numpy(self.tensors[name])
        if tuple(arr.shape) != tuple(shape):
            raise CheckpointError(f"{self.what}: tensor {name!r} has shape {tuple(arr.shape)} but the config "
                                  f"expects {tuple(shape)}")
        self.used.add(name)
        return arr

    def check_all_used(self, ignore: Callable[[str], bool] = lambda n: False):
        extra = sorted(n for n in self.tensors if n not in self.used and not ignore(n))
        if extra:
            raise CheckpointError(f"{self.what}: {len(extra)} unexpected tensor(s) for this config, e.g. "
                                  f"{extra[:5]}; check num_layers / post_norms / the variant")


def _norm_names(cfg: GemmaConfig) -> tuple[str, ...]:
    names = ("pre_attention_norm", "pre_ffw_norm")
    return names + ("post_attention_norm", "post_ffw_norm") if cfg.post_norms else names


def _assemble(cfg: GemmaConfig, embed, final_norm, blocks: list[dict]) -> dict:
    """Per-layer flat blocks {'attn/q_einsum': ...} -> the project param tree (scanned or not)."""
    dt = jnp.dtype(cfg.param_dtype)

    def nest(flat):
        out = {}
        for key, arr in flat.items():
            node = out
            *parents, leaf = key.split("/")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = jnp.asarray(arr, dt)
        return out

    params = {"embedder": {"input_embedding": jnp.asarray(embed, dt)},
              "final_norm": {"scale": jnp.asarray(final_norm, dt)}}
    if not cfg.scan_layers:
        for i, blk in enumerate(blocks):
            params[f"layer_{i}"] = nest(blk)
        return params
    kinds = gemma_layers.group_kinds(cfg)
    params["layers"] = {}
    for j, kind in enumerate(kinds):
        members = blocks[j::len(kinds)]  # layer g * len(kinds) + j
        params["layers"][kind] = nest({k: np.stack([b[k] for b in members]) for k in members[0]})
    return params


def _disassemble(cfg: GemmaConfig, params) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Inverse of _assemble: (embedding, final norm scale, per-layer flat blocks) as writable numpy copies."""
    params = {k: v for k, v in params.items()}
    if "params" in params and "embedder" not in params:
        params = params["params"]
    embed = np.array(params["embedder"]["input_embedding"])
    final_norm = np.array(params["final_norm"]["scale"])
    if not cfg.scan_layers:
        return embed, final_norm, [{k: np.array(v) for k, v in _flatten(params[f"layer_{i}"]).items()}
                                   for i in range(cfg.num_layers)]
    kinds = gemma_layers.group_kinds(cfg)
    stacked = {kind: _flatten(params["layers"][kind]) for kind in kinds}
    blocks = []
    for i in range(cfg.num_layers):
        g, j = divmod(i, len(kinds))
        blocks.append({k: np.array(v[g]) for k, v in stacked[kinds[j]].items()})
    return embed, final_norm, blocks


def _unbox(params):
    try:
        import flax.linen as nn
        return nn.unbox(params)
    except Exception:  # pragma: no cover - plain trees
        return params


# ---------------------------------------------------------------------------------------------- HF

def _hf_norms(cfg: GemmaConfig) -> dict[str, str]:
    """project norm name -> HF layer norm name."""
    if cfg.post_norms:
        return {"pre_attention_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
                "pre_ffw_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}
    return {"pre_attention_norm": "input_layernorm", "pre_ffw_norm": "post_attention_layernorm"}


def params_from_hf(state_dict: Mapping, cfg: GemmaConfig) -> dict:
    """HF GemmaForCausalLM / Gemma2ForCausalLM state dict (torch or numpy) -> project params."""
    sd = dict(state_dict)
    if "model.embed_tokens.weight" not in sd and "embed_tokens.weight" in sd:  # a bare Gemma(2)Model
        sd = {f"model.{k}": v for k, v in sd.items()}
    src = _Source(sd, "HF checkpoint")
    n, k, h, d, f, v = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.width, cfg.mlp_dim, cfg.vocab_size)
    embed = src.get("model.embed_tokens.weight", (v, d))
    if "lm_head.weight" in sd:
        lm = src.get("lm_head.weight", (v, d))
        if not np.array_equal(lm, embed):
            raise CheckpointError("HF checkpoint: lm_head.weight differs from model.embed_tokens.weight, but Gemma "
                                  "ties them; this is not a Gemma checkpoint")
    final_norm = src.get("model.norm.weight", (d,))
    blocks = []
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        proj = lambda name, heads: src.get(f"{p}self_attn.{name}.weight", (heads * h, d)).reshape(
            heads, h, d).transpose(0, 2, 1)
        blk = {
            "attn/q_einsum": proj("q_proj", n),
            "attn/kv_einsum": np.stack([proj("k_proj", k), proj("v_proj", k)]),
            "attn/attn_vec_einsum": src.get(f"{p}self_attn.o_proj.weight", (d, n * h)).reshape(
                d, n, h).transpose(1, 2, 0),
            "mlp/gating_einsum": np.stack([src.get(f"{p}mlp.gate_proj.weight", (f, d)),
                                           src.get(f"{p}mlp.up_proj.weight", (f, d))]),
            "mlp/linear": src.get(f"{p}mlp.down_proj.weight", (d, f)).T,
        }
        for ours, theirs in _hf_norms(cfg).items():
            blk[f"{ours}/scale"] = src.get(f"{p}{theirs}.weight", (d,))
        blocks.append(blk)
    src.check_all_used(ignore=lambda name: name.endswith("rotary_emb.inv_freq"))
    return _assemble(cfg, embed, final_norm, blocks)


def params_to_hf(params, cfg: GemmaConfig, include_lm_head: bool = True) -> dict[str, np.ndarray]:
    """Project params -> HF state dict (numpy, param dtype). lm_head.weight (tied) only if include_lm_head."""
    embed, final_norm, blocks = _disassemble(cfg, _unbox(params))
    n, k, h, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.width
    out = {"model.embed_tokens.weight": embed}
    for i, blk in enumerate(blocks):
        p = f"model.layers.{i}."
        to_proj = lambda w, heads: np.ascontiguousarray(w.transpose(0, 2, 1).reshape(heads * h, d))
        out[f"{p}self_attn.q_proj.weight"] = to_proj(blk["attn/q_einsum"], n)
        out[f"{p}self_attn.k_proj.weight"] = to_proj(blk["attn/kv_einsum"][0], k)
        out[f"{p}self_attn.v_proj.weight"] = to_proj(blk["attn/kv_einsum"][1], k)
        out[f"{p}self_attn.o_proj.weight"] = np.ascontiguousarray(
            blk["attn/attn_vec_einsum"].transpose(2, 0, 1).reshape(d, n * h))
        out[f"{p}mlp.gate_proj.weight"] = blk["mlp/gating_einsum"][0]
        out[f"{p}mlp.up_proj.weight"] = blk["mlp/gating_einsum"][1]
        out[f"{p}mlp.down_proj.weight"] = np.ascontiguousarray(blk["mlp/linear"].T)
        for ours, theirs in _hf_norms(cfg).items():
            out[f"{p}{theirs}.weight"] = blk[f"{ours}/scale"]
    out["model.norm.weight"] = final_norm
    if include_lm_head:
        out["lm_head.weight"] = embed
    return out


def config_from_hf(hf_config, **overrides) -> GemmaConfig:
    """transformers GemmaConfig / Gemma2Config -> GemmaConfig (Gemma-2: even layers local, as HF's default)."""
    c = hf_config
    rope = getattr(c, "rope_parameters", None) or {}
    base = dict(num_layers=c.num_hidden_layers, width=c.hidden_size, num_heads=c.num_attention_heads,
                num_kv_heads=c.num_key_value_heads, head_dim=c.head_dim, mlp_dim=c.intermediate_size,
                vocab_size=c.vocab_size, rms_eps=c.rms_norm_eps,
                rope_base=float(rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))))
    if c.model_type == "gemma2":
        types = list(getattr(c, "layer_types", None) or [])
        expected = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(c.num_hidden_layers)]
        if types and types != expected:
            raise CheckpointError(f"HF config: layer_types {types} are not the Gemma-2 local/global alternation")
        base.update(query_scale=float(c.query_pre_attn_scalar) ** -0.5, attn_logit_softcap=c.attn_logit_softcapping,
                    final_logit_softcap=c.final_logit_softcapping, sliding_window=c.sliding_window, post_norms=True)
    elif c.model_type != "gemma":
        raise CheckpointError(f"HF config: model_type {c.model_type!r} is neither 'gemma' nor 'gemma2'")
    variant = "gemma2_tiny" if c.model_type == "gemma2" else "gemma1_tiny"  # every field is overridden
    return get_config(variant, **{**base, **overrides})


def hf_config(cfg: GemmaConfig):
    """GemmaConfig -> transformers Gemma2Config (post norms) or GemmaConfig (Gemma-1)."""
    import transformers
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.width, intermediate_size=cfg.mlp_dim,
                  num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                  num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_eps,
                  rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_base})
    if cfg.post_norms:
        scalar = cfg.query_scale ** -2
        scalar = int(round(scalar)) if abs(scalar - round(scalar)) < 1e-6 * scalar else scalar
        return transformers.Gemma2Config(
            **common, query_pre_attn_scalar=scalar, sliding_window=cfg.sliding_window,
            attn_logit_softcapping=cfg.attn_logit_softcap, final_logit_softcapping=cfg.final_logit_softcap,
            hidden_activation="gelu_pytorch_tanh")
    if cfg.attn_logit_softcap or cfg.final_logit_softcap or cfg.sliding_window or \
            abs(cfg.query_scale - cfg.head_dim ** -0.5) > 1e-12:
        raise CheckpointError("HF GemmaConfig (Gemma-1) cannot express softcaps, a sliding window or a custom "
                              "query scale without post norms")
    return transformers.GemmaConfig(**common, hidden_act="gelu_pytorch_tanh")


def load_hf_checkpoint(path: str, cfg: GemmaConfig) -> dict:
    """A save_pretrained folder (all *.safetensors shards) -> project params."""
    from safetensors.numpy import load_file
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise CheckpointError(f"HF checkpoint: no *.safetensors files in {path!r}")
    sd = {}
    for fname in files:
        sd.update(load_file(fname))
    return params_from_hf(sd, cfg)


def save_hf_checkpoint(params, cfg: GemmaConfig, path: str) -> None:
    """Writes model.safetensors (tied lm_head dropped) + config.json, loadable by from_pretrained."""
    from safetensors.numpy import save_file
    os.makedirs(path, exist_ok=True)
    tensors = {k: np.ascontiguousarray(v) for k, v in params_to_hf(params, cfg, include_lm_head=False).items()}
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    hc = hf_config(cfg)
    hc.architectures = ["Gemma2ForCausalLM" if cfg.post_norms else "GemmaForCausalLM"]
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(hc.to_dict(), fh, indent=2, default=str)


# ------------------------------------------------------------------------ official Flax / big_vision

def _from_flax_like(cfg: GemmaConfig, src: _Source, embed_name: str, final_name: str,
                    has: Callable[[str], bool], shape_of: Callable[[str], tuple],
                    get: Callable[[str, tuple, int], np.ndarray], gating_layout: str | None) -> dict:
    n, k, h, d, f, v = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.width, cfg.mlp_dim, cfg.vocab_size)
    rows = src.shape(embed_name)[0]
    if rows < v:
        raise CheckpointError(f"{src.what}: tensor {embed_name!r} has {rows} rows, fewer than vocab_size {v}")
    embed = src.get(embed_name, (rows, d))[:v]  # official tables carry 256128 rows (128 padding)
    final_norm = src.get(final_name, (d,))
    if gating_layout is None:
        g = shape_of("mlp/gating_einsum/w")
        gating_layout = "DF" if g[-2:] == (d, f) and d != f else "FD"
        if d == f:
            raise CheckpointError(f"{src.what}: width == mlp_dim, so gating_einsum's layout is ambiguous; "
                                  "pass gating_layout='DF' or 'FD'")
    gating_shape = (2, d, f) if gating_layout == "DF" else (2, f, d)
    fused = has("attn/qkv_einsum/w")
    blocks = []
    for i in range(cfg.num_layers):
        if fused:  # K == N checkpoints store q, k, v together
            qkv = get("attn/qkv_einsum/w", (3, n, d, h), i)
            if k != n:
                raise CheckpointError(f"{src.what}: qkv_einsum found but num_kv_heads {k} != num_heads {n}")
            q, kv = qkv[0], qkv[1:]
        else:
            q, kv = get("attn/q_einsum/w", (n, d, h), i), get("attn/kv_einsum/w", (2, k, d, h), i)
        gating = get("mlp/gating_einsum/w", gating_shape, i)
        blk = {"attn/q_einsum": q, "attn/kv_einsum": kv,
               "attn/attn_vec_einsum": get("attn/attn_vec_einsum/w", (n, h, d), i),
               "mlp/gating_einsum": gating if gating_layout == "FD" else gating.transpose(0, 2, 1),
               "mlp/linear": get("mlp/linear/w", (f, d), i)}
        for norm in _norm_names(cfg):
            blk[f"{norm}/scale"] = get(f"{norm}/scale", (d,), i)
        blocks.append(blk)
    src.check_all_used()
    return _assemble(cfg, embed, final_norm, blocks)


def _strip(flat: dict, prefixes: tuple[str, ...]) -> dict:
    for p in prefixes:
        if any(key.startswith(p) for key in flat):
            flat = {key[len(p):] if key.startswith(p) else key: v for key, v in flat.items()}
    return flat


def params_from_flax(checkpoint: Mapping, cfg: GemmaConfig, gating_layout: str | None = None) -> dict:
    """Official Flax Gemma checkpoint (nested tree or flat 'transformer/layer_0/attn/q_einsum/w' dict).

    Handles qkv_einsum (K == N), gating_einsum as (2, D, F) (2B) or (2, F, D) (9B/27B; auto-detected unless
    D == F) and embedding tables with padding rows (trimmed to vocab_size).
    """
    flat = _strip(_flatten(checkpoint), ("params/", "transformer/"))
    src = _Source(flat, "Flax checkpoint")
    at = lambda name, i: f"layer_{i}/{name}"
    return _from_flax_like(cfg, src, "embedder/input_embedding", "final_norm/scale",
                           has=lambda name: src.has(at(name, 0)), shape_of=lambda name: src.shape(at(name, 0)),
                           get=lambda name, shape, i: src.get(at(name, i), shape), gating_layout=gating_layout)


# big_vision's FeedForward declares its two matrices with self.param (no Einsum module, so no '/w'), the
# gating one as (2, D, F); its Attention, norms and embedder match the official names.
_BV_NAMES = {"mlp/gating_einsum/w": "mlp/gating_einsum", "mlp/linear/w": "mlp/linear"}


def params_from_big_vision(checkpoint: Mapping, cfg: GemmaConfig) -> dict:
    """big_vision Gemma params (big_vision/models/ppp/gemma.py; PaliGemma keeps them under 'llm/'): scanned
    ('layers/attn/q_einsum/w' with a leading layer axis) or not ('layers/0/attn/q_einsum/w');
    'mlp/gating_einsum' (2, D, F) and 'mlp/linear' (F, D) without '/w'."""
    flat = _strip(_flatten(checkpoint), ("params/", "llm/"))
    src = _Source(flat, "big_vision checkpoint")
    scanned = not any(key.startswith("layers/0/") for key in flat)
    cache: dict[str, np.ndarray] = {}
    L = cfg.num_layers

    def name_of(name, i=None):
        name = _BV_NAMES.get(name, name)
        return f"layers/{name}" if scanned else f"layers/{i}/{name}"

    def get(name, shape, i):
        if not scanned:
            return src.get(name_of(name, i), shape)
        if name not in cache:
            cache[name] = src.get(name_of(name), (L,) + tuple(shape))
        return cache[name][i]

    return _from_flax_like(cfg, src, "embedder/input_embedding", "final_norm/scale",
                           has=lambda name: src.has(name_of(name, 0)),
                           shape_of=lambda name: src.shape(name_of(name, 0))[0 if not scanned else 1:],
                           get=get, gating_layout="DF")


# ------------------------------------------------------------------------ export to official Flax / big_vision

def _to_flax_like(params, cfg: GemmaConfig, gating_layout: str, fused_qkv: bool | None) -> tuple:
    """(embedding, final norm, per-layer {'attn/q_einsum/w': ...}) in the official Flax names and layouts."""
    if gating_layout not in ("DF", "FD"):
        raise ValueError(f"gating_layout must be 'DF' (2, D, F) or 'FD' (2, F, D), got {gating_layout!r}")
    fused = cfg.num_kv_heads == cfg.num_heads if fused_qkv is None else fused_qkv
    if fused and cfg.num_kv_heads != cfg.num_heads:
        raise CheckpointError(f"qkv_einsum needs num_kv_heads == num_heads, got {cfg.num_kv_heads} and "
                              f"{cfg.num_heads}")
    embed, final_norm, blocks = _disassemble(cfg, _unbox(params))
    layers = []
    for blk in blocks:
        out = {"attn/attn_vec_einsum/w": blk["attn/attn_vec_einsum"], "mlp/linear/w": blk["mlp/linear"],
               "mlp/gating_einsum/w": blk["mlp/gating_einsum"] if gating_layout == "FD"
               else np.ascontiguousarray(blk["mlp/gating_einsum"].transpose(0, 2, 1))}
        if fused:
            out["attn/qkv_einsum/w"] = np.concatenate([blk["attn/q_einsum"][None], blk["attn/kv_einsum"]])
        else:
            out["attn/q_einsum/w"], out["attn/kv_einsum/w"] = blk["attn/q_einsum"], blk["attn/kv_einsum"]
        out.update({f"{norm}/scale": blk[f"{norm}/scale"] for norm in _norm_names(cfg)})
        layers.append(out)
    return embed, final_norm, layers


def _nest(flat: Mapping) -> dict:
    """{'a/b/c': x} -> {'a': {'b': {'c': x}}}."""
    return traverse_util.unflatten_dict(flat, sep="/")


def params_to_flax(params, cfg: GemmaConfig, gating_layout: str = "DF", fused_qkv: bool | None = None) -> dict:
    """Project params -> the official Flax Gemma tree {'transformer': {'layer_0': {'attn': {'q_einsum': {'w'}}}}}
    (numpy). gating_layout: 'DF' = (2, D, F) as Gemma 2B / Gemma-2 2B; 'FD' = (2, F, D) as the official
    transpose_gating_einsum=True models (Gemma-2 9B/27B). fused_qkv: qkv_einsum (default when K == N)."""
    embed, final_norm, layers = _to_flax_like(params, cfg, gating_layout, fused_qkv)
    flat = {"embedder/input_embedding": embed, "final_norm/scale": final_norm}
    for i, layer in enumerate(layers):
        flat.update({f"layer_{i}/{k}": v for k, v in layer.items()})
    return {"transformer": _nest(flat)}


def params_to_big_vision(params, cfg: GemmaConfig, scan: bool = True) -> dict:
    """Project params -> big_vision's Gemma param tree {'embedder', 'layers', 'final_norm'} (numpy): layers
    stacked on a leading axis (scan=True, big_vision's default) or 'layers/<i>'; MLP without '/w' and the
    gating matrix as (2, D, F). For a PaliGemma checkpoint put it under 'llm'."""
    embed, final_norm, layers = _to_flax_like(params, cfg, "DF", None)
    flat = {"embedder/input_embedding": embed, "final_norm/scale": final_norm}
    for name in layers[0]:
        bv = _BV_NAMES.get(name, name)
        if scan:
            flat[f"layers/{bv}"] = np.stack([layer[name] for layer in layers])
        else:
            flat.update({f"layers/{i}/{bv}": layer[name] for i, layer in enumerate(layers)})
    return _nest(flat)
