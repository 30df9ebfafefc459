"""KL autoencoder in the Stable-Diffusion / LDM layout (SPEC section 4), NHWC, plus its losses.

Param tree mirrors diffusers' AutoencoderKL with '.' -> '_' (`encoder/down_blocks_0/resnets_1/conv1`), so the
conversion in unifluid_jax/convert/vae.py is a name map plus OIHW <-> HWIO transposes.
The downsampling factor is 2 ** (levels - 1): every level but the last halves the resolution.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unifluid_jax.config import check, check_choice, check_positive, from_presets

RECON_LOSSES = ("l1", "l2")
ACT = ("act_batch", "act_height", "act_width", "act_channels")


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2  # per encoder level; the decoder uses num_res_blocks + 1
    latent_channels: int = 4
    mid_attention: bool = True
    norm_groups: int = 32
    norm_eps: float = 1e-6
    scaling_factor: float = 0.18215  # latents * scaling_factor have ~unit std (SD value; recompute for own VAEs)
    image_size: int | None = 256  # None: any multiple of the downsampling factor
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    recon_loss: str = "l1"  # 'l1' or 'l2' (vae_loss)
    dtype: str = "float32"
    param_dtype: str = "float32"

    @property
    def block_channels(self) -> tuple[int, ...]:
        return tuple(self.base_channels * m for m in self.channel_mult)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def latent_size(self) -> int | None:
        return None if self.image_size is None else self.image_size // self.downsample_factor


PRESETS: dict[str, dict[str, Any]] = {
    # Stable Diffusion KL-f8: 256 px -> 32x32x4.
    "sd_kl_f8": dict(),
    # CPU sizes: 64 px -> 16x16x4 and 64 px -> 8x8x4.
    "tiny_f4": dict(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, norm_groups=8, image_size=64,
                    scaling_factor=1.0),
    "tiny_f8": dict(base_channels=32, channel_mult=(1, 2, 2, 2), num_res_blocks=1, norm_groups=8, image_size=64,
                    scaling_factor=1.0),
}


def get_config(preset: str, **overrides) -> VAEConfig:
    return config_from_dict({"preset": preset, **overrides})


_FIELDS = {f.name for f in dataclasses.fields(VAEConfig)}


def config_from_dict(section) -> VAEConfig:
    """A ConfigDict / dict section: optional `preset` plus any VAEConfig field as an override."""
    return from_presets(VAEConfig, PRESETS, section, "preset", "VAE")


def validate_config(section, path: str) -> None:
    d = dict(section)
    preset = d.pop("preset", None)
    if preset is not None:
        check_choice(preset, f"{path}.preset", PRESETS)
    unknown = sorted(set(d) - _FIELDS)
    check(not unknown, f"{path}.{unknown[0] if unknown else ''}",
          f"unknown VAE field; known fields: {sorted(_FIELDS | {'preset'})}")
    cfg = config_from_dict(section)
    check_positive(dataclasses.asdict(cfg), path, "in_channels", "out_channels", "base_channels",
                   "num_res_blocks", "latent_channels", "norm_groups", "norm_eps", "scaling_factor")
    check(len(cfg.channel_mult) >= 1 and all(m > 0 for m in cfg.channel_mult), f"{path}.channel_mult",
          f"must be a non-empty tuple of positive ints, got {cfg.channel_mult!r}")
    bad = [c for c in cfg.block_channels if c % cfg.norm_groups]
    check(not bad, f"{path}.norm_groups",
          f"channels {cfg.block_channels} must all be divisible by norm_groups {cfg.norm_groups}")
    if cfg.image_size is not None:
        check(cfg.image_size > 0 and cfg.image_size % cfg.downsample_factor == 0, f"{path}.image_size",
              f"{cfg.image_size} must be a positive multiple of the downsampling factor {cfg.downsample_factor}")
    check_choice(cfg.recon_loss, f"{path}.recon_loss", RECON_LOSSES)
    for f in ("dtype", "param_dtype"):
        v = getattr(cfg, f)
        try:
            ok = jnp.issubdtype(jnp.dtype(v), jnp.floating)
        except TypeError:
            ok = False
        check(ok, f"{path}.{f}", f"must be a float dtype name like 'float32' or 'bfloat16', got {v!r}")


def _init(init, names):
    return nn.with_logical_partitioning(init, names)


def _conv(cfg, features, kernel, name, stride=1, padding=None, in_name="conv_in", out_name="conv_out"):
    """Conv with logical names; pass in_name/out_name=None for the RGB dim (3 does not split over a mesh)."""
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                   padding=kernel // 2 if padding is None else padding,
                   dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), name=name,
                   kernel_init=_init(nn.initializers.lecun_normal(), ("conv_h", "conv_w", in_name, out_name)),
                   bias_init=_init(nn.initializers.zeros, (out_name,)))


class GroupNorm(nn.Module):
    """torch's GroupNorm (two-pass statistics in float32, affine per channel) with its sums written as
    einsums: on a CPU, XLA reduces over the spatial axes ~3x slower than it runs the same sums as matrix
    products (256x256x32: 13 ms -> 4.4 ms), and GroupNorm was a quarter of the VAE decode. Params 'scale' and
    'bias' as flax's nn.GroupNorm. Letters: B batch, S positions (H*W), C channels, G groups."""
    num_groups: int
    epsilon: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        scale = self.param("scale", _init(nn.initializers.ones, ("norm",)), (c,), self.param_dtype)
        bias = self.param("bias", _init(nn.initializers.zeros, ("norm",)), (c,), self.param_dtype)
        xf = x.astype(jnp.float32).reshape(b, h * w, c)
        group = (np.arange(c)[:, None] // (c // self.num_groups) == np.arange(self.num_groups)[None])
        group = jnp.asarray(group, jnp.float32)  # [C, G]: channel c belongs to group g
        ones = jnp.ones((h * w,), jnp.float32)
        n = h * w * (c // self.num_groups)
        mean = jnp.einsum("BSC,S,CG->BG", xf, ones, group) / n
        d = xf - jnp.einsum("BG,CG->BC", mean, group)[:, None]
        var = jnp.einsum("BSC,S,CG->BG", d * d, ones, group) / n
        inv = jnp.einsum("BG,CG->BC", jax.lax.rsqrt(var + self.epsilon), group)[:, None]
        y = (d * inv).reshape(b, h, w, c) * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return y.astype(self.dtype)


def _norm(cfg, name):
    return GroupNorm(cfg.norm_groups, cfg.norm_eps, jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype), name=name)


def _constrain(x):
    return nn.with_logical_constraint(x, ACT)


class ResnetBlock(nn.Module):
    """diffusers ResnetBlock2D without time embedding: norm-silu-conv x2, 1x1 conv_shortcut if channels change."""
    cfg: VAEConfig
    features: int

    @nn.compact
    def __call__(self, x):
        h = _conv(self.cfg, self.features, 3, "conv1")(nn.silu(_norm(self.cfg, "norm1")(x)))
        h = _conv(self.cfg, self.features, 3, "conv2")(nn.silu(_norm(self.cfg, "norm2")(h)))
        if x.shape[-1] != self.features:
            x = _conv(self.cfg, self.features, 1, "conv_shortcut")(x)
        return _constrain(x + h)


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions with a residual (diffusers Attention, mid block).

    Einsum letters: B batch, T/S positions, C channels.
    """
    cfg: VAEConfig

    @nn.compact
    def __call__(self, x):
        b, hh, ww, c = x.shape
        h = _norm(self.cfg, "group_norm")(x).reshape(b, hh * ww, c)
        dense = functools.partial(
            nn.Dense, c, dtype=jnp.dtype(self.cfg.dtype), param_dtype=jnp.dtype(self.cfg.param_dtype),
            kernel_init=_init(nn.initializers.lecun_normal(), ("conv_in", "conv_out")),
            bias_init=_init(nn.initializers.zeros, ("conv_out",)))
        q, k, v = dense(name="to_q")(h), dense(name="to_k")(h), dense(name="to_v")(h)
        logits = jnp.einsum("BTC,BSC->BTS", q, k) / jnp.sqrt(c).astype(q.dtype)
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        out = dense(name="to_out_0")(jnp.einsum("BTS,BSC->BTC", probs, v))
        return _constrain(x + out.reshape(b, hh, ww, c))


class MidBlock(nn.Module):
    cfg: VAEConfig

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        x = ResnetBlock(self.cfg, c, name="resnets_0")(x)
        if self.cfg.mid_attention:
            x = AttnBlock(self.cfg, name="attentions_0")(x)
        return ResnetBlock(self.cfg, c, name="resnets_1")(x)


class Downsample(nn.Module):
    cfg: VAEConfig

    @nn.compact
    def __call__(self, x):
        # SD convention: zero-pad right/bottom by one, then a VALID 3x3 stride-2 conv.
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return _conv(self.cfg, x.shape[-1], 3, "conv", stride=2, padding="VALID")(x)


class Upsample(nn.Module):
    cfg: VAEConfig

    @nn.compact
    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # nearest x2
        return _conv(self.cfg, x.shape[-1], 3, "conv")(x)


class DownBlock(nn.Module):
    cfg: VAEConfig
    features: int
    downsample: bool

    @nn.compact
    def __call__(self, x):
        for j in range(self.cfg.num_res_blocks):
            x = ResnetBlock(self.cfg, self.features, name=f"resnets_{j}")(x)
        return Downsample(self.cfg, name="downsamplers_0")(x) if self.downsample else x


class UpBlock(nn.Module):
    cfg: VAEConfig
    features: int
    upsample: bool

    @nn.compact
    def __call__(self, x):
        for j in range(self.cfg.num_res_blocks + 1):
            x = ResnetBlock(self.cfg, self.features, name=f"resnets_{j}")(x)
        return Upsample(self.cfg, name="upsamplers_0")(x) if self.upsample else x


class Encoder(nn.Module):
    cfg: VAEConfig

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        x = _conv(c, c.block_channels[0], 3, "conv_in", in_name=None)(x)
        last = len(c.block_channels) - 1
        for i, ch in enumerate(c.block_channels):
            x = DownBlock(c, ch, i != last, name=f"down_blocks_{i}")(x)
        x = MidBlock(c, name="mid_block")(x)
        x = nn.silu(_norm(c, "conv_norm_out")(x))
        return _conv(c, 2 * c.latent_channels, 3, "conv_out")(x)


class Decoder(nn.Module):
    """Mirrors the encoder; up_blocks_0 is the lowest resolution (diffusers order)."""
    cfg: VAEConfig

    @nn.compact
    def __call__(self, z):
        c = self.cfg
        chans = c.block_channels[::-1]
        x = _conv(c, chans[0], 3, "conv_in")(z)
        x = MidBlock(c, name="mid_block")(x)
        for i, ch in enumerate(chans):
            x = UpBlock(c, ch, i != len(chans) - 1, name=f"up_blocks_{i}")(x)
        x = nn.silu(_norm(c, "conv_norm_out")(x))
        return _conv(c, c.out_channels, 3, "conv_out", out_name=None)(x)


def _check(x, size, channels, what, hint):
    """Static (trace-time) check; size None accepts any H, W."""
    shape = tuple(getattr(x, "shape", ()))
    expected = f"[B, {'H' if size is None else size}, {'W' if size is None else size}, {channels}] {hint}"
    ok = len(shape) == 4 and shape[3] == channels
    ok = ok and (size is None or shape[1:3] == (size, size))
    if not ok:
        raise ValueError(f"{what}: expected {expected}, got shape {shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{what}: expected {expected}, got dtype {x.dtype}")


class AutoencoderKL(nn.Module):
    """NHWC KL-VAE. encode(x) -> (mean, logvar); sample(mean, logvar, rng); decode(z); __call__ reconstructs."""
    cfg: VAEConfig

    def setup(self):
        c = self.cfg
        self.encoder = Encoder(c)
        self.decoder = Decoder(c)
        if c.use_quant_conv:
            self.quant_conv = _conv(c, 2 * c.latent_channels, 1, "quant_conv")
        if c.use_post_quant_conv:
            self.post_quant_conv = _conv(c, c.latent_channels, 1, "post_quant_conv")

    def _check_image(self, x):
        c = self.cfg
        _check(x, c.image_size, c.in_channels, "VAE images", "float in [-1, 1]")
        if c.image_size is None and (x.shape[1] % c.downsample_factor or x.shape[2] % c.downsample_factor):
            raise ValueError(f"VAE images: size {x.shape[1]}x{x.shape[2]} is not a multiple of the "
                             f"downsampling factor {c.downsample_factor}")

    def encode(self, x):
        """x [B,S,S,in] in [-1,1] -> (mean, logvar) [B,S/f,S/f,latent], logvar clamped to [-30, 20]."""
        self._check_image(x)
        c = self.cfg
        h = self.encoder(_constrain(x.astype(jnp.dtype(c.dtype))))
        if c.use_quant_conv:
            h = self.quant_conv(h)
        mean, logvar = jnp.split(h, 2, axis=-1)
        return _constrain(mean), _constrain(jnp.clip(logvar, -30.0, 20.0))

    def sample(self, mean, logvar, rng):
        """Reparameterised posterior sample (no params used)."""
        return mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)

    def decode(self, z):
        """z [B,s,s,latent] (unscaled) -> images [B,s*f,s*f,out], roughly in [-1,1]."""
        c = self.cfg
        _check(z, c.latent_size, c.latent_channels, "VAE latents", "float (unscaled)")
        z = _constrain(z.astype(jnp.dtype(c.dtype)))
        if c.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return _constrain(self.decoder(z))

    def encode_latents(self, x, rng=None):
        """Scaled latents for the generator: (posterior sample, or mean if rng is None) * scaling_factor."""
        mean, logvar = self.encode(x)
        z = mean if rng is None else self.sample(mean, logvar, rng)
        return z * self.cfg.scaling_factor

    def decode_latents(self, z_scaled):
        return self.decode(z_scaled / self.cfg.scaling_factor)

    def __call__(self, x, rng=None):
        """Reconstruction for training: (recon, mean, logvar); samples the posterior when rng is given."""
        mean, logvar = self.encode(x)
        z = mean if rng is None else self.sample(mean, logvar, rng)
        return self.decode(z), mean, logvar


def kl_divergence(mean, logvar):
    """KL(N(mean, exp(logvar)) || N(0, 1)) summed over latent dims -> [B]."""
    return 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))


def vae_loss(params, batch, rng, beta=1e-6, *, model: AutoencoderKL, image_key: str = "image"):
    """(loss, metrics) for a generic trainer; bind the model with functools.partial(vae_loss, model=m).

    loss = (sum_pixels recon + beta * sum_latent KL) / pixels, averaged over the batch, i.e. LDM's
    `nll + kl_weight * kl` divided by the pixel count, so beta means the same as LDM's kl_weight (1e-6).
    Metrics: recon (mean per-pixel L1/L2), kl (per image), psnr (dB, images in [-1,1], recon clipped), loss.
    """
    x = batch[image_key]
    recon, mean, logvar = model.apply(params, x, rng)
    x, recon = x.astype(jnp.float32), recon.astype(jnp.float32)
    err = recon - x
    rec = jnp.abs(err) if model.cfg.recon_loss == "l1" else jnp.square(err)
    recon_mean = jnp.mean(rec)
    kl = jnp.mean(kl_divergence(mean.astype(jnp.float32), logvar.astype(jnp.float32)))
    pixels = x.shape[1] * x.shape[2] * x.shape[3]
    loss = recon_mean + beta * kl / pixels
    mse = jnp.mean(jnp.square(jnp.clip(recon, -1.0, 1.0) - x), axis=(1, 2, 3))
    psnr = jnp.mean(10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-10)))  # peak-to-peak range is 2
    return loss, {"loss": loss, "recon": recon_mean, "kl": kl, "psnr": psnr}


def latent_scaling_factor(latents) -> jax.Array:
    """1 / std of a sample of (unscaled) latents: the factor that gives the generator unit-std tokens."""
    return 1.0 / jnp.std(jnp.asarray(latents, jnp.float32))
