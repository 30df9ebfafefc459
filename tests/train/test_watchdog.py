"""The liveness watchdog's rule on a fake coordination store (the real two-process kill is in
test_multiprocess.py): a silent peer is named once; a peer that ended normally is not."""
import threading
import time

import pytest

from unifluid_jax.train import watchdog

# The fake os._exit ends the watchdog thread with SystemExit, which pytest reports as a thread exception.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")


class FakeStore:
    def __init__(self):
        self.kv, self.lock = {}, threading.Lock()

    def key_value_set(self, key, value, allow_overwrite=False):
        with self.lock:
            assert allow_overwrite or key not in self.kv
            self.kv[key] = value

    def key_value_dir_get(self, prefix):
        with self.lock:
            return [(k, v) for k, v in self.kv.items() if k.startswith(prefix)]


@pytest.fixture
def exits(monkeypatch):
    calls = []

    def fake_exit(code):
        calls.append(code)
        raise SystemExit(code)  # ends the watchdog thread like os._exit would end the process

    monkeypatch.setattr(watchdog.os, "_exit", fake_exit)
    return calls


def _peer(store, pid, stop):
    n = 0
    while not stop.is_set():
        n += 1
        store.key_value_set(f"unifluid_hb/{pid}", str(n), allow_overwrite=True)
        time.sleep(0.02)


def test_silent_peer_is_named_within_the_timeout(exits, capfd):
    store, stop = FakeStore(), threading.Event()
    peer = threading.Thread(target=_peer, args=(store, 1, stop))
    peer.start()
    w = watchdog.Watchdog(store, 0, 2, timeout_s=0.5)
    w.start()
    time.sleep(1.0)
    assert exits == []  # a beating peer is alive
    stop.set()
    t0 = time.monotonic()
    w._thread.join(timeout=5)
    assert exits == [watchdog.EXIT_LOST_PEER]
    took = time.monotonic() - t0
    assert 0.5 - 0.1 <= took < 0.5 + 2.0, took  # not before the timeout; soon after it (a loaded machine)
    err = capfd.readouterr().err
    assert err.count("LostProcessError: process 1 of 2 sent no heartbeat") == 1, err


def test_peer_that_finished_is_not_lost(exits):
    store = FakeStore()
    other = watchdog.Watchdog(store, 1, 2, timeout_s=0.3)
    other._beat(0)
    other.done()
    w = watchdog.Watchdog(store, 0, 2, timeout_s=0.3)
    w.start()
    time.sleep(1.0)
    w.done()
    assert exits == []
    assert store.kv["unifluid_hb/0"] == "done"


def test_failed_collective_waits_for_the_verdict(exits, monkeypatch):
    """The run's collective fails before the timeout (gloo: connection reset): explain_failure holds the
    exception until the watchdog has named the dead peer, instead of exiting through jax's shutdown barrier."""
    store = FakeStore()
    store.key_value_set("unifluid_hb/1", "7")  # the peer beat once, then died
    w = watchdog.Watchdog(store, 0, 2, timeout_s=0.4)
    monkeypatch.setattr(watchdog, "_active", w.start())
    t0 = time.monotonic()
    watchdog.explain_failure()
    assert exits == [watchdog.EXIT_LOST_PEER]
    assert time.monotonic() - t0 >= 0.4 - 0.1


def test_failure_with_live_peers_propagates_after_the_timeout(exits, monkeypatch):
    store, stop = FakeStore(), threading.Event()
    peer = threading.Thread(target=_peer, args=(store, 1, stop))
    peer.start()
    w = watchdog.Watchdog(store, 0, 2, timeout_s=0.3)
    monkeypatch.setattr(watchdog, "_active", w.start())
    try:
        watchdog.explain_failure()  # returns: nobody is lost, the caller re-raises its own exception
    finally:
        stop.set()
        w.done()
    assert exits == []


def test_explain_failure_is_a_no_op_without_a_watchdog(monkeypatch):
    monkeypatch.setattr(watchdog, "_active", None)
    t0 = time.monotonic()
    watchdog.explain_failure()
    assert time.monotonic() - t0 < 0.1
