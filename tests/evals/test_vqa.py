"""VQA exact match and VQAv2 soft accuracy on hand-computed cases."""
import numpy as np
import pytest

from unifluid_jax.data import shapes
from unifluid_jax.evals import vqa


@pytest.mark.parametrize("k,expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_soft_accuracy_ten_answers(k, expected):
    # k of 10 humans said "red": leave-one-out over the 10 subsets of 9, min(matches / 3, 1).
    answers = ["red"] * k + ["blue"] * (10 - k)
    assert vqa.soft_accuracy("red", answers) == pytest.approx(expected)


def test_soft_accuracy_by_hand_mixed():
    answers = ["2", "two", "2 ", "Two.", "three", "3", "3", "3", "3", "4"]
    # Normalised: 4 x "2", 5 x "3", 1 x "4".
    assert vqa.soft_accuracy("two", answers) == pytest.approx(1.0)
    assert vqa.soft_accuracy("3", answers) == pytest.approx(1.0)
    assert vqa.soft_accuracy("four", answers) == pytest.approx(0.3)
    assert vqa.soft_accuracy("five", answers) == 0.0


def test_normalization():
    assert vqa.normalize_answer("Two") == "2"
    assert vqa.normalize_answer("The dog.") == "dog"
    assert vqa.normalize_answer("dont") == "don't"
    assert vqa.normalize_answer("yes!") == "yes"
    assert vqa.normalize_answer("  a\tred  circle\n") == "red circle"
    assert vqa.normalize_answer("1,000") == "1000"
    assert vqa.normalize_answer("3.5") == "3.5"
    assert vqa.normalize_answer("left-right") == "left right"
    assert vqa.normalize_answer("none") == "0"


def test_single_answer_is_exact_match():
    assert vqa.soft_accuracy("Red.", ["red"]) == 1.0
    assert vqa.soft_accuracy("blue", ["red"]) == 0.0


def test_vqa_accuracy_on_shapes_pairs():
    rng = np.random.default_rng(0)
    pairs = [p for i in range(30) for p in shapes.vqa_pairs(shapes.scene_for_index("val", i), rng, 2)]
    qs, answers, qtypes = zip(*pairs)
    out = vqa.vqa_accuracy(list(answers), list(answers), list(qtypes))
    assert out["exact_match"] == 1.0 and out["soft_accuracy"] == 1.0 and out["num_questions"] == 60
    preds = ["no" if a == "yes" else a for a in answers]
    out = vqa.vqa_accuracy(preds, list(answers), list(qtypes))
    n_yes = sum(a == "yes" for a in answers)
    assert out["exact_match"] == pytest.approx(1 - n_yes / 60)
    assert out["exact_match/yesno"] < 1.0 and out["exact_match/color"] == 1.0
