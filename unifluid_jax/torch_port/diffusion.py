"""PyTorch port of the per-token diffusion head and its sampler (MAR's SimpleMLPAdaLN + iDDPM p_sample).

Names follow MAR's state dict (the export's `head.*` tensors). The schedule is built in float64 numpy exactly
like MAR / iDDPM (`math.cos`, the float-stride respacing with Python round) and looked up as float32.
Axis letters: N tokens, C token channels, D condition width, W head width.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn


# --- head --------------------------------------------------------------------------------------------------

def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[cos(t f), sin(t f)], f_i = exp(-ln(max_period) i / (dim/2)); the exponent formed in float32 (MAR) and
    exponentiated with correct rounding (float64), so phases at t ~ 1e3 do not depend on the libm."""
    half = dim // 2
    expo = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32) / np.float32(half)
    freqs = torch.from_numpy(np.exp(expo.astype(np.float64)).astype(np.float32)).to(t.device)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, width: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t):
        return self.mlp(timestep_embedding(t, self.freq_dim))


def _modulate(x, shift, scale):
    return x * (1 + scale) + shift


class ResBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x, y):
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(_modulate(self.in_ln(x), shift, scale))


class FinalLayer(nn.Module):
    def __init__(self, width: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x, y):
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(_modulate(self.norm_final(x), shift, scale))


class DiffusionHead(nn.Module):
    """x [N, C], t [N] (original step index 0..T-1), z [N, D] -> [N, 2C]: eps, then the variance fraction v."""

    def __init__(self, in_channels: int, width: int, cond_dim: int, depth: int, freq_dim: int = 256,
                 learn_sigma: bool = True):
        super().__init__()
        self.input_proj = nn.Linear(in_channels, width)
        self.time_embed = TimestepEmbedder(width, freq_dim)
        self.cond_embed = nn.Linear(cond_dim, width)
        self.res_blocks = nn.ModuleList([ResBlock(width) for _ in range(depth)])
        self.final_layer = FinalLayer(width, 2 * in_channels if learn_sigma else in_channels)

    def forward(self, x, t, z):
        y = self.time_embed(t) + self.cond_embed(z)
        h = self.input_proj(x)
        for block in self.res_blocks:
            h = block(h, y)
        return self.final_layer(h, y)


# --- schedule (numpy float64, as MAR builds it) -------------------------------------------------------------

def _cosine_abar(s):
    return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2


def base_betas(schedule: str, num_steps: int) -> np.ndarray:
    if schedule == "cosine":
        return np.array([min(1 - _cosine_abar((i + 1) / num_steps) / _cosine_abar(i / num_steps), 0.999)
                         for i in range(num_steps)], np.float64)
    if schedule == "linear":
        scale = 1000 / num_steps
        return np.linspace(scale * 0.0001, scale * 0.02, num_steps, dtype=np.float64)
    raise ValueError(f"unknown schedule {schedule!r}")


def kept_steps(num_train_steps: int, count: int) -> list[int]:
    """MAR's space_timesteps for one section: a float stride accumulated and Python-round()ed."""
    stride = 1 if count <= 1 else (num_train_steps - 1) / (count - 1)
    cur, out = 0.0, []
    for _ in range(count):
        out.append(round(cur))
        cur += stride
    return sorted(set(out))


class Schedule:
    """A respaced diffusion process (`num_steps` of `num_train_steps`): float32 lookup tables [S]."""

    def __init__(self, num_steps: int, schedule: str = "cosine", num_train_steps: int = 1000,
                 learn_sigma: bool = True):
        keep = set(kept_steps(num_train_steps, num_steps))
        abar_base = np.cumprod(1.0 - base_betas(schedule, num_train_steps))
        last, betas, tmap = 1.0, [], []
        for i, ac in enumerate(abar_base):
            if i in keep:
                betas.append(1 - ac / last)
                last = ac
                tmap.append(i)
        b = np.array(betas, np.float64)
        ac = np.cumprod(1.0 - b)
        ac_prev = np.append(1.0, ac[:-1])
        pv = b * (1.0 - ac_prev) / (1.0 - ac)
        tables = {"log_betas": np.log(b), "sqrt_recip_ac": np.sqrt(1.0 / ac), "sqrt_recipm1_ac": np.sqrt(1.0 / ac - 1),
                  "post_log_var": np.log(np.append(pv[1], pv[1:])),
                  "coef1": b * np.sqrt(ac_prev) / (1.0 - ac), "coef2": (1.0 - ac_prev) * np.sqrt(1.0 - b) / (1.0 - ac),
                  "fixed_log_var": np.log(np.append(pv[1], b[1:]))}
        self.t = {k: torch.from_numpy(v.astype(np.float32)) for k, v in tables.items()}
        self.timestep_map = torch.tensor(tmap, dtype=torch.long)
        self.num_steps = len(tmap)
        self.learn_sigma = learn_sigma

    def p_sample(self, out, x, j: int, noise, temperature=1.0, clip_x0=None):
        """One ancestral step at respaced index j: head output [N, 2C] (eps, v) -> x_{j-1} [N, C]."""
        c, tb = x.shape[-1], self.t
        if self.learn_sigma:
            eps, frac = out[..., :c], (out[..., c:] + 1) / 2
            log_var = frac * tb["log_betas"][j] + (1 - frac) * tb["post_log_var"][j]
        else:
            eps, log_var = out, tb["fixed_log_var"][j] + torch.zeros_like(x)
        x0 = tb["sqrt_recip_ac"][j] * x - tb["sqrt_recipm1_ac"][j] * eps
        if clip_x0 is not None:
            x0 = x0.clamp(-clip_x0, clip_x0)
        mean = tb["coef1"][j] * x0 + tb["coef2"][j] * x
        return mean + (float(j != 0) * temperature) * torch.exp(0.5 * log_var) * noise


def cfg_scale_at(k: int, num_tokens: int, cfg: float, kind: str = "linear") -> float:
    """MAR's guidance schedule for AR step k: linear 1 + (cfg - 1) (L - m_k) / L, m_k = max(L - k - 1, 1)."""
    if kind == "constant":
        return cfg
    if kind != "linear":
        raise ValueError(f"unknown cfg schedule {kind!r}; choose 'linear' or 'constant'")
    remaining = max(num_tokens - (k + 1), 1)
    return 1.0 + (cfg - 1.0) * (num_tokens - remaining) / num_tokens


@torch.no_grad()
def sample_token(head: DiffusionHead, sched: Schedule, z_cond, x_init, step_noise, *, temperature=1.0,
                 cfg_scale=1.0, z_uncond=None, clip_x0=None):
    """MAR's p_sample_loop for one token per row: z_cond [B, D] -> x_0 [B, C]. x_init [B, C] is x_T;
    step_noise [S, B, C] is indexed by loop position (row 0 is used at respaced step S - 1). With z_uncond the
    head runs on [cond; uncond] from the same x and eps = eps_u + s (eps_c - eps_u), conditional variance."""
    b, c = x_init.shape
    x = x_init.float()
    z = z_cond if z_uncond is None else torch.cat([z_cond, z_uncond], 0)
    for i, j in enumerate(range(sched.num_steps - 1, -1, -1)):
        xx = x if z_uncond is None else torch.cat([x, x], 0)
        out = head(xx, sched.timestep_map[j].expand(xx.shape[0]), z).float()
        if z_uncond is not None:
            eps_c, eps_u = out[:b, :c], out[b:, :c]
            out = torch.cat([eps_u + cfg_scale * (eps_c - eps_u), out[:b, c:]], -1)
        x = sched.p_sample(out, x, j, step_noise[i], temperature, clip_x0)
    return x
