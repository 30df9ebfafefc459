"""Safe resume: the config saved with a checkpoint is compared with the new one before anything compiles, and
a damaged newest checkpoint is moved aside (never deleted) so the run resumes from the newest good one.

Config changes on resume. Keys under FREE may change (logging, eval, checkpointing, mesh/sharding: orbax
reshards exactly). Any other difference (model, data order, seed, task, optimizer) is one ConfigError listing
every key as `old -> new`, unless `config.checkpoint.allow_changed` names it (a dotted key or a section
prefix), e.g. `--config.checkpoint.allow_changed="('optimizer.lr',)"`. REFUSED keys cannot be allowed: the
data iterator's position counts batches, so another batch size would skip or repeat examples. Changes that
alter a saved array's shape are refused too (listed per array).
"""
from __future__ import annotations

import json
import logging
from typing import Any

import jax

from unifluid_jax.checks import ConfigError

log = logging.getLogger(__name__)

# Keys (dotted prefixes) free to differ between the saved and the new config: they change neither the model,
# the data order nor the optimizer's state.
FREE = ("train.num_steps", "train.log_every", "train.eval_every", "train.sample_every",
        "train.compilation_cache_dir", "checkpoint", "debug", "distributed", "mesh", "sharding", "eval", "infer",
        "data.read_threads", "data.prefetch", "data.worker_buffer_size", "vae_train.eval_batches",
        "vae_train.eval_sources")
REFUSED = ("train.batch_size", "data.per_host_batch_size")


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: d}


def _under(key: str, prefixes) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


_ABSENT = "<absent>"


def config_diff(old: dict, new: dict) -> list[tuple[str, Any, Any]]:
    """(key, old, new) for every leaf that differs, tuples and lists compared alike (JSON form)."""
    old, new = _flat(json.loads(json.dumps(old))), _flat(json.loads(json.dumps(new)))
    return [(k, old.get(k, _ABSENT), new.get(k, _ABSENT)) for k in sorted(set(old) | set(new))
            if old.get(k, _ABSENT) != new.get(k, _ABSENT)]


def check_config(saved: dict, config, step: int, where: str) -> None:
    """Raises one ConfigError for every change that resuming step `step` would silently apply."""
    allowed = tuple(config.checkpoint.get("allow_changed", ()))
    full = config_diff(saved, config.to_dict())
    diff = [d for d in full if not _under(d[0], FREE)]
    refused = [d for d in diff if _under(d[0], REFUSED)]
    if refused:
        lines = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in refused)
        raise ConfigError(
            f"resuming {where} (step {step}) with a different batch size ({lines}) is refused: the saved data "
            "position counts batches, so examples would be skipped or repeated. Keep the saved value, or start a "
            f"new workdir with --config.checkpoint.init_from={where} to continue from its weights")
    blocked = [d for d in diff if not _under(d[0], allowed)]
    if blocked:
        lines = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in blocked)
        keys = ", ".join(repr(k) for k, _, _ in blocked)
        raise ConfigError(
            f"the config differs from the one saved with {where} (step {step}): {lines}. Restore the saved "
            f"values, or confirm the change with --config.checkpoint.allow_changed=\"({keys},)\"")
    if diff:
        log.warning("resuming step %d with config changes allowed by checkpoint.allow_changed: %s", step,
                    "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in diff))
    steps_changed = [d for d in full if d[0] == "train.num_steps"]
    if steps_changed and config.optimizer.schedule != "constant":
        log.warning("train.num_steps %r -> %r: the %s learning-rate schedule is stretched to the new total",
                    steps_changed[0][1], steps_changed[0][2], config.optimizer.schedule)


def _path(keys) -> str:
    """'opt_state/1/0/mu/embedder/...': orbax's metadata stores optax's namedtuples as plain containers."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in keys)


def shape_diff(saved_tree, abstract_state) -> list[str]:
    """'path: saved shape/dtype -> new' for arrays whose shape or dtype differ, and arrays only one side has."""
    saved = {_path(p): x for p, x in jax.tree_util.tree_leaves_with_path(saved_tree)}
    new = {_path(p): x for p, x in jax.tree_util.tree_leaves_with_path(abstract_state)}

    def desc(x):
        return "<absent>" if x is None else f"{tuple(x.shape)} {x.dtype}"

    keys = sorted(set(saved) | set(new), key=lambda k: (not k.startswith("params/"), k))  # params first
    return [f"{k}: {desc(saved.get(k))} -> {desc(new.get(k))}" for k in keys
            if saved.get(k) is None or new.get(k) is None or tuple(saved[k].shape) != tuple(new[k].shape)
            or str(saved[k].dtype) != str(new[k].dtype)]


def restore_latest(ckpt, abstract_state, data_iter, config, where: str):
    """(state, step) from the newest checkpoint that restores completely, or None if there is none.

    A step that fails to restore is reported once (step and reason), moved to `<step>.damaged` and the next
    older one is tried. Config differences and shape changes are ConfigErrors, never "damage"."""
    for step in sorted(ckpt.all_steps(), reverse=True):
        problem = None
        saved = ckpt.saved_config(step)
        if isinstance(saved, str):
            problem = saved
        else:
            check_config(saved, config, step, where)
            meta = ckpt.state_metadata(step)
            if isinstance(meta, str):
                problem = meta
            else:
                bad = shape_diff(meta, abstract_state)
                if bad:
                    raise ConfigError(
                        f"the saved state of {where} (step {step}) does not fit the configured model/optimizer "
                        f"({len(bad)} arrays): {'; '.join(bad[:8])}{' ...' if len(bad) > 8 else ''}. Restore the "
                        f"saved config, or start a new workdir with --config.checkpoint.init_from={where}")
                if data_iter is not None:
                    problem = ckpt.data_problem(step)
        state = None
        if problem is None:
            try:
                state = ckpt.restore(step, abstract_state, data_iter)
                jax.block_until_ready(state)
            except ConfigError:
                raise
            except Exception as e:  # noqa: BLE001 (storage errors have no common type; the step is kept aside)
                problem = f"restore failed: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        problem = ckpt.agree(f"restore_{step}", problem)
        if problem is None:
            return state, step
        moved = ckpt.move_aside(step)
        log.warning("checkpoint step %d is damaged (%s); moved to %s, trying the previous step", step, problem,
                    moved)
    return None
