"""transformers CLIPModel checkpoints (save_pretrained folders) <-> evals/clip_score.py params, both ways, exact.

The Flax tree mirrors transformers' module names ('layers.<i>' -> 'layers_<i>'), so each tensor maps by rule:
linear weight (O, I) <-> kernel (I, O), LayerNorm weight <-> scale, Embedding weight <-> embedding, patch conv
OIHW <-> HWIO; position embeddings, class embedding and logit_scale as they are.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from unifluid_jax.convert.vae import (Entry, Path, assign_checked, conv_to_hwio, conv_to_oihw, expected_shapes,
                                      identity, read_state_dict)
from unifluid_jax.evals import clip_score as clip_lib

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def config_from_hf(d: Mapping) -> clip_lib.CLIPConfig:
    """A CLIPModel config.json dict -> CLIPConfig."""
    t, v = d["text_config"], d["vision_config"]

    def tower(c):
        return clip_lib.TowerConfig(width=c["hidden_size"], layers=c["num_hidden_layers"],
                                    heads=c["num_attention_heads"], mlp=c["intermediate_size"],
                                    hidden_act=c.get("hidden_act", "quick_gelu"),
                                    layer_norm_eps=c.get("layer_norm_eps", 1e-5))
    for name, c in (("text_config", t), ("vision_config", v)):
        act = c.get("hidden_act", "quick_gelu")
        if act not in clip_lib._ACTS:
            raise ValueError(f"CLIP {name}.hidden_act={act!r} is not supported (one of {sorted(clip_lib._ACTS)})")
    return clip_lib.CLIPConfig(
        text=tower(t), vision=tower(v), vocab_size=t["vocab_size"],
        max_text_len=t.get("max_position_embeddings", 77), eos_token_id=t.get("eos_token_id", 49407),
        image_size=v.get("image_size", 224), patch_size=v.get("patch_size", 32),
        projection_dim=d.get("projection_dim", 512))


def _expected(cfg: clip_lib.CLIPConfig):
    tokens = jnp.zeros((1, cfg.max_text_len), jnp.int32)
    pixels = jnp.zeros((1, cfg.image_size, cfg.image_size, 3), jnp.float32)
    return expected_shapes(clip_lib.CLIP(cfg), tokens, pixels)


_PARENT = {"token_embedding": "embeddings", "patch_embedding": "embeddings", "q_proj": "self_attn",
           "k_proj": "self_attn", "v_proj": "self_attn", "out_proj": "self_attn", "fc1": "mlp", "fc2": "mlp"}


def _hf_key(path: Path) -> tuple[str, object, object]:
    """Project param path -> (transformers key, to_project, to_source)."""
    *mod, leaf = path
    names = []
    for m in mod:
        if m in _PARENT:  # transformers nests these one module deeper
            names.append(_PARENT[m])
        names.append(m.replace("layers_", "layers."))
    if leaf in ("position_embedding", "class_embedding"):  # raw params of the towers
        return ".".join(names + ["embeddings", leaf] + (["weight"] if leaf == "position_embedding" else [])), \
            identity, identity
    if leaf == "kernel":
        if mod[-1] == "patch_embedding":
            return ".".join(names + ["weight"]), conv_to_hwio, conv_to_oihw
        return ".".join(names + ["weight"]), np.transpose, np.transpose
    return ".".join(names + [{"embedding": "weight", "scale": "weight"}.get(leaf, leaf)]), identity, identity


def _entries(expected) -> list[Entry]:
    return [(path, *_hf_key(path)) for path in expected]


def params_from_hf(state_dict: Mapping[str, object], cfg: clip_lib.CLIPConfig, what: str = "CLIP") -> dict:
    """transformers CLIPModel state dict (torch or numpy) -> {'params': ...}."""
    exp = _expected(cfg)
    return {"params": assign_checked(exp, _entries(exp), state_dict, what,
                                     ignore=lambda k: k.endswith("position_ids"))}


def params_to_hf(params, cfg: clip_lib.CLIPConfig) -> dict[str, np.ndarray]:
    flat = traverse_util.flatten_dict(params.get("params", params))
    exp = _expected(cfg)
    bad = [p for p in exp if p not in flat or tuple(np.shape(flat[p])) != exp[p].shape] + \
        [p for p in flat if p not in exp]
    if bad:
        raise ValueError(f"CLIP to transformers: param {'/'.join(bad[0])} is missing, extra or mis-shaped")
    return {k: np.array(bwd(np.asarray(flat[p], np.float32)), order="C") for p, k, _, bwd in _entries(exp)}


def load(folder: str, with_tokenizer: bool = True):
    """A CLIPModel save_pretrained folder -> (CLIPConfig, {'params': ...}, tokenizer or None). Image
    normalisation comes from its preprocessor_config.json when present."""
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"CLIP checkpoint {folder!r}: no config.json (expected a transformers CLIPModel "
                                "save_pretrained folder, e.g. openai/clip-vit-large-patch14)")
    with open(cfg_path) as f:
        d = json.load(f)
    cfg = config_from_hf(d)
    pre = os.path.join(folder, "preprocessor_config.json")
    if os.path.isfile(pre):
        with open(pre) as f:
            p = json.load(f)
        cfg = clip_lib.dataclasses.replace(cfg, image_mean=tuple(p.get("image_mean", cfg.image_mean)),
                                           image_std=tuple(p.get("image_std", cfg.image_std)))
    params = params_from_hf(read_state_dict(folder, _WEIGHT_FILES), cfg, what=f"CLIP checkpoint {folder}")
    tok = None
    if with_tokenizer:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(folder)
    return cfg, params, tok
