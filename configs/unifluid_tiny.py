"""UniFluid, tiny: CPU-sized model on the embedded shapes dataset (64 px images, 16 image tokens).

    python -m unifluid_jax.tools.build_shapes --out=/tmp/shapes --num_train=2000
    python -m unifluid_jax.main --config=configs/unifluid_tiny.py:data=/tmp/shapes --workdir=/tmp/uf_tiny
Arg: comma-separated data=DATASET_DIR, vae=VAE_WORKDIR (frozen VAE to load), steps=N, batch=N.
"""
from unifluid_jax import presets as common


def get_config(arg=None):
    a = common.parse_arg(arg)
    c = common.unifluid_config("tiny", a.get("data", "workdir/shapes"), gen_size=64, und_size=32)
    c.checkpoint.init_subtrees[0]["workdir"] = a.get("vae", "")
    c.train.num_steps = int(a.get("steps", 200))
    c.train.batch_size = int(a.get("batch", 8))
    c.train.log_every = 20
    c.optimizer.lr = 1e-3
    c.optimizer.warmup_steps = 20
    c.checkpoint.every_steps = 100
    return c
