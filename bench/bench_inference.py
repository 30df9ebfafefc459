"""Inference benchmark (not a test): image generation with the KV cache vs recomputing the prefix, the split
between transformer and diffusion head, and text-decoding tokens/s.

    python bench/bench_inference.py                       # tiny model, 256 image tokens, 100 diffusion steps
    python bench/bench_inference.py --batches=1 --steps=10  # quicker
    python bench/bench_inference.py --model=demo            # the demo's transformer and head at 256 tokens

Times exclude compilation (each program is compiled ahead of time, then run; best of 2 except the long
uncached runs). The split is measured directly: "transformer only" is the generation program with the head
sampler replaced by zeros, "head" runs the same n sequential diffusion samplings on fixed conditions (2B
rows with CFG), "VAE decode" is the separate decode program. Side by side in the same run: the diffusion head
split (x-independent part before the step loop) against the whole head at every step, and the VAE decode one
image at a time against the whole batch. Random weights; timings do not depend on them.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import time
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unifluid_jax import presets
from unifluid_jax.inference import decode as D
from unifluid_jax.inference import generate as G
from unifluid_jax.models import diffusion as diffusion_lib
from unifluid_jax.models import unifluid


def bench_config(args):
    """--model=tiny: gemma2_tiny (D=64) x --layers, head 3 x 64; --model=demo: the demo preset's transformer
    (4 x 128, MLP 512) and head (3 x 256). Both with a 256 px tiny_f8 VAE: 32x32x4 latent -> 256 tokens."""
    if args.model == "demo":
        llm, head = dict(presets.LLM["demo"]), dict(presets.DIFFUSION["demo"])
    else:
        llm, head = dict(variant="gemma2_tiny", vocab_size=256, num_layers=args.layers), dict(depth=3)
    return unifluid.config_from_dict(dict(
        llm=llm, vae=dict(preset="tiny_f8", image_size=256), siglip=dict(variant="tiny/8"), diffusion=head,
        max_text_len=32, sample_latents=False))


def timed(fn, *args, repeat: int = 1):
    """(best seconds of `repeat` runs, compile seconds, output) of an ahead-of-time compiled fn."""
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    comp = time.perf_counter() - t0
    best = float("inf")
    for _ in range(repeat):
        t1 = time.perf_counter()
        out = jax.block_until_ready(compiled(*args))
        best = min(best, time.perf_counter() - t1)
    return best, comp, out


def whole_head_sampler(config, params, **kw):
    """The sampler as before the head split: the whole head (time MLP, condition projection, adaLN
    modulations) runs at every diffusion step. Same samples; for the side-by-side timing only."""
    with mock.patch.object(diffusion_lib, "sampler_fns", diffusion_lib.apply_fn):
        return G.head_sampler(config, params, **kw)


def head_only(config, params, rows, num_steps, guided, make_sampler=None):
    """n sequential diffusion samplings on fixed conditions, exactly as in the generation loop."""
    sample = (make_sampler or G.head_sampler)(config, params, num_steps=num_steps, cfg_kind="linear",
                                              guided=guided)

    def run(params, z, rng):
        def body(k, acc):
            return acc + sample(k, z, jax.random.fold_in(rng, k), 3.0, 1.0).sum()
        return jax.lax.fori_loop(0, config.n_img, body, jnp.float32(0))
    z = jax.random.normal(jax.random.PRNGKey(0), (rows, config.width))
    return jax.jit(run), (params, z, jax.random.PRNGKey(1))


@contextlib.contextmanager
def no_head():
    """While a program is traced, the diffusion head sampler returns zeros (transformer-only timing)."""
    real = G.head_sampler

    def zeros_sampler(cfg, params, *, guided, **_):
        def sample(k, z, rng, s, t):  # ~0, but depends on z so XLA cannot drop the transformer
            b = z.shape[0] // (2 if guided else 1)
            return jnp.broadcast_to(z[:b, :1].astype(jnp.float32) * 1e-30, (b, cfg.token_dim))
        return sample
    G.head_sampler = zeros_sampler
    try:
        yield
    finally:
        G.head_sampler = real


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batches", default="1,16")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--model", default="tiny", choices=("tiny", "demo"))
    p.add_argument("--layers", type=int, default=4, help="transformer layers of --model=tiny")
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--text_batch", type=int, default=16)
    p.add_argument("--text_tokens", type=int, default=24)
    p.add_argument("--skip_uncached", default="", help="batch sizes for which the uncached run is skipped")
    args = p.parse_args()
    cfg = bench_config(args)
    model = unifluid.UniFluid(cfg)
    print(f"devices {jax.devices()}; config: {args.model}, {cfg.llm.num_layers} layers (D={cfg.width}), head depth "
          f"{cfg.diffusion.depth} width {cfg.diffusion.width}, n_img={cfg.n_img}, n_und={cfg.n_und}, "
          f"L={cfg.max_text_len}, S={cfg.seq_len}, {args.steps} diffusion steps, cfg {args.cfg} (2B rows)")
    from unifluid_jax.tasks.unifluid import example_batch
    b0 = example_batch(cfg)  # one fixed-layout row (unifluid_jax/layout.py) touching every param
    t0 = time.perf_counter()
    params = nn.unbox(jax.jit(functools.partial(model.init, method=unifluid.UniFluid.init_all))(
        jax.random.PRNGKey(0), b0))
    print(f"init {time.perf_counter() - t0:.1f}s")
    skip = {int(s) for s in args.skip_uncached.split(",") if s}
    guided = args.cfg != 1.0
    for b in (int(s) for s in args.batches.split(",")):
        batch = G.prompt_batch(cfg, [[5 + i % 50, 6, 7] for i in range(b)])
        inputs = (params, batch, jax.random.PRNGKey(0), jnp.float32(args.cfg), jnp.float32(1.0), jnp.float32(0.0))
        res, trans, vae = {}, {}, {}
        for use_cache in (True, False):
            if not use_cache and b in skip:
                continue
            rep = 2 if use_cache else 1
            fn = G._compiled(cfg, num_steps=args.steps, cfg_kind="linear", guided=guided, use_cache=use_cache,
                             return_cond=False)
            sec, comp, (tokens, _) = timed(fn, *inputs, repeat=rep)
            vae[use_cache], _, _ = timed(G._decoder(cfg, G.default_decode_chunk()), params, tokens, repeat=rep)
            res[use_cache] = sec + vae[use_cache]
            with no_head():
                fn = jax.jit(functools.partial(G._generate, model, num_steps=2, cfg_kind="linear", guided=guided,
                                               use_cache=use_cache, return_cond=False))
                trans[use_cache], _, _ = timed(fn, *inputs, repeat=rep)
            print(f"  B={b:3d} {'cached  ' if use_cache else 'uncached'}: {res[use_cache]:8.2f}s "
                  f"({res[use_cache] / b:.2f}s/image; compile {comp:.1f}s); transformer only "
                  f"{trans[use_cache]:.2f}s, VAE decode {vae[use_cache]:.2f}s")
        fn, hargs = head_only(cfg, params, (2 if guided else 1) * b, args.steps, guided)
        head, _, _ = timed(fn, *hargs, repeat=2)
        fn, hargs = head_only(cfg, params, (2 if guided else 1) * b, args.steps, guided, whole_head_sampler)
        whole_head, _, _ = timed(fn, *hargs, repeat=2)
        batched_vae, _, _ = timed(G._decoder(cfg, 0), params, tokens, repeat=2)
        line = (f"  B={b:3d} cached split: transformer {trans[True]:.2f}s ({100 * trans[True] / res[True]:.0f}%), "
                f"diffusion head {head:.2f}s ({100 * head / res[True]:.0f}%), VAE decode {vae[True]:.2f}s "
                f"({100 * vae[True] / res[True]:.0f}%)")
        line += (f"\n         side by side: head split {head:.2f}s vs whole head every step {whole_head:.2f}s "
                 f"({whole_head / head:.1f}x); VAE decode one image at a time {vae[True]:.2f}s vs whole batch "
                 f"{batched_vae:.2f}s")
        if False in res:
            tok = {k: res[k] - vae[k] for k in res}  # token generation: transformer + head, no VAE decode
            line += (f"\n         KV cache speed-up: end-to-end {res[False] / res[True]:.1f}x, token generation "
                     f"(transformer + head) {tok[False] / tok[True]:.1f}x, transformer {trans[False] / trans[True]:.1f}x")
        print(line, flush=True)

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
