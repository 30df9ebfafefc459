"""The sequence layout: THE contract between the data pipeline and the unified model.

Every example, whatever its task, has the same fixed slot structure, so a mixed batch is one tensor program:

    [und: n_und] [src: n_src] [text: max_text_len] [gen: 1 + n_img]
     SigLIP       VAE tokens   BOS prompt ... answer  BOI + target image tokens
     tokens       of the edit   EOS, then padding
                  source

- und slots are valid for caption / vqa, and for edit when the edit source enters through SigLIP
  (`edit_und=True`); mask_ar 0 (bidirectional prefix).
- src slots (n_src = 0 unless edit-with-VAE-source is configured) are valid only for edit; mask_ar 0.
- text slots carry `text_input_mask` / `text_mask_ar` from `text_layout`.
- gen slots (BOI + n_img) are valid for t2i / edit; mask_ar 1 each (causal).

Text segment per task (Gemma ids: pad 0, eos 1, bos 2, unk 3):

- t2i / edit:      [BOS prompt...] all prefix (mask_ar 0), no text loss; then padding.
- caption / vqa:   [BOS question... SEP] prefix (mask_ar 0), then [answer... EOS] causal (mask_ar 1 each);
                   loss_mask 1 where the token is a prediction target (answer tokens and EOS; the model
                   predicts token p from the hidden state at p - 1). For caption the question is the fixed
                   `caption_prompt` (default "caption en"). SEP is the tokenization of "\n" (PaliGemma).
- padding:         token 0, input_mask 0, mask_ar 0, loss 0.

Attention rule (big_vision PaliGemma): s is visible to t iff cumsum(mask_ar)[s] <= cumsum(mask_ar)[t] and
both are valid. Small example, vqa with n_und=2, n_src=0, max_text_len=7, n_img=2, question "q", answer "a":

    slot       u0 u1 | BOS q  SEP a  EOS pad pad | BOI i0 i1
    input_mask  1  1 |  1  1   1  1   1   0   0  |  0   0  0
    mask_ar     0  0 |  0  0   0  1   1   0   0  |  1   1  1
    loss_mask      - |  0  0   0  1   1   0   0  |  -
    -> u0..SEP see each other (prefix); `a` sees the prefix and itself; EOS sees all valid tokens.

The same example as t2i: und invalid; text [BOS p pad ...] all mask_ar 0; BOI, i0, i1 valid with
mask_ar 1, so BOI sees the prompt and itself, i0 sees BOI too, and so on (diffusion loss on the image
tokens, i.e. on the outputs at BOI .. i_{n-2}).

This module is pure numpy / array-API: mask helpers take `xp=np` or `xp=jax.numpy`.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

TASKS = ("t2i", "caption", "vqa", "edit")
T2I, CAPTION, VQA, EDIT = range(4)
TASK_IDS = {name: i for i, name in enumerate(TASKS)}
UND_TASKS = (CAPTION, VQA)  # tasks whose text has an answer (text loss)
GEN_TASKS = (T2I, EDIT)  # tasks that generate an image (diffusion loss)

PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3


class TextTooLongError(ValueError):
    """The text does not fit in max_text_len (and truncation is off or cannot help)."""


class EmptyTextError(ValueError):
    """The answer of a caption/vqa training example is empty (the pipeline also rejects empty prompts)."""


def task_id(task) -> int:
    """Task name or id -> id; raises ValueError for anything else."""
    if isinstance(task, str):
        if task not in TASK_IDS:
            raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")
        return TASK_IDS[task]
    t = int(task)
    if not 0 <= t < len(TASKS):
        raise ValueError(f"unknown task id {t}; valid ids 0..{len(TASKS) - 1} for {TASKS}")
    return t


def text_layout(task, prompt_ids: Sequence[int], answer_ids: Sequence[int] | None, max_len: int,
                truncate: bool = False, sep_ids: Sequence[int] = ()) -> dict[str, np.ndarray]:
    """Lays out one example's text segment (see the module docstring).

    Args:
      task: name or id.
      prompt_ids: prompt (t2i/edit) or question (caption/vqa) ids, without BOS. An empty t2i/edit prompt
        gives [BOS] alone (the unconditional input for classifier-free guidance).
      answer_ids: answer ids without EOS (caption/vqa); ignored for t2i/edit. For caption/vqa, None lays
        out the prefix only ([BOS question SEP], for decoding); an empty sequence raises EmptyTextError.
      max_len: the text segment length L.
      truncate: cut the prompt's tail to fit instead of raising TextTooLongError.
      sep_ids: the ids of "\\n" (`Tokenizer.sep_ids`), placed after the question for caption/vqa.

    Returns dict of int32 [L] arrays: text_tokens, text_input_mask, text_mask_ar, text_loss_mask.
    """
    t = task_id(task)
    prompt = [int(i) for i in prompt_ids]
    suffix, tail = [], []
    if t in UND_TASKS:
        suffix = list(sep_ids)
        if answer_ids is not None:
            answer = [int(i) for i in answer_ids]
            if not answer:
                raise EmptyTextError(f"{TASKS[t]}: empty answer")
            tail = answer + [EOS_ID]
    fixed = 1 + len(suffix) + len(tail)  # BOS + SEP + answer + EOS
    if fixed + len(prompt) > max_len:
        room = max_len - fixed
        if not truncate or room < 0:
            raise TextTooLongError(
                f"{TASKS[t]}: text needs {fixed + len(prompt)} tokens > max_text_len={max_len}"
                + ("" if not truncate else " even after truncating the prompt"))
        prompt = prompt[:room]
    prefix = [BOS_ID] + prompt + suffix
    n_pre, n_tail = len(prefix), len(tail)
    out = {k: np.zeros((max_len,), np.int32)
           for k in ("text_tokens", "text_input_mask", "text_mask_ar", "text_loss_mask")}
    out["text_tokens"][:n_pre + n_tail] = prefix + tail
    out["text_input_mask"][:n_pre + n_tail] = 1
    out["text_mask_ar"][n_pre:n_pre + n_tail] = 1
    out["text_loss_mask"][n_pre:n_pre + n_tail] = 1
    return out


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
