"""diffusers AutoencoderKL and original LDM / CompVis / SD-format KL-VAE <-> project VAE params (both ways, exact).

The project tree mirrors diffusers' module names ('.<i>' -> '_<i>'), so each tensor maps by rule:
conv weight OIHW <-> kernel HWIO, linear weight (O,I) <-> kernel (I,O), GroupNorm weight <-> scale.
Original LDM / CompVis checkpoints (`first_stage_model.*` in SD's model.ckpt, bare `encoder.down.0.block.0...` in
autoencoder checkpoints) rename the same tensors (see `_ldm_key`) and store the mid attention as 1x1 convs.
The small checked-assignment helpers at the top are shared with convert/siglip.py.
"""
from __future__ import annotations

import json
import os
import pickle
import re
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
import flax.linen as nn

from unifluid_jax.models import vae as vae_lib

Path = tuple[str, ...]
Entry = tuple[Path, str, Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]


# --- shared helpers ------------------------------------------------------------------------------------------

def to_numpy(t) -> np.ndarray:
    """torch / jax / numpy tensor -> numpy (bfloat16 torch tensors go through float32)."""
    if hasattr(t, "detach"):
        t = t.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":
            t = t.float()
        return t.numpy()
    return np.asarray(t)


def read_weights_file(path: str, trust_pickle: bool = False) -> dict[str, np.ndarray]:
    """One .safetensors file or torch pickle (.bin/.pt/.ckpt) -> {name: numpy}. Lightning checkpoints keep the
    weights under 'state_dict', MAR's under 'model'; non-tensor entries are dropped. A pickle that torch's
    weights_only loader refuses (Lightning .ckpt files pickle callback objects) loads only with
    `trust_pickle=True`, since full unpickling runs code from the file."""
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file
        return load_file(path)
    import torch
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not trust_pickle:
            raise ValueError(f"{path} does not load with torch.load(weights_only=True) ({str(e).splitlines()[0]}); "
                             "if you trust the file, pass trust_pickle=True (full unpickling runs code from it), "
                             "or re-save its state dict as .safetensors") from e
        obj = torch.load(path, map_location="cpu", weights_only=False)
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    return {k: to_numpy(v) for k, v in obj.items() if hasattr(v, "shape")}


def read_state_dict(folder: str, names: Sequence[str]) -> dict[str, np.ndarray]:
    """The first existing weights file of `names` in a save_pretrained folder (sharded safetensors too)."""
    for name in names:
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            continue
        if name.endswith(".index.json"):
            with open(path) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            out = {}
            for s in shards:
                out.update(read_weights_file(os.path.join(folder, s)))
            return out
        return read_weights_file(path)
    raise FileNotFoundError(f"no weights file ({', '.join(names)}) in {folder}")


def expected_shapes(module: nn.Module, *example_args) -> dict[Path, jax.ShapeDtypeStruct]:
    """Flat {path: ShapeDtypeStruct} of the module's params, without allocating them."""
    abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), *example_args))
    return traverse_util.flatten_dict(nn.unbox(abstract)["params"])


def assign_checked(expected: Mapping[Path, jax.ShapeDtypeStruct], entries: Sequence[Entry],
                   source: Mapping[str, object], what: str, ignore: Callable[[str], bool] = lambda k: False):
    """Builds the nested param tree from `source` via `entries`; raises on the first (in checkpoint order)
    mis-shaped tensor naming it and both shapes, on a missing tensor, and on leftover source tensors."""
    flat, used = {}, set()
    order = {k: i for i, k in enumerate(source)}
    for path, key, to_project, to_source in sorted(entries, key=lambda e: order.get(e[1], len(order))):
        want = expected[path]
        name = "/".join(path)
        if key not in source:
            raise ValueError(f"{what}: checkpoint has no tensor {key!r} (needed for {name}, shape {want.shape})")
        src = to_numpy(source[key])
        want_src = to_source(np.empty(want.shape, np.float32)).shape
        if src.shape != want_src:
            raise ValueError(
                f"{what}: checkpoint tensor {key!r} has shape {src.shape} but the config expects {want_src} "
                f"(project {name} {want.shape}); the checkpoint was made for a different config")
        flat[path] = jnp.asarray(to_project(src), dtype=want.dtype)
        used.add(key)
    extra = [k for k in source if k not in used and not ignore(k)]
    if extra:
        raise ValueError(f"{what}: checkpoint has {len(extra)} tensor(s) the config does not use, first "
                         f"{extra[0]!r} {to_numpy(source[extra[0]]).shape}; the checkpoint is bigger than the "
                         "config (more layers/levels?)")
    return traverse_util.unflatten_dict(flat)


def conv_to_hwio(w):
    return np.transpose(w, (2, 3, 1, 0))


def conv_to_oihw(w):
    return np.transpose(w, (3, 2, 0, 1))


def identity(w):
    return w


# --- VAE ---------------------------------------------------------------------------------------------------

_LINEAR = ("to_q", "to_k", "to_v", "to_out_0")
_NORMS = ("norm1", "norm2", "group_norm", "conv_norm_out")
# Pre-0.14 diffusers attention names (diffusers renames them itself on load).
_OLD_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _diffusers_key(path: Path) -> str:
    parts = []
    for p in path[:-1]:
        m = re.fullmatch(r"(.+)_(\d+)", p)
        parts.extend([m.group(1), m.group(2)] if m else [p])
    leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}[path[-1]]
    return ".".join(parts + [leaf])


def _entries(expected) -> list[Entry]:
    out = []
    for path, s in expected.items():
        mod = path[-2]
        if path[-1] == "kernel" and mod in _LINEAR:
            fwd = bwd = np.transpose
        elif path[-1] == "kernel":
            fwd, bwd = conv_to_hwio, conv_to_oihw
        else:
            assert path[-1] == "bias" or mod in _NORMS, path
            fwd = bwd = identity
        out.append((path, _diffusers_key(path), fwd, bwd))
    return out


def _expected(cfg: vae_lib.VAEConfig):
    size = cfg.image_size or 8 * cfg.downsample_factor
    return expected_shapes(vae_lib.AutoencoderKL(cfg), jnp.zeros((1, size, size, cfg.in_channels)))


def _normalize_old_names(sd: Mapping[str, object]) -> dict[str, object]:
    out = {}
    for k, v in sd.items():
        parts = k.split(".")
        if len(parts) >= 2 and parts[-2] in _OLD_ATTN and "attentions" in parts:
            k = ".".join(parts[:-2] + [_OLD_ATTN[parts[-2]], parts[-1]])
            v = to_numpy(v)
            if v.ndim == 4:  # very old checkpoints store them as 1x1 convs
                v = v[:, :, 0, 0]
        out[k] = v
    return out


def from_diffusers(state_dict: Mapping[str, object], cfg: vae_lib.VAEConfig) -> dict:
    """diffusers AutoencoderKL state dict (torch or numpy) -> project params {'params': ...}."""
    sd = _normalize_old_names(state_dict)
    exp = _expected(cfg)
    return {"params": assign_checked(exp, _entries(exp), sd, "VAE from diffusers")}


def _export(params, cfg: vae_lib.VAEConfig, entries: Callable[[dict], list[Entry]], what: str):
    flat = traverse_util.flatten_dict(nn.unbox(params.get("params", params)))
    exp = _expected(cfg)
    for path, s in exp.items():
        got = flat.get(path)
        if got is None or tuple(got.shape) != s.shape:
            raise ValueError(f"{what}: param {'/'.join(path)} has shape "
                             f"{None if got is None else tuple(got.shape)}, the config expects {s.shape}")
    extra = sorted(set(flat) - set(exp))
    if extra:  # would be dropped silently: the params were made for a bigger config
        raise ValueError(f"{what}: {len(extra)} param(s) the config does not have, first {'/'.join(extra[0])}")
    return {key: np.ascontiguousarray(bwd(np.asarray(flat[path], np.float32)))
            for path, key, _, bwd in entries(exp)}


def to_diffusers(params, cfg: vae_lib.VAEConfig) -> dict[str, np.ndarray]:
    """Project params -> diffusers AutoencoderKL state dict of numpy arrays (load with strict=True)."""
    return _export(params, cfg, _entries, "VAE to diffusers")


def diffusers_config(cfg: vae_lib.VAEConfig) -> dict:
    """AutoencoderKL(**diffusers_config(cfg)) builds the matching PyTorch model."""
    n = len(cfg.channel_mult)
    return dict(in_channels=cfg.in_channels, out_channels=cfg.out_channels,
                down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
                block_out_channels=list(cfg.block_channels), layers_per_block=cfg.num_res_blocks,
                act_fn="silu", latent_channels=cfg.latent_channels, norm_num_groups=cfg.norm_groups,
                sample_size=cfg.image_size or 256, scaling_factor=cfg.scaling_factor,
                use_quant_conv=cfg.use_quant_conv, use_post_quant_conv=cfg.use_post_quant_conv,
                mid_block_add_attention=cfg.mid_attention)


def config_from_diffusers(d: Mapping, **overrides) -> vae_lib.VAEConfig:
    """A diffusers AutoencoderKL config (dict / FrozenDict / config.json contents) -> VAEConfig."""
    blocks = [int(c) for c in d.get("block_out_channels", (64,))]
    if any(b % blocks[0] for b in blocks):
        raise ValueError(f"block_out_channels {blocks} are not multiples of the first; not representable")
    for t in list(d.get("down_block_types", [])) + list(d.get("up_block_types", [])):
        if t not in ("DownEncoderBlock2D", "UpDecoderBlock2D"):
            raise ValueError(f"unsupported diffusers block type {t!r}")
    if d.get("act_fn", "silu") != "silu":
        raise ValueError(f"unsupported act_fn {d['act_fn']!r} (only silu)")
    kw = dict(in_channels=d.get("in_channels", 3), out_channels=d.get("out_channels", 3),
              base_channels=blocks[0], channel_mult=tuple(b // blocks[0] for b in blocks),
              num_res_blocks=d.get("layers_per_block", 1), latent_channels=d.get("latent_channels", 4),
              mid_attention=d.get("mid_block_add_attention", True), norm_groups=d.get("norm_num_groups", 32),
              scaling_factor=d.get("scaling_factor", 0.18215), image_size=d.get("sample_size", 256),
              use_quant_conv=d.get("use_quant_conv", True), use_post_quant_conv=d.get("use_post_quant_conv", True))
    return vae_lib.VAEConfig(**{**kw, **overrides})


_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json",
                 "diffusion_pytorch_model.bin")


def load_diffusers(folder: str, cfg: vae_lib.VAEConfig | None = None) -> tuple[vae_lib.VAEConfig, dict]:
    """A diffusers save_pretrained folder (the `vae/` subfolder of a pipeline) -> (config, params)."""
    if cfg is None:
        with open(os.path.join(folder, "config.json")) as f:
            cfg = config_from_diffusers(json.load(f))
    return cfg, from_diffusers(read_state_dict(folder, _WEIGHT_FILES), cfg)


def save_diffusers(params, cfg: vae_lib.VAEConfig, folder: str) -> None:
    """Writes config.json + diffusion_pytorch_model.safetensors loadable by AutoencoderKL.from_pretrained."""
    from safetensors.numpy import save_file
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"_class_name": "AutoencoderKL", **diffusers_config(cfg)}, f, indent=2)
    save_file(to_diffusers(params, cfg), os.path.join(folder, _WEIGHT_FILES[0]))


# --- original LDM / CompVis / SD format --------------------------------------------------------------------

_LDM_PREFIX = "first_stage_model."  # the VAE inside a full LDM / SD checkpoint
_LDM_PARTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")  # other keys (loss.*, ...) are not VAE
_LDM_RENAME = {"downsamplers_0": "downsample", "upsamplers_0": "upsample", "mid_block": "mid",
               "attentions_0": "attn_1", "group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v",
               "to_out_0": "proj_out", "conv_shortcut": "nin_shortcut", "conv_norm_out": "norm_out",
               "kernel": "weight", "scale": "weight"}


def _ldm_key(path: Path, levels: int) -> str:
    parts = []
    for i, p in enumerate(path):
        m = re.fullmatch(r"(down_blocks|up_blocks|resnets)_(\d+)", p)
        if m is None:
            parts.append(_LDM_RENAME.get(p, p))
        elif m[1] == "down_blocks":
            parts.append(f"down.{m[2]}")
        elif m[1] == "up_blocks":  # LDM numbers decoder levels by resolution, diffusers in execution order
            parts.append(f"up.{levels - 1 - int(m[2])}")
        elif path[i - 1] == "mid_block":
            parts.append(f"block_{int(m[2]) + 1}")
        else:
            parts.append(f"block.{m[2]}")
    return ".".join(parts)


def _ldm_entries(expected, levels: int) -> list[Entry]:
    out = []
    for path, _, fwd, bwd in _entries(expected):
        if path[-1] == "kernel" and path[-2] in _LINEAR:  # LDM attention q/k/v/proj_out: 1x1 conv [O, I, 1, 1]
            fwd, bwd = (lambda w: conv_to_hwio(w)[0, 0]), (lambda k: conv_to_oihw(k[None, None]))
        out.append((path, _ldm_key(path, levels), fwd, bwd))
    return out


def params_from_ldm(state_dict: Mapping[str, object], cfg: vae_lib.VAEConfig) -> dict:
    """Original-format KL-VAE state dict (bare, or the `first_stage_model.*` part of a full LDM / SD checkpoint;
    loss.* and other non-VAE keys are ignored) -> project params {'params': ...}."""
    prefix = _LDM_PREFIX if any(k.startswith(_LDM_PREFIX) for k in state_dict) else ""
    sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    what = f"VAE from LDM{f' (keys under {prefix!r})' if prefix else ''}"
    level_attn = [k for k in sd if re.match(r"(encoder\.down|decoder\.up)\.\d+\.attn\.", k)]
    if level_attn:
        raise ValueError(f"{what}: checkpoint tensor {level_attn[0]!r} is an attention block inside a resolution "
                         "level (LDM attn_resolutions); the project VAE has attention only in the mid blocks")
    exp = _expected(cfg)
    return {"params": assign_checked(exp, _ldm_entries(exp, len(cfg.channel_mult)), sd, what,
                                     ignore=lambda k: not k.startswith(_LDM_PARTS))}


def params_to_ldm(params, cfg: vae_lib.VAEConfig, prefix: str = "") -> dict[str, np.ndarray]:
    """Project params -> original-format state dict of numpy arrays (prefix='first_stage_model.' for a full
    LDM / SD checkpoint)."""
    sd = _export(params, cfg, lambda exp: _ldm_entries(exp, len(cfg.channel_mult)), "VAE to LDM")
    return {prefix + k: v for k, v in sd.items()}


def load_ldm_checkpoint(path: str, cfg: vae_lib.VAEConfig, trust_pickle: bool = False) -> dict:
    """An original-format .ckpt / .pt / .pth / .bin / .safetensors file (an LDM autoencoder checkpoint, SD's
    model.ckpt) -> project params {'params': ...}. The file carries no config: `cfg` must match it.
    `trust_pickle`: see read_weights_file (Lightning .ckpt files need it)."""
    return params_from_ldm(read_weights_file(path, trust_pickle), cfg)
