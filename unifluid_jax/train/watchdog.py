"""Multi-process liveness: when one process dies or hangs, the others stop within `heartbeat_timeout_s` with
one message naming it, instead of waiting in a collective until the coordination service aborts them.

Every process beats a counter into the coordination service's key-value store (`unifluid_hb/<id>`) from a
daemon thread and watches the others' counters; a counter that stops moving for the timeout (measured on the
watcher's own clock) means that process is gone. A process that ends normally writes `done` first. The
watcher exits the process with EXIT_LOST_PEER via os._exit: the main thread may be blocked inside a
collective that will never complete. When the collective fails first instead (gloo: "connection reset by peer"),
the trainer hands the exception to `explain_failure`, which waits for the verdict before letting it propagate:
otherwise the exit path would hang in jax's shutdown barrier and abort with a C++ stack. Checkpoints already
written stay valid (a half-written one is ignored).
"""
from __future__ import annotations

import atexit
import os
import sys
import threading
import time

EXIT_LOST_PEER = 4
_PREFIX = "unifluid_hb/"
_active: "Watchdog | None" = None


class Watchdog:
    def __init__(self, client, process_id: int, num_processes: int, timeout_s: float):
        self.client, self.me, self.n, self.timeout = client, process_id, num_processes, float(timeout_s)
        self.interval = max(min(self.timeout / 5.0, 5.0), 0.05)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="unifluid-heartbeat", daemon=True)

    def start(self):
        self._beat(0)
        self._thread.start()
        atexit.register(self.done)
        return self

    def done(self):
        """A normal exit: peers must not count this process as lost."""
        if self._stop.is_set():
            return
        self._stop.set()
        try:
            self.client.key_value_set(f"{_PREFIX}{self.me}", "done", allow_overwrite=True)
        except Exception:  # noqa: BLE001 (the service may already be gone at exit)
            pass

    def wait_for_verdict(self):
        """Blocks until a lost peer would have been detected (then the watcher exits the process)."""
        deadline = time.monotonic() + self.timeout + 3 * self.interval
        while time.monotonic() < deadline and self._thread.is_alive() and not self._stop.is_set():
            time.sleep(self.interval)

    def _beat(self, count: int):
        self.client.key_value_set(f"{_PREFIX}{self.me}", str(count), allow_overwrite=True)

    def _loop(self):
        start = time.monotonic()
        seen = {i: (None, start) for i in range(self.n) if i != self.me}  # value, when it last changed
        count, failing_since = 0, None
        while not self._stop.wait(self.interval):
            now = time.monotonic()
            try:
                count += 1
                self._beat(count)
                values = {k.rsplit("/", 1)[-1]: v for k, v in self.client.key_value_dir_get(_PREFIX)}
                failing_since = None
            except Exception as e:  # noqa: BLE001 (the coordinator, process 0, is unreachable)
                failing_since = failing_since or now
                if now - failing_since > self.timeout and not self._stop.is_set():
                    self._lost(f"the coordinator (process 0) is unreachable for {now - failing_since:.0f} s "
                               f"({type(e).__name__})")
                continue
            for i, (old, when) in seen.items():
                v = values.get(str(i))
                if v == "done":
                    continue
                if v != old:
                    seen[i] = (v, now)
                elif now - when > self.timeout and not self._stop.is_set():
                    self._lost(f"process {i} of {self.n} sent no heartbeat for {now - when:.0f} s "
                               f"(distributed.heartbeat_timeout_s={self.timeout:g}): it died or hangs")

    def _lost(self, why: str):
        msg = (f"LostProcessError: {why}; stopping process {self.me} too (exit {EXIT_LOST_PEER}). Restart all "
               "processes to resume from the last checkpoint.")
        print(msg, file=sys.stderr, flush=True)  # not via logging: the one line must reach stderr as is
        os._exit(EXIT_LOST_PEER)


def start(section) -> Watchdog | None:
    """Starts the watchdog after jax.distributed.initialize (multi-process runs; timeout 0 disables it)."""
    import jax
    from jax._src import distributed
    timeout = float(section.get("heartbeat_timeout_s", 0) or 0)
    if jax.process_count() == 1 or timeout <= 0 or distributed.global_state.client is None:
        return None
    global _active
    _active = Watchdog(distributed.global_state.client, jax.process_index(), jax.process_count(), timeout).start()
    return _active


def explain_failure():
    """Called with the run's exception in flight: a failed collective usually means a peer died, so let the
    watchdog name it (exit EXIT_LOST_PEER) before the exception propagates. No-op in single-process runs."""
    if _active is not None:
        _active.wait_for_verdict()
