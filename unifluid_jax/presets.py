"""Shared pieces of the experiment configs (configs/*.py): data sections and the UniFluid model presets.

In the package (not in configs/) so a config file loads from any working directory."""
from __future__ import annotations

import os

import ml_collections

from unifluid_jax import config as config_lib
from unifluid_jax.data import layout, pipeline


def parse_arg(arg: str | None) -> dict[str, str]:
    """'a=1,b=x' -> {'a': '1', 'b': 'x'} (the `:ARG` part of --config=configs/X.py:ARG)."""
    out = {}
    for kv in filter(None, (arg or "").split(",")):
        k, _, v = kv.partition("=")
        out[k.strip()] = v.strip()
    return out


def demo_siglip(und: str) -> dict:
    """A small SigLIP image tower from 'SIZE/PATCH/WIDTH' (the configs' `und=` arg): depth 2, heads of 16."""
    size, patch, width = (int(x) for x in und.split("/"))
    return dict(variant="tiny/8", image_size=size, patch_size=patch, width=width, mlp_dim=2 * width,
                num_heads=max(1, width // 16))


def shapes_data(dataset_dir: str, *, split: str = "train", weights: dict[str, float] | None = None,
                gen_size: int = 64, und_size: int = 32, max_text_len: int = 48) -> ml_collections.ConfigDict:
    """A pipeline section over a dataset written by tools/build_shapes.py (one source per task)."""
    weights = weights or {t: 1.0 for t in layout.TASKS}
    d = pipeline.default_config()
    d.sources = [{"path": os.path.join(dataset_dir, split, t), "kind": "array_record", "weight": float(w),
                  "task": ""} for t, w in weights.items() if w > 0]
    d.tokenizer = os.path.join(dataset_dir, "tokenizer.model")
    d.gen_size, d.und_size, d.max_text_len = gen_size, und_size, max_text_len
    d.read_threads = 2
    return d


# Model sections. `0p7b` is OPEN in the paper (it names only the size): a Gemma-2-architecture stack of about
# 0.7B parameters (0.39B of them the 256k-vocab embedding).
LLM = {
    "tiny": dict(variant="gemma2_tiny", num_layers=2, width=64, num_heads=4, num_kv_heads=2, head_dim=16,
                 mlp_dim=128, vocab_size=256, sliding_window=8),
    "demo": dict(variant="gemma2_tiny", num_layers=4, width=128, num_heads=4, num_kv_heads=2, head_dim=32,
                 mlp_dim=512, vocab_size=256, sliding_window=64),
    "0p7b": dict(variant="gemma2_2b", num_layers=14, width=1536, num_heads=12, num_kv_heads=4, head_dim=128,
                 mlp_dim=4608, dtype="bfloat16", remat_policy="nothing_saveable"),
    "2b": dict(variant="gemma2_2b", dtype="bfloat16", remat_policy="nothing_saveable"),
}
# The demo's tower reads the 64 px scenes at full resolution, 16 px patches (16 tokens) 64 wide: its held-out
# caption retrieval after the demo's 500 sigmoid-loss steps is 0.98, against 0.88 for tiny/8 (32 px, 8 px
# patches, 32 wide: small shapes are 5 px there) in the same time.
SIGLIP = {"tiny": dict(variant="tiny/8"), "demo": demo_siglip("64/16/64"),
          "0p7b": dict(variant="So400m/14", dtype="bfloat16"), "2b": dict(variant="So400m/14", dtype="bfloat16")}
VAE = {"tiny": dict(preset="tiny_f8"), "demo": dict(preset="tiny_f8", base_channels=16),
       "0p7b": dict(preset="sd_kl_f8"), "2b": dict(preset="sd_kl_f8")}
DIFFUSION = {"tiny": dict(depth=2, width=64, sample_clip_x0=5.0), "demo": dict(depth=3, width=256, sample_clip_x0=5.0),
             "0p7b": dict(depth=3, width=1024), "2b": dict(depth=3, width=1024)}
TEXT_LEN = {"tiny": 48, "demo": 48, "0p7b": 64, "2b": 64}


def unifluid_model(size: str) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        llm=LLM[size], vae=VAE[size], siglip=SIGLIP[size], diffusion=DIFFUSION[size], patch_size=2,
        max_text_len=TEXT_LEN[size], text_weight=0.005, edit_source=("siglip",),
        order_mode="annealed", random_until=0.3, raster_from=0.6, train_siglip=False, sample_latents=True))


def unifluid_config(size: str, dataset_dir: str, *, gen_size: int, und_size: int):
    """The full UniFluid training config (paper recipe, SPEC 8) for a model size on a shapes-style dataset."""
    c = config_lib.defaults()
    c.task = "unifluid"
    c.model = unifluid_model(size)
    c.data = shapes_data(dataset_dir, weights={"t2i": 1.0, "caption": 0.5, "vqa": 0.5},
                         gen_size=gen_size, und_size=und_size, max_text_len=TEXT_LEN[size])
    c.data.text_dropout = 0.1  # CFG training: t2i prompt / edit instruction -> [BOS] (per record)
    # Frozen VAE (and SigLIP unless model.train_siglip); no weight decay on the diffusion head (MAR).
    c.optimizer.frozen_regexes = ("^vae/", "^siglip/")
    c.optimizer.no_decay_regexes = ("^head/",)
    c.checkpoint.init_subtrees = [dict(workdir="", src="", dst="vae")]
    # Periodic evaluation (train.eval_every > 0) and `--mode=eval`: evals/suite.py on a shapes-style dataset.
    c.eval = dict(data_dir=dataset_dir, split="test", num_geneval=48, num_caption=48, num_vqa=48,
                  batch_size=16, num_steps=50, cfg_scale=2.0, cfg_schedule="linear", temperature=1.0)
    # --mode=sample / caption / vqa / edit (unifluid_jax/inference/cli.py).
    c.infer = dict(prompts="", images="", questions="", pairs="", out="", step=-1, batch_size=16, seed=0,
                   num_steps=100, cfg_scale=3.0, cfg_schedule="linear", temperature=1.0, order="raster",
                   method="greedy", beam_size=1)
    # --mode=export (unifluid_jax/convert/unifluid.py): DIR for transformers / diffusers / the PyTorch port.
    c.export = dict(out="", overwrite=False)
    # --mode=fid_eval (evals/coco.py): Inception weights file, reference stats (.npz or image folder), resize mode
    # ('clean' | 'pytorch_fid'), optional CLIP checkpoint folder.
    c.fid_eval = dict(inception="", ref_stats="", mode="clean", clip="", splits=10, inception_size=299)
    return c
