"""UniFluid, demo size: the model `make demo` trains on the embedded shapes dataset (CPU, minutes).

Gemma-2-style 4 layers x 128 wide, SigLIP tiny/8 at 32 px (16 prefix tokens), the frozen tiny VAE at 64 px
(8x8x4 latent -> 16 tokens of 16 dims), diffusion head 3 x 256. Mixed t2i + caption + vqa batches.
    python -m unifluid_jax.main --config=configs/unifluid_demo.py:data=DIR,vae=VAE_RUN --workdir=DIR
Arg: comma-separated data=, vae=, steps=, batch=, scaling=(the VAE's latent scaling factor).
"""
from unifluid_jax import presets as common


def get_config(arg=None):
    a = common.parse_arg(arg)
    c = common.unifluid_config("demo", a.get("data", "workdir/shapes"), gen_size=64, und_size=32)
    c.checkpoint.init_subtrees[0]["workdir"] = a.get("vae", "")
    c.model.vae.scaling_factor = float(a.get("scaling", 1.0))
    c.train.num_steps = int(a.get("steps", 3000))
    c.train.batch_size = int(a.get("batch", 32))
    c.train.log_every = 100
    c.optimizer.lr = 1e-3
    c.optimizer.warmup_steps = 200
    c.optimizer.weight_decay = 0.0
    c.optimizer.grad_clip = 1.0
    c.checkpoint.every_steps = 500
    c.mesh = dict(data=-1, fsdp=1, tensor=1)
    # The demo is short: anneal the order over its steps like the paper does over 1M.
    return c
