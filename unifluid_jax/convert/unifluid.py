"""The whole UniFluid model <-> one folder of PyTorch-ecosystem checkpoints (export, and import back).

    DIR/language_model/   transformers Gemma2ForCausalLM (GemmaForCausalLM for Gemma-1) save_pretrained folder,
                          plus the run's SentencePiece `tokenizer.model`
    DIR/vision_encoder/   transformers SiglipVisionModel folder (patch tokens after post_layernorm)
    DIR/vae/              diffusers AutoencoderKL folder; its config carries the run's latent `scaling_factor`
    DIR/unifluid/         model.safetensors (the UniFluid-specific weights, names below) + config.json
    DIR/README.md         how to load and run it

UniFluid-specific tensor names (PyTorch layouts: Linear weight is (out, in)):
    img_in.weight (D, C), img_in.bias (D,)        image-token projection Linear(C -> D)
    pos2d (n, D), next_pos2d (n, D)                2D position / next-position tables (raster index)
    boi (D,)                                       begin-of-image embedding
    und_proj.weight (D, W_siglip), und_proj.bias   SigLIP tokens -> LLM width (absent without SigLIP)
    head.*                                         the diffusion head, MAR's SimpleMLPAdaLN state dict names:
        head.input_proj, head.time_embed.mlp.{0,2}, head.cond_embed, head.res_blocks.{i}.{in_ln, mlp.0, mlp.2,
        adaLN_modulation.1}, head.final_layer.{adaLN_modulation.1, linear}  (.weight / .bias)

Python API::

    from unifluid_jax.convert import unifluid as conv
    conv.export_params(params, model_cfg, "DIR", tokenizer="tok.model", extra={"caption_prompt": ...})
    params = conv.import_params("DIR", model_cfg)     # exact inverse; a mismatch names tensor + shapes
    model_cfg = conv.config_from_folder("DIR")        # the UniFluidConfig the folder was exported from
CLI: `python -m unifluid_jax.main --config=... --workdir=RUN --mode=export --config.export.out=DIR`.
"""
from __future__ import annotations

import json
import os
import re
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from unifluid_jax.checks import check_tree_shapes
from unifluid_jax.convert import gemma as gemma_conv
from unifluid_jax.convert import siglip as siglip_conv
from unifluid_jax.convert import vae as vae_conv
from unifluid_jax.models import unifluid as unifluid_lib

LM, VISION, VAE, UNIFLUID = "language_model", "vision_encoder", "vae", "unifluid"
WEIGHTS = "model.safetensors"
FORMAT = "unifluid_jax export v1"
_TOP = ("img_in", "pos2d", "next_pos2d", "boi", "und_proj", "head")  # project subtrees stored in DIR/unifluid


class ExportError(ValueError):
    """The folder or the params do not fit the model config (names the tensor and both shapes)."""


# --- project path <-> UniFluid-specific tensor name ----------------------------------------------------------

def _torch_name(path: tuple[str, ...]) -> str:
    """('head', 'res_blocks_0', 'mlp_0', 'kernel') -> 'head.res_blocks.0.mlp.0.weight' (MAR's names)."""
    parts = []
    for p in path[:-1]:
        m = re.fullmatch(r"(res_blocks|mlp)_(\d+)", p)
        parts += [m[1], m[2]] if m else [p]
        if p == "adaLN_modulation":  # MAR: nn.Sequential(SiLU, Linear)
            parts.append("1")
    leaf = path[-1]
    if len(path) == 1:  # a bare table: pos2d, next_pos2d, boi
        return leaf
    return ".".join(parts + [{"kernel": "weight", "scale": "weight", "bias": "bias"}[leaf]])


def _to_torch(path, x):
    return np.ascontiguousarray(x.T) if path[-1] == "kernel" else x


def _expected_params(cfg: unifluid_lib.UniFluidConfig) -> dict:
    """Abstract (unboxed) param tree of the model, without allocating it."""
    from unifluid_jax.tasks.unifluid import example_batch
    model = unifluid_lib.UniFluid(cfg)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), example_batch(cfg),
                                                 method=unifluid_lib.UniFluid.init_all))
    return nn.unbox(abstract)["params"]


def _check_tree(got, expected, what: str):
    """Raises ExportError at the first param whose presence or shape differs from the config's."""
    check_tree_shapes(traverse_util.flatten_dict(nn.unbox(got)), traverse_util.flatten_dict(expected), what,
                      "config", ExportError)


# --- config ---------------------------------------------------------------------------------------------------

def folder_config(cfg: unifluid_lib.UniFluidConfig, model_section: dict, extra: dict | None = None) -> dict:
    """DIR/unifluid/config.json: everything the PyTorch port needs besides the three component folders."""
    d = cfg.diffusion
    out = {
        "format": FORMAT, "width": cfg.width, "token_dim": cfg.token_dim, "patch_size": cfg.patch_size,
        "latent_channels": cfg.vae.latent_channels, "latent_size": cfg.vae.latent_size,
        "image_size": cfg.vae.image_size, "grid": cfg.grid, "num_image_tokens": cfg.n_img,
        "und_image_size": cfg.siglip.image_size if cfg.siglip is not None else None,
        "num_und_tokens": cfg.n_und, "max_text_len": cfg.max_text_len, "order_mode": cfg.order_mode,
        "edit_source": list(cfg.edit_source), "scaling_factor": cfg.vae.scaling_factor,
        "diffusion": {"depth": d.depth, "width": d.width, "in_channels": d.in_channels, "freq_dim": d.freq_dim,
                      "num_train_steps": d.num_train_steps, "num_sampling_steps": d.num_sampling_steps,
                      "schedule": d.schedule, "learn_sigma": d.learn_sigma, "sample_clip_x0": d.sample_clip_x0},
        "special_ids": {"pad": 0, "eos": 1, "bos": 2, "unk": 3},
        "model": model_section,  # the run's config.model, so import can rebuild the exact config
    }
    out.update(extra or {})
    return out


def config_from_folder(folder: str) -> unifluid_lib.UniFluidConfig:
    path = os.path.join(folder, UNIFLUID, "config.json")
    if not os.path.exists(path):
        raise ExportError(f"{folder} is not a UniFluid export: no {UNIFLUID}/config.json")
    with open(path) as f:
        return unifluid_lib.config_from_dict(json.load(f)["model"])


def _model_section(cfg_section) -> dict:
    d = cfg_section.to_dict() if hasattr(cfg_section, "to_dict") else dict(cfg_section)
    return json.loads(json.dumps(d, default=list))


# --- export ---------------------------------------------------------------------------------------------------

def check_out_dir(out: str, overwrite: bool) -> None:
    if not out:
        raise ExportError("no output folder: set --config.export.out=DIR")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise ExportError(f"export folder {out} is not empty; choose an empty one or set "
                          "--config.export.overwrite=True (replaces its language_model/, vision_encoder/, vae/, "
                          "unifluid/ and README.md)")


def export_params(params, cfg: unifluid_lib.UniFluidConfig, out: str, *, model_section, tokenizer: str = "",
                  extra: dict | None = None, overwrite: bool = False) -> None:
    """Writes DIR (module docstring) from UniFluid params (the serving / EMA weights)."""
    check_out_dir(out, overwrite)
    params = nn.unbox(params["params"] if "params" in params else params)
    params = jax.tree.map(np.asarray, params)
    _check_tree(params, _expected_params(cfg), "export")
    for sub in (LM, VISION, VAE, UNIFLUID):
        shutil.rmtree(os.path.join(out, sub), ignore_errors=True)
    os.makedirs(out, exist_ok=True)
    gemma_conv.save_hf_checkpoint(params["llm"], cfg.llm, os.path.join(out, LM))
    if tokenizer:
        shutil.copyfile(tokenizer, os.path.join(out, LM, "tokenizer.model"))
    if cfg.siglip is not None:
        _save_siglip(params["siglip"], cfg.siglip, os.path.join(out, VISION))
    vae_conv.save_diffusers({"params": params["vae"]}, cfg.vae, os.path.join(out, VAE))
    _save_unifluid(params, os.path.join(out, UNIFLUID), folder_config(cfg, _model_section(model_section), extra))
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(_README)


def _save_siglip(params, cfg, folder: str) -> None:
    import transformers
    from safetensors.numpy import save_file
    os.makedirs(folder, exist_ok=True)
    save_file(siglip_conv.to_hf({"params": params}, cfg), os.path.join(folder, WEIGHTS), metadata={"format": "pt"})
    hc = transformers.SiglipVisionConfig(**siglip_conv.hf_config(cfg))
    hc.architectures = ["SiglipVisionModel"]
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hc.to_dict(), f, indent=2, default=str)


def unifluid_tensors(params) -> dict[str, np.ndarray]:
    """The UniFluid-specific subtrees -> {name: numpy} (names in the module docstring)."""
    flat = traverse_util.flatten_dict({k: params[k] for k in _TOP if k in params})
    return {_torch_name(p): _to_torch(p, np.asarray(v, np.float32)) for p, v in flat.items()}


def _save_unifluid(params, folder: str, config: dict) -> None:
    from safetensors.numpy import save_file
    os.makedirs(folder, exist_ok=True)
    save_file(unifluid_tensors(params), os.path.join(folder, WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)


# --- import ---------------------------------------------------------------------------------------------------

def _subdir(folder, name):
    path = os.path.join(folder, name)
    if not os.path.isdir(path):
        raise ExportError(f"{folder} is not a UniFluid export: no {name}/ folder")
    return path


def import_params(folder: str, cfg: unifluid_lib.UniFluidConfig) -> dict:
    """DIR -> UniFluid params (unboxed jnp arrays, the layout `cfg` expects); exact inverse of export_params.
    A folder from another config raises at the first mismatching tensor, naming it and both shapes."""
    from safetensors.numpy import load_file
    expected = _expected_params(cfg)
    try:
        params = {"llm": gemma_conv.load_hf_checkpoint(_subdir(folder, LM), cfg.llm)}
        if cfg.siglip is not None:
            params["siglip"] = siglip_conv.load_hf(_subdir(folder, VISION), cfg.siglip)[1]["params"]
        params["vae"] = vae_conv.load_diffusers(_subdir(folder, VAE), cfg.vae)[1]["params"]
    except (ValueError, FileNotFoundError) as e:  # CheckpointError is a ValueError
        raise ExportError(f"import {folder}: {e}") from e
    tensors = load_file(os.path.join(_subdir(folder, UNIFLUID), WEIGHTS))
    flat = {}
    for path, leaf in traverse_util.flatten_dict({k: expected[k] for k in _TOP if k in expected}).items():
        name = _torch_name(path)
        want = _to_torch(path, np.empty(leaf.shape, np.float32)).shape
        if name not in tensors:
            raise ExportError(f"import {folder}: {UNIFLUID}/{WEIGHTS} has no tensor {name!r} (expected {want})")
        if tensors[name].shape != want:
            raise ExportError(f"import {folder}: tensor {UNIFLUID}/{name} has shape {tensors[name].shape} but the "
                              f"config expects {want}; the folder was exported from a different config")
        flat[path] = jnp.asarray(_to_torch(path, tensors.pop(name)), leaf.dtype)
    if tensors:
        raise ExportError(f"import {folder}: {UNIFLUID}/{WEIGHTS} has tensors the config does not use, first "
                          f"{sorted(tensors)[0]!r}")
    params.update(traverse_util.unflatten_dict(flat))
    _check_tree(params, expected, f"import {folder}")
    return jax.tree.map(lambda x, e: jnp.asarray(x, e.dtype), params, expected)


# --- `--mode=export` ------------------------------------------------------------------------------------------

def available_steps(workdir: str) -> list[int]:
    from unifluid_jax.train import checkpoint as ckpt_lib
    d = ckpt_lib.checkpoint_dir(workdir)
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def export_run(config, workdir: str) -> str:
    """main.py MODES entry: the run's serving (EMA) params at config.infer.step (-1: latest) -> config.export.out."""
    from unifluid_jax.config import ConfigError
    from unifluid_jax.inference import cli
    ex = config.get("export", {})
    out, overwrite = ex.get("out", ""), bool(ex.get("overwrite", False))
    step = int(config.infer.get("step", -1)) if "infer" in config else -1
    steps = available_steps(workdir)
    if not steps or (step >= 0 and step not in steps):
        raise ConfigError(f"--workdir={workdir}: {'no checkpoint' if not steps else f'no checkpoint at step {step}'}"
                          f"; available steps: {steps or 'none (train first)'}")
    try:
        check_out_dir(out, overwrite)
    except ExportError as e:
        raise ConfigError(str(e)) from None
    model, variables = cli.load_model(config, workdir)
    extra = {"caption_prompt": config.data.get("caption_prompt", "caption en"),
             "step": step if step >= 0 else steps[-1]}
    export_params(variables["params"], model.config, out, model_section=config.model,
                  tokenizer=config.data.get("tokenizer", ""), extra=extra, overwrite=overwrite)
    print(f"exported step {extra['step']} of {workdir} to {out}")
    return out


_README = """# UniFluid export

Written by `python -m unifluid_jax.main --mode=export` (unifluid_jax). Folders:

- `language_model/`: `transformers.Gemma2ForCausalLM.from_pretrained(..., attn_implementation="eager")`
  (eager: the SDPA path ignores Gemma-2's attention softcap); `tokenizer.model` is the run's SentencePiece
  model (`sentencepiece.SentencePieceProcessor(model_file=...)`; ids pad 0, eos 1, bos 2, unk 3).
- `vision_encoder/`: `transformers.SiglipVisionModel.from_pretrained(...)`; UniFluid uses its
  `last_hidden_state` (after post_layernorm), projected by `und_proj`, as the understanding prefix.
- `vae/`: `diffusers.AutoencoderKL.from_pretrained(...)`; image tokens are 2x2 patches (channel-major) of
  `latent * config.scaling_factor`.
- `unifluid/`: `model.safetensors` (img_in, pos2d, next_pos2d, boi, und_proj, head.* with MAR's
  SimpleMLPAdaLN names) and `config.json` (sizes, patch size, text length, diffusion settings, order mode).

Run it in PyTorch (`pip install -e .[torch]` in unifluid_jax; the port imports nothing from JAX):

```python
from unifluid_jax.torch_port import UniFluidTorch
m = UniFluidTorch.from_folder("THIS_DIR")
images = m.generate(["a red circle"], cfg_scale=3.0, num_steps=100, seed=0)        # [B, 3, H, W] in [-1, 1]
print(m.caption(images_224, method="beam", beam_size=2))                            # images [B, 3, U, U]
print(m.answer(images_224, ["what colour is the circle?"]))
```

Back into JAX: `unifluid_jax.convert.unifluid.import_params("THIS_DIR", config)`.
"""
