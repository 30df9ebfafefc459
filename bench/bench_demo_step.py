"""The demo's UniFluid train step (the real trainer step on shapes data): recipe variants side by side.

    python bench/bench_demo_step.py                                   # fixed vs packed rows, 5 interleaved rounds
    python bench/bench_demo_step.py --variants="b32=batch=32;b64=batch=64" --rounds=3
    python bench/bench_demo_step.py --data=workdir/demo/shapes        # an existing dataset

Each variant is configs/unifluid_demo.py with the demo's recipe (tools/demo.py RECIPE) plus its own keys
(later keys win), built and compiled once in this process, then timed in turn (A B A B ...; each turn runs the
same 4 batches), so all see the same machine load. Reports examples per second (t2i examples + caption / VQA examples in the batches:
a packed row holds several) and, against the first variant, the median of the per-round ratios. The VAE and
SigLIP are randomly initialised: their weights do not change the cost. Also printed: XLA's FLOP count of the
compiled step (a scanned loop body counted once: a lower bound) and the compile time.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build(name: str, arg: str, data: str, workdir: str):
    import jax

    from unifluid_jax.tools import demo
    from unifluid_jax.train import checkpoint as ckpt_lib
    from unifluid_jax.train import sharding, trainer
    cfg = demo._load_config("unifluid_demo", f"data={data},{demo.RECIPE}" + (f",{arg}" if arg else ""))
    t = trainer.Trainer(cfg, f"{workdir}/{name}", devices=jax.devices()[:1])
    with t.context():
        it = iter(t.task.make_input(cfg, 0, 1))
        ck = ckpt_lib.Checkpointer(f"{workdir}/{name}", cfg.checkpoint)
        state, _ = t.initial_state(ck, None)
        ck.close()
        batches = [sharding.make_global_batch(next(it), t.batch_shardings, t.global_batch) for _ in range(4)]
        t0 = time.perf_counter()
        fn = t.train_step.lower(state, batches[0]).compile()
        compile_s = time.perf_counter() - t0
        state, _ = fn(state, batches[0])
        jax.block_until_ready(state)
    examples = float(np.mean([int(np.asarray(b["task_count"]).sum()) for b in batches]))
    cost = fn.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    print(f"{name}: {arg or '(recipe)'}: {examples:.1f} examples/step, XLA {cost.get('flops', 0) / 1e9:.1f} GFLOP/step, "
          f"compile {compile_s:.0f} s", flush=True)
    return {"name": name, "trainer": t, "fn": fn, "state": state, "batches": batches, "examples": examples,
            "times": []}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="fixed=layout=fixed;packed=layout=packed",
                    help="NAME=ARG;NAME=ARG (ARG: configs/unifluid_demo.py keys added to the demo recipe)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--data", default="", help="a shapes dataset (default: build 512 scenes in a temp dir)")
    args = ap.parse_args(argv)
    import jax
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.ERROR)
    tmp = tempfile.mkdtemp(prefix="bench_demo_step_")
    data = args.data
    if not data:
        from unifluid_jax.tools import build_shapes
        data = f"{tmp}/shapes"
        build_shapes.build(data, size=64, num_train=512, num_val=32, num_test=32, num_shards=1, num_geneval=4)
    variants = [build(*item.split("=", 1), data, tmp) for item in args.variants.split(";")]
    for _ in range(args.rounds):
        for v in variants:
            with v["trainer"].context():
                t0 = time.perf_counter()
                for b in v["batches"]:
                    v["state"], _ = v["fn"](v["state"], b)
                jax.block_until_ready(v["state"])
                v["times"].append((time.perf_counter() - t0) / len(v["batches"]))
    base = variants[0]
    for v in variants:
        rate = v["examples"] / np.median(v["times"])
        line = f"{v['name']}: {np.median(v['times']):.3f} s/step, {rate:.1f} examples/s"
        if v is not base:
            ratios = [(v["examples"] / b) / (base["examples"] / a) for a, b in zip(base["times"], v["times"])]
            line += f"; / {base['name']}: median of {len(ratios)} round ratios {np.median(ratios):.2f}x"
        print(line)


if __name__ == "__main__":
    main()
