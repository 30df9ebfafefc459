"""Data pipeline throughput: JPEG decode + resize + tokenize + layout + batch, in examples/s per core.

    python bench/bench_data.py --src_size=256 --gen_size=256 --und_size=224 --workers=0,2

Writes a temporary ArrayRecord set of JPEG shapes scenes (with texture, so JPEG decode costs like a photo),
a mix of all four tasks, then times the grain pipeline in-process (worker_count=0, 1 read thread: ~1 core)
and with N worker processes. Reports wall-clock examples/s, wall / N workers, and examples per CPU-second
(process + worker CPU time; the robust per-core number on a shared machine). Goal: >= 200 examples/s/core
at 256 px.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
from absl import flags  # noqa: E402
from PIL import Image  # noqa: E402

from unifluid_jax.data import layout, pipeline, records, shapes  # noqa: E402


def _jpeg(img: np.ndarray, rng) -> bytes:
    noise = rng.normal(0, 12, img.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img + noise, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_data(out: str, n: int, src_size: int) -> dict:
    rng = np.random.default_rng(0)
    texts = set(shapes.vocabulary_texts())
    writers = {t: records.RecordWriter(os.path.join(out, t), 1) for t in layout.TASKS}
    for i in range(n):
        e = shapes.example("train", i, size=src_size)
        img = _jpeg(e["image"], rng)
        writers["t2i"].write({"task": "t2i", "image": img, "caption": e["prompt"]})
        writers["caption"].write({"task": "caption", "image": img, "caption": e["caption"]})
        writers["vqa"].write({"task": "vqa", "image": img, "question": e["question"], "answer": e["answer"]})
        writers["edit"].write({"task": "edit", "image": img, "image2": _jpeg(e["target_image"], rng),
                               "instruction": e["instruction"]})
        texts |= {e["prompt"], e["caption"], e["question"], e["answer"], e["instruction"]}
    for w in writers.values():
        w.close()
    from unifluid_jax.data.tokenizer import train_tokenizer
    return {"tokenizer": train_tokenizer(sorted(texts), os.path.join(out, "tok"), 256),
            "jpeg_bytes": int(np.mean([len(r["image"]) for r in records.read_records(os.path.join(out, "t2i"))]))}


def _cpu_seconds() -> float:
    """CPU time of this process and its live children (grain workers): wall clock is meaningless on a
    machine shared with other jobs, CPU seconds per example is not."""
    try:
        import psutil
    except ImportError:
        return time.process_time()
    me = psutil.Process()
    procs = [me] + me.children(recursive=True)
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def run(out, tok, args, workers: int) -> tuple[float, float]:
    """(examples per wall-clock second, examples per CPU second)."""
    c = pipeline.default_config()
    c.sources = [{"path": os.path.join(out, t), "kind": "array_record", "weight": w, "task": ""}
                 for t, w in zip(layout.TASKS, (0.4, 0.25, 0.25, 0.1))]
    c.gen_size, c.und_size, c.max_text_len = args.gen_size, args.und_size, 64
    c.tokenizer, c.per_host_batch_size, c.worker_count = tok, args.batch, workers
    c.read_threads = 1  # per process: in-process run ~ 1 core
    it = pipeline.make_iterator(c, shard_index=0, shard_count=1)
    for _ in range(args.warmup):
        next(it)
    t, c = time.perf_counter(), _cpu_seconds()
    for _ in range(args.steps):
        next(it)
    dt, dc = time.perf_counter() - t, _cpu_seconds() - c
    if workers:
        it.close()
    n = args.steps * args.batch
    return n / dt, n / dc


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--src_size", type=int, default=256)
    p.add_argument("--gen_size", type=int, default=256)
    p.add_argument("--und_size", type=int, default=224)
    p.add_argument("--num_records", type=int, default=256)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--workers", default="0,2")
    args = p.parse_args()
    flags.FLAGS.mark_as_parsed()
    with tempfile.TemporaryDirectory() as out:
        info = make_data(out, args.num_records, args.src_size)
        results = {"src_size": args.src_size, "gen_size": args.gen_size, "und_size": args.und_size,
                   "mean_jpeg_bytes": info["jpeg_bytes"], "cpu_count": os.cpu_count()}
        for w in (int(x) for x in args.workers.split(",")):
            eps, per_cpu_s = run(out, info["tokenizer"], args, w)
            results[f"workers={w}"] = {"examples_per_s_wall": round(eps, 1),
                                       "examples_per_cpu_s": round(per_cpu_s, 1),
                                       "wall_per_core": round(eps / max(w, 1), 1)}
        results["load_average_1m"] = round(os.getloadavg()[0], 2)
        print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
