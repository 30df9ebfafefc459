"""Two processes (4 CPU devices each) joined by jax.distributed on 127.0.0.1 == one process with 8 devices."""
import json
import re
import socket
import subprocess
import time

import pytest

from unifluid_jax.train import trainer as trainer_lib
from unifluid_jax.train import watchdog
from tests.train import runner
from tests.train.test_resume import _wait_for_lines

MESH = ("--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2", "--config.train.log_every=1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_two(workdir, steps: int, tmp_path, tag: str, port: int):
    procs = []
    for pid in range(2):
        log = open(tmp_path / f"{tag}.p{pid}.log", "w+")
        procs.append((log, runner.start_main(
            f"configs/lm_tiny.py:steps={steps}", workdir, *MESH, devices=4, log=log,
            JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=2, JAX_PROCESS_ID=pid)))
    return procs


def _wait_two(procs):
    rcs, texts = [], []
    for log, p in procs:
        try:
            rcs.append(p.wait(timeout=400))
        except subprocess.TimeoutExpired:
            for _, q in procs:
                q.kill()
            raise
        log.seek(0)
        texts.append(log.read())
        log.close()
    assert rcs == [0, 0], texts[0][-3000:] + texts[1][-3000:]
    return texts


def _curve(workdir):
    return dict((int(s), v) for s, v in json.loads((workdir / "metrics_summary.json").read_text())["loss_curve"])


@pytest.mark.slow
def test_two_processes_match_one_process_and_resume(tmp_path):
    two = tmp_path / "two"
    port = _free_port()
    # Reference while the two processes start: one process with the same 8-device mesh (this pytest process).
    cfg = runner.load_config("configs/lm_tiny.py", "steps=6")
    cfg.mesh = dict(data=2, fsdp=2, tensor=2)
    cfg.train.log_every = 1
    procs = _start_two(two, 5, tmp_path, "first", port)
    ref = trainer_lib.Trainer(cfg, str(tmp_path / "one"))
    ref.run()
    c1 = dict(ref.writer.history("train/loss"))
    _wait_two(procs)
    first = _curve(two)
    data = sorted(p.name for p in (two / "checkpoints" / "5" / "data").iterdir())
    assert "process_0-of-2.json" in data and "process_1-of-2.json" in data
    texts = _wait_two(_start_two(two, 6, tmp_path, "resume", _free_port()))  # both restore step 5, train 6
    for t in texts:
        assert re.search(r"resumed from step 5\b", t), t[-2000:]
    resumed = _curve(two)
    assert sorted(first) == [1, 2, 3, 4, 5] and sorted(resumed) == [6] and sorted(c1) == [1, 2, 3, 4, 5, 6]
    for s, v in {**first, **resumed}.items():
        assert abs(v - c1[s]) <= 1e-5 * abs(c1[s]), (s, v, c1[s])


@pytest.mark.slow
def test_lost_process_stops_the_others_with_one_message(tmp_path):
    """kill -9 of process 1 mid-run: process 0 stops within the heartbeat timeout and names process 1."""
    port, timeout_s = _free_port(), 30
    procs = []
    for pid in range(2):
        log = open(tmp_path / f"lost.p{pid}.log", "w+")
        procs.append((log, runner.start_main(
            "configs/lm_tiny.py:steps=1000", tmp_path / "w", *MESH,
            f"--config.distributed.heartbeat_timeout_s={timeout_s}", "--config.debug.step_sleep_secs=0.2",
            "--config.debug.log_batch_fingerprints=True", devices=4, log=log,
            JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=2, JAX_PROCESS_ID=pid)))
    (log0, p0), (_, p1) = procs
    try:
        _wait_for_lines(tmp_path / "w" / "batch_fingerprints.p1.txt", 3, p1)
        p1.kill()
        t_kill = time.monotonic()
        rc = p0.wait(timeout=120)
        stopped_after = time.monotonic() - t_kill
    finally:
        for _, p in procs:
            if p.poll() is None:
                p.kill()
    log0.seek(0)
    out = log0.read()
    assert rc == watchdog.EXIT_LOST_PEER, out[:6000] + "\n...\n" + out[-3000:]
    assert out.count("LostProcessError: process 1 of 2 sent no heartbeat") == 1, out[-3000:]
    assert "Traceback" not in out and "Check failed" not in out, out[-3000:]
    assert stopped_after < 2 * timeout_s, stopped_after  # the timeout, one beat interval, a loaded machine
