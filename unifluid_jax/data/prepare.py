"""Raw example -> validated record, and the deterministic shard layout: the transforms shared by the Beam
pipeline (tools/ingest.py) and the single-process importers (records.py), so both write the same shards.

    prepare(raw)      decode + validate every image with data/images.py (16-bit, EXIF, bombs, truncation),
                      optional shrink / re-encode to a max side, filters (minimum side, aspect ratio, missing /
                      empty / over-long text) -> Prepared(shard, dedup, key, record bytes), or a reason
    shard_of(dedup)   the output shard: a hash of the duplicate key, so exact duplicates meet in one shard
    finalize_shard()  in one shard: keep the smallest key of each duplicate group, sort by key

Shard i holds the same records in the same order whatever the runner, worker count or input order, so two runs
give byte-identical ArrayRecord files. Counts by reason: REASONS (+ 'written').
"""
from __future__ import annotations

import hashlib
import json
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

from unifluid_jax import fs
from unifluid_jax.data import images, records

TEXT_FIELDS = {"caption": ("caption",), "t2i": ("caption",), "vqa": ("question",), "edit": ("instruction",)}
REASONS = ("read_error", "bad_task", "missing_image", "missing_text", "empty_text", "too_long_text") \
    + images.REASONS + ("too_small", "bad_aspect", "duplicate")
DEDUP_MODES = ("image", "record", "none")


@dataclass(frozen=True)
class Options:
    max_side: int = 0          # > 0: shrink so the longer side is <= max_side and re-encode (JPEG, quality)
    quality: int = 95
    min_side: int = 0          # drop images whose shorter side is below this
    max_aspect: float = 0.0    # drop images with longer / shorter side above this (0 = off)
    max_text_chars: int = 0    # drop examples whose text field is longer (0 = off)
    max_pixels: int | None = None  # decompression-bomb guard (None = Pillow's MAX_IMAGE_PIXELS)
    dedup: str = "image"       # 'image': exact duplicate images (content hash); 'record': image + text; 'none'


class Prepared(NamedTuple):
    shard: int
    dedup: str     # duplicate-group key (unique per record when dedup is 'none')
    key: str       # record id; the sort key within a shard
    data: bytes    # the serialized record (records.encode_record)


def _hash(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return h.hexdigest()


def shard_of(dedup: str, num_shards: int) -> int:
    return int(dedup[:16], 16) % num_shards


def _image(raw: dict, field: str, opts: Options) -> bytes | str:
    """The stored bytes of one image, or a reason."""
    data = raw.get(field)
    if data is None and raw.get(field + "_path"):
        try:
            data = fs.read_bytes(raw[field + "_path"])
        except OSError:
            return "read_error"
    if data is None:
        return "missing_image"
    try:
        img = images.decode(data, max_pixels=opts.max_pixels)
    except images.ImageError as e:
        return e.reason
    w, h = img.size
    if opts.min_side and min(w, h) < opts.min_side:
        return "too_small"
    if opts.max_aspect and max(w, h) / min(w, h) > opts.max_aspect:
        return "bad_aspect"
    if opts.max_side and max(w, h) > opts.max_side:
        return images.reencode(img, opts.max_side, "JPEG", opts.quality)
    return bytes(data)  # valid and small enough: kept exactly as given


def prepare(raw: dict, opts: Options, num_shards: int) -> Prepared | str:
    """One raw example (data/readers.py) -> Prepared, or the reason it is dropped (one of REASONS)."""
    if raw.get("_error"):
        return raw["_error"]
    task = raw.get("task")
    if task not in TEXT_FIELDS:
        return "bad_task"
    rec: dict[str, Any] = {"id": str(raw["key"]), "task": task}
    for k in TEXT_FIELDS[task]:
        v = raw.get(k)
        if isinstance(v, bytes):
            v = v.decode("utf-8", errors="replace")
        if not isinstance(v, str):
            return "missing_text"
        v = v.strip()
        if not v:
            return "empty_text"
        if opts.max_text_chars and len(v) > opts.max_text_chars:
            return "too_long_text"
        rec[k] = v
    for k in ("answer", "answers"):  # optional (vqa test questions have no answers)
        if isinstance(raw.get(k), str):
            rec[k] = raw[k]
    fields = ("image", "image2") if task == "edit" else ("image",)
    for f in fields:
        out = _image(raw, f, opts)
        if isinstance(out, str):
            return out
        rec[f] = out
    content = [rec[f] for f in fields]
    if opts.dedup == "record":
        content += [json.dumps({k: v for k, v in rec.items() if isinstance(v, str) and k != "id"},
                               sort_keys=True).encode()]
    elif opts.dedup == "none":
        content += [rec["id"].encode()]
    dedup = _hash(*content)
    return Prepared(shard_of(dedup, num_shards), dedup, rec["id"], records.encode_record(rec))


def finalize_shard(items: Iterable[tuple[str, str, bytes, Any]]) -> tuple[list[Any], int]:
    """items (dedup, key, record bytes or a handle, its sha256) -> (the bytes / handles sorted by (key,
    sha256) with exact duplicates removed (the smallest of each group kept), number of duplicates removed)."""
    best: dict[str, tuple[str, str, Any]] = {}
    n = 0
    for dedup, key, ref, digest in items:
        n += 1
        cur = best.get(dedup)
        if cur is None or (key, digest) < cur[:2]:
            best[dedup] = (key, digest, ref)
    kept = sorted(best.values(), key=lambda t: t[:2])
    return [ref for _, _, ref in kept], n - len(kept)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_shard(path: str, recs: Iterable[bytes]) -> int:
    w = records.ShardWriter(path, "group_size:1")  # the layout records.RecordWriter writes
    n = 0
    for r in recs:
        w.write(r)
        n += 1
    w.close()
    return n


def summary_path(prefix: str) -> str:
    return f"{prefix}-summary.json"


def write_summary(prefix: str, counts: dict[str, int], extra: dict | None = None) -> dict:
    counts = {k: int(v) for k, v in counts.items()}
    out = {"written": counts.get("written", 0), "read": counts.get("read", 0),
           "dropped": {r: counts.get(r, 0) for r in REASONS}, **(extra or {})}
    fs.write_text(summary_path(prefix), json.dumps(out, indent=1, sort_keys=True) + "\n")
    return out


def run_local(raws: Iterator[dict], prefix: str, num_shards: int, opts: Options = Options(),
              extra: dict | None = None) -> tuple[list[str], dict]:
    """The single-process path: the same transforms in one loop. Prepared records are spooled to a local
    temporary file, so memory holds only keys. Returns (shard paths, summary)."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    fs.makedirs(fs.dirname(fs.absolute(prefix)))
    counts: Counter = Counter()
    log = records.SkipLog("import")
    index: list[list[tuple]] = [[] for _ in range(num_shards)]
    with tempfile.TemporaryFile() as spool:
        for raw in raws:
            counts["read"] += 1
            p = prepare(raw, opts, num_shards)
            if isinstance(p, str):
                counts[p] += 1
                log.log(p, raw.get("key"), raw.get("_why"))
                continue
            index[p.shard].append((p.dedup, p.key, (spool.tell(), len(p.data)), digest(p.data)))
            spool.write(p.data)
        paths = records.shard_paths(prefix, num_shards)
        for path, items in zip(paths, index):
            refs, dups = finalize_shard(items)

            def read(refs=refs):
                for off, n in refs:
                    spool.seek(off)
                    yield spool.read(n)
            counts["written"] += write_shard(path, read())
            counts["duplicate"] += dups
    return paths, write_summary(prefix, counts, extra)
