"""launch/local_multiprocess.sh: SIGTERM reaches every process, the launcher waits for all of them (they save
on SIGTERM) and exits with the worst status. The processes are stand-ins for python (a shell script) so the
launcher's own behaviour is tested in a second; the real preemption path is tests/train/test_preemption.py."""
import os
import signal
import subprocess
import time

import pytest

from tests.train import runner

FAKE_PYTHON = r"""#!/usr/bin/env bash
if [[ "$1" == "-c" ]]; then exec python3 "$@"; fi   # the launcher's free-port probe
trap 'sleep 1; echo saved >> "$OUT/p$JAX_PROCESS_ID"; exit "${TERM_EXIT:-0}"' TERM   # a 1 s "save"
code_var="EXIT_$JAX_PROCESS_ID"
if [[ -n "${!code_var:-}" ]]; then sleep "${SLEEP:-0}"; exit "${!code_var}"; fi
echo started > "$OUT/p$JAX_PROCESS_ID.started"
for i in $(seq 600); do sleep 0.1; done
"""


def _launch(tmp_path, **env):
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    full = {**os.environ, "PYTHON": str(fake), "OUT": str(tmp_path), **{k: str(v) for k, v in env.items()}}
    return subprocess.Popen(["bash", str(runner.ROOT / "launch" / "local_multiprocess.sh"), "2", "1", "--",
                             f"--workdir={tmp_path / 'w'}"], env=full, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def test_sigterm_is_forwarded_and_every_process_is_waited_for(tmp_path):
    p = _launch(tmp_path)
    t0 = time.time()
    while not all((tmp_path / f"p{i}.started").exists() for i in range(2)):
        assert p.poll() is None and time.time() - t0 < 60, p.stderr.read() if p.poll() is not None else ""
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=60) == 0
    # Both processes finished their 1 s "save" before the launcher returned.
    assert [(tmp_path / f"p{i}").read_text() for i in range(2)] == ["saved\n", "saved\n"]


@pytest.mark.parametrize("codes,sleep,want", [((0, 3), 0, 3), ((5, 0), 0.5, 5), ((2, 7), 0, 7), ((0, 0), 0, 0)])
def test_exit_status_is_the_worst_process_status(tmp_path, codes, sleep, want):
    p = _launch(tmp_path, EXIT_0=codes[0], EXIT_1=codes[1], SLEEP=sleep)
    assert p.wait(timeout=60) == want
