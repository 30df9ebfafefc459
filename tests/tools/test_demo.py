"""The README's main job in its quick form: every stage runs, numbers are written beside their chance
baselines, a re-run resumes."""
import json
import os

import jax
import pytest

from unifluid_jax.tools import demo


@pytest.mark.slow
def test_quick_demo_runs_and_resumes(tmp_path, capsys):
    workdir = str(tmp_path / "demo")
    s = demo.run(workdir, preset="quick", devices=jax.devices()[:1])  # one device: not a sharding test
    assert s["vae"]["step"] == demo.PRESETS["quick"]["vae_steps"] and s["vae"]["psnr"] > s["vae"]["psnr_init"]
    assert {"loss", "visual_loss", "text_loss"} <= {k.split("/")[-1] for k in s["unifluid_train"]}
    e = s["eval"]
    # Every score has its chance baseline, per GenEval category too.
    assert set(e["geneval"]) - {"num_images"} <= set(e["geneval_chance"])
    assert {"exact_match", "cider"} <= set(e["caption"]["chance"])
    assert "exact_match" in e["vqa"]["chance"]
    for f in ("demo_summary.json", "eval/samples.png", "unifluid/checkpoints/10", "vae/vae_stats.json",
              "siglip/siglip_stats.json"):
        assert os.path.exists(os.path.join(workdir, f)), f
    out = capsys.readouterr().out
    assert "=== UniFluid demo ===" in out and "CIDEr-D" in out and "[" in out
    # One progress line per training stage, not one per logged step.
    assert out.count("    VAE: step ") == 1 and out.count("    UniFluid: step ") == 1
    assert out.count("    SigLIP: step ") == 1 and "SigLIP held-out retrieval" in out
    assert s["siglip"]["step"] == demo.PRESETS["quick"]["siglip_steps"]
    again = demo.run(workdir, preset="quick", devices=jax.devices()[:1])  # resumes: nothing retrained
    assert "training" not in capsys.readouterr().out
    assert again["eval"] == json.load(open(os.path.join(workdir, "eval", "eval_results.json")))
