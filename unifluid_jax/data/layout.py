"""Re-export of unifluid_jax.layout (the data/model contract's home), plus the fixed layout's whole-batch
mask helpers still read by inference until it builds its rows with the layout functions."""
import numpy as np

from unifluid_jax.layout import *  # noqa: F401,F403
from unifluid_jax.layout import EDIT, GEN_TASKS, UND_TASKS  # noqa: F401


def segment_offsets(n_und: int, n_src: int, max_text_len: int, n_img: int) -> dict[str, int]:
    """Start index of each segment in the full sequence, plus 'img' (first image token) and 'total'."""
    text = n_und + n_src
    gen = text + max_text_len
    return {"und": 0, "src": n_und, "text": text, "gen": gen, "img": gen + 1, "total": gen + 1 + n_img}


def _isin(task_ids, ids, xp):
    out = xp.zeros(task_ids.shape, dtype=bool)
    for i in ids:
        out = out | (task_ids == i)
    return out


def sequence_masks(task_ids, text_input_mask, text_mask_ar, n_und: int, n_src: int, n_img: int,
                   xp=np, edit_und: bool = True):
    """Full-sequence (input_mask [B,S], mask_ar [B,S]) int32 for the layout above.

    Args:
      task_ids: [B] ints.
      text_input_mask, text_mask_ar: [B,L] from `text_layout` (batched).
      n_und, n_src, n_img: segment sizes (gen segment is 1 + n_img: BOI + image tokens).
      xp: numpy or jax.numpy.
      edit_und: edit examples also use the und (SigLIP) slots for their source image.
    """
    task_ids = xp.asarray(task_ids)
    b = task_ids.shape[0]
    und_tasks = UND_TASKS + ((EDIT,) if edit_und else ())
    und_valid = _isin(task_ids, und_tasks, xp)[:, None]
    src_valid = (task_ids == EDIT)[:, None]
    gen_valid = _isin(task_ids, GEN_TASKS, xp)[:, None]
    i32 = xp.int32
    input_mask = xp.concatenate([
        xp.broadcast_to(und_valid, (b, n_und)).astype(i32),
        xp.broadcast_to(src_valid, (b, n_src)).astype(i32),
        xp.asarray(text_input_mask).astype(i32),
        xp.broadcast_to(gen_valid, (b, 1 + n_img)).astype(i32),
    ], axis=1)
    mask_ar = xp.concatenate([
        xp.zeros((b, n_und + n_src), i32),
        xp.asarray(text_mask_ar).astype(i32),
        xp.broadcast_to(gen_valid, (b, 1 + n_img)).astype(i32),
    ], axis=1)
    return input_mask, mask_ar
