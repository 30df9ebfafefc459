"""What the generic trainer needs from a task (toy LM, VAE, SigLIP, UniFluid), and the registry of tasks by name.

Tasks are registered by import path and imported only when selected, so an unfinished task never breaks
the others. `config.task` is a registered name or a 'package.module:ClassName' path (handy for tests).

A task is constructed with the full config and provides:
  init_params(rng) -> params                  may be boxed (nn.LogicallyPartitioned); called under jit with
                                              out_shardings, so params are created directly sharded
  loss_fn(params, batch, rng, step) -> (loss, metrics)
                                              params unboxed; batch is a dict of global arrays; `metrics` a
                                              dict of scalars (logged as train/<name>); traced under jit
  make_input(config, process_index, process_count) -> iterator
                                              yields dicts of numpy arrays with this process's rows of each
                                              global batch (shard `process_index` of `process_count` equal
                                              blocks); supports get_state() / set_state() (JSON dict or bytes);
                                              optional metrics() -> {name: scalar} (e.g. data/skipped_*) is
                                              logged at every log step, optional close() at the end
  batch_logical_axes: {field: ('act_batch', None, ...)}
optionally:
  validate_config(config)                     (classmethod/staticmethod) extra checks, before any compile
  tokens_per_batch(batch) -> int              for tokens/s (default: elements of the first int field)
  host_metrics() -> {name: scalar}            host-side scalars logged every log step (e.g. data/skipped_*)
  eval_fn(params, step, writer) -> dict       called every config.train.eval_every steps on all processes
  sample_hooks() -> [callable(params, step, writer)]  every config.train.sample_every steps
"""
from __future__ import annotations

import abc
import importlib
from typing import Any, Callable, Iterator, Mapping

from unifluid_jax.checks import ConfigError

Batch = Mapping[str, Any]

REGISTRY: dict[str, str] = {
    "lm": "unifluid_jax.tasks.lm:LMTask",
    "vae": "unifluid_jax.tasks.vae:VAETask",
    "unifluid": "unifluid_jax.tasks.unifluid:UniFluidTask",
    "siglip": "unifluid_jax.tasks.siglip:SigLIPTask",
}


def register(name: str, path: str) -> None:
    """Adds a task 'name' -> 'module:Class' (imported lazily)."""
    REGISTRY[name] = path


class CheckpointableIterator(abc.ABC):
    """The data iterator contract (grain DatasetIterators satisfy it as they are)."""

    @abc.abstractmethod
    def __next__(self) -> dict: ...

    def __iter__(self):
        return self

    @abc.abstractmethod
    def get_state(self): ...

    @abc.abstractmethod
    def set_state(self, state) -> None: ...


class Task(abc.ABC):
    batch_logical_axes: Mapping[str, tuple[str | None, ...]] = {}

    def __init__(self, config):
        self.config = config
        self._input = None  # the newest make_input iterator: host_metrics reports its counts

    def track_input(self, it):
        """make_input's iterator, remembered so that host_metrics can report its counts."""
        self._input = it
        return it

    @classmethod
    def validate_config(cls, config) -> None:
        """Task-specific checks (call the model modules' validate_config here). Raise ConfigError."""

    @abc.abstractmethod
    def init_params(self, rng): ...

    @abc.abstractmethod
    def loss_fn(self, params, batch: Batch, rng, step) -> tuple[Any, dict]: ...

    @abc.abstractmethod
    def make_input(self, config, process_index: int, process_count: int) -> Iterator[dict]: ...

    def tokens_per_batch(self, batch: Batch) -> int:
        for v in batch.values():
            if getattr(v, "dtype", None) is not None and v.dtype.kind in "iu":
                return int(v.size)
        return 0

    def host_metrics(self) -> dict:
        """Host-side counts of the newest input (e.g. records skipped as undecodable)."""
        return self._input.metrics() if hasattr(self._input, "metrics") else {}

    def eval_fn(self, params, step: int, writer) -> dict | None:
        return None

    def sample_hooks(self) -> list[Callable]:
        return []


def resolve(name: str) -> type[Task]:
    """The Task class for `config.task`; a clear ConfigError if it is unknown or fails to import."""
    path = REGISTRY.get(name, name if ":" in name else None)
    if path is None:
        raise ConfigError(f"config.task: unknown task {name!r}; choose one of {sorted(REGISTRY)} "
                          "or give 'package.module:ClassName'")
    module, _, cls = path.partition(":")
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(f"config.task: task {name!r} ({path}) cannot be imported: {e}") from e
    if not hasattr(mod, cls):
        raise ConfigError(f"config.task: {module} has no class {cls!r}")
    return getattr(mod, cls)


def get(config) -> Task:
    return resolve(config.task)(config)
