"""tools/aot.py: the real train step compiles for a TPU topology on this CPU machine (libtpu's compile-only
devices) and reports per-chip memory; a config over HBM exits non-zero with a clear message; the cpu:N
fallback; and bench/flops.py's analytic counts against XLA's own count on small unscanned modules."""
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from bench import flops
from tests.train import runner
from unifluid_jax.tools import aot

NO_LIBTPU = ("libtpu not found (tools/aot.find_libtpu: $TPU_LIBRARY_PATH, an importable libtpu, or "
             "$VIRTUAL_ENV/libtpu-aot); install with `pip install --no-deps --target .venv/libtpu-aot "
             "'libtpu==0.0.42.*'`")
needs_tpu = pytest.mark.skipif(aot.find_libtpu() is None, reason=NO_LIBTPU)

# gemma2_2b's shapes on the toy LM task (its data only fixes the sequence length, 16 tokens).
GEMMA2_2B = dict(num_layers=26, width=2304, num_heads=8, num_kv_heads=4, head_dim=256, mlp_dim=9216,
                 vocab_size=256000, sliding_window=4096)


def test_topology_names():
    assert aot.topology_string("v5p-256") == "v5p:4x4x8"  # 256 TensorCores = 128 chips
    assert aot.topology_string("v5p-8") == "v5p:2x2x1"
    assert aot.topology_string("v4-32") == "v4:2x2x4"
    assert aot.topology_string("v5e-16") == "v5e:4x4"  # v5e / v6e count chips
    assert aot.topology_string("V6E-256") == "v6e:16x16"
    assert aot.topology_string("v5p:4x4x4") == "v5p:4x4x4"
    assert aot.topology_string("cpu:8") == "cpu:8"
    with pytest.raises(aot.TopologyError, match="unknown.*v5p-256"):
        aot.topology_string("v5p-7")


def _check_report(r, kind_prefix):
    mem = r["memory_per_device"]
    assert r["device_kind"].startswith(kind_prefix)
    for k in ("arguments", "outputs", "generated_code", "total"):
        assert mem[k] > 0, (k, mem)
    assert mem["total"] == (mem["arguments"] + mem["outputs"] - mem["aliased"] + mem["temporaries"]
                            + mem["generated_code"])
    assert r["flops/total"] > 0 and r["params"] > 0
    assert "memory per chip" in aot.format_report(r)


@needs_tpu
def test_tiny_lm_compiles_for_tpu():
    cfg = runner.load_config("configs/lm_tiny.py")
    r = aot.compile_config(cfg, "v5e:2x2")
    _check_report(r, "TPU v5 lite")
    assert r["num_devices"] == 4 and r["fits"] and r["hbm_per_device"] == 16 * aot.GIB
    # Donated state: the new state reuses the old state's buffers.
    assert r["memory_per_device"]["aliased"] > 0.9 * r["memory_per_device"]["outputs"]
    assert r["pallas_kernel_calls"] == 0  # attention_impl 'xla'
    assert r["step_seconds_roofline"] >= r["step_seconds_at_100pct_mfu"] > 0


@needs_tpu
def test_splash_attention_compiles_for_tpu():
    """attention_impl='splash': the train step (forward + the dq / dkv backward kernels, shard_map over the
    4-way fsdp batch) compiles for TPU; head_dim 128 = one lane tile, as the Mosaic kernel needs."""
    cfg = runner.load_config("configs/lm_tiny.py")
    cfg.gemma.head_dim = 128
    cfg.gemma.attention_impl = "splash"
    r = aot.compile_config(cfg, "v5e:2x2")
    _check_report(r, "TPU v5 lite")
    assert r["fits"]
    # 2 layers (local + global) x (forward, dq, dkv); the exact count depends on XLA's fusion of the scan.
    assert r["pallas_kernel_calls"] >= 3
    assert "Pallas kernel calls in the compiled step" in aot.format_report(r)


@pytest.mark.slow  # ~40 s of XLA:TPU compile on 2 cores (VAE + SigLIP + Gemma + head in one step)
@needs_tpu
@pytest.mark.slow
def test_tiny_unifluid_compiles_for_tpu(tmp_path):
    # The data dir is only named (config validation); nothing is opened until Trainer.run().
    cfg = runner.load_config("configs/unifluid_tiny.py", f"data={tmp_path / 'absent'}")
    r = aot.compile_config(cfg, "v5p:2x2x1")
    _check_report(r, "TPU v5")
    assert r["num_devices"] == 4 and r["fits"]
    assert {"vae_encode", "siglip", "diffusion_head", "llm_matmul"} <= {k[6:] for k in r if k.startswith("flops/")}
    assert not (tmp_path / "absent").exists()


@needs_tpu
def test_over_hbm_exits_nonzero_with_message(tmp_path):
    """gemma2_2b trained with AdamW on one 16 GiB v5e chip: params + grads + 2 moments alone do not fit."""
    overrides = [f"--config.gemma.{k}={v}" for k, v in GEMMA2_2B.items()]
    r = _run_cli(f"--config={runner.ROOT / 'configs/lm_tiny.py'}", "--topology=v5e-1",
                 "--config.train.batch_size=64", *overrides, f"--json={tmp_path / 'r.json'}")
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-3000:]
    # Either memory_analysis says so, or (libtpu 0.0.42) the compiler itself refuses: RESOURCE_EXHAUSTED.
    assert "OUT OF MEMORY: the step needs" in r.stdout, r.stdout
    assert "but a TPU v5 lite has 16.00 GiB HBM" in r.stdout, r.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["fits"] is False and report["num_devices"] == 1
    # f32 params + AdamW moments of 2.6B params: >= 29 GiB of state on the one chip.
    assert report["memory_per_device"]["arguments"] > 29 * aot.GIB


def test_report_over_hbm_from_memory_analysis():
    """memory_analysis total above the chip's HBM -> fits False, 'OVER by' and the advice line."""
    mem = dict(arguments=20 * aot.GIB, outputs=20 * aot.GIB, aliased=20 * aot.GIB, temporaries=5 * aot.GIB,
               generated_code=aot.GIB)
    mem["total"] = 26 * aot.GIB
    r = dict(requested="v5e-4", topology="v5e:2x2", device_kind="TPU v5 lite", num_devices=4, global_batch=8,
             mesh={"data": 1, "fsdp": 4, "tensor": 1}, params=10**9, memory_per_device=mem,
             host_memory_per_device={}, hbm_per_device=16 * aot.GIB, fits=False, compiler_error=None,
             seconds=dict(build=1.0, lower=1.0, compile=1.0))
    text = aot.format_report(r)
    assert "OVER by 10.00 GiB" in text
    assert "OUT OF MEMORY: the step needs 26.00 GiB per chip but a TPU v5 lite has 16.00 GiB HBM" in text


def _run_cli(*args, timeout=300):
    cmd = [sys.executable, "-m", "unifluid_jax.tools.aot", *args]
    env = dict(os.environ, PYTHONPATH=str(runner.ROOT), JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    return subprocess.run(cmd, cwd=runner.ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_bad_topology_exits_2():
    r = _run_cli(f"--config={runner.ROOT / 'configs/lm_tiny.py'}", "--topology=v5p-7", timeout=60)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "TopologyError: --topology='v5p-7' is unknown" in r.stderr
    assert "Traceback" not in r.stderr


def test_cpu_fallback_reports_memory():
    """--topology=cpu:N compiles the same step on N host devices (conftest gives this process 8)."""
    cfg = runner.load_config("configs/lm_tiny.py")
    r = aot.compile_config(cfg, "cpu:8")
    assert r["num_devices"] == 8 and r["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert r["memory_per_device"]["arguments"] > 0 and r["memory_per_device"]["total"] > 0
    assert r["hbm_per_device"] is None and r["fits"] is None
    assert "rough guide" in aot.format_report(r)


# ------------------------------------------------------------------------------------- bench/flops.py


def _xla_flops(f, *args) -> float:
    return jax.jit(f).lower(*args).compile().cost_analysis()["flops"]


def _params(module, *args, method=None):
    init = (lambda r, *a: module.init(r, *a, method=method)) if method else module.init
    return nn.unbox(jax.eval_shape(init, jax.random.key(0), *args))


def test_analytic_flops_match_xla_on_small_modules():
    """Matmuls/convs counted analytically are within 6% of XLA's count (which adds elementwise ops)."""
    from unifluid_jax.models import diffusion, gemma, vae

    vcfg = vae.get_config("tiny_f8")
    v = vae.AutoencoderKL(vcfg)
    x = jnp.zeros((2, 64, 64, 3))
    got = _xla_flops(lambda p, x: v.apply(p, x, method=v.encode), _params(v, x), x)
    assert flops.vae_encode_flops(vcfg, 2) == pytest.approx(got, rel=0.06)

    dcfg = diffusion.DiffusionConfig(depth=3, width=256, in_channels=16)
    h = diffusion.DiffusionHead(dcfg)
    args = (jnp.zeros((64, 16)), jnp.zeros((64,), jnp.int32), jnp.zeros((64, 128)))
    got = _xla_flops(lambda p, *a: h.apply(p, *a), _params(h, *args), *args)
    assert flops.diffusion_head_forward_flops(dcfg, 128, 64) == pytest.approx(got, rel=0.06)

    gcfg = gemma.get_config("gemma2_tiny", num_layers=2, scan_layers=False)
    g = gemma.Gemma(gcfg)
    tok = jnp.zeros((2, 32), jnp.int32)
    gp = _params(g, tok, method=g.forward)
    got = _xla_flops(lambda p, t: g.apply(p, t, method=g.forward), gp, tok)
    assert sum(flops.gemma_forward_flops(gcfg, 2, 32).values()) == pytest.approx(got, rel=0.06)
    kernels = ("q_einsum", "kv_einsum", "attn_vec_einsum", "gating_einsum", "'linear'")
    counted = sum(x.size for path, x in jax.tree_util.tree_flatten_with_path(gp)[0]
                  if any(n in jax.tree_util.keystr(path) for n in kernels))
    assert counted == flops.gemma_params(gcfg)["layers"]


def test_train_step_flops_of_configs():
    lm = runner.load_config("configs/lm_tiny.py")
    f = flops.train_step_flops(lm)
    assert f["total"] == pytest.approx(f["llm_matmul"] + f["llm_attention"] + f["llm_logits"])
    # 2B UniFluid: the LLM over the full sequence dominates; the frozen VAE/SigLIP are forward-only.
    from unifluid_jax.models import unifluid
    cfg = runner.load_config("configs/unifluid_2b.py")
    uf = flops.train_step_flops(cfg)
    m = unifluid.config_from_dict(cfg.model)
    assert m.seq_len == 256 + 64 + 1 + 256  # SigLIP | text | BOI + 16x16 image tokens
    assert uf["llm_matmul"] == 6 * flops.gemma_params(m.llm)["layers"] * 2048 * m.seq_len
    assert uf["llm_matmul"] > 10 * max(uf["vae_encode"], uf["siglip"], uf["diffusion_head"])
    assert min(uf.values()) > 0
    assert uf["total"] == pytest.approx(sum(v for k, v in uf.items() if k != "total"))
