"""Entry point: `python -m unifluid_jax.main --config=configs/X.py[:ARG] --config.a.b=V --workdir=DIR --mode=train`.

Run the same command on every host of a multi-host job (see launch/). Order: join the hosts
(jax.distributed, when configured or detected), validate the whole config (one clear error, before any
compile), then dispatch on --mode. Adding a mode is one entry in MODES: 'name': 'module:function', the
function taking (config, workdir) and imported only when selected.
"""
from __future__ import annotations

import importlib
import logging
import os
import re
import sys

from absl import app, flags
from ml_collections import config_flags

from unifluid_jax import config as config_lib

MODES: dict[str, str] = {
    "train": "unifluid_jax.train.trainer:train",
    "sample": "unifluid_jax.inference.cli:sample",
    "caption": "unifluid_jax.inference.cli:caption",
    "vqa": "unifluid_jax.inference.cli:vqa",
    "edit": "unifluid_jax.inference.cli:edit",
    "eval": "unifluid_jax.inference.cli:evaluate",
    "fid_eval": "unifluid_jax.evals.coco:run",
    "export": "unifluid_jax.convert.unifluid:export_run",
}

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, tensorboard, summaries.")
_MODE = flags.DEFINE_string("mode", "train", "What to do; one of MODES.")


def resolve_mode(mode: str):
    if mode not in MODES:
        raise config_lib.ConfigError(f"--mode={mode!r} is unknown; choose one of {sorted(MODES)}")
    module, _, fn = MODES[mode].partition(":")
    return getattr(importlib.import_module(module), fn)


def run(config, workdir: str, mode: str = "train"):
    """Programmatic entry (tests, notebooks): distributed init, validation, dispatch."""
    from unifluid_jax.train import trainer
    fn = resolve_mode(mode)
    if not workdir:
        raise config_lib.ConfigError("--workdir is required (checkpoints and logs go there)")
    from unifluid_jax import fs
    problem = fs.writable_dir_error(workdir) if mode == "train" else (
        f"{workdir} is a file, not a directory" if fs.exists(workdir) and not fs.isdir(workdir) else None)
    if problem:
        raise config_lib.ConfigError(f"--workdir={workdir}: {problem}; give a directory this user can write "
                                     "(it is created if missing)")
    trainer.maybe_initialize_distributed(config.distributed)
    config_lib.validate(config)
    if mode == "train":
        config_lib.validate_inputs(config)
    cache = config.train.get("compilation_cache_dir", "")
    if cache:
        import jax
        jax.config.update("jax_compilation_cache_dir", cache)
    return fn(config, workdir)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax/grain chatter; our own loggers stay at INFO
    logging.getLogger("unifluid_jax").setLevel(logging.INFO)
    from unifluid_jax.train.trainer import NonFiniteError
    try:
        run(_CONFIG.value, _WORKDIR.value, _MODE.value)
    except config_lib.ConfigError as e:  # exit 2: bad config, nothing was compiled or written
        print(f"ConfigError: {e}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteError as e:  # exit 3: the run diverged; the message names the last good checkpoint
        print(f"NonFiniteError: {e}", file=sys.stderr)
        sys.exit(3)


def parse_flags(argv):
    """absl flag parsing, with a one-line message (exit 2) for overrides of keys the config does not have."""
    try:
        rest = flags.FLAGS(argv)
    except flags.IllegalFlagValueError as e:  # a value of the wrong type, e.g. --config.train.batch_size=1.5
        _usage_error(f"{e}; give a value of the type the config declares for that key")
    except flags.Error as e:  # e.g. a flag without its value
        _usage_error(str(e))
    except (AttributeError, KeyError) as e:  # ml_collections: unknown key in --config.a.b=V
        bad = [a for a in argv[1:] if a.startswith("--config.")]
        suggestion = re.search(r'Did you mean "[^"]+" instead of "[^"]+"\?', str(e))
        hint = suggestion.group(0) if suggestion else str(e)
        _usage_error(f"unknown config key in {' '.join(bad)} ({hint}). Overrides may only set keys that the "
                     "config file defines (see configs/*.py and unifluid_jax/config.py defaults())")
    try:
        _CONFIG.value.keys()  # config_flags reports a file that failed to load only when it is read
    except Exception as e:  # noqa: BLE001
        arg = ([a for a in argv if a.startswith("--config=")] or ["--config"])[-1]
        path = arg.partition("=")[2].split(":")[0]
        cause = e
        while cause.__cause__ is not None:
            cause = cause.__cause__
        why = "no such file" if path and not os.path.exists(path) else \
            f"{type(cause).__name__}: {str(cause).strip().splitlines()[-1] if str(cause).strip() else ''}"
        _usage_error(f"{arg}: the config file cannot be loaded ({why}); give a configs/*.py file (optionally "
                     "with :ARG)")
    return rest


def _usage_error(message: str):
    print(f"ConfigError: {message}", file=sys.stderr)
    sys.exit(2)


def _mode_in_argv(argv) -> str:
    """--mode before absl parses the flags (the SIGTERM handler must be installed before jax loads)."""
    mode = "train"
    for i, a in enumerate(argv):
        if a.startswith("--mode="):
            mode = a.split("=", 1)[1]
        elif a == "--mode" and i + 1 < len(argv):
            mode = argv[i + 1]
    return mode


if __name__ == "__main__":
    if _mode_in_argv(sys.argv) == "train":  # first thing: a SIGTERM while starting up ends with exit 0
        from unifluid_jax.train import signals
        signals.catch_sigterm()
    flags.mark_flags_as_required(["config"])
    app.run(main, flags_parser=parse_flags)
