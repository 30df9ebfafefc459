"""Exact resume: kill -9 mid-run and inside a checkpoint write; the resumed run is bitwise the straight run."""
import os
import signal
import time

import jax
import numpy as np
import pytest

from unifluid_jax.train import checkpoint as ckpt_lib
from tests.train import runner

STEPS = 24
ARGS = ("--config.checkpoint.every_steps=5", "--config.train.log_every=1",
        "--config.debug.log_batch_fingerprints=True")


def _wait_for_lines(path, n, proc, timeout=400):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    raise TimeoutError(path)


@pytest.mark.slow
def test_kill_and_resume_is_bitwise_identical(tmp_path):
    cfg = f"configs/lm_tiny.py:steps={STEPS}"
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    ref = runner.start_main(cfg, straight, *ARGS)

    # 1) kill -9 from outside at an arbitrary step (slowed down so the kill lands mid-run).
    log = open(tmp_path / "kill1.log", "w")
    p = runner.start_main(cfg, resumed, *ARGS, "--config.debug.step_sleep_secs=0.3", log=log)
    _wait_for_lines(resumed / "batch_fingerprints.p0.txt", 8, p)
    os.kill(p.pid, signal.SIGKILL)
    assert p.wait() == -signal.SIGKILL

    # 2) resume, then die inside the write of step 15 (the data item is written, the step is not final).
    r = runner.run_main(cfg, resumed, *ARGS, "--config.debug.kill_in_save_at_step=15")
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    ckpts = os.listdir(resumed / "checkpoints")
    assert any(n.startswith("15.orbax-checkpoint-tmp") for n in ckpts), ckpts
    assert "15" not in ckpts and "10" in ckpts

    # 3) resume from step 10 (the half-written 15 is ignored) and finish.
    r = runner.run_main(cfg, resumed, *ARGS)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from step 10" in r.stderr
    assert ref.wait(timeout=400) == 0

    fp_ref, fp = runner.fingerprints(straight), runner.fingerprints(resumed)  # asserts re-run steps match
    assert sorted(fp_ref) == list(range(1, STEPS + 1))
    assert fp == fp_ref
    a, b = ckpt_lib.load_numpy(straight, STEPS), ckpt_lib.load_numpy(resumed, STEPS)
    assert int(a["step"]) == int(b["step"]) == STEPS
    flat_a, flat_b = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (path, x), (_, y) in zip(flat_a, flat_b):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))
