"""Inference benchmark (not a test): image generation with the KV cache vs recomputing the prefix, the split
between transformer and diffusion head, and text-decoding tokens/s.

    python bench/bench_inference.py                       # tiny model, 256 image tokens, 100 diffusion steps
    python bench/bench_inference.py --batches=1 --steps=10  # quicker

Times exclude compilation (each program is compiled ahead of time, then run once, block_until_ready).
"head only" runs the same n sequential diffusion samplings on fixed conditions (2B rows with CFG);
transformer time is total minus head. Random weights; the timings do not depend on them.
"""
from __future__ import annotations

import argparse
import functools
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unifluid_jax.inference import decode as D
from unifluid_jax.inference import generate as G
from unifluid_jax.models import unifluid


def bench_config(args):
    return unifluid.config_from_dict(dict(
        llm=dict(variant="gemma2_tiny", vocab_size=256, num_layers=args.layers),
        vae=dict(preset="tiny_f8", image_size=256),  # 256 px -> 32x32x4 latent -> 256 tokens of 16 dims
        siglip=dict(variant="tiny/8"), diffusion=dict(depth=3), max_text_len=32, sample_latents=False))


def timed(fn, *args):
    """(seconds, output) of one run of an ahead-of-time compiled fn (compile time reported separately)."""
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    t1 = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    return time.perf_counter() - t1, t1 - t0, out


def head_only(config, params, rows, b, num_steps, guided):
    """n sequential diffusion samplings on fixed conditions, exactly as in the generation loop."""
    sample = G.head_sampler(config, params, num_steps=num_steps, cfg_kind="linear", guided=guided)

    def run(params, z, rng):
        def body(k, acc):
            return acc + sample(k, z, jax.random.fold_in(rng, k), 3.0, 1.0).sum()
        return jax.lax.fori_loop(0, config.n_img, body, jnp.float32(0))
    z = jax.random.normal(jax.random.PRNGKey(0), (rows, config.width))
    return jax.jit(run), (params, z, jax.random.PRNGKey(1))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batches", default="1,16")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--text_batch", type=int, default=16)
    p.add_argument("--text_tokens", type=int, default=24)
    p.add_argument("--skip_uncached", default="", help="batch sizes for which the uncached run is skipped")
    args = p.parse_args()
    cfg = bench_config(args)
    model = unifluid.UniFluid(cfg)
    print(f"devices {jax.devices()}; config: gemma2_tiny x{args.layers} layers (D={cfg.width}), head depth "
          f"{cfg.diffusion.depth} width {cfg.diffusion.width}, n_img={cfg.n_img}, n_und={cfg.n_und}, "
          f"L={cfg.max_text_len}, S={cfg.seq_len}, {args.steps} diffusion steps, cfg {args.cfg} (2B rows)")
    b0 = G.prompt_batch(cfg, [[5, 6, 7]])
    b0["image_und"] = np.zeros((1, 32, 32, 3), np.float32)
    b0["image_gen"] = np.zeros((1, 256, 256, 3), np.float32)
    t0 = time.perf_counter()
    params = nn.unbox(jax.jit(functools.partial(model.init, method=unifluid.UniFluid.init_all))(
        jax.random.PRNGKey(0), b0))
    print(f"init {time.perf_counter() - t0:.1f}s")
    skip = {int(s) for s in args.skip_uncached.split(",") if s}
    guided = args.cfg != 1.0
    for b in (int(s) for s in args.batches.split(",")):
        batch = G.prompt_batch(cfg, [[5 + i % 50, 6, 7] for i in range(b)])
        inputs = lambda: (params, batch, jax.random.PRNGKey(0), jnp.float32(args.cfg), jnp.float32(1.0),
                          jnp.float32(0.0))
        res = {}
        for use_cache in (True, False):
            if not use_cache and b in skip:
                continue
            fn = G._compiled(cfg, num_steps=args.steps, cfg_kind="linear", guided=guided, use_cache=use_cache,
                             return_cond=False)
            res[use_cache], comp, (tokens, _) = timed(fn, *inputs())
            vae_sec, _, _ = timed(G._decoder(cfg), params, tokens)
            res[use_cache] += vae_sec
            print(f"  B={b:3d} {'cached  ' if use_cache else 'uncached'}: {res[use_cache]:8.2f}s "
                  f"({res[use_cache] / b:.2f}s/image; compile {comp:.1f}s)")
        fn, hargs = head_only(cfg, params, (2 if guided else 1) * b, b, args.steps, guided)
        head, _, _ = timed(fn, *hargs)
        vae = vae_sec
        tr_c = res[True] - head - vae
        line = (f"  B={b:3d} split of the cached run: diffusion head {head:.2f}s ({100 * head / res[True]:.0f}%), "
                f"VAE decode {vae:.2f}s ({100 * vae / res[True]:.0f}%), transformer+rest {tr_c:.2f}s "
                f"({100 * tr_c / res[True]:.0f}%)")
        if False in res:
            tr_u = res[False] - head - vae
            line += (f"\n         uncached transformer+rest {tr_u:.2f}s. Speed-up with the KV cache: end-to-end "
                     f"{res[False] / res[True]:.1f}x, transformer part {tr_u / max(tr_c, 1e-9):.1f}x")
        print(line)

    # Text decoding, greedy: counts the tokens actually generated (a row stops at EOS; random weights rarely
    # emit it early).
    u = cfg.siglip.image_size
    qb = D.question_batch(cfg, np.zeros((args.text_batch, u, u, 3), np.float32), [[5, 6]] * args.text_batch,
                          task="vqa", sep_ids=(4,))
    qb = {k: v for k, v in qb.items()}
    for use_cache in (True, False):
        fn = D._compiled(cfg, method="greedy", max_new_tokens=args.text_tokens, top_k=0, beam_size=1,
                         length_norm=0.0, use_cache=use_cache, return_logits=False)
        sec, comp, out = timed(fn, params, qb, jax.random.PRNGKey(0), jnp.float32(1.0), jnp.float32(1.0))
        n = int(np.asarray(out["length"]).sum())
        steps = int(np.asarray(out["length"]).max())
        print(f"text greedy B={args.text_batch} {'cached  ' if use_cache else 'uncached'}: {steps} steps, "
              f"{n} tokens in {sec:.3f}s -> {n / sec:.0f} tokens/s ({steps / sec:.0f} steps/s; compile {comp:.1f}s)")


if __name__ == "__main__":
    main()
