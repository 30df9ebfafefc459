"""Two processes (4 CPU devices each) joined by jax.distributed on 127.0.0.1 == one process with 8 devices."""
import json
import re
import socket

import pytest

from tests.train import runner

MESH = ("--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2", "--config.train.log_every=1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(workdir, steps: int, tmp_path, tag: str):
    port = _free_port()
    procs, logs = [], []
    for pid in range(2):
        log = open(tmp_path / f"{tag}.p{pid}.log", "w+")
        logs.append(log)
        procs.append(runner.start_main(
            f"configs/lm_tiny.py:steps={steps}", workdir, *MESH, devices=4, log=log,
            JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=2, JAX_PROCESS_ID=pid))
    rcs = [p.wait(timeout=150) for p in procs]
    texts = []
    for log in logs:
        log.seek(0)
        texts.append(log.read())
        log.close()
    assert rcs == [0, 0], texts[0][-3000:] + texts[1][-3000:]
    return texts


def _curve(workdir):
    return dict((int(s), v) for s, v in json.loads((workdir / "metrics_summary.json").read_text())["loss_curve"])


@pytest.mark.slow
def test_two_processes_match_one_process_and_resume(tmp_path):
    one = runner.start_main("configs/lm_tiny.py:steps=6", tmp_path / "one", *MESH, devices=8)
    two = tmp_path / "two"
    _two_processes(two, 5, tmp_path, "first")
    first = _curve(two)
    assert one.wait(timeout=150) == 0
    data = sorted(p.name for p in (two / "checkpoints" / "5" / "data").iterdir())
    assert "process_0-of-2.json" in data and "process_1-of-2.json" in data
    texts = _two_processes(two, 6, tmp_path, "resume")  # both processes restore step 5, then train step 6
    for t in texts:
        assert re.search(r"resumed from step 5\b", t), t[-2000:]
    c1, resumed = _curve(tmp_path / "one"), _curve(two)
    assert sorted(first) == [1, 2, 3, 4, 5] and sorted(resumed) == [6] and sorted(c1) == [1, 2, 3, 4, 5, 6]
    for s, v in {**first, **resumed}.items():
        assert abs(v - c1[s]) <= 1e-5 * abs(c1[s]), (s, v, c1[s])
