"""diffusers AutoencoderKL <-> project VAE: exact round trips, save_pretrained folders, mismatch errors."""
import flax.linen as nn
import jax
import numpy as np
import pytest
import torch

from unifluid_jax.convert import vae as convert
from unifluid_jax.models import vae

CFG = vae.get_config("tiny_f4", image_size=32)


@pytest.fixture(scope="module")
def project_params():
    """Random values in the project's own param tree (shapes from an abstract init: no compile)."""
    m = vae.AutoencoderKL(CFG)
    abstract = nn.unbox(jax.eval_shape(m.init, jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32)))
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), abstract)


def _torch_vae(cfg, seed=0):
    from diffusers import AutoencoderKL
    torch.manual_seed(seed)
    return AutoencoderKL(**convert.diffusers_config(cfg)).eval()


def _equal_trees(a, b):
    fa, fb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
    assert [p for p, _ in fa] == [p for p, _ in fb]
    for (p, x), (_, y) in zip(fa, fb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(p))


def test_round_trip_project_diffusers_project_is_exact(project_params):
    sd = convert.to_diffusers(project_params, CFG)
    tv = _torch_vae(CFG)
    tv.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in sd.items()}, strict=True)  # every key, every shape
    back = convert.from_diffusers(tv.state_dict(), CFG)
    _equal_trees(project_params, back)


def test_round_trip_diffusers_project_diffusers_is_exact():
    tv = _torch_vae(CFG, seed=1)
    sd = {k: v.numpy() for k, v in tv.state_dict().items()}
    again = convert.to_diffusers(convert.from_diffusers(sd, CFG), CFG)
    assert set(again) == set(sd)
    for k in sd:
        np.testing.assert_array_equal(again[k], sd[k], err_msg=k)


def test_save_pretrained_folders(tmp_path, project_params):
    # diffusers folder -> project (config read from config.json)
    tv = _torch_vae(CFG, seed=2)
    tv.save_pretrained(tmp_path / "from_diffusers")
    cfg, params = convert.load_diffusers(str(tmp_path / "from_diffusers"))
    assert cfg == CFG
    _equal_trees(params, convert.from_diffusers(tv.state_dict(), CFG))
    # project -> folder that diffusers loads
    from diffusers import AutoencoderKL
    convert.save_diffusers(project_params, CFG, str(tmp_path / "to_diffusers"))
    loaded = AutoencoderKL.from_pretrained(str(tmp_path / "to_diffusers"))
    assert tuple(loaded.config.block_out_channels) == CFG.block_channels
    assert loaded.config.scaling_factor == CFG.scaling_factor
    _equal_trees(project_params, convert.from_diffusers(loaded.state_dict(), CFG))


def test_sd_config_round_trip():
    sd = vae.get_config("sd_kl_f8")
    d = convert.diffusers_config(sd)
    assert d["block_out_channels"] == [128, 256, 512, 512] and d["layers_per_block"] == 2
    assert convert.config_from_diffusers(d) == sd


def test_old_attention_names():
    tv = _torch_vae(CFG, seed=3)
    sd = {k: v.numpy() for k, v in tv.state_dict().items()}
    old = {}
    for k, v in sd.items():
        for new, legacy in [("to_q.", "query."), ("to_k.", "key."), ("to_v.", "value."), ("to_out.0.", "proj_attn.")]:
            if "attentions" in k and new in k:
                k = k.replace(new, legacy)
                v = v[:, :, None, None] if v.ndim == 2 else v  # 1x1 conv storage
        old[k] = v
    _equal_trees(convert.from_diffusers(old, CFG), convert.from_diffusers(sd, CFG))


def test_mismatching_checkpoint_errors():
    other = vae.get_config("tiny_f4", image_size=32, base_channels=16, norm_groups=8)
    sd = {k: v.numpy() for k, v in _torch_vae(other).state_dict().items()}
    with pytest.raises(ValueError, match=r"'encoder\.conv_in\.weight' has shape \(16, 3, 3, 3\) but the config "
                                         r"expects \(32, 3, 3, 3\)"):
        convert.from_diffusers(sd, CFG)
    deeper = vae.get_config("tiny_f4", image_size=32, num_res_blocks=2)
    sd = {k: v.numpy() for k, v in _torch_vae(deeper).state_dict().items()}
    with pytest.raises(ValueError, match=r"does not use, first 'encoder\.down_blocks\.0\.resnets\.1\.norm1\.weight'"):
        convert.from_diffusers(sd, CFG)
    sd = {k: v.numpy() for k, v in _torch_vae(CFG).state_dict().items()}
    del sd["encoder.mid_block.attentions.0.to_q.weight"]
    with pytest.raises(ValueError, match=r"no tensor 'encoder\.mid_block\.attentions\.0\.to_q\.weight'"):
        convert.from_diffusers(sd, CFG)
    with pytest.raises(ValueError, match=r"the config expects"):
        convert.to_diffusers(convert.from_diffusers(sd | {"encoder.mid_block.attentions.0.to_q.weight":
                                                          np.zeros((64, 64), np.float32)}, CFG), deeper)
