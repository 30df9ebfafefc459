"""Task registry and the toy LM input: lazy import, clear errors, per-process slices, exact iterator state."""
import numpy as np
import pytest

from unifluid_jax import config as config_lib
from unifluid_jax.tasks import lm
from unifluid_jax.train import task as task_lib
from tests.train import runner


def test_registry_is_lazy_and_clear():
    assert task_lib.resolve("lm") is lm.LMTask
    with pytest.raises(config_lib.ConfigError, match="unknown task 'nope'"):
        task_lib.resolve("nope")
    task_lib.register("broken", "unifluid_jax.tasks.not_written_yet:Task")
    with pytest.raises(config_lib.ConfigError, match="cannot be imported"):
        task_lib.resolve("broken")
    assert task_lib.resolve("tests.train.toy_tasks:Linear").__name__ == "Linear"


def test_toy_examples_are_correct():
    src = lm.ToyDigits(0, 2, 6, ("copy", "reverse", "sort"))
    for i in range(20):
        ex = src[i]
        t, m = ex["tokens"], ex["loss_mask"].astype(bool)
        op, n = t[1], int(m.sum()) - 1
        d, y = t[2:2 + n] - lm.DIGIT0, t[m][:-1] - lm.DIGIT0
        want = {lm.OPS["copy"]: d, lm.OPS["reverse"]: d[::-1], lm.OPS["sort"]: np.sort(d)}[op]
        np.testing.assert_array_equal(y, want)
        assert t[m][-1] == lm.EOS and t[2 + n] == lm.SEP


def test_process_slices_tile_the_global_batch_and_state_resumes():
    cfg = runner.load_config("configs/lm_tiny.py", "batch=8")
    task = lm.LMTask.__new__(lm.LMTask)  # input only: no model needed
    whole = task.make_input(cfg, 0, 1)
    halves = [task.make_input(cfg, p, 2) for p in range(2)]
    for _ in range(3):
        g = next(whole)["tokens"]
        np.testing.assert_array_equal(np.concatenate([next(h)["tokens"] for h in halves]), g)
    state = whole.get_state()
    expected = next(whole)["tokens"]
    fresh = task.make_input(cfg, 0, 1)
    fresh.set_state(state)
    np.testing.assert_array_equal(next(fresh)["tokens"], expected)
