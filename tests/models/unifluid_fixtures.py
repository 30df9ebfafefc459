"""A tiny UniFluid config and a hand-made mixed batch, shared by the model and inference tests."""
import numpy as np

from unifluid_jax import layout
from unifluid_jax.models import unifluid

SEP = (4,)


def tiny_config(**overrides):
    section = dict(
        llm=dict(variant="gemma2_tiny", vocab_size=64, num_layers=2),
        vae=dict(preset="tiny_f8"),              # 64 px -> 8x8x4 latent -> 16 tokens of 16 dims
        siglip=dict(variant="tiny/8"),           # 32 px -> 16 tokens
        diffusion=dict(depth=2, width=32),
        max_text_len=8, sample_latents=False)
    section.update(overrides)
    return unifluid.config_from_dict(section)


def make_batch(tasks=("t2i", "caption", "vqa", "edit"), seed=0, max_text_len=8, gen_size=64, und_size=32):
    rng = np.random.default_rng(seed)
    rows = []
    for task in tasks:
        if layout.task_id(task) in layout.UND_TASKS:
            rows.append(layout.text_layout(task, rng.integers(5, 60, 2), rng.integers(5, 60, 2), max_text_len,
                                           sep_ids=SEP))
        else:
            rows.append(layout.text_layout(task, rng.integers(5, 60, 3), None, max_text_len))
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    b = len(tasks)
    batch["task"] = np.array([layout.task_id(t) for t in tasks], np.int32)
    batch["image_gen"] = rng.uniform(-1, 1, (b, gen_size, gen_size, 3)).astype(np.float32)
    batch["image_und"] = rng.uniform(-1, 1, (b, und_size, und_size, 3)).astype(np.float32)
    return batch


def examples(batch):
    """A per-example batch (make_batch) -> a list of per-example dicts."""
    return [{k: v[i] for k, v in batch.items()} for i in range(len(batch["task"]))]


def rows(cfg, batch, layout_name="fixed", slots=0, batch_size=None):
    """A per-example batch laid out as model rows (unifluid_jax.layout); packed rows of `slots` (0: derived)."""
    spec = (layout.fixed_spec(cfg.dims) if layout_name == "fixed" else layout.packed_spec(cfg.dims, slots))
    out, _ = layout.layout_examples(examples(batch), spec, cfg.dims, layout=layout_name, batch_size=batch_size)
    return out
