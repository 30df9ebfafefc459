"""UniFluid, demo size: the model `make demo` trains on the embedded shapes dataset (CPU, minutes).

Gemma-2-style 4 layers x 128 wide, a 2-layer SigLIP at 64 px with 16 px patches (16 prefix tokens), the frozen tiny VAE at 64 px
(8x8x4 latent -> 16 tokens of 16 dims), diffusion head 3 x 256. Mixed t2i + caption + vqa batches.

    python -m unifluid_jax.main --config=configs/unifluid_demo.py:data=DIR,vae=VAE_RUN --workdir=DIR

Arg (comma-separated key=value; every value the demo's recipe sets, so a demo stage is reproducible from the
command line): data=, vae= (the VAE run), scaling= (its latent scaling factor), siglip= (a SigLIP run whose
image tower initialises `siglip`; empty: random), steps=, batch=, lr=, schedule= (constant | cosine | wsd),
decay_frac= (wsd's final decay share), warmup=, ema= (EMA decay of the served weights, 0 = off), mix= (task weights,
t2i:2/caption:1/vqa:1), text_weight= (lambda), order= (annealed | random | raster), anneal= (RANDOM_UNTIL/RASTER_FROM: the annealed
order is random until the first fraction of the run and raster from the second, default 0.3/0.6), train_siglip= (0/1),
batch_mul= (diffusion), seed=, und= (SigLIP image size / patch / width, default 64/16/64),
layout= (fixed | packed: examples per row, data/packing.py).
"""
from unifluid_jax import presets as common


def get_config(arg=None):
    a = common.parse_arg(arg)
    data = a.get("data", "workdir/shapes")
    siglip = common.demo_siglip(a["und"]) if "und" in a else dict(common.SIGLIP["demo"])
    und_size = siglip["image_size"]
    c = common.unifluid_config("demo", data, gen_size=64, und_size=und_size)
    c.model.siglip = siglip
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
    if "anneal" in a:  # RANDOM_UNTIL/RASTER_FROM, fractions of the run (models/order.py)
        c.model.random_until, c.model.raster_from = (float(x) for x in a["anneal"].split("/"))
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
    c.optimizer.decay_frac = float(a.get("decay_frac", c.optimizer.decay_frac))
    c.optimizer.ema_decay = float(a.get("ema", 0.0))
    c.optimizer.warmup_steps = int(a.get("warmup", 100))
    c.optimizer.weight_decay = 0.0
    c.optimizer.grad_clip = 1.0
    c.checkpoint.every_steps = 500
    c.mesh = dict(data=-1, fsdp=1, tensor=1)
    return c
