"""UniFluid 2B (paper main model): Gemma-2 2B backbone, SigLIP So400m/14 at 224 px, SD KL-f8 VAE at 256 px.

Paper recipe (SPEC 8): AdamW lr 1e-4, 65k warmup then constant, batch 2048, 1M steps, lambda 0.005; order
annealing random -> raster between 30% and 60% of training.
    python -m unifluid_jax.main --config=configs/unifluid_2b.py:data=gs://...,vae=gs://... --workdir=gs://...

Published starting weights (checkpoint.init_subtrees; unifluid_jax/train/init_weights.py), each PATH local or gs://:
    gemma=PATH[,gemma_format=hf|flax|big_vision]   Gemma-2 2B (HF folder google/gemma-2-2b by default format)
    siglip=PATH[,siglip_format=hf|big_vision]      SigLIP So400m/14 224 (HF folder by default)
    vae=PATH[,vae_format=project|diffusers|ldm]    the VAE: a VAE run of this project (default), an SD KL-f8
                                                   diffusers folder, or an original LDM/SD checkpoint file
Without gemma= / siglip= those towers start from random weights (SigLIP stays frozen: set both for the paper).
"""
from unifluid_jax import presets as common


def get_config(arg=None):
    a = common.parse_arg(arg)
    c = common.unifluid_config(a.get("size", "2b"), a.get("data", ""), gen_size=256, und_size=224)
    c.checkpoint.init_subtrees = published_init(a)
    c.train.num_steps = 1_000_000
    c.train.batch_size = 2048
    c.train.log_every = 100
    c.optimizer.lr = 1e-4
    c.optimizer.warmup_steps = 65_000
    c.optimizer.ema_decay = 0.9999
    c.checkpoint.every_steps = 2000
    c.checkpoint.keep_every = 50_000
    c.mesh = dict(data=-1, fsdp=16, tensor=1)
    c.data.worker_count = 8
    return c


def published_init(a: dict) -> list[dict]:
    """checkpoint.init_subtrees from the config arg (see the module docstring)."""
    subs = []
    for dst, default in (("gemma", "hf"), ("siglip", "hf"), ("vae", "project")):
        if a.get(dst):
            subs.append(dict(format=a.get(f"{dst}_format", default), path=a[dst],
                             dst="llm" if dst == "gemma" else dst))
    return subs
