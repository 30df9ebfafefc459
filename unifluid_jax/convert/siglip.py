"""HF transformers SigLIP and big_vision SigLIP checkpoints -> project SigLIP params (and project -> HF).

Conversion always targets the looped layout (`Transformer/encoderblock_i`) where every tensor maps 1:1 and is
shape-checked, then stacks the layers when the config scans them (`set_layout`).
HF keys may carry any prefix (`vision_model.`, `vision_tower.vision_model.`, ...); text-tower keys are ignored,
and the MAP head is ignored when the config has pool='none' (PaliGemma drops it). big_vision keys may carry
a prefix too (`params/img/`); PaliGemma's projection `head/{kernel,bias}` belongs to the UniFluid model and is
ignored here.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
import flax.linen as nn
from flax import traverse_util

from unifluid_jax.convert.vae import (Entry, assign_checked, conv_to_hwio, conv_to_oihw, expected_shapes,
                                      identity, read_state_dict, to_numpy)
from unifluid_jax.models import siglip as siglip_lib

_BLOCK = re.compile(r"^encoderblock_(\d+)$")


def set_layout(params, scan_layers: bool):
    """Converts SigLIP params between looped (`encoderblock_i`) and scanned (`encoderblock`, leading axis)."""
    p = dict(params.get("params", params))
    tr = dict(p["Transformer"])
    looped = sorted((int(_BLOCK.match(k).group(1)), k) for k in tr if _BLOCK.match(k))
    if scan_layers and looped:
        blocks = [tr.pop(k) for _, k in looped]
        tr["encoderblock"] = jax_tree_stack(blocks)
    elif not scan_layers and "encoderblock" in tr:
        stacked = traverse_util.flatten_dict(tr.pop("encoderblock"))
        depth = next(iter(stacked.values())).shape[0]
        for i in range(depth):
            tr[f"encoderblock_{i}"] = traverse_util.unflatten_dict({k: v[i] for k, v in stacked.items()})
    p["Transformer"] = tr
    return {"params": p}


def jax_tree_stack(trees):
    flats = [traverse_util.flatten_dict(t) for t in trees]
    return traverse_util.unflatten_dict({k: jnp.stack([f[k] for f in flats]) for k in flats[0]})


def _expected_looped(cfg: siglip_lib.SigLIPConfig):
    cfg = dataclasses.replace(cfg, scan_layers=False, remat_policy="none")
    return expected_shapes(siglip_lib.SigLIP(cfg), jnp.zeros((1, cfg.image_size, cfg.image_size, 3)))


def _finish(tree, cfg):
    return set_layout({"params": tree}, cfg.scan_layers)


# --- HF transformers ---------------------------------------------------------------------------------------

def _hf_attention(cfg, src: str, dst: tuple[str, ...]) -> list[Entry]:
    """q/k/v/out projections: HF Linear (out, in) <-> project DenseGeneral (D, N, H) / (N, H, D)."""
    d, n, h = cfg.width, cfg.num_heads, cfg.head_dim
    qkv = [(dst + (name, "kernel"), f"{src}.{hf}_proj.weight", lambda w: w.T.reshape(d, n, h),
            lambda w: w.reshape(d, n * h).T) for name, hf in (("query", "q"), ("key", "k"), ("value", "v"))]
    qkv += [(dst + (name, "bias"), f"{src}.{hf}_proj.bias", lambda w: w.reshape(n, h), lambda w: w.reshape(n * h))
            for name, hf in (("query", "q"), ("key", "k"), ("value", "v"))]
    return qkv + [(dst + ("out", "kernel"), f"{src}.out_proj.weight", lambda w: w.T.reshape(n, h, d),
                   lambda w: w.reshape(n * h, d).T),
                  (dst + ("out", "bias"), f"{src}.out_proj.bias", identity, identity)]


def _ln(src, dst) -> list[Entry]:
    return [(dst + ("scale",), f"{src}.weight", identity, identity),
            (dst + ("bias",), f"{src}.bias", identity, identity)]


def _linear(src, dst) -> list[Entry]:
    return [(dst + ("kernel",), f"{src}.weight", np.transpose, np.transpose),
            (dst + ("bias",), f"{src}.bias", identity, identity)]


def _hf_entries(cfg) -> list[Entry]:
    e: list[Entry] = [
        (("embedding", "kernel"), "embeddings.patch_embedding.weight", conv_to_hwio, conv_to_oihw),
        (("embedding", "bias"), "embeddings.patch_embedding.bias", identity, identity),
        (("pos_embedding",), "embeddings.position_embedding.weight", lambda w: w[None], lambda w: w[0]),
    ]
    for i in range(cfg.depth):
        s, dst = f"encoder.layers.{i}", ("Transformer", f"encoderblock_{i}")
        e += _ln(f"{s}.layer_norm1", dst + ("LayerNorm_0",))
        e += _hf_attention(cfg, f"{s}.self_attn", dst + ("MultiHeadDotProductAttention_0",))
        e += _ln(f"{s}.layer_norm2", dst + ("LayerNorm_1",))
        e += _linear(f"{s}.mlp.fc1", dst + ("MlpBlock_0", "Dense_0"))
        e += _linear(f"{s}.mlp.fc2", dst + ("MlpBlock_0", "Dense_1"))
    e += _ln("post_layernorm", ("Transformer", "encoder_norm"))
    if cfg.pool == "map":
        dst = ("MAPHead_0",)
        e.append((dst + ("probe",), "head.probe", identity, identity))
        # nn.MultiheadAttention packs q,k,v into in_proj; split into virtual keys '<in_proj>[q]' etc.
        e += _hf_attention(cfg, "head.attention.in", dst + ("MultiHeadDotProductAttention_0",))[:6]
        e += _hf_attention(cfg, "head.attention", dst + ("MultiHeadDotProductAttention_0",))[6:]
        e += _ln("head.layernorm", dst + ("LayerNorm_0",))
        e += _linear("head.mlp.fc1", dst + ("MlpBlock_0", "Dense_0"))
        e += _linear("head.mlp.fc2", dst + ("MlpBlock_0", "Dense_1"))
    return e


_IN_PROJ = {"weight": "head.attention.in_proj_weight", "bias": "head.attention.in_proj_bias"}


def _split_in_proj(sd: dict) -> dict:
    for kind, key in _IN_PROJ.items():
        if key in sd:
            parts = np.split(to_numpy(sd.pop(key)), 3, axis=0)
            for name, part in zip("qkv", parts):
                sd[f"head.attention.in.{name}_proj.{kind}"] = part
    return sd


def _strip_hf_prefix(state_dict: Mapping[str, object]) -> dict:
    anchor = "embeddings.patch_embedding.weight"
    prefixes = [k[: -len(anchor)] for k in state_dict if k.endswith(anchor)]
    if len(prefixes) != 1:
        raise ValueError(f"SigLIP from HF: expected exactly one '*{anchor}' tensor, found {len(prefixes)}")
    p = prefixes[0]
    return {k[len(p):]: v for k, v in state_dict.items() if k.startswith(p)}


def from_hf(state_dict: Mapping[str, object], cfg: siglip_lib.SigLIPConfig) -> dict:
    """HF SiglipVisionModel / SiglipModel / PaliGemma state dict (torch or numpy) -> {'params': ...}."""
    sd = _split_in_proj(_strip_hf_prefix(state_dict))
    ignore = (lambda k: k.startswith("head.")) if cfg.pool == "none" else (lambda k: False)
    tree = assign_checked(_expected_looped(cfg), _hf_entries(cfg), sd, "SigLIP from HF", ignore)
    return _finish(tree, cfg)


def to_hf(params, cfg: siglip_lib.SigLIPConfig) -> dict[str, np.ndarray]:
    """Project params -> SiglipVisionModel state dict (no prefix, transformers >= 5) of numpy arrays."""
    flat = traverse_util.flatten_dict(nn.unbox(set_layout(params, False)["params"]))
    exp = _expected_looped(cfg)
    out = {}
    for path, key, _, bwd in _hf_entries(cfg):
        got = flat.get(path)
        if got is None or tuple(got.shape) != exp[path].shape:
            raise ValueError(f"SigLIP to HF: param {'/'.join(path)} has shape "
                             f"{None if got is None else tuple(got.shape)}, the config expects {exp[path].shape}")
        out[key] = np.ascontiguousarray(bwd(np.asarray(got, np.float32)))
    for kind, key in _IN_PROJ.items():
        parts = [out.pop(f"head.attention.in.{n}_proj.{kind}", None) for n in "qkv"]
        if parts[0] is not None:
            out[key] = np.concatenate(parts, axis=0)
    return out


def hf_config(cfg: siglip_lib.SigLIPConfig) -> dict:
    """SiglipVisionConfig(**hf_config(cfg)) builds the matching transformers model."""
    return dict(hidden_size=cfg.width, intermediate_size=cfg.mlp_dim, num_hidden_layers=cfg.depth,
                num_attention_heads=cfg.num_heads, num_channels=3, image_size=cfg.image_size,
                patch_size=cfg.patch_size, hidden_act="gelu_pytorch_tanh", layer_norm_eps=cfg.layer_norm_eps,
                vision_use_head=cfg.pool == "map")


def config_from_hf(d: Mapping, **overrides) -> siglip_lib.SigLIPConfig:
    """SiglipVisionConfig dict, or a SiglipConfig / PaliGemma config with a `vision_config` -> SigLIPConfig."""
    d = d.get("vision_config", d)
    if d.get("hidden_act", "gelu_pytorch_tanh") not in ("gelu_pytorch_tanh", "gelu_new"):
        raise ValueError(f"unsupported hidden_act {d['hidden_act']!r} (SigLIP uses tanh-approximate gelu)")
    kw = dict(patch_size=d.get("patch_size", 16), image_size=d.get("image_size", 224),
              width=d.get("hidden_size", 768), depth=d.get("num_hidden_layers", 12),
              num_heads=d.get("num_attention_heads", 12), mlp_dim=d.get("intermediate_size", 3072),
              layer_norm_eps=d.get("layer_norm_eps", 1e-6),
              pool="map" if d.get("vision_use_head", True) else "none")
    return siglip_lib.SigLIPConfig(**{**kw, **overrides})


def load_hf(folder: str, cfg: siglip_lib.SigLIPConfig | None = None):
    """A transformers save_pretrained folder -> (config, params)."""
    if cfg is None:
        with open(os.path.join(folder, "config.json")) as f:
            cfg = config_from_hf(json.load(f))
    sd = read_state_dict(folder, ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"))
    return cfg, from_hf(sd, cfg)


# --- big_vision ---------------------------------------------------------------------------------------------

def _strip_bv_prefix(flat: Mapping[str, object]) -> dict:
    anchor = "embedding/kernel"
    prefixes = [k[: -len(anchor)] for k in flat if k.endswith(anchor) and
                (len(k) == len(anchor) or k[-len(anchor) - 1] == "/")]
    if len(prefixes) != 1:
        raise ValueError(f"SigLIP from big_vision: expected exactly one '*{anchor}' key, found {len(prefixes)}")
    p = prefixes[0]
    return {k[len(p):]: v for k, v in flat.items() if k.startswith(p)}


def _unscan_bv(flat: dict) -> dict:
    """Scanned `Transformer/encoderblock/...` (leading layer axis) -> looped `encoderblock_i` keys."""
    out = {}
    for k, v in flat.items():
        if k.startswith("Transformer/encoderblock/"):
            rest = k[len("Transformer/encoderblock/"):]
            for i, layer in enumerate(to_numpy(v)):
                out[f"Transformer/encoderblock_{i}/{rest}"] = layer
        else:
            out[k] = v
    return out


def from_big_vision(flat: Mapping[str, object], cfg: siglip_lib.SigLIPConfig) -> dict:
    """big_vision SigLIP params as a flat '/'-joined dict (npz-style; looped or scanned) -> {'params': ...}."""
    sd = _unscan_bv(_strip_bv_prefix(flat))
    exp = _expected_looped(cfg)
    entries = [(path, "/".join(path), identity, identity) for path in exp]
    ignore = lambda k: k.startswith("head/") or (cfg.pool == "none" and k.startswith("MAPHead_0/"))
    return _finish(assign_checked(exp, entries, sd, "SigLIP from big_vision", ignore), cfg)


def load_big_vision(path: str, cfg: siglip_lib.SigLIPConfig) -> dict:
    """A big_vision .npz checkpoint (keys like 'params/img/Transformer/...') -> {'params': ...}."""
    with np.load(path, allow_pickle=False) as f:
        return from_big_vision({k: f[k] for k in f.files}, cfg)


def flatten_big_vision(tree) -> dict:
    """A nested big_vision param tree -> the flat '/'-joined dict `from_big_vision` takes."""
    return {"/".join(k): v for k, v in traverse_util.flatten_dict(tree).items()}
