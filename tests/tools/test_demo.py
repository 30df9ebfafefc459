"""The README's main job in its quick form: every stage runs, numbers are written, a re-run resumes."""
import json
import os

import pytest

from unifluid_jax.tools import demo


@pytest.mark.slow
def test_quick_demo_runs_and_resumes(tmp_path, capsys):
    workdir = str(tmp_path / "demo")
    s = demo.run(workdir, vae_steps=20, steps=10, num_train=64, quick=True)
    assert s["vae"]["step"] == 20 and s["vae"]["psnr"] > s["vae"]["psnr_init"]
    assert {"loss", "visual_loss", "text_loss"} <= {k.split("/")[-1] for k in s["unifluid_train"]}
    assert 0.0 <= s["eval"]["geneval"]["overall"] <= 1.0
    assert 0.0 <= s["eval"]["geneval_vae_ceiling"]["overall"] <= 1.0
    assert "cider" in s["eval"]["caption"] and "soft_accuracy" in s["eval"]["vqa"]
    for f in ("demo_summary.json", "eval/samples.png", "unifluid/checkpoints/10", "vae/vae_stats.json"):
        assert os.path.exists(os.path.join(workdir, f)), f
    out = capsys.readouterr().out
    assert "=== UniFluid demo ===" in out and "CIDEr-D" in out
    again = demo.run(workdir, vae_steps=20, steps=10, num_train=64, quick=True)  # resumes: nothing retrained
    assert "training" not in capsys.readouterr().out
    assert again["eval"] == json.load(open(os.path.join(workdir, "eval", "eval_results.json")))
