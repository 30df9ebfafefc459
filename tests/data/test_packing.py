"""Packing examples into rows in the pipeline: exact resume, determinism, every example once, text dropout."""
import collections

import numpy as np
import pytest
from absl import flags

from unifluid_jax import layout as L
from unifluid_jax.data import packing
from unifluid_jax.data import pipeline as P
from unifluid_jax.data import records as R

DIMS = L.Dims(n_und=16, n_src=0, n_img=16, max_text_len=48)


def _cfg(shapes_dir, **kw):
    c = P.default_config()
    c.sources = P.shapes_sources(shapes_dir, "train")
    c.gen_size, c.und_size, c.max_text_len = 64, 32, 48
    c.tokenizer = f"{shapes_dir}/tokenizer.model"
    c.per_host_batch_size = 3
    c.read_threads = 1
    c.layout, c.row_slots = "packed", 160
    for k, v in kw.items():
        c[k] = v
    return c


def _take(it, n):
    return [next(it) for _ in range(n)]


def _examples(batch, tok):
    """(task, text) of every example in a batch of rows."""
    out = []
    for r in range(len(batch["tokens"])):
        seg, kind = batch["segment_ids"][r], batch["kind"][r]
        for s in range(1, int(seg.max()) + 1):
            text = batch["tokens"][r][(seg == s) & (kind == L.K_TEXT)]
            out.append((tok.decode(text), bool(((seg == s) & (kind == L.K_BOI)).any())))
    return out


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_packed_resume_is_exact(shapes_dir, workers):
    flags.FLAGS.mark_as_parsed()
    cfg = _cfg(shapes_dir, worker_count=workers)
    it = P.make_iterator(cfg, shard_index=0, shard_count=1, dims=DIMS)
    straight = _take(it, 8)
    if workers:
        it.close()
    it = P.make_iterator(cfg, shard_index=0, shard_count=1, dims=DIMS)
    states, deferred = [], 0
    for _ in range(4):
        next(it)
        states.append(it.get_state())
        if not workers:
            deferred += len(states[-1]["pending"])
    if not workers:
        assert deferred > 0  # some state was taken with examples waiting for the next batch
    if workers:
        it.close()
    for k in (1, 3):  # resume after batch k+1: the rest equals the straight run, batch for batch
        it2 = P.make_iterator(cfg, shard_index=0, shard_count=1, dims=DIMS)
        it2.set_state(states[k])
        for want in straight[k + 1:]:
            got = next(it2)
            assert got.keys() == want.keys()
            for f in want:
                np.testing.assert_array_equal(got[f], want[f], err_msg=f)
        if workers:
            it2.close()


@pytest.mark.slow
def test_every_example_once_fixed_and_packed(shapes_dir):
    from unifluid_jax.data.tokenizer import Tokenizer
    tok = Tokenizer(f"{shapes_dir}/tokenizer.model")
    seen, slots, counts = {}, {}, {}
    for name in ("fixed", "packed"):
        cfg = _cfg(shapes_dir, layout=name, num_epochs=1, shuffle=False)
        got, valid, total, tasks = collections.Counter(), 0, 0, np.zeros(L.NUM_TASKS, np.int64)
        batches = list(P.make_iterator(cfg, shard_index=0, shard_count=1, dims=DIMS))
        for b in batches:
            got.update(_examples(b, tok))
            valid += int((b["segment_ids"] > 0).sum())
            total += b["segment_ids"].size
            tasks += b["task_count"].sum(0)
            uids = b["gen_uid"][b["gen_start"] >= 0]
            assert len(set(uids.tolist())) == len(uids)  # unique within a step
        seen[name], slots[name], counts[name] = got, valid / total, tasks
        again = list(P.make_iterator(cfg, shard_index=0, shard_count=1, dims=DIMS))  # deterministic
        assert len(again) == len(batches) and all(
            all(np.array_equal(a[k], b[k]) for k in a) for a, b in zip(again, batches))
    assert seen["fixed"] == seen["packed"] and sum(seen["fixed"].values()) == counts["fixed"].sum()
    np.testing.assert_array_equal(counts["fixed"], counts["packed"])
    per_example = P.make_iterator(_cfg(shapes_dir, num_epochs=1, shuffle=False), shard_index=0, shard_count=1)
    assert counts["fixed"].sum() == sum(int(b["valid"].sum()) for b in per_example)  # the same examples
    assert slots["packed"] > 1.5 * slots["fixed"], slots


def test_skips_counted_once(shapes_dir, tmp_path):
    recs = [{"id": f"g{i}", "task": "t2i", "caption": "a red circle", "image": _png()} for i in range(10)]
    recs[3:3] = [{"id": "b1", "task": "t2i", "image": b"nope", "caption": "x"},
                 {"id": "b2", "task": "vqa", "image": _png()}]
    R.write_records(recs, str(tmp_path / "mixed"))
    cfg = _cfg(shapes_dir, num_epochs=1, shuffle=False, per_host_batch_size=1, row_slots=60)
    cfg.sources = [{"path": str(tmp_path / "mixed"), "kind": "array_record", "weight": 1.0, "task": ""}]
    batches = list(P.make_iterator(cfg, shard_index=0, shard_count=1, dims=DIMS))
    skipped = sum(b["num_skipped"] for b in batches)
    assert dict(zip(P.SKIP_REASONS, skipped.tolist()))["bad_image"] == 1
    assert dict(zip(P.SKIP_REASONS, skipped.tolist()))["missing_field"] == 1
    assert sum(int(b["task_count"].sum()) for b in batches) == 10


def _png():
    import io

    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_text_dropout_in_the_pipeline(shapes_dir):
    """A dropped t2i prompt / edit instruction is [BOS] alone; caption / vqa are never dropped; the draw is
    per record index (two iterators agree)."""
    cfg = _cfg(shapes_dir, text_dropout=0.5, num_epochs=1, shuffle=False)
    ref = _cfg(shapes_dir, num_epochs=1, shuffle=False)
    a = [e for b in P.make_iterator(cfg, shard_index=0, shard_count=1) for e in _rows_of(b)]
    b = [e for b in P.make_iterator(cfg, shard_index=0, shard_count=1) for e in _rows_of(b)]
    r = [e for b in P.make_iterator(ref, shard_index=0, shard_count=1) for e in _rows_of(b)]
    assert a == b and len(a) == len(r)
    dropped = 0
    for (task, toks), (task_r, toks_r) in zip(a, r):
        assert task == task_r
        if toks != toks_r:
            assert task in L.GEN_TASKS and toks == (L.BOS_ID,)
            dropped += 1
    n_gen = sum(t in L.GEN_TASKS for t, _ in r)
    assert 0.3 * n_gen < dropped < 0.7 * n_gen


def _rows_of(batch):
    return [(int(t), tuple(int(x) for x in tok[m > 0]))
            for t, tok, m in zip(batch["task"], batch["text_tokens"], batch["text_input_mask"])]


def test_a_task_mix_that_cannot_be_laid_out(shapes_dir):
    cfg = _cfg(shapes_dir, row_slots=40)
    with pytest.raises(L.LayoutError, match=r"t2i example.*\(slots 40 < 65\).*data.row_slots"):
        packing.check_config(cfg, DIMS, L.TASKS)
    cfg = _cfg(shapes_dir, row_targets=10)
    with pytest.raises(L.LayoutError, match="text targets 10 < 47"):
        packing.check_config(cfg, DIMS, ("vqa",))
    packing.check_config(cfg, DIMS, ("t2i",))  # t2i has no text targets: fits
