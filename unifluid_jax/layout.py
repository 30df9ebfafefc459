"""The sequence layout: THE contract between the data pipeline and the unified model (both import it).

An example has up to four segments, in this order, each present only if its task uses it:

    [und: n_und] [src: n_src] [text: 1..L] [gen: 1 + n_img]
     SigLIP       VAE tokens   BOS prompt .. answer EOS      BOI + target image tokens
     tokens       of the edit  (text_layout below)
                  source

- und: caption / vqa, and edit when the source enters through SigLIP (`edit_und`); mask_ar 0 (prefix).
- src: edit only, when n_src > 0 (edit source through the VAE); mask_ar 0.
- text: `text_layout`; t2i / edit prompt all prefix, caption / vqa [BOS question SEP] prefix then the answer
  and EOS causal (mask_ar 1 each). A CFG-dropped prompt is [BOS] alone (generation's unconditional branch).
- gen: t2i / edit; BOI and the n_img image tokens, mask_ar 1 each (causal).

ONE batch schema, produced by both layouts (`RowBatch`). Per row of S slots (leading [B] omitted):

    tokens      [S] int32   text ids (0 elsewhere)
    segment_ids [S] int32   1-based index of the example in the row, 0 = padding; non-decreasing over the
                            valid slots of a row
    mask_ar     [S] int32   big_vision block starts (0 = joins the previous block)
    kind        [S] int32   PAD / TEXT / UND / SRC / BOI / IMG
    index       [S] int32   into the row's image arrays: UND j*n_und+p (und image j, patch p), SRC g*n_img+p,
                            BOI / IMG g*(1+n_img)+k (k = 0 for BOI, k for image token p(k-1))
    tgt_slot, tgt_label, tgt_task [T] int32  text-loss targets: the slot whose NEXT slot is the target, the
                            target id, the example's task (-1 = unused entry)
    image_und   [U, u, u, 3] float32        und images (edit sources through SigLIP included)
    image_gen   [G, g, g, 3] or gen_tokens [G, n_img, C]   gen targets (gen_tokens: the latent cache)
    image_src   [G, g, g, 3] or src_tokens [G, n_img, C]   edit sources through the VAE (if n_src)
    und_start   [U] int32   slot of the first patch of und image j, -1 if absent
    gen_start   [G] int32   slot of BOI of gen image g, -1 if absent
    gen_uid     [G] int32   per-example id, unique within a step: keys the example's random order, latent
                            sample and diffusion t / noise, so an example draws the same in any layout
    task_count  [NUM_TASKS] int32  examples of each task in the row

RoPE positions (models/masks.segment_positions) count the valid slots of the same segment (padding skipped).
Attention: s is visible to t iff both are in the same segment > 0 and cumsum(mask_ar)[s] <= cumsum(mask_ar)[t]
(big_vision PaliGemma within one example).

Layouts (`data.layout`):
- 'fixed': one example per row at fixed offsets [und | src | text (L slots) | BOI + img], unused segments and
  the text tail left as padding; U = G = 1, T = L - 1. The reference layout.
- 'packed': examples laid out with only the segments their task uses, contiguously, first-fit into the B rows
  of a batch (`RowBatch.add`), within S slots and U / G / T capacities per row.

Text segment per task (Gemma ids: pad 0, eos 1, bos 2, unk 3): see `text_layout`; the model predicts
token i from the hidden state at slot i - 1. This module is pure numpy.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

TASKS = ("t2i", "caption", "vqa", "edit")
T2I, CAPTION, VQA, EDIT = range(4)
NUM_TASKS = len(TASKS)
TASK_IDS = {name: i for i, name in enumerate(TASKS)}
UND_TASKS = (CAPTION, VQA)  # tasks whose text has an answer (text loss)
GEN_TASKS = (T2I, EDIT)  # tasks that generate an image (diffusion loss)

PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3

KINDS = ("pad", "text", "und", "src", "boi", "img")
K_PAD, K_TEXT, K_UND, K_SRC, K_BOI, K_IMG = range(len(KINDS))
LAYOUTS = ("fixed", "packed")
# Per-example image fields -> which row capacity holds them.
UND_FIELDS = ("image_und",)
GEN_FIELDS = ("image_gen", "gen_tokens", "image_src", "src_tokens")


class TextTooLongError(ValueError):
    """The text does not fit in max_text_len (and truncation is off or cannot help)."""


class EmptyTextError(ValueError):
    """The answer of a caption/vqa training example is empty (the pipeline also rejects empty prompts)."""


class LayoutError(ValueError):
    """An example (or a task mix) cannot be laid out in the configured rows."""


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
    """Lays out one example's text segment, left-aligned in max_len slots.

    Args:
      task: name or id.
      prompt_ids: prompt (t2i/edit) or question (caption/vqa) ids, without BOS. An empty t2i/edit prompt
        gives [BOS] alone (the unconditional input for classifier-free guidance).
      answer_ids: answer ids without EOS (caption/vqa); ignored for t2i/edit. For caption/vqa, None lays
        out the prefix only ([BOS question SEP], for decoding); an empty sequence raises EmptyTextError.
      max_len: the text segment length L.
      truncate: cut the prompt's tail to fit instead of raising TextTooLongError.
      sep_ids: the ids of "\\n" (`Tokenizer.sep_ids`), placed after the question for caption/vqa.

    Returns dict of int32 [L] arrays: text_tokens, text_input_mask, text_mask_ar, text_loss_mask (1 where the
    token is a prediction target: answer tokens and EOS).
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


# ----------------------------------------------------------------------------------------------- row specs

@dataclasses.dataclass(frozen=True)
class Dims:
    """Per-example segment sizes (from the model config: `UniFluidConfig.dims`)."""
    n_und: int              # SigLIP patches (0: no understanding prefix)
    n_src: int              # edit source VAE tokens (0 unless edit_source has 'vae')
    n_img: int              # image tokens
    max_text_len: int       # L
    edit_und: bool = True   # edit sources also enter through SigLIP

    def uses(self, task: int) -> tuple[bool, bool, bool]:
        """(und, src, gen) segments the task uses."""
        und = self.n_und > 0 and (task in UND_TASKS or (task == EDIT and self.edit_und))
        return und, self.n_src > 0 and task == EDIT, task in GEN_TASKS

    @property
    def fixed_len(self) -> int:
        return self.n_und + self.n_src + self.max_text_len + 1 + self.n_img

    def slots(self, task: int, n_text: int) -> int:
        """Slots the example takes in a packed row."""
        und, src, gen = self.uses(task)
        return und * self.n_und + src * self.n_src + n_text + gen * (1 + self.n_img)


@dataclasses.dataclass(frozen=True)
class RowSpec:
    """Row capacities: S slots, U und images, G gen images, T text targets. has_*: which segments a fixed row
    reserves (task-shaped inference rows leave out the ones their task does not use)."""
    slots: int
    und: int
    gen: int
    targets: int
    has_und: bool = True
    has_src: bool = True


def fixed_spec(dims: Dims, *, und: bool = True, src: bool = True, gen: bool = True) -> RowSpec:
    """The fixed layout's row; `und` / `src` / `gen` False drop that segment (task-shaped inference rows)."""
    s = und * dims.n_und + src * dims.n_src + dims.max_text_len + gen * (1 + dims.n_img)
    return RowSpec(slots=s, und=1, gen=1, targets=dims.max_text_len - 1, has_und=und, has_src=src)


def packed_spec(dims: Dims, slots: int = 0, und: int = 0, gen: int = 0, targets: int = 0) -> RowSpec:
    """The packed layout's row; 0 = derived: S = the fixed row length; U = G = 1.2x the und (gen) examples of
    a row half und / half gen (SigLIP, the VAE and the head run on every entry, empty ones too; an example
    beyond them waits for the next batch); T = U * (L - 1)."""
    s = slots or dims.fixed_len
    cap = max(1, int(np.ceil(1.2 * s / (dims.n_und + dims.n_img + 2))))
    u = und or (cap if dims.n_und else 0)
    g = gen or cap
    t = targets or max(u, 1) * (dims.max_text_len - 1)
    return RowSpec(slots=s, und=u, gen=g, targets=t)


def check_spec(spec: RowSpec, dims: Dims, tasks: Sequence[int], where: str = "data") -> None:
    """LayoutError unless the longest example of every task in the mix fits an empty row."""
    for t in tasks:
        need = dims.slots(t, dims.max_text_len)
        und, _, gen = dims.uses(t)
        if t in UND_TASKS:
            need_t = dims.max_text_len - 1
        else:
            need_t = 0
        short = [f"{what} {have} < {want}" for what, have, want in
                 (("slots", spec.slots, need), ("und images", spec.und, int(und)),
                  ("gen images", spec.gen, int(gen)), ("text targets", spec.targets, need_t)) if have < want]
        if short:
            raise LayoutError(f"{where}: a {TASKS[t]} example with a full text segment does not fit one row "
                              f"({', '.join(short)}); raise {where}.row_slots / row_und / row_gen / "
                              "row_targets (0 = derived) or use data.layout='fixed'")


def image_capacity(field: str, spec: RowSpec) -> int:
    return spec.und if field in UND_FIELDS else spec.gen


def row_fields(spec: RowSpec, image_spec: Mapping[str, tuple]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Per-row shapes / dtypes of every schema field (no leading batch dim); `image_spec` maps the image fields
    present to their per-image (shape, dtype)."""
    s, t = spec.slots, spec.targets
    out = {k: ((s,), np.int32) for k in ("tokens", "segment_ids", "mask_ar", "kind", "index")}
    out.update({k: ((t,), np.int32) for k in ("tgt_slot", "tgt_label", "tgt_task")})
    out.update({"und_start": ((spec.und,), np.int32), "gen_start": ((spec.gen,), np.int32),
                "gen_uid": ((spec.gen,), np.int32), "task_count": ((NUM_TASKS,), np.int32)})
    for k, (shape, dtype) in image_spec.items():
        out[k] = ((image_capacity(k, spec),) + tuple(shape), np.dtype(dtype))
    return out


# ----------------------------------------------------------------------------------------------- rows

_MINUS_ONE = ("tgt_task", "und_start", "gen_start")


class RowBatch:
    """B rows being filled with examples (per-example dicts from `text_layout` plus image fields and 'task').

    `add(ex, uid)` places an example (fixed: the next empty row; packed: the first row it fits) and returns
    (row, segment id), or None if it fits no row. `arrays` holds the batch; `alloc(shape, dtype)` may return
    shared memory (the pipeline passes grain's)."""

    def __init__(self, batch_size: int, spec: RowSpec, dims: Dims, image_spec: Mapping[str, tuple],
                 packed: bool, alloc=np.zeros):
        self.b, self.spec, self.dims, self.packed = batch_size, spec, dims, packed
        self.arrays = {}
        for k, (shape, dtype) in row_fields(spec, image_spec).items():
            a = alloc((batch_size,) + shape, dtype)
            a[...] = -1 if k in _MINUS_ONE else 0
            self.arrays[k] = a
        self.used = np.zeros((batch_size, 4), np.int64)  # slots, und, gen, targets
        self.count = np.zeros((batch_size,), np.int64)

    def __len__(self):
        return int(self.count.sum())

    def _need(self, ex) -> np.ndarray:
        tid = int(ex["task"])
        n_text = int(np.sum(ex["text_input_mask"]))
        und, _, gen = self.dims.uses(tid)
        slots = self.spec.slots if not self.packed else self.dims.slots(tid, n_text)
        return np.array([slots, und, gen, int(np.sum(ex.get("text_loss_mask", 0)))], np.int64)

    def add(self, ex: Mapping, uid: int = 0):
        need = self._need(ex)
        cap = np.array([self.spec.slots, self.spec.und, self.spec.gen, self.spec.targets], np.int64)
        if (need > cap).any():
            raise LayoutError(f"a {TASKS[int(ex['task'])]} example needs (slots, und, gen, targets) = "
                              f"{tuple(need.tolist())} > the row's {tuple(cap.tolist())}")
        fits = (self.count == 0) if not self.packed else (self.used + need <= cap).all(axis=1)
        rows = np.flatnonzero(fits)
        if rows.size == 0:
            return None
        r = int(rows[0])
        seg = int(self.count[r]) + 1
        self._place(r, seg, ex, uid)
        self.used[r] += need
        self.count[r] += 1
        return r, seg

    def _place(self, r: int, seg: int, ex: Mapping, uid: int) -> None:
        a, d = self.arrays, self.dims
        tid = int(ex["task"])
        use_und, use_src, use_gen = d.uses(tid)
        at = int(self.used[r, 0])
        j, g, nt = int(self.used[r, 1]), int(self.used[r, 2]), int(self.used[r, 3])
        fixed = not self.packed

        def put(start, n, kind, index, mask_ar=0, tokens=None):
            sl = slice(start, start + n)
            a["segment_ids"][r, sl] = seg
            a["kind"][r, sl] = kind
            a["index"][r, sl] = index
            a["mask_ar"][r, sl] = mask_ar
            if tokens is not None:
                a["tokens"][r, sl] = tokens

        if use_und:
            put(at, d.n_und, K_UND, j * d.n_und + np.arange(d.n_und))
            a["und_start"][r, j] = at
            if "image_und" in a:
                a["image_und"][r, j] = ex.get("image_und", 0)
        if use_und and not (self.packed or self.spec.has_und):
            raise LayoutError(f"a {TASKS[tid]} example needs und slots the row does not have")
        at += d.n_und if (use_und or (fixed and self.spec.has_und)) else 0
        if use_src:
            put(at, d.n_src, K_SRC, g * d.n_img + np.arange(d.n_src))
        for k in ("image_src", "src_tokens"):
            if use_src and k in a:
                a[k][r, g] = ex.get(k, 0)
        if use_src and not (self.packed or self.spec.has_src):
            raise LayoutError(f"a {TASKS[tid]} example needs src slots the row does not have")
        at += d.n_src if (use_src or (fixed and self.spec.has_src)) else 0
        n_text = int(np.sum(ex["text_input_mask"]))
        toks = np.asarray(ex["text_tokens"])[:n_text]
        put(at, n_text, K_TEXT, 0, np.asarray(ex["text_mask_ar"])[:n_text], toks)
        targets = np.flatnonzero(np.asarray(ex.get("text_loss_mask", np.zeros(n_text)))[:n_text])  # prompts: none
        if targets.size:
            if targets[0] == 0:
                raise LayoutError("text_loss_mask marks the first text slot (BOS) as a target")
            sl = slice(nt, nt + targets.size)
            a["tgt_slot"][r, sl] = at + targets - 1
            a["tgt_label"][r, sl] = toks[targets]
            a["tgt_task"][r, sl] = tid
        at += d.max_text_len if fixed else n_text
        if use_gen:
            put(at, 1 + d.n_img, K_BOI, g * (1 + d.n_img) + np.arange(1 + d.n_img), 1)
            a["kind"][r, at + 1:at + 1 + d.n_img] = K_IMG
            a["gen_start"][r, g] = at
            a["gen_uid"][r, g] = uid
            for k in ("image_gen", "gen_tokens"):
                if k in a:
                    a[k][r, g] = ex.get(k, 0)
        a["task_count"][r, tid] += 1


def layout_examples(examples: Sequence[Mapping], spec: RowSpec, dims: Dims, *, layout: str,
                    batch_size: int | None = None, uids: Sequence[int] | None = None,
                    image_spec: Mapping[str, tuple] | None = None):
    """Lays out all `examples` (packed: first-fit; fixed: one per row) -> (batch, [(row, segment)] per example).
    batch_size defaults to as many rows as needed. Raises LayoutError if they do not fit batch_size rows."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")
    uids = list(range(len(examples))) if uids is None else list(uids)
    if image_spec is None:
        image_spec = {}
        for ex in examples:
            for k in UND_FIELDS + GEN_FIELDS:
                if k in ex:
                    image_spec[k] = (np.shape(ex[k]), np.float32)
    b = batch_size or len(examples)
    rows = RowBatch(b, spec, dims, image_spec, layout == "packed")
    where = []
    for ex, uid in zip(examples, uids):
        placed = rows.add(ex, uid)
        if placed is None:
            raise LayoutError(f"{len(examples)} examples do not fit {b} rows of {spec}")
        where.append(placed)
    if batch_size is None and layout == "packed":  # drop unused rows
        n = int((rows.count > 0).sum())
        rows.arrays = {k: v[:n] for k, v in rows.arrays.items()}
    return rows.arrays, where


def valid_fraction(batch) -> float:
    """Valid slots / all slots of a laid-out batch."""
    return float((np.asarray(batch["segment_ids"]) > 0).mean())
