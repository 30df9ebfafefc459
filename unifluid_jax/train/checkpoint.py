"""Orbax checkpoints of the train state + every host's data-iterator state + the config; exact resume.

Layout of `<workdir>/checkpoints/<step>/`:
    state/    StandardSave of {'step', 'params', 'opt_state', 'rng', ['ema_params']} (sharded arrays, async)
    data/     process_<i>-of-<n>.json: each process's iterator state (written by every process)
    config/   the run's config as JSON (primary process)
An interrupted save leaves `<step>.orbax-checkpoint-tmp*`; orbax never lists it as a step and removes it
when the next manager starts, so resume always uses the latest complete step.
"""
from __future__ import annotations

import base64
import dataclasses
import json
import logging
import os
import signal
import time
from typing import Any

from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp

from unifluid_jax.checks import check, check_positive

log = logging.getLogger(__name__)


def validate_config(section, path: str = "checkpoint") -> None:
    check_positive(section, path, "every_steps", "keep_every", allow_zero=True)
    check(section.max_to_keep is None or section.max_to_keep >= 1, f"{path}.max_to_keep",
          f"must be None or >= 1, got {section.max_to_keep!r}")
    from unifluid_jax.train import init_weights  # published-weight formats (hf, flax, big_vision, ...)
    init_weights.validate_entries(section.get("init_subtrees", ()), f"{path}.init_subtrees")
    allowed = section.get("allow_changed", ())
    check(isinstance(allowed, (tuple, list)) and all(isinstance(k, str) and k for k in allowed),
          f"{path}.allow_changed", f"expected a tuple of dotted config keys, e.g. ('optimizer.lr',), got {allowed!r}")
    if section.init_from:
        check(epath.Path(section.init_from).exists(), f"{path}.init_from",
              f"no such directory {section.init_from!r} (a workdir or its checkpoints/ folder)")


# --------------------------------------------------------------------------------------------------------
# Per-process data iterator state.


class DataIteratorHandler(ocp.CheckpointHandler):
    """Writes/reads `process_<i>-of-<n>.json` with the iterator's get_state() (dict, or bytes as base64)."""

    def save(self, directory: epath.Path, args: "DataSave"):
        state = args.item.get_state()
        if isinstance(state, bytes):
            state = {"__bytes_b64__": base64.b64encode(state).decode()}
        (directory / _filename()).write_text(json.dumps(state, indent=1, sort_keys=True))
        if args.debug_kill:  # test hook: die while the step's temporary directory is half written
            log.warning("debug.kill_in_save_at_step: SIGKILL inside the checkpoint save")
            os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(60)

    def restore(self, directory: epath.Path, args: "DataRestore"):
        f = directory / _filename()
        if not f.exists():
            found = sorted(p.name for p in directory.iterdir())
            raise ValueError(f"no data iterator state {f} (found {found}); resuming with a different number of "
                             "processes needs a fresh data position: set checkpoint.restore_data=False")
        state = json.loads(f.read_text())
        if isinstance(state, dict) and "__bytes_b64__" in state:
            state = base64.b64decode(state["__bytes_b64__"])
        args.item.set_state(state)
        return args.item

    def metadata(self, directory):
        return None

    def structure(self, directory):
        return None

    def finalize(self, directory):
        pass

    def close(self):
        pass


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0][:300] if str(e).strip() else ""


def _filename() -> str:
    return f"process_{jax.process_index()}-of-{jax.process_count()}.json"


@ocp.args.register_with_handler(DataIteratorHandler, for_save=True)
@dataclasses.dataclass
class DataSave(ocp.args.CheckpointArgs):
    item: Any
    debug_kill: bool = False  # config.debug.kill_in_save_at_step (tests only)


@ocp.args.register_with_handler(DataIteratorHandler, for_restore=True)
@dataclasses.dataclass
class DataRestore(ocp.args.CheckpointArgs):
    item: Any


# --------------------------------------------------------------------------------------------------------


def _abstract(tree):
    """Arrays (or ShapeDtypeStructs with .sharding) -> ShapeDtypeStructs carrying the target shardings."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def absolute(path: str) -> str:
    """Local paths made absolute (orbax/tensorstore refuse relative ones); URLs like gs://... unchanged."""
    return path if "://" in str(path) else os.path.abspath(path)


def checkpoint_dir(workdir: str) -> epath.Path:
    return epath.Path(absolute(workdir)) / "checkpoints"


class Checkpointer:
    """The run's CheckpointManager (async by default) with the save/restore calls the trainer needs."""

    def __init__(self, workdir: str, section, debug=None):
        self.workdir, self.section = workdir, section
        self.debug = debug
        preservation = [ocp.checkpoint_managers.LatestN(section.max_to_keep)]
        if section.keep_every:
            preservation.append(ocp.checkpoint_managers.EveryNSteps(int(section.keep_every)))
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(max(int(section.every_steps), 1))
            if section.every_steps else ocp.checkpoint_managers.SpecificStepsPolicy(()),
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(preservation),
            enable_async_checkpointing=bool(section.get("async_save", True)),
            cleanup_tmp_directories=True, create=True)
        self._kill_step = int(debug.get("kill_in_save_at_step", -1)) if debug is not None else -1
        self.manager = ocp.CheckpointManager(
            checkpoint_dir(workdir), options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "data": DataIteratorHandler(),
                           "config": ocp.JsonCheckpointHandler()})

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def should_save(self, step: int) -> bool:
        return self.manager.should_save(step)

    def save(self, step: int, state, data_iter, config_dict: dict, force: bool = False) -> bool:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=DataSave(data_iter, debug_kill=step == self._kill_step),
                                  config=ocp.args.JsonSave(config_dict))
        return self.manager.save(step, args=args, force=force)

    def restore(self, step: int, abstract_state, data_iter=None):
        """Restores `state` (into the shardings of `abstract_state`) and, if given, the iterator in place."""
        items = {"state": ocp.args.StandardRestore(_abstract(abstract_state))}
        if data_iter is not None:
            items["data"] = DataRestore(data_iter)
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        return out["state"]

    # -- resume checks (train/resume.py): each returns a problem string for a damaged step, None if fine ---

    def saved_config(self, step: int) -> dict | str:
        try:
            return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
        except Exception as e:  # noqa: BLE001
            return f"its saved config is unreadable ({type(e).__name__}: {_first_line(e)})"

    def state_metadata(self, step: int):
        """The saved state's array tree (shapes, dtypes), or a problem string."""
        try:
            meta = self.manager.item_metadata(step)["state"]
        except Exception as e:  # noqa: BLE001
            return f"its state metadata is unreadable ({type(e).__name__}: {_first_line(e)})"
        if meta is None:
            return "its state metadata (state/_METADATA) is missing"
        return getattr(meta, "tree", meta)

    def data_problem(self, step: int) -> str | None:
        """A missing/unreadable iterator file of this process is damage; files written by another number of
        processes are a config change (ConfigError)."""
        d = checkpoint_dir(self.workdir) / str(step) / "data"
        f = d / _filename()
        if not f.exists():
            other = sorted(p.name for p in d.iterdir() if p.name.endswith(".json")) if d.exists() else []
            if other and not any(n.endswith(f"-of-{jax.process_count()}.json") for n in other):
                from unifluid_jax.checks import ConfigError
                raise ConfigError(
                    f"checkpoint step {step} holds the data positions of another number of processes ({other}); "
                    f"this run has {jax.process_count()}. Resume with the same number of processes, or restart "
                    "the data from its beginning with --config.checkpoint.restore_data=False")
            return f"its data-iterator file {f.name} is missing"
        try:
            json.loads(f.read_text())
        except Exception as e:  # noqa: BLE001
            return f"its data-iterator file {f.name} is unreadable ({type(e).__name__})"
        return None

    def agree(self, tag: str, problem: str | None) -> str | None:
        """Every process learns every process's verdict (coordination service), so all fall back together."""
        if jax.process_count() == 1:
            return problem
        from jax._src import distributed
        client, me = distributed.global_state.client, jax.process_index()
        client.key_value_set(f"unifluid_{tag}/{me}", problem or "")
        found = [client.blocking_key_value_get(f"unifluid_{tag}/{i}", 600_000) for i in range(jax.process_count())]
        bad = [f"process {i}: {p}" for i, p in enumerate(found) if p]
        return "; ".join(bad) if bad else None

    def move_aside(self, step: int) -> epath.Path:
        """Renames `<step>` to `<step>.damaged` (primary process; never deleted) and rereads the step list."""
        src = checkpoint_dir(self.workdir) / str(step)
        dst = src.parent / f"{step}.damaged"
        n = 1
        while dst.exists():
            dst, n = src.parent / f"{step}.damaged.{n}", n + 1
        if jax.process_index() == 0:
            src.rename(dst)
        if jax.process_count() > 1:
            from unifluid_jax.train.trainer import sync_processes
            sync_processes(f"unifluid_moved_{step}", 600)
        self.manager.reload()
        return dst

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def restore_params_from(path: str, abstract_params, step: int | None = None):
    """Fine-tuning: only the params of another run (workdir or its checkpoints/ dir), into our shardings."""
    path = epath.Path(absolute(path))
    if (path / "checkpoints").exists():
        path = path / "checkpoints"
    with ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(read_only=True),
                               item_handlers={"state": ocp.PyTreeCheckpointHandler()}) as mgr:
        step = mgr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"checkpoint.init_from: no complete checkpoint under {path}")
        target = {"params": _abstract(abstract_params)}
        restore_args = ocp.checkpoint_utils.construct_restore_args(target)
        out = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=target, restore_args=restore_args, partial_restore=True)))
    return out["state"]["params"], step


def serving_params(state):
    """The params to evaluate, sample from and serve: the EMA weights when the run keeps them (MAR and the
    paper recipe evaluate the EMA), else the trained params. `state` is a train state or a loaded one."""
    return state["ema_params"] if "ema_params" in state else state["params"]


def load_numpy(workdir: str, step: int | None = None, item: str = "state"):
    """A saved step's item as a tree of host numpy arrays, on any device count (tools, tests, export)."""
    path = checkpoint_dir(workdir) if (epath.Path(absolute(workdir)) / "checkpoints").exists() \
        else epath.Path(absolute(workdir))
    with ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(read_only=True),
                               item_handlers={item: ocp.PyTreeCheckpointHandler()}) as mgr:
        step = mgr.latest_step() if step is None else step
        meta = mgr.item_metadata(step)[item]
        tree = getattr(meta, "tree", meta)
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        out = mgr.restore(step, args=ocp.args.Composite(**{item: ocp.args.PyTreeRestore(
            restore_args=restore_args)}))
    return out[item]
