"""Web-scale ingestion on Apache Beam: webdataset tars / parquet / image folders / COCO / VQA / edit pairs ->
deterministic ArrayRecord shards in the project's record format (data/records.py).

    pip install -e .[beam]
    python -m unifluid_jax.tools.ingest --input='laion/{00000..00099}.tar' ... (a glob: --input='laion/*.tar') \
        --format=webdataset --out=DATA/train/caption --num_shards=64 [--task=t2i] [--max_side=512] \
        [--runner=DirectRunner --direct_running_mode=multi_processing --direct_num_workers=8]
    # a cluster: --runner=DataflowRunner --project=P --region=R --temp_location=gs://B/tmp (or FlinkRunner /
    # SparkRunner with their options); --input / --out may be gs:// paths.

Flags not listed by `--help` are Beam pipeline options. Per example (data/prepare.py, the same transforms as
the single-process importers in records.py): decode + validate with data/images.py (16-bit, EXIF, bombs,
truncation), optional shrink / JPEG re-encode to --max_side, filters (--min_side, --max_aspect,
--max_text_chars, missing / empty text), exact-duplicate drop by content hash (--dedup). Shard i is
`{out}-{i:05d}-of-{N:05d}.array_record`: records sorted by id, the same bytes on every run and runner.
Counts by reason are Beam metrics (namespace 'unifluid_ingest') and `{out}-summary.json`.
Bad input (no file matches, unknown format, unwritable output, Beam missing) is one error before the
pipeline starts (exit 2).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from unifluid_jax import fs
from unifluid_jax.data import prepare, readers, records

try:  # the optional extra: pip install -e .[beam]
    import apache_beam as beam
    from apache_beam.metrics import Metrics
except ImportError as _e:
    beam, _BEAM_ERROR = None, _e

METRICS_NAMESPACE = "unifluid_ingest"
PATH_FORMATS = ("folder", "coco", "vqa", "edit")  # images read by path in the Prepare step


class IngestError(ValueError):
    """Bad input or flags: reported as one line before the pipeline starts."""


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    ap = argparse.ArgumentParser(prog="python -m unifluid_jax.tools.ingest", description=__doc__.split("\n")[0])
    ap.add_argument("--input", required=True, help="glob(s), comma-separated (local or gs://...)")
    ap.add_argument("--format", required=True, help=" | ".join(readers.FORMATS))
    ap.add_argument("--out", required=True, help="output shard prefix")
    ap.add_argument("--num_shards", type=int, default=1)
    ap.add_argument("--task", default="", help="webdataset/parquet/folder/coco: caption (default) or t2i")
    ap.add_argument("--image_dir", default="", help="folder/coco/vqa/edit: image root (default: the input's dir)")
    ap.add_argument("--annotations", default="", help="vqa: answers JSON")
    ap.add_argument("--image_pattern", default=readers.ReadOptions.image_pattern, help="vqa: image file name")
    ap.add_argument("--image_column", default="", help="parquet image column")
    ap.add_argument("--caption_column", default="", help="parquet caption column")
    ap.add_argument("--max_side", type=int, default=0, help="shrink + JPEG re-encode above this side (0: keep)")
    ap.add_argument("--quality", type=int, default=95)
    ap.add_argument("--min_side", type=int, default=0)
    ap.add_argument("--max_aspect", type=float, default=0.0)
    ap.add_argument("--max_text_chars", type=int, default=0)
    ap.add_argument("--dedup", default="", help="image | record | none (default per format)")
    return ap.parse_known_args(list(argv))


def check_inputs(a: argparse.Namespace) -> list[str]:
    """Every check that can fail before the pipeline starts; returns the sorted input files."""
    if a.format not in readers.FORMATS:
        raise IngestError(f"--format={a.format!r} is unknown; choose one of {', '.join(readers.FORMATS)}")
    if a.num_shards < 1:
        raise IngestError(f"--num_shards={a.num_shards} must be >= 1")
    if a.dedup and a.dedup not in prepare.DEDUP_MODES:
        raise IngestError(f"--dedup={a.dedup!r} is unknown; choose one of {', '.join(prepare.DEDUP_MODES)}")
    if a.task and a.task not in ("caption", "t2i"):
        raise IngestError(f"--task={a.task!r}: use caption or t2i (vqa / edit come from --format)")
    files: list[str] = []
    for pattern in filter(None, (p.strip() for p in a.input.split(","))):
        found = [f for f in (fs.glob(pattern) if fs.has_glob(pattern) else [pattern])
                 if fs.exists(f) and not fs.isdir(f)]
        if not found:
            raise IngestError(f"--input={pattern!r} matches no files; give a file or a glob (e.g. 'dir/*.tar')")
        files.extend(found)
    if not files:
        raise IngestError("--input is empty")
    files = sorted(set(files))
    stems = [readers.stem(f) for f in files]
    if a.format in ("webdataset", "parquet") and len(set(stems)) != len(stems):
        dup = sorted({s for s in stems if stems.count(s) > 1})
        raise IngestError(f"--input: file names {dup} repeat in different folders; record ids are "
                          "'{file name}/{key}', so rename them")
    if a.annotations and not fs.exists(a.annotations):
        raise IngestError(f"--annotations={a.annotations!r} does not exist")
    if a.image_dir and not fs.isdir(a.image_dir):
        raise IngestError(f"--image_dir={a.image_dir!r} is not a folder")
    out = fs.absolute(a.out)
    if fs.isdir(out):
        raise IngestError(f"--out={a.out!r} is a folder; --out is a shard prefix such as {fs.join(a.out, 'train')!r}")
    why = fs.writable_dir_error(fs.dirname(out))
    if why:
        raise IngestError(f"--out={a.out!r} cannot be written: {why}; choose another --out")
    return files


def options(a: argparse.Namespace) -> tuple[readers.ReadOptions, prepare.Options]:
    ro = readers.ReadOptions(task=a.task, image_dir=a.image_dir, annotations=a.annotations,
                             image_pattern=a.image_pattern, image_column=a.image_column,
                             caption_column=a.caption_column)
    po = prepare.Options(max_side=a.max_side, quality=a.quality, min_side=a.min_side, max_aspect=a.max_aspect,
                         max_text_chars=a.max_text_chars, dedup=a.dedup or readers.DEFAULT_DEDUP[a.format])
    return ro, po


# ------------------------------------------------------------------------------------------ Beam transforms

def _read(path: str, fmt: str, ro: readers.ReadOptions):
    for raw in readers.read(fmt, path, ro):
        Metrics.counter(METRICS_NAMESPACE, "read").inc()
        yield raw


if beam is not None:
    class PrepareFn(beam.DoFn):
        """prepare.prepare as a DoFn: (shard, (dedup, key, record bytes, sha256)), or a 'dropped' reason."""

        def __init__(self, opts: prepare.Options, num_shards: int):
            self.opts, self.num_shards = opts, num_shards

        def setup(self):
            self.log = records.SkipLog("ingest")

        def process(self, raw):
            p = prepare.prepare(raw, self.opts, self.num_shards)
            if isinstance(p, str):
                Metrics.counter(METRICS_NAMESPACE, p).inc()
                self.log.log(p, raw.get("key"), raw.get("_why"))
                yield beam.pvalue.TaggedOutput("dropped", p)
            else:
                yield p.shard, (p.dedup, p.key, p.data, prepare.digest(p.data))


def _write(shard_and_groups, prefix: str, num_shards: int):
    shard, groups = shard_and_groups
    recs, dups = prepare.finalize_shard(groups["recs"])
    n = prepare.write_shard(records.shard_paths(prefix, num_shards)[shard], recs)
    Metrics.counter(METRICS_NAMESPACE, "written").inc(n)
    Metrics.counter(METRICS_NAMESPACE, "duplicate").inc(dups)
    return [("written", n), ("duplicate", dups)]


def build(p, files: list[str], fmt: str, ro, po, prefix: str, num_shards: int) -> None:
    """Adds the ingestion transforms to pipeline p."""
    raws = (p | "Files" >> beam.Create(files) | "SpreadFiles" >> beam.Reshuffle()
            | "Read" >> beam.FlatMap(_read, fmt, ro))
    if fmt in PATH_FORMATS:  # one annotation file lists many images: read them in parallel
        raws = raws | "SpreadExamples" >> beam.Reshuffle()
    out = raws | "Prepare" >> beam.ParDo(PrepareFn(po, num_shards)).with_outputs("dropped", main="ok")
    ids = p | "ShardIds" >> beam.Create([(i, None) for i in range(num_shards)])  # empty shards are written too
    written = ({"recs": out.ok, "ids": ids} | "ByShard" >> beam.CoGroupByKey()
               | "Write" >> beam.FlatMap(_write, prefix, num_shards))
    counts = (raws | "CountRead" >> beam.Map(lambda _: ("read", 1)),
              out.dropped | "CountDropped" >> beam.Map(lambda r: (r, 1)), written)
    extra = {"format": fmt, "input": files, "num_shards": num_shards}
    _ = (counts | "AllCounts" >> beam.Flatten() | "Sum" >> beam.CombinePerKey(sum)
         | "ToDict" >> beam.combiners.ToDict()
         | "Summary" >> beam.Map(lambda c: prepare.write_summary(prefix, c, extra)))


def run(argv: Sequence[str]) -> dict:
    a, beam_args = parse_args(argv)
    files = check_inputs(a)
    if beam is None:
        raise IngestError(f"Apache Beam is not installed ({_BEAM_ERROR}); pip install -e .[beam]")
    from apache_beam.options.pipeline_options import PipelineOptions
    try:
        popts = PipelineOptions(beam_args)
        # Beam only logs and drops flags it does not know: a typo would silently change the run
        unknown = sorted(set(popts.get_all_options(retain_unknown_options=True)) - set(popts.get_all_options()))
    except (SystemExit, ValueError) as e:
        raise IngestError(f"bad Beam pipeline options {beam_args}: {e}") from None
    if unknown:
        raise IngestError(f"unknown flags {['--' + u for u in unknown]}: neither ingest flags (see --help) "
                          "nor Beam pipeline options")
    ro, po = options(a)
    prefix = fs.absolute(a.out)
    fs.makedirs(fs.dirname(prefix))
    with beam.Pipeline(options=popts) as p:
        build(p, files, a.format, ro, po, prefix, a.num_shards)
    return json.loads(fs.read_text(prepare.summary_path(prefix)))


def main(argv: Sequence[str]) -> int:
    try:
        summary = run(argv)
    except IngestError as e:
        print(f"ingest: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    from unifluid_jax.tools import ingest  # the importable module (not __main__), so Beam workers unpickle it
    sys.exit(ingest.main(sys.argv[1:]))
