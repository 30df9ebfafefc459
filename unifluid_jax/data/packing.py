"""Examples -> batches of laid-out rows (unifluid_jax/layout.py), fixed or packed, exactly resumable.

    data.layout         'fixed' (one example per row) | 'packed' (first-fit, several per row)
    data.row_slots / row_und / row_gen / row_targets   packed row capacities S / U / G / T; 0 = derived
                        (layout.packed_spec: S = the fixed row length)

Packing fills the B rows of a batch first-fit: examples deferred from the previous batch first (oldest
first), then new ones; an example that fits no row is deferred to the next batch. A batch is done when every
row is full (no room for the smallest example) or `lookahead` examples wait. Skip markers are counted once,
when first read.

Resumability: the state is the parent's state from before the oldest deferred example, the stream indices
of the deferred examples and the next stream index. `set_state` restores the parent there and re-reads up to
the next index, keeping only the deferred examples (placed ones and skip markers are dropped, not recounted):
a restored iterator yields exactly the batches the original would have.

gen_uid of an example = (stream index * process_count + process_index) mod 2^31: unique within a step.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import grain
import numpy as np

from unifluid_jax import layout

_ROW_FIELDS = ("layout", "row_slots", "row_und", "row_gen", "row_targets")


def row_spec(cfg, dims: layout.Dims) -> layout.RowSpec:
    """The row capacities `cfg` (config.data) asks for."""
    if cfg.layout == "fixed":
        return layout.fixed_spec(dims)
    return layout.packed_spec(dims, cfg.row_slots, cfg.row_und, cfg.row_gen, cfg.row_targets)


def check_config(cfg, dims: layout.Dims, tasks, path: str = "data") -> None:
    """LayoutError (with the fields to change) unless every task of the mix fits an empty row."""
    if cfg.layout not in layout.LAYOUTS:
        raise layout.LayoutError(f"{path}.layout: unknown layout {cfg.layout!r}; choose one of {layout.LAYOUTS}")
    for k in _ROW_FIELDS[1:]:
        if int(cfg[k]) < 0:
            raise layout.LayoutError(f"{path}.{k}: must be >= 0 (0 = derived), got {cfg[k]}")
    layout.check_spec(row_spec(cfg, dims), dims, [layout.task_id(t) for t in tasks], path)


class RowBatching(grain.IterDataset):
    """Per-example dicts (and skip markers) -> batches of B laid-out rows plus num_skipped (see module doc)."""

    def __init__(self, parent: grain.IterDataset, batch_size: int, spec: layout.RowSpec, dims: layout.Dims,
                 image_spec: Mapping[str, tuple], *, packed: bool, num_reasons: int, max_consecutive_skips: int,
                 process_index: int = 0, process_count: int = 1, lookahead: int = 0,
                 on_skip: Callable | None = None, too_many_skips: Callable | None = None):
        super().__init__(parent)
        self.kw = dict(batch_size=batch_size, spec=spec, dims=dims, image_spec=dict(image_spec), packed=packed,
                       num_reasons=num_reasons, max_skips=max_consecutive_skips, uid=(process_index, process_count),
                       lookahead=lookahead or batch_size, on_skip=on_skip, too_many_skips=too_many_skips)
        self.shared_memory = False

    def enable_shared_memory_output(self) -> None:
        from unifluid_jax.data.pipeline import _shm_array_type
        self.shared_memory = _shm_array_type() is not None

    def __iter__(self):
        return _RowBatchingIterator(self._parent.__iter__(), shared_memory=self.shared_memory, **self.kw)


class _RowBatchingIterator(grain.DatasetIterator):

    def __init__(self, parent, *, batch_size, spec, dims, image_spec, packed, num_reasons, max_skips, uid,
                 lookahead, on_skip, too_many_skips, shared_memory):
        super().__init__(parent)
        self._b, self._spec, self._dims, self._image_spec, self._packed = batch_size, spec, dims, image_spec, packed
        self._num_reasons, self._max_skips, self._proc = num_reasons, max_skips, uid
        self._lookahead, self._on_skip, self._too_many = lookahead, on_skip, too_many_skips
        self._shm = None
        if shared_memory:
            from unifluid_jax.data.pipeline import _shm_array_type
            self._shm = _shm_array_type()
        self._pending: list[tuple[int, dict]] = []  # (stream index, example), oldest first
        self._snapshot, self._snap_index = None, 0  # parent state before the oldest pending example
        self._next_index, self._run = 0, 0
        self._min_slots = min(dims.slots(t, 1) for t in range(layout.NUM_TASKS)) if packed else 0
        self._exhausted = False

    def _alloc(self, shape, dtype):
        return self._shm(shape, dtype=dtype) if self._shm is not None else np.zeros(shape, dtype)

    def _uid(self, index: int) -> int:
        pi, pc = self._proc
        return (index * pc + pi) % 2**31

    def _read(self):
        """The next parent element with its stream index (snapshotting the parent while nothing is pending)."""
        if not self._pending:
            self._snapshot, self._snap_index = self._parent.get_state(), self._next_index
        ex = next(self._parent)
        idx = self._next_index
        self._next_index += 1
        return idx, ex

    def _full(self, rows: layout.RowBatch) -> bool:
        if not self._packed:
            return len(rows) >= self._b
        return bool((self._spec.slots - rows.used[:, 0] < self._min_slots).all())

    def __next__(self) -> dict:
        rows = layout.RowBatch(self._b, self._spec, self._dims, self._image_spec, self._packed, self._alloc)
        skipped = np.zeros((self._num_reasons,), np.int32)
        still = [(i, ex) for i, ex in self._pending if rows.add(ex, self._uid(i)) is None]
        self._pending = still
        while not self._exhausted and not self._full(rows) and len(self._pending) < self._lookahead:
            try:
                idx, ex = self._read()
            except StopIteration:
                self._exhausted = True
                break
            if "_skip" in ex:
                skipped[ex["_skip"]] += 1
                if self._on_skip is not None:
                    self._on_skip(ex)
                self._run += 1
                if self._run >= self._max_skips:
                    self._too_many(self._run, skipped)
                continue
            self._run = 0
            if rows.add(ex, self._uid(idx)) is None:
                self._pending.append((idx, ex))
        if len(rows) == 0:
            raise StopIteration
        batch = dict(rows.arrays)
        batch["num_skipped"] = skipped
        return batch

    def get_state(self):
        parent = self._snapshot if self._pending else self._parent.get_state()
        return {"parent": parent, "snap_index": self._snap_index if self._pending else self._next_index,
                "pending": [i for i, _ in self._pending], "next_index": self._next_index, "run": self._run,
                "exhausted": self._exhausted}

    def set_state(self, state):
        self._parent.set_state(state["parent"])
        keep = set(state["pending"])
        self._pending = []
        self._snapshot, self._snap_index = state["parent"], state["snap_index"]
        for idx in range(state["snap_index"], state["next_index"]):
            ex = next(self._parent)  # re-read: only the deferred examples are kept
            if idx in keep:
                self._pending.append((idx, ex))
        self._next_index, self._run, self._exhausted = state["next_index"], state["run"], state["exhausted"]
