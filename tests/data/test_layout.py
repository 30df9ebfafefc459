"""Layout contract: text segments per task and who sees whom in the full sequence."""
import numpy as np
import pytest

from unifluid_jax import layout as L
from unifluid_jax.models import masks


def visible(input_mask, mask_ar):
    """The big_vision rule, written independently of models/masks.py: [T, S] bool."""
    cum = np.cumsum(mask_ar)
    v = np.asarray(input_mask, bool)
    return (cum[None, :] <= cum[:, None]) & v[None, :] & v[:, None]


SEP = (4,)


def test_text_layout_tables():
    t = L.text_layout("vqa", [10, 11], [20], 7, sep_ids=SEP)
    np.testing.assert_array_equal(t["text_tokens"], [2, 10, 11, 4, 20, 1, 0])
    np.testing.assert_array_equal(t["text_input_mask"], [1, 1, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(t["text_mask_ar"], [0, 0, 0, 0, 1, 1, 0])
    np.testing.assert_array_equal(t["text_loss_mask"], [0, 0, 0, 0, 1, 1, 0])
    for task in ("t2i", "edit"):
        t = L.text_layout(task, [10, 11], None, 5, sep_ids=SEP)
        np.testing.assert_array_equal(t["text_tokens"], [2, 10, 11, 0, 0])
        np.testing.assert_array_equal(t["text_input_mask"], [1, 1, 1, 0, 0])
        assert t["text_mask_ar"].sum() == 0 and t["text_loss_mask"].sum() == 0
    assert all(v.dtype == np.int32 for v in t.values())


def test_too_long_and_truncate():
    with pytest.raises(L.TextTooLongError):
        L.text_layout("t2i", list(range(10, 20)), None, 5)
    t = L.text_layout("t2i", list(range(10, 20)), None, 5, truncate=True)
    np.testing.assert_array_equal(t["text_tokens"], [2, 10, 11, 12, 13])
    t = L.text_layout("caption", [10, 11, 12], [20, 21], 6, truncate=True, sep_ids=SEP)
    np.testing.assert_array_equal(t["text_tokens"], [2, 10, 4, 20, 21, 1])
    with pytest.raises(L.TextTooLongError):  # the answer alone does not fit: truncation cannot help
        L.text_layout("caption", [10], [20, 21, 22, 23, 24], 6, truncate=True, sep_ids=SEP)
    with pytest.raises(L.EmptyTextError):
        L.text_layout("vqa", [10], [], 6)
    t = L.text_layout("t2i", [], None, 4)  # unconditional (CFG) input: BOS only
    np.testing.assert_array_equal(t["text_tokens"], [2, 0, 0, 0])
    np.testing.assert_array_equal(t["text_input_mask"], [1, 0, 0, 0])
    t = L.text_layout("vqa", [10], None, 5, sep_ids=SEP)  # decoding prefix: BOS q SEP
    np.testing.assert_array_equal(t["text_tokens"], [2, 10, 4, 0, 0])
    assert t["text_mask_ar"].sum() == 0 and t["text_loss_mask"].sum() == 0
    with pytest.raises(ValueError):
        L.text_layout("segment", [10], None, 6)


def _example(task, n_und=2, n_src=1, n_img=2, edit_und=True):
    """(input_mask, mask_ar, kind) of one example's fixed-layout row."""
    tid = L.TASK_IDS[task]
    if tid in L.UND_TASKS:
        t = L.text_layout(task, [10], [20], 6, sep_ids=SEP)  # BOS q SEP a EOS pad
    else:
        t = L.text_layout(task, [10, 11], None, 6)  # BOS p p pad pad pad
    dims = L.Dims(n_und=n_und, n_src=n_src, n_img=n_img, max_text_len=6, edit_und=edit_und)
    rows, _ = L.layout_examples([{"task": tid, **t}], L.fixed_spec(dims), dims, layout="fixed")
    return (rows["segment_ids"][0] > 0).astype(np.int32), rows["mask_ar"][0], rows["kind"][0]


# Slots: u0 u1 | s0 | t0..t5 | BOI i0 i1   (S = 2 + 1 + 6 + 3 = 12)
U, SRC, T, G = [0, 1], [2], list(range(3, 9)), [9, 10, 11]


def test_who_sees_whom():
    _, _, kind = _example("edit")
    K = L
    assert kind.tolist() == [K.K_UND] * 2 + [K.K_SRC] + [K.K_TEXT] * 3 + [K.K_PAD] * 3 + [K.K_BOI] + [K.K_IMG] * 2

    # vqa: und + BOS q SEP prefix, a and EOS causal, src/gen/pad invisible.
    im, ar, _ = _example("vqa")
    np.testing.assert_array_equal(im, [1, 1, 0, 1, 1, 1, 1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(ar, [0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0])  # invalid gen: like padding
    v = visible(im, ar)
    prefix = U + T[:3]
    assert v[np.ix_(prefix, prefix)].all()  # bidirectional prefix
    assert not v[np.ix_(prefix, [T[3], T[4]])].any()  # prefix does not see the answer
    assert v[T[3], prefix + [T[3]]].all() and not v[T[3], T[4]]  # answer token: causal
    assert v[T[4], prefix + [T[3], T[4]]].all()
    assert not v[:, SRC + [T[5]] + G].any() and not v[SRC + [T[5]] + G, :].any()  # invalid slots
    # the model's mask must agree with the contract
    np.testing.assert_array_equal(v, np.asarray(masks.SegmentMask(im[None], ar[None]).dense())[0])

    # t2i: no und/src; prompt prefix; BOI, i0, i1 causal over the prompt.
    im, ar, _ = _example("t2i")
    np.testing.assert_array_equal(im, [0, 0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(ar, [0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1])
    v = visible(im, ar)
    p = T[:3]
    assert v[np.ix_(p, p)].all() and not v[np.ix_(p, G)].any()
    for k, g in enumerate(G):
        assert v[g, p + G[:k + 1]].all() and not v[g, G[k + 1:]].any()
    assert not v[:, U + SRC + T[3:]].any()

    # edit: und and src of the source image join the prompt prefix; gen causal over all of it.
    im, ar, _ = _example("edit")
    np.testing.assert_array_equal(im, [1, 1, 1, 1, 1, 1, 0, 0, 0, 1, 1, 1])
    v = visible(im, ar)
    prefix = U + SRC + T[:3]
    assert v[np.ix_(prefix, prefix)].all() and not v[np.ix_(prefix, G)].any()
    assert v[G[-1], prefix + G].all()
    im, _, _ = _example("edit", edit_und=False)
    np.testing.assert_array_equal(im[U], [0, 0])

    # caption: like vqa (the question is the caption prompt).
    im, ar, _ = _example("caption")
    np.testing.assert_array_equal(im, [1, 1, 0, 1, 1, 1, 1, 1, 0, 0, 0, 0])


def test_mixed_batch_positions():
    exs = [{"task": i, **L.text_layout(t, [10], [20] if L.TASK_IDS[t] in L.UND_TASKS else None, 6, sep_ids=SEP)}
           for i, t in enumerate(L.TASKS)]
    dims = L.Dims(n_und=2, n_src=0, n_img=3, max_text_len=6)
    rows, _ = L.layout_examples(exs, L.fixed_spec(dims), dims, layout="fixed")
    assert rows["segment_ids"].shape == rows["mask_ar"].shape == (4, 2 + 6 + 4)
    pos = np.asarray(masks.segment_positions(rows["segment_ids"]))
    np.testing.assert_array_equal(pos[0], [0, 0, 0, 1, 0, 0, 0, 0, 2, 3, 4, 5])  # t2i: BOS p | BOI... (pad: 0)
    np.testing.assert_array_equal(pos[1], [0, 1, 2, 3, 4, 5, 6, 0, 0, 0, 0, 0])  # caption: u u BOS q SEP a EOS
    # packed: the same examples restart their positions in one row, padding skipped
    packed, where = L.layout_examples(exs, L.packed_spec(dims, 40), dims, layout="packed")
    assert len(packed["tokens"]) == 1 and [s for _, s in where] == [1, 2, 3, 4]
    pos = np.asarray(masks.segment_positions(packed["segment_ids"]))[0]
    seg = packed["segment_ids"][0]
    for s in range(1, 5):
        np.testing.assert_array_equal(pos[seg == s], np.arange((seg == s).sum()))
