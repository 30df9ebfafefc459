"""Editing success: true edit targets score 100% in every kind; the unedited source fails."""
import numpy as np
import pytest

from unifluid_jax.data import shapes
from unifluid_jax.evals import edit


def _pairs(n_per_kind=25, size=64):
    out = []
    for kind in shapes.EDIT_KINDS:
        i = 0
        while sum(p[3] == kind for p in out) < n_per_kind:
            rng = np.random.default_rng([5, i])
            i += 1
            scene = shapes.random_scene(rng, size)
            try:
                instr, target, k = shapes.make_edit(scene, rng, kind)
            except ValueError:  # this kind is impossible on this scene
                continue
            out.append((scene, instr, target, k))
    return out


def test_true_edits_succeed_and_sources_fail():
    pairs = _pairs()
    instrs = [p[1] for p in pairs]
    sources = [p[0] for p in pairs]
    out = edit.score_edits(instrs, sources, [shapes.render(p[2]) for p in pairs])
    for kind in shapes.EDIT_KINDS:
        assert out[f"success/{kind}"] == 1.0 and out[f"exact/{kind}"] == 1.0, kind
    unedited = edit.score_edits(instrs, sources, [shapes.render(p[0]) for p in pairs])
    for kind in shapes.EDIT_KINDS:
        assert unedited[f"success/{kind}"] == 0.0 and unedited[f"exact/{kind}"] == 0.0, kind
    # Sources given as images (detected) give the same verdicts.
    as_images = edit.score_edits(instrs, [shapes.render(s) for s in sources], [shapes.render(p[2]) for p in pairs])
    assert as_images["success"] == 1.0 and as_images["exact"] == 1.0


def test_parse_edit():
    assert edit.parse_edit("make the red circle at top left blue") == {
        "kind": "recolor", "target": {"color": "red", "shape": "circle", "cell": (0, 0)}, "new_color": "blue"}
    assert edit.parse_edit("remove the white cross") == {
        "kind": "remove", "target": {"color": "white", "shape": "cross", "cell": None}}
    assert edit.parse_edit("add a small green triangle at bottom right") == {
        "kind": "add", "new": {"size": "small", "color": "green", "shape": "triangle", "cell": (2, 2)}}
    assert edit.parse_edit("move the cyan square to middle center")["to"] == (1, 1)
    with pytest.raises(ValueError):
        edit.parse_edit("paint it black")


def test_partial_edits():
    """success checks only the edit; exact also requires that nothing else changed."""
    obj = lambda *a: shapes.make_object(*a, 64)  # noqa: E731
    src = {"size": 64, "objects": [obj("circle", "red", "large", 0, 0), obj("square", "blue", "small", 1, 1)]}
    # Recolour done, but the other object was also dropped: success, not exact.
    res = edit.check_edit("make the red circle green", src["objects"], [obj("circle", "green", "large", 0, 0)])
    assert res == {"kind": "recolor", "success": True, "exact": False}
    # Remove that also deletes the other object: failure.
    assert not edit.check_edit("remove the red circle", src["objects"], [])["success"]
    # Move that copies instead of moving: failure.
    moved = src["objects"] + [obj("circle", "red", "large", 2, 2)]
    assert not edit.check_edit("move the red circle to bottom right", src["objects"], moved)["success"]


def test_evaluate_edits_with_edit_fn():
    examples = [shapes.example("val", i) for i in range(20)]
    targets = {ex["instruction"]: ex["target_image"] for ex in examples}
    oracle = lambda imgs, instrs: np.stack([targets[i] for i in instrs])  # noqa: E731
    out = edit.evaluate_edits(oracle, examples, batch_size=8)
    assert out["success"] == 1.0 and out["exact"] == 1.0 and out["num_edits"] == 20
    identity = lambda imgs, instrs: imgs  # noqa: E731
    assert edit.evaluate_edits(identity, examples)["success"] == 0.0
