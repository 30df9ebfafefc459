"""KL-VAE: parity with diffusers AutoencoderKL, presets, losses, sharding, input errors."""
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from unifluid_jax.config import ConfigError
from unifluid_jax.convert import vae as convert
from unifluid_jax.models import vae
from unifluid_jax.train import sharding

# 3 levels (downsample 4), channel change 32 -> 64 (conv_shortcut in encoder and decoder), mid attention.
CFG = vae.get_config("tiny_f4", image_size=32)


@pytest.fixture(scope="module")
def reference():
    from diffusers import AutoencoderKL as TorchVAE
    torch.manual_seed(0)
    tv = TorchVAE(**convert.diffusers_config(CFG)).eval()
    with torch.no_grad():  # perturb so norms/biases are not at their trivial init
        for p in tv.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return tv, convert.from_diffusers(tv.state_dict(), CFG)


def _jit(m, method=None):
    return jax.jit(functools.partial(m.apply, method=method) if method else m.apply)


def _images(b=2, size=32, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (b, size, size, 3)).astype(np.float32)


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


def test_config_has_required_parts():
    assert CFG.downsample_factor == 4 and len(CFG.block_channels) == 3
    assert CFG.block_channels[0] != CFG.block_channels[1] and CFG.mid_attention


def test_matches_diffusers(reference):
    tv, params = reference
    m = vae.AutoencoderKL(CFG)
    x = _images()
    with torch.no_grad():
        post = tv.encode(_nchw(x)).latent_dist
        z = torch.randn_like(post.mean)
        dec = tv.decode(z).sample
    mean, logvar = _jit(m, m.encode)(params, x)
    np.testing.assert_allclose(mean, _nhwc(post.mean), atol=1e-4, rtol=0)
    np.testing.assert_allclose(logvar, _nhwc(post.logvar), atol=1e-4, rtol=0)
    out = _jit(m, m.decode)(params, _nhwc(z))
    np.testing.assert_allclose(out, _nhwc(dec), atol=1e-4, rtol=0)
    assert np.abs(_nhwc(dec)).max() > 0.1  # a non-trivial output


def test_call_sample_and_scaled_latents(reference):
    _, params = reference
    m = vae.AutoencoderKL(CFG)
    x = _images()
    rng = jax.random.key(3)

    @jax.jit
    def run(params, x):  # one compile for all entry points
        call = functools.partial(m.apply, params)
        mean, logvar = call(x, method=m.encode)
        return dict(mean=mean, logvar=logvar, call=call(x), decode=call(mean, method=m.decode),
                    sample=call(mean, logvar, rng, method=m.sample),
                    scaled=call(x, method=m.encode_latents),
                    unscaled=call(call(x, method=m.encode_latents), method=m.decode_latents))

    o = run(params, x)
    recon, mean2, _ = o["call"]  # no rng: decodes the mean
    np.testing.assert_array_equal(o["mean"], mean2)
    np.testing.assert_allclose(recon, o["decode"], atol=1e-6)
    eps = jax.random.normal(rng, o["mean"].shape)
    np.testing.assert_allclose(o["sample"], o["mean"] + jnp.exp(0.5 * o["logvar"]) * eps, atol=1e-6)
    np.testing.assert_allclose(o["scaled"], o["mean"] * CFG.scaling_factor, atol=1e-6)
    np.testing.assert_allclose(o["unscaled"], recon, atol=1e-5)


def test_logvar_clamped(reference):
    m = vae.AutoencoderKL(CFG)
    params = jax.tree.map(lambda a: a, reference[1])
    # Push the quant_conv bias so logvar would be far outside [-30, 20], both ways.
    b = params["params"]["quant_conv"]["bias"]
    for value, clamp in [(1e4, 20.0), (-1e4, -30.0)]:
        params["params"]["quant_conv"]["bias"] = b.at[CFG.latent_channels:].set(value)
        _, logvar = _jit(m, m.encode)(params, _images(1))
        np.testing.assert_array_equal(logvar, clamp)


def test_group_norm_matches_torch():
    """The einsum GroupNorm against torch.nn.GroupNorm (offset, scaled inputs: two-pass statistics matter)."""
    r = np.random.default_rng(0)
    x = (3.0 + 2.0 * r.standard_normal((2, 6, 5, 16))).astype(np.float32)
    scale, bias = r.standard_normal(16).astype(np.float32), r.standard_normal(16).astype(np.float32)
    ref = torch.nn.GroupNorm(4, 16, eps=1e-6)
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(scale))
        ref.bias.copy_(torch.from_numpy(bias))
        want = ref(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    gn = vae.GroupNorm(4, 1e-6)
    got = gn.apply({"params": {"scale": scale, "bias": bias}}, x)
    np.testing.assert_allclose(got, want, atol=1e-5)
    bf16 = vae.GroupNorm(4, 1e-6, dtype=jnp.bfloat16).apply({"params": {"scale": scale, "bias": bias}}, x)
    assert bf16.dtype == jnp.bfloat16 and np.abs(np.asarray(bf16, np.float32) - want).max() < 0.05


def test_presets_shapes():
    for name, size, latent in [("sd_kl_f8", 256, (32, 32, 4)), ("tiny_f4", 64, (16, 16, 4)),
                               ("tiny_f8", 64, (8, 8, 4))]:
        cfg = vae.get_config(name)
        m = vae.AutoencoderKL(cfg)
        x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
        variables = jax.eval_shape(m.init, jax.random.key(0), x)
        mean, _ = jax.eval_shape(functools.partial(m.apply, method=m.encode), variables, x)
        assert mean.shape[1:] == latent, name
        assert cfg.image_size // cfg.downsample_factor == latent[0]
    sd = vae.get_config("sd_kl_f8")
    assert sd.block_channels == (128, 256, 512, 512) and sd.scaling_factor == 0.18215


def test_vae_loss_and_grads(reference):
    _, params = reference
    m = vae.AutoencoderKL(CFG)
    m2 = vae.AutoencoderKL(dataclasses.replace(CFG, recon_loss="l2"))
    loss_fn = functools.partial(vae.vae_loss, model=m)
    batch = {"image": _images(2)}

    @jax.jit
    def run(params, batch, rng):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, rng, 1e-6)
        _, metrics2 = vae.vae_loss(params, batch, rng, 0.0, model=m2)
        return loss, metrics, grads, m.apply(params, batch["image"], rng), metrics2

    loss, metrics, grads, (recon, mean, logvar), metrics2 = run(params, batch, jax.random.key(0))
    assert set(metrics) == {"loss", "recon", "kl", "psnr"}
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    # recon is the mean absolute error of the sampled reconstruction; beta adds KL per pixel.
    np.testing.assert_allclose(metrics["recon"], np.mean(np.abs(recon - batch["image"])), rtol=1e-5)
    kl = np.mean(0.5 * np.sum(mean ** 2 + np.exp(logvar) - 1 - logvar, axis=(1, 2, 3)))
    np.testing.assert_allclose(metrics["kl"], kl, rtol=1e-4)
    np.testing.assert_allclose(loss, metrics["recon"] + 1e-6 * kl / (32 * 32 * 3), rtol=1e-5)
    mse = np.mean((np.clip(recon, -1, 1) - batch["image"]) ** 2, axis=(1, 2, 3))
    np.testing.assert_allclose(metrics["psnr"], np.mean(10 * np.log10(4 / mse)), rtol=1e-4)
    np.testing.assert_allclose(metrics2["recon"], np.mean((recon - batch["image"]) ** 2), rtol=1e-5)


def test_latent_scaling_factor():
    z = np.random.default_rng(0).normal(0, 4.0, (4, 8, 8, 4)).astype(np.float32)
    f = vae.latent_scaling_factor(z)
    np.testing.assert_allclose(f, 1 / np.std(z), rtol=1e-5)
    assert abs(float(np.std(z * f)) - 1.0) < 1e-5


def test_sharded_matches_single_device(reference, mesh8):
    _, params = reference
    m = vae.AutoencoderKL(CFG)
    x = _images(4)
    ref = jax.jit(m.apply)(params, x)
    boxed = jax.eval_shape(m.init, jax.random.key(0), x)
    shardings = sharding.param_shardings(mesh8, boxed)
    with jax.set_mesh(mesh8), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        sharded = jax.device_put(params, shardings)
        assert any(not p.sharding.is_fully_replicated for p in jax.tree.leaves(sharded))
        out = jax.jit(m.apply)(sharded, x)
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(out)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_bad_inputs(reference):
    _, params = reference
    m = vae.AutoencoderKL(CFG)
    with pytest.raises(ValueError, match=r"expected \[B, 32, 32, 3\].*got shape \(2, 64, 64, 3\)"):
        m.apply(params, _images(2, 64), method=m.encode)
    with pytest.raises(ValueError, match=r"expected \[B, 32, 32, 3\].*got shape \(2, 32, 32, 1\)"):
        m.apply(params, np.zeros((2, 32, 32, 1), np.float32), method=m.encode)
    with pytest.raises(ValueError, match=r"expected \[B, 32, 32, 3\].*got dtype uint8"):
        m.apply(params, np.zeros((2, 32, 32, 3), np.uint8), method=m.encode)
    with pytest.raises(ValueError, match=r"VAE latents: expected \[B, 8, 8, 4\]"):
        m.apply(params, np.zeros((2, 16, 16, 4), np.float32), method=m.decode)
    with pytest.raises(ValueError, match=r"expected \[B, 32, 32, 3\]"):  # also under jit (trace-time check)
        jax.jit(functools.partial(m.apply, method=m.encode))(params, np.zeros((2, 32, 32), np.float32))


def test_any_size_when_image_size_none():
    m = vae.AutoencoderKL(vae.get_config("tiny_f4", image_size=None))
    x = jnp.zeros((1, 24, 32, 3))
    variables = jax.eval_shape(m.init, jax.random.key(0), x)
    mean, _ = jax.eval_shape(functools.partial(m.apply, method=m.encode), variables, x)
    assert mean.shape == (1, 6, 8, 4)
    with pytest.raises(ValueError, match="not a multiple of the downsampling factor 4"):
        jax.eval_shape(m.init, jax.random.key(0), jnp.zeros((1, 18, 18, 3)))


def test_validate_config():
    vae.validate_config({"preset": "tiny_f4"}, "vae")
    vae.validate_config({"preset": "sd_kl_f8", "channel_mult": [1, 2, 4, 4]}, "vae")
    for section, match in [({"preset": "nope"}, "vae.preset"),
                           ({"preset": "tiny_f4", "norm_groups": 7}, "vae.norm_groups"),
                           ({"preset": "tiny_f4", "image_size": 66}, "vae.image_size"),
                           ({"recon_loss": "l3"}, "vae.recon_loss"),
                           ({"chanel_mult": [1]}, "vae.chanel_mult"),
                           ({"dtype": "int8"}, "vae.dtype")]:
        with pytest.raises(ConfigError, match=match):
            vae.validate_config(section, "vae")
    assert vae.config_from_dict({"preset": "tiny_f4", "channel_mult": [1, 2]}).channel_mult == (1, 2)
