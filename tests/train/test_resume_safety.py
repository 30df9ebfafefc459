"""Resume safety (issue 16 items 1-2): a changed config is refused before anything compiles unless allowed by
name; a damaged newest checkpoint (real files of a trainer-written orbax checkpoint deleted or truncated) is
moved aside and the run resumes from the newest good step."""
import glob
import logging
import os
import re
import shutil

import numpy as np
import pytest

from unifluid_jax.config import ConfigError
from unifluid_jax.train import checkpoint as ckpt_lib
from unifluid_jax.train import trainer as trainer_lib
from tests.train import runner


def _cfg(**train):
    c = runner.load_config("configs/lm_tiny.py", "steps=10")
    c.checkpoint.every_steps = 5
    c.checkpoint.async_save = False
    c.train.log_every = 5
    c.train.eval_every = 0
    for k, v in train.items():
        c.train[k] = v
    return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run of 10 steps with checkpoints 5 and 10, written by the trainer."""
    d = tmp_path_factory.mktemp("run") / "w"
    trainer_lib.Trainer(_cfg(), str(d)).run()
    assert sorted(os.listdir(d / "checkpoints")) == ["10", "5"]
    return d


def _copy(trained, tmp_path):
    d = tmp_path / "w"
    shutil.copytree(trained, d)
    return d


def _resume(cfg, workdir):
    """The trainer's own resume path (checkpointer + data iterator + initial_state); no train step compiled."""
    t = trainer_lib.Trainer(cfg, str(workdir))
    with t.context():
        ck = ckpt_lib.Checkpointer(str(workdir), cfg.checkpoint, cfg.debug)
        it = iter(t.task.make_input(cfg, t.shard_index, t.shard_count))
        try:
            state, step = t.initial_state(ck, it)
        finally:
            ck.close()
    return state, step, it


# ---- item 1: changed config -----------------------------------------------------------------------------

def test_unchanged_and_free_changes_resume(trained, tmp_path):
    cfg = _cfg(num_steps=20, log_every=1)
    cfg.checkpoint.every_steps = 7
    _, step, _ = _resume(cfg, _copy(trained, tmp_path))
    assert step == 10


def test_changed_model_and_optimizer_listed_in_one_error(trained, tmp_path):
    cfg = _cfg()
    cfg.gemma.sliding_window = 4
    cfg.optimizer.lr = 1e-3
    cfg.data.seed = 3
    with pytest.raises(ConfigError) as e:
        _resume(cfg, _copy(trained, tmp_path))
    msg = str(e.value)
    for line in ("gemma.sliding_window: 8 -> 4", "optimizer.lr: 0.003 -> 0.001", "data.seed: 0 -> 3"):
        assert line in msg, msg
    assert "checkpoint.allow_changed" in msg and "step 10" in msg


def test_allowed_change_resumes_and_is_logged(trained, tmp_path, caplog):
    cfg = _cfg()
    cfg.optimizer.lr = 1e-3
    cfg.checkpoint.allow_changed = ("optimizer.lr",)
    with caplog.at_level(logging.WARNING):
        _, step, _ = _resume(cfg, _copy(trained, tmp_path))
    assert step == 10
    assert "optimizer.lr: 0.003 -> 0.001" in caplog.text
    cfg.gemma.sliding_window = 4  # allowing one key does not allow another
    with pytest.raises(ConfigError, match=r"gemma\.sliding_window: 8 -> 4"):
        _resume(cfg, _copy(trained, tmp_path / "b"))


def test_batch_size_change_is_refused_even_if_allowed(trained, tmp_path):
    cfg = _cfg(batch_size=32)
    cfg.checkpoint.allow_changed = ("train",)
    with pytest.raises(ConfigError, match=r"train\.batch_size: 16 -> 32.*skipped or repeated"):
        _resume(cfg, _copy(trained, tmp_path))


def test_allowed_width_change_names_the_arrays_not_orbax(trained, tmp_path):
    cfg = _cfg()
    cfg.gemma.width = 48
    cfg.checkpoint.allow_changed = ("gemma",)
    with pytest.raises(ConfigError, match=r"does not fit .*params/embedder/input_embedding: "
                                          r"\(32, 32\) float32 -> \(32, 48\) float32"):
        _resume(cfg, _copy(trained, tmp_path))
    assert sorted(os.listdir(tmp_path / "w" / "checkpoints")) == ["10", "5"]  # nothing moved aside


@pytest.mark.slow
def test_changed_config_exits_2_before_compiling(trained, tmp_path):
    d = _copy(trained, tmp_path)
    r = runner.run_main("configs/lm_tiny.py:steps=10", d, "--config.checkpoint.every_steps=5",
                        "--config.gemma.sliding_window=4", devices=8, timeout=400)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert "gemma.sliding_window: 8 -> 4" in r.stderr
    r = runner.run_main("configs/lm_tiny.py:steps=11", d, "--config.checkpoint.every_steps=5",
                        "--config.optimizer.lr=0.001", "--config.checkpoint.allow_changed=('optimizer.lr',)",
                        devices=8, timeout=400)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from step 10" in r.stderr


# ---- item 2: damaged newest checkpoint -------------------------------------------------------------------

def _array_files(step_dir):
    """The OCDBT data files holding the arrays (the merged root's d/ and each process's d/)."""
    return glob.glob(str(step_dir / "state" / "d" / "*")) + glob.glob(str(step_dir / "state" / "ocdbt.*" / "d" / "*"))


def _truncate_all(step_dir):  # a torn write: every array data file cut to half its length
    for f in _array_files(step_dir):
        os.truncate(f, os.path.getsize(f) // 2)


DAMAGE = {
    "array file deleted": lambda s: os.remove(max(_array_files(s), key=os.path.getsize)),
    "array files truncated": _truncate_all,
    "_METADATA deleted": lambda s: os.remove(s / "state" / "_METADATA"),
    "manifest deleted": lambda s: os.remove(s / "state" / "manifest.ocdbt"),
    "data-iterator file deleted": lambda s: os.remove(s / "data" / "process_0-of-1.json"),
    "config deleted": lambda s: os.remove(s / "config" / "metadata"),
}


@pytest.mark.parametrize("damage", list(DAMAGE), ids=list(DAMAGE))
def test_damaged_newest_falls_back_to_previous(trained, tmp_path, damage, caplog):
    d = _copy(trained, tmp_path)
    DAMAGE[damage](d / "checkpoints" / "10")
    with caplog.at_level(logging.WARNING):
        state, step, _ = _resume(_cfg(), d)
    assert step == 5 and int(state["step"]) == 5
    warnings = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert len(warnings) == 1 and "checkpoint step 10 is damaged" in warnings[0], warnings
    assert sorted(os.listdir(d / "checkpoints")) == ["10.damaged", "5"]  # kept, not deleted
    good = ckpt_lib.load_numpy(trained, 5)
    np.testing.assert_array_equal(np.asarray(state["params"]["final_norm"]["scale"]),
                                  good["params"]["final_norm"]["scale"])


def test_every_step_damaged_starts_over_and_keeps_them(trained, tmp_path, caplog):
    d = _copy(trained, tmp_path)
    for s in ("5", "10"):
        os.remove(d / "checkpoints" / s / "state" / "_METADATA")
    with caplog.at_level(logging.WARNING):
        _, step, _ = _resume(_cfg(), d)
    assert step == 0
    assert sorted(os.listdir(d / "checkpoints")) == ["10.damaged", "5.damaged"]
    assert "starting from step 0" in caplog.text


@pytest.mark.slow
def test_damaged_newest_resumes_exactly_end_to_end(tmp_path):
    """The CLI: the truncated step 10 is moved aside, the run resumes from 5 and redoes 6-10 on the same data."""
    args = ("--config.checkpoint.every_steps=5", "--config.train.log_every=5",
            "--config.debug.log_batch_fingerprints=True")
    straight = tmp_path / "straight"
    assert runner.run_main("configs/lm_tiny.py:steps=12", straight, *args, devices=8, timeout=900).returncode == 0
    d = tmp_path / "damaged"
    assert runner.run_main("configs/lm_tiny.py:steps=10", d, *args, devices=8, timeout=900).returncode == 0
    DAMAGE["array files truncated"](d / "checkpoints" / "10")
    r = runner.run_main("configs/lm_tiny.py:steps=12", d, *args, devices=8, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("checkpoint step 10 is damaged") == 1 and "resumed from step 5" in r.stderr
    # Known leftover (reported): orbax/tensorstore print asyncio "Event loop is closed" tracebacks from their
    # own threads after reading the damaged metadata; no other traceback may appear.
    # Their threads interleave those tracebacks line by line, so count instead of parsing: the only exception
    # named is RuntimeError, and each mention of it belongs to an "Event loop is closed".
    others = "\n".join(line for line in r.stderr.splitlines() if "is damaged" not in line)  # our one warning
    names = set(re.findall(r"\b(\w*(?:Error|Exception))\b", others)) - {"RuntimeError", "Exception"}
    assert not names, (names, r.stderr[-3000:])
    assert r.stderr.count("RuntimeError") <= r.stderr.count("Event loop is closed"), r.stderr[-3000:]
    assert runner.fingerprints(d) == runner.fingerprints(straight)  # also asserts redone steps match
    a, b = ckpt_lib.load_numpy(straight, 12), ckpt_lib.load_numpy(d, 12)
    np.testing.assert_array_equal(a["params"]["final_norm"]["scale"], b["params"]["final_norm"]["scale"])
    assert (d / "checkpoints" / "10.damaged").is_dir()
