"""Benchmark (not a test): text-to-image sampling time, PyTorch port vs JAX, demo model sizes, random weights.

    PYTHONPATH=. python bench/bench_torch_port.py                  # B=4, 50 diffusion steps, CFG 3, 4 pairs
    PYTHONPATH=. python bench/bench_torch_port.py --batch=1 --steps=20 --pairs=2

The model is configs/unifluid_demo.py's (Gemma-2-style 4 x 128, SigLIP tiny/8, tiny VAE at 64 px -> 16
image tokens, head 3 x 256), exported to a temporary folder and loaded by both. Same prompts, steps, CFG,
temperature and order; JAX is compiled once before timing (compile time reported separately), both end with
decoded images. Runs are interleaved A B A B and the ratio is the median of per-pair ratios, so a machine
whose load drifts affects both sides of each pair alike.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import jax
import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch default)")
    args = ap.parse_args()

    import importlib.util
    import torch
    from unifluid_jax.convert import unifluid as conv
    from unifluid_jax.inference import generate
    from unifluid_jax.tasks.unifluid import UniFluidTask
    from unifluid_jax.torch_port import UniFluidTorch
    if args.threads:
        torch.set_num_threads(args.threads)

    spec = importlib.util.spec_from_file_location("unifluid_demo", "configs/unifluid_demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    cfg = demo.get_config("data=/nonexistent")
    task = UniFluidTask(cfg)
    from unifluid_jax.train import sharding
    abstract = sharding.unbox_abstract(jax.eval_shape(task.init_params, jax.random.key(0)))
    gen = np.random.default_rng(0)  # random everywhere (the head's output layers are zero at init)
    params = jax.tree.map(lambda a: (0.02 * gen.standard_normal(a.shape)).astype(np.float32), abstract)
    folder = tempfile.mkdtemp(prefix="bench_torch_port_")
    conv.export_params(params, task.model_config, folder, model_section=cfg.model, overwrite=True)
    port = UniFluidTorch.from_folder(folder)
    model, variables = task.model, {"params": jax.tree.map(jax.numpy.asarray, params)}
    prompts = [[5 + i, 6 + i, 7 + i] for i in range(args.batch)]  # token ids: no tokenizer needed
    kw = dict(num_steps=args.steps, cfg_scale=args.cfg, temperature=1.0, order="raster")

    def run_jax(seed):
        images, _ = generate.generate_images(model, variables, prompts, jax.random.key(seed), **kw)
        return jax.block_until_ready(images)

    def run_torch(seed):
        return port.generate(prompts, seed=seed, **kw)[0]

    t0 = time.perf_counter()
    run_jax(0)
    compile_s = time.perf_counter() - t0
    run_torch(0)  # warm-up (allocator, lazy imports)
    times = {"jax": [], "torch": []}
    for i in range(args.pairs):
        for name, fn in (("jax", run_jax), ("torch", run_torch)):
            t1 = time.perf_counter()
            fn(i + 1)
            times[name].append(time.perf_counter() - t1)
    ratios = [t / j for t, j in zip(times["torch"], times["jax"])]
    n = task.model_config.n_img
    print(f"demo model, B={args.batch}, {n} image tokens, {args.steps} diffusion steps, CFG {args.cfg}, "
          f"torch threads {torch.get_num_threads()}: JAX first call (compile + run) {compile_s:.1f} s")
    print(f"JAX   median {statistics.median(times['jax']):.3f} s  ({', '.join(f'{t:.3f}' for t in times['jax'])})")
    print(f"torch median {statistics.median(times['torch']):.3f} s  "
          f"({', '.join(f'{t:.3f}' for t in times['torch'])})")
    print(f"torch / JAX: median of {args.pairs} pair ratios {statistics.median(ratios):.2f}x")


if __name__ == "__main__":
    main()
