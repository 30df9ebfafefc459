"""Train-step throughput of the real trainer step (optax AdamW, jit, donated state) vs HF transformers.

    python bench/bench_train.py                      # tiny + 131M Gemma-2-style, several variants, + torch
    python bench/bench_train.py --only=131m --variants=f32_scan,bf16_scan --steps=3 --no-torch
Prints one line per variant and writes bench/results/train.json (or --out).

Model FLOPs (PaLM-style, per token, training = 3x forward):
    6 * N_nonembed + 12 * L * N_heads * H * T (attention scores + values over the full T context)
    + 6 * V * D (logits through the tied embedding)
MFU = model FLOP/s / peak; peaks are this machine's (2 cores): 360 GFLOP/s f32, 730 GFLOP/s bf16.
The torch side is transformers Gemma2ForCausalLM (eager attention, AdamW, torch.set_num_threads(2)), f32.
"""
from __future__ import annotations

import argparse
import json
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


def bench_jax(model: str, variant: str, steps: int) -> dict:
    import jax
    import jax.numpy as jnp
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
        state = t.init_state(t.rng)
        batch = jax.device_put(batch, t.batch_shardings)
        t0 = time.perf_counter()
        state, out = t.train_step(state, batch)
        jax.block_until_ready(out)
        compile_s = time.perf_counter() - t0
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            state, out = t.train_step(state, batch)
            jax.block_until_ready(out)
            times.append(time.perf_counter() - t0)
    loss = float(out["train/loss"])
    del state
    return _result("jax", model, variant, m, float(np.median(times)), compile_s, loss,
                   VARIANTS[variant]["dtype"])


def bench_torch(model: str, steps: int) -> dict:
    import numpy as np
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.set_num_threads(2)
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

    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    return _result("torch", model, "f32_eager", m, float(np.median(times)), first, loss, "float32")


def _result(impl, model, variant, m, step_s, first_s, loss, dtype) -> dict:
    tokens = m["batch"] * m["seq"]
    flops = model_flops_per_step(m)
    nonembed, embed = param_counts(m)
    return dict(impl=impl, model=model, variant=variant, step_s=step_s, first_step_s=first_s,
                tokens_per_s=tokens / step_s, model_flops_per_s=flops / step_s,
                mfu=flops / step_s / PEAK[dtype], flops_per_step=flops, params_nonembed=nonembed,
                params_embed=embed, loss=loss)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="tiny,131m")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--steps", type=int, default=3, help="timed steps for 131m (tiny: 10x)")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "train.json"))
    args = ap.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    results = []

    def show(r):
        print(f"{r['impl']:5s} {r['model']:5s} {r['variant']:22s} step {r['step_s'] * 1e3:9.1f} ms  "
              f"{r['tokens_per_s']:9.0f} tok/s  {r['model_flops_per_s'] / 1e9:7.1f} GFLOP/s  "
              f"MFU {100 * r['mfu']:5.1f}%  (first step {r['first_step_s']:.1f} s, loss {r['loss']:.3f})",
              flush=True)
        results.append(r)

    for model in args.only.split(","):
        steps = args.steps * (10 if model == "tiny" else 1)
        variants = args.variants.split(",") if model == "131m" else ["f32_scan"]
        for v in variants:
            show(bench_jax(model, v, steps))
        if not args.no_torch:
            show(bench_torch(model, steps))
            jax_f32 = [r for r in results if r["model"] == model and r["impl"] == "jax"]
            best = min(jax_f32, key=lambda r: r["step_s"])
            print(f"  {model}: best jax ({best['variant']}) is {results[-1]['step_s'] / best['step_s']:.2f}x "
                  "the speed of torch", flush=True)
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
