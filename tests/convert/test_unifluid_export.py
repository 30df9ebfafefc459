"""--mode=export of a trained tiny run: folder contents, fresh-process from_pretrained, exact import, bad input."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import traverse_util

from tests.train import runner
from unifluid_jax import main
from unifluid_jax.config import ConfigError
from unifluid_jax.convert import unifluid as conv
from unifluid_jax.models import unifluid
from unifluid_jax.train import checkpoint as ckpt_lib
from unifluid_jax.train import trainer

pytestmark = pytest.mark.xdist_group("unifluid_export")


def _config(shapes_dir, **export):
    cfg = runner.load_config("configs/unifluid_tiny.py", f"data={shapes_dir},steps=2,batch=8")
    cfg.mesh = dict(data=-1, fsdp=1, tensor=1)
    cfg.optimizer.ema_decay = 0.9  # export must take the EMA (serving) params
    cfg.checkpoint.every_steps = 1
    cfg.export.update(export)
    return cfg


@pytest.fixture(scope="module")
def run_dir(shapes_dir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("run"))
    trainer.Trainer(_config(shapes_dir), workdir, devices=jax.devices()[:1]).run()  # not a sharding test
    return workdir


@pytest.fixture(scope="module")
def exported(shapes_dir, run_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("export") / "dir")
    main.run(_config(shapes_dir, out=out), run_dir, "export")
    return out


def _flat(tree):
    return traverse_util.flatten_dict(jax.tree.map(np.asarray, tree))


def test_export_import_round_trip_is_exact(shapes_dir, run_dir, exported):
    cfg = _config(shapes_dir)
    state = ckpt_lib.load_numpy(run_dir)
    serving = ckpt_lib.serving_params(state)
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(serving), jax.tree.leaves(state["params"])))
    back = conv.import_params(exported, unifluid.config_from_dict(cfg.model))
    want, got = _flat(serving), _flat(back)
    assert set(want) == set(got)
    for k in want:
        assert got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k]), k
    assert conv.config_from_folder(exported) == unifluid.config_from_dict(cfg.model)


def test_folder_contents(shapes_dir, exported):
    for sub in ("language_model", "vision_encoder", "vae", "unifluid"):
        assert os.path.exists(os.path.join(exported, sub, "config.json")), sub
    assert os.path.exists(os.path.join(exported, "README.md"))
    tok = os.path.join(exported, "language_model", "tokenizer.model")
    assert open(tok, "rb").read() == open(os.path.join(shapes_dir, "tokenizer.model"), "rb").read()
    c = json.load(open(os.path.join(exported, "unifluid", "config.json")))
    assert c["patch_size"] == 2 and c["num_image_tokens"] == 16 and c["max_text_len"] == 48
    assert c["diffusion"]["depth"] == 2 and c["order_mode"] == "annealed" and c["step"] == 2
    from safetensors.numpy import load_file
    names = set(load_file(os.path.join(exported, "unifluid", "model.safetensors")))
    assert {"img_in.weight", "pos2d", "next_pos2d", "boi", "und_proj.weight", "head.res_blocks.1.mlp.2.weight",
            "head.res_blocks.0.adaLN_modulation.1.weight", "head.final_layer.linear.bias",
            "head.time_embed.mlp.0.weight"} <= names


_LOAD = """
import json, sys, torch, transformers, diffusers
d = sys.argv[1]
lm, info = transformers.Gemma2ForCausalLM.from_pretrained(d + "/language_model", output_loading_info=True,
                                                          attn_implementation="eager")
vis, vinfo = transformers.SiglipVisionModel.from_pretrained(d + "/vision_encoder", output_loading_info=True)
vae, ainfo = diffusers.AutoencoderKL.from_pretrained(d + "/vae", output_loading_info=True)
print(json.dumps({"lm": {k: list(v) for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys")},
                  "vis": {k: list(v) for k, v in vinfo.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys")},
                  "vae": {k: list(v) for k, v in ainfo.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys")},
                  "scaling": vae.config.scaling_factor,
                  "tied": lm.lm_head.weight.data_ptr() == lm.model.embed_tokens.weight.data_ptr()}))
"""


def test_folders_load_with_from_pretrained_offline(shapes_dir, exported):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", _LOAD, exported], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    for part in ("lm", "vis", "vae"):
        assert all(v == [] for v in res[part].values()), (part, res[part])
    assert res["tied"]
    assert res["scaling"] == pytest.approx(unifluid.config_from_dict(_config(shapes_dir).model).vae.scaling_factor)


def test_bad_input(shapes_dir, run_dir, exported, tmp_path):
    with pytest.raises(ConfigError, match=r"no checkpoint at step 7; available steps: \[1, 2\]"):
        cfg = _config(shapes_dir, out=str(tmp_path / "a"))
        cfg.infer.step = 7
        main.run(cfg, run_dir, "export")
    empty = tmp_path / "empty_run"
    empty.mkdir()
    with pytest.raises(ConfigError, match=r"no checkpoint; available steps: none \(train first\)"):
        main.run(_config(shapes_dir, out=str(tmp_path / "b")), str(empty), "export")
    with pytest.raises(ConfigError, match="is not empty.*export.overwrite=True"):
        main.run(_config(shapes_dir, out=exported), run_dir, "export")
    main.run(_config(shapes_dir, out=exported, overwrite=True), run_dir, "export")  # allowed when told
    # A folder from another config: the first mismatching tensor and both shapes.
    other = _config(shapes_dir).model
    other.diffusion.width = 48
    with pytest.raises(conv.ExportError, match=r"tensor unifluid/head.cond_embed.bias has shape \(64,\) but "
                                               r"the config expects \(48,\)"):
        conv.import_params(exported, unifluid.config_from_dict(other))
    other = _config(shapes_dir).model
    other.llm.mlp_dim = 96
    with pytest.raises(conv.ExportError, match=r"model.layers.0.mlp.gate_proj.weight' has shape \(128, 64\) but "
                                               r"the config expects \(96, 64\)"):
        conv.import_params(exported, unifluid.config_from_dict(other))
