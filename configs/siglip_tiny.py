"""Tiny SigLIP (image tower = the SigLIP of the UniFluid config of that size; the demo's reads 64 px) trained
with the sigmoid loss on the shapes dataset's image-caption pairs; UniFluid loads its image tower into `siglip`
(checkpoint.init_subtrees with src='img', dst='siglip').

    python -m unifluid_jax.main --config=configs/siglip_tiny.py:data=/tmp/shapes --workdir=/tmp/siglip_tiny
Arg: comma-separated data=DIR, size=demo|tiny (which UniFluid config's SigLIP), und=SIZE/PATCH/WIDTH (the image
tower of configs/unifluid_demo.py's `und=`; overrides size=), steps=N, batch=N, lr=X.
Writes siglip_stats.json (held-out image->text / text->image retrieval top-1 and chance) at every evaluation.
"""
import os

import ml_collections

from unifluid_jax import config as config_lib
from unifluid_jax import presets as common
from unifluid_jax.models import siglip


def get_config(arg=None):
    a = common.parse_arg(arg)
    data_dir = a.get("data", "workdir/shapes")
    size = a.get("size", "demo")
    c = config_lib.defaults()
    c.task = "siglip"
    image = common.demo_siglip(a["und"]) if "und" in a else dict(common.SIGLIP[size])
    c.model = ml_collections.ConfigDict(dict(
        image=dict(image, pool="map"),  # the SigLIP the UniFluid config of that size uses
        text=dict(variant="tiny"), temperature_init=10.0, bias_init=-10.0))
    c.data = common.shapes_data(data_dir, weights={"caption": 1.0}, und_size=siglip.config_from_dict(image).image_size)
    for s in c.data.sources:
        s["task"] = "caption"
    c.siglip_train = ml_collections.ConfigDict(dict(
        eval_examples=500,
        eval_sources=[{"path": os.path.join(data_dir, "val", "caption"), "kind": "array_record", "weight": 1.0,
                       "task": "caption"}]))
    c.train.num_steps = int(a.get("steps", 500))
    c.train.batch_size = int(a.get("batch", 64))
    c.train.log_every = 50
    c.train.eval_every = c.train.num_steps
    # SPEC 11 / big_vision SigLIP: AdamW (b2 0.95), lr 1e-3 with warmup, weight decay 1e-4.
    c.optimizer.lr = float(a.get("lr", 1e-3))
    c.optimizer.warmup_steps = min(100, c.train.num_steps // 10)
    c.optimizer.weight_decay = 1e-4
    c.optimizer.grad_clip = 1.0
    c.checkpoint.every_steps = c.train.num_steps
    c.mesh = dict(data=-1, fsdp=1, tensor=1)
    return c
