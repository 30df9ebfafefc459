"""In-process trainer tests on the 8 fake CPU devices: sharding parity, accumulation, freezing, EMA, NaN guard."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unifluid_jax.train import checkpoint as ckpt_lib
from unifluid_jax.train import trainer as trainer_lib
from tests.train import runner
from tests.train import toy_tasks
from tests.train.toy_tasks import linear_config


def _run(config, workdir, devices=None):
    t = trainer_lib.Trainer(config, str(workdir), devices=devices)
    t.run()
    return t


def _losses(t):
    return np.array([v for _, v in t.writer.history("train/loss")])


@pytest.mark.slow
def test_mesh_2x2x2_matches_one_device(tmp_path):
    cfg = runner.load_config("configs/lm_tiny.py", "steps=5")
    cfg.train.log_every = 1
    cfg.checkpoint.every_steps = 0
    cfg.mesh = dict(data=2, fsdp=2, tensor=2)
    cfg.train.eval_every = 5
    t8 = _run(cfg, tmp_path / "m8")
    assert not t8.param_shardings["embedder"]["input_embedding"].is_fully_replicated
    assert [s for s, _ in t8.writer.history("eval/accuracy")] == [5]  # the task's eval hook ran
    cfg.train.eval_every = 0
    cfg.mesh = dict(data=1, fsdp=1, tensor=1)
    t1 = _run(cfg, tmp_path / "m1", devices=jax.devices()[:1])
    l8, l1 = _losses(t8), _losses(t1)
    assert len(l8) == 5
    np.testing.assert_allclose(l8, l1, rtol=1e-5)
    assert l8[-1] < l8[0]


def test_grad_accumulation_averages_micro_batch_gradients():
    """The accumulated gradient is the mean of per-micro-batch gradients (micro-batch i = rows i, i+A, ...).
    The loss here is nonlinear in the batch mean, so that mean differs from the full-batch gradient: a trainer
    that ignored grad_accum_steps would fail, and the loss must be traced on micro-batches of B/A rows."""
    accum = 4
    cfg = linear_config(num_steps=1)
    cfg.optimizer.grad_accum_steps = accum
    cfg.mesh = dict(data=2, fsdp=4, tensor=1)
    t = trainer_lib.Trainer(cfg, "/nonexistent")
    traced_rows = []

    def loss_fn(params, batch, rng, step):  # (mean error)^2: per-micro-batch means do not average to it
        traced_rows.append(batch["x"].shape[0])
        err = t.task.net.apply({"params": params}, batch["x"]) - batch["y"]
        loss = jnp.mean(err) ** 2
        return loss, {"mse": loss}

    t.task.loss_fn = loss_fn
    batch = next(iter(t.task.make_input(cfg, 0, 1)))
    params = jax.device_get(nn.meta.unbox(t.task.init_params(jax.random.PRNGKey(0))))
    with t.context():
        _, _, grads = jax.jit(t._loss_and_grads)(params, batch, jax.random.PRNGKey(1), jnp.int32(0))
    assert traced_rows and set(traced_rows) == {cfg.train.batch_size // accum}  # the micro-batch path ran

    grad = jax.grad(lambda p, b: loss_fn(p, b, None, 0)[0])
    micro = [jax.tree.map(lambda x: x[i::accum], batch) for i in range(accum)]
    want = jax.tree.map(lambda *g: sum(g) / accum, *[grad(params, m) for m in micro])
    full = grad(params, batch)
    for k in want:
        np.testing.assert_allclose(grads[k], want[k], rtol=1e-5, atol=1e-7, err_msg=k)
    assert not np.allclose(full["dense/w"], want["dense/w"], rtol=1e-3)  # the check can tell them apart


def test_grad_accumulation_is_exact(tmp_path):
    runs = {}
    for accum in (1, 4):
        cfg = linear_config(num_steps=4)
        cfg.optimizer.grad_accum_steps = accum
        cfg.mesh = dict(data=2, fsdp=4, tensor=1)
        runs[accum] = _run(cfg, tmp_path / str(accum))
    np.testing.assert_allclose(_losses(runs[4]), _losses(runs[1]), rtol=1e-6)
    p1 = ckpt_lib.load_numpy(tmp_path / "1")["params"]
    p4 = ckpt_lib.load_numpy(tmp_path / "4")["params"]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), p4, p1)


def test_freezing_and_ema(tmp_path, monkeypatch):
    cfg = linear_config(num_steps=5)
    cfg.optimizer.frozen_regexes = ("frozen_head",)
    cfg.optimizer.ema_decay = 0.5
    cfg.train.eval_every = 5
    evaluated = []
    monkeypatch.setattr(toy_tasks.Linear, "eval_fn", lambda self, p, step, w: evaluated.append(jax.device_get(p)))
    t = _run(cfg, tmp_path)
    init = jax.device_get(t.init_state(t.rng))
    final = ckpt_lib.load_numpy(tmp_path)
    np.testing.assert_array_equal(final["params"]["frozen_head/w"], init["params"]["frozen_head/w"])
    assert not np.allclose(final["params"]["dense/w"], init["params"]["dense/w"])
    # Frozen params keep no optimizer state: no (16, 1) moment anywhere.
    shapes = [np.shape(x) for x in jax.tree.leaves(final["opt_state"])]
    assert (16, 1) not in shapes and shapes.count((8, 16)) == 2
    ema = final["ema_params"]["dense/w"]
    assert not np.allclose(ema, final["params"]["dense/w"]) and not np.allclose(ema, init["params"]["dense/w"])
    # The eval hook (like --mode=eval and the CLIs) gets the EMA weights.
    assert len(evaluated) == 1
    np.testing.assert_array_equal(evaluated[0]["dense/w"], ema)


def test_nan_guard_stops_and_keeps_last_finite_checkpoint(tmp_path):
    cfg = linear_config(num_steps=10)
    cfg.checkpoint.every_steps = 2
    cfg.debug.nan_at_step = 5
    with pytest.raises(trainer_lib.NonFiniteError, match=r"at step 5;.*last good checkpoint is step 4"):
        _run(cfg, tmp_path)
    mgr = ckpt_lib.Checkpointer(str(tmp_path), cfg.checkpoint)
    assert mgr.latest_step() == 4
    mgr.close()
    state = ckpt_lib.load_numpy(tmp_path)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))


def test_init_from_copies_params_only(tmp_path):
    cfg = linear_config(num_steps=3)
    _run(cfg, tmp_path / "a")
    cfg2 = linear_config(num_steps=3)
    cfg2.checkpoint.init_from = str(tmp_path / "a")
    t = trainer_lib.Trainer(cfg2, str(tmp_path / "b"))
    with t.context():
        ckpt = ckpt_lib.Checkpointer(str(tmp_path / "b"), cfg2.checkpoint)
        state, step = t.initial_state(ckpt, None)
        ckpt.close()
    src = ckpt_lib.load_numpy(tmp_path / "a")
    assert step == 0
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state["params"]), src["params"])
    assert int(state["step"]) == 0


def test_unsharded_large_params_raise(tmp_path):
    cfg = linear_config()
    cfg.sharding.rules = [("act_batch", ("data", "fsdp"))]  # params replicated
    cfg.sharding.large_param_size = 64
    cfg.sharding.check_large_params = "raise"
    with pytest.raises(ValueError, match=r"fully replicated.*dense/w"):
        trainer_lib.Trainer(cfg, str(tmp_path))


def test_retention_keeps_latest_and_every_n(tmp_path):
    cfg = linear_config(num_steps=7)
    cfg.checkpoint.update(every_steps=1, max_to_keep=2, keep_every=3)
    _run(cfg, tmp_path)
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [3, 6, 7]
