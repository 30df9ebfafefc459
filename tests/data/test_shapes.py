"""Shapes dataset: determinism, texts agree with metadata, edits confined to the named cells, GenEval grammar."""
import re

import numpy as np
import pytest

from unifluid_jax.data import shapes as S


def test_same_seed_same_bytes_and_disjoint_splits():
    for i in range(5):
        a, b = S.example("train", i, size=64), S.example("train", i, size=64)
        assert a["image"].tobytes() == b["image"].tobytes()
        assert a["target_image"].tobytes() == b["target_image"].tobytes()
        assert {k: a[k] for k in ("caption", "question", "instruction")} == \
               {k: b[k] for k in ("caption", "question", "instruction")}
    assert S.example("train", 0)["image"].tobytes() != S.example("val", 0)["image"].tobytes()
    assert S.split_seed("train", S.SPLIT_MAX - 1) < S.split_seed("val", 0) < S.split_seed("test", 0)
    assert S.example("train", 3, size=256)["image"].shape == (256, 256, 3)


def test_palette_well_separated_and_flat():
    cols = np.array(list(S.PALETTE.values()) + [S.BACKGROUND], float)
    d = np.linalg.norm(cols[:, None] - cols[None], axis=-1) + np.eye(len(cols)) * 1e9
    assert d.min() >= 127
    img = S.example("train", 0)["image"].reshape(-1, 3)
    assert {tuple(p) for p in np.unique(img, axis=0)} <= {tuple(c) for c in cols.astype(int)}


def _obj_at(scene, where):
    r, c = where.split()
    return [o for o in scene["objects"] if (S.ROWS[o["row"]], S.COLS[o["col"]]) == (r, c)]


def _check_qa(scene, q, a):
    objs = scene["objects"]
    n = lambda **kw: sum(all(o[k] == v for k, v in kw.items()) for o in objs)  # noqa: E731
    if m := re.fullmatch(r"what color is the object at (\w+ \w+)\?", q):
        (o,) = _obj_at(scene, m[1]); return a == o["color"]
    if m := re.fullmatch(r"what shape is at (\w+ \w+)\?", q):
        (o,) = _obj_at(scene, m[1]); return a == o["shape"]
    if q == "how many objects are there?":
        return S.NUMBERS.index(a) == len(objs)
    if m := re.fullmatch(r"how many (circles|squares|triangles|crosses) are there\?", q):
        shape = {"circles": "circle", "squares": "square", "triangles": "triangle", "crosses": "cross"}[m[1]]
        return S.NUMBERS.index(a) == n(shape=shape)
    if m := re.fullmatch(r"how many (\w+) objects are there\?", q):
        return S.NUMBERS.index(a) == n(color=m[1])
    if m := re.fullmatch(r"where is the (\w+) (\w+)(?: at (\w+ \w+))?\?", q):
        cands = [o for o in objs if o["color"] == m[1] and o["shape"] == m[2]]
        if m[3] is None:
            assert len(cands) == 1
        return any(f"{S.ROWS[o['row']]} {S.COLS[o['col']]}" == a for o in cands) and (m[3] in (None, a))
    if m := re.fullmatch(r"is there an? (\w+) (\w+)\?", q):
        return a == ("yes" if n(color=m[1], shape=m[2]) else "no")
    raise AssertionError(f"unparsed question {q!r}")


def test_texts_agree_with_metadata():
    for i in range(1000):
        e = S.example("train", i, size=48)
        scene, img = e["scene"], e["image"]
        objs = scene["objects"]
        assert 1 <= len(objs) <= 4 and len({(o["row"], o["col"]) for o in objs}) == len(objs)
        # caption lists each object exactly (size, colour, shape, cell)
        parts = re.split(r", | and ", e["caption"])
        assert len(parts) == len(objs)
        for part, o in zip(parts, objs):
            assert part == f"a {o['size']} {o['color']} {o['shape']} at {S.ROWS[o['row']]} {S.COLS[o['col']]}"
            x0, y0, x1, y1 = o["bbox"]
            cx0, cy0, cx1, cy1 = S.cell_box(o["row"], o["col"], 48)
            assert cx0 <= x0 < x1 <= cx1 and cy0 <= y0 < y1 <= cy1
            patch = img[y0:y1, x0:x1].reshape(-1, 3)
            assert (patch == S.PALETTE[o["color"]]).all(-1).sum() > 0.3 * len(patch)
        assert _check_qa(scene, e["question"], e["answer"]), (e["question"], e["answer"], objs)
        # t2i prompt is either the caption or a GenEval statement true of the scene
        if e["prompt"] != e["caption"]:
            assert S.spec_satisfied(S.parse_prompt(e["prompt"]), objs), e["prompt"]


def _changed_cells(a, b, size):
    diff = (a != b).any(-1)
    cells = set()
    for r in range(3):
        for c in range(3):
            x0, y0, x1, y1 = S.cell_box(r, c, size)
            if diff[y0:y1, x0:x1].any():
                cells.add((r, c))
    assert diff.sum() == sum(diff[S.cell_box(r, c, size)[1]:S.cell_box(r, c, size)[3],
                                  S.cell_box(r, c, size)[0]:S.cell_box(r, c, size)[2]].sum()
                             for r, c in cells)
    return cells


@pytest.mark.parametrize("kind", S.EDIT_KINDS)
def test_edits_confined_to_named_cells(kind):
    rng, done = np.random.default_rng(1), 0
    while done < 60:
        scene = S.random_scene(rng, 48)
        try:
            instr, target, k = S.make_edit(scene, rng, kind)
        except ValueError:
            continue
        done += 1
        src, tgt = S.render(scene), S.render(target)
        cells = _changed_cells(src, tgt, 48)
        named = {(S.ROWS.index(m[0]), S.COLS.index(m[1]))
                 for m in re.findall(r"(top|middle|bottom) (left|center|right)", instr)}
        before = {(o["row"], o["col"]): o for o in scene["objects"]}
        after = {(o["row"], o["col"]): o for o in target["objects"]}
        if kind == "recolor":
            m = re.fullmatch(r"make the (\w+) (\w+)(?: at (\w+ \w+))? (\w+)", instr)
            (cell,) = cells
            assert before[cell]["color"] == m[1] and after[cell]["color"] == m[4]
            assert after[cell]["shape"] == before[cell]["shape"] == m[2]
        elif kind == "remove":
            (cell,) = cells
            assert cell in before and cell not in after
        elif kind == "add":
            (cell,) = cells
            assert cell in named and cell not in before and cell in after
            assert instr == f"add a {S.describe(after[cell])} at {S.cell_name(*cell)}"
        else:
            assert len(cells) == 2
            (old,) = [c for c in cells if c in before]
            (new,) = [c for c in cells if c in after]
            assert new in named and {k: v for k, v in before[old].items() if k not in ("row", "col", "bbox")} \
                == {k: v for k, v in after[new].items() if k not in ("row", "col", "bbox")}
        assert cells - named <= {c for c in cells if kind in ("recolor", "remove", "move")}
        assert set(before) ^ set(after) <= cells


def test_geneval_grammar_roundtrip_and_satisfiable():
    pairs = S.geneval_prompts(0, 20)
    assert len(pairs) == 20 * len(S.GENEVAL_CATEGORIES)
    assert pairs == S.geneval_prompts(0, 20)
    rng = np.random.default_rng(0)
    for prompt, spec in pairs:
        assert S.parse_prompt(prompt) == spec
        scene = S.scene_for_spec(spec, rng)
        assert S.spec_satisfied(spec, scene["objects"])
    spec = S.parse_prompt("a photo of two circles")
    two = [S.make_object("circle", "red", "small", 0, 0, 64), S.make_object("circle", "red", "small", 0, 1, 64)]
    assert S.spec_satisfied(spec, two) and not S.spec_satisfied(spec, two[:1])
    assert not S.spec_satisfied(spec, two + [S.make_object("circle", "blue", "small", 1, 1, 64)])
    spec = S.parse_prompt("a photo of a square left of a circle")
    sq, ci = S.make_object("square", "red", "small", 0, 0, 64), S.make_object("circle", "red", "small", 0, 2, 64)
    assert S.spec_satisfied(spec, [sq, ci]) and not S.spec_satisfied(S.parse_prompt(
        "a photo of a square right of a circle"), [sq, ci])
    with pytest.raises(ValueError):
        S.parse_prompt("a photo of a dog")


def test_geneval_training_examples():
    cats = set()
    for i in range(60):
        g = S.geneval_example("train", i, size=48)
        cats.add(g["spec"]["tag"])
        assert S.parse_prompt(g["prompt"]) == g["spec"] and S.spec_satisfied(g["spec"], g["scene"]["objects"])
        assert np.array_equal(g["image"], S.render(g["scene"]))
    assert cats == set(S.GENEVAL_CATEGORIES)
