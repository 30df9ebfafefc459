"""iDDPM Gaussian diffusion as MAR's DiffLoss uses it (SPEC section 5).

Schedule constants are built in numpy float64 exactly as MAR/DiT/iDDPM build them (Python `math.cos` for
the cosine schedule, the same respacing loop) and cast to float32 when looked up, which is what MAR's
`_extract_into_tensor` does. The per-token math (q_sample, posterior, p(x_{t-1}|x_t), the variational-bound
term in bits) works on [N, C] float32 arrays with a per-token integer index t into the (respaced) schedule.

Only what MAR uses is here: epsilon prediction, learned-range variance (or fixed-large without learned
sigma), MSE + vb loss, ancestral sampling without x0 clipping.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np


# ----------------------------------------------------------------------------------------------------------
# Schedules and respacing (numpy float64).


def betas_for_alpha_bar(num_steps: int, alpha_bar, max_beta: float = 0.999) -> np.ndarray:
    """beta_i = min(1 - abar((i+1)/T) / abar(i/T), max_beta), in Python float64 like iDDPM."""
    betas = []
    for i in range(num_steps):
        t1, t2 = i / num_steps, (i + 1) / num_steps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.array(betas, dtype=np.float64)


def cosine_alpha_bar(s: float) -> float:
    return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2


def named_beta_schedule(name: str, num_steps: int) -> np.ndarray:
    """iDDPM's named schedules: 'cosine' (MAR's choice) or 'linear' (Ho et al., scaled to num_steps)."""
    if name == "cosine":
        return betas_for_alpha_bar(num_steps, cosine_alpha_bar)
    if name == "linear":
        scale = 1000 / num_steps
        return np.linspace(scale * 0.0001, scale * 0.02, num_steps, dtype=np.float64)
    raise ValueError(f"unknown beta schedule {name!r}; choose 'cosine' or 'linear'")


def space_timesteps(num_timesteps: int, section_counts) -> list[int]:
    """The original steps kept when respacing, sorted (iDDPM/DiT/MAR `space_timesteps`).

    `section_counts`: an int, a list of ints, or a string "n1,n2,..." / "ddimN". Each section of the original
    process is strided by the float (size - 1) / (count - 1), accumulated step by step and rounded with
    Python's round() (half to even); for some counts this differs from round(k * stride).
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(f"cannot create exactly {desired} steps with an integer stride")
        section_counts = [int(x) for x in section_counts.split(",")]
    elif isinstance(section_counts, int):
        section_counts = [section_counts]
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, steps = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide a section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            steps.append(start + round(cur))
            cur += stride
        start += size
    return sorted(set(steps))


def _lookup(table: np.ndarray, t) -> jnp.ndarray:
    """table[t] as float32 with a trailing axis to broadcast over channels (MAR casts after indexing)."""
    return jnp.asarray(table.astype(np.float32))[t][..., None]


class GaussianDiffusion:
    """One (possibly respaced) diffusion process; t below is always the index into THIS process.

    `timestep_map[t]` is the original (0..T-1) step the network is conditioned on.
    """

    def __init__(self, betas: np.ndarray, timestep_map=None, learn_sigma: bool = True):
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.shape[0] < 2 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError("betas must be a 1-D array of >= 2 values in (0, 1]")
        self.num_timesteps = n = int(betas.shape[0])
        self.timestep_map = np.asarray(range(n) if timestep_map is None else timestep_map, np.int32)
        self.learn_sigma = learn_sigma
        self.betas = betas
        self.log_betas = np.log(betas)
        alphas = 1.0 - betas
        self.alphas_cumprod = ac = np.cumprod(alphas, axis=0)
        self.alphas_cumprod_prev = ac_prev = np.append(1.0, ac[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(ac)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - ac)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / ac)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / ac - 1)
        self.posterior_variance = pv = betas * (1.0 - ac_prev) / (1.0 - ac)
        # The posterior variance is 0 at t = 0: its log is clipped to the t = 1 value.
        self.posterior_log_variance_clipped = np.log(np.append(pv[1], pv[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(ac_prev) / (1.0 - ac)
        self.posterior_mean_coef2 = (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac)
        # Fixed-large variance (used only without learned sigma): beta_t, with the t = 0 value borrowed.
        self.fixed_large_variance = np.append(pv[1], betas[1:])

    # -- forward process ---------------------------------------------------------------------------------

    def q_sample(self, x_start, t, noise):
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise."""
        return (_lookup(self.sqrt_alphas_cumprod, t) * x_start
                + _lookup(self.sqrt_one_minus_alphas_cumprod, t) * noise)

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = (_lookup(self.posterior_mean_coef1, t) * x_start
                + _lookup(self.posterior_mean_coef2, t) * x_t)
        var = _lookup(self.posterior_variance, t) + jnp.zeros_like(x_t)
        log_var = _lookup(self.posterior_log_variance_clipped, t) + jnp.zeros_like(x_t)
        return mean, var, log_var

    # -- reverse process ---------------------------------------------------------------------------------

    def predict_xstart_from_eps(self, x_t, t, eps):
        return (_lookup(self.sqrt_recip_alphas_cumprod, t) * x_t
                - _lookup(self.sqrt_recipm1_alphas_cumprod, t) * eps)

    def p_mean_variance(self, model_output, x_t, t, clip_x0=None):
        """p(x_{t-1} | x_t) from the head output [N, 2C] (eps, v) or [N, C] (eps) without learned sigma.

        Learned range: v in [-1, 1] interpolates the log-variance between the clipped posterior variance
        (v = -1) and beta_t (v = +1). No clipping of the x_0 prediction by default (MAR samples with
        clip_denoised=False); `clip_x0` = c clips it to [-c, c]. Why that option: at t = 999 the cosine
        schedule's alpha_bar is ~2e-9, so an eps error of 1e-2 becomes an x_0 error of ~1e3 that an
        under-trained head never recovers from (unit-std latents: c ~ 5 is harmless for a trained one).
        """
        c = x_t.shape[-1]
        if self.learn_sigma:
            eps, v = model_output[..., :c], model_output[..., c:]
            min_log = _lookup(self.posterior_log_variance_clipped, t)
            max_log = _lookup(self.log_betas, t)
            frac = (v + 1) / 2
            log_var = frac * max_log + (1 - frac) * min_log
            var = jnp.exp(log_var)
        else:
            eps = model_output
            var = _lookup(self.fixed_large_variance, t) + jnp.zeros_like(x_t)
            log_var = _lookup(np.log(self.fixed_large_variance), t) + jnp.zeros_like(x_t)
        pred_xstart = self.predict_xstart_from_eps(x_t, t, eps)
        if clip_x0 is not None:
            pred_xstart = jnp.clip(pred_xstart, -clip_x0, clip_x0)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
        return {"mean": mean, "variance": var, "log_variance": log_var, "pred_xstart": pred_xstart}

    def p_sample(self, model_output, x_t, t, noise, temperature=1.0, clip_x0=None):
        """One ancestral step; temperature scales only the injected noise, none at t == 0."""
        out = self.p_mean_variance(model_output, x_t, t, clip_x0)
        nonzero = (t != 0).astype(x_t.dtype)[..., None]
        return out["mean"] + nonzero * jnp.exp(0.5 * out["log_variance"]) * noise * temperature

    # -- loss --------------------------------------------------------------------------------------------

    def vb_terms_bpd(self, model_output, x_start, x_t, t):
        """Per-token variational-bound term in bits: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) averaged
        over channels, or at t == 0 the discretized Gaussian decoder NLL. Returns [N]."""
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(model_output, x_t, t)
        kl = normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])
        kl = kl.mean(axis=-1) / np.log(2.0)
        nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"])
        nll = nll.mean(axis=-1) / np.log(2.0)
        return jnp.where(t == 0, nll, kl)

    def training_losses(self, model_output, x_start, x_t, t, noise):
        """MAR's MSE loss type: {'mse', 'vb', 'loss'} per token ([N]).

        `model_output` is the head applied to (x_t, timestep_map[t]); the vb term sees the eps half under
        stop-gradient so it only trains the variance."""
        c = x_start.shape[-1]
        eps = model_output[..., :c]
        terms = {"mse": jnp.mean((noise - eps) ** 2, axis=-1)}
        if self.learn_sigma:
            frozen = jnp.concatenate(
                [jax.lax.stop_gradient(eps), model_output[..., c:]], axis=-1)
            terms["vb"] = self.vb_terms_bpd(frozen, x_start, x_t, t)
            terms["loss"] = terms["mse"] + terms["vb"]
        else:
            terms["vb"] = jnp.zeros_like(terms["mse"])
            terms["loss"] = terms["mse"]
        return terms


def create_diffusion(timestep_respacing=None, noise_schedule: str = "cosine", diffusion_steps: int = 1000,
                     learn_sigma: bool = True) -> GaussianDiffusion:
    """MAR's `create_diffusion`: always a respacing of the `diffusion_steps` base process (cached).

    `timestep_respacing` None / "" keeps all steps (MAR's training diffusion: its betas are rebuilt from
    abar ratios, ~1e-16 away from the base betas); an int, "n" or a list of section counts gives MAR's
    sampling diffusion.
    """
    if timestep_respacing is None or timestep_respacing == "":
        timestep_respacing = diffusion_steps
    if isinstance(timestep_respacing, (list, tuple)):
        timestep_respacing = ",".join(str(int(c)) for c in timestep_respacing)
    return _create_diffusion(timestep_respacing, noise_schedule, diffusion_steps, learn_sigma)


@functools.lru_cache(maxsize=32)
def _create_diffusion(timestep_respacing, noise_schedule, diffusion_steps, learn_sigma):
    use = set(space_timesteps(diffusion_steps, timestep_respacing))
    base = GaussianDiffusion(named_beta_schedule(noise_schedule, diffusion_steps), learn_sigma=learn_sigma)
    last, new_betas, timestep_map = 1.0, [], []
    for i, ac in enumerate(base.alphas_cumprod):
        if i in use:
            new_betas.append(1 - ac / last)
            last = ac
            timestep_map.append(i)
    return GaussianDiffusion(np.array(new_betas), timestep_map, learn_sigma=learn_sigma)


# ----------------------------------------------------------------------------------------------------------
# Gaussian helpers (iDDPM diffusion_utils).


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                  + ((mean1 - mean2) ** 2) * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x):
    """The tanh approximation of the standard normal CDF that iDDPM uses."""
    return 0.5 * (1.0 + jnp.tanh(np.sqrt(2.0 / np.pi).astype(np.float32) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, *, means, log_scales):
    """log P(x) in nats for a Gaussian discretized to 256 bins on [-1, 1] (edges open-ended)."""
    centered = x - means
    inv_stdv = jnp.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(x < -0.999, log_cdf_plus,
                     jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))
