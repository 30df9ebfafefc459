"""One set of image rules (data/images.py) at every entry point: 16-bit, EXIF orientation, bombs, truncation;
skip + count + log in the pipeline and the latent extraction, one error naming the file in the CLI; grain
workers from plain Python."""
import io
import logging
import os
import struct
import subprocess
import sys
import textwrap
import zlib

import numpy as np
import pytest
from PIL import Image

from unifluid_jax.data import images as I
from unifluid_jax.data import pipeline as P
from unifluid_jax.data import records as R


# ------------------------------------------------------------------ fixtures written from the format specs

def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png(width: int, height: int, bit_depth: int, color_type: int, rows: bytes) -> bytes:
    """A PNG per the W3C PNG spec (signature, IHDR, zlib IDAT of filter-0 scanlines, IEND), not via Pillow."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(rows, 9))
            + _png_chunk(b"IEND", b""))


def _png16(x: np.ndarray) -> bytes:
    """uint16 [H, W] (grey, colour type 0) or [H, W, 3] (RGB, colour type 2), big-endian samples."""
    h, w = x.shape[:2]
    rows = b"".join(b"\x00" + x[i].astype(">u2").tobytes() for i in range(h))
    return _png(w, h, 16, 0 if x.ndim == 2 else 2, rows)


def _psnr(a, b) -> float:
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def _jpeg(x: np.ndarray, orientation: int | None = None) -> bytes:
    buf = io.BytesIO()
    kw = {}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation  # EXIF tag 274 "Orientation"
        kw["exif"] = exif.tobytes()
    Image.fromarray(x).save(buf, format="JPEG", quality=98, subsampling=0, **kw)
    return buf.getvalue()


def _bomb(side: int = 12000) -> bytes:
    """A tiny 1-bit PNG declaring side x side pixels (144 M > Pillow's 89 M default limit)."""
    return _png(side, side, 1, 0, (b"\x00" + bytes((side + 7) // 8)) * side)


def _cut_jpeg() -> bytes:
    """A JPEG whose header is intact but whose scan data stops half way (an interrupted download)."""
    data = _jpeg(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8))
    return data[:len(data) // 2]


def _gradient16(h=24, w=40):
    yy, xx = np.mgrid[0:h, 0:w]
    return ((yy * w + xx) * 65535 // (h * w - 1)).astype(np.uint16)


# ------------------------------------------------------------------ decode rules

def test_16bit_png_scaled_not_clipped():
    g = _gradient16()
    want = np.rint(g / 257.0)  # the correct 16 -> 8 bit map
    img = Image.open(io.BytesIO(_png16(g)))
    assert img.mode.startswith("I")  # Pillow keeps the 16-bit samples
    clipped = np.asarray(img.convert("RGB"))[..., 0]  # what a plain convert('RGB') gives: almost white
    assert _psnr(clipped, want) < 10
    got = np.asarray(I.decode(_png16(g)))
    assert got.shape == g.shape + (3,) and got.dtype == np.uint8
    assert _psnr(got[..., 0], want) > 45 and np.abs(got.astype(int) - want[..., None]).max() <= 1
    rgb = np.stack([g, g[::-1], 65535 - g], -1)
    got = np.asarray(I.decode(_png16(rgb)))
    assert _psnr(got, np.rint(rgb / 257.0)) > 45
    x = P.load_image(_png16(g), 16, "bilinear")  # the pipeline goes through the same rules
    assert x.min() < -0.9 and x.max() > 0.9


@pytest.mark.parametrize("orientation,rotate", [(1, lambda a: a), (3, lambda a: np.rot90(a, 2)),
                                                (6, lambda a: np.rot90(a, -1)), (8, lambda a: np.rot90(a, 1))])
def test_exif_orientation_applied(orientation, rotate):
    # EXIF 2.3 table of Orientation: 3 = rotated 180, 6 = display needs 90 deg clockwise, 8 = 90 deg
    # counter-clockwise (np.rot90 with k=-1 is clockwise).
    x = np.zeros((32, 48, 3), np.uint8)
    x[:16, :16] = (255, 0, 0)
    x[16:, 32:] = (0, 0, 255)
    got = np.asarray(I.decode(_jpeg(x, orientation)))
    want = rotate(x)
    assert got.shape == want.shape
    assert np.abs(got.astype(int) - want).mean() < 4


@pytest.mark.parametrize("make,reason", [
    (lambda: b"", "not_image"), (lambda: b"<html>not an image</html>" * 10, "not_image"),
    (lambda: _cut_jpeg(), "truncated"),
    (lambda: _bomb(), "too_large"), (lambda: _bomb(20000), "too_large")])  # 20000^2 > 2x: Pillow's own error
def test_bad_images_rejected_with_reason(make, reason):
    with pytest.raises(I.ImageError) as e:
        I.decode(make())
    assert e.value.reason == reason
    with pytest.raises(ValueError):
        P.load_image(make(), 8)


def test_max_pixels_and_reencode():
    x = np.random.default_rng(0).integers(0, 255, (30, 60, 3), np.uint8)
    with pytest.raises(I.ImageError, match="over the limit"):
        I.decode(_jpeg(x), max_pixels=30 * 60 - 1)
    small = I.decode(I.reencode(I.decode(_jpeg(x)), max_side=20))
    assert small.size == (20, 10)
    assert I.reencode(I.decode(_jpeg(x)), 20) == I.reencode(I.decode(_jpeg(x)), 20)  # deterministic


# ------------------------------------------------------------------ every entry point: skip / count / reject

def _tiny_tok(tmp_path):
    from unifluid_jax.data import tokenizer
    return tokenizer.Tokenizer(tokenizer.train_tokenizer(["a red circle", "blue square", "caption en"] * 20,
                                                         str(tmp_path / "tok"), vocab_size=40))


def test_pipeline_skips_counts_and_logs_bad_images(tmp_path, caplog):
    good = _jpeg(np.full((16, 16, 3), 200, np.uint8))
    recs = [{"id": "ok", "task": "t2i", "image": good, "caption": "a red circle"},
            {"id": "bomb-7", "task": "t2i", "image": _bomb(), "caption": "a red circle"},
            {"id": "cut-3", "task": "caption", "image": _cut_jpeg(), "caption": "blue square"}]
    fn = P.ExampleFn(_tiny_tok(tmp_path), gen_size=8, und_size=8, max_text_len=48)
    outs = [fn(R.encode_record(r)) for r in recs]
    assert "_skip" not in outs[0]
    assert [P.SKIP_REASONS[o["_skip"]] for o in outs[1:]] == ["bad_image", "bad_image"]
    assert [o["_id"] for o in outs[1:]] == ["bomb-7", "cut-3"]
    assert "over the limit" in outs[1]["_why"] and "truncated" in outs[2]["_why"]
    caplog.set_level(logging.WARNING)
    log = R.SkipLog("test", first=2, interval=3600)
    for o in outs[1:] + outs[1:]:
        log.log(P.SKIP_REASONS[o["_skip"]], o["_id"], o["_why"])
    lines = [r.getMessage() for r in caplog.records if "skipped record" in r.getMessage()]
    assert len(lines) == 2 and "id=bomb-7" in lines[0] and "bad_image" in lines[0] and "id=cut-3" in lines[1]
    assert log.seen == 4 and log.suppressed == 2


def test_make_iterator_logs_skipped_record_ids(tmp_path, caplog):
    good = _jpeg(np.full((16, 16, 3), 200, np.uint8))
    recs = [{"id": f"ok-{i}", "task": "t2i", "image": good, "caption": "a red circle"} for i in range(3)]
    recs.insert(1, {"id": "bomb-in-shard", "task": "t2i", "image": _bomb(), "caption": "a red circle"})
    R.write_records(recs, str(tmp_path / "d" / "t2i"))
    _tiny_tok(tmp_path)
    cfg = P.default_config()
    cfg.sources = [{"path": str(tmp_path / "d" / "t2i"), "kind": "array_record", "weight": 1.0, "task": ""}]
    cfg.tokenizer, cfg.gen_size, cfg.und_size, cfg.max_text_len = str(tmp_path / "tok.model"), 8, 8, 48
    cfg.per_host_batch_size, cfg.read_threads, cfg.num_epochs, cfg.shuffle = 3, 1, 1, False
    caplog.set_level(logging.WARNING)
    skipped = sum(int(b["num_skipped"][P.SKIP_REASONS.index("bad_image")])
                  for b in P.make_iterator(cfg, shard_index=0, shard_count=1))
    assert skipped == 1
    lines = [r.getMessage() for r in caplog.records if "skipped record" in r.getMessage()]
    assert len(lines) == 1 and "id=bomb-in-shard" in lines[0] and "bad_image" in lines[0], lines


def test_extract_latents_skips_and_counts_bombs(tmp_path):
    from unifluid_jax.tools import extract_latents
    good = _jpeg(np.full((16, 16, 3), 100, np.uint8))
    recs = [{"id": "a", "task": "t2i", "image": good, "caption": "x"},
            {"id": "b", "task": "t2i", "image": _bomb(), "caption": "x"},
            {"id": "c", "task": "edit", "image": good, "image2": b"junk", "instruction": "x"},
            {"id": "d", "task": "caption", "image": good, "caption": "x"}]

    def enc(imgs):  # [B, 8, 8, 3] -> (mean, std) [B, 4, 3]: any deterministic function will do here
        t = imgs.reshape(len(imgs), 4, -1, 3).mean(2)
        return t, np.abs(t)
    stats = extract_latents.extract(recs, str(tmp_path / "cache"), enc, gen_size=8, batch_size=2)
    assert stats == {"written": 2, "encoded": 1, "skipped": 2, "skipped:too_large": 1, "skipped:not_image": 1}
    assert sorted(r["id"] for r in R.read_records(str(tmp_path / "cache"))) == ["a", "d"]


def test_cli_rejects_bad_image_naming_the_file(tmp_path):
    from unifluid_jax.config import ConfigError
    from unifluid_jax.inference import cli
    (tmp_path / "bomb.png").write_bytes(_bomb())
    (tmp_path / "cut.jpg").write_bytes(_cut_jpeg())
    for name in ("bomb.png", "cut.jpg"):
        with pytest.raises(ConfigError, match=name):
            cli._image(name, 8, "bilinear", base=str(tmp_path))
    with pytest.raises(I.ImageError, match="bomb.png"):
        I.load_file(str(tmp_path / "bomb.png"), 8)


def test_make_iterator_with_workers_from_plain_python(tmp_path):
    """A user's script (no absl app.run) with worker_count > 0: grain's flags must not be required."""
    script = tmp_path / "user_script.py"
    script.write_text(textwrap.dedent(f"""
        from unifluid_jax.data import pipeline as P
        from unifluid_jax.tools import build_shapes

        def main():
            d = {str(tmp_path / 'shapes')!r}
            build_shapes.build(d, size=32, num_train=16, num_val=2, num_test=2, num_shards=1, num_geneval=1)
            c = P.default_config()
            c.sources = P.shapes_sources(d, "train")
            c.gen_size, c.und_size, c.max_text_len = 32, 32, 48
            c.tokenizer = d + "/tokenizer.model"
            c.per_host_batch_size, c.read_threads, c.worker_count = 4, 1, 1
            it = P.make_iterator(c, shard_index=0, shard_count=1)
            print("BATCH", next(it)["valid"].sum())
            it.close()

        if __name__ == "__main__":  # grain workers start by spawn, like any multiprocessing script
            main()
        """))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "BATCH 4" in out.stdout
