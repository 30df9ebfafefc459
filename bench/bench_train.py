"""Train-step throughput of the real trainer step (optax AdamW, jit, donated state) vs HF transformers,
measured INTERLEAVED: each side lives in its own worker process (built and compiled once), and the parent
times them in turn, A B A B ..., so both see the same machine load; the claim is the median of the per-pair
ratios (torch step time / JAX step time), not a ratio of medians taken at different times. The same ratio
of process CPU time per step is reported too (less sensitive to other load; counts spinning threads).

    python bench/bench_train.py --quick              # 131m, best JAX variant vs HF, 3 pairs (~3 min idle)
    python bench/bench_train.py                      # tiny + 131M Gemma-2-style, every variant vs HF
    python bench/bench_train.py --only=131m --variants=f32_scan,bf16_scan --pairs=5 --steps=2
Prints one line per variant and writes bench/results/train.json (or --out).

One JAX worker and one torch worker at a time, each a single process; only one of them runs at any moment
(the other waits on its pipe). Threads: XLA's CPU client uses one thread per core; torch gets
torch.set_num_threads(--threads, default: the core count), so both use the same cores.

Model FLOPs (PaLM-style, per token, training = 3x forward):
    6 * N_nonembed + 12 * L * N_heads * H * T (attention scores + values over the full T context)
    + 6 * V * D (logits through the tied embedding)
MFU = model FLOP/s / peak; peaks are this machine's (2 cores): 360 GFLOP/s f32, 730 GFLOP/s bf16.
The torch side is transformers Gemma2ForCausalLM (eager attention, AdamW), f32.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PEAK = {"float32": 360e9, "bfloat16": 730e9}
MODELS = {
    "tiny": dict(variant="gemma2_tiny", num_layers=2, width=32, num_heads=4, num_kv_heads=2, head_dim=8,
                 mlp_dim=64, vocab_size=32, sliding_window=8, batch=16, seq=16),
    "131m": dict(variant="gemma2_tiny", num_layers=12, width=768, num_heads=12, num_kv_heads=6, head_dim=64,
                 mlp_dim=3072, vocab_size=32000, sliding_window=128, batch=4, seq=256),
}
# name -> gemma overrides
VARIANTS = {
    "f32_scan": dict(dtype="float32", scan_layers=True, remat_policy="none"),
    "bf16_scan": dict(dtype="bfloat16", scan_layers=True, remat_policy="none"),
    "f32_scan_remat_dots": dict(dtype="float32", scan_layers=True, remat_policy="dots_with_no_batch_dims_saveable"),
    "f32_scan_remat_full": dict(dtype="float32", scan_layers=True, remat_policy="full"),
    "f32_unrolled": dict(dtype="float32", scan_layers=False, remat_policy="none"),
}
QUICK = dict(only="131m", variants="f32_scan_remat_dots", pairs=3, steps=1)


def param_counts(m) -> tuple[int, int]:
    d, l, n, k, h, f, v = (m[x] for x in ("width", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                                          "mlp_dim", "vocab_size"))
    per_layer = d * n * h + 2 * k * d * h + n * h * d + 3 * d * f + 4 * d
    return l * per_layer + d, v * d  # non-embedding, embedding


def model_flops_per_step(m) -> float:
    nonembed, embed = param_counts(m)
    t, tokens = m["seq"], m["batch"] * m["seq"]
    attn = 12 * m["num_layers"] * m["num_heads"] * m["head_dim"] * t
    return tokens * (6 * nonembed + attn + 6 * embed)


def build_jax(model: str, variant: str):
    """The trainer's jitted step on a fixed batch -> a closure running one step (blocking) -> loss."""
    import jax
    import numpy as np

    from unifluid_jax import config as config_lib
    from unifluid_jax.train import trainer as trainer_lib

    m = MODELS[model]
    c = config_lib.defaults()
    c.task = "lm"
    c.gemma = {k: v for k, v in m.items() if k not in ("batch", "seq")}
    c.gemma.update(VARIANTS[variant])
    c.data = dict(seed=0, min_len=1, max_len=2, ops=("copy",), num_threads=0, prefetch=0)
    c.train.batch_size = m["batch"]
    c.mesh = dict(data=1, fsdp=1, tensor=1)
    c.sharding.check_large_params = "off"
    config_lib.validate(c, num_devices=1)
    t = trainer_lib.Trainer(c, "/tmp/unused", devices=jax.devices()[:1])
    rng = np.random.default_rng(0)
    batch = {"tokens": rng.integers(0, m["vocab_size"], (m["batch"], m["seq"] + 1)).astype(np.int32),
             "loss_mask": np.ones((m["batch"], m["seq"] + 1), np.float32)}
    with t.context():
        box = {"state": t.init_state(t.rng)}
        batch = jax.device_put(batch, t.batch_shardings)

    def step():
        with t.context():
            box["state"], out = t.train_step(box["state"], batch)
            return float(jax.block_until_ready(out)["train/loss"])
    return step


def build_torch(model: str, threads: int):
    import numpy as np
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    m = MODELS[model]
    cfg = Gemma2Config(vocab_size=m["vocab_size"], hidden_size=m["width"], intermediate_size=m["mlp_dim"],
                       num_hidden_layers=m["num_layers"], num_attention_heads=m["num_heads"],
                       num_key_value_heads=m["num_kv_heads"], head_dim=m["head_dim"],
                       sliding_window=m["sliding_window"], max_position_embeddings=max(m["seq"], 512),
                       attn_implementation="eager")
    net = Gemma2ForCausalLM(cfg)
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.02)
    rng = np.random.default_rng(0)
    ids = torch.from_numpy(rng.integers(0, m["vocab_size"], (m["batch"], m["seq"])).astype(np.int64))

    def step():
        out = net(input_ids=ids, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 3.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.item()
    return step


def _worker(conn, impl: str, model: str, variant: str, threads: int) -> None:
    """Builds one side, runs its first (compiling) step, then times `n` steps per request until None."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # torch's idle threads must not spin while JAX runs
    t0 = time.perf_counter()
    step = build_jax(model, variant) if impl == "jax" else build_torch(model, threads)
    loss = step()
    conn.send({"first_step_s": time.perf_counter() - t0, "loss": loss})
    while (n := conn.recv()) is not None:
        times, cpu = [], []
        for _ in range(n):
            t0, c0 = time.perf_counter(), time.process_time()
            loss = step()
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        conn.send({"times": times, "cpu": cpu, "loss": loss})


class Worker:
    def __init__(self, impl, model, variant, threads):
        self.impl, self.model, self.variant = impl, model, variant
        self.conn, child = mp.get_context("spawn").Pipe()
        self.proc = mp.get_context("spawn").Process(target=_worker, args=(child, impl, model, variant, threads))
        self.proc.start()
        self.first = self.conn.recv()
        self.times, self.cpu, self.loss = [], [], self.first["loss"]

    def run(self, steps: int) -> tuple[float, float]:
        """(median wall seconds, median process CPU seconds) per step of `steps` steps, run now."""
        self.conn.send(steps)
        r = self.conn.recv()
        self.times += r["times"]
        self.cpu += r["cpu"]
        self.loss = r["loss"]
        return _median(r["times"]), _median(r["cpu"])

    def close(self):
        self.conn.send(None)
        self.proc.join()


def _median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def _result(w: Worker, dtype: str) -> dict:
    m = MODELS[w.model]
    step_s = _median(w.times)
    flops = model_flops_per_step(m)
    nonembed, embed = param_counts(m)
    return dict(impl=w.impl, model=w.model, variant=w.variant, step_s=step_s, steps=len(w.times),
                step_cpu_s=_median(w.cpu),
                first_step_s=w.first["first_step_s"], tokens_per_s=m["batch"] * m["seq"] / step_s,
                model_flops_per_s=flops / step_s, mfu=flops / step_s / PEAK[dtype], flops_per_step=flops,
                params_nonembed=nonembed, params_embed=embed, loss=w.loss)


def show(r):
    print(f"{r['impl']:5s} {r['model']:5s} {r['variant']:22s} step {r['step_s'] * 1e3:9.1f} ms  "
          f"{r['tokens_per_s']:9.0f} tok/s  {r['model_flops_per_s'] / 1e9:7.1f} GFLOP/s  "
          f"MFU {100 * r['mfu']:5.1f}%  (first step {r['first_step_s']:.1f} s, loss {r['loss']:.3f}, "
          f"{r['steps']} timed steps)", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help=f"short run that finishes under load: {QUICK}")
    ap.add_argument("--only", default="tiny,131m")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--pairs", type=int, default=5, help="A B rounds per JAX variant")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per side per round (tiny: 10x)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "train.json"))
    args = ap.parse_args()
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    unknown = sorted(set(args.variants.split(",")) - set(VARIANTS))
    if unknown:
        ap.error(f"--variants: unknown {unknown}; choose from {sorted(VARIANTS)}")
    results = []
    for model in args.only.split(","):
        steps = args.steps * (10 if model == "tiny" else 1)
        torch_w = None if args.no_torch else Worker("torch", model, "f32_eager", args.threads)
        for v in args.variants.split(",") if model == "131m" else ["f32_scan"]:
            jax_w = Worker("jax", model, v, args.threads)
            ratios, cpu_ratios = [], []
            for _ in range(args.pairs):
                a, a_cpu = jax_w.run(steps)
                if torch_w:
                    b, b_cpu = torch_w.run(steps)
                    ratios.append(b / a)
                    cpu_ratios.append(b_cpu / a_cpu)
            jax_w.close()
            r = _result(jax_w, VARIANTS[v]["dtype"])
            show(r)
            if ratios:
                r["torch_over_jax_pairs"] = ratios
                r["torch_over_jax_median"] = _median(ratios)
                r["torch_over_jax_cpu_pairs"] = cpu_ratios
                r["torch_over_jax_cpu_median"] = _median(cpu_ratios)
                print(f"  {model} {v}: JAX is {r['torch_over_jax_median']:.2f}x the speed of HF torch (median of "
                      f"{len(ratios)} interleaved pairs; per pair {', '.join(f'{x:.2f}' for x in ratios)}); "
                      f"per CPU-second of the process: {r['torch_over_jax_cpu_median']:.2f}x", flush=True)
            results.append(r)
        if torch_w:
            torch_w.close()
            r = _result(torch_w, "float32")
            show(r)
            results.append(r)
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
