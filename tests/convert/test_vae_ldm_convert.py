"""Original LDM / CompVis / SD-format KL-VAE checkpoints <-> project VAE, checked against diffusers' own
LDM -> diffusers converter (diffusers.loaders.single_file_utils.convert_ldm_vae_checkpoint)."""
import jax
import numpy as np
import pytest
import torch

from unifluid_jax.convert import vae as convert
from unifluid_jax.models import vae

# 3 levels with three different widths (a swapped level fails on shapes, not only values), 2 res blocks a level,
# nin_shortcut in both encoder and decoder, mid attention.
CFG = vae.get_config("tiny_f4", image_size=16, base_channels=16, channel_mult=(1, 2, 4), num_res_blocks=2,
                     norm_groups=8)
PREFIX = "first_stage_model."


def _ldm_state_dict(cfg, seed=0):
    """Random tensors under the names and shapes the original LDM Encoder / Decoder (ldm/modules/
    diffusionmodules/model.py, attn_resolutions=[]) registers, in its module order; written from those
    constructors, not from the converter under test."""
    rng = np.random.default_rng(seed)
    sd = {}

    def conv(name, cin, cout, k):  # fan-in scaled so activations stay O(1) through the whole net
        sd[f"{name}.weight"] = (rng.standard_normal((cout, cin, k, k)) / np.sqrt(cin * k * k)).astype(np.float32)
        sd[f"{name}.bias"] = (0.1 * rng.standard_normal(cout)).astype(np.float32)

    def norm(name, c):
        sd[f"{name}.weight"] = (1 + 0.1 * rng.standard_normal(c)).astype(np.float32)
        sd[f"{name}.bias"] = (0.1 * rng.standard_normal(c)).astype(np.float32)

    def resnet(name, cin, cout):
        norm(f"{name}.norm1", cin)
        conv(f"{name}.conv1", cin, cout, 3)
        norm(f"{name}.norm2", cout)
        conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cin, cout, 1)

    def mid(name, c):
        resnet(f"{name}.block_1", c, c)
        norm(f"{name}.attn_1.norm", c)
        for p in ("q", "k", "v", "proj_out"):
            conv(f"{name}.attn_1.{p}", c, c, 1)
        resnet(f"{name}.block_2", c, c)

    ch, n, lat = cfg.block_channels, len(cfg.channel_mult), cfg.latent_channels
    conv("encoder.conv_in", cfg.in_channels, ch[0], 3)
    c = ch[0]
    for level in range(n):
        for b in range(cfg.num_res_blocks):
            resnet(f"encoder.down.{level}.block.{b}", c, ch[level])
            c = ch[level]
        if level != n - 1:
            conv(f"encoder.down.{level}.downsample.conv", c, c, 3)
    mid("encoder.mid", c)
    norm("encoder.norm_out", c)
    conv("encoder.conv_out", c, 2 * lat, 3)
    conv("decoder.conv_in", lat, ch[-1], 3)
    mid("decoder.mid", ch[-1])
    c = ch[-1]
    for level in reversed(range(n)):  # built from the bottom, stored as decoder.up.<level>
        for b in range(cfg.num_res_blocks + 1):
            resnet(f"decoder.up.{level}.block.{b}", c, ch[level])
            c = ch[level]
        if level != 0:
            conv(f"decoder.up.{level}.upsample.conv", c, c, 3)
    norm("decoder.norm_out", c)
    conv("decoder.conv_out", c, cfg.out_channels, 3)
    conv("quant_conv", 2 * lat, 2 * lat, 1)
    conv("post_quant_conv", lat, lat, 1)
    return sd


@pytest.fixture(scope="module")
def ldm_and_converted():
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    ldm = _ldm_state_dict(CFG)
    converted = convert_ldm_vae_checkpoint({k: torch.from_numpy(v.copy()) for k, v in ldm.items()},
                                           convert.diffusers_config(CFG))
    return ldm, converted


def _equal_trees(a, b):
    fa, fb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
    assert [p for p, _ in fa] == [p for p, _ in fb]
    for (p, x), (_, y) in zip(fa, fb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(p))


def _equal_dicts(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        assert np.asarray(a[k]).dtype == np.asarray(b[k]).dtype, k
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


def test_ldm_names_and_shapes(ldm_and_converted):
    ldm, _ = ldm_and_converted
    top = CFG.block_channels[-1]
    assert ldm["encoder.mid.attn_1.q.weight"].shape == (top, top, 1, 1)  # 1x1 conv, not linear
    assert "decoder.up.2.upsample.conv.weight" in ldm and "decoder.up.0.upsample.conv.weight" not in ldm
    assert ldm["decoder.up.0.block.0.nin_shortcut.weight"].shape == (16, 32, 1, 1)


def test_matches_diffusers_converter(ldm_and_converted):
    ldm, converted = ldm_and_converted
    _equal_trees(convert.params_from_ldm(ldm, CFG), convert.from_diffusers(converted, CFG))


def test_outputs_match_diffusers_model(ldm_and_converted):
    from diffusers import AutoencoderKL
    ldm, converted = ldm_and_converted
    tv = AutoencoderKL(**convert.diffusers_config(CFG)).eval()
    tv.load_state_dict(converted, strict=True)  # every diffusers tensor came out of the LDM dict
    x = np.random.default_rng(1).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    z = np.random.default_rng(2).standard_normal((2, 4, 4, CFG.latent_channels)).astype(np.float32)
    with torch.no_grad():
        post = tv.encode(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).latent_dist
        dec = tv.decode(torch.from_numpy(z.transpose(0, 3, 1, 2).copy())).sample
    ref_mean, ref_dec = post.mean.numpy().transpose(0, 2, 3, 1), dec.numpy().transpose(0, 2, 3, 1)
    m, params = vae.AutoencoderKL(CFG), convert.params_from_ldm(ldm, CFG)

    @jax.jit
    def run(p, x, z):
        return m.apply(p, x, method=m.encode)[0], m.apply(p, z, method=m.decode)

    mean, out = run(params, x, z)
    d_mean, d_dec = np.abs(mean - ref_mean).max(), np.abs(out - ref_dec).max()
    print(f"LDM VAE vs diffusers: encode mean max |diff| {d_mean:.3g}, decode {d_dec:.3g}")
    assert d_mean <= 1e-4 and d_dec <= 1e-4
    assert np.abs(ref_mean).max() > 0.1 and np.abs(ref_dec).max() > 0.1  # non-trivial outputs


def test_round_trip_to_ldm_is_exact(ldm_and_converted):
    ldm, _ = ldm_and_converted
    _equal_dicts(convert.params_to_ldm(convert.params_from_ldm(ldm, CFG), CFG), ldm)


def test_prefix_and_non_vae_keys_ignored(ldm_and_converted):
    ldm, _ = ldm_and_converted
    want = convert.params_from_ldm(ldm, CFG)
    loss = {"loss.logvar": np.zeros((), np.float32), "loss.discriminator.main.0.weight": np.ones((8, 3, 4, 4))}
    _equal_trees(convert.params_from_ldm(ldm | loss, CFG), want)  # a bare autoencoder training checkpoint
    full = {"model.diffusion_model.input_blocks.0.0.weight": np.ones((8, 4, 3, 3)),
            "cond_stage_model.transformer.x": np.ones(2), **loss,
            **convert.params_to_ldm(want, CFG, prefix=PREFIX)}  # an SD-style checkpoint
    assert full[PREFIX + "encoder.down.0.block.0.norm1.weight"].shape == (16,)
    _equal_trees(convert.params_from_ldm(full, CFG), want)


def test_errors_name_the_tensor(ldm_and_converted):
    ldm, _ = ldm_and_converted
    bad = dict(ldm)
    del bad["encoder.mid.attn_1.q.weight"]
    with pytest.raises(ValueError, match=r"no tensor 'encoder\.mid\.attn_1\.q\.weight'.*shape \(64, 64\)"):
        convert.params_from_ldm(bad, CFG)
    with pytest.raises(ValueError, match=r"under 'first_stage_model\.'.*no tensor 'encoder\.mid\.attn_1\.q"):
        convert.params_from_ldm({PREFIX + k: v for k, v in bad.items()}, CFG)
    bad = ldm | {"decoder.up.0.block.0.nin_shortcut.weight": np.zeros((16, 32, 3, 3), np.float32)}
    with pytest.raises(ValueError, match=r"'decoder\.up\.0\.block\.0\.nin_shortcut\.weight' has shape \(16, 32, 3, "
                                         r"3\) but the config expects \(16, 32, 1, 1\)"):
        convert.params_from_ldm(bad, CFG)
    bad = ldm | {"decoder.mid.attn_1.proj_out.weight": np.zeros((64, 64), np.float32)}  # linear, not 1x1 conv
    with pytest.raises(ValueError, match=r"'decoder\.mid\.attn_1\.proj_out\.weight' has shape \(64, 64\) but the "
                                         r"config expects \(64, 64, 1, 1\)"):
        convert.params_from_ldm(bad, CFG)
    bad = ldm | {"encoder.down.2.attn.0.norm.weight": np.ones(64, np.float32)}  # LDM attn_resolutions
    with pytest.raises(ValueError, match=r"'encoder\.down\.2\.attn\.0\.norm\.weight' is an attention block inside"):
        convert.params_from_ldm(bad, CFG)
    other = vae.get_config("tiny_f4", image_size=16, base_channels=16, channel_mult=(1, 2, 4), num_res_blocks=1,
                           norm_groups=8)
    with pytest.raises(ValueError, match=r"does not use, first 'encoder\.down\.0\.block\.1\.norm1\.weight'"):
        convert.params_from_ldm(ldm, other)
    with pytest.raises(ValueError, match=r"VAE to LDM: 48 param\(s\) the config does not have, first "
                                         r"decoder/up_blocks_0/resnets_2/conv1/bias"):
        convert.params_to_ldm(convert.params_from_ldm(ldm, CFG), other)  # nothing dropped silently
    with pytest.raises(ValueError, match=r"VAE to LDM: param decoder/up_blocks_0/resnets_2/conv1/bias has shape "
                                         r"None, the config expects \(64,\)"):
        convert.params_to_ldm(convert.params_from_ldm(_ldm_state_dict(other), other), CFG)


class _Callback:  # stands for the Lightning objects that make a .ckpt fail torch.load(weights_only=True)
    pass


def test_load_ldm_checkpoint_files(tmp_path, ldm_and_converted):
    from safetensors.numpy import save_file
    ldm, _ = ldm_and_converted
    want = convert.params_from_ldm(ldm, CFG)
    save_file(ldm, str(tmp_path / "vae.safetensors"))
    _equal_trees(convert.load_ldm_checkpoint(str(tmp_path / "vae.safetensors"), CFG), want)
    tensors = {PREFIX + k: torch.from_numpy(v.copy()) for k, v in ldm.items()}
    torch.save({"state_dict": tensors, "global_step": 7}, tmp_path / "model.ckpt")  # weights_only loads it
    _equal_trees(convert.load_ldm_checkpoint(str(tmp_path / "model.ckpt"), CFG), want)
    torch.save({"state_dict": tensors, "callbacks": {"cb": _Callback()}}, tmp_path / "lightning.ckpt")
    with pytest.raises(ValueError, match="trust_pickle=True"):
        convert.load_ldm_checkpoint(str(tmp_path / "lightning.ckpt"), CFG)
    _equal_trees(convert.load_ldm_checkpoint(str(tmp_path / "lightning.ckpt"), CFG, trust_pickle=True), want)
    torch.save({"model": {k: torch.from_numpy(v.copy()) for k, v in ldm.items()}}, tmp_path / "kl.ckpt")  # MAR
    _equal_trees(convert.load_ldm_checkpoint(str(tmp_path / "kl.ckpt"), CFG), want)
