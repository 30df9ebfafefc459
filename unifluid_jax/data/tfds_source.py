"""TFDS adapter: `tfds.data_source` (ArrayRecord-backed, random access, no TensorFlow) -> record dicts.

A `config.data.sources` entry of kind 'tfds':

    {"kind": "tfds", "name": "coco_captions", "split": "train", "data_dir": "/data/tfds", "weight": 1.0,
     "task": "caption",
     "field_map": {"image": "image", "caption": "captions/text", "id": "image/id"}}

`field_map` maps record fields (records.py schema: image, image2, caption, question, answer, instruction,
id, task) to TFDS feature paths ('/' descends into nested features; a key containing '/' matches first). A feature that is a sequence (e.g. the
five COCO captions) contributes its first element. Image features mapped to `image` / `image2` are read
undecoded (`tfds.decode.SkipDecoding`, top-level features only) so the pipeline decodes them like ArrayRecord
images; decoded arrays also work. Text comes back as str. The dataset must have been prepared with
`file_format='array_record'`.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

IMAGE_FIELDS = ("image", "image2")


def _lookup(example: Any, path: str):
    """Feature at `path`; keys may themselves contain '/' (e.g. COCO's 'image/id'): longest match first."""
    if not isinstance(example, Mapping):
        return None
    if path in example:
        return example[path]
    parts = path.split("/")
    for k in range(len(parts) - 1, 0, -1):
        head = "/".join(parts[:k])
        if head in example:
            return _lookup(example[head], "/".join(parts[k:]))
    return None


def _to_value(v):
    """TFDS numpy values -> str / bytes / uint8 image array; sequences give their first element."""
    if isinstance(v, np.ndarray) and v.dtype == np.uint8 and v.ndim == 3:
        return v
    if isinstance(v, np.ndarray) and v.dtype == object or isinstance(v, (list, tuple)):
        v = v[0] if len(v) else None
    if isinstance(v, np.ndarray) and v.ndim == 0:
        v = v.item()
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, (int, float)):
        return str(v)
    return v


class TfdsSource:
    """Random-access source of record dicts over one TFDS split. Picklable (re-opens lazily in workers)."""

    def __init__(self, name: str, split: str = "train", data_dir: str | None = None,
                 field_map: Mapping[str, str] | None = None, skip_image_decoding: bool = True):
        self.name, self.split, self.data_dir = name, split, data_dir
        self.field_map = dict(field_map or {"image": "image", "caption": "caption"})
        self.skip_image_decoding = skip_image_decoding
        self._ds = None
        len(self)  # open now: a wrong name / split / data_dir fails here, not in a worker

    @classmethod
    def from_config(cls, src: Mapping[str, Any]) -> "TfdsSource":
        fm = src.get("field_map") or None
        if not src.get("task") and not (fm and "task" in fm):
            from unifluid_jax.data.pipeline import DataError
            raise DataError(f"tfds source {src.get('name')!r}: set `task` (or map a 'task' field)")
        return cls(src["name"], split=src.get("split") or "train", data_dir=src.get("data_dir") or None,
                   field_map=dict(fm) if fm else None)

    def _open(self):
        if self._ds is None:
            import tensorflow_datasets as tfds
            decoders = None
            if self.skip_image_decoding:
                top = {p for f, p in self.field_map.items() if f in IMAGE_FIELDS and "/" not in p}
                decoders = {p: tfds.decode.SkipDecoding() for p in top} or None
            self._ds = tfds.data_source(self.name, split=self.split, data_dir=self.data_dir, decoders=decoders,
                                        download=False)
        return self._ds

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_ds"} | {"_ds": None}

    def __len__(self) -> int:
        return len(self._open())

    def __getitem__(self, index: int) -> dict[str, Any]:
        ex = self._open()[index]
        out = {}
        for field, path in self.field_map.items():
            v = _to_value(_lookup(ex, path))
            if v is None:
                continue
            if isinstance(v, bytes) and field not in IMAGE_FIELDS:
                try:
                    v = v.decode("utf-8")
                except UnicodeDecodeError:
                    continue  # leaves the field missing: the pipeline skips and counts the record
            out[field] = v
        return out

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, split={self.split!r})"
