"""SIGTERM (preemption) during training or start-up: the current step is checkpointed (or nothing needed
saving) and the process exits 0."""
import signal
import time
import subprocess

import pytest

from unifluid_jax.train import checkpoint as ckpt_lib
from tests.train import runner
from tests.train.test_resume import _wait_for_lines


@pytest.mark.slow
def test_sigterm_saves_current_step_and_exits_zero(tmp_path):
    log = open(tmp_path / "run.log", "w+")
    p = runner.start_main("configs/lm_tiny.py:steps=1000", tmp_path, "--config.checkpoint.every_steps=1000",
                          "--config.debug.log_batch_fingerprints=True", "--config.debug.step_sleep_secs=0.2",
                          log=log)
    fps = tmp_path / "batch_fingerprints.p0.txt"
    _wait_for_lines(fps, 4, p)
    p.send_signal(signal.SIGTERM)
    try:
        rc = p.wait(timeout=300)
    except subprocess.TimeoutExpired:
        p.kill()
        raise
    log.seek(0)
    out = log.read()
    assert rc == 0, out[-3000:]
    consumed = len(fps.read_text().splitlines())
    assert "preemption signal: saving step" in out
    state = ckpt_lib.load_numpy(tmp_path)
    assert int(state["step"]) == consumed >= 4
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [str(consumed)]


def _term_during_startup(workdir, tmp_path, *overrides):
    """SIGTERM once the trainer is being built (before compiling or the first step); returns (rc, log)."""
    log = open(tmp_path / "startup.log", "w+")
    p = runner.start_main("configs/lm_tiny.py:steps=10", workdir, "--config.checkpoint.every_steps=5",
                          "--config.debug.log_batch_fingerprints=True", *overrides, log=log)
    t0 = time.time()
    while "building the 'lm' trainer" not in (tmp_path / "startup.log").read_text():
        assert p.poll() is None and time.time() - t0 < 300, (tmp_path / "startup.log").read_text()[-3000:]
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)
    try:
        rc = p.wait(timeout=300)
    except subprocess.TimeoutExpired:
        p.kill()
        raise
    log.seek(0)
    return rc, log.read()


@pytest.mark.slow
def test_sigterm_during_startup_exits_zero(tmp_path):
    # A fresh run: nothing trained, nothing to save.
    rc, out = _term_during_startup(tmp_path / "w", tmp_path)
    assert rc == 0, out[-3000:]
    assert "preemption signal before step 1: nothing needed saving (no step trained yet)" in out
    assert (tmp_path / "w" / "batch_fingerprints.p0.txt").read_text() == ""  # no batch was consumed
    # A resumed run: its step is already saved; it exits 0 without training or writing another step.
    r = runner.run_main("configs/lm_tiny.py:steps=5", tmp_path / "r", "--config.checkpoint.every_steps=5")
    assert r.returncode == 0, r.stderr[-3000:]
    rc, out = _term_during_startup(tmp_path / "r", tmp_path)
    assert rc == 0, out[-3000:]
    assert "preemption signal before step 6: nothing needed saving (step 5 is saved)" in out
    assert sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir()) == ["5"]


def test_sigterm_flag_is_consumed_by_the_run_that_saw_it():
    import os

    from unifluid_jax.train import signals
    from unifluid_jax.train import trainer as trainer_lib
    p = trainer_lib.Preemption()
    assert not p.reached(0)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.1)  # the Python-level handler runs on the main thread's next bytecode
    assert p.reached(0)
    p.restore()  # the run ended: a later in-process run (tests, notebooks) starts unpreempted
    assert not signals.sigterm_seen() and signal.getsignal(signal.SIGTERM) is not signals._on_sigterm
