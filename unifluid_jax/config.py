"""Config validation: turns nonsense into one clear error before anything compiles or writes.

Each component owns the checks for its own section (`validate_config(section, path)` next to the module);
`validate` here walks the whole config and reports the first problem with its dotted path and a fix.
"""
from __future__ import annotations

from unifluid_jax.checks import ConfigError, check, check_choice, check_positive, from_presets  # noqa: F401 (re-exported)


# ---------------------------------------------------------------------------------------------------------
# Whole-config validation (run by main.py before anything compiles).

# Config sections owned by a model module: validated by `<module>.validate_config(section, path)` when both
# the section and the module exist (a module still being written is skipped).
MODEL_SECTIONS = {
    "gemma": "unifluid_jax.models.gemma",
    "siglip": "unifluid_jax.models.siglip",
    "vae": "unifluid_jax.models.vae",
    "diffusion": "unifluid_jax.models.diffusion",
}
REQUIRED_SECTIONS = ("task", "seed", "train", "optimizer", "mesh", "sharding", "checkpoint", "distributed",
                     "debug")


def validate_mesh(config, num_devices: int | None) -> None:
    from unifluid_jax.train import sharding
    unknown = sorted(set(config.mesh) - set(sharding.MESH_AXES))
    check(not unknown, f"mesh.{unknown[0] if unknown else ''}", f"unknown mesh axis; use {list(sharding.MESH_AXES)}")
    if num_devices is None:
        import jax
        num_devices = jax.device_count()
    try:
        shape = sharding.resolve_mesh_shape(dict(config.mesh), num_devices)
    except ValueError as e:
        raise ConfigError(f"config.{e}") from None
    check(config.train.batch_size % config.optimizer.grad_accum_steps == 0, "optimizer.grad_accum_steps",
          f"{config.optimizer.grad_accum_steps} must divide train.batch_size ({config.train.batch_size})")
    batch_shards = shape["data"] * shape["fsdp"]
    check(config.train.batch_size % batch_shards == 0, "train.batch_size",
          f"{config.train.batch_size} must be divisible by mesh data*fsdp = {batch_shards}")
    check_choice(config.sharding.check_large_params, "sharding.check_large_params", ("off", "warn", "raise"))
    check_positive(config.sharding, "sharding", "large_param_size")
    if config.sharding.rules is not None:
        try:
            sharding.rules_from_config(config.sharding.rules)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config.sharding.rules: expected [(logical_name, mesh_axes), ...]: {e}") from None


def validate(config, num_devices: int | None = None) -> None:
    """Raises one ConfigError (dotted path, value, fix) for the first problem found; returns None if valid."""
    import importlib

    from unifluid_jax.train import checkpoint, optimizer, task, trainer
    missing = [s for s in REQUIRED_SECTIONS if s not in config]
    check(not missing, missing[0] if missing else "", "missing section; start from unifluid_jax.config.defaults() (see configs/*.py)")
    task_cls = task.resolve(config.task)
    trainer.validate_config(config.train, "train")
    optimizer.validate_config(config.optimizer, "optimizer")
    checkpoint.validate_config(config.checkpoint, "checkpoint")
    trainer.validate_distributed(config.distributed, "distributed")
    for name, module in MODEL_SECTIONS.items():
        if name in config and config[name] is not None:
            try:
                mod = importlib.import_module(module)
            except ImportError:
                continue
            if hasattr(mod, "validate_config"):
                mod.validate_config(config[name], name)
    task_cls.validate_config(config)
    validate_mesh(config, num_devices)


def validate_inputs(config) -> None:
    """The files a training run reads exist (data shards, tokenizer), checked by main.py before anything is
    written: a wrong path must not leave a half-made workdir behind. Not part of `validate`, which also checks
    configs compiled for other machines (tools/aot.py) whose data is not on this one."""
    data = config.get("data")
    if data is None or "sources" not in data:
        return
    from unifluid_jax import fs
    from unifluid_jax.data import records
    for i, s in enumerate(data.sources):
        if s.get("kind", "array_record") == "array_record" and s.get("path"):
            try:
                records.resolve_paths(s["path"])
            except FileNotFoundError:
                where = s["path"]
                why = ("the directory holds no *.array_record shards" if fs.isdir(where) else "no such file, "
                       "directory or shard prefix")
                raise ConfigError(f"config.data.sources[{i}].path: {where!r}: {why}; point it at a dataset built "
                                  "by tools/build_shapes.py or tools/ingest.py (dir, glob or shard prefix)") from None
    tok = data.get("tokenizer")
    check(not tok or fs.exists(tok), "data.tokenizer",
          f"no such file {tok!r}; give the SentencePiece model (e.g. <dataset>/tokenizer.model)")


def defaults():
    """Shared defaults of every experiment config (configs/*.py start from this and set task sections)."""
    import ml_collections
    c = ml_collections.ConfigDict()
    c.task = ""
    c.seed = 0
    # compilation_cache_dir: persistent XLA cache (e.g. under the workdir) so restarts skip compiling.
    c.train = dict(num_steps=1000, batch_size=8, log_every=50, eval_every=0, sample_every=0,
                   compilation_cache_dir="")
    # SPEC 8 / MAR recipe: AdamW (0.9, 0.95), lr 1e-4, linear warmup then constant, clip 3.0, wd 0.02,
    # no decay on biases, norms and 1-D params (plus `no_decay_regexes`, e.g. the diffusion head).
    c.optimizer = dict(lr=1e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.02, grad_clip=3.0,
                       schedule="constant", warmup_steps=0, end_lr_ratio=0.0, decay_frac=0.2, ema_decay=0.0,
                       grad_accum_steps=1, no_decay_regexes=(), frozen_regexes=())
    c.mesh = dict(data=1, fsdp=-1, tensor=1)
    c.sharding = dict(rules=ml_collections.FieldReference(None, field_type=list),
                      check_large_params="warn", large_param_size=1 << 20)
    # allow_changed: config keys (dotted, or a section prefix) that may differ from the checkpoint's when
    # resuming, e.g. ('optimizer.lr',); any other change is refused (train/resume.py).
    c.checkpoint = dict(every_steps=1000, max_to_keep=3, keep_every=0, async_save=True, restore_data=True,
                        allow_changed=(),
                        init_from="", init_from_step=ml_collections.FieldReference(None, field_type=int))
    # heartbeat_timeout_s: a process silent this long is lost; the others stop with one message naming it
    # (train/watchdog.py; 0 = off, jax's own detection then aborts after 100 s).
    c.distributed = dict(mode="auto", coordinator_address="", num_processes=-1, process_id=-1,
                         local_device_ids=(), heartbeat_timeout_s=60.0)
    # Test/debug switches; all off by default.
    c.debug = dict(nan_at_step=-1, kill_at_step=-1, kill_in_save_at_step=-1, step_sleep_secs=0.0,
                   log_batch_fingerprints=False)
    return c
