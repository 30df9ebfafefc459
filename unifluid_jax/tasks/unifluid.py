"""UniFluid training task: mixed t2i / caption / vqa / edit batches from the grain pipeline, one loss.

config.model: the unified model section (models/unifluid.py: llm, vae, siglip, diffusion, ...).
config.data:  the pipeline section (data/pipeline.py); its max_text_len / gen_size / und_size must match the
              model (checked before anything compiles).
The VAE is frozen (its params are excluded from the optimizer by `optimizer.frozen_regexes`, set in the
configs) and usually initialised from a VAE run with `checkpoint.init_subtrees`.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from unifluid_jax.config import check
from unifluid_jax.data import pipeline
from unifluid_jax.models import unifluid
from unifluid_jax.tasks.inputs import SkipCounter
from unifluid_jax.train import task as task_lib


def example_batch(model_cfg: unifluid.UniFluidConfig, batch_size: int = 1) -> dict[str, np.ndarray]:
    """A zero batch with every field the model reads (for init and AOT compilation)."""
    g, L = model_cfg.vae.image_size, model_cfg.max_text_len
    u = model_cfg.siglip.image_size if model_cfg.siglip is not None else 1
    batch = {"task": np.zeros((batch_size,), np.int32),
             "text_tokens": np.zeros((batch_size, L), np.int32),
             "text_input_mask": np.ones((batch_size, L), np.int32),
             "text_mask_ar": np.zeros((batch_size, L), np.int32),
             "text_loss_mask": np.zeros((batch_size, L), np.int32),
             "image_gen": np.zeros((batch_size, g, g, 3), np.float32),
             "image_und": np.zeros((batch_size, u, u, 3), np.float32)}
    if model_cfg.n_src:
        batch["image_src"] = np.zeros((batch_size, g, g, 3), np.float32)
    return batch


def check_data_matches_model(data, model_cfg: unifluid.UniFluidConfig) -> None:
    check(data.max_text_len == model_cfg.max_text_len, "data.max_text_len",
          f"is {data.max_text_len} but model.max_text_len is {model_cfg.max_text_len}; set both to the same value")
    check(data.gen_size == model_cfg.vae.image_size, "data.gen_size",
          f"is {data.gen_size} but the VAE expects {model_cfg.vae.image_size} px images (model.vae.image_size)")
    if model_cfg.siglip is not None:
        check(data.und_size == model_cfg.siglip.image_size, "data.und_size",
              f"is {data.und_size} but SigLIP expects {model_cfg.siglip.image_size} px images "
              "(model.siglip.image_size)")
    check(tuple(pipeline.edit_sources(data.edit_source)) == tuple(model_cfg.edit_source), "data.edit_source",
          f"is {tuple(data.edit_source)} but model.edit_source is {model_cfg.edit_source}; set both the same")


class UniFluidTask(task_lib.Task):

    def __init__(self, config):
        super().__init__(config)
        self.model_config = unifluid.config_from_dict(config.model)
        self.model = unifluid.UniFluid(self.model_config)
        spec = pipeline.batch_spec(config.data, 1)
        self.batch_logical_axes = {k: ("act_batch",) + (None,) * (len(shape) - 1)
                                   for k, (shape, _) in spec.items()}
        self._inputs: list[SkipCounter] = []

    @classmethod
    def validate_config(cls, config) -> None:
        unifluid.validate_config(config.model, "model")
        pipeline.validate_config(config.data, "data")
        check_data_matches_model(config.data, unifluid.config_from_dict(config.model))

    def init_params(self, rng):
        batch = example_batch(self.model_config)
        return self.model.init(rng, batch, method=unifluid.UniFluid.init_all)["params"]

    def loss_fn(self, params, batch, rng, step):
        return self.model.apply({"params": params}, batch, rng, step, self.config.train.num_steps,
                                method=unifluid.UniFluid.loss)

    def make_input(self, config, process_index: int, process_count: int):
        it = SkipCounter(pipeline.make_iterator(
            config.data, shard_index=process_index, shard_count=process_count,
            batch_size=config.train.batch_size // process_count))
        self._inputs.append(it)
        return it

    def host_metrics(self) -> dict[str, float]:
        return self._inputs[-1].metrics() if self._inputs else {}

    def eval_fn(self, params, step, writer):
        """evals/suite.py on config.eval (GenEval, FD, CIDEr, VQA); numbers to tensorboard, files to
        WORKDIR/eval/STEP."""
        from unifluid_jax.evals import suite
        e = self.config.eval
        out_dir = os.path.join(writer.workdir, "eval", str(step)) if jax.process_index() == 0 else None
        res = suite.evaluate(self.model, {"params": params}, e.data_dir, out_dir=out_dir, split=e.split,
                             num_geneval=e.num_geneval, num_caption=e.num_caption, num_vqa=e.num_vqa,
                             batch_size=e.batch_size, num_steps=e.num_steps, cfg_scale=e.cfg_scale,
                             temperature=e.temperature, caption_prompt=self.config.data.caption_prompt)
        flat = {}
        for group, vals in res.items():
            if isinstance(vals, dict):
                flat.update({f"eval/{group}_{k}": v for k, v in vals.items() if isinstance(v, (int, float))})
            elif isinstance(vals, (int, float)):
                flat[f"eval/{group}"] = vals
        writer.scalars(step, flat)
        return res

    def tokens_per_batch(self, batch) -> int:
        # Sequence slots that hold a real token (SigLIP, text and image tokens alike).
        c = self.model_config
        task = np.asarray(batch["task"])
        text = int(np.asarray(batch["text_input_mask"]).sum())
        und = c.n_und * int(np.isin(task, (1, 2, 3)).sum())
        gen = (1 + c.n_img) * int(np.isin(task, (0, 3)).sum())
        return text + und + gen
