"""Toy LM: a tiny Gemma-2 learns copy / reverse / sort of digit strings (unifluid_jax/tasks/lm.py).

    python -m unifluid_jax.main --config=configs/lm_tiny.py --workdir=/tmp/lm_tiny
    python -m unifluid_jax.main --config=configs/lm_tiny.py:steps=200 --config.mesh.tensor=2 --workdir=...
Arg (optional): 'steps=N' or comma-separated key=value of train.num_steps / train.batch_size.
"""
from unifluid_jax import config as config_lib


def get_config(arg: str | None = None):
    c = config_lib.defaults()
    c.task = "lm"
    c.gemma = dict(variant="gemma2_tiny", num_layers=2, width=32, num_heads=4, num_kv_heads=2, head_dim=8,
                   mlp_dim=64, vocab_size=32, sliding_window=8)
    c.data = dict(seed=0, min_len=2, max_len=6, ops=("copy", "reverse", "sort"), num_threads=0, prefetch=0)
    c.train.num_steps = 300
    c.train.batch_size = 16
    c.train.log_every = 25
    c.train.eval_every = 100
    c.optimizer.lr = 3e-3
    c.optimizer.warmup_steps = 20
    c.optimizer.weight_decay = 0.0
    c.checkpoint.every_steps = 100
    for kv in filter(None, (arg or "").split(",")):
        k, v = kv.split("=")
        field = {"steps": "num_steps", "batch": "batch_size"}.get(k, k)
        c.train[field] = int(v)
    return c
