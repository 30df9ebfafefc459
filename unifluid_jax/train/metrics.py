"""Training metrics: tensorboard events (tensorboardX), a console progress line, a summary JSON.

Only process 0 writes; other processes get a writer whose methods do nothing, so callers never branch.
Hooks (`Hooks`) are the points where evaluation and sampling plug in: callables registered by the task or
by other code, run every `train.eval_every` / `train.sample_every` steps with (params, step, writer).
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from typing import Callable

import jax
import numpy as np

from unifluid_jax import fs

log = logging.getLogger(__name__)


class Writer:
    """Scalars/images/text to tensorboard + a console line + the final summary (process 0 only)."""

    def __init__(self, workdir: str, total_steps: int, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.workdir, self.total_steps = workdir, total_steps
        self._tb = None
        if self.enabled:
            SummaryWriter = _summary_writer_cls()
            fs.makedirs(workdir)
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), flush_secs=10)
        self._last_time, self._last_step = None, None
        self._history: dict[str, list[tuple[int, float]]] = {}

    def scalars(self, step: int, values: dict) -> None:
        for k, v in values.items():
            v = float(v)
            self._history.setdefault(k, []).append((step, v))
            if self._tb is not None:
                self._tb.add_scalar(k, v, step)

    def image(self, step: int, name: str, image: np.ndarray) -> None:
        """image: [H, W, C] uint8 or float in [0, 1]."""
        if self._tb is not None:
            self._tb.add_image(name, np.asarray(image), step, dataformats="HWC")

    def text(self, step: int, name: str, text: str) -> None:
        if self._tb is not None:
            self._tb.add_text(name, text, step)

    def progress(self, step: int, values: dict, examples: int, tokens: int) -> dict:
        """Console line with throughput since the previous call; returns the throughput scalars."""
        now = time.perf_counter()
        out = {}
        if self._last_time is not None and step > self._last_step:
            dt, ds = now - self._last_time, step - self._last_step
            out = {"perf/steps_per_sec": ds / dt, "perf/examples_per_sec": ds * examples / dt,
                   "perf/tokens_per_sec": ds * tokens / dt}
        self._last_time, self._last_step = now, step
        if self.enabled:
            sps = out.get("perf/steps_per_sec")
            eta = "" if not sps else f" eta {_hms((self.total_steps - step) / sps)}"
            rates = "" if not sps else f" | {sps:.2f} steps/s {out['perf/tokens_per_sec']:.0f} tok/s"
            shown = " ".join(f"{k.split('/')[-1]}={float(v):.4g}" for k, v in values.items()
                             if k.startswith("train/"))
            log.info("step %d/%d | %s%s%s", step, self.total_steps, shown, rates, eta)
        return out

    def summary(self, extra: dict | None = None) -> dict:
        """Writes metrics_summary.json: last, min and mean-of-last-10 per scalar, plus `extra`."""
        out = {"metrics": {}}
        for k, hist in self._history.items():
            vals = [v for _, v in hist]
            out["metrics"][k] = {"last": vals[-1], "last_step": hist[-1][0], "min": min(vals),
                                 "mean_last10": float(np.mean(vals[-10:]))}
        out["loss_curve"] = self._history.get("train/loss", [])
        out.update(extra or {})
        if self.enabled:
            with fs.open(os.path.join(self.workdir, "metrics_summary.json"), "w") as f:
                json.dump(out, f, indent=1, sort_keys=True, default=_json_default)
        return out

    def history(self, key: str) -> list[tuple[int, float]]:
        return list(self._history.get(key, []))

    def flush(self):
        if self._tb is not None:
            self._tb.flush()

    def close(self):
        if self._tb is not None:
            self._tb.close()


def _summary_writer_cls():
    """tensorboardX.SummaryWriter without importing torch (tensorboardX imports it only to accept tensors;
    that costs seconds per process)."""
    if "torch" in sys.modules or "tensorboardX" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None  # makes `import torch` fail inside tensorboardX only
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


def _json_default(x):
    return x.item() if hasattr(x, "item") else str(x)


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


Hook = Callable[..., "dict | None"]  # (params, step, writer) -> optional {name: scalar}


class Hooks:
    """Eval and sample hook points; returned scalars are logged under eval/ or sample/."""

    def __init__(self):
        self.eval: list[Hook] = []
        self.sample: list[Hook] = []

    def add_eval(self, fn: Hook) -> None:
        self.eval.append(fn)

    def add_sample(self, fn: Hook) -> None:
        self.sample.append(fn)

    def run(self, kind: str, params, step: int, writer: Writer) -> None:
        for fn in getattr(self, kind):
            out = fn(params, step, writer)
            if out:
                writer.scalars(step, {f"{kind}/{k}": v for k, v in out.items()})
