"""suite.evaluate_section forwards every setting of a config's eval section (--mode=eval and the trainer's
eval hook read the section through it)."""
import ml_collections

from unifluid_jax import presets
from unifluid_jax.evals import suite


def test_every_eval_setting_reaches_evaluate(monkeypatch):
    section = ml_collections.ConfigDict(presets.unifluid_config("tiny", "DATA", gen_size=64, und_size=32).eval)
    section.update(num_geneval=7, num_caption=5, num_vqa=3, batch_size=2, num_steps=9, cfg_scale=4.5,
                   cfg_schedule="constant", temperature=0.7, split="val")
    seen = {}
    monkeypatch.setattr(suite, "evaluate", lambda model, params, data_dir, **kw: seen.update(kw, data_dir=data_dir))
    suite.evaluate_section("MODEL", "PARAMS", section, out_dir="OUT", caption_prompt="caption en")
    assert seen.pop("out_dir") == "OUT" and seen.pop("caption_prompt") == "caption en"
    assert seen == section.to_dict()  # each key of the section, under its own name, nothing else
