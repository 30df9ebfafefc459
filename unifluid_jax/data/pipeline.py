"""grain input pipeline: records -> per-host batches in the `layout.py` format.

    source(s) -> global shuffle (seed, reshuffled each epoch) -> per-host shard (every shard_count-th element
    of the global order, from shard_index) -> parse + validate + decode (PIL) -> resize / centre crop to
    gen_size and und_size -> [-1, 1] float32 -> tokenize -> text layout -> mix sources by weight ->
    per-host batch (skipping bad records) -> optional multi-process prefetch (worker_count).

Config (`config.data`, see `default_config`):
    sources             list of dicts: path (glob / shard prefix / dir), kind ('array_record' | 'tfds'),
                        weight (> 0, relative), task (optional: overrides the record's task, so one caption
                        set can feed both 'caption' and 't2i'). tfds sources also take name, split,
                        data_dir, field_map (see tfds_source.py).
    gen_size            generation image size (VAE input), default 256; demo 64
    und_size            understanding image size (SigLIP input), default 224
    max_text_len        text segment length L
    tokenizer           SentencePiece model path (Gemma ids)
    per_host_batch_size examples per host per step
    seed                shuffle seed
    shuffle / num_epochs  global shuffle on/off; epochs (None = repeat forever; finite for evaluation --
                        with several sources a finite pass stops when the first mixed source runs out)
    worker_count        grain worker processes (0 = in-process); worker_buffer_size per worker
    read_threads        threads per process for record reading + decoding
    truncate            truncate over-long prompts instead of skipping the record
    caption_prompt      the fixed question of caption examples ("caption en")
    gen_resize / und_resize  PIL resampling: 'bicubic' (default for gen, MAR/LDM convention) /
                        'bilinear' (default for und, big_vision SigLIP convention), 'box', 'nearest', 'lanczos'
    edit_source         how an edit's source image enters, same format as model.edit_source: a tuple of
                        'siglip' (und slots) and/or 'vae' (src slots); default ('siglip',). The strings
                        'siglip', 'vae', 'both' are accepted too.
    latents             '' (decode images, VAE runs in the step), 'sample' or 'mean': read the latent cache
                        written by tools/extract_latents.py and emit gen_tokens / src_tokens instead of
                        image_gen / image_src ('sample': mean + std * noise, noise seeded per example index)
    latent_tokens, latent_dim  n and C of the cached tokens (model n_img and token dim) when latents is set
    max_consecutive_skips  fail loudly if this many records in a row are bad
    text_dropout        probability that a t2i prompt / edit instruction becomes [BOS] alone (CFG training);
                        drawn per record index (grain random_map): deterministic and resumable
    layout, row_slots, row_und, row_gen, row_targets  how examples become rows (data/packing.py); used when
                        the caller passes the model's `dims` (UniFluid), else batches are per example
    probe_records       records read per source up front to find a valid one (else a clear error)

Batch with `dims` (UniFluid): B laid-out rows in the schema of unifluid_jax/layout.py, plus num_skipped.
Batch without `dims` (per example; the VAE task; numpy, leading dim B = per_host_batch_size):
    task            [B]        int32  index into layout.TASKS
    text_tokens     [B, L]     int32  } from layout.text_layout
    text_input_mask [B, L]     int32  }
    text_mask_ar    [B, L]     int32  }
    text_loss_mask  [B, L]     int32  }
    image_gen       [B, G, G, 3] float32 in [-1, 1]: t2i image / edit target; zeros otherwise
    image_und       [B, U, U, 3] float32 in [-1, 1]: caption/vqa image, edit source if edit_source uses
                               siglip; zeros otherwise
    image_src       [B, G, G, 3] float32: edit source for the VAE path; only if edit_source uses vae
    gen_tokens      [B, n, C]  float32: replaces image_gen when data.latents is set (zeros for caption/vqa)
    src_tokens      [B, n, C]  float32: replaces image_src when data.latents is set
    valid           [B]        int32  1 for real examples; 0 only for padding in the last batch of a
                               finite (num_epochs) pass
    num_skipped     [len(SKIP_REASONS)] int32  NOT per example: records skipped while this host built this
                               batch, by reason. It travels inside the batch, so it is exact across grain
                               worker processes. Pop it (`split_stats`) before building global arrays.

Determinism: the iterator's `get_state()` / `set_state()` (grain) restores to exactly the next batch.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import grain
import ml_collections
import numpy as np
from PIL import Image

from unifluid_jax.config import check, check_choice, check_positive
from unifluid_jax.data import images, layout, records
from unifluid_jax.data.tokenizer import Tokenizer

SKIP_REASONS = ("bad_record", "bad_task", "missing_field", "empty_text", "too_long", "bad_image", "bad_latent")
LATENT_MODES = ("", "sample", "mean")
STAT_KEYS = ("num_skipped",)
EDIT_SOURCES = ("siglip", "vae")
SOURCE_KINDS = ("array_record", "tfds")
RESAMPLING = images.RESAMPLING
_SKIP_LOG = records.SkipLog("data pipeline")  # rate-limited: record id + reason of skipped records


class DataError(ValueError):
    """The input cannot produce examples (no records, no valid records, a misconfigured source)."""


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.sources = [{"path": "", "kind": "array_record", "weight": 1.0, "task": ""}]
    c.gen_size = 256
    c.und_size = 224
    c.max_text_len = 64
    c.tokenizer = ""
    c.per_host_batch_size = 8
    c.seed = 0
    c.shuffle = True
    c.num_epochs = ml_collections.config_dict.placeholder(int)
    c.worker_count = 0
    c.worker_buffer_size = 2
    c.read_threads = 4
    c.truncate = False
    c.caption_prompt = "caption en"
    c.gen_resize = "bicubic"
    c.und_resize = "bilinear"
    c.edit_source = ("siglip",)
    c.latents = ""
    c.latent_tokens = 0
    c.latent_dim = 0
    c.max_consecutive_skips = 1000
    c.probe_records = 64
    c.text_dropout = 0.0
    c.layout = "fixed"
    c.row_slots = 0
    c.row_und = 0
    c.row_gen = 0
    c.row_targets = 0
    return c


def shapes_sources(dataset_dir: str, split: str = "train",
                   weights: Mapping[str, float] | None = None) -> list[dict]:
    """`config.data.sources` for a dataset written by tools/build_shapes.py (one source per task).

    Tasks with weight 0 are left out. Default weights: equal.
    """
    import json
    import os
    with open(os.path.join(dataset_dir, "metadata.json")) as f:
        meta = json.load(f)
    if split not in meta["splits"]:
        raise DataError(f"{dataset_dir}: no split {split!r} (have {sorted(meta['splits'])})")
    weights = dict(weights) if weights is not None else {t: 1.0 for t in layout.TASKS}
    unknown = set(weights) - set(layout.TASKS)
    if unknown:
        raise DataError(f"shapes_sources: unknown tasks {sorted(unknown)}; choose from {layout.TASKS}")
    return [{"path": os.path.join(dataset_dir, meta["splits"][split][t]), "kind": "array_record",
             "weight": float(weights[t]), "task": ""} for t in layout.TASKS if weights.get(t, 0) > 0]


def validate_config(section, path: str = "data") -> None:
    check(len(section.sources) > 0, f"{path}.sources", "needs at least one source")
    for i, s in enumerate(section.sources):
        p = f"{path}.sources[{i}]"
        check_choice(s.get("kind", "array_record"), f"{p}.kind", SOURCE_KINDS)
        check(float(s.get("weight", 1.0)) > 0, f"{p}.weight", f"must be > 0, got {s.get('weight')!r}")
        if s.get("task"):
            check_choice(s["task"], f"{p}.task", layout.TASKS)
        if s.get("kind", "array_record") == "array_record":
            check(bool(s.get("path")), f"{p}.path", "set the ArrayRecord glob / prefix / directory")
        else:
            check(bool(s.get("name")), f"{p}.name", "set the TFDS dataset name")
    check_positive(section, path, "gen_size", "und_size", "max_text_len", "per_host_batch_size",
                   "max_consecutive_skips", "probe_records")
    check_positive(section, path, "worker_count", "read_threads", allow_zero=True)
    check(bool(section.tokenizer), f"{path}.tokenizer", "set the SentencePiece model path")
    try:
        edit_sources(section.edit_source)
    except ValueError as e:
        check(False, f"{path}.edit_source", str(e))
    check_choice(section.gen_resize, f"{path}.gen_resize", RESAMPLING)
    check_choice(section.und_resize, f"{path}.und_resize", RESAMPLING)
    check(section.max_text_len >= 4, f"{path}.max_text_len", "must be >= 4")
    check_choice(section.latents, f"{path}.latents", LATENT_MODES)
    check(0.0 <= section.get("text_dropout", 0.0) < 1.0, f"{path}.text_dropout", "must be in [0, 1)")
    check_choice(section.get("layout", "fixed"), f"{path}.layout", layout.LAYOUTS)
    if section.latents:
        check_positive(section, path, "latent_tokens", "latent_dim")


def edit_sources(value) -> tuple[str, ...]:
    """Normalises data.edit_source ('siglip' | 'vae' | 'both' | a sequence of 'siglip'/'vae') to a tuple."""
    if isinstance(value, str):
        value = EDIT_SOURCES if value == "both" else (value,)
    out = tuple(value)
    bad = [v for v in out if v not in EDIT_SOURCES]
    if not out or bad:
        raise ValueError(f"unknown value {value!r}; use a non-empty tuple of {EDIT_SOURCES} (or 'both')")
    return out


def split_stats(batch: dict) -> tuple[dict, dict]:
    """(per-example fields, per-host statistics such as num_skipped)."""
    return ({k: v for k, v in batch.items() if k not in STAT_KEYS},
            {k: batch[k] for k in STAT_KEYS if k in batch})


def batch_spec(cfg, batch_size: int | None = None,
               dims: layout.Dims | None = None) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shapes and dtypes of every batch field but num_skipped (for AOT compilation / shape checks): laid-out
    rows given the model's `dims`, else per-example fields."""
    b = batch_size or cfg.per_host_batch_size
    if dims is not None:
        from unifluid_jax.data import packing
        images = {k: (shape[1:], dt) for k, (shape, dt) in batch_spec(cfg, 1).items()
                  if k in layout.UND_FIELDS + layout.GEN_FIELDS}
        rows = layout.row_fields(packing.row_spec(cfg, dims), images)
        return {k: ((b,) + shape, dt) for k, (shape, dt) in rows.items()}
    L, G, U = cfg.max_text_len, cfg.gen_size, cfg.und_size
    spec = {"task": ((b,), np.int32), "valid": ((b,), np.int32),
            "image_und": ((b, U, U, 3), np.float32)}
    gen_key, gen_shape = "image_gen", (b, G, G, 3)
    if cfg.latents:
        gen_key, gen_shape = "gen_tokens", (b, cfg.latent_tokens, cfg.latent_dim)
    spec[gen_key] = (gen_shape, np.float32)
    for k in ("text_tokens", "text_input_mask", "text_mask_ar", "text_loss_mask"):
        spec[k] = ((b, L), np.int32)
    if "vae" in edit_sources(cfg.edit_source):
        spec["src_tokens" if cfg.latents else "image_src"] = (gen_shape, np.float32)
    return spec


# ----------------------------------------------------------------------------------------------- per example

def load_image(data, size: int, resample: str = "bicubic") -> np.ndarray:
    """Encoded bytes (or an HxWx3 uint8 array) -> [size, size, 3] float32 in [-1, 1] (resize shorter side,
    centre crop), with the decode / validate rules of data/images.py (16-bit, EXIF orientation, bombs,
    truncation). Raises images.ImageError (a ValueError) on unusable input."""
    return images.load(data, size, resample)


def log_skip(ex: dict) -> None:
    """Logs a skip marker's record id and reason (rate-limited per process; the counts stay exact in
    num_skipped)."""
    _SKIP_LOG.log(SKIP_REASONS[ex["_skip"]], ex.get("_id"), ex.get("_why"))


def _skip(reason: str, why: str = "") -> dict:
    return {"_skip": SKIP_REASONS.index(reason), "_why": why}


class ExampleFn:
    """Record (serialized bytes or dict) -> example dict, or {'_skip': reason} for a bad record.

    Image fields the task does not use are absent from the example (the batch has zeros there).

    Module-level and holding only picklable state, so grain can ship it to worker processes.
    """

    def __init__(self, tokenizer: Tokenizer, *, gen_size: int, und_size: int, max_text_len: int,
                 truncate: bool = False, caption_prompt: str = "caption en", edit_source=("siglip",),
                 task: str | None = None, gen_resize: str = "bicubic", und_resize: str = "bilinear",
                 latents: str = "", latent_shape: tuple[int, int] = (0, 0), text_dropout: float = 0.0):
        self.tok = tokenizer
        self.text_dropout = float(text_dropout)
        self.latents, self.latent_shape = latents, tuple(latent_shape)
        self.gen_resize, self.und_resize = gen_resize, und_resize
        self.gen_size, self.und_size, self.max_text_len = gen_size, und_size, max_text_len
        self.truncate, self.caption_prompt = truncate, caption_prompt
        self.edit_source = edit_sources(edit_source)
        self.task = task or None
        self.with_src = "vae" in self.edit_source
        self.edit_und = "siglip" in self.edit_source

    @classmethod
    def from_config(cls, cfg, tokenizer: Tokenizer, task: str | None = None) -> "ExampleFn":
        return cls(tokenizer, gen_size=cfg.gen_size, und_size=cfg.und_size, max_text_len=cfg.max_text_len,
                   truncate=cfg.truncate, caption_prompt=cfg.caption_prompt, edit_source=cfg.edit_source,
                   task=task, gen_resize=cfg.gen_resize, und_resize=cfg.und_resize, latents=cfg.latents,
                   latent_shape=(cfg.latent_tokens, cfg.latent_dim), text_dropout=cfg.get("text_dropout", 0.0))

    def _texts(self, tid: int, rec: Mapping[str, Any]):
        """(prompt, answer) strings for the task, or a skip reason."""
        need = {layout.T2I: ("caption",), layout.CAPTION: ("caption",), layout.VQA: ("question", "answer"),
                layout.EDIT: ("instruction",)}[tid]
        vals = []
        for k in need:
            v = rec.get(k)
            if isinstance(v, bytes):
                try:
                    v = v.decode("utf-8")
                except UnicodeDecodeError:
                    return "bad_record"
            if not isinstance(v, str):
                return "missing_field"
            if not v.strip():
                return "empty_text"
            vals.append(v.strip())
        if tid == layout.T2I or tid == layout.EDIT:
            return vals[0], None
        if tid == layout.CAPTION:
            return self.caption_prompt, vals[0]
        return vals[0], vals[1]

    def _latent(self, rec, field: str, rng):
        """Cached (mean, std) tokens -> [n, C] float32 tokens, or a skip reason."""
        data = rec.get(field)
        if not isinstance(data, (bytes, bytearray)):
            return "missing_field"
        try:
            ms = records.from_npy(data)
        except (ValueError, OSError, EOFError):
            return "bad_latent"
        if ms.shape != (2,) + self.latent_shape or not np.issubdtype(ms.dtype, np.floating):
            return "bad_latent"
        mean, std = ms[0].astype(np.float32), ms[1].astype(np.float32)
        if self.latents == "sample":
            mean += std * rng.standard_normal(mean.shape, dtype=np.float32)
        return mean

    def __call__(self, raw, rng: np.random.Generator | None = None) -> dict:
        ex = self._example(raw, rng)
        if "_skip" in ex:  # the id travels with the marker, for the skip log
            ex["_id"] = records.record_id(raw)
        return ex

    def _example(self, raw, rng) -> dict:
        if isinstance(raw, (bytes, bytearray, memoryview)):
            try:
                rec = records.decode_record(raw)
            except records.RecordError:
                return _skip("bad_record")
        elif isinstance(raw, Mapping):
            rec = raw
        else:
            return _skip("bad_record")
        try:
            tid = layout.task_id(self.task or rec.get("task"))
        except (ValueError, TypeError):
            return _skip("bad_task")
        texts = self._texts(tid, rec)
        if isinstance(texts, str):
            return _skip(texts)
        prompt, answer = texts
        try:
            text = layout.text_layout(tid, self.tok.encode(prompt),
                                      None if answer is None else self.tok.encode(answer),
                                      self.max_text_len, truncate=self.truncate, sep_ids=self.tok.sep_ids)
        except layout.TextTooLongError:
            return _skip("too_long")
        except layout.EmptyTextError:
            return _skip("empty_text")
        g, u = self.gen_size, self.und_size

        def gen(b):
            return load_image(b, g, self.gen_resize)

        def und(b):
            return load_image(b, u, self.und_resize)
        ex = {"task": np.int32(tid), "valid": np.int32(1), **text}
        if self.latents and tid in layout.GEN_TASKS:
            if self.latents == "sample" and rng is None:
                raise ValueError("ExampleFn: latents='sample' needs an rng (use grain random_map)")
            for field, key in (("gen_latent", "gen_tokens"), ("src_latent", "src_tokens")):
                if key == "src_tokens" and not (tid == layout.EDIT and self.with_src):
                    continue
                tokens = self._latent(rec, field, rng)
                if isinstance(tokens, str):
                    return _skip(tokens)
                ex[key] = tokens
        image, image2 = rec.get("image"), rec.get("image2")
        decode_gen = not (self.latents and tid in layout.GEN_TASKS)
        need_image = tid in layout.UND_TASKS or decode_gen or (tid == layout.EDIT and self.edit_und)
        if (need_image and image is None) or (tid == layout.EDIT and decode_gen and image2 is None):
            return _skip("missing_field")
        try:
            if tid == layout.T2I:
                if decode_gen:
                    ex["image_gen"] = gen(image)
            elif tid in layout.UND_TASKS:
                ex["image_und"] = und(image)
            else:  # edit: image = source, image2 = target
                if decode_gen:
                    ex["image_gen"] = gen(image2)
                    if self.with_src:
                        ex["image_src"] = gen(image)
                if self.edit_und:
                    ex["image_und"] = und(image)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            return _skip("bad_image", str(e))
        if self.text_dropout > 0 and tid in layout.GEN_TASKS:
            if rng is None:
                raise ValueError("ExampleFn: text_dropout needs an rng (use grain random_map)")
            # Drawn last, so latent samples are the same with or without dropout. A dropped prompt is [BOS]
            # alone: exactly generation's unconditional (CFG) branch.
            if rng.random() < self.text_dropout:
                ex.update(layout.text_layout(tid, [], None, self.max_text_len))
        return ex  # absent images are left out: the batcher fills zeros


# ----------------------------------------------------------------------------------------------- batching

class SkipCountingBatch(grain.IterDataset):
    """Batches valid examples, counting (not yielding) skip markers; see the module docstring.

    `spec` gives every per-example field's (shape, dtype); fields an example lacks (absent images) and padding
    rows stay zero. Under mp_prefetch the batch is written straight into shared memory (grain's
    SupportsSharedMemoryOutput protocol), so batches cross to the main process without pickling the pixels.
    """

    def __init__(self, parent: grain.IterDataset, batch_size: int, spec: Mapping[str, tuple],
                 max_consecutive_skips: int):
        super().__init__(parent)
        self.batch_size, self.spec, self.max_consecutive_skips = batch_size, dict(spec), max_consecutive_skips
        self.shared_memory = False

    def enable_shared_memory_output(self) -> None:
        self.shared_memory = _shm_array_type() is not None

    def __iter__(self):
        return _SkipCountingBatchIterator(self._parent.__iter__(), self.batch_size, self.spec,
                                          self.max_consecutive_skips, self.shared_memory)


def too_many_skips(run: int, skipped) -> None:
    counts = {r: int(n) for r, n in zip(SKIP_REASONS, skipped) if n}
    raise DataError(f"{run} bad records in a row (skipped so far in this batch: {counts}); "
                    "the input looks broken (raise data.max_consecutive_skips if not)")


def _shm_array_type():
    try:  # grain-internal; fall back to plain arrays (pickled by grain) if it moves
        from grain._src.python.ipc.shared_memory_array import SharedMemoryArray
        return SharedMemoryArray
    except ImportError:
        return None


class _SkipCountingBatchIterator(grain.DatasetIterator):

    def __init__(self, parent, batch_size: int, spec, max_consecutive_skips: int, shared_memory: bool):
        super().__init__(parent)
        self._batch_size, self._spec, self._max_skips = batch_size, spec, max_consecutive_skips
        self._shm = _shm_array_type() if shared_memory else None

    def _alloc(self, shape, dtype):
        if self._shm is not None:
            return self._shm(shape, dtype=dtype)
        return np.empty(shape, dtype)

    def __next__(self) -> dict:
        examples, skipped, run = [], np.zeros((len(SKIP_REASONS),), np.int32), 0
        while len(examples) < self._batch_size:
            try:
                ex = next(self._parent)
            except StopIteration:
                if not examples:
                    raise
                break
            if "_skip" in ex:
                skipped[ex["_skip"]] += 1
                log_skip(ex)
                run += 1
                if run >= self._max_skips:
                    counts = {r: int(n) for r, n in zip(SKIP_REASONS, skipped) if n}
                    raise DataError(f"{run} bad records in a row (skipped so far in this batch: {counts}); "
                                    "the input looks broken (raise data.max_consecutive_skips if not)")
                continue
            run = 0
            examples.append(ex)
        batch = {}
        for k, (shape, dtype) in self._spec.items():
            out = self._alloc((self._batch_size,) + tuple(shape), dtype)
            for i in range(self._batch_size):
                v = examples[i].get(k) if i < len(examples) else None
                if v is None:
                    out[i] = 0
                else:
                    out[i] = v
            batch[k] = out
        batch["num_skipped"] = skipped
        return batch

    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state):
        self._parent.set_state(state)


# ----------------------------------------------------------------------------------------------- sources

def open_source(src_cfg: Mapping[str, Any]):
    """A grain random-access source for one `config.data.sources` entry."""
    kind = src_cfg.get("kind", "array_record") or "array_record"
    if kind == "array_record":
        try:
            return records.open_source(src_cfg["path"])
        except FileNotFoundError as e:
            raise DataError(f"data source {src_cfg['path']!r}: {e}") from None
    if kind == "tfds":
        from unifluid_jax.data import tfds_source
        return tfds_source.TfdsSource.from_config(src_cfg)
    raise DataError(f"unknown data source kind {kind!r}; choose one of {SOURCE_KINDS}")


def _probe(source, fn: ExampleFn, n: int, name: str) -> None:
    """Raises DataError unless one of the first n records of the source yields a valid example."""
    if len(source) == 0:
        raise DataError(f"data source {name}: no records")
    reasons: dict[str, int] = {}
    for i in range(min(n, len(source))):
        ex = fn(source[i], np.random.default_rng(0))
        if "_skip" not in ex:
            return
        r = SKIP_REASONS[ex["_skip"]]
        reasons[r] = reasons.get(r, 0) + 1
    what = "all" if n >= len(source) else f"the first {min(n, len(source))}"
    raise DataError(f"data source {name}: zero valid records ({what} of {len(source)} records are bad: "
                    f"{reasons})")


def _source_seed(seed: int, i: int) -> int:
    return (int(seed) * 1_000_003 + i * 7919) % 2**32


def example_dataset(cfg, *, shard_index: int, shard_count: int, tokenizer: Tokenizer | None = None,
                    decode: bool = True) -> grain.MapDataset:
    """Mixed per-host MapDataset of examples (skip markers included). `decode=False` yields parsed records
    instead (the cheap metadata path: task mixing / sharding checks without image decoding)."""
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
    tok = tokenizer or Tokenizer(cfg.tokenizer)
    datasets, weights = [], []
    for i, s in enumerate(cfg.sources):
        s = dict(s)
        name = s.get("path") or s.get("name")
        src = open_source(s)
        fn = ExampleFn.from_config(cfg, tok, task=s.get("task") or None)
        _probe(src, fn, cfg.probe_records, repr(name))
        ds = grain.MapDataset.source(src)
        if cfg.shuffle:
            ds = ds.shuffle(seed=_source_seed(cfg.seed, i))
        ds = ds.repeat(cfg.num_epochs)  # None: forever, reshuffled every epoch
        ds = ds[shard_index::shard_count]
        if not decode:
            ds = ds.map(_ParseOnly(s.get("task") or None))
        elif cfg.latents == "sample" or cfg.get("text_dropout", 0.0) > 0:  # per-index rng: resumable
            ds = ds.random_map(fn, seed=_source_seed(cfg.seed + 1, i))
        else:
            ds = ds.map(fn)
        datasets.append(ds)
        weights.append(float(s.get("weight", 1.0)))
    if len(datasets) == 1:
        return datasets[0]
    return grain.MapDataset.mix(datasets, weights)


class _ParseOnly:
    def __init__(self, task):
        self.task = task

    def __call__(self, raw):
        rec = records.decode_record(raw) if isinstance(raw, (bytes, bytearray)) else dict(raw)
        return {"task": self.task or rec.get("task"), "id": rec.get("id")}


def make_dataset(cfg, *, shard_index: int | None = None, shard_count: int | None = None,
                 tokenizer: Tokenizer | None = None, batch_size: int | None = None,
                 dims: layout.Dims | None = None) -> grain.IterDataset:
    """The full per-host pipeline (an IterDataset of batches). Shard defaults: this JAX process (so each host
    reads a disjoint 1/process_count of the global shuffled order). `batch_size` overrides
    cfg.per_host_batch_size (e.g. global batch // process_count computed by the trainer): examples per batch,
    or rows per batch given the model's `dims` (laid out by data/packing.py per cfg.layout)."""
    validate_config(cfg)
    if shard_index is None or shard_count is None:
        import jax
        shard_index, shard_count = jax.process_index(), jax.process_count()
    ds = example_dataset(cfg, shard_index=shard_index, shard_count=shard_count, tokenizer=tokenizer)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads,
                                              prefetch_buffer_size=max(2 * cfg.read_threads, 1)))
    spec = {k: (shape[1:], dtype) for k, (shape, dtype) in batch_spec(cfg, 1).items()}
    if dims is None:
        it = SkipCountingBatch(it, batch_size or cfg.per_host_batch_size, spec, cfg.max_consecutive_skips)
    else:
        from unifluid_jax.data import packing
        images = {k: v for k, v in spec.items() if k in layout.UND_FIELDS + layout.GEN_FIELDS}
        it = packing.RowBatching(it, batch_size or cfg.per_host_batch_size, packing.row_spec(cfg, dims), dims,
                                 images, packed=cfg.layout == "packed", num_reasons=len(SKIP_REASONS),
                                 max_consecutive_skips=cfg.max_consecutive_skips, process_index=shard_index,
                                 process_count=shard_count, too_many_skips=too_many_skips, on_skip=log_skip)
    if cfg.worker_count > 0:
        _absl_flags_for_library_use()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.worker_count,
                                                         per_worker_buffer_size=cfg.worker_buffer_size))
    return it


def _absl_flags_for_library_use() -> None:
    """grain's worker processes read its absl flags; outside absl's app.run (a notebook, a user's script)
    nothing parsed them and grain raises UnparsedFlagAccessError. Take the flag defaults then."""
    from absl import flags
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_iterator(cfg, **kwargs) -> grain.DatasetIterator:
    """Iterator over per-host batches; checkpoint with `get_state()` / `set_state()`. Close it when done
    if worker_count > 0 (`it.close()`)."""
    return iter(make_dataset(cfg, **kwargs))
