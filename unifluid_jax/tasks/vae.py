"""VAE training task: the KL autoencoder on the project's images (reconstruction + beta * KL).

config.vae:  the VAE section (models/vae.py: `preset` plus field overrides).
config.data: a pipeline section (data/pipeline.py) whose sources yield `image_gen` (t2i / edit records);
             `data.gen_size` must equal the VAE image size.
config.vae_train: beta (KL weight, LDM's kl_weight), eval_batches (held-out batches for PSNR),
             eval_split_sources (pipeline sources of the held-out split).
Every evaluation writes `vae_stats.json` to the workdir: held-out PSNR (also of the initial params) and the
latent scaling factor 1 / std(latents) that gives the generator unit-std tokens.
"""
from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from unifluid_jax.config import check
from unifluid_jax.data import pipeline
from unifluid_jax.models import vae as vae_lib
from unifluid_jax.tasks.inputs import SkipCounter, host_iterator
from unifluid_jax.train import sharding
from unifluid_jax.train import task as task_lib


class VAETask(task_lib.Task):
    batch_logical_axes = {"image": ("act_batch", None, None, None)}

    def __init__(self, config):
        super().__init__(config)
        self.model_config = vae_lib.config_from_dict(config.vae)
        self.model = vae_lib.AutoencoderKL(self.model_config)
        self._psnr_init: float | None = None

    @classmethod
    def validate_config(cls, config) -> None:
        vae_lib.validate_config(config.vae, "vae")
        pipeline.validate_config(config.data, "data")
        size = vae_lib.config_from_dict(config.vae).image_size
        check(config.data.gen_size == size, "data.gen_size",
              f"is {config.data.gen_size} but the VAE expects {size} px images (vae.image_size)")
        check(config.vae_train.beta >= 0, "vae_train.beta", f"must be >= 0, got {config.vae_train.beta}")

    def init_params(self, rng):
        s = self.model_config.image_size
        return self.model.init(rng, jnp.zeros((1, s, s, 3), jnp.float32))["params"]

    def loss_fn(self, params, batch, rng, step):
        del step
        return vae_lib.vae_loss({"params": params}, batch, rng, self.config.vae_train.beta, model=self.model)

    def make_input(self, config, process_index: int, process_count: int):
        return self.track_input(SkipCounter(host_iterator(config, process_index, process_count),
                                            fields={"image_gen": "image"}))

    def tokens_per_batch(self, batch) -> int:
        return int(np.asarray(batch["image"]).shape[0])

    # -- evaluation -----------------------------------------------------------------------------------

    def heldout_images(self) -> np.ndarray:
        cfg = self.config
        data = cfg.data.copy_and_resolve_references()
        with data.unlocked():
            data.sources = list(cfg.vae_train.eval_sources) or list(cfg.data.sources)
            data.shuffle, data.num_epochs, data.worker_count = False, 1, 0
        it = pipeline.make_iterator(data, shard_index=0, shard_count=1, batch_size=cfg.train.batch_size)
        images = []
        for _ in range(int(cfg.vae_train.eval_batches)):
            try:
                batch, _ = pipeline.split_stats(next(it))
            except StopIteration:
                break
            images.append(batch["image_gen"][batch["valid"] > 0])
        return np.concatenate(images)

    @functools.cached_property
    def _eval_step(self):
        def f(params, images):
            recon, mean, _ = self.model.apply({"params": params}, images)
            mse = jnp.mean(jnp.square(jnp.clip(recon, -1, 1) - images), axis=(1, 2, 3))
            return 10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-10)), mean
        return jax.jit(f)

    def evaluate(self, params, images) -> dict[str, float]:
        psnr, means = [], []
        bs = self.config.train.batch_size
        for i in range(0, len(images), bs):
            p, m = self._eval_step(params, jnp.asarray(images[i:i + bs]))
            psnr.append(np.asarray(p))
            means.append(np.asarray(m))
        means = np.concatenate(means)
        return {"psnr": float(np.mean(np.concatenate(psnr))),
                "scaling_factor": float(vae_lib.latent_scaling_factor(means)),
                "latent_std": float(np.std(means)), "num_images": int(len(images))}

    def eval_fn(self, params, step, writer):
        images = self.heldout_images()
        out = self.evaluate(params, images)
        if self._psnr_init is None:  # the untrained baseline: init (compiles the VAE init) only once per run
            init_rng = jax.random.split(jax.random.PRNGKey(int(self.config.seed)))[0]  # the trainer's init key
            self._psnr_init = self.evaluate(sharding.jit_once(self.init_params)(init_rng), images)["psnr"]
        out["psnr_init"] = self._psnr_init
        out["step"] = int(step)
        writer.scalars(step, {f"eval/vae_{k}": v for k, v in out.items() if k != "step"})
        if jax.process_index() == 0 and getattr(writer, "workdir", None):
            with open(os.path.join(writer.workdir, "vae_stats.json"), "w") as f:
                json.dump(out, f, indent=1)
        return out
