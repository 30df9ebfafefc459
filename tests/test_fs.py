"""The path layer (unifluid_jax/fs.py) on a non-local filesystem, without a network: an in-memory fsspec
filesystem registered for gs://, the route epath takes for gs:// when TensorFlow is absent (fsspec backend).
Every reader converted to the layer is driven through it: shard discovery, tokenizer, importers / ingest
inputs, inference images."""
import io
import json

import numpy as np
import pytest
from PIL import Image

from unifluid_jax import fs
from unifluid_jax.data import images, prepare, readers
from unifluid_jax.data import records as R
from unifluid_jax.data.tokenizer import Tokenizer, train_tokenizer


@pytest.fixture
def gs(monkeypatch):
    """gs:// backed by memory for this test only."""
    import fsspec
    from etils.epath import backend, gpath
    from fsspec.implementations.memory import MemoryFileSystem
    from fsspec.registry import _registry

    class MemoryGcs(MemoryFileSystem):
        protocol = ("gs", "gcs")
        store, pseudo_dirs = {}, [""]

        @classmethod
        def _strip_protocol(cls, path):
            for p in ("gs://", "gcs://"):
                if path.startswith(p):
                    path = path[len(p):]
            return super()._strip_protocol(path)

    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)  # the fsspec route even if TF is present
    saved = {p: _registry.get(p) for p in ("gs", "gcs")}
    for p in saved:
        fsspec.register_implementation(p, MemoryGcs, clobber=True)
    backend.fsspec_backend._get_filesystem.cache_clear()
    yield "gs://bucket"
    for p, cls in saved.items():
        if cls is None:
            _registry.pop(p, None)
        else:
            fsspec.register_implementation(p, cls, clobber=True)
    backend.fsspec_backend._get_filesystem.cache_clear()


@pytest.fixture
def gcs_emulator(gs, monkeypatch):
    """array_record's own GCS client (how grain opens gs:// shards) pointed at a loopback HTTP server that
    serves the in-memory store through the GCS JSON API media endpoint (array_record's tests do the same)."""
    import re
    import threading
    import urllib.parse
    from http import server

    import fsspec
    store = fsspec.filesystem("gs").store

    class Handler(server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):  # noqa: N802
            m = re.fullmatch(r"/storage/v1/b/([^/]+)/o/(.+)", urllib.parse.urlparse(self.path).path)
            f = store.get(f"/{m.group(1)}/{urllib.parse.unquote(m.group(2))}") if m else None
            if f is None:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            payload = f.getvalue()
            total, start, end = len(payload), 0, len(payload) - 1
            rng = self.headers.get("Range") or ""
            if (last := re.fullmatch(r"bytes=-(\d+)", rng)):
                start = max(0, total - int(last.group(1)))
            elif (span := re.fullmatch(r"bytes=(\d+)-(\d*)", rng)):
                start = int(span.group(1))
                end = min(end, int(span.group(2))) if span.group(2) else end
            data = payload[start:end + 1]
            self.send_response(206 if rng else 200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Range", f"bytes {start}-{end}/{total}")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    httpd = server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("CLOUD_STORAGE_EMULATOR_ENDPOINT", f"http://127.0.0.1:{httpd.server_address[1]}")
    yield gs
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


def _png(v=5, size=8):
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), v, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_basic_ops_and_glob(gs, tmp_path):
    fs.write_text(f"{gs}/d/a-00000-of-00002.array_record", "x")
    fs.write_bytes(f"{gs}/d/a-00001-of-00002.array_record", b"y")
    fs.write_text(f"{gs}/d/sub/b.txt", "z")
    assert fs.exists(f"{gs}/d/sub/b.txt") and fs.isdir(f"{gs}/d") and not fs.exists(f"{gs}/nope")
    assert fs.read_bytes(f"{gs}/d/a-00001-of-00002.array_record") == b"y"
    assert fs.listdir(f"{gs}/d") == ["a-00000-of-00002.array_record", "a-00001-of-00002.array_record", "sub"]
    assert fs.glob(f"{gs}/d/*/b.txt") == [f"{gs}/d/sub/b.txt"]
    assert fs.glob(f"{gs}/*/a-0000[01]-*") == [f"{gs}/d/a-0000{i}-of-00002.array_record" for i in range(2)]
    import fsspec
    assert fsspec.filesystem("gs").cat("gs://bucket/d/sub/b.txt") == b"z"  # it lives in the memory store
    assert fs.absolute(f"{gs}/d") == f"{gs}/d" and fs.writable_dir_error(f"{gs}/new") is None
    with pytest.raises(ValueError, match=r"\*\*"):
        fs.glob(f"{gs}/**/x")


def test_shard_discovery_on_gs(gs):
    for i in range(3):
        fs.write_bytes(f"{gs}/data/train/t2i-{i:05d}-of-00003.array_record", b"")
    fs.write_bytes(f"{gs}/data/train/other.txt", b"")
    want = [f"{gs}/data/train/t2i-{i:05d}-of-00003.array_record" for i in range(3)]
    for spec in (f"{gs}/data/train/t2i", f"{gs}/data/train", f"{gs}/data/*/t2i-*", want[1:] + want[:1]):
        got = R.resolve_paths(spec)
        assert sorted(got) == want, spec
    with pytest.raises(FileNotFoundError, match="no ArrayRecord shards"):
        R.resolve_paths(f"{gs}/data/train/caption")


def test_tokenizer_images_and_importer_inputs_on_gs(gs, tmp_path):
    path = train_tokenizer(["a red circle", "a blue square"] * 10, f"{gs}/tok/tokenizer", vocab_size=30)
    assert path == f"{gs}/tok/tokenizer.model" and Tokenizer(path).encode("red")
    with pytest.raises(FileNotFoundError, match="tokenizer model not found"):
        Tokenizer(f"{gs}/tok/missing.model")
    fs.write_bytes(f"{gs}/img/0.png", _png(0))
    fs.write_bytes(f"{gs}/img/1.png", _png(9))
    np.testing.assert_allclose(images.load_file(f"{gs}/img/0.png", 4), -1.0)
    with pytest.raises(images.ImageError, match="missing.png"):
        images.load_file(f"{gs}/img/missing.png", 4)
    fs.write_text(f"{gs}/caps.jsonl", "".join(json.dumps({"image": f"img/{i}.png", "caption": f"c {i}"}) + "\n"
                                              for i in range(2)))
    raws = readers.read("folder", f"{gs}/caps.jsonl", readers.ReadOptions())
    _, summary = prepare.run_local(raws, str(tmp_path / "out" / "cap"), 1)
    assert summary["written"] == 2
    assert [r["image"] for r in R.read_records(str(tmp_path / "out" / "cap"))] in ([_png(0), _png(9)],
                                                                                 [_png(9), _png(0)])


def test_ingest_checks_gs_inputs(gs, tmp_path):
    from unifluid_jax.tools import ingest
    fs.write_bytes(f"{gs}/wds/000.tar", b"")
    a, _ = ingest.parse_args([f"--input={gs}/wds/*.tar", "--format=webdataset", f"--out={tmp_path}/o/x"])
    assert ingest.check_inputs(a) == [f"{gs}/wds/000.tar"]
    a, _ = ingest.parse_args([f"--input={gs}/wds/*.parquet", "--format=parquet", f"--out={tmp_path}/o/x"])
    with pytest.raises(ingest.IngestError, match="matches no files"):
        ingest.check_inputs(a)


def test_cli_reads_images_from_gs(gs):
    from unifluid_jax.config import ConfigError
    from unifluid_jax.inference import cli
    fs.write_bytes(f"{gs}/q/cat.png", _png(255))
    np.testing.assert_allclose(cli._image("cat.png", 4, "bilinear", base=f"{gs}/q"), 1.0)
    fs.write_bytes(f"{gs}/q/bad.png", b"nope")
    with pytest.raises(ConfigError, match="bad.png"):
        cli._image("bad.png", 4, "bilinear", base=f"{gs}/q")


def test_build_shapes_and_cli_outputs_on_gs(gs):  # shards: see the pipeline test below
    import ml_collections

    from unifluid_jax.inference import cli
    from unifluid_jax.tools import build_shapes
    meta = build_shapes.build(f"{gs}/shapes", size=32, num_train=4, num_val=0, num_test=0, num_shards=1,
                              num_geneval=1)
    assert json.loads(fs.read_text(f"{gs}/shapes/metadata.json")) == json.loads(json.dumps(meta))
    assert Tokenizer(f"{gs}/shapes/{meta['tokenizer']}").vocab_size > 10
    fs.write_text(f"{gs}/prompts.txt", "a red circle\n\nblue\n")
    assert cli._lines(f"{gs}/prompts.txt", "prompts") == ["a red circle", "blue"]
    cfg = ml_collections.ConfigDict({"infer": {"out": f"{gs}/run/infer"}})
    out = cli._out_dir(cfg, "unused")
    cli._save_png(f"{out}/x.png", np.full((4, 4, 3), 7, np.uint8))
    assert (np.asarray(Image.open(io.BytesIO(fs.read_bytes(f"{gs}/run/infer/x.png")))) == 7).all()


def test_training_pipeline_reads_shards_and_tokenizer_from_gs(gcs_emulator, tmp_path):
    from unifluid_jax.data import pipeline as P
    from unifluid_jax.tools import build_shapes
    kw = dict(size=32, num_train=12, num_val=0, num_test=0, num_shards=2, num_geneval=1)
    build_shapes.build(f"{gcs_emulator}/shapes", **kw)  # shards written locally, copied to the bucket
    build_shapes.build(str(tmp_path / "shapes"), **kw)

    def batches(root):
        c = P.default_config()
        c.sources = [{"path": f"{root}/train/{t}", "kind": "array_record", "weight": 1.0, "task": ""}
                     for t in ("t2i", "caption")]
        c.tokenizer, c.gen_size, c.und_size, c.max_text_len = f"{root}/tokenizer.model", 32, 32, 48
        c.per_host_batch_size, c.read_threads, c.num_epochs = 4, 1, 1
        return list(P.make_iterator(c, shard_index=0, shard_count=1))
    remote, local = batches(f"{gcs_emulator}/shapes"), batches(str(tmp_path / "shapes"))
    assert len(remote) == len(local) > 0 and sum(int(b["valid"].sum()) for b in remote) >= 12
    for r, l in zip(remote, local):
        assert r.keys() == l.keys() and all(np.array_equal(r[k], l[k]) for k in r)


def test_importer_writes_shards_and_summary_to_gs(gcs_emulator):
    gs = gcs_emulator
    for i in range(3):
        fs.write_bytes(f"{gs}/in/img/{i}.png", _png(10 * i))
    fs.write_text(f"{gs}/in/caps.jsonl", "".join(json.dumps({"image": f"{i}.png", "caption": f"c {i}"}) + "\n"
                                                 for i in range(3)))
    paths = R.import_image_folder(f"{gs}/in/img", f"{gs}/in/caps.jsonl", f"{gs}/out/cap", num_shards=2)
    assert paths == R.resolve_paths(f"{gs}/out/cap") and all(p.startswith(f"{gs}/out/") for p in paths)
    assert json.loads(fs.read_text(f"{gs}/out/cap-summary.json"))["written"] == 3
    got = sorted((r["id"], r["caption"], r["image"]) for r in R.read_records(f"{gs}/out/cap"))
    assert got == [(str(i), f"c {i}", _png(10 * i)) for i in range(3)]
