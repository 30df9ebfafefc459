"""Chance baselines: each output scored against the other examples' targets of its group."""
import numpy as np
import pytest

from unifluid_jax.evals import chance


def _spec(tag, shape, color=None):
    item = {"class": shape, "count": 1}
    if color:
        item["color"] = color
    return {"tag": tag, "include": [item], "exclude": []}


def _obj(shape, color="red"):
    return {"shape": shape, "color": color, "bbox": (0, 0, 4, 4)}


def test_geneval_chance_counts_other_prompts_of_the_same_category():
    specs = [_spec("single_object", "circle"), _spec("single_object", "square"), _spec("single_object", "circle"),
             _spec("colors", "circle", "red"), _spec("colors", "circle", "blue")]
    dets = [[_obj("circle")], [_obj("square")], [_obj("circle")], [_obj("circle", "red")], [_obj("circle", "red")]]
    out = chance.geneval_chance(specs, dets)
    # single_object: image 0 vs specs 1, 2 -> F, T; image 1 vs 0, 2 -> F, F; image 2 vs 0, 1 -> T, F: 2 of 6.
    assert out["single_object"] == pytest.approx(2 / 6)
    # colors: image 3 (red circle) vs blue-circle spec -> F; image 4 (red circle) vs red-circle spec -> T.
    assert out["colors"] == pytest.approx(0.5)
    assert out["overall"] == pytest.approx((2 / 6 + 0.5) / 2)


def test_caption_chance_is_zero_for_distinct_captions_and_one_for_a_constant_caption():
    refs = ["a red circle", "a blue square", "a green cross"]
    assert chance.caption_chance(refs, refs)["exact_match"] == 0.0  # perfect captioner, other images: never
    const = chance.caption_chance(["a red circle"] * 3, ["a red circle"] * 3)
    assert const["exact_match"] == 1.0  # every image has the same caption: chance is perfect


def test_vqa_chance_within_question_type():
    preds = ["red", "blue", "two", "two"]
    answers = ["red", "blue", "two", "three"]
    qtypes = ["color", "color", "count", "count"]
    out = chance.vqa_chance(preds, answers, qtypes)
    assert out["exact_match/color"] == 0.0
    # count: pred "two" (q2) vs answer "three" (q3) -> F; pred "two" (q3) vs answer "two" (q2) -> T.
    assert out["exact_match/count"] == pytest.approx(0.5)
    assert out["exact_match"] == pytest.approx(np.mean([0.0, 0.0, 0.5, 0.5]))
