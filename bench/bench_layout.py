"""Fixed vs packed rows for the 0.7B and 2B configs: valid slots / all slots and analytic FLOPs per example.

    python bench/bench_layout.py [--rows 16] [--batches 40]

Examples are drawn from a t2i 50% / caption 25% / VQA 25% mix with text lengths (Gemma tokens) modelled on the
paper's data: t2i prompts and COCO-style captions ~ N(14, 5) tokens clipped to [3, 40] (COCO captions average
10.5 words), VQA questions ~ N(8, 3) clipped to [3, 30] (VQAv2: 6.2 words) with answers of 1-3 tokens
(VQAv2: 1.1 words), the caption question "caption en" (2 tokens) and SEP. SigLIP So400m/14 at 224 px gives
256 und slots, the 256 px VAE 1 + 256 gen slots, 64 text slots.

Rows are packed by the pipeline's own packer (data/packing.py RowBatching over an in-memory stream, deferral
included). FLOPs (bench/flops.py conventions: model FLOPs, trained parts 3x forward, frozen SigLIP / VAE 1x)
count what the implementation computes: the LLM over every slot of every row, text logits at T target
entries per row, SigLIP / VAE / diffusion head on all U / G image entries of a row (empty ones included).
Attention is shown dense (XLA: S^2 per row) and block-sparse by segment (what a segment-aware kernel such as
splash can skip to: the sum over examples of their length^2).
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import grain
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from bench import flops  # noqa: E402
from unifluid_jax import layout  # noqa: E402
from unifluid_jax.data import packing  # noqa: E402
from unifluid_jax.models import unifluid  # noqa: E402
from unifluid_jax import presets  # noqa: E402

MIX = ((layout.T2I, 0.5), (layout.CAPTION, 0.25), (layout.VQA, 0.25))


def sample_examples(n: int, max_text_len: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    tasks = rng.choice([t for t, _ in MIX], size=n, p=[w for _, w in MIX])
    norm = lambda mu, sd, lo, hi: int(np.clip(round(rng.normal(mu, sd)), lo, hi))
    out = []
    for t in tasks:
        if t == layout.T2I:
            text = layout.text_layout(t, [5] * norm(14, 5, 3, 40), None, max_text_len, truncate=True)
        elif t == layout.CAPTION:
            text = layout.text_layout(t, [5, 6], [7] * norm(14, 5, 3, 40), max_text_len, sep_ids=(4,))
        else:
            text = layout.text_layout(t, [5] * norm(8, 3, 3, 30), [7] * int(rng.integers(1, 4)), max_text_len,
                                      sep_ids=(4,))
        out.append({"task": np.int32(t), **text})
    return out


def pack(examples, dims, spec, packed: bool, rows: int, batches: int):
    it = iter(packing.RowBatching(grain.MapDataset.source(examples).to_iter_dataset(), rows, spec, dims, {},
                                  packed=packed, num_reasons=1, max_consecutive_skips=10**9))
    return [next(it) for _ in range(batches)]


def step_flops(cfg, spec, out) -> dict[str, float]:
    """Analytic train FLOPs of the laid-out batches `out` (summed) and the examples they carry."""
    llm, tr = cfg.llm, flops.TRAIN
    p = flops.gemma_params(llm)
    attn_unit = tr * 4.0 * llm.num_layers * llm.num_heads * llm.head_dim
    f = dict.fromkeys(("llm_matmul", "attention_dense", "attention_segments", "logits", "siglip", "vae_encode",
                       "diffusion_head"), 0.0)
    examples = 0
    for b in out:
        r, s = b["segment_ids"].shape
        examples += int(b["task_count"].sum())
        f["llm_matmul"] += tr * 2.0 * p["layers"] * r * s
        f["attention_dense"] += attn_unit * r * s * s
        for row in b["segment_ids"]:
            lens = np.bincount(row[row > 0])
            f["attention_segments"] += attn_unit * float((lens ** 2).sum())
        f["logits"] += tr * 2.0 * r * spec.targets * llm.vocab_size * llm.width
        f["siglip"] += flops.siglip_forward_flops(cfg.siglip, r * spec.und)
        f["vae_encode"] += flops.vae_encode_flops(cfg.vae, r * spec.gen)
        f["diffusion_head"] += tr * flops.diffusion_head_forward_flops(
            cfg.diffusion, llm.width, r * spec.gen * cfg.n_img * cfg.diffusion.batch_mul)
    return {k: v / examples for k, v in f.items()}, examples


def throughput(pairs: int, rows: int, seed: int = 0):
    """Training examples / s of the demo model (configs/unifluid_demo.py sizes), fixed vs packed rows of the
    same shape, interleaved A B A B; prints each pair and the median of the per-pair ratios."""
    import time

    import jax
    import optax

    cfg = unifluid.config_from_dict(presets.unifluid_model("demo"))
    dims = cfg.dims
    rng = np.random.default_rng(seed)
    exs = sample_examples(rows * 8, cfg.max_text_len, seed)
    g, u = cfg.vae.image_size, cfg.siglip.image_size  # the demo's image sizes
    for ex in exs:
        if int(ex["task"]) == layout.T2I:
            ex["image_gen"] = rng.uniform(-1, 1, (g, g, 3)).astype(np.float32)
        else:
            ex["image_und"] = rng.uniform(-1, 1, (u, u, 3)).astype(np.float32)
    images = {"image_gen": ((g, g, 3), np.float32), "image_und": ((u, u, 3), np.float32)}
    batches = {}
    for name, spec in (("fixed", layout.fixed_spec(dims)), ("packed", layout.packed_spec(dims))):
        it = iter(packing.RowBatching(grain.MapDataset.source(exs).to_iter_dataset(), rows, spec, dims, images,
                                      packed=name == "packed", num_reasons=1, max_consecutive_skips=10**9))
        b = next(it)
        b.pop("num_skipped")
        batches[name] = b
    model = unifluid.UniFluid(cfg)
    params = jax.jit(lambda r: model.init(r, batches["fixed"], method=unifluid.UniFluid.init_all))(
        jax.random.PRNGKey(0))
    opt = optax.adam(1e-3)

    @jax.jit
    def step(params, state, batch, rng):
        (loss, _), g = jax.value_and_grad(lambda p: model.apply(p, batch, rng, 0, 100, method=model.loss),
                                          has_aux=True)(params)
        updates, state = opt.update(g, state)
        return optax.apply_updates(params, updates), state, loss

    state = opt.init(params)
    n_ex = {k: int(b["task_count"].sum()) for k, b in batches.items()}
    for k, b in batches.items():  # compile + warm up
        jax.block_until_ready(step(params, state, b, jax.random.PRNGKey(0)))
        print(f"{k}: {rows} rows x {b['tokens'].shape[1]} slots, {n_ex[k]} examples/step, "
              f"valid {layout.valid_fraction(b):.1%}")
    ratios = []
    for i in range(pairs):
        rate = {}
        for k in ("fixed", "packed"):
            t0 = time.perf_counter()
            jax.block_until_ready(step(params, state, batches[k], jax.random.PRNGKey(i)))
            rate[k] = n_ex[k] / (time.perf_counter() - t0)
        ratios.append(rate["packed"] / rate["fixed"])
        print(f"pair {i}: fixed {rate['fixed']:.1f} ex/s, packed {rate['packed']:.1f} ex/s, ratio {ratios[-1]:.2f}")
    print(f"median packed / fixed examples per second: {np.median(ratios):.2f}x over {pairs} pairs")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=16, help="rows per batch")
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--throughput", type=int, default=0, metavar="PAIRS",
                    help="instead: demo-model training examples/s, fixed vs packed, PAIRS interleaved pairs")
    args = ap.parse_args(argv)
    if args.throughput:
        return throughput(args.throughput, args.rows)
    for size in ("0p7b", "2b"):
        m = presets.unifluid_model(size)
        m.vae.image_size = 256
        m.siglip.image_size = 224
        cfg = unifluid.config_from_dict(m)
        dims = cfg.dims
        exs = sample_examples(args.rows * args.batches * 16, cfg.max_text_len)
        print(f"\n{size}: n_und={dims.n_und}, L={dims.max_text_len}, 1+n_img={1 + dims.n_img}, fixed row "
              f"{dims.fixed_len} slots; {args.rows} rows x {args.batches} batches; GFLOP per example")
        print(f"{'layout':<34}{'valid':>7}{'ex/row':>8}{'total':>10}{'llm':>9}{'attn dense':>11}"
              f"{'attn seg':>10}{'logits':>8}{'siglip':>8}{'vae':>8}{'head':>8}")
        variants = [("fixed", layout.fixed_spec(dims), False)]
        for s in (dims.fixed_len, 560, 1120, 1152, 2240):
            spec = layout.packed_spec(dims, s)
            variants.append((f"packed S={s} U=G={spec.gen} T={spec.targets}", spec, True))
        base = None
        for name, spec, packed in variants:
            try:
                layout.check_spec(spec, dims, [t for t, _ in MIX])
            except layout.LayoutError:
                continue
            out = pack(exs, dims, spec, packed, args.rows, args.batches)
            f, n = step_flops(cfg, spec, out)
            valid = float(np.mean([(b["segment_ids"] > 0).mean() for b in out]))
            total = f["llm_matmul"] + f["attention_dense"] + f["logits"] + f["siglip"] + f["vae_encode"] \
                + f["diffusion_head"]
            base = base or total
            g = lambda k: f[k] / 1e9
            print(f"{name:<34}{valid:>7.1%}{n / (args.rows * args.batches):>8.2f}{total / 1e9:>10.0f}"
                  f"{g('llm_matmul'):>9.0f}{g('attention_dense'):>11.0f}{g('attention_segments'):>10.0f}"
                  f"{g('logits'):>8.0f}{g('siglip'):>8.0f}{g('vae_encode'):>8.0f}{g('diffusion_head'):>8.0f}"
                  f"   {base / total:.2f}x")


if __name__ == "__main__":
    main()
