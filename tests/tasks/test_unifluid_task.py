"""UniFluid task through the real trainer and pipeline: mixed batches train, config mismatches fail early."""
import json
import os

import numpy as np
import pytest

from tests.train import runner
from unifluid_jax.config import ConfigError
from unifluid_jax.train import task as task_lib
from unifluid_jax.train import trainer


def _config(shapes_dir, **kw):
    cfg = runner.load_config("configs/unifluid_tiny.py", f"data={shapes_dir},steps=12,batch=8")
    cfg.train.log_every = 4
    cfg.checkpoint.every_steps = 6
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


@pytest.mark.slow
def test_trains_on_mixed_batches(shapes_dir, tmp_path):
    cfg = _config(shapes_dir, mesh=dict(data=2, fsdp=2, tensor=2))
    summary = trainer.Trainer(cfg, str(tmp_path)).run()
    m = summary["metrics"]
    assert summary["final_step"] == 12
    curve = summary["loss_curve"]
    assert [s for s, _ in curve] == [4, 8, 12] and np.all(np.isfinite([v for _, v in curve]))
    assert curve[-1][1] < curve[0][1], curve  # it learns: 1.02 -> 0.97 here
    assert m["train/text_loss"]["last"] < m["train/text_loss"]["mean_last10"] - 0.2, m["train/text_loss"]  # 5.1 < 5.6
    for k in ("train/visual_loss", "train/text_loss", "train/caption_text_loss", "train/frac_t2i",
              "data/skipped_total"):
        assert k in m, sorted(m)
    assert m["data/skipped_total"]["last"] == 0
    assert os.path.isdir(os.path.join(tmp_path, "checkpoints", "12"))


@pytest.mark.parametrize("field,value,match", [
    ("max_text_len", 40, "data.max_text_len"),
    ("gen_size", 32, "data.gen_size"),
    ("und_size", 64, "data.und_size"),
])
def test_data_model_mismatch_is_one_clear_error(shapes_dir, field, value, match):
    cfg = _config(shapes_dir)
    cfg.data[field] = value
    with pytest.raises(ConfigError, match=match):
        task_lib.resolve("unifluid").validate_config(cfg)


def test_bad_model_section(shapes_dir):
    cfg = _config(shapes_dir)
    cfg.model.order_mode = "spiral"
    with pytest.raises(ConfigError, match="model.order_mode"):
        task_lib.resolve("unifluid").validate_config(cfg)
    cfg = _config(shapes_dir)
    cfg.model.llm.num_kv_heads = 3
    with pytest.raises(ConfigError, match="model.llm"):
        task_lib.resolve("unifluid").validate_config(cfg)


@pytest.mark.parametrize("section", ["eval", "infer"])
def test_unknown_cfg_schedule_is_refused_before_compiling(shapes_dir, section):
    cfg = _config(shapes_dir)
    cfg[section].cfg_schedule = "cosine"
    with pytest.raises(ConfigError, match=rf"config.{section}.cfg_schedule: 'cosine' is unknown"):
        task_lib.resolve("unifluid").validate_config(cfg)
