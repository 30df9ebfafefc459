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

from unifluid_jax import layout
from unifluid_jax.config import check
from unifluid_jax.data import packing, pipeline
from unifluid_jax.models import unifluid
from unifluid_jax.tasks.inputs import SkipCounter, host_iterator
from unifluid_jax.train import task as task_lib


def example_batch(model_cfg: unifluid.UniFluidConfig, batch_size: int = 1) -> dict[str, np.ndarray]:
    """Fixed-layout rows of zero examples (one t2i per row) with every field the model reads (for init)."""
    g, L = model_cfg.vae.image_size, model_cfg.max_text_len
    ex = {"task": layout.T2I, **layout.text_layout("t2i", [], None, L),
          "image_gen": np.zeros((g, g, 3), np.float32)}
    images = {"image_gen": ((g, g, 3), np.float32)}
    if model_cfg.siglip is not None:
        u = model_cfg.siglip.image_size
        images["image_und"] = ((u, u, 3), np.float32)
    if model_cfg.n_src:
        images["image_src"] = ((g, g, 3), np.float32)
    batch, _ = layout.layout_examples([ex] * batch_size, layout.fixed_spec(model_cfg.dims), model_cfg.dims,
                                      layout="fixed", image_spec=images)
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
    tasks = {s.get("task") for s in data.sources}
    tasks = layout.TASKS if "" in tasks or None in tasks else tuple(tasks)  # record tasks: any
    try:
        packing.check_config(data, model_cfg.dims, tasks)
    except layout.LayoutError as e:
        check(False, "data.layout", str(e))


class UniFluidTask(task_lib.Task):

    def __init__(self, config):
        super().__init__(config)
        self.model_config = unifluid.config_from_dict(config.model)
        self.model = unifluid.UniFluid(self.model_config)
        spec = self.batch_shapes(1)
        self.batch_logical_axes = {k: ("act_batch",) + (None,) * (len(shape) - 1)
                                   for k, (shape, _) in spec.items()}

    def batch_shapes(self, batch_size: int) -> dict:
        """{field: (shape, dtype)} of a step's batch of laid-out rows (tools/aot.py reads this)."""
        return pipeline.batch_spec(self.config.data, batch_size, self.model_config.dims)

    @classmethod
    def validate_config(cls, config) -> None:
        unifluid.validate_config(config.model, "model")
        pipeline.validate_config(config.data, "data")
        check_data_matches_model(config.data, unifluid.config_from_dict(config.model))
        from unifluid_jax.inference import generate
        for section in ("eval", "infer"):
            sched = config.get(section, {}).get("cfg_schedule", "linear")
            check(sched in generate.CFG_SCHEDULES, f"{section}.cfg_schedule",
                  f"{sched!r} is unknown; choose one of {list(generate.CFG_SCHEDULES)}")

    def init_params(self, rng):
        batch = example_batch(self.model_config)
        return self.model.init(rng, batch, method=unifluid.UniFluid.init_all)["params"]

    def loss_fn(self, params, batch, rng, step):
        return self.model.apply({"params": params}, batch, rng, step, self.config.train.num_steps,
                                method=unifluid.UniFluid.loss)

    def make_input(self, config, process_index: int, process_count: int):
        return self.track_input(SkipCounter(host_iterator(config, process_index, process_count,
                                                          dims=self.model_config.dims)))

    def eval_fn(self, params, step, writer):
        """evals/suite.py on config.eval (GenEval, FD, CIDEr, VQA); numbers to tensorboard, files to
        WORKDIR/eval/STEP."""
        from unifluid_jax.evals import suite
        e = self.config.eval
        out_dir = os.path.join(writer.workdir, "eval", str(step)) if jax.process_index() == 0 else None
        res = suite.evaluate_section(self.model, {"params": params}, e, out_dir=out_dir,
                                     caption_prompt=self.config.data.caption_prompt)
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
        return int((np.asarray(batch["segment_ids"]) > 0).sum())
