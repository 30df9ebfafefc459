"""HF / big_vision SigLIP -> project: save_pretrained folders, prefixes, export, mismatch errors."""
import dataclasses

import numpy as np
import pytest
import torch

from unifluid_jax.convert import siglip as convert
from unifluid_jax.models import siglip

CFG = siglip.get_config("tiny/8", pool="map")


def _hf_model(cfg, seed=0):
    from transformers import SiglipVisionConfig, SiglipVisionModel
    torch.manual_seed(seed)
    return SiglipVisionModel(SiglipVisionConfig(**convert.hf_config(cfg))).eval()


def _same(a, b):
    import jax
    fa, fb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
    assert [p for p, _ in fa] == [p for p, _ in fb]
    for (p, x), (_, y) in zip(fa, fb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(p))


def test_save_pretrained_folder(tmp_path):
    tm = _hf_model(CFG)
    tm.save_pretrained(tmp_path)
    cfg, params = convert.load_hf(str(tmp_path))
    assert cfg == CFG
    _same(params, convert.from_hf(tm.state_dict(), CFG))


def test_prefixed_state_dicts_and_pool_none():
    tm = _hf_model(CFG)
    sd = tm.state_dict()
    ref = convert.from_hf(sd, CFG)
    # A full SiglipModel / PaliGemma state dict: vision keys under a prefix, other towers alongside.
    full = {f"model.vision_tower.vision_model.{k}": v for k, v in sd.items()}
    full["model.language_model.embed_tokens.weight"] = torch.zeros(3, 4)
    _same(convert.from_hf(full, CFG), ref)
    # pool='none' (PaliGemma): the MAP head in the checkpoint is dropped.
    none = dataclasses.replace(CFG, pool="none")
    p = convert.from_hf(sd, none)
    assert "MAPHead_0" not in p["params"]
    _same(p["params"]["Transformer"], ref["params"]["Transformer"])


def test_export_to_transformers_round_trip():
    tm = _hf_model(CFG, seed=1)
    params = convert.from_hf(tm.state_dict(), CFG)
    sd = convert.to_hf(params, CFG)
    fresh = _hf_model(CFG, seed=2)
    fresh.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in sd.items()}, strict=True)
    for k, v in tm.state_dict().items():
        np.testing.assert_array_equal(fresh.state_dict()[k].numpy(), v.numpy(), err_msg=k)
    # Looped-layout params export the same.
    loop_cfg = dataclasses.replace(CFG, scan_layers=False)
    _same(convert.to_hf(convert.set_layout(params, False), loop_cfg), sd)


def test_config_from_hf_nested():
    d = {"model_type": "siglip", "vision_config": {**convert.hf_config(siglip.get_config("So400m/14")),
                                                   "vision_use_head": False}}
    assert convert.config_from_hf(d) == siglip.get_config("So400m/14")


def test_mismatching_hf_checkpoint_errors():
    wider = dataclasses.replace(CFG, width=48, num_heads=3)
    sd = _hf_model(wider).state_dict()
    with pytest.raises(ValueError, match=r"'embeddings\.patch_embedding\.weight' has shape \(48, 3, 8, 8\) but the "
                                         r"config expects \(32, 3, 8, 8\)"):
        convert.from_hf(sd, CFG)
    deeper = _hf_model(dataclasses.replace(CFG, depth=3)).state_dict()
    with pytest.raises(ValueError, match=r"does not use, first 'encoder\.layers\.2\."):
        convert.from_hf(deeper, CFG)
    with pytest.raises(ValueError, match=r"no tensor 'encoder\.layers\.2\.layer_norm1\.weight'"):
        convert.from_hf(_hf_model(CFG).state_dict(), dataclasses.replace(CFG, depth=3))
    with pytest.raises(ValueError, match=r"no tensor 'head\.probe'"):
        convert.from_hf(_hf_model(dataclasses.replace(CFG, pool="none")).state_dict(), CFG)


def test_big_vision_npz_file(tmp_path):
    params = convert.from_hf(_hf_model(CFG).state_dict(), CFG)
    flat = {f"params/img/{k}": np.asarray(v) for k, v in convert.flatten_big_vision(params["params"]).items()}
    np.savez(tmp_path / "ckpt.npz", **flat)
    _same(convert.load_big_vision(str(tmp_path / "ckpt.npz"), CFG), params)


def test_mismatching_big_vision_checkpoint_errors():
    params = convert.from_hf(_hf_model(CFG).state_dict(), CFG)
    flat = convert.flatten_big_vision(params["params"])  # scanned layout, leading layer axis of 2
    with pytest.raises(ValueError, match=r"no tensor 'Transformer/encoderblock_2/LayerNorm_0/bias'"):
        convert.from_big_vision(flat, dataclasses.replace(CFG, depth=3))
    bad = dict(flat)
    bad["Transformer/encoderblock/MlpBlock_0/Dense_0/kernel"] = np.zeros((2, 32, 96), np.float32)
    with pytest.raises(ValueError, match=r"'Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel' has shape "
                                         r"\(32, 96\) but the config expects \(32, 64\)"):
        convert.from_big_vision(bad, CFG)
    with pytest.raises(ValueError, match=r"exactly one '\*embedding/kernel'"):
        convert.from_big_vision({"foo/bar": np.zeros(3)}, CFG)
