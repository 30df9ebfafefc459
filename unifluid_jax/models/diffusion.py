"""Per-token diffusion head of UniFluid: MAR's DiffLoss (SPEC section 5).

`DiffusionHead` is MAR's SimpleMLPAdaLN (an MLP of adaLN residual blocks conditioned on the transformer
output z and the timestep), `diffusion_loss` its training loss (MSE on eps + the learned-variance vb term,
`batch_mul` noise draws per token, averaged over predicted tokens), `sample` its ancestral DDPM sampler
with classifier-free guidance and temperature, `cfg_schedule` MAR's guidance schedule over the AR steps.
Schedule math lives in gaussian_diffusion.py.

Axis letters: N tokens (flattened batch x length), C token channels, D condition width, W head width.
A head apply function has the signature `head_apply_fn(params, x [N, C], t [N] int, z [N, D]) -> [N, 2C]`
(t is the ORIGINAL 0..T-1 step), e.g. `apply_fn(head)` below.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unifluid_jax.config import check, check_choice, check_positive
from unifluid_jax.models.gaussian_diffusion import GaussianDiffusion, create_diffusion

# ----------------------------------------------------------------------------------------------------------
# Config.

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_SCHEDULES = ("cosine", "linear")


@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
    depth: int = 3                  # adaLN residual blocks (MAR base: 3)
    width: int = 1024               # W; UniFluid default min(1024, D), resolved by config_from_dict
    in_channels: int = 16           # C: token channels (2x2 patches of a 4-channel latent)
    freq_dim: int = 256             # sinusoidal timestep embedding size
    num_train_steps: int = 1000     # T
    num_sampling_steps: int = 100   # respaced steps used by the sampler
    batch_mul: int = 4              # noise draws per token in the loss
    schedule: str = "cosine"
    learn_sigma: bool = True        # head predicts the variance interpolation v (MAR: True)
    remat: bool = False             # rematerialise each residual block in the backward pass
    dtype: str = "float32"          # compute dtype of the head (params stay float32)
    sample_clip_x0: float | None = None  # sampler: clip predicted x_0 to [-c, c] (None = MAR, no clipping)

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    def train_diffusion(self) -> GaussianDiffusion:
        """MAR's training diffusion: a respacing over all T steps."""
        return create_diffusion(None, self.schedule, self.num_train_steps, self.learn_sigma)

    def sampling_diffusion(self, num_steps: int | None = None) -> GaussianDiffusion:
        return create_diffusion(num_steps or self.num_sampling_steps, self.schedule, self.num_train_steps,
                                self.learn_sigma)


_FIELDS = tuple(f.name for f in dataclasses.fields(DiffusionConfig))


def _as_dict(section) -> dict:
    return dict(section.to_dict() if hasattr(section, "to_dict") else section)


def config_from_dict(section: Mapping[str, Any], cond_dim: int | None = None) -> DiffusionConfig:
    """DiffusionConfig from a config section; `width` None/absent means min(1024, cond_dim)."""
    d = {k: v for k, v in _as_dict(section).items() if k in _FIELDS}
    if d.get("width") is None:
        if cond_dim is None:
            d.pop("width", None)
        else:
            d["width"] = min(1024, int(cond_dim))
    return DiffusionConfig(**d)


def validate_config(section: Mapping[str, Any], path: str = "model.diffusion") -> None:
    """Raises ConfigError for unknown fields or values the head, loss or sampler cannot use."""
    d = _as_dict(section)
    for k in d:
        check(k in _FIELDS, f"{path}.{k}", f"unknown field; known fields: {', '.join(_FIELDS)}")
    full = dataclasses.asdict(DiffusionConfig())
    full.update({k: v for k, v in d.items() if not (k == "width" and v is None)})  # None: min(1024, D)
    for k in ("depth", "width", "in_channels", "freq_dim", "batch_mul", "num_train_steps", "num_sampling_steps"):
        v = full[k]
        check(isinstance(v, int) and not isinstance(v, bool), f"{path}.{k}", f"must be an int, got {v!r}")
    check_positive(full, path, "depth", "width", "in_channels", "freq_dim", "batch_mul")
    check(full["freq_dim"] % 2 == 0, f"{path}.freq_dim", f"must be even, got {full['freq_dim']}")
    check(full["num_train_steps"] >= 2, f"{path}.num_train_steps",
          f"must be >= 2, got {full['num_train_steps']}")
    check(2 <= full["num_sampling_steps"] <= full["num_train_steps"], f"{path}.num_sampling_steps",
          f"must be in [2, num_train_steps={full['num_train_steps']}], got {full['num_sampling_steps']}")
    check_choice(full["schedule"], f"{path}.schedule", _SCHEDULES)
    check_choice(full["dtype"], f"{path}.dtype", _DTYPES)
    clip = full.get("sample_clip_x0")
    check(clip is None or clip > 0, f"{path}.sample_clip_x0", f"must be None (no clipping) or > 0, got {clip!r}")
    for k in ("learn_sigma", "remat"):
        check(isinstance(full[k], bool), f"{path}.{k}", f"must be True or False, got {full[k]!r}")


# ----------------------------------------------------------------------------------------------------------
# Head (MAR SimpleMLPAdaLN). Submodule names follow MAR's state dict (time_embed.mlp.0 -> time_embed/mlp_0).

_xavier = nn.initializers.xavier_uniform()
_zeros = nn.initializers.zeros_init()


def _dense(features: int, names: tuple, dtype, name: str | None = None, kernel_init=_xavier) -> nn.Dense:
    """Linear with zero bias (MAR's _basic_init) and logical axis names (in, out) on the kernel."""
    return nn.Dense(features, dtype=dtype, name=name,
                    kernel_init=nn.with_logical_partitioning(kernel_init, names),
                    bias_init=nn.with_logical_partitioning(_zeros, names[-1:]))


def _constrain(x, *names):
    return nn.with_logical_constraint(x, names)


def _modulate(x, shift, scale):
    return x * (1 + scale) + shift


def timestep_embedding(t, dim: int, max_period: float = 10000.0):
    """[cos(t f), sin(t f)] with f_i = exp(-ln(max_period) i / (dim/2)), float32 like MAR. t: [N] -> [N, dim].

    The exponent is formed in float32 as MAR does and exponentiated with correct rounding (a numpy constant):
    torch's float32 exp agrees with that to the last bit on 126 of 128 entries, XLA's on fewer; one ulp of
    f times t ~ 1e3 would otherwise shift the phase by ~6e-5.
    """
    half = dim // 2
    expo = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32) / np.float32(half)
    freqs = jnp.asarray(np.exp(expo.astype(np.float64)).astype(np.float32))
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class TimestepEmbedder(nn.Module):
    width: int
    freq_dim: int = 256
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, t):
        init = nn.initializers.normal(0.02)
        h = timestep_embedding(t, self.freq_dim)
        h = _dense(self.width, (None, "mlp"), self.dtype, "mlp_0", init)(h)
        h = _constrain(nn.silu(h), "act_batch", "act_mlp")
        return _dense(self.width, ("mlp", "embed"), self.dtype, "mlp_2", init)(h)


# The blocks are split into `modulation(y)` (the adaLN Linear(SiLU(y)): depends only on the condition) and
# `__call__(x, mod)`, so the sampler can compute every step's modulations before its sequential loop.


class ResBlock(nn.Module):
    """x + gate * MLP(LN(x) * (1 + scale) + shift), (shift, scale, gate) = Linear(SiLU(y))."""
    width: int
    dtype: Any = jnp.float32

    def setup(self):
        w, dt = self.width, self.dtype
        self.adaLN_modulation = _dense(3 * w, ("embed", None), dt, kernel_init=_zeros)
        self.in_ln = nn.LayerNorm(epsilon=1e-6, dtype=dt, use_fast_variance=False,
                                  scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
                                  bias_init=nn.with_logical_partitioning(_zeros, ("norm",)))
        self.mlp_0 = _dense(w, ("embed", "mlp"), dt)
        self.mlp_2 = _dense(w, ("mlp", "embed"), dt)

    def modulation(self, y):
        return self.adaLN_modulation(nn.silu(y))

    def from_condition(self, x, y):
        """The whole block from the condition y (training; the unit `remat` rematerialises, modulation included)."""
        return self(x, self.modulation(y))

    def __call__(self, x, mod):
        shift, scale, gate = jnp.split(mod, 3, axis=-1)
        h = self.mlp_0(_modulate(self.in_ln(x), shift, scale))
        h = self.mlp_2(_constrain(nn.silu(h), "act_batch", "act_mlp"))
        return _constrain(x + gate * h, "act_batch", "act_embed")


class FinalLayer(nn.Module):
    width: int
    out_channels: int
    dtype: Any = jnp.float32

    def setup(self):
        dt = self.dtype
        self.adaLN_modulation = _dense(2 * self.width, ("embed", None), dt, kernel_init=_zeros)
        self.norm_final = nn.LayerNorm(epsilon=1e-6, use_scale=False, use_bias=False, dtype=dt,
                                       use_fast_variance=False)
        self.linear = _dense(self.out_channels, ("embed", None), dt, kernel_init=_zeros)

    def modulation(self, y):
        return self.adaLN_modulation(nn.silu(y))

    def __call__(self, x, mod):
        shift, scale = jnp.split(mod, 2, axis=-1)
        return self.linear(_modulate(self.norm_final(x), shift, scale))


class DiffusionHead(nn.Module):
    """x [N, C], t [N] (original step index), z [N, D] -> [N, 2C] float32: eps, then the variance
    interpolation v (~[-1, 1]); [N, C] (eps only) without learn_sigma.

    Output is exactly zero at init (zero-initialised adaLN modulations and final linear, like MAR).
    __call__ = denoise(x, modulations(time_embed(t) + cond_embed(z))) (with remat, each block recomputes its
    modulation in the backward pass); `sampler_fns` uses the pieces."""
    config: DiffusionConfig

    def setup(self):
        cfg = self.config
        dt = _DTYPES[cfg.dtype]
        self.input_proj = _dense(cfg.width, (None, "embed"), dt)
        self.time_embed = TimestepEmbedder(cfg.width, cfg.freq_dim, dt)
        self.cond_embed = _dense(cfg.width, ("embed", None), dt)
        block = nn.remat(ResBlock, methods=["from_condition"]) if cfg.remat else ResBlock
        self.res_blocks = [block(cfg.width, dt) for _ in range(cfg.depth)]
        self.final_layer = FinalLayer(cfg.width, cfg.out_channels, dt)

    def embed_time(self, t):
        return self.time_embed(t)

    def embed_cond(self, z):
        return self.cond_embed(_constrain(z, "act_batch", "act_embed"))

    def modulations(self, y) -> tuple:
        """y [..., W] (time + condition embedding) -> one adaLN modulation per block, then the final layer's."""
        return tuple(m.modulation(y) for m in (*self.res_blocks, self.final_layer))

    def denoise(self, x, mods):
        h = self.input_proj(_constrain(x, "act_batch", "act_channels"))
        for block, mod in zip(self.res_blocks, mods):
            h = block(h, mod)
        out = self.final_layer(h, mods[-1])
        return _constrain(out.astype(jnp.float32), "act_batch", "act_channels")

    def __call__(self, x, t, z):
        y = _constrain(self.embed_time(t) + self.embed_cond(z), "act_batch", "act_embed")
        h = self.input_proj(_constrain(x, "act_batch", "act_channels"))
        for block in self.res_blocks:
            h = block.from_condition(h, y)
        out = self.final_layer(h, self.final_layer.modulation(y))
        return _constrain(out.astype(jnp.float32), "act_batch", "act_channels")


def apply_fn(head: DiffusionHead) -> Callable:
    """`head_apply_fn(params, x, t, z)` for the loss and sampler; params is the head's 'params' tree."""
    return lambda params, x, t, z: head.apply({"params": params}, x, t, z)


class SamplerFns(NamedTuple):
    """A head split for the sampler's sequential loop (see `sample`):
    prepare(params, t [S] original steps in loop order, z [N, D]) -> per-step inputs, a pytree with leading S;
    denoise(params, x [N, C], inputs of one step) -> [N, 2C] (the head output at that step)."""
    prepare: Callable
    denoise: Callable


def sampler_fns(head: DiffusionHead, max_precompute_bytes: int = 256 << 20) -> SamplerFns:
    """The fast split of `head`: the timestep MLP runs once for all S steps, the condition projection once,
    and every step's adaLN modulations are one batched matmul before the loop (the loop keeps only the
    x-dependent MLP). If those modulations would exceed `max_precompute_bytes` ([S, N, (3 depth + 2) W]
    floats), only the two embeddings are precomputed and the modulations are formed inside the loop."""
    cfg = head.config
    call = lambda params, *a, method: head.apply({"params": params}, *a, method=method)  # noqa: E731

    def prepare(params, t, z):
        y = (call(params, t, method=DiffusionHead.embed_time)[:, None]
             + call(params, z, method=DiffusionHead.embed_cond)[None])  # [S, N, W]
        mod_bytes = y.size * (3 * cfg.depth + 2) * jnp.dtype(_DTYPES[cfg.dtype]).itemsize
        return call(params, y, method=DiffusionHead.modulations) if mod_bytes <= max_precompute_bytes else y

    def denoise(params, x, inputs):
        mods = inputs if isinstance(inputs, tuple) else call(params, inputs, method=DiffusionHead.modulations)
        return call(params, x, mods, method=DiffusionHead.denoise)
    return SamplerFns(prepare, denoise)


def _plain_sampler_fns(head_apply_fn: Callable) -> SamplerFns:
    """Any `head_apply_fn(params, x, t, z)` as SamplerFns (the whole head runs at every step)."""
    def prepare(params, t, z):
        return t, jnp.broadcast_to(z, (t.shape[0],) + z.shape)

    def denoise(params, x, inputs):
        t, z = inputs
        return head_apply_fn(params, x, jnp.full((x.shape[0],), t), z)
    return SamplerFns(prepare, denoise)


# ----------------------------------------------------------------------------------------------------------
# Training loss.


def diffusion_loss_terms(head_apply_fn, params, z, target, t, noise, diffusion: GaussianDiffusion):
    """Per-token {'mse', 'vb', 'loss'} ([N]) for explicit respaced indices t [N] and noise [N, C]."""
    target = target.astype(jnp.float32)
    x_t = diffusion.q_sample(target, t, noise)
    out = head_apply_fn(params, x_t, jnp.asarray(diffusion.timestep_map)[t], z).astype(jnp.float32)
    return diffusion.training_losses(out, target, x_t, t, noise)


def sample_t_noise(rng, num_tokens: int, channels: int, num_timesteps: int):
    """The (t ~ U{0..T-1} [N], noise [N, C]) `diffusion_loss` draws from `rng` (after tiling)."""
    k_t, k_noise = jax.random.split(rng)
    return (jax.random.randint(k_t, (num_tokens,), 0, num_timesteps),
            jax.random.normal(k_noise, (num_tokens, channels), jnp.float32))


def diffusion_loss(head_apply_fn, params, z, target, mask, rng, batch_mul: int = 4, *,
                   diffusion: GaussianDiffusion | None = None):
    """MAR's DiffLoss: z [N, D], target [N, C], mask [N] (1 = predicted token) -> (loss, metrics).

    Each (z, target, mask) is tiled `batch_mul` times (like MAR's `.repeat`) with independent t ~ U{0..T-1}
    and noise; the per-token MSE + vb loss is averaged over the masked tokens. Gradients reach z.
    `diffusion` defaults to MAR's cosine training diffusion over 1000 steps.
    """
    if diffusion is None:
        diffusion = create_diffusion(None)
    z = jnp.tile(z, (batch_mul, 1))
    target = jnp.tile(target, (batch_mul, 1))
    mask = jnp.tile(mask.astype(jnp.float32), (batch_mul,))
    t, noise = sample_t_noise(rng, target.shape[0], target.shape[1], diffusion.num_timesteps)
    terms = diffusion_loss_terms(head_apply_fn, params, z, target, t, noise, diffusion)
    denom = jnp.maximum(mask.sum(), 1.0)  # MAR divides by mask.sum() (NaN for an all-zero mask)
    metrics = {k: (v * mask).sum() / denom for k, v in terms.items()}
    return metrics["loss"], metrics


# ----------------------------------------------------------------------------------------------------------
# Sampling.


def cfg_schedule(step_k, num_tokens: int, cfg, kind: str = "linear", num_remaining=None):
    """Guidance scale for AR step k (0-based) of `num_tokens` (MAR's sample_tokens, after Muse).

    'linear': 1 + (cfg - 1) * (L - m_k) / L with m_k = tokens still to generate after step k, clamped to
    >= 1 (one token per step unless `num_remaining` gives m_k), so full cfg is never reached.
    'constant': cfg.
    """
    if kind == "constant":
        return jnp.asarray(cfg, jnp.float32)
    if kind != "linear":
        raise ValueError(f"unknown cfg schedule {kind!r}; choose 'linear' or 'constant'")
    remaining = num_tokens - (step_k + 1) if num_remaining is None else num_remaining
    remaining = jnp.maximum(jnp.asarray(remaining, jnp.float32), 1.0)
    return 1.0 + (jnp.asarray(cfg, jnp.float32) - 1.0) * (num_tokens - remaining) / num_tokens


def sample(head, params, z_cond, rng, *, num_steps: int = 100, temperature=1.0, cfg_scale=1.0,
           z_uncond=None, noise=None, in_channels: int = 16, schedule: str = "cosine",
           num_train_steps: int = 1000, learn_sigma: bool = True, clip_x0: float | None = None):
    """MAR's p_sample_loop for one token per row: z_cond [B, D] -> x_0 [B, C] (float32).

    Ancestral DDPM over `num_steps` respaced steps, learned variance, no x0 clipping; `temperature` scales
    only the injected noise; no noise at the last step. With `z_uncond` [B, D], every step runs the head on
    the [2B] batch (cond; uncond) from the same x and uses eps_u + cfg_scale * (eps_c - eps_u) with the
    conditional variance (MAR's forward_with_cfg; its shared initial noise = one chain). `noise` [B, C]
    optionally fixes x_T. Jittable; cfg_scale and temperature may be traced.

    `head`: `sampler_fns(DiffusionHead)` (fast: the x-independent part runs before the loop) or any
    `head_apply_fn(params, x, t, z)` (run whole at every step).
    """
    fns = head if isinstance(head, SamplerFns) else _plain_sampler_fns(head)
    diffusion = create_diffusion(num_steps, schedule, num_train_steps, learn_sigma)
    b = z_cond.shape[0]
    c = noise.shape[-1] if noise is not None else in_channels
    x, step_noise = sampling_noise(rng, diffusion.num_timesteps, b, c)
    if noise is not None:
        x = noise.astype(jnp.float32)
    guided = z_uncond is not None
    z = jnp.concatenate([z_cond, z_uncond], axis=0) if guided else z_cond
    js = jnp.arange(diffusion.num_timesteps - 1, -1, -1, dtype=jnp.int32)  # loop order
    per_step = fns.prepare(params, jnp.asarray(diffusion.timestep_map)[js], z)

    def step(x, inputs):
        j, eps_noise, head_in = inputs
        if guided:
            out = fns.denoise(params, jnp.concatenate([x, x], 0), head_in).astype(jnp.float32)
            eps_c, eps_u = out[:b, :c], out[b:, :c]
            out = jnp.concatenate([eps_u + cfg_scale * (eps_c - eps_u), out[:b, c:]], axis=-1)
        else:
            out = fns.denoise(params, x, head_in).astype(jnp.float32)
        return diffusion.p_sample(out, x, j, eps_noise, temperature, clip_x0), None

    x, _ = jax.lax.scan(step, x, (js, step_noise, per_step))
    return x


def sampling_noise(rng, num_steps: int, batch: int, channels: int):
    """The (x_T, per-step noise [num_steps, B, C]) `sample` draws from `rng` (step noise indexed by loop
    position, i.e. the first row is used at respaced step num_steps - 1). For tests and debugging."""
    k_init, k_steps = jax.random.split(rng)
    return (jax.random.normal(k_init, (batch, channels), jnp.float32),
            jax.random.normal(k_steps, (num_steps, batch, channels), jnp.float32))

