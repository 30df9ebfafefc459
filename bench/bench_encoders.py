"""Image encoder benchmark (not a test): VAE encode+decode throughput and SigLIP-So400m/14 FLOPs.

  python bench/bench_encoders.py                 # everything (the 256 px SD VAE takes minutes on 2 CPU cores)
  python bench/bench_encoders.py --skip_sd       # tiny VAE + FLOP table only

VAE: jitted encode -> decode(mean) with random weights, timed after one warmup call, best of `--repeats`.
SigLIP FLOPs: analytic matmul count (2 FLOPs per multiply-add; LayerNorm/softmax/gelu ignored) vs XLA's
HLO cost analysis of the lowered forward. With scan_layers=True XLA costs the while-loop body once, so the
scanned number is ~1/depth of the block FLOPs; the looped (un-scanned) forward is the comparable one.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unifluid_jax.models import siglip, vae


def random_params(module, *example):
    """Random weights in the module's tree without compiling an init (eval_shape + numpy)."""
    abstract = nn.unbox(jax.eval_shape(module.init, jax.random.key(0), *example))
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: jnp.asarray(0.02 * rng.standard_normal(s.shape), s.dtype), abstract)


def cost_flops(lowered_or_compiled) -> float:
    ca = lowered_or_compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
        ca = ca[0]
    return float(ca.get("flops", float("nan")))


def bench_vae(preset: str, batch: int, repeats: int) -> dict:
    cfg = vae.get_config(preset)
    model = vae.AutoencoderKL(cfg)
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (batch, cfg.image_size, cfg.image_size, 3)),
                    jnp.float32)
    params = random_params(model, x)

    @jax.jit
    def enc_dec(params, x):
        mean, _ = model.apply(params, x, method=model.encode)
        return model.apply(params, mean, method=model.decode)

    t0 = time.perf_counter()
    compiled = enc_dec.lower(params, x).compile()
    compile_s = time.perf_counter() - t0
    compiled(params, x).block_until_ready()  # warmup
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        compiled(params, x).block_until_ready()
        times.append(time.perf_counter() - t0)
    best = min(times)
    return dict(preset=preset, size=cfg.image_size, latent=f"{cfg.latent_size}x{cfg.latent_size}x"
                f"{cfg.latent_channels}", batch=batch, step_s=best, img_s=batch / best,
                gflop_img=cost_flops(compiled) / batch / 1e9, compile_s=compile_s)


def siglip_analytic_flops(cfg: siglip.SigLIPConfig) -> dict:
    n, d, f, p = cfg.num_patches, cfg.width, cfg.mlp_dim, cfg.patch_size
    stem = 2 * n * p * p * 3 * d
    proj = 2 * 4 * n * d * d  # q, k, v, out
    attn = 2 * 2 * n * n * d  # logits and probs @ v
    mlp = 2 * 2 * n * d * f
    out = dict(stem=stem, block=proj + attn + mlp, blocks=cfg.depth * (proj + attn + mlp))
    out["total"] = stem + out["blocks"]
    return out


def siglip_xla_flops(cfg: siglip.SigLIPConfig) -> float:
    model = siglip.SigLIP(cfg)
    x = jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, 3), jnp.float32)
    params = jax.eval_shape(model.init, jax.random.key(0), x)
    return cost_flops(jax.jit(model.apply).lower(nn.unbox(params), x))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip_sd", action="store_true", help="skip the 256 px sd_kl_f8 timing")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tiny_batch", type=int, default=8)
    ap.add_argument("--sd_batch", type=int, default=2)
    args = ap.parse_args()
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.device_count()} device(s)")

    runs = [("tiny_f4", args.tiny_batch)] + ([] if args.skip_sd else [("sd_kl_f8", args.sd_batch)])
    print("\nVAE encode+decode (float32, jitted, best of %d after warmup)" % args.repeats)
    print(f"{'preset':<10} {'px':>4} {'latent':>9} {'batch':>5} {'s/step':>8} {'img/s':>8} "
          f"{'GFLOP/img':>10} {'compile s':>9}")
    for preset, batch in runs:
        r = bench_vae(preset, batch, args.repeats)
        print(f"{r['preset']:<10} {r['size']:>4} {r['latent']:>9} {r['batch']:>5} {r['step_s']:>8.3f} "
              f"{r['img_s']:>8.2f} {r['gflop_img']:>10.2f} {r['compile_s']:>9.1f}")

    cfg = siglip.get_config("So400m/14")
    a = siglip_analytic_flops(cfg)
    looped = siglip_xla_flops(dataclasses.replace(cfg, scan_layers=False))
    scanned = siglip_xla_flops(cfg)
    print(f"\nSigLIP-So400m/14 forward FLOPs per 224 px image ({cfg.num_patches} tokens, pool='none')")
    print(f"{'count':<44} {'GFLOP':>10}")
    print(f"{'analytic: stem':<44} {a['stem'] / 1e9:>10.2f}")
    print(f"{'analytic: one block':<44} {a['block'] / 1e9:>10.2f}")
    print(f"{'analytic: total (matmuls only)':<44} {a['total'] / 1e9:>10.2f}")
    print(f"{'XLA cost_analysis, looped (scan_layers=False)':<44} {looped / 1e9:>10.2f}"
          f"   ratio {looped / a['total']:.4f}")
    print(f"{'XLA cost_analysis, scanned (body counted once)':<44} {scanned / 1e9:>10.2f}"
          f"   = stem + {(scanned - a['stem']) / a['block']:.2f} blocks")


if __name__ == "__main__":
    main()
