"""The generic sharded training loop: any `Task` (train/task.py), optax, orbax, multi-host, exact resume.

State (a dict, saved as is): step (int32, completed updates), params, opt_state, rng (raw uint32 key; step k
uses fold_in(rng, k) so no rng is threaded through steps), bad_step (int32; -1, or the first step whose loss
or grad norm was non-finite: from then on the step leaves the state untouched), [ema_params].

Step numbering: "step N" is the state after N updates; checkpoints, logs and debug switches use it.
"""
from __future__ import annotations

import hashlib
import logging
import os
import signal
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from unifluid_jax import fs
from unifluid_jax.checks import check, check_choice, check_positive
from unifluid_jax.train import checkpoint as ckpt_lib
from unifluid_jax.train import init_weights
from unifluid_jax.train import metrics as metrics_lib
from unifluid_jax.train import optimizer as opt_lib
from unifluid_jax.train import resume as resume_lib
from unifluid_jax.train import sharding
from unifluid_jax.train import signals
from unifluid_jax.train import watchdog
from unifluid_jax.train import task as task_lib

log = logging.getLogger(__name__)


class NonFiniteError(FloatingPointError):
    """Raised when a step's loss or gradient norm is NaN/Inf; the message names the last good checkpoint."""


def validate_config(train, path: str = "train") -> None:
    check_positive(train, path, "num_steps", "batch_size", "log_every")
    check_positive(train, path, "eval_every", "sample_every", allow_zero=True)


def validate_distributed(section, path: str = "distributed") -> None:
    check_choice(section.mode, f"{path}.mode", ("auto", "on", "off"))
    check_positive(section, path, "heartbeat_timeout_s", allow_zero=True)
    if section.mode == "on" and not section.coordinator_address:
        check(bool(os.environ.get("JAX_COORDINATOR_ADDRESS")), f"{path}.coordinator_address",
              "mode='on' needs coordinator_address (or $JAX_COORDINATOR_ADDRESS), e.g. '10.0.0.1:1234'")


# ---------------------------------------------------------------------------------------------------------
# Multi-host.


def maybe_initialize_distributed(section) -> None:
    """jax.distributed.initialize from config/env ('on'), or when a multi-host launch is detected ('auto').

    Explicit values: config.distributed.{coordinator_address, num_processes, process_id} or the env vars
    JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID. With none of them on a TPU pod or a GKE
    JobSet, jax detects the cluster itself."""
    if section.mode == "off" or jax.distributed.is_initialized():
        return
    addr = section.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    nproc = section.num_processes if section.num_processes > 0 else int(os.environ.get("JAX_NUM_PROCESSES", -1))
    pid = section.process_id if section.process_id >= 0 else int(os.environ.get("JAX_PROCESS_ID", -1))
    multi_tpu = "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
    jobset = bool(os.environ.get("JOBSET_NAME"))
    if section.mode == "auto" and not (addr or multi_tpu or jobset):
        return
    kwargs = {}
    if addr:
        kwargs["coordinator_address"] = addr
    if nproc > 0:
        kwargs["num_processes"] = nproc
    if pid >= 0:
        kwargs["process_id"] = pid
    if section.get("local_device_ids"):
        kwargs["local_device_ids"] = list(section.local_device_ids)
    timeout = float(section.get("heartbeat_timeout_s", 0) or 0)
    if timeout > 0:  # jax's own detection (an abort with a C++ stack) only after our watchdog's message
        kwargs["heartbeat_timeout_seconds"] = int(2 * timeout + 10)
    jax.distributed.initialize(**kwargs)
    watchdog.start(section)
    log.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())


def sync_processes(name: str, timeout_s: int = 3600) -> None:
    """A barrier over the coordination service (no collective): lets every process finish compiling
    before the first cross-process collective, whose transport setup (gloo on CPU) times out after 30 s."""
    if jax.process_count() == 1:
        return
    from jax._src import distributed  # the public multihost_utils barrier is itself a collective
    distributed.global_state.client.wait_at_barrier(name, timeout_in_ms=timeout_s * 1000)


class Preemption:
    """SIGTERM sets a flag (single process); multi-process runs ask jax's preemption sync point, which all
    processes reach at the same step, so every host saves the same step."""

    def __init__(self):
        self.multi, self._old = jax.process_count() > 1, None
        if not self.multi:  # main.py installed it at start-up already; programmatic runs install it here
            self._old = signals.catch_sigterm()

    def reached(self, step: int) -> bool:
        if self.multi:
            from jax.experimental import multihost_utils
            return bool(multihost_utils.reached_preemption_sync_point(step))
        return signals.sigterm_seen()

    def restore(self):
        if not self.multi:
            signals.clear()
            if self._old is not None:
                signal.signal(signal.SIGTERM, self._old)


# ---------------------------------------------------------------------------------------------------------
# Shardings.


def opt_state_shardings(abstract_opt_state, params_abstract, param_shardings, mesh):
    """Optimizer-state leaves that mirror a param (same trailing key path and shape) get its sharding;
    everything else (counts, scalars) is replicated. Works through chain/masked/multi_transform states."""
    by_path = {}
    for (path, x), s in zip(jax.tree_util.tree_flatten_with_path(params_abstract)[0],
                            jax.tree.leaves(param_shardings)):
        by_path[tuple(path)] = (x.shape, s)
    repl = NamedSharding(mesh, P())

    def pick(path, x):
        path = tuple(path)
        for k in range(len(path)):
            hit = by_path.get(path[k:])
            if hit is not None and hit[0] == x.shape:
                return hit[1]
        return repl

    return jax.tree_util.tree_map_with_path(pick, abstract_opt_state)


# ---------------------------------------------------------------------------------------------------------


class Trainer:
    """Builds sharded init/step functions for a task; `run()` is the loop."""

    def __init__(self, config, workdir: str, devices=None):
        self.config, self.workdir = config, workdir
        self.task = task_lib.get(config)
        self.mesh = sharding.mesh_from_config(config, devices)
        self.rules = sharding.rules_of(config)
        self.total_steps = int(config.train.num_steps)
        self.global_batch = int(config.train.batch_size)
        opt = config.optimizer
        check(self.global_batch % int(opt.grad_accum_steps) == 0, "optimizer.grad_accum_steps",
              f"must divide train.batch_size ({self.global_batch}), got {opt.grad_accum_steps}")
        # The root key is made outside the mesh context: an eager op there would run on the mesh's devices,
        # which for AOT compilation (tools/aot.py) are compile-only TPU devices.
        self.rng = jax.random.PRNGKey(int(config.seed))
        with self.context():
            self._build()

    def context(self):
        """Mesh + logical axis rules, active while tracing (so nn.with_logical_constraint applies)."""
        import contextlib
        stack = contextlib.ExitStack()
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(nn.logical_axis_rules(self.rules))
        return stack

    # -- build ------------------------------------------------------------------------------------------

    def _build(self):
        cfg, mesh = self.config, self.mesh
        boxed = jax.eval_shape(self.task.init_params, self.rng)
        self.boxed_abstract = boxed
        params_abstract = sharding.unbox_abstract(boxed)
        self.param_shardings = sharding.fitted_param_shardings(mesh, boxed, self.rules)
        self.tx, self.schedule = opt_lib.make(cfg.optimizer, boxed, self.total_steps)
        self.trainable = opt_lib.trainable_mask(cfg.optimizer, params_abstract)
        self.ema_decay = float(cfg.optimizer.ema_decay)
        self._check_sharded(params_abstract)

        def init_state(rng):
            params_rng, train_rng = jax.random.split(rng)
            params = nn.meta.unbox(self.task.init_params(params_rng))
            state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": self.tx.init(params),
                     "rng": train_rng, "bad_step": jnp.full((), -1, jnp.int32)}
            if self.ema_decay > 0:
                state["ema_params"] = jax.tree.map(jnp.copy, params)
            return state

        abstract = jax.eval_shape(init_state, self.rng)
        repl = NamedSharding(mesh, P())
        self.state_shardings = {
            "step": repl, "rng": repl, "bad_step": repl, "params": self.param_shardings,
            "opt_state": opt_state_shardings(abstract["opt_state"], params_abstract, self.param_shardings, mesh)}
        if self.ema_decay > 0:
            self.state_shardings["ema_params"] = self.param_shardings
        self.abstract_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                           abstract, self.state_shardings)
        self.init_state = sharding.jit_once(init_state, mesh.devices.flat, out_shardings=self.state_shardings)
        self.batch_shardings = sharding.batch_shardings(mesh, self.task.batch_logical_axes, self.rules)
        first = next(iter(self.batch_shardings.values()))
        self.shard_index, self.shard_count, self.local_batch = sharding.data_shard(first, self.global_batch)
        self.train_step = jax.jit(self._train_step, in_shardings=(self.state_shardings, self.batch_shardings),
                                  out_shardings=(self.state_shardings, repl), donate_argnums=(0,))

    def _check_sharded(self, params_abstract):
        sec = self.config.sharding
        if sec.check_large_params == "off":
            return
        bad = sharding.unsharded_large_params(self.mesh, self.param_shardings, params_abstract,
                                              int(sec.large_param_size))
        if bad:
            msg = (f"{len(bad)} params with >= {sec.large_param_size} elements are fully replicated on mesh "
                   f"{dict(self.mesh.shape)}: {bad[:5]}; add logical-axis rules (config.sharding.rules) or "
                   "set config.sharding.check_large_params='off'")
            if sec.check_large_params == "raise":
                raise ValueError(msg)
            log.warning(msg)

    # -- step -------------------------------------------------------------------------------------------

    def _loss_and_grads(self, params, batch, rng, step):
        nan_at = int(self.config.debug.nan_at_step)

        def loss_of(p, mb, r):
            loss, metrics = self.task.loss_fn(p, mb, r, step)
            if nan_at >= 0:  # test switch: poison one step's loss (and therefore its gradients)
                loss = loss + jnp.where(step + 1 == nan_at, jnp.nan, 0.0)
            return loss, metrics

        grad_fn = jax.value_and_grad(loss_of, has_aux=True)
        accum = int(self.config.optimizer.grad_accum_steps)
        if accum == 1:
            (loss, metrics), grads = grad_fn(params, batch, rng)
            return loss, metrics, grads

        # Microbatch i takes rows i, i + A, ...: every microbatch stays spread over all batch shards.
        micro = jax.tree.map(lambda x: jnp.swapaxes(x.reshape((x.shape[0] // accum, accum) + x.shape[1:]), 0, 1),
                             batch)
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        out_shape = jax.eval_shape(loss_of, params, jax.tree.map(lambda x: x[0], micro), rng)
        init = (zeros, jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), out_shape))

        def body(carry, xs):
            i, mb = xs
            (l, m), g = grad_fn(params, mb, jax.random.fold_in(rng, i))
            g_acc, (l_acc, m_acc) = carry
            g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
            return (g_acc, (l_acc + l, jax.tree.map(jnp.add, m_acc, m))), None

        (grads, (loss, metrics)), _ = jax.lax.scan(body, init, (jnp.arange(accum), micro))
        grads = jax.tree.map(lambda g, p: (g / accum).astype(p.dtype), grads, params)
        return loss / accum, jax.tree.map(lambda m: m / accum, metrics), grads

    def _train_step(self, state, batch):
        step = state["step"]
        rng = jax.random.fold_in(state["rng"], step)
        loss, metrics, grads = self._loss_and_grads(state["params"], batch, rng, step)
        grad_norm = opt_lib.global_norm(grads, self.trainable)
        updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new = {"params": params, "opt_state": opt_state}
        if self.ema_decay > 0:
            new["ema_params"] = opt_lib.ema_update(state["ema_params"], params, self.ema_decay)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & (state["bad_step"] < 0)
        # A non-finite step leaves the state as it was, so nothing non-finite can ever be saved.
        new = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, {k: state[k] for k in new})
        new.update(step=jnp.where(ok, step + 1, step), rng=state["rng"],
                   bad_step=jnp.where(state["bad_step"] >= 0, state["bad_step"], jnp.where(ok, -1, step + 1)))
        out = {"train/loss": loss, "train/grad_norm": grad_norm, "train/lr": self.schedule(step)}
        out.update({f"train/{k}": v for k, v in metrics.items()})
        return new, out

    # -- loop -------------------------------------------------------------------------------------------

    def initial_state(self, ckpt, data_iter):
        """Resume from the latest complete checkpoint, else init (optionally with another run's params)."""
        it = data_iter if self.config.checkpoint.restore_data else None
        restored = resume_lib.restore_latest(ckpt, self.abstract_state, it, self.config, self.workdir)
        if restored is not None:
            state, latest = restored
            log.info("resumed from step %d (%s)", latest, ckpt_lib.checkpoint_dir(self.workdir) / str(latest))
            return state, int(latest)
        if any(p.name.split(".")[0].isdigit() and ".damaged" in p.name
               for p in ckpt_lib.checkpoint_dir(self.workdir).iterdir()):
            log.warning("no checkpoint under %s restores; starting from step 0 (damaged steps kept as *.damaged)",
                        ckpt_lib.checkpoint_dir(self.workdir))
        state = self.init_state(self.rng)
        init_from = self.config.checkpoint.init_from
        if init_from:
            params, src_step = ckpt_lib.restore_params_from(init_from, self.abstract_state["params"],
                                                            self.config.checkpoint.init_from_step)
            state["params"] = params
            if "ema_params" in state:
                state["ema_params"] = jax.tree.map(jnp.copy, params)
            log.info("initialised params from %s step %d", init_from, src_step)
        # Another run's or a published checkpoint's params into subtrees (e.g. Gemma-2 into `llm`).
        init_weights.init_subtrees(state, self.abstract_state, self.config)
        return state, 0

    def run(self) -> dict:
        cfg = self.config
        with self.context():
            try:
                return self._run(cfg)
            except Exception:
                watchdog.explain_failure()  # a dead peer is the likely cause: exits naming it if so
                raise

    def _run(self, cfg) -> dict:
        ckpt = ckpt_lib.Checkpointer(self.workdir, cfg.checkpoint, cfg.debug)
        data_iter = iter(self.task.make_input(cfg, self.shard_index, self.shard_count))
        state, step = self.initial_state(ckpt, data_iter)
        writer = self.writer = metrics_lib.Writer(self.workdir, self.total_steps)
        hooks = metrics_lib.Hooks()
        hooks.add_eval(self.task.eval_fn)
        for h in self.task.sample_hooks():
            hooks.add_sample(h)
        preempt = Preemption()
        fp_file = self._fingerprint_file()
        config_dict = cfg.to_dict()
        last_saved = step if ckpt.latest_step() == step else None
        dbg = cfg.debug
        log_every = int(cfg.train.log_every)
        t_start, start_step = time.perf_counter(), step
        step_fn = None
        try:
            while step < self.total_steps:
                if preempt.reached(step):
                    if last_saved == step or step == 0:
                        log.warning("preemption signal before step %d: nothing needed saving (%s); exiting",
                                    step + 1, "no step trained yet" if step == 0 else f"step {step} is saved")
                    else:
                        log.warning("preemption signal: saving step %d and exiting", step)
                        self._save(ckpt, step, state, data_iter, config_dict, force=True)
                    ckpt.close()
                    writer.summary({"final_step": step, "preempted": True})
                    writer.close()
                    return {"preempted": True, "step": step}
                local = next(data_iter)
                if fp_file is not None:
                    fp_file.write(f"{step + 1} {fingerprint(local)}\n")
                    fp_file.flush()
                batch = sharding.make_global_batch(local, self.batch_shardings, self.global_batch)
                if step_fn is None:
                    step_fn = self.train_step.lower(state, batch).compile()
                    sync_processes("unifluid_train_step_compiled")
                state, out = step_fn(state, batch)
                step += 1
                if dbg.step_sleep_secs:
                    time.sleep(float(dbg.step_sleep_secs))
                if step == int(dbg.kill_at_step):
                    os.kill(os.getpid(), signal.SIGKILL)
                if step % log_every == 0 or step == self.total_steps:
                    out = jax.device_get(out)
                    self._stop_if_bad(state, ckpt)
                    tokens = self.task.tokens_per_batch(local) * self.shard_count
                    out.update(writer.progress(step, out, self.global_batch, tokens))
                    if hasattr(data_iter, "metrics"):  # e.g. skipped bad records (this host's counts)
                        out.update(data_iter.metrics())
                    out.update(self.task.host_metrics())
                    writer.scalars(step, out)
                if ckpt.should_save(step) and step != self.total_steps:
                    self._save(ckpt, step, state, data_iter, config_dict)
                    last_saved = step
                if cfg.train.eval_every and step % cfg.train.eval_every == 0:
                    hooks.run("eval", ckpt_lib.serving_params(state), step, writer)
                if cfg.train.sample_every and step % cfg.train.sample_every == 0:
                    hooks.run("sample", ckpt_lib.serving_params(state), step, writer)
            if last_saved != step:
                self._save(ckpt, step, state, data_iter, config_dict, force=True)
            ckpt.close()
        finally:
            preempt.restore()
            if hasattr(data_iter, "close"):
                data_iter.close()
            if fp_file is not None:
                fp_file.close()
        elapsed = time.perf_counter() - t_start
        summary = writer.summary({"final_step": step, "seconds": elapsed,
                                  "steps_per_sec": (step - start_step) / max(elapsed, 1e-9)})
        writer.close()
        return summary

    def _save(self, ckpt, step, state, data_iter, config_dict, force=False):
        self._stop_if_bad(state, ckpt)
        ckpt.save(step, state, data_iter, config_dict, force=force)

    def _stop_if_bad(self, state, ckpt):
        bad = int(jax.device_get(state["bad_step"]))
        if bad < 0:
            return
        ckpt.wait()
        good = ckpt.latest_step()
        where = ("no checkpoint was saved" if good is None else
                 f"the last good checkpoint is step {good} ({ckpt_lib.checkpoint_dir(self.workdir) / str(good)})")
        raise NonFiniteError(f"non-finite loss or gradient norm at step {bad}; training stopped and the state "
                             f"was not updated or saved; {where}")

    def _fingerprint_file(self):
        if not self.config.debug.log_batch_fingerprints:
            return None
        fs.makedirs(self.workdir)
        return fs.open(os.path.join(self.workdir, f"batch_fingerprints.p{jax.process_index()}.txt"), "a")


def fingerprint(batch) -> str:
    """sha256 over the fields of a (local) numpy batch, in key order."""
    h = hashlib.sha256()
    for k in sorted(batch):
        v = np.ascontiguousarray(batch[k])
        h.update(k.encode())
        h.update(str(v.dtype).encode() + str(v.shape).encode())
        h.update(v.tobytes())
    return h.hexdigest()[:16]


def train(config, workdir: str) -> dict:
    """`--mode=train`: build the trainer and run it (distributed init happens in main before this)."""
    log.info("building the %r trainer in %s", config.task, workdir)
    return Trainer(config, workdir).run()
