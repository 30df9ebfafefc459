"""CIDEr-D equals pycocoevalcap's Cider scorer; caption exact match."""
import shutil

import numpy as np
import pytest
from pycocoevalcap.cider.cider import Cider

from unifluid_jax.data import shapes
from unifluid_jax.evals import cider

REFS = {
    1: ["a red circle at top left", "a big red circle", "red circle top left"],
    2: ["two blue squares", "blue squares side by side", "a pair of blue squares"],
    3: ["a small white cross at middle center"],
    "x": ["a a a a", "the the", "a cross"],
    5: ["a green triangle above a yellow square", "green triangle and yellow square"],
}
HYPS = {1: "a red circle", 2: "blue squares", 3: "a small white cross at middle center", "x": "a",
        5: "a yellow square below a green triangle"}


def _reference(refs, hyps):
    return Cider().compute_score(refs, {k: [v] for k, v in hyps.items()})


def test_matches_pycocoevalcap_fixed_set():
    ref_score, ref_scores = _reference(REFS, HYPS)
    score, scores = cider.cider_d(REFS, HYPS, tokenizer=None)
    assert abs(score - ref_score) <= 1e-6
    np.testing.assert_allclose(scores, ref_scores, atol=1e-6, rtol=0)


def test_matches_pycocoevalcap_shapes_captions():
    rng = np.random.default_rng(0)
    refs, hyps = {}, {}
    for i in range(40):
        scene = shapes.scene_for_index("val", i)
        refs[i] = [shapes.caption(scene), shapes.caption(shapes.scene_for_index("val", i + 1))]
        words = shapes.caption(scene).split()
        hyps[i] = " ".join(w for w in words if rng.random() > 0.2)  # drop ~20% of the words
    ref_score, ref_scores = _reference(refs, hyps)
    score, scores = cider.cider_d(refs, hyps, tokenizer=None)
    assert abs(score - ref_score) <= 1e-6
    np.testing.assert_allclose(scores, ref_scores, atol=1e-6, rtol=0)


def test_list_inputs_and_simple_tokenizer():
    keys = list(REFS)
    a, _ = cider.cider_d([REFS[k] for k in keys], [HYPS[k] for k in keys], tokenizer=None)
    shouty = {k: [r.upper() + "." for r in v] for k, v in REFS.items()}
    b, _ = cider.cider_d(shouty, {k: v.capitalize() + "!" for k, v in HYPS.items()})
    assert a == pytest.approx(_reference(REFS, HYPS)[0], abs=1e-6) and b == pytest.approx(a, abs=1e-12)
    assert cider.simple_tokenize("A red-circle, at Top left.") == "a red circle at top left"


@pytest.mark.skipif(shutil.which("java") is None, reason="PTB tokenizer needs java")
def test_ptb_tokenizer_path():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    refs = {1: ["A red circle, at the top-left."], 2: ["Two blue squares!", "Blue squares (two)."]}
    hyps = {1: "a red circle.", 2: "two blue squares"}
    tok = PTBTokenizer()
    ref_score, _ = Cider().compute_score(
        tok.tokenize({k: [{"caption": c} for c in v] for k, v in refs.items()}),
        tok.tokenize({k: [{"caption": v}] for k, v in hyps.items()}))
    score, _ = cider.cider_d(refs, hyps, tokenizer="ptb")
    assert abs(score - ref_score) <= 1e-6


def test_caption_exact_match():
    scenes = [shapes.scene_for_index("test", i) for i in range(10)]
    caps = [shapes.caption(s) for s in scenes]
    assert cider.caption_exact_match(caps, caps) == 1.0
    assert cider.caption_exact_match([c.upper() + "." for c in caps], caps) == 1.0
    preds = caps[:5] + caps[6:] + caps[5:6]
    assert cider.caption_exact_match(preds, caps) == pytest.approx(sum(p == c for p, c in zip(preds, caps)) / 10)
    assert cider.caption_exact_match(["x"], [["y", "X"]]) == 1.0


def test_caption_metrics():
    caps = [shapes.caption(shapes.scene_for_index("test", i)) for i in range(10)]
    out = cider.caption_metrics(caps, caps)
    assert out["exact_match"] == 1.0
    assert out["cider"] == pytest.approx(cider.cider_d([[c] for c in caps], caps)[0])
