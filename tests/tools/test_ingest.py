"""tools/ingest.py (Apache Beam, DirectRunner) and the single-process importers on the same transforms: tiny
webdataset tars (built with tarfile per the webdataset format: members KEY.EXT grouped by key) and parquet
files (pyarrow), with corrupt members, missing captions and duplicate images; exact counts, grain reads the
output, byte-identical shards across runs, runners and the local importer; bad input is one error."""
import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from unifluid_jax.data import pipeline as P
from unifluid_jax.data import prepare, readers
from unifluid_jax.data import records as R
from unifluid_jax.data.tokenizer import Tokenizer, train_tokenizer
from unifluid_jax.tools import ingest

from tests.data.test_images import _bomb, _cut_jpeg, _gradient16, _png16

beam_only = pytest.mark.skipif(ingest.beam is None, reason="Apache Beam not installed (pip install -e .[beam])")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _jpg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (24, 32, 3), np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _tar(path, members):
    with tarfile.open(path, "w") as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            t.addfile(info, io.BytesIO(data))


# (file stem, key) -> expected outcome ('ok' or a drop reason)
WDS_EXPECTED = {("a", "0000"): "ok", ("a", "0001"): "ok", ("a", "0002"): "not_image", ("a", "0003"): "missing_text",
                ("a", "0004"): "duplicate", ("a", "0005"): "truncated", ("a", "0006"): "missing_image",
                ("a", "0007"): "empty_text", ("a", "0008"): "ok", ("b", "0000"): "ok", ("b", "0001"): "too_large",
                ("b", "0002"): "duplicate"}
PQ_EXPECTED = {"k0": "ok", "k1": "missing_image", "k2": "missing_text", "k3": "duplicate", "k4": "not_image",
               "k5": "ok"}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("ingest_in")
    _tar(d / "a.tar", [
        ("0000.jpg", _jpg(0)), ("0000.txt", b"a red circle"),
        ("0001.jpg", _jpg(1)), ("0001.txt", b"a blue square"),
        ("0002.jpg", b"garbage, not a jpeg"), ("0002.txt", b"corrupt member"),
        ("0003.jpg", _jpg(3)),                                           # no caption
        ("0004.jpg", _jpg(0)), ("0004.txt", b"the same picture as 0000"),  # exact duplicate image
        ("0005.jpg", _cut_jpeg()), ("0005.txt", b"cut short"),
        ("0006.txt", b"a caption without an image"),
        ("0007.jpg", _jpg(7)), ("0007.txt", b"   "),
        ("0008.png", _png16(_gradient16())), ("0008.json", json.dumps({"caption": "a grey ramp"}).encode()),
    ])
    _tar(d / "b.tar", [("0000.jpg", _jpg(10)), ("0000.txt", b"a green triangle"),
                       ("0001.png", _bomb()), ("0001.txt", b"a bomb"),
                       ("0002.jpg", _jpg(1)), ("0002.txt", b"duplicate across tars")])
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"key": ["k0", "k1", "k2", "k3", "k4", "k5"],
                             "jpg": [_jpg(20), None, _jpg(21), _jpg(20), b"\x00" * 10, _jpg(22)],
                             "txt": ["green", "no image", None, "dup", "bad", "red"]}), d / "p1.parquet")
    return d


def _args(inp, fmt, out, shards=3, *extra):
    return [f"--input={inp}", f"--format={fmt}", f"--out={out}", f"--num_shards={shards}", *extra]


def _shard_bytes(prefix, n):
    return [open(p, "rb").read() for p in R.shard_paths(str(prefix), n)]


def _expected_summary(expected):
    dropped = {r: 0 for r in prepare.REASONS}
    for v in expected.values():
        if v != "ok":
            dropped[v] += 1
    return {"read": len(expected), "written": sum(v == "ok" for v in expected.values()), "dropped": dropped}


@beam_only
def test_webdataset_counts_grain_and_determinism(inputs, tmp_path):
    out = tmp_path / "run1" / "cap"
    summary = ingest.run(_args(inputs / "*.tar", "webdataset", out))
    assert {k: summary[k] for k in ("read", "written", "dropped")} == _expected_summary(WDS_EXPECTED)
    assert json.loads((tmp_path / "run1" / "cap-summary.json").read_text()) == summary
    got = {r["id"]: r for r in R.read_records(str(out))}
    assert set(got) == {f"{s}/{k}" for (s, k), v in WDS_EXPECTED.items() if v == "ok"}
    assert got["a/0000"]["caption"] == "a red circle" and got["a/0000"]["image"] == _jpg(0)  # smallest key kept
    assert got["a/0008"]["caption"] == "a grey ramp" and got["a/0000"]["task"] == "caption"
    # the output feeds the training pipeline
    tok = Tokenizer(train_tokenizer([r["caption"] for r in got.values()] + ["caption en"], str(tmp_path / "tok"),
                                    vocab_size=60))
    cfg = P.default_config()
    cfg.sources = [{"path": str(out), "kind": "array_record", "weight": 1.0, "task": ""}]
    cfg.gen_size, cfg.und_size, cfg.max_text_len, cfg.per_host_batch_size = 16, 16, 32, 2
    cfg.tokenizer, cfg.num_epochs, cfg.read_threads = str(tmp_path / "tok.model"), 1, 1
    valid = skipped = 0
    for b in P.make_iterator(cfg, shard_index=0, shard_count=1, tokenizer=tok):
        valid += int(b["valid"].sum())
        skipped += int(b["num_skipped"].sum())
    assert (valid, skipped) == (len(got), 0)
    # a second run, and the single-process importer on the same transforms: the same bytes
    ingest.run(_args(inputs / "*.tar", "webdataset", tmp_path / "run2" / "cap"))
    assert _shard_bytes(out, 3) == _shard_bytes(tmp_path / "run2" / "cap", 3)
    raws = (raw for f in sorted(inputs.glob("*.tar")) for raw in readers.read("webdataset", str(f),
                                                                              readers.ReadOptions()))
    _, local = prepare.run_local(raws, str(tmp_path / "local" / "cap"), 3)
    assert local["dropped"] == summary["dropped"] and local["written"] == summary["written"]
    assert _shard_bytes(out, 3) == _shard_bytes(tmp_path / "local" / "cap", 3)


@pytest.mark.slow  # starts Beam worker processes
@beam_only
def test_parquet_multiprocess_runner_same_bytes(inputs, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))  # for the workers
    one = ingest.run(_args(inputs / "*.parquet", "parquet", tmp_path / "one" / "p", 2, "--task=t2i"))
    two = ingest.run(_args(inputs / "*.parquet", "parquet", tmp_path / "two" / "p", 2, "--task=t2i",
                           "--direct_running_mode=multi_processing", "--direct_num_workers=2"))
    assert {k: one[k] for k in ("read", "written", "dropped")} == _expected_summary(PQ_EXPECTED)
    assert one == two
    assert _shard_bytes(tmp_path / "one" / "p", 2) == _shard_bytes(tmp_path / "two" / "p", 2)
    recs = sorted(R.read_records(str(tmp_path / "one" / "p")), key=lambda r: r["id"])
    assert [(r["id"], r["task"], r["caption"]) for r in recs] == [("p1/k0", "t2i", "green"), ("p1/k5", "t2i", "red")]


@beam_only
def test_coco_beam_equals_importer_and_resize_filters(tmp_path):
    (tmp_path / "img").mkdir()
    big = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 90, 3), np.uint8))
    big.save(tmp_path / "img" / "1.jpg")
    Image.fromarray(np.zeros((4, 40, 3), np.uint8)).save(tmp_path / "img" / "2.png")  # 10:1, 4 px high
    (tmp_path / "img" / "3.jpg").write_bytes(_jpg(3))
    coco = {"images": [{"id": i, "file_name": n} for i, n in ((1, "1.jpg"), (2, "2.png"), (3, "3.jpg"), (4, "4.jpg"))],
            "annotations": [{"image_id": 1, "id": 10, "caption": "a"}, {"image_id": 1, "id": 11, "caption": "b"},
                            {"image_id": 1, "id": 12, "caption": "a"}, {"image_id": 2, "id": 13, "caption": "c"},
                            {"image_id": 3, "id": 14, "caption": "x" * 50}, {"image_id": 4, "id": 15, "caption": "d"}]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    flags = ["--max_side=30", "--min_side=5", "--max_text_chars=20", f"--image_dir={tmp_path / 'img'}"]
    s = ingest.run(_args(tmp_path / "coco.json", "coco", tmp_path / "beam" / "c", 2, *flags))
    assert s["written"] == 2 and {k: v for k, v in s["dropped"].items() if v} == {
        "duplicate": 1, "too_small": 1, "too_long_text": 1, "read_error": 1}  # 4.jpg is missing
    recs = sorted(R.read_records(str(tmp_path / "beam" / "c")), key=lambda r: r["id"])
    assert [(r["id"], r["caption"]) for r in recs] == [("1/10", "a"), ("1/11", "b")]
    assert Image.open(io.BytesIO(recs[0]["image"])).size == (30, 20)  # longer side shrunk to max_side
    R.import_coco_captions(str(tmp_path / "coco.json"), str(tmp_path / "img"), str(tmp_path / "imp" / "c"), 2)
    imp = json.loads((tmp_path / "imp" / "c-summary.json").read_text())
    assert imp["written"] == 4 and imp["dropped"]["duplicate"] == 1  # importer default: no resize / filters


def test_importer_skips_bad_images_and_duplicates(tmp_path):
    (tmp_path / "img").mkdir()
    for name, data in (("0.jpg", _jpg(0)), ("1.jpg", _jpg(0)), ("2.png", _bomb()), ("3.jpg", _cut_jpeg())):
        (tmp_path / "img" / name).write_bytes(data)
    (tmp_path / "caps.jsonl").write_text("".join(json.dumps({"image": f, "caption": f"c {f}"}) + "\n"
                                                 for f in ("0.jpg", "1.jpg", "2.png", "3.jpg", "9.jpg")))
    R.import_image_folder(str(tmp_path / "img"), str(tmp_path / "caps.jsonl"), str(tmp_path / "o"), 2)
    assert [r["id"] for r in R.read_records(str(tmp_path / "o"))] == ["0"]
    s = json.loads((tmp_path / "o-summary.json").read_text())
    assert s["read"] == 5 and {k: v for k, v in s["dropped"].items() if v} == {
        "duplicate": 1, "too_large": 1, "truncated": 1, "read_error": 1}


@pytest.mark.parametrize("case", ["no_match", "dir_input", "unknown_format", "unwritable", "out_is_dir",
                                  "bad_flag"])
def test_bad_input_is_one_error_before_the_pipeline(inputs, tmp_path, capsys, case):
    (tmp_path / "afile").write_text("x")
    args = {"no_match": _args(tmp_path / "nothing-*.tar", "webdataset", tmp_path / "o" / "x"),
            "dir_input": _args(inputs, "webdataset", tmp_path / "o" / "x"),
            "unknown_format": _args(inputs / "*.tar", "zip", tmp_path / "o" / "x"),
            "unwritable": _args(inputs / "*.tar", "webdataset", tmp_path / "afile" / "sub" / "x"),
            "out_is_dir": _args(inputs / "*.tar", "webdataset", tmp_path),
            "bad_flag": _args(inputs / "*.tar", "webdataset", tmp_path / "o" / "x", 1, "--num_shard_s=3")}[case]
    before = sorted(os.listdir(tmp_path))
    if case == "bad_flag" and ingest.beam is None:
        pytest.skip("unknown flags are checked against Beam's options")
    assert ingest.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    want = {"no_match": "matches no files", "dir_input": "matches no files", "unknown_format": "unknown; choose one of", "unwritable": "is a file",
            "out_is_dir": "is a folder", "bad_flag": "--num_shard_s"}[case]
    assert len(err) == 1 and err[0].startswith("ingest: error: ") and want in err[0], err
    assert sorted(os.listdir(tmp_path)) == before  # nothing created
