"""SigLIP task: caption inputs, retrieval metric, the sigmoid loss learns a synthetic pairing, a trained image
tower loads into UniFluid's `siglip` through checkpoint.init_subtrees, config errors."""
import dataclasses
import json
import os

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

from tests.train import runner
from unifluid_jax import config as config_lib
from unifluid_jax.data import layout
from unifluid_jax.models import siglip, two_towers
from unifluid_jax.tasks import siglip as siglip_task
from unifluid_jax.train import checkpoint as ckpt_lib
from unifluid_jax.train import trainer as trainer_lib


def test_caption_tokens():
    rows = [layout.text_layout("caption", [7, 8], answer, 10, sep_ids=(5,)) for answer in ([20, 21, 22], [30])]
    tokens = np.stack([r["text_tokens"] for r in rows])
    mask = np.stack([r["text_loss_mask"] for r in rows])
    want = np.array([[20, 21, 22, layout.EOS_ID, 0, 0, 0, 0, 0, 0],
                     [30, layout.EOS_ID, 0, 0, 0, 0, 0, 0, 0, 0]], np.int32)
    np.testing.assert_array_equal(siglip_task.caption_tokens(tokens, mask), want)


def test_retrieval_top1_with_duplicate_captions():
    texts = np.array([[1, 0], [2, 0], [2, 0], [3, 0]])  # rows 1 and 2 share a caption
    zimg = np.eye(4)[[0, 2, 1, 0]]  # image 1 -> text 2 (same caption: right); image 3 -> text 0 (wrong)
    ztxt = np.eye(4)
    out = siglip_task.retrieval_top1(zimg, ztxt, texts)
    assert out["i2t_top1"] == 0.75 and out["num_examples"] == 4
    # text -> image: text 0 ties images 0 and 3 (argmax takes image 0: right); text 1 -> image 2 (same caption:
    # right); text 2 -> image 1 (right); text 3 -> no image scores above 0, argmax image 0 (wrong).
    assert out["t2i_top1"] == 0.75
    assert out["chance_top1"] == pytest.approx((1 + 2 + 2 + 1) / 16)


def _synthetic_pairs(rng, combos, noise=0.3):
    """Image: left half colour a, right half colour b (+ noise); caption: [a, b, EOS] as tokens."""
    palette = np.linspace(-0.9, 0.9, 8 * 3).reshape(8, 3)[np.random.default_rng(7).permutation(8)]
    a, b = combos[:, 0], combos[:, 1]
    img = np.zeros((len(combos), 32, 32, 3), np.float32)
    img[:, :, :16] = palette[a][:, None, None]
    img[:, :, 16:] = palette[b][:, None, None]
    img += noise * rng.standard_normal(img.shape).astype(np.float32)
    text = np.zeros((len(combos), 6), np.int32)
    text[:, 0], text[:, 1], text[:, 2] = 4 + a, 12 + b, layout.EOS_ID
    return img, text


def test_sigmoid_loss_learns_synthetic_pairs():
    cfg = two_towers.config_from_dict({"image": {"variant": "tiny/8", "pool": "map"},
                                       "text": {"variant": "tiny", "vocab_size": 24}})
    model = two_towers.TwoTowers(cfg)
    rng = np.random.default_rng(0)
    all_combos = np.stack(np.meshgrid(np.arange(8), np.arange(8), indexing="ij"), -1).reshape(-1, 2)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), *_synthetic_pairs(rng, all_combos[:1])))
    tx = optax.adamw(optax.linear_schedule(0.0, 3e-3, 10), b2=0.95, weight_decay=1e-4)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, images, texts):
        loss, grads = jax.value_and_grad(
            lambda p: two_towers.sigmoid_loss(*model.apply(p, images, texts)))(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    embed = jax.jit(model.apply)
    images, texts = _synthetic_pairs(rng, all_combos)  # held-out noise, all 64 captions
    zimg, ztxt, _, _ = embed(params, images, texts)
    before = siglip_task.retrieval_top1(np.asarray(zimg), np.asarray(ztxt), texts)
    losses = []
    for _ in range(80):  # every step all 64 pairings, shuffled, with fresh noise
        batch = all_combos[rng.permutation(len(all_combos))]
        params, opt, loss = step(params, opt, *_synthetic_pairs(rng, batch))
        losses.append(float(loss))
    zimg, ztxt, _, _ = embed(params, images, texts)
    after = siglip_task.retrieval_top1(np.asarray(zimg), np.asarray(ztxt), texts)
    print("synthetic retrieval: before", before, "after", after, "loss", losses[0], "->", losses[-1])
    assert after["chance_top1"] == pytest.approx(1 / 64)
    assert after["i2t_top1"] >= 0.3 and after["t2i_top1"] >= 0.3, after  # chance 0.016
    assert losses[-1] < 0.5 * losses[0]


def _siglip_config(shapes_dir, steps=8, batch=16):
    # size=tiny: the tower of configs/unifluid_tiny.py (32 px), which the test below loads it into.
    cfg = runner.load_config("configs/siglip_tiny.py", f"data={shapes_dir},size=tiny,steps={steps},batch={batch}")
    cfg.siglip_train.eval_examples = 48
    return cfg


@pytest.mark.parametrize("arg, uf_arg", [("", ""), ("und=32/8/32", "und=32/8/32")])
def test_default_tower_is_the_demo_unifluid_tower(arg, uf_arg):
    """The demo's SigLIP stage (configs/siglip_tiny.py, default size=demo) trains exactly the image tower
    configs/unifluid_demo.py reads (same `und=`), so init_subtrees loads it without a shape mismatch."""
    tower = runner.load_config("configs/siglip_tiny.py", f"data=D,{arg}")
    uf = runner.load_config("configs/unifluid_demo.py", f"data=D,{uf_arg}")
    assert dataclasses.replace(two_towers.config_from_dict(tower.model).image, pool="none") == \
        siglip.config_from_dict(uf.model.siglip)
    assert tower.data.und_size == uf.data.und_size == siglip.config_from_dict(uf.model.siglip).image_size


@pytest.mark.slow
def test_task_trains_and_loads_into_unifluid(shapes_dir, tmp_path):
    cfg = _siglip_config(shapes_dir)
    config_lib.validate(cfg, num_devices=1)
    summary = trainer_lib.Trainer(cfg, str(tmp_path / "siglip"), devices=jax.devices()[:1]).run()
    stats = json.load(open(tmp_path / "siglip" / "siglip_stats.json"))
    assert summary["final_step"] == 8 and stats["step"] == 8 and stats["num_examples"] == 48
    assert 1 / 48 <= stats["chance_top1"] < 0.1
    # The recorded retrieval is the final checkpoint's: recomputed from the saved params it is the same.
    again = siglip_task.SigLIPTask(cfg).evaluate(ckpt_lib.load_numpy(tmp_path / "siglip")["params"])
    assert (again["i2t_top1"], again["t2i_top1"]) == (stats["i2t_top1"], stats["t2i_top1"]), (again, stats)
    assert stats["history"] == [{k: stats[k] for k in ("step", "i2t_top1", "t2i_top1")}]

    # The demo's recipe: UniFluid's frozen `siglip` from this run's image tower.
    uf = runner.load_config("configs/unifluid_tiny.py", f"data={shapes_dir}")
    uf.checkpoint.init_subtrees = [dict(workdir=str(tmp_path / "siglip"), src=siglip_task.IMAGE_TOWER,
                                        dst="siglip")]
    config_lib.validate(uf, num_devices=1)
    t = trainer_lib.Trainer(uf, str(tmp_path / "uf"), devices=jax.devices()[:1])
    with t.context():
        ckpt = ckpt_lib.Checkpointer(str(tmp_path / "uf"), uf.checkpoint)
        state, step = t.initial_state(ckpt, None)
        ckpt.close()
    assert step == 0
    loaded = jax.device_get(state["params"]["siglip"])
    trained = ckpt_lib.load_numpy(tmp_path / "siglip")["params"][siglip_task.IMAGE_TOWER]
    assert "MAPHead_0" not in loaded  # UniFluid reads the tokens before the MAP head
    jax.tree.map(np.testing.assert_array_equal, loaded, {k: v for k, v in trained.items() if k != "MAPHead_0"})
    images = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    uf_cfg = siglip.config_from_dict(uf.model.siglip)
    tokens, _ = jax.jit(siglip.SigLIP(uf_cfg).apply)({"params": loaded}, images)
    tower_cfg = two_towers.config_from_dict(cfg.model).image
    ref, _ = jax.jit(siglip.SigLIP(tower_cfg).apply)({"params": trained}, images)
    np.testing.assert_allclose(tokens, ref, atol=1e-6)


def test_config_errors(shapes_dir):
    cfg = _siglip_config(shapes_dir)
    config_lib.validate(cfg, num_devices=1)
    for edit, match in [(lambda c: c.data.sources[0].update(task="t2i"), r"data.sources\[0\].task"),
                        (lambda c: c.siglip_train.eval_sources[0].update(task=""),
                         r"siglip_train.eval_sources\[0\].task"),
                        (lambda c: setattr(c.data, "und_size", 64), "data.und_size"),
                        (lambda c: c.model.text.update(vocab_size=16), "model.text.vocab_size"),
                        (lambda c: c.model.image.update(pool="none"), "model.image.pool"),
                        (lambda c: setattr(c.siglip_train, "eval_examples", 1), "siglip_train.eval_examples")]:
        bad = _siglip_config(shapes_dir)
        edit(bad)
        with pytest.raises(config_lib.ConfigError, match=match):
            config_lib.validate(bad, num_devices=1)
