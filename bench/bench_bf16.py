"""Does XLA:CPU use this CPU's AVX512-BF16 units for bf16 dots? A matmul microbenchmark, f32 vs bf16, under
XLA:CPU backend options (each option set in its own process: XLA_FLAGS are read once, at backend start).

    python bench/bench_bf16.py                       # every option set, sizes 512,1024,2048
    python bench/bench_bf16.py --configs=default,onednn_dot --sizes=1024 --repeats=5
Prints GFLOP/s per (option set, size, dtype, layout) and whether the compiled dot went to a library
(oneDNN / XNNPACK / YNNPACK custom call or fusion) or to XLA's own emitter; writes bench/results/bf16.json.

dtypes: f32 (f32 in/out); bf16 (bf16 in/out, XLA's default f32 accumulation inside); bf16_f32acc (bf16 in,
`preferred_element_type=f32` out). Layouts: nn = x @ w, nt = x @ w.T (the contracting dim minor in both
operands, the layout dot-product instructions like VDPBF16PS want). Times are the best of --repeats
(the machine is shared; the best run is the least disturbed one), as wall-clock GFLOP/s and as GFLOP per
CPU-second of the process (all threads; robust to other load, a per-core efficiency). Peaks of this machine
(2 cores): 360 GFLOP/s f32, 730 GFLOP/s bf16 (bench_train.py), i.e. 180 / 365 per core-second.
`dot_operands` are the element types the optimized HLO's dot actually multiplies.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Option sets: name -> XLA_FLAGS. Flag names and values from XLA's own help strings in the installed jaxlib
# (`strings libjax_common.so`): fusion types 'dot', 'eltwise', 'reduce'; max ISA 'AVX512', 'AVX512_BF16', ...
CONFIGS = {
    "default": "",
    "onednn_dot": "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=dot",
    "onednn_custom_call": "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_custom_call=true",
    "xnnpack_dot": "--xla_cpu_use_xnnpack=true --xla_cpu_experimental_xnn_fusion_type=dot",
    "ynnpack_dot": "--xla_cpu_experimental_ynn_fusion_type=dot",
    "max_isa_avx512": "--xla_cpu_max_isa=AVX512",  # control: LLVM codegen without the BF16 instructions
}
DTYPES = ("f32", "bf16", "bf16_f32acc")
LIBRARY_MARKERS = ("__onednn", "__xnn", "__ynn")  # kinds of XLA:CPU custom fusions / calls


def dot_operand_types(hlo: str) -> list[str]:
    """Element types of the operands of every dot in an optimized HLO text, e.g. ['f32,f32']: shows
    whether the compiler kept the bf16 operands or converted them to f32 before the dot."""
    lines = hlo.splitlines()
    out = []
    for i, line in enumerate(lines):
        m = re.search(r" dot\((%[\w.\-]+), (%[\w.\-]+)\)", line)
        if not m:
            continue
        types = []
        for name in m.groups():
            for prev in reversed(lines[:i]):
                d = re.match(rf"\s*(?:ROOT )?{re.escape(name)} = (\w+)\[", prev)
                if d:
                    types.append(d.group(1))
                    break
        out.append(",".join(types))
    return out


def _child(sizes, repeats) -> list[dict]:
    """Runs in the subprocess (XLA_FLAGS already set): times every (size, dtype, layout)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    out = []
    for n in sizes:
        rng = np.random.default_rng(0)
        xf = jnp.asarray(rng.normal(size=(n, n)), jnp.float32)
        wf = jnp.asarray(rng.normal(size=(n, n)), jnp.float32)
        for dtype in DTYPES:
            dt = jnp.float32 if dtype == "f32" else jnp.bfloat16
            pref = jnp.float32 if dtype == "bf16_f32acc" else None
            x, w = xf.astype(dt), wf.astype(dt)
            for layout, spec in (("nn", "ik,kj->ij"), ("nt", "ik,jk->ij")):
                f = jax.jit(lambda x, w, spec=spec: jnp.einsum(spec, x, w, preferred_element_type=pref))
                compiled = f.lower(x, w).compile()
                text = compiled.as_text()
                jax.block_until_ready(compiled(x, w))
                times, cpu = [], []
                for _ in range(repeats):
                    t0, c0 = time.perf_counter(), time.process_time()
                    jax.block_until_ready(compiled(x, w))
                    times.append(time.perf_counter() - t0)
                    cpu.append(time.process_time() - c0)
                best = min(times)
                flop = 2 * n ** 3
                out.append(dict(size=n, dtype=dtype, layout=layout, best_s=best, gflops=flop / best / 1e9,
                                cpu_s=min(cpu), gflop_per_cpu_s=flop / max(min(cpu), 1e-9) / 1e9,
                                library=[m.strip("_") for m in LIBRARY_MARKERS if m in text],
                                dot_operands=dot_operand_types(text)))
    return out


def run_config(name: str, sizes, repeats) -> dict:
    env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + CONFIGS[name]).strip(),
               JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    code = (f"import json, sys; sys.path.insert(0, {str(ROOT)!r}); from bench import bench_bf16; "
            f"print('RESULT' + json.dumps(bench_bf16._child({list(sizes)!r}, {repeats})))")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    lines = [x for x in r.stdout.splitlines() if x.startswith("RESULT")]
    if r.returncode or not lines:
        return {"config": name, "xla_flags": CONFIGS[name], "error": (r.stderr or r.stdout)[-600:]}
    return {"config": name, "xla_flags": CONFIGS[name], "results": json.loads(lines[-1][6:])}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--sizes", default="512,1024,2048")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "bf16.json"))
    args = ap.parse_args()
    unknown = sorted(set(args.configs.split(",")) - set(CONFIGS))
    if unknown:
        ap.error(f"--configs: unknown {unknown}; choose from {sorted(CONFIGS)}")
    sizes = [int(s) for s in args.sizes.split(",")]
    report = []
    for name in args.configs.split(","):
        r = run_config(name, sizes, args.repeats)
        report.append(r)
        if "error" in r:
            print(f"{name:20s} FAILED: {r['error']}", flush=True)
            continue
        for x in r["results"]:
            print(f"{name:20s} n={x['size']:5d} {x['dtype']:12s} {x['layout']}  {x['gflops']:7.1f} GFLOP/s wall  "
                  f"{x['gflop_per_cpu_s']:7.1f} GFLOP/cpu-s  dot via {','.join(x['library']) or 'XLA emitter'} "
                  f"on {'/'.join(x['dot_operands'])}", flush=True)
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
