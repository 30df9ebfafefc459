"""SIGTERM (preemption) remembered from the first moment of the process: a signal during start-up (imports,
distributed init, building, restoring, compiling) must not kill the run with -15; the training loop sees the
flag before its first step and exits 0. Imports nothing heavy so main.py can install it before jax loads."""
from __future__ import annotations

import signal
import threading

_seen = False


def _on_sigterm(signum, frame):
    del signum, frame
    global _seen
    _seen = True


def catch_sigterm():
    """Installs the flag-setting handler (main thread only); returns the previous handler."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _on_sigterm)


def sigterm_seen() -> bool:
    return _seen


def clear() -> None:
    """The run that saw the signal has handled it (a later in-process run starts unpreempted)."""
    global _seen
    _seen = False
