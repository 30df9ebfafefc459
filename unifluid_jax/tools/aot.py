"""Compile the REAL train step of a config for a TPU topology on a CPU machine; print per-chip memory + FLOPs.

    python -m unifluid_jax.tools.aot --config=configs/unifluid_2b.py --topology=v5p-256
    python -m unifluid_jax.tools.aot --config=configs/lm_tiny.py --topology=v5e:2x2 --config.train.batch_size=64
    python -m unifluid_jax.tools.aot --config=configs/unifluid_tiny.py:data=/tmp/shapes --topology=cpu:8

--topology: a Cloud TPU name ('v5p-256' counts TensorCores, 2 per chip, as do 'v4-N'; 'v5e-N' / 'v6e-N'
count chips), a raw libtpu topology ('v5p:4x4x8', 'v5e:2x2', 'v4:2x2x2'; one device per chip), or 'cpu:N'
(N host CPU devices; no TPU library needed, memory is then the CPU compiler's, a rough guide only).
TPU devices come from libtpu's topology descriptions: install the libtpu that jax[tpu] pins OFF the import
path, `pip install --no-deps --target .venv/libtpu-aot 'libtpu==0.0.42.*'` (jax 0.10.2; see find_libtpu).
They can compile but not run, so nothing here executes on them; the trainer is built exactly as for training
(`train.trainer.Trainer(config, workdir, devices=...)`) and its jitted step is lowered with abstract inputs.
Model FLOPs per step come from bench/flops.py (analytic; see there for the conventions).

Per chip (XLA memory_analysis of the SPMD program): arguments (params, optimizer state, batch shard),
outputs, aliased (donated state reused for the outputs), temporaries, generated code;
total = arguments + outputs - aliased + temporaries + generated code, compared with the chip's HBM.
Exit code: 0 fits, 1 over HBM (the message says by how much), 2 bad config or topology.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pathlib
import re
import sys
import time
from typing import Any

GIB = 1 << 30

# Cloud TPU slice shapes (chips). v4 and v5p: name counts TensorCores (2 per chip); v5e / v6e: chips.
_3D = {8: "2x2x1", 16: "2x2x2", 32: "2x2x4", 64: "2x4x4", 128: "4x4x4", 256: "4x4x8", 384: "4x4x12",
       512: "4x8x8", 640: "4x4x20", 768: "4x8x12", 896: "4x4x28", 1024: "8x8x8", 1152: "4x12x12",
       1280: "4x8x20", 1536: "8x8x12", 1792: "4x4x56", 2048: "8x8x16", 2560: "8x8x20", 3072: "8x12x16",
       4096: "8x16x16", 6144: "12x16x16", 8192: "16x16x16", 12288: "16x16x24"}
_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
NAMED = {
    **{f"v4-{n}": f"v4:{s}" for n, s in _3D.items() if n <= 4096},
    **{f"v5p-{n}": f"v5p:{s}" for n, s in _3D.items()},
    **{f"v5e-{n}": f"v5e:{s}" for n, s in _2D.items()},
    **{f"v5litepod-{n}": f"v5e:{s}" for n, s in _2D.items()},
    **{f"v6e-{n}": f"v6e:{s}" for n, s in _2D.items()},
}


@dataclasses.dataclass(frozen=True)
class Chip:
    hbm_bytes: int
    peak_bf16: float  # FLOP/s per chip (dense bf16)
    hbm_bandwidth: float  # bytes/s per chip


# Keyed by jax's device_kind of a topology device (one device = one chip; v4 / v5p in megacore mode).
# Cloud TPU system-architecture pages (cloud.google.com/tpu/docs/{v4,v5e,v5p,v6e}): peak bf16 compute per
# chip, HBM capacity and bandwidth.
CHIPS = {
    "TPU v4": Chip(32 * GIB, 275e12, 1200e9),
    "TPU v5 lite": Chip(16 * GIB, 197e12, 819e9),
    "TPU v5": Chip(95 * GIB, 459e12, 2765e9),  # v5p
    "TPU v6 lite": Chip(32 * GIB, 918e12, 1640e9),
}


class TopologyError(ValueError):
    """--topology is unknown or cannot be built here (message says why and what is accepted)."""


def topology_string(name: str) -> str:
    """'v5p-256' -> 'v5p:4x4x8'; raw 'v5p:4x4x4' and 'cpu:N' pass through."""
    name = name.strip().lower()
    if ":" in name:
        return name
    if name in NAMED:
        return NAMED[name]
    gen = name.split("-")[0]
    sizes = sorted(int(k.split("-")[1]) for k in NAMED if k.startswith(gen + "-"))
    raise TopologyError(f"--topology={name!r} is unknown; use e.g. v5p-256, v5e-16, v6e-64, v4-32 "
                        f"({gen}: {sizes if sizes else 'unknown generation'}), a raw libtpu topology like "
                        "'v5p:4x4x8' / 'v5e:2x2', or 'cpu:N'")


def find_libtpu() -> str | None:
    """libtpu.so: $TPU_LIBRARY_PATH, an importable `libtpu` package, or a side install kept off the import
    path (`pip install --target $VIRTUAL_ENV/libtpu-aot libtpu==...`, or $UNIFLUID_LIBTPU_DIR): with libtpu
    importable, every jax process on the machine loads it and takes its single-process lock file."""
    env = os.environ.get("TPU_LIBRARY_PATH")
    if env and os.path.isfile(env):
        return env
    try:
        import libtpu
        return libtpu.get_library_path()
    except ImportError:
        pass
    for base in (os.environ.get("UNIFLUID_LIBTPU_DIR"), os.path.join(sys.prefix, "libtpu-aot")):
        if base and os.path.isfile(os.path.join(base, "libtpu", "libtpu.so")):
            return os.path.join(base, "libtpu", "libtpu.so")
    return None


def tpu_devices(topology: str) -> list:
    """Compile-only TPU devices of a libtpu topology string ('v5p:4x4x8'); TopologyError if impossible."""
    kind, _, shape = topology.partition(":")
    if not re.fullmatch(r"\d+(x\d+){1,2}", shape):
        raise TopologyError(f"--topology={topology!r}: expected GEN:AxB or GEN:AxBxC, e.g. 'v5e:2x2', 'v5p:4x4x8'")
    dims = [int(x) for x in shape.split("x")] + [1] * (3 - len(shape.split("x")))
    kwargs = dict(chip_config_name="megacore" if kind in ("v4", "v5p") else "default",
                  chips_per_host_bounds=tuple(min(b, d) for b, d in zip((2, 2, 1), dims)), num_slices=1)
    lib = find_libtpu()
    if lib is None:
        raise TopologyError(f"--topology={topology}: no TPU library (libtpu) found; install the version jax pins, "
                            "off the import path: `pip install --no-deps --target $VIRTUAL_ENV/libtpu-aot "
                            "'libtpu==0.0.42.*'` (jax 0.10.2), or set TPU_LIBRARY_PATH; or use --topology=cpu:N")
    os.environ["TPU_LIBRARY_PATH"] = lib
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile only: no chips to guard
    try:
        from jax.experimental import topologies
        return list(topologies.get_topology_desc(topology_name=topology, platform="tpu", **kwargs).devices)
    except Exception as e:  # libtpu's own INVALID_ARGUMENT etc.
        raise TopologyError(f"--topology={topology}: libtpu could not describe it: {e}") from None


def devices_for(name: str) -> tuple[str, list]:
    """(canonical topology string, devices) for a --topology value."""
    import jax
    topo = topology_string(name)
    if topo.startswith("cpu:"):
        n = int(topo[4:]) if topo[4:].isdigit() else 0
        have = jax.devices("cpu")
        if n < 1 or n > len(have):
            raise TopologyError(f"--topology={name}: this process has {len(have)} CPU device(s); run with "
                                f"XLA_FLAGS=--xla_force_host_platform_device_count={max(n, 1)} (the CLI sets it)")
        return topo, have[:n]
    return topo, tpu_devices(topo)


# ---------------------------------------------------------------------------------------------------------
# Trainer built for compilation only.


def aot_trainer(config, devices):
    """`Trainer(config, workdir, devices=devices)` whose build runs under the ABSTRACT mesh.

    Trainer._build runs eagerly under `jax.set_mesh(mesh)` (jax.random.PRNGKey, ...); with compile-only TPU
    devices that eager work would be dispatched to devices that cannot execute. Under the abstract mesh the
    eager bits run on the host and the shapes/shardings come out the same; tracing the step (lowering) then
    uses the real context (concrete mesh + logical rules), so the compiled program is the training one."""
    import flax.linen as nn
    import jax

    from unifluid_jax.train import trainer as trainer_lib

    class AOTTrainer(trainer_lib.Trainer):
        _building = True

        def context(self):
            if not self._building:
                return super().context()
            stack = contextlib.ExitStack()
            stack.enter_context(jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh))
            stack.enter_context(nn.logical_axis_rules(self.rules))
            return stack

    # The per-host input split (sharding.data_shard, host bookkeeping outside the compiled step) is checked
    # for process 0 of the topology; a failure there is reported rather than stopping the compile.
    real_data_shard = trainer_lib.sharding.data_shard
    host_error = []

    def data_shard(sh, global_batch):
        try:
            return real_data_shard(sh, global_batch)
        except ValueError as e:
            host_error.append(str(e))
            return 0, 1, global_batch

    trainer_lib.sharding.data_shard = data_shard
    try:
        tr = AOTTrainer(config, "/nonexistent-aot-workdir", devices=devices)
    finally:
        trainer_lib.sharding.data_shard = real_data_shard
    tr._building = False
    tr.host_batch_error = host_error[0] if host_error else None
    return tr


# Task batch field -> the data pipeline field it is read from (tasks that rename fields, see tasks/*.py).
PIPELINE_FIELDS = {"vae": {"image": "image_gen"}}


def batch_shapes(config, task) -> dict:
    """{field: (global shape, dtype)} of a step's batch: the task's `batch_shapes(batch_size)` if it has one,
    else the toy LM's layout, else the data pipeline's `batch_spec` (UniFluid, VAE)."""
    import numpy as np

    b = int(config.train.batch_size)
    if hasattr(task, "batch_shapes"):
        return dict(task.batch_shapes(b))
    if config.task == "lm":
        from unifluid_jax.tasks import lm
        t = lm.seq_len(config.data)
        return {"tokens": ((b, t), np.int32), "loss_mask": ((b, t), np.float32)}
    from unifluid_jax.data import pipeline
    spec = pipeline.batch_spec(config.data, b)
    rename = PIPELINE_FIELDS.get(config.task, {})
    return {k: spec[rename.get(k, k)] for k in task.batch_logical_axes if rename.get(k, k) in spec}


def abstract_batch(config, tr) -> dict:
    """ShapeDtypeStructs (global shapes, the trainer's batch shardings) for every field the step receives."""
    import jax
    import numpy as np

    shapes = batch_shapes(config, tr.task)
    missing = sorted(set(tr.batch_shardings) - set(shapes))
    if missing:
        raise ValueError(f"aot: no shapes for batch fields {missing} of task {config.task!r}")
    return {k: jax.ShapeDtypeStruct(shape, np.dtype(dt), sharding=tr.batch_shardings[k])
            for k, (shape, dt) in shapes.items()}


# ---------------------------------------------------------------------------------------------------------


def _flops(config) -> dict | None:
    try:
        from bench import flops
    except ImportError:
        sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # repo checkout: bench/ beside
        try:
            from bench import flops
        except ImportError:
            return None
    try:
        out = flops.train_step_flops(config)
    except ValueError:
        return None
    out = {f"flops/{k}": v for k, v in out.items()}
    out["tokens_per_step"] = flops.tokens_per_step(config)
    return out


def compile_config(config, topology: str) -> dict[str, Any]:
    """Validates `config` for the topology's device count, builds the trainer, lowers + compiles the step.

    Returns a JSON-able report: topology, devices, mesh, per-chip memory (bytes), HBM, fits, FLOPs, times."""
    from unifluid_jax import config as config_lib

    t0 = time.perf_counter()
    topo, devices = devices_for(topology)
    config_lib.validate(config, num_devices=len(devices))
    tr = aot_trainer(config, devices)
    batch = abstract_batch(config, tr)
    t_build = time.perf_counter()
    with tr.context():
        lowered = tr.train_step.lower(tr.abstract_state, batch)
    t_lower = time.perf_counter()
    compiler_oom = None
    try:
        compiled = lowered.compile()
    except Exception as e:  # the TPU compiler refuses programs that cannot fit (RESOURCE_EXHAUSTED)
        if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
            raise
        compiled, compiler_oom = None, str(e).strip()
    t_compile = time.perf_counter()

    cost, kernels = {}, 0
    if compiled is not None:
        cost = _cost(compiled)
        kernels = compiled.as_text().count("tpu_custom_call")  # Pallas (e.g. splash attention) calls
        m = compiled.memory_analysis()
        mem = {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
               "aliased": m.alias_size_in_bytes, "temporaries": m.temp_size_in_bytes,
               "generated_code": m.generated_code_size_in_bytes}
        mem["total"] = (mem["arguments"] + mem["outputs"] - mem["aliased"] + mem["temporaries"]
                        + mem["generated_code"])
        host = {k: getattr(m, f"host_{k}_size_in_bytes", 0) for k in ("argument", "output", "temp")}
    else:  # only what the shardings say: this chip's shards of the state and batch
        mem = {"arguments": shard_bytes((tr.abstract_state, batch)), "outputs": None, "aliased": None,
               "temporaries": None, "generated_code": None, "total": None}
        host = {}
    kind = devices[0].device_kind
    chip = CHIPS.get(kind)
    report = {
        "topology": topo, "requested": topology, "device_kind": kind, "num_devices": len(devices),
        "mesh": {k: int(v) for k, v in tr.mesh.shape.items()}, "global_batch": int(config.train.batch_size),
        "memory_per_device": mem, "host_memory_per_device": host,
        "hbm_per_device": chip.hbm_bytes if chip else None,
        "fits": False if compiler_oom else (None if chip is None else mem["total"] <= chip.hbm_bytes),
        "compiler_error": compiler_oom,
        "host_batch_error": tr.host_batch_error,
        "params": int(sum(math.prod(x.shape) for x in _leaves(tr.abstract_state["params"]))),
        "pallas_kernel_calls": kernels,
        "xla_bytes_accessed_per_device": cost.get("bytes accessed"),
        "seconds": {"build": t_build - t0, "lower": t_lower - t_build, "compile": t_compile - t_lower},
    }
    fl = _flops(config)
    if fl:
        report.update(fl)
        if chip:
            report["step_seconds_at_100pct_mfu"] = fl["flops/total"] / (len(devices) * chip.peak_bf16)
            if report["xla_bytes_accessed_per_device"]:
                report["step_seconds_hbm_bound"] = report["xla_bytes_accessed_per_device"] / chip.hbm_bandwidth
                report["step_seconds_roofline"] = max(report["step_seconds_at_100pct_mfu"],
                                                      report["step_seconds_hbm_bound"])
    return report


def _cost(compiled) -> dict:
    """XLA's cost analysis of the per-device program ({} if the backend has none). Pallas kernels are opaque
    custom calls to it: their own FLOPs / bytes are not in these numbers."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # not implemented for every backend
        return {}
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return dict(cost or {})


def shard_bytes(tree) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs with shardings."""
    return int(sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in _leaves(tree)))


def _leaves(tree):
    import jax
    return jax.tree.leaves(tree)


def human_bytes(x: float) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(x) >= size:
            return f"{x / size:.2f} {unit}"
    return f"{x:.0f} B"


def human_flops(x: float) -> str:
    for unit, size in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if abs(x) >= size:
            return f"{x / size:.3g} {unit}"
    return f"{x:.3g} FLOP"


def human_seconds(x: float) -> str:
    for unit, size in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if x >= size:
            return f"{x / size:.3g} {unit}"
    return f"{x / 1e-9:.3g} ns"


def format_report(r: dict) -> str:
    mem = r["memory_per_device"]
    lines = [f"{r['requested']} -> {r['topology']}: {r['num_devices']} x {r['device_kind']}, mesh {r['mesh']}, "
             f"global batch {r['global_batch']}, {r['params'] / 1e6:.2f}M params",
             f"time: build {r['seconds']['build']:.1f}s, lower {r['seconds']['lower']:.1f}s, "
             f"XLA compile {r['seconds']['compile']:.1f}s",
             "memory per chip (" + ("from the shardings; the compiler stopped" if r.get("compiler_error")
                                    else "XLA memory_analysis") + "):"]
    for k in ("arguments", "outputs", "aliased", "temporaries", "generated_code", "total"):
        if mem[k] is not None:
            sign = "-" if k == "aliased" else " "
            lines.append(f"  {k:<15}{sign} {human_bytes(mem[k]):>12}  ({mem[k]:,} B)")
    if any(r["host_memory_per_device"].values()):
        lines.append(f"  host (offloaded): {r['host_memory_per_device']}")
    hbm = r["hbm_per_device"]
    if r.get("compiler_error"):
        lines.append(f"  the TPU compiler gave up: {r['compiler_error']}")
        lines.append("  (arguments above: this chip's shards of params, optimizer state and batch)")
    elif hbm:
        lines.append(f"  HBM              {human_bytes(hbm):>12}  -> {100 * mem['total'] / hbm:.1f}% used"
                     + ("" if r["fits"] else f", OVER by {human_bytes(mem['total'] - hbm)}"))
    else:
        lines.append(f"  ({r['device_kind']}: no HBM reference; host-compiler numbers are only a rough guide)")
    if "flops/total" in r:
        lines.append(f"model FLOPs per step: {human_flops(r['flops/total'])} "
                     f"({human_flops(r['flops/total'] / r['num_devices'])} per chip"
                     + (f", {r['tokens_per_step']:,} sequence slots" if r.get("tokens_per_step") else "") + ")")
        lines.append("  " + ", ".join(f"{k[6:]} {human_flops(v)}" for k, v in r.items()
                                      if k.startswith("flops/") and k != "flops/total"))
        if "step_seconds_at_100pct_mfu" in r:
            chip = CHIPS[r["device_kind"]]
            lines.append(f"  step time at 100% MFU (bf16 peak {human_flops(chip.peak_bf16)}/s "
                         f"per chip): {human_seconds(r['step_seconds_at_100pct_mfu'])}")
        if "step_seconds_roofline" in r:
            lines.append(f"  HBM-bound time (XLA's {human_bytes(r['xla_bytes_accessed_per_device'])} accessed per "
                         f"chip / {chip.hbm_bandwidth / 1e9:.0f} GB/s): {human_seconds(r['step_seconds_hbm_bound'])}"
                         f"; roofline step time {human_seconds(r['step_seconds_roofline'])}")
    if r.get("pallas_kernel_calls"):
        lines.append(f"Pallas kernel calls in the compiled step: {r['pallas_kernel_calls']}")
    if r.get("host_batch_error"):
        lines.append(f"WARNING: the step compiles, but the trainer's per-host batch split fails on this topology "
                     f"(training would stop before step 1): {r['host_batch_error']}")
    if r["fits"] is False:
        need = (human_bytes(mem["total"]) if mem["total"] is not None else
                f"{human_bytes(mem['arguments'])} of state and batch shards plus the compiler's temporaries")
        lines.append(f"OUT OF MEMORY: the step needs {need} per chip but a {r['device_kind']} has "
                     f"{human_bytes(hbm)} HBM; shard more (config.mesh fsdp/tensor), lower train.batch_size "
                     "(or raise optimizer.grad_accum_steps), or rematerialise more (the LLM's remat_policy)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# CLI.


def _cpu_devices_flag(argv) -> None:
    """Before jax starts: enough host CPU devices for --topology=cpu:N, and no TPU *runtime* (compile only)."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    for a in [f"{x}={y}" for x, y in zip(argv, argv[1:]) if x in ("--topology", "-topology")] + argv:
        m = re.fullmatch(r"--?topology=cpu:(\d+)", a.strip())
        if m and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
            os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                       + f" --xla_force_host_platform_device_count={m.group(1)}").strip()


def main(argv=None) -> int:
    argv = list(sys.argv if argv is None else argv)
    _cpu_devices_flag(argv)
    from absl import app, flags

    from unifluid_jax import config as config_lib
    from unifluid_jax import main as main_lib  # defines --config (same file + overrides syntax as training)

    if "topology" not in flags.FLAGS:  # main() may run more than once in a process (tests)
        flags.DEFINE_string("topology", None, "v5p-256 | v5e-16 | v4-32 | v6e-64 | v5p:4x4x8 | cpu:8 ...")
        flags.DEFINE_string("json", "", "Also write the report as JSON to this path.")
        flags.mark_flags_as_required(["config", "topology"])
    config_flag, fv = main_lib._CONFIG, flags.FLAGS
    code = {"rc": 0}

    def run(args):
        if len(args) > 1:
            raise app.UsageError(f"unexpected arguments: {args[1:]}")
        from absl import logging as absl_logging
        absl_logging.set_verbosity(absl_logging.WARNING)
        try:
            report = compile_config(config_flag.value, fv.topology)
        except (config_lib.ConfigError, TopologyError) as e:
            print(f"{type(e).__name__}: {e}", file=sys.stderr)
            code["rc"] = 2
            return
        print(format_report(report), flush=True)
        if fv.json:
            pathlib.Path(fv.json).write_text(json.dumps(report, indent=1))
        if report["fits"] is False:
            code["rc"] = 1

    try:
        app.run(run, argv=argv, flags_parser=main_lib.parse_flags)
    except SystemExit as e:
        if e.code not in (0, None):
            return int(e.code)
    return code["rc"]


if __name__ == "__main__":
    sys.exit(main())
