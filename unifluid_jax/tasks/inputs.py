"""Adapters between the grain pipeline and the trainer's iterator contract."""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from unifluid_jax.data import pipeline


def host_iterator(config, process_index: int, process_count: int, **kwargs):
    """The pipeline iterator of this host's shard of `config.data`, at its share of the global batch."""
    return pipeline.make_iterator(config.data, shard_index=process_index, shard_count=process_count,
                                  batch_size=config.train.batch_size // process_count, **kwargs)


class SkipCounter:
    """Wraps a pipeline iterator: pops the per-host `num_skipped` stats (keeping running totals for the
    trainer's metrics) and optionally keeps / renames fields. Checkpointable like the iterator it wraps."""

    def __init__(self, it, fields: Mapping[str, str] | None = None):
        self.it = it
        self.fields = dict(fields) if fields is not None else None  # {pipeline field: task field}
        self.totals = np.zeros(len(pipeline.SKIP_REASONS), np.int64)

    def __iter__(self):
        return self

    def __next__(self):
        batch, stats = pipeline.split_stats(next(self.it))
        if "num_skipped" in stats:
            self.totals += np.asarray(stats["num_skipped"], np.int64)
        if self.fields is not None:
            batch = {new: batch[old] for old, new in self.fields.items()}
        return batch

    def get_state(self):
        return self.it.get_state()

    def set_state(self, state):
        self.it.set_state(state)

    def close(self):
        if hasattr(self.it, "close"):
            self.it.close()

    def metrics(self) -> dict[str, float]:
        out = {f"data/skipped_{r}": float(n) for r, n in zip(pipeline.SKIP_REASONS, self.totals)}
        out["data/skipped_total"] = float(self.totals.sum())
        return out
