"""Tiny non-Gemma tasks for fast trainer tests (selected with config.task = 'tests.train.toy_tasks:Linear')."""
import flax.linen as nn
import grain
import jax.numpy as jnp
import numpy as np

from unifluid_jax import config as config_lib
from unifluid_jax.train import task as task_lib


class _Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        w = self.param("dense/w", nn.with_logical_partitioning(nn.initializers.normal(0.5), ("embed", "mlp")),
                       (8, 16))
        b = self.param("dense/bias", nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)), (16,))
        head = self.param("frozen_head/w", nn.with_logical_partitioning(nn.initializers.normal(0.5), ("mlp", None)),
                          (16, 1))
        return jnp.tanh(x @ w + b) @ head


def _example(i):
    rng = np.random.default_rng([7, int(i)])
    x = rng.normal(size=(8,)).astype(np.float32)
    return {"x": x, "y": np.array([np.sin(x[:4].sum())], np.float32)}


class Linear(task_lib.Task):
    """Regression on fixed-size rows: the per-example mean makes gradient accumulation exact."""
    batch_logical_axes = {"x": ("act_batch", None), "y": ("act_batch", None)}

    def __init__(self, config):
        super().__init__(config)
        self.net = _Net()

    def init_params(self, rng):
        return self.net.init(rng, jnp.zeros((1, 8)))["params"]

    def loss_fn(self, params, batch, rng, step):
        err = self.net.apply({"params": params}, batch["x"]) - batch["y"]
        loss = jnp.mean(err ** 2)
        return loss, {"mse": loss}

    def make_input(self, config, process_index, process_count):
        gb = config.train.batch_size
        local = gb // process_count

        def ex(j):
            step, r = divmod(int(j), local)
            return _example(step * gb + process_index * local + r)

        ds = grain.MapDataset.range(1 << 30).map(ex).batch(local, drop_remainder=True)
        return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))


def linear_config(**train):
    c = config_lib.defaults()
    c.task = "tests.train.toy_tasks:Linear"
    c.train.update(dict(num_steps=6, batch_size=8, log_every=1), **train)
    c.optimizer.lr = 1e-2
    c.checkpoint.every_steps = 3
    c.checkpoint.async_save = False
    return c
