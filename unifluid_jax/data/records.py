"""WebLI-style records: schema, a safe binary serialisation, ArrayRecord shards, and importers.

A record is a dict; each record yields one training example of one task:

    id          str    unique id (for debugging / eval bookkeeping)
    task        str    't2i' | 'caption' | 'vqa' | 'edit'  (a source in config.data can override it)
    image       bytes  encoded PNG/JPEG. t2i: the image to generate; caption/vqa: the input image;
                       edit: the SOURCE image (the one the instruction edits)
    image2      bytes  edit only: the TARGET image (the edited result, what the model generates)
    caption     str    t2i prompt / caption target
    question    str    vqa question
    answer      str    vqa answer
    instruction str    edit instruction

Serialisation (no pickle: records may come from untrusted files):

    b"UFR1" | uint32 little-endian header length | JSON header | raw bytes fields, concatenated
    header = {"str": {name: value}, "bytes": {name: [offset, length]}}

Shards are `{prefix}-{i:05d}-of-{n:05d}.array_record`, read with grain's ArrayRecordDataSource
(`open_source`). Importers turn common layouts into shards: image folder + JSONL/CSV captions, COCO-captions
JSON, VQA (questions + annotations JSON), edit pairs JSONL; tools/ingest.py does the same (and webdataset /
parquet) at scale on Apache Beam.
"""
from __future__ import annotations

import io
import json
import logging
import os
import struct
import tempfile
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from unifluid_jax import fs

MAGIC = b"UFR1"
STR_FIELDS = ("id", "task", "caption", "question", "answer", "instruction")
BYTES_FIELDS = ("image", "image2")
SHARD_SUFFIX = ".array_record"
_log = logging.getLogger(__name__)


class RecordError(ValueError):
    """A record's bytes cannot be parsed."""


def encode_record(record: Mapping[str, Any]) -> bytes:
    """dict of str / bytes values -> bytes. Unknown keys are kept (str or bytes); None values are dropped."""
    strs, blobs, chunks, offset = {}, {}, [], 0
    for k, v in record.items():
        if v is None:
            continue
        if isinstance(v, (bytes, bytearray, memoryview)):
            v = bytes(v)
            blobs[k] = [offset, len(v)]
            chunks.append(v)
            offset += len(v)
        elif isinstance(v, str):
            strs[k] = v
        else:
            raise TypeError(f"record field {k!r}: expected str or bytes, got {type(v).__name__}")
    header = json.dumps({"str": strs, "bytes": blobs}, ensure_ascii=False).encode("utf-8")
    return MAGIC + struct.pack("<I", len(header)) + header + b"".join(chunks)


def decode_record(data: bytes) -> dict[str, Any]:
    """Inverse of `encode_record`; raises RecordError on malformed input (never executes anything)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise RecordError(f"record: expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < 8 or data[:4] != MAGIC:
        raise RecordError("record: bad magic (not a unifluid record)")
    (n,) = struct.unpack("<I", data[4:8])
    if 8 + n > len(data):
        raise RecordError("record: truncated header")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
        strs, blobs = header["str"], header["bytes"]
    except (ValueError, KeyError, TypeError) as e:
        raise RecordError(f"record: bad header ({e})") from None
    out: dict[str, Any] = {}
    body = data[8 + n:]
    for k, v in strs.items():
        if not isinstance(v, str):
            raise RecordError(f"record: field {k!r} is not a string")
        out[k] = v
    for k, span in blobs.items():
        try:
            off, ln = int(span[0]), int(span[1])
        except (TypeError, ValueError, IndexError):
            raise RecordError(f"record: bad span for {k!r}") from None
        if off < 0 or ln < 0 or off + ln > len(body):
            raise RecordError(f"record: field {k!r} runs past the end (truncated)")
        out[k] = body[off:off + ln]
    return out


def record_id(raw) -> str:
    """The `id` of a record (serialized or dict) for messages; '?' when it has none or does not parse."""
    if isinstance(raw, Mapping):
        return str(raw.get("id", "?"))
    try:
        data = bytes(raw)
        (n,) = struct.unpack("<I", data[4:8])
        return str(json.loads(data[8:8 + n].decode("utf-8"))["str"].get("id", "?"))
    except (TypeError, ValueError, KeyError, AttributeError, struct.error):
        return "?"


class SkipLog:
    """Rate-limited warnings naming skipped records (id and reason), so a bad shard can be found and fixed:
    the first `first` skips of this process, then at most one line per `interval` seconds, each saying how
    many were not logged since the previous line. Counts stay exact elsewhere (the pipeline's num_skipped)."""

    def __init__(self, where: str, first: int = 20, interval: float = 10.0):
        self.where, self.first, self.interval = where, first, interval
        self.seen, self.suppressed, self._last = 0, 0, -float("inf")

    def log(self, reason: str, rec_id: str | None = None, detail: str | None = None) -> bool:
        import time
        self.seen += 1
        now = time.monotonic()
        if self.seen > self.first and now - self._last < self.interval:
            self.suppressed += 1
            return False
        more = f" ({self.suppressed} more skipped records not logged)" if self.suppressed else ""
        _log.warning("%s: skipped record id=%s: %s%s%s", self.where, rec_id if rec_id is not None else "?",
                     reason, f" ({detail})" if detail else "", more)
        self.suppressed, self._last = 0, now
        return True


def to_npy(x: np.ndarray) -> bytes:
    """Array -> .npy bytes (for array-valued fields such as the latent cache's gen_latent)."""
    buf = io.BytesIO()
    np.save(buf, np.asarray(x), allow_pickle=False)
    return buf.getvalue()


def from_npy(data: bytes) -> np.ndarray:
    """.npy bytes -> array; never unpickles (object arrays raise ValueError)."""
    return np.load(io.BytesIO(data), allow_pickle=False)


def shard_paths(prefix: str, num_shards: int) -> list[str]:
    return [f"{prefix}-{i:05d}-of-{num_shards:05d}{SHARD_SUFFIX}" for i in range(num_shards)]


class ShardWriter:
    """One ArrayRecord file. array_record's writer opens local files only, so a URI (gs://...) is written to a
    local temporary file and copied to the store on close (its reader reads gs:// directly)."""

    def __init__(self, path: str, options: str = "group_size:1"):
        from array_record.python.array_record_module import ArrayRecordWriter
        self.path, self._tmp = path, None
        local = path
        if fs.is_remote(path):
            fd, local = tempfile.mkstemp(suffix=SHARD_SUFFIX)
            os.close(fd)
            self._tmp = local
        self._w = ArrayRecordWriter(local, options)

    def write(self, data: bytes) -> None:
        self._w.write(data)

    def close(self) -> None:
        self._w.close()
        if self._tmp:
            try:
                fs.copy_from_local(self._tmp, self.path)
            finally:
                os.remove(self._tmp)
                self._tmp = None


class RecordWriter:
    """Writes records round-robin into `num_shards` ArrayRecord shards. Use as a context manager."""

    def __init__(self, prefix: str, num_shards: int = 1, options: str = "group_size:1"):
        if num_shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {num_shards}")
        fs.makedirs(fs.dirname(fs.absolute(prefix)))
        self.paths = shard_paths(prefix, num_shards)
        # group_size:1 keeps random access cheap (one record per chunk), which grain's global shuffle needs.
        self._writers = [ShardWriter(p, options) for p in self.paths]
        self.count = 0

    def write(self, record: Mapping[str, Any] | bytes) -> None:
        data = record if isinstance(record, bytes) else encode_record(record)
        self._writers[self.count % len(self._writers)].write(data)
        self.count += 1

    def close(self) -> None:
        for w in self._writers:
            w.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_records(records: Iterable[Mapping[str, Any] | bytes], prefix: str, num_shards: int = 1) -> list[str]:
    """Writes all records; returns the shard paths."""
    with RecordWriter(prefix, num_shards) as w:
        for r in records:
            w.write(r)
    return w.paths


def resolve_paths(paths: str | Sequence[str]) -> list[str]:
    """A glob pattern, a shard prefix, a directory, or a list of those -> sorted list of shard files.
    Local paths and URIs (gs://...) alike, through the path layer (unifluid_jax/fs.py)."""
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    out: list[str] = []
    for p in map(os.fspath, items):
        if fs.has_glob(p):
            found = fs.glob(p)
        elif fs.isdir(p):
            found = fs.glob(fs.join(p, "*" + SHARD_SUFFIX))
        elif fs.exists(p):
            found = [p]
        else:
            found = fs.glob(p + "-*-of-*" + SHARD_SUFFIX)
        if not found:
            raise FileNotFoundError(f"no ArrayRecord shards match {p!r}")
        out.extend(sorted(found))
    return out


def open_source(paths: str | Sequence[str]):
    """grain random-access source over the shards (elements are serialized records)."""
    import grain
    return grain.sources.ArrayRecordDataSource(resolve_paths(paths))


def read_records(paths: str | Sequence[str]) -> Iterator[dict[str, Any]]:
    """Iterates decoded records in shard order (debugging / small datasets)."""
    src = open_source(paths)
    for i in range(len(src)):
        yield decode_record(src[i])


# ----------------------------------------------------------------------------------------------- importers
# Single-process importers: data/readers.py + the shared transforms of data/prepare.py (the same decode /
# validate / filter / dedup / shard rules as the Beam pipeline tools/ingest.py, byte-identical shards).
# Each also writes `{prefix}-summary.json` (counts by reason).

def _import(fmt: str, path: str, prefix: str, num_shards: int, dedup: str | None = None, **read_kw) -> list[str]:
    from unifluid_jax.data import prepare, readers
    opts = prepare.Options(dedup=dedup or readers.DEFAULT_DEDUP[fmt])
    raws = readers.read(fmt, path, readers.ReadOptions(**read_kw))
    return prepare.run_local(raws, prefix, num_shards, opts, {"format": fmt, "input": [path]})[0]


def import_image_folder(image_dir: str, captions: str, prefix: str, num_shards: int = 1, task: str = "caption",
                        image_key: str = "image", caption_key: str = "caption") -> list[str]:
    """Image folder + JSONL/CSV rows {image: relative path, caption: text} -> shards (task caption or t2i)."""
    return _import("folder", captions, prefix, num_shards, task=task, image_dir=image_dir, image_key=image_key,
                   caption_key=caption_key)


def import_coco_captions(annotations_json: str, image_dir: str, prefix: str, num_shards: int = 1,
                         task: str = "caption") -> list[str]:
    """COCO captions ({images: [{id, file_name}], annotations: [{image_id, caption, id}]}): one record per
    caption."""
    return _import("coco", annotations_json, prefix, num_shards, task=task, image_dir=image_dir)


def import_vqa(questions_json: str, annotations_json: str | None, image_dir: str, prefix: str,
               num_shards: int = 1, image_pattern: str = "COCO_train2014_{image_id:012d}.jpg") -> list[str]:
    """VQA v2 style: questions {questions: [{image_id, question, question_id}]} and annotations
    {annotations: [{question_id, multiple_choice_answer, answers}]} (None for test questions without answers).
    Records get `answer` (the consensus answer) and `answers` (JSON list of all human answers)."""
    return _import("vqa", questions_json, prefix, num_shards, annotations=annotations_json or "",
                   image_dir=image_dir, image_pattern=image_pattern)


def import_edit_pairs(pairs: str, image_dir: str, prefix: str, num_shards: int = 1,
                      source_key: str = "source", target_key: str = "target",
                      instruction_key: str = "instruction") -> list[str]:
    """JSONL/CSV rows {source, target, instruction} (image paths relative to image_dir) -> edit records
    (image = source, image2 = target)."""
    return _import("edit", pairs, prefix, num_shards, image_dir=image_dir, source_key=source_key,
                   target_key=target_key, instruction_key=instruction_key)


def count_by(records: Iterable[Mapping[str, Any]], key: str) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for r in records:
        out[r.get(key)] += 1
    return dict(out)
