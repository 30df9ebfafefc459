"""VAE training mode: a small VAE trained on the shapes data improves held-out PSNR; scaling factor stored."""
import json
import os

import jax
import pytest

from tests.train import runner
from unifluid_jax.train import trainer


@pytest.mark.slow
def test_vae_training_improves_psnr(shapes_dir, tmp_path):
    cfg = runner.load_config("configs/vae_tiny.py", f"data={shapes_dir},steps=80,batch=8")
    cfg.mesh = dict(data=-1, fsdp=1, tensor=1)
    summary = trainer.Trainer(cfg, str(tmp_path), devices=jax.devices()[:1]).run()  # not a sharding test
    stats = json.load(open(os.path.join(tmp_path, "vae_stats.json")))
    print("VAE held-out PSNR: init %.2f dB -> %.2f dB after %d steps; scaling factor %.4f" % (
        stats["psnr_init"], stats["psnr"], stats["step"], stats["scaling_factor"]))
    assert stats["step"] == 80 and summary["final_step"] == 80
    assert stats["psnr"] >= stats["psnr_init"] + 4.0, stats
    assert 0.0 < stats["scaling_factor"] < 100.0
