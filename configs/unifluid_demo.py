"""UniFluid, demo size: the model `make demo` trains on the embedded shapes dataset (CPU, minutes).

Gemma-2-style 4 layers x 128 wide, SigLIP tiny/8 at 32 px (16 prefix tokens), the frozen tiny VAE at 64 px
(8x8x4 latent -> 16 tokens of 16 dims), diffusion head 3 x 256. Mixed t2i + caption + vqa batches.

    python -m unifluid_jax.main --config=configs/unifluid_demo.py:data=DIR,vae=VAE_RUN --workdir=DIR

Arg (comma-separated key=value; every value the demo's recipe sets, so a demo stage is reproducible from the
command line): data=, vae= (the VAE run), scaling= (its latent scaling factor), siglip= (a SigLIP run whose
image tower initialises `siglip`; empty: random), steps=, batch=, lr=, mix= (task weights,
t2i:2/caption:1/vqa:1), text_weight= (lambda), order= (annealed | random | raster), train_siglip= (0/1),
batch_mul= (diffusion), seed=, und= (SigLIP image size / patch / width, default 32/8/32 = tiny/8),
layout= (fixed | packed: examples per row, data/packing.py).
"""
from unifluid_jax import presets as common


def get_config(arg=None):
    a = common.parse_arg(arg)
    data = a.get("data", "workdir/shapes")
    und_size, und_patch, und_width = (int(x) for x in a.get("und", "32/8/32").split("/"))
    c = common.unifluid_config("demo", data, gen_size=64, und_size=und_size)
    c.model.siglip = dict(variant="tiny/8", image_size=und_size, patch_size=und_patch, width=und_width,
                          mlp_dim=2 * und_width, num_heads=max(1, und_width // 16))
    if "mix" in a:
        weights = {k: float(v) for k, v in (kv.split(":") for kv in a["mix"].split("/"))}
        c.data.sources = common.shapes_data(data, weights=weights, gen_size=64, und_size=und_size,
                                            max_text_len=c.data.max_text_len).sources
    c.checkpoint.init_subtrees[0]["workdir"] = a.get("vae", "")
    if a.get("siglip"):
        c.checkpoint.init_subtrees.append(dict(workdir=a["siglip"], src="img", dst="siglip"))
    c.model.vae.scaling_factor = float(a.get("scaling", 1.0))
    c.model.text_weight = float(a.get("text_weight", c.model.text_weight))
    c.model.order_mode = a.get("order", c.model.order_mode)
    c.model.diffusion.batch_mul = int(a.get("batch_mul", 4))
    if int(a.get("train_siglip", 0)):  # SigLIP learns from the caption/VQA loss (only the VAE stays frozen)
        c.model.train_siglip = True
        c.optimizer.frozen_regexes = ("^vae/",)
    c.data.layout = a.get("layout", c.data.layout)
    c.seed = int(a.get("seed", c.seed))
    c.data.seed = c.seed
    c.train.num_steps = int(a.get("steps", 3000))
    c.train.batch_size = int(a.get("batch", 32))
    c.train.log_every = 100
    c.optimizer.lr = float(a.get("lr", 1e-3))
    c.optimizer.schedule = a.get("schedule", "cosine")
    c.optimizer.warmup_steps = int(a.get("warmup", 100))
    c.optimizer.weight_decay = 0.0
    c.optimizer.grad_clip = 1.0
    c.checkpoint.every_steps = 500
    c.mesh = dict(data=-1, fsdp=1, tensor=1)
    return c
