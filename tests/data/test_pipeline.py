"""grain pipeline: batch spec, masks, exact resume (1 and 2 workers), host sharding, task mixing, bad data."""
import collections
import io

import numpy as np
import pytest
from absl import flags
from PIL import Image

from unifluid_jax.data import layout as L
from unifluid_jax.data import pipeline as P
from unifluid_jax.data import records as R
from unifluid_jax.data.shapes import COLORS, SHAPES
from unifluid_jax.data.tokenizer import Tokenizer
from unifluid_jax.tools import build_shapes


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    build_shapes.build(str(out), size=64, num_train=240, num_val=8, num_test=8, num_shards=2, num_geneval=2)
    return out


def _cfg(shapes_dir, weights=(0.25, 0.25, 0.25, 0.25), **kw):
    c = P.default_config()
    c.sources = P.shapes_sources(str(shapes_dir), "train", dict(zip(L.TASKS, weights)))
    c.gen_size, c.und_size, c.max_text_len = 64, 32, 48
    c.tokenizer = str(shapes_dir / "tokenizer.model")
    c.per_host_batch_size = 8
    c.read_threads = 1
    for k, v in kw.items():
        c[k] = v
    return c


def _texts(shapes_dir, field):
    return {r[field] for t in L.TASKS for r in R.read_records(str(shapes_dir / "train" / t)) if field in r}


def test_batch_fields_and_masks(shapes_dir):
    cfg = _cfg(shapes_dir, edit_source=("siglip", "vae"))
    it = P.make_iterator(cfg, shard_index=0, shard_count=1)
    tok = Tokenizer(cfg.tokenizer)
    spec = P.batch_spec(cfg)
    captions, prompts, instr = _texts(shapes_dir, "caption"), None, _texts(shapes_dir, "instruction")
    seen = set()
    for _ in range(6):
        batch, stats = P.split_stats(next(it))
        assert set(batch) == set(spec)
        for k, (shape, dtype) in spec.items():
            assert batch[k].shape == shape and batch[k].dtype == dtype, k
        assert stats["num_skipped"].shape == (len(P.SKIP_REASONS),) and stats["num_skipped"].sum() == 0
        assert (batch["valid"] == 1).all()
        for i, t in enumerate(batch["task"]):
            seen.add(int(t))
            toks, im, ar, loss = (batch[k][i] for k in ("text_tokens", "text_input_mask", "text_mask_ar",
                                                         "text_loss_mask"))
            n = im.sum()
            assert toks[0] == L.BOS_ID and (im[:n] == 1).all() and (im[n:] == 0).all() and (toks[n:] == 0).all()
            gen, und, src = (np.abs(batch[k][i]).max() for k in ("image_gen", "image_und", "image_src"))
            assert np.abs(batch["image_gen"][i]).max() <= 1.0 and np.abs(batch["image_und"][i]).max() <= 1.0
            if t in L.UND_TASKS:
                sep = int(np.nonzero(toks == tok.sep_ids[0])[0][0])
                assert (ar[:sep + 1] == 0).all() and (ar[sep + 1:n] == 1).all() and (loss == ar).all()
                assert toks[n - 1] == L.EOS_ID
                q, a = tok.decode(toks).split("\n")
                a = a.lstrip()  # the answer is encoded on its own, so it carries SentencePiece's leading space
                if t == L.CAPTION:
                    assert q == cfg.caption_prompt and a in captions
                assert gen == 0 and und > 0 and src == 0
            else:
                assert ar.sum() == 0 and loss.sum() == 0
                assert gen > 0 and (und > 0) == (t == L.EDIT) and (src > 0) == (t == L.EDIT)
                if t == L.EDIT:
                    assert tok.decode(toks) in instr
                    assert not np.array_equal(batch["image_gen"][i], batch["image_src"][i])
        dims = L.Dims(n_und=4, n_src=4, n_img=4, max_text_len=48)
        rows, _ = L.layout_examples([{k: v[i] for k, v in batch.items()} for i in range(8)], L.fixed_spec(dims),
                                    dims, layout="fixed")
        assert rows["tokens"].shape == (8, 4 + 4 + 48 + 5)
        np.testing.assert_array_equal(rows["task_count"].argmax(1), batch["task"])
    assert seen == {0, 1, 2, 3}


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("workers", [0, 2])
def test_state_restore_continues_with_next_batch(shapes_dir, workers):
    flags.FLAGS.mark_as_parsed()
    cfg = _cfg(shapes_dir, worker_count=workers, per_host_batch_size=4)
    it = P.make_iterator(cfg, shard_index=0, shard_count=1)
    _take(it, 3)
    state = it.get_state()
    expected = _take(it, 3)
    if workers:
        it.close()
    it2 = P.make_iterator(cfg, shard_index=0, shard_count=1)
    it2.set_state(state)
    got = _take(it2, 3)
    assert all(_same(a, b) for a, b in zip(expected, got))
    if workers:
        it2.close()


def test_hosts_disjoint_and_cover(shapes_dir):
    cfg = _cfg(shapes_dir, weights=(1.0,), num_epochs=1)
    cfg.sources = cfg.sources[:1]
    n = sum(1 for _ in R.read_records(cfg.sources[0]["path"]))
    ids = []
    for h in range(2):
        ds = P.example_dataset(cfg, shard_index=h, shard_count=2, decode=False)
        ids.append([r["id"] for r in ds])
    assert not set(ids[0]) & set(ids[1])
    assert sorted(ids[0] + ids[1]) == sorted(r["id"] for r in R.read_records(cfg.sources[0]["path"]))
    assert abs(len(ids[0]) - len(ids[1])) <= 1
    # The full pipeline delivers the same number of examples (last batch padded, valid = 0).
    total = 0
    for h in range(2):
        for b in P.make_iterator(cfg, shard_index=h, shard_count=2):
            total += int(b["valid"].sum())
    assert total == n
    # Next epoch is reshuffled, still disjoint across hosts.
    cfg.num_epochs = 2
    e2 = [[r["id"] for r in P.example_dataset(cfg, shard_index=h, shard_count=2, decode=False)] for h in range(2)]
    assert e2[0][:len(ids[0])] == ids[0] and e2[0][len(ids[0]):] != ids[0]


def test_task_mixing_weights(shapes_dir):
    weights = (0.4, 0.3, 0.2, 0.1)
    cfg = _cfg(shapes_dir, weights=weights)
    ds = P.example_dataset(cfg, shard_index=0, shard_count=1, decode=False)
    counts = collections.Counter(ds[i]["task"] for i in range(10_000))
    for t, w in zip(L.TASKS, weights):
        assert abs(counts[t] / 10_000 - w) < 0.02, counts


def _png(v=100, size=40):
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), v, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(size=40):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(
        buf, format="JPEG")
    return buf.getvalue()


def _bad_shard(tmp_path):
    good = [{"id": f"g{i}", "task": ("caption", "t2i", "vqa", "edit")[i % 4], "image": _png(i), "caption": f"a {COLORS[i % 8]} {SHAPES[i % 4]}",
             "question": "what color?", "answer": "red", "instruction": "make it red", "image2": _png(255 - i)}
            for i in range(13)]
    jpg = _jpeg()
    bad = [
        ({"id": "b0", "task": "caption", "image": jpg[: len(jpg) // 2], "caption": "red"}, "bad_image"),  # truncated
        ({"id": "b1", "task": "t2i", "image": b"this is not an image", "caption": "red"}, "bad_image"),
        ({"id": "b2", "task": "caption", "image": _png()}, "missing_field"),  # no caption
        ({"id": "b3", "task": "edit", "image": _png(), "instruction": "x"}, "missing_field"),  # no target
        ({"id": "b4", "task": "vqa", "question": "q", "answer": "a"}, "missing_field"),  # no image
        ({"id": "b5", "task": "t2i", "image": _png(), "caption": "   "}, "empty_text"),
        ({"id": "b6", "task": "vqa", "image": _png(), "question": "what", "answer": ""}, "empty_text"),
        ({"id": "b7", "task": "t2i", "image": _png(), "caption": "red " * 200}, "too_long"),
        ({"id": "b8", "task": "segment", "image": _png(), "caption": "red"}, "bad_task"),
        (b"garbage bytes that are no record", "bad_record"),
    ]
    recs = good[:5] + [b for b, _ in bad] + good[5:]
    R.write_records(recs, str(tmp_path / "bad" / "mixed"), num_shards=2)
    return good, collections.Counter(r for _, r in bad)


def test_bad_records_skipped_and_counted(shapes_dir, tmp_path):
    good, expected = _bad_shard(tmp_path)
    cfg = _cfg(shapes_dir, num_epochs=1, per_host_batch_size=4)
    cfg.sources = [{"path": str(tmp_path / "bad" / "mixed"), "kind": "array_record", "weight": 1.0, "task": ""}]
    tok = Tokenizer(cfg.tokenizer)
    skipped, delivered = np.zeros(len(P.SKIP_REASONS), np.int64), collections.Counter()
    for b in P.make_iterator(cfg, shard_index=0, shard_count=1):
        skipped += b["num_skipped"]
        for i in np.nonzero(b["valid"])[0]:
            delivered[(int(b["task"][i]), tok.decode(b["text_tokens"][i]).replace("\n ", "\n"))] += 1
    assert dict(zip(P.SKIP_REASONS, skipped.tolist())) == {r: expected.get(r, 0) for r in P.SKIP_REASONS}
    want = collections.Counter()
    for g in good:
        t = L.TASK_IDS[g["task"]]
        text = {"caption": f"caption en\n{g['caption']}", "t2i": g["caption"], "vqa": "what color?\nred",
                "edit": "make it red"}[g["task"]]
        want[(t, text)] += 1
    assert delivered == want
    # truncation instead of skipping over-long prompts
    cfg.truncate = True
    n = sum(int(b["valid"].sum()) for b in P.make_iterator(cfg, shard_index=0, shard_count=1))
    assert n == len(good) + 1


def test_zero_valid_records_is_a_clear_error(shapes_dir, tmp_path):
    cfg = _cfg(shapes_dir)
    R.write_records([{"id": "a", "task": "t2i", "image": b"nope", "caption": "red"},
                     {"id": "b", "task": "caption", "image": _png()}], str(tmp_path / "allbad"))
    cfg.sources = [{"path": str(tmp_path / "allbad"), "kind": "array_record", "weight": 1.0, "task": ""}]
    with pytest.raises(P.DataError, match="zero valid records"):
        P.make_iterator(cfg, shard_index=0, shard_count=1)
    cfg.sources = [{"path": str(tmp_path / "nothing-here"), "kind": "array_record", "weight": 1.0, "task": ""}]
    with pytest.raises(P.DataError, match="no ArrayRecord shards"):
        P.make_iterator(cfg, shard_index=0, shard_count=1)
    from unifluid_jax.config import ConfigError
    cfg.edit_source = ("clip",)
    with pytest.raises(ConfigError, match="edit_source"):
        P.validate_config(cfg)


def test_build_shapes_deterministic(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        build_shapes.build(str(d), size=32, num_train=12, num_val=2, num_test=2, num_shards=2, num_geneval=1)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) > 10
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


def test_load_image_scale_and_crop():
    from unifluid_jax.data import shapes
    img = shapes.render(shapes.scene_for_index("train", 0, size=64))
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    x = P.load_image(buf.getvalue(), 64)
    assert x.dtype == np.float32 and x.shape == (64, 64, 3)
    np.testing.assert_allclose(x, img / 127.5 - 1.0, atol=1e-6)
    wide = np.zeros((32, 96, 3), np.uint8)
    wide[:, 32:64] = 255  # the centre square survives the centre crop, the sides do not
    np.testing.assert_allclose(P.load_image(wide, 16, "nearest"), 1.0)
    np.testing.assert_allclose(P.load_image(np.full((8, 8, 3), 255, np.uint8), 24, "bilinear"), 1.0, atol=1e-6)
