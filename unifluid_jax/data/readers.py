"""Input formats -> raw examples, one input file at a time (shared by tools/ingest.py's Beam pipeline and the
single-process importers in records.py).

A raw example is a dict with a unique, stable `key` (also the record id), a `task`, text fields (caption /
question / answer / answers / instruction) and its images either inline (`image`, `image2`: bytes) or as
paths (`image_path`, `image2_path`: read by `prepare.prepare`, so a Beam runner reads them in parallel). A
raw example with `_error` (a reason) is counted and dropped.

Formats (`FORMATS`):
  webdataset  tar files (img2dataset's output): members grouped by key, the member path up to the first dot
              of its basename (the webdataset convention); image from .jpg/.jpeg/.png/.webp/..., caption
              from .txt, else the "caption" / "text" of .json. key = "{tar stem}/{member key}".
  parquet     img2dataset / Hugging Face style parquet: image column (bytes, or a struct with "bytes"),
              caption column; key = the "key" column when present, else "{file stem}/{row}".
  folder      JSONL / CSV rows {image: path relative to the file's folder or image_dir, caption, [id]}
  coco        COCO captions JSON: one example per caption, key "{image_id}/{annotation id}"
  vqa         VQA v2 questions JSON (+ optional annotations JSON): key = question_id
  edit        JSONL / CSV rows {source, target, instruction, [id]}: image = source, image2 = target
"""
from __future__ import annotations

import csv
import io
import json
import os
import posixpath
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from unifluid_jax import fs

FORMATS = ("webdataset", "parquet", "folder", "coco", "vqa", "edit")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")
PARQUET_IMAGE_COLUMNS = ("jpg", "png", "webp", "jpeg", "image")
PARQUET_TEXT_COLUMNS = ("txt", "caption", "text")
# Exact-duplicate rule per format (prepare.Options.dedup): web data repeats images under different alt texts;
# COCO / VQA / edit sets use one image for several captions / questions / edits on purpose.
DEFAULT_DEDUP = {"webdataset": "image", "parquet": "image", "folder": "image", "coco": "record",
                 "vqa": "record", "edit": "record"}


@dataclass(frozen=True)
class ReadOptions:
    task: str = ""                 # caption / t2i for webdataset, parquet, folder, coco (default caption)
    image_dir: str = ""            # folder / coco / vqa / edit: images relative to this (default: the file's dir)
    annotations: str = ""          # vqa: the answers JSON ("" = questions only)
    image_pattern: str = "COCO_train2014_{image_id:012d}.jpg"  # vqa
    image_key: str = "image"       # folder
    caption_key: str = "caption"   # folder
    source_key: str = "source"     # edit
    target_key: str = "target"     # edit
    instruction_key: str = "instruction"  # edit
    image_column: str = ""         # parquet ("" = the first of PARQUET_IMAGE_COLUMNS present)
    caption_column: str = ""       # parquet ("" = the first of PARQUET_TEXT_COLUMNS present)
    extra: dict = field(default_factory=dict)


def stem(path: str) -> str:
    base = posixpath.basename(os.fspath(path).rstrip("/"))
    return base.split(".", 1)[0] or base


def _caption_task(opts: ReadOptions) -> str:
    return opts.task or "caption"


def _base_dir(path: str, opts: ReadOptions) -> str:
    return opts.image_dir or posixpath.dirname(os.fspath(path))


def rows(path: str) -> Iterator[dict[str, Any]]:
    """JSONL (one object per line) or CSV with a header row."""
    if path.endswith(".csv"):
        yield from csv.DictReader(io.StringIO(fs.read_text(path), newline=""))
        return
    with fs.open(path) as f:
        for n, line in enumerate(f):
            if line.strip():
                try:
                    yield json.loads(line)
                except ValueError as e:
                    raise ValueError(f"{path}:{n + 1}: bad JSON line ({e})") from None


def read_webdataset(path: str, opts: ReadOptions) -> Iterator[dict]:
    task, prefix = _caption_task(opts), stem(path)
    groups: dict[str, dict[str, bytes]] = {}
    order: list[str] = []
    try:
        with fs.open(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                d, base = posixpath.split(m.name)
                if base.startswith("."):
                    continue
                k, _, ext = base.partition(".")
                key = posixpath.join(d, k) if d else k
                if key not in groups:
                    groups[key] = {}
                    order.append(key)
                groups[key][ext.lower()] = tar.extractfile(m).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        # the members read before the damage are still used; the damage itself is counted once
        yield {"key": f"{prefix}/#tar", "task": task, "_error": "read_error", "_why": f"{path}: {e}"}
    for key in order:
        g = groups[key]
        ex: dict[str, Any] = {"key": f"{prefix}/{key}", "task": task}
        img = next((g[e] for e in IMAGE_EXTS if e in g), None)
        if img is not None:
            ex["image"] = img
        if "txt" in g:
            ex["caption"] = g["txt"].decode("utf-8", errors="replace")
        elif "json" in g:
            try:
                meta = json.loads(g["json"])
                cap = meta.get("caption", meta.get("text")) if isinstance(meta, dict) else None
                if isinstance(cap, str):
                    ex["caption"] = cap
            except ValueError:
                pass
        yield ex


def _column(names, wanted: str, defaults, path: str, what: str) -> str | None:
    if wanted:
        if wanted not in names:
            raise ValueError(f"{path}: no {what} column {wanted!r} (columns: {sorted(names)})")
        return wanted
    return next((c for c in defaults if c in names), None)


def read_parquet(path: str, opts: ReadOptions) -> Iterator[dict]:
    import pyarrow.parquet as pq
    task, prefix = _caption_task(opts), stem(path)
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        names = set(pf.schema_arrow.names)
        img_col = _column(names, opts.image_column, PARQUET_IMAGE_COLUMNS, path, "image")
        txt_col = _column(names, opts.caption_column, PARQUET_TEXT_COLUMNS, path, "caption")
        if img_col is None:
            raise ValueError(f"{path}: no image column (looked for {PARQUET_IMAGE_COLUMNS}; set --image_column)")
        cols = [c for c in (img_col, txt_col, "key" if "key" in names else None) if c]
        row = 0
        for batch in pf.iter_batches(batch_size=256, columns=cols):
            data = batch.to_pydict()
            for i in range(batch.num_rows):
                key = data["key"][i] if "key" in data and data["key"][i] is not None else None
                ex: dict[str, Any] = {"key": f"{prefix}/{key if key is not None else row}", "task": task}
                img = data[img_col][i]
                if isinstance(img, dict):  # Hugging Face Image feature: {"bytes", "path"}
                    img = img.get("bytes")
                if img is not None:
                    ex["image"] = bytes(img)
                if txt_col and data[txt_col][i] is not None:
                    ex["caption"] = str(data[txt_col][i])
                row += 1
                yield ex


def read_folder(path: str, opts: ReadOptions) -> Iterator[dict]:
    base = _base_dir(path, opts)
    for i, r in enumerate(rows(path)):
        name = r.get(opts.image_key)
        ex: dict[str, Any] = {"key": str(r["id"]) if "id" in r else (posixpath.splitext(name)[0] if name else
                                                                     f"{stem(path)}/{i}"),
                              "task": _caption_task(opts)}
        if name:
            ex["image_path"] = posixpath.join(base, name)
        if r.get(opts.caption_key) is not None:
            ex["caption"] = r[opts.caption_key]
        yield ex


def read_coco(path: str, opts: ReadOptions) -> Iterator[dict]:
    coco = json.loads(fs.read_text(path))
    base = _base_dir(path, opts)
    files = {im["id"]: im["file_name"] for im in coco["images"]}
    for ann in coco["annotations"]:
        iid = ann["image_id"]
        ex = {"key": f"{iid}/{ann.get('id', '')}", "task": _caption_task(opts), "caption": ann.get("caption")}
        if iid in files:
            ex["image_path"] = posixpath.join(base, files[iid])
        yield ex


def read_vqa(path: str, opts: ReadOptions) -> Iterator[dict]:
    questions = json.loads(fs.read_text(path))["questions"]
    answers, all_answers = {}, {}
    if opts.annotations:
        for a in json.loads(fs.read_text(opts.annotations))["annotations"]:
            answers[a["question_id"]] = a["multiple_choice_answer"]
            all_answers[a["question_id"]] = [x["answer"] for x in a.get("answers", ())]
    base = _base_dir(path, opts)
    for q in questions:
        ex = {"key": str(q["question_id"]), "task": "vqa", "question": q.get("question"),
              "image_path": posixpath.join(base, opts.image_pattern.format(image_id=q["image_id"]))}
        if q["question_id"] in answers:
            ex["answer"] = answers[q["question_id"]]
            ex["answers"] = json.dumps(all_answers[q["question_id"]])  # all human answers (VQA accuracy)
        yield ex


def read_edit(path: str, opts: ReadOptions) -> Iterator[dict]:
    base = _base_dir(path, opts)
    for i, r in enumerate(rows(path)):
        ex: dict[str, Any] = {"key": str(r.get("id", i)), "task": "edit", "instruction": r.get(opts.instruction_key)}
        for k, field_ in (("image_path", opts.source_key), ("image2_path", opts.target_key)):
            if r.get(field_):
                ex[k] = posixpath.join(base, r[field_])
        yield ex


READERS = {"webdataset": read_webdataset, "parquet": read_parquet, "folder": read_folder, "coco": read_coco,
           "vqa": read_vqa, "edit": read_edit}


def read(fmt: str, path: str, opts: ReadOptions) -> Iterator[dict]:
    if fmt not in READERS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {FORMATS}")
    return READERS[fmt](path, opts)
