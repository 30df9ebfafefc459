"""Schedule constants, respacing and the per-token diffusion math against independent float64 references.

The references below are written from the iDDPM equations (numpy float64); the port casts constants to
float32 on lookup like MAR, so agreement is ~1e-6 relative.
"""
import math

import jax.numpy as jnp
import numpy as np
import pytest

from unifluid_jax.models import gaussian_diffusion as gd

T = 1000


def closed_form_cosine_betas(num_steps):
    i = np.arange(num_steps, dtype=np.float64)
    abar = lambda s: np.cos((s + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
    return np.minimum(1 - abar((i + 1) / num_steps) / abar(i / num_steps), 0.999)


def mar_space_timesteps(num_timesteps, n):
    """MAR's respacing for one section, re-derived: accumulate the float stride, round() each partial sum."""
    stride = (num_timesteps - 1) / (n - 1)
    cur, out = 0.0, []
    for _ in range(n):
        out.append(round(cur))
        cur += stride
    return sorted(set(out))


# ---- schedule -------------------------------------------------------------------------------------------


def test_cosine_betas_closed_form():
    betas = gd.named_beta_schedule("cosine", T)
    assert betas.dtype == np.float64 and betas.shape == (T,)
    np.testing.assert_allclose(betas, closed_form_cosine_betas(T), rtol=1e-12, atol=1e-15)
    assert betas[-1] == 0.999  # the clip is active at the end of the cosine schedule


def test_constants_closed_form():
    d = gd.create_diffusion(None)
    b = closed_form_cosine_betas(T)
    ac = np.cumprod(1 - b)
    ac_prev = np.concatenate([[1.0], ac[:-1]])
    pv = b * (1 - ac_prev) / (1 - ac)
    expect = {
        "betas": b,
        "alphas_cumprod": ac,
        "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": np.sqrt(ac),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1 - ac),
        "sqrt_recip_alphas_cumprod": 1 / np.sqrt(ac),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1 / ac - 1),
        "posterior_variance": pv,
        "posterior_log_variance_clipped": np.log(np.concatenate([[pv[1]], pv[1:]])),
        "posterior_mean_coef1": b * np.sqrt(ac_prev) / (1 - ac),
        "posterior_mean_coef2": (1 - ac_prev) * np.sqrt(1 - b) / (1 - ac),
        "log_betas": np.log(b),
    }
    for name, want in expect.items():
        got = getattr(d, name)
        assert got.dtype == np.float64, name
        # 1 - abar near abar ~ 1 loses relative precision in float64 itself, hence the tiny atol.
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12, err_msg=name)


def test_training_diffusion_is_a_full_respacing():
    base = gd.named_beta_schedule("cosine", T)
    d = gd.create_diffusion(None)
    np.testing.assert_array_equal(d.timestep_map, np.arange(T))
    ac = np.cumprod(1 - base)
    rebuilt = 1 - ac / np.concatenate([[1.0], ac[:-1]])
    np.testing.assert_array_equal(d.betas, rebuilt)  # rebuilt from abar ratios, bit for bit
    assert np.abs(d.betas - base).max() < 1e-15


# ---- respacing ------------------------------------------------------------------------------------------


def test_space_timesteps_100():
    kept = gd.space_timesteps(T, 100)
    assert kept == [round(k * 999 / 99) for k in range(100)]
    assert kept[:8] == [0, 10, 20, 30, 40, 50, 61, 71]
    assert kept[-2:] == [989, 999]
    assert gd.space_timesteps(T, "100") == kept
    np.testing.assert_array_equal(gd.create_diffusion(100).timestep_map, kept)
    np.testing.assert_array_equal(gd.create_diffusion("100").timestep_map, kept)


def test_space_timesteps_accumulated_rounding():
    for n in (2, 7, 21, 23, 31, 50, 100, 250, 999, 1000):
        assert gd.space_timesteps(T, n) == mar_space_timesteps(T, n), n
    # k = 10 lands on 499.4999.. by accumulation but exactly 499.5 (-> 500) in closed form.
    lit21 = [0, 50, 100, 150, 200, 250, 300, 350, 400, 450, 499, 549, 599, 649, 699, 749, 799, 849, 899,
             949, 999]
    lit23 = [0, 45, 91, 136, 182, 227, 272, 318, 363, 409, 454, 499, 545, 590, 636, 681, 727, 772, 817,
             863, 908, 954, 999]
    assert gd.space_timesteps(T, 21) == lit21
    assert gd.space_timesteps(T, 23) == lit23
    for n, lit in ((21, lit21), (23, lit23)):
        assert lit != [round(k * 999 / (n - 1)) for k in range(n)]
    # n = 31: round-half-up closed form differs from MAR's list.
    assert gd.space_timesteps(T, 31) != [math.floor(k * 999 / 30 + 0.5) for k in range(31)]
    sections = [s + k for s, n in ((0, 10), (100, 15), (200, 20)) for k in mar_space_timesteps(100, n)]
    assert gd.space_timesteps(300, [10, 15, 20]) == sections == gd.space_timesteps(300, "10,15,20")
    assert gd.space_timesteps(300, "ddim10") == list(range(0, 300, 30))
    with pytest.raises(ValueError):
        gd.space_timesteps(10, 11)


@pytest.mark.parametrize("n", [100, 21])
def test_respaced_betas_from_kept_alphas(n):
    base_ac = np.cumprod(1 - closed_form_cosine_betas(T))
    d = gd.create_diffusion(n)
    kept = np.array(gd.space_timesteps(T, n))
    np.testing.assert_array_equal(d.timestep_map, kept)
    want = 1 - base_ac[kept] / np.concatenate([[1.0], base_ac[kept][:-1]])
    np.testing.assert_allclose(d.betas, want, rtol=1e-12, atol=1e-15)
    # cumprod(1 - beta') re-derives abar; 1 - beta' cancels digits where beta' is near 1 (the clipped end),
    # so the float64 bound on the relative error is ~eps * sum 1 / (1 - beta').
    bound = 1e-15 * np.cumsum(1 / (1 - d.betas)) + 1e-14
    rel = np.abs(d.alphas_cumprod / base_ac[kept] - 1)
    assert (rel <= bound).all(), (rel / bound).max()
    assert rel[:-1].max() < 1e-12
    assert d.num_timesteps == n


# ---- per-token math vs a float64 reference ---------------------------------------------------------------


class RefDiffusion:
    """iDDPM equations in float64 numpy, learned-range variance, eps prediction, no clipping."""

    def __init__(self, betas):
        self.b = b = np.asarray(betas, np.float64)
        self.ac = ac = np.cumprod(1 - b)
        self.ac_prev = ac_prev = np.concatenate([[1.0], ac[:-1]])
        self.pv = b * (1 - ac_prev) / (1 - ac)
        self.plv = np.log(np.concatenate([[self.pv[1]], self.pv[1:]]))
        self.c1 = b * np.sqrt(ac_prev) / (1 - ac)
        self.c2 = (1 - ac_prev) * np.sqrt(1 - b) / (1 - ac)

    def q_sample(self, x0, t, noise):
        return np.sqrt(self.ac[t])[:, None] * x0 + np.sqrt(1 - self.ac[t])[:, None] * noise

    def posterior(self, x0, xt, t):
        return self.c1[t][:, None] * x0 + self.c2[t][:, None] * xt, self.plv[t][:, None] + 0 * xt

    def p_mean_variance(self, out, xt, t):
        c = xt.shape[-1]
        eps, v = out[:, :c], out[:, c:]
        frac = (v + 1) / 2
        log_var = frac * np.log(self.b[t])[:, None] + (1 - frac) * self.plv[t][:, None]
        x0 = xt / np.sqrt(self.ac[t])[:, None] - np.sqrt(1 / self.ac[t] - 1)[:, None] * eps
        mean, _ = self.posterior(x0, xt, t)
        return mean, log_var, x0

    def vb(self, out, x0, xt, t):
        tm, tlv = self.posterior(x0, xt, t)
        m, lv, _ = self.p_mean_variance(out, xt, t)
        kl = 0.5 * (-1 + lv - tlv + np.exp(tlv - lv) + (tm - m) ** 2 * np.exp(-lv))
        cdf = lambda u: 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u ** 3)))  # noqa: E731
        inv = np.exp(-0.5 * lv)
        cp, cm = cdf(inv * (x0 - m + 1 / 255)), cdf(inv * (x0 - m - 1 / 255))
        ll = np.where(x0 < -0.999, np.log(np.maximum(cp, 1e-12)),
                      np.where(x0 > 0.999, np.log(np.maximum(1 - cm, 1e-12)),
                               np.log(np.maximum(cp - cm, 1e-12))))
        return np.where(t == 0, -ll.mean(-1), kl.mean(-1)) / np.log(2)


def _inputs(n=6, c=4, seed=0):
    rng = np.random.default_rng(seed)
    x0 = rng.uniform(-0.9, 0.9, (n, c))
    noise = rng.standard_normal((n, c))
    out = np.concatenate([0.3 * rng.standard_normal((n, c)), rng.uniform(-1, 1, (n, c))], -1)
    return x0, noise, out


def _f32(*xs):
    return [jnp.asarray(x, jnp.float32) for x in xs]


@pytest.mark.parametrize("n", [None, 100])
def test_port_parity(n):
    """The float32 port vs float64 equations on the same (float32-representable) inputs: ~1e-7 relative,
    like MAR's own float32 arithmetic; the vb term (KL of nearby Gaussians, t = 0 NLL) loses a bit more."""
    d = gd.create_diffusion(n)
    ref = RefDiffusion(d.betas)
    t = np.array([0, 1, 2, d.num_timesteps // 2, d.num_timesteps - 2, d.num_timesteps - 1])
    x0, noise, out = (np.asarray(a, np.float32).astype(np.float64) for a in _inputs())
    jx0, jnoise, jout = _f32(x0, noise, out)
    jt = jnp.asarray(t, jnp.int32)

    xt = ref.q_sample(x0, t, noise)
    np.testing.assert_allclose(d.q_sample(jx0, jt, jnoise), xt, rtol=5e-7, atol=1e-7)
    jxt = jnp.asarray(xt, jnp.float32)
    xt = np.asarray(jxt, np.float64)

    mean, lv = ref.posterior(x0, xt, t)
    pm, _, plv = d.q_posterior_mean_variance(jx0, jxt, jt)
    np.testing.assert_allclose(pm, mean, rtol=5e-7)
    np.testing.assert_allclose(plv, lv, rtol=5e-7)

    m, lv, x0_hat = ref.p_mean_variance(out, xt, t)
    got = d.p_mean_variance(jout, jxt, jt)
    np.testing.assert_allclose(got["pred_xstart"], x0_hat, rtol=1e-6)
    np.testing.assert_allclose(got["mean"], m, rtol=1e-6)
    np.testing.assert_allclose(got["log_variance"], lv, rtol=1e-6)
    np.testing.assert_allclose(got["variance"], np.exp(lv), rtol=1e-6)

    np.testing.assert_allclose(d.vb_terms_bpd(jout, jx0, jxt, jt), ref.vb(out, x0, xt, t), rtol=3e-5)


def test_decoder_nll_edges_and_kl():
    d = gd.create_diffusion(None)
    ref = RefDiffusion(d.betas)
    x0 = np.array([[-1.0, -0.5, 0.0, 1.0], [-0.9995, 0.9995, 0.2, -0.2]])
    _, noise, out = _inputs(n=2)
    t = np.array([0, 0])
    xt = ref.q_sample(x0, t, noise)
    got = d.vb_terms_bpd(*_f32(out, x0, xt), jnp.asarray(t))
    np.testing.assert_allclose(got, ref.vb(out, x0, xt, t), rtol=1e-4)
    kl = gd.normal_kl(jnp.float32(0.3), jnp.float32(0.1), jnp.float32(-0.2), jnp.float32(0.5))
    want = 0.5 * (-1 + 0.5 - 0.1 + math.exp(0.1 - 0.5) + 0.25 * math.exp(-0.5))
    assert abs(float(kl) - want) < 1e-6


def test_p_sample_temperature_and_last_step():
    d = gd.create_diffusion(100)
    ref = RefDiffusion(d.betas)
    x0, noise, out = _inputs()
    xt = noise * 1.3
    t = np.array([0, 0, 5, 5, 99, 99])
    m, lv, _ = ref.p_mean_variance(out, xt, t)
    for tau in (1.0, 0.7, 0.0):
        want = m + (t != 0)[:, None] * np.exp(0.5 * lv) * noise * tau
        got = d.p_sample(*_f32(out, xt), jnp.asarray(t), jnp.asarray(noise, jnp.float32), tau)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_fixed_variance_without_learned_sigma():
    d = gd.create_diffusion(None, learn_sigma=False)
    x0, noise, out = _inputs()
    t = jnp.array([0, 1, 2, 3, 500, 999])
    got = d.p_mean_variance(jnp.asarray(out[:, :4], jnp.float32), jnp.asarray(noise, jnp.float32), t)
    want = np.append(d.posterior_variance[1], d.betas[1:])[np.asarray(t)]
    np.testing.assert_allclose(got["variance"][:, 0], want, rtol=1e-6)
    terms = d.training_losses(jnp.asarray(out[:, :4], jnp.float32), *_f32(x0, noise), t,
                              jnp.asarray(noise, jnp.float32))
    np.testing.assert_array_equal(terms["loss"], terms["mse"])
