"""Ingestion throughput: the Beam pipeline (tools/ingest.py, DirectRunner) vs the single-process importer
(records.py's path: data/readers.py + data/prepare.run_local) on the same synthetic JPEG + caption pairs.

    python bench/bench_ingest.py --n=2000 --size=256 --max_side=192 --workers=2   (needs pip install -e .[beam])

Writes n JPEGs (textured, so decoding costs like a photo) + a captions JSONL (the 'folder' format) to a temp
dir, then times: the single-process importer, Beam in-process (DirectRunner's default), Beam multi-process
(--direct_running_mode=multi_processing --direct_num_workers=W). Every run decodes + validates each image,
shrinks + re-encodes it to --max_side, dedups and writes --num_shards shards; the shards are checked to be
byte-identical across the three. Reports examples/s (wall clock, including Beam's start-up) and the
process CPU seconds of the driver.
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
from PIL import Image  # noqa: E402

from unifluid_jax.data import prepare, readers, records  # noqa: E402
from unifluid_jax.tools import ingest  # noqa: E402


def make_data(out: str, n: int, size: int) -> str:
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(out, "img"), exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size]
    with open(os.path.join(out, "captions.jsonl"), "w") as f:
        for i in range(n):
            base = np.stack([(xx * (i % 7 + 1)) % 256, (yy * (i % 5 + 1)) % 256, (xx + yy + i) % 256], -1)
            img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="JPEG", quality=90)
            with open(os.path.join(out, "img", f"{i:06d}.jpg"), "wb") as g:
                g.write(buf.getvalue())
            f.write(json.dumps({"image": f"img/{i:06d}.jpg", "caption": f"synthetic picture number {i}"}) + "\n")
    return os.path.join(out, "captions.jsonl")


def _timed(fn):
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--max_side", type=int, default=192)
    ap.add_argument("--num_shards", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    if ingest.beam is None:
        sys.exit("bench_ingest: Apache Beam is not installed (pip install -e .[beam])")
    with tempfile.TemporaryDirectory() as d:
        caps = make_data(d, a.n, a.size)
        opts = prepare.Options(max_side=a.max_side, dedup="image")
        common = [f"--input={caps}", "--format=folder", f"--num_shards={a.num_shards}", f"--max_side={a.max_side}"]
        runs = {
            "single-process importer": lambda: prepare.run_local(
                readers.read("folder", caps, readers.ReadOptions()), f"{d}/local/x", a.num_shards, opts)[1],
            "beam DirectRunner in-process": lambda: ingest.run(common + [f"--out={d}/beam1/x"]),
            f"beam DirectRunner multi_processing x{a.workers}": lambda: ingest.run(
                common + [f"--out={d}/beamN/x", "--direct_running_mode=multi_processing",
                          f"--direct_num_workers={a.workers}"]),
        }
        rows = []
        for name, fn in runs.items():
            summary, wall, cpu = _timed(fn)
            assert summary["written"] == a.n, summary
            rows.append({"run": name, "examples": a.n, "wall_s": round(wall, 2), "examples_per_s": round(a.n / wall, 1),
                         "driver_cpu_s": round(cpu, 2)})
        shards = {p: [open(f, "rb").read() for f in records.shard_paths(f"{d}/{p}/x", a.num_shards)]
                  for p in ("local", "beam1", "beamN")}
        identical = shards["local"] == shards["beam1"] == shards["beamN"]
    print(f"{a.n} JPEG pairs {a.size}px -> max_side {a.max_side}, {a.num_shards} shards, "
          f"{os.cpu_count()} CPUs; shards byte-identical across runs: {identical}")
    print(f"{'run':<40} {'wall s':>8} {'examples/s':>11} {'driver CPU s':>13}")
    for r in rows:
        print(f"{r['run']:<40} {r['wall_s']:>8} {r['examples_per_s']:>11} {r['driver_cpu_s']:>13}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": rows, "identical": identical, **vars(a)}, f, indent=1)
    if not identical:
        sys.exit("bench_ingest: shards differ between runs")


if __name__ == "__main__":
    main()
