"""SIGTERM (preemption) during training: the current step is checkpointed and the process exits 0."""
import signal
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
