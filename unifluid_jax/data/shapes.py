"""The embedded default dataset: procedurally drawn shapes with exact ground truth.

A scene is 1-4 objects on a plain black background, each at a distinct cell of a 3x3 grid, drawn flat
(no anti-aliasing) in one of 8 well separated pure colours, so an analytic detector (nearest palette colour
+ connected components) recovers the metadata exactly. Each object lies strictly inside its cell, so an
edit changes only the pixels of the cells it names.

Object metadata: {shape, color, size, row, col, bbox=(x0, y0, x1, y1) pixel box, end-exclusive}.

Texts (all lower case, deterministic given the scene and an rng):
- `caption(scene)`: canonical caption, objects in row-major cell order, e.g.
  "a large red circle at top left and a small blue square at middle center".
- `vqa_pairs(scene, rng)`: (question, answer, qtype) about colour, shape, count, position, yes/no.
- `make_edit(scene, rng)`: (instruction, target scene, kind) for recolour / remove / add / move.
- `geneval_prompts(seed, n)`: GenEval-style prompts per category with a structured spec
  (`parse_prompt` is the canonical inverse, `spec_satisfied` checks a spec against detected objects,
  `scene_for_spec` draws a scene that satisfies one).

Splits come from disjoint seed ranges (`SPLIT_SEED_BASE`); `scene_for_index(split, i)` is a pure function
of (split, i), so the same seed gives identical bytes.
"""
from __future__ import annotations

import re
from typing import Any

import numpy as np

# Palette (RGB, uint8). Pairwise L2 distance >= 127; background distance >= 200 from every colour.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 200, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "cyan": (0, 255, 255),
    "magenta": (255, 0, 255),
    "orange": (255, 128, 0),
    "white": (255, 255, 255),
}
BACKGROUND: tuple[int, int, int] = (0, 0, 0)
COLORS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = ("small", "large")
# Half-extent of an object as a fraction of half the cell side.
SIZE_FRACTION = {"small": 0.45, "large": 0.8}
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
GRID = 3
MIN_SIZE = 24  # below this, small objects lose their shape
MAX_OBJECTS = 4
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPLIT_SEED_BASE = {"train": 0, "val": 1_000_000_000, "test": 2_000_000_000}
SPLIT_MAX = 1_000_000_000
EDIT_KINDS = ("recolor", "remove", "add", "move")
GENEVAL_CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS = ("left of", "right of", "above", "below")


# ----------------------------------------------------------------------------------------------- scenes

def cell_name(row: int, col: int) -> str:
    return f"{ROWS[row]} {COLS[col]}"


def cell_box(row: int, col: int, size: int) -> tuple[int, int, int, int]:
    """Pixel box (x0, y0, x1, y1), end-exclusive, of a grid cell: the pixels whose centre lies in it."""
    edges = [int(np.ceil(k * size / GRID - 0.5)) for k in range(GRID + 1)]
    return edges[col], edges[row], edges[col + 1], edges[row + 1]


def _object_mask(obj: dict, size: int) -> np.ndarray:
    c = np.arange(size, dtype=np.float64) + 0.5
    cell = size / GRID
    cx, cy = (obj["col"] + 0.5) * cell, (obj["row"] + 0.5) * cell
    h = SIZE_FRACTION[obj["size"]] * cell / 2
    dx, dy = c[None, :] - cx, c[:, None] - cy
    shape = obj["shape"]
    if shape == "square":
        m = (np.abs(dx) <= h) & (np.abs(dy) <= h)
    elif shape == "circle":
        m = dx * dx + dy * dy <= h * h
    elif shape == "triangle":  # apex up
        m = (np.abs(dy) <= h) & (np.abs(dx) <= (dy + h) / 2)
    elif shape == "cross":
        a = h / 3
        m = ((np.abs(dx) <= h) & (np.abs(dy) <= a)) | ((np.abs(dx) <= a) & (np.abs(dy) <= h))
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return m


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def make_object(shape: str, color: str, size: str, row: int, col: int, image_size: int) -> dict:
    if image_size < MIN_SIZE:
        raise ValueError(f"shapes: image size {image_size} < MIN_SIZE={MIN_SIZE}")
    obj = {"shape": shape, "color": color, "size": size, "row": int(row), "col": int(col)}
    obj["bbox"] = _bbox(_object_mask(obj, image_size))
    return obj


def render(scene: dict) -> np.ndarray:
    """[size, size, 3] uint8 image of a scene."""
    size = scene["size"]
    img = np.empty((size, size, 3), np.uint8)
    img[:] = BACKGROUND
    for obj in scene["objects"]:
        img[_object_mask(obj, size)] = PALETTE[obj["color"]]
    return img


def _sorted(objects: list[dict]) -> list[dict]:
    return sorted(objects, key=lambda o: (o["row"], o["col"]))


def random_scene(rng: np.random.Generator, size: int = 64, num_objects: int | None = None) -> dict:
    n = int(rng.integers(1, MAX_OBJECTS + 1)) if num_objects is None else num_objects
    cells = rng.choice(GRID * GRID, size=n, replace=False)
    objects = [make_object(SHAPES[rng.integers(len(SHAPES))], COLORS[rng.integers(len(COLORS))],
                           SIZES[rng.integers(len(SIZES))], c // GRID, c % GRID, size) for c in cells]
    return {"size": size, "objects": _sorted(objects)}


def split_seed(split: str, index: int, seed: int = 0) -> int:
    if split not in SPLIT_SEED_BASE:
        raise ValueError(f"unknown split {split!r}; choose one of {tuple(SPLIT_SEED_BASE)}")
    if not 0 <= index < SPLIT_MAX:
        raise ValueError(f"index {index} out of range")
    return SPLIT_SEED_BASE[split] + index


def example_rng(split: str, index: int, seed: int = 0) -> np.random.Generator:
    """The rng of example `index` of `split`; disjoint splits use disjoint seed ranges."""
    return np.random.default_rng([seed, split_seed(split, index)])


def scene_for_index(split: str, index: int, size: int = 64, seed: int = 0) -> dict:
    return random_scene(example_rng(split, index, seed), size)


# ----------------------------------------------------------------------------------------------- texts

def describe(obj: dict, with_size: bool = True) -> str:
    return f"{obj['size']} {obj['color']} {obj['shape']}" if with_size else f"{obj['color']} {obj['shape']}"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def caption(scene: dict) -> str:
    """Canonical caption: every object with size, colour, shape and cell, row-major."""
    return _join([f"a {describe(o)} at {cell_name(o['row'], o['col'])}" for o in _sorted(scene["objects"])])


def plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


def _count(objects, **attrs) -> int:
    return sum(all(o[k] == v for k, v in attrs.items()) for o in objects)


def reference(obj: dict, objects: list[dict]) -> str:
    """Shortest unambiguous phrase for an object: 'the red circle', else with its cell."""
    if _count(objects, shape=obj["shape"], color=obj["color"]) == 1:
        return f"the {obj['color']} {obj['shape']}"
    return f"the {obj['color']} {obj['shape']} at {cell_name(obj['row'], obj['col'])}"


def vqa_pairs(scene: dict, rng: np.random.Generator, n: int = 1) -> list[tuple[str, str, str]]:
    """n (question, answer, qtype) pairs, qtype in color/shape/count/position/yesno."""
    objs = scene["objects"]
    out = []
    for _ in range(n):
        qtype = ("color", "shape", "count", "position", "yesno")[rng.integers(5)]
        o = objs[rng.integers(len(objs))]
        where = cell_name(o["row"], o["col"])
        if qtype == "color":
            out.append((f"what color is the object at {where}?", o["color"], qtype))
        elif qtype == "shape":
            out.append((f"what shape is at {where}?", o["shape"], qtype))
        elif qtype == "count":
            k = rng.integers(3)
            if k == 0:
                s = SHAPES[rng.integers(len(SHAPES))]
                out.append((f"how many {plural(s)} are there?", NUMBERS[_count(objs, shape=s)], qtype))
            elif k == 1:
                c = COLORS[rng.integers(len(COLORS))]
                out.append((f"how many {c} objects are there?", NUMBERS[_count(objs, color=c)], qtype))
            else:
                out.append(("how many objects are there?", NUMBERS[len(objs)], qtype))
        elif qtype == "position":
            q = f"where is {reference(o, objs)}?"
            out.append((q, where, qtype))
        else:
            if rng.integers(2):  # ask about a real object or a random one
                c, s = o["color"], o["shape"]
            else:
                c, s = COLORS[rng.integers(len(COLORS))], SHAPES[rng.integers(len(SHAPES))]
            ans = "yes" if _count(objs, shape=s, color=c) else "no"
            out.append((f"is there {_a(c + ' ' + s)}?", ans, qtype))
    return out


# ----------------------------------------------------------------------------------------------- edits

def make_edit(scene: dict, rng: np.random.Generator, kind: str | None = None) -> tuple[str, dict, str]:
    """Returns (instruction, target scene, kind). Only the named cells change."""
    objs = [dict(o) for o in scene["objects"]]
    size = scene["size"]
    occupied = {(o["row"], o["col"]) for o in objs}
    free = [(r, c) for r in range(GRID) for c in range(GRID) if (r, c) not in occupied]
    kinds = [k for k in EDIT_KINDS
             if not (k == "remove" and len(objs) < 2) and not (k in ("add", "move") and not free)
             and not (k == "add" and len(objs) >= MAX_OBJECTS)]
    if kind is None:
        kind = kinds[rng.integers(len(kinds))]
    elif kind not in kinds:
        raise ValueError(f"edit {kind!r} is not possible on this scene (possible: {kinds})")
    i = int(rng.integers(len(objs)))
    o = objs[i]
    ref = reference(o, objs)
    if kind == "recolor":
        new = [c for c in COLORS if c != o["color"]][rng.integers(len(COLORS) - 1)]
        instr = f"make {ref} {new}"
        objs[i] = make_object(o["shape"], new, o["size"], o["row"], o["col"], size)
    elif kind == "remove":
        instr = f"remove {ref}"
        objs.pop(i)
    elif kind == "add":
        r, c = free[rng.integers(len(free))]
        new = make_object(SHAPES[rng.integers(len(SHAPES))], COLORS[rng.integers(len(COLORS))],
                          SIZES[rng.integers(len(SIZES))], r, c, size)
        instr = f"add a {describe(new)} at {cell_name(r, c)}"
        objs.append(new)
    else:  # move
        r, c = free[rng.integers(len(free))]
        instr = f"move {ref} to {cell_name(r, c)}"
        objs[i] = make_object(o["shape"], o["color"], o["size"], r, c, size)
    return instr, {"size": size, "objects": _sorted(objs)}, kind


# ----------------------------------------------------------------------------------------------- GenEval

def _a(phrase: str) -> str:
    """'a red circle', 'an orange circle'."""
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


def geneval_prompt(spec: dict) -> str:
    """Canonical prompt text of a spec (the inverse of `parse_prompt`)."""
    cat, inc = spec["tag"], spec["include"]
    if cat == "single_object":
        return f"a photo of {_a(inc[0]['class'])}"
    if cat == "two_object":
        return f"a photo of {_a(inc[0]['class'])} and {_a(inc[1]['class'])}"
    if cat == "counting":
        return f"a photo of {NUMBERS[inc[0]['count']]} {plural(inc[0]['class'])}"
    if cat == "colors":
        return f"a photo of {_a(inc[0]['color'] + ' ' + inc[0]['class'])}"
    if cat == "position":
        rel, _ = inc[1]["position"]
        return f"a photo of {_a(inc[1]['class'])} {rel} {_a(inc[0]['class'])}"
    if cat == "color_attr":
        return (f"a photo of {_a(inc[0]['color'] + ' ' + inc[0]['class'])} and "
                f"{_a(inc[1]['color'] + ' ' + inc[1]['class'])}")
    raise ValueError(f"unknown GenEval category {cat!r}")


def _spec(tag, include, exclude=()):
    return {"tag": tag, "include": list(include), "exclude": list(exclude)}


def random_spec(rng: np.random.Generator, category: str) -> dict:
    """A random GenEval-style spec (GenEval metadata format: include/exclude lists of class/count/...)."""
    def two_shapes():
        a, b = rng.choice(len(SHAPES), 2, replace=False)
        return SHAPES[a], SHAPES[b]
    if category == "single_object":
        return _spec(category, [{"class": SHAPES[rng.integers(len(SHAPES))], "count": 1}])
    if category == "two_object":
        a, b = two_shapes()
        return _spec(category, [{"class": a, "count": 1}, {"class": b, "count": 1}])
    if category == "counting":
        s, n = SHAPES[rng.integers(len(SHAPES))], int(rng.integers(2, MAX_OBJECTS + 1))
        return _spec(category, [{"class": s, "count": n}], [{"class": s, "count": n + 1}])
    if category == "colors":
        return _spec(category, [{"class": SHAPES[rng.integers(len(SHAPES))], "count": 1,
                                 "color": COLORS[rng.integers(len(COLORS))]}])
    if category == "position":
        a, b = two_shapes()
        rel = RELATIONS[rng.integers(len(RELATIONS))]
        return _spec(category, [{"class": a, "count": 1}, {"class": b, "count": 1, "position": (rel, 0)}])
    if category == "color_attr":
        a, b = two_shapes()
        ca, cb = rng.choice(len(COLORS), 2, replace=False)
        return _spec(category, [{"class": a, "count": 1, "color": COLORS[ca]},
                                {"class": b, "count": 1, "color": COLORS[cb]}])
    raise ValueError(f"unknown GenEval category {category!r}; choose one of {GENEVAL_CATEGORIES}")


def geneval_prompts(seed: int, n: int, categories=GENEVAL_CATEGORIES) -> list[tuple[str, dict]]:
    """n (prompt, spec) pairs per category, deterministic by seed."""
    rng = np.random.default_rng([seed, 7])
    out = []
    for cat in categories:
        for _ in range(n):
            spec = random_spec(rng, cat)
            spec["prompt"] = geneval_prompt(spec)
            out.append((spec["prompt"], spec))
    return out


_S = "|".join(SHAPES)
_C = "|".join(COLORS)
_N = "|".join(NUMBERS)
_R = "|".join(RELATIONS)
_PARSERS = [
    ("counting", re.compile(rf"a photo of ({_N}) ({_S})(?:s|es)$")),
    ("color_attr", re.compile(rf"a photo of an? ({_C}) ({_S}) and an? ({_C}) ({_S})$")),
    ("colors", re.compile(rf"a photo of an? ({_C}) ({_S})$")),
    ("position", re.compile(rf"a photo of an? ({_S}) ({_R}) an? ({_S})$")),
    ("two_object", re.compile(rf"a photo of an? ({_S}) and an? ({_S})$")),
    ("single_object", re.compile(rf"a photo of an? ({_S})$")),
]


def parse_prompt(prompt: str) -> dict:
    """Canonical parse of a GenEval-style prompt into its spec; raises ValueError if not in the grammar."""
    p = prompt.strip().lower()
    for cat, rx in _PARSERS:
        m = rx.match(p)
        if not m:
            continue
        g = m.groups()
        if cat == "counting":
            n = NUMBERS.index(g[0])
            spec = _spec(cat, [{"class": g[1], "count": n}], [{"class": g[1], "count": n + 1}])
        elif cat == "color_attr":
            spec = _spec(cat, [{"class": g[1], "count": 1, "color": g[0]},
                               {"class": g[3], "count": 1, "color": g[2]}])
        elif cat == "colors":
            spec = _spec(cat, [{"class": g[1], "count": 1, "color": g[0]}])
        elif cat == "position":
            spec = _spec(cat, [{"class": g[2], "count": 1}, {"class": g[0], "count": 1, "position": (g[1], 0)}])
        elif cat == "two_object":
            spec = _spec(cat, [{"class": g[0], "count": 1}, {"class": g[1], "count": 1}])
        else:
            spec = _spec(cat, [{"class": g[0], "count": 1}])
        spec["prompt"] = p
        return spec
    raise ValueError(f"prompt not in the shapes GenEval grammar: {prompt!r}")


def _center(o: dict) -> tuple[float, float]:
    x0, y0, x1, y1 = o["bbox"]
    return (x0 + x1) / 2, (y0 + y1) / 2


def _relation_holds(rel: str, a: dict, b: dict) -> bool:
    """Does `a` stand in `rel` to `b`? Compares box centres (cells for shapes scenes)."""
    (ax, ay), (bx, by) = _center(a), _center(b)
    return {"left of": ax < bx, "right of": ax > bx, "above": ay < by, "below": ay > by}[rel]


def spec_satisfied(spec: dict, objects: list[dict]) -> bool:
    """GenEval rule on detected objects [{shape, color, bbox}]: each include has >= count matching objects
    (with the colour, if given, on `count` of them), each exclude has < count; for position the first
    matching object of include[1] must stand in the relation to some object of include[idx]."""
    def matches(o, item, with_color=True):
        return o["shape"] == item["class"] and (not with_color or "color" not in item
                                                 or o["color"] == item["color"])
    for item in spec["include"]:
        if sum(matches(o, item) for o in objects) < item["count"]:
            return False
    for item in spec.get("exclude", ()):
        if sum(matches(o, item) for o in objects) >= item["count"]:
            return False
    for item in spec["include"]:
        if "position" in item:
            rel, idx = item["position"]
            ref_item = spec["include"][idx]
            subjects = [o for o in objects if matches(o, item)]
            refs = [o for o in objects if matches(o, ref_item)]
            if not any(_relation_holds(rel, s, r) for s in subjects for r in refs if s is not r):
                return False
    return True


def scene_for_spec(spec: dict, rng: np.random.Generator, size: int = 64, max_tries: int = 1000) -> dict:
    """A random scene satisfying `spec` (rejection sampling over scenes built from its includes)."""
    for _ in range(max_tries):
        objects, cells = [], list(rng.permutation(GRID * GRID))
        for item in spec["include"]:
            for _ in range(item["count"]):
                c = cells.pop()
                color = item.get("color") or COLORS[rng.integers(len(COLORS))]
                objects.append(make_object(item["class"], color, SIZES[rng.integers(2)], c // GRID,
                                           c % GRID, size))
        scene = {"size": size, "objects": _sorted(objects)}
        if spec_satisfied(spec, scene["objects"]):
            return scene
    raise RuntimeError(f"could not draw a scene for {spec}")


# ----------------------------------------------------------------------------------------------- examples

def t2i_prompt(scene: dict, rng: np.random.Generator) -> str:
    """A true prompt for the scene: the canonical caption, or a GenEval-grammar statement it satisfies."""
    objs = scene["objects"]
    k = int(rng.integers(4))
    if k == 0 or len(objs) == 0:
        return caption(scene)
    o = objs[rng.integers(len(objs))]
    if k == 1:
        return f"a photo of {_a(o['color'] + ' ' + o['shape'])}" if _count(objs, shape=o["shape"]) == 1 else \
            f"a photo of {NUMBERS[_count(objs, shape=o['shape'])]} {plural(o['shape'])}"
    if k == 2 and len(objs) >= 2:
        others = [p for p in objs if p["shape"] != o["shape"]]
        if others:
            p = others[rng.integers(len(others))]
            return f"a photo of {_a(o['color'] + ' ' + o['shape'])} and {_a(p['color'] + ' ' + p['shape'])}"
    if k == 3 and len(objs) >= 2:
        others = [p for p in objs if p["shape"] != o["shape"] and
                  _count(objs, shape=p["shape"]) == 1 and _count(objs, shape=o["shape"]) == 1]
        if others:
            p = others[rng.integers(len(others))]
            rels = [r for r in RELATIONS if _relation_holds(r, o, p)]
            if rels:
                return f"a photo of {_a(o['shape'])} {rels[rng.integers(len(rels))]} {_a(p['shape'])}"
    return caption(scene)


def example(split: str, index: int, size: int = 64, seed: int = 0) -> dict[str, Any]:
    """Everything derived from one scene: image, caption, t2i prompt, one VQA pair, one edit."""
    rng = example_rng(split, index, seed)
    scene = random_scene(rng, size)
    q, a, qtype = vqa_pairs(scene, rng, 1)[0]
    instr, target, kind = make_edit(scene, rng)
    return {"scene": scene, "image": render(scene), "caption": caption(scene),
            "prompt": t2i_prompt(scene, rng), "question": q, "answer": a, "qtype": qtype,
            "instruction": instr, "edit_kind": kind, "target_scene": target, "target_image": render(target)}


def geneval_example(split: str, index: int, size: int = 64, seed: int = 0) -> dict[str, Any]:
    """A t2i training example from the GenEval grammar: random category and spec, a scene satisfying it.

    Random scenes rarely contain e.g. four crosses; these examples teach the prompts GenEval asks for.
    """
    rng = np.random.default_rng([seed, split_seed(split, index), 1])
    spec = random_spec(rng, GENEVAL_CATEGORIES[rng.integers(len(GENEVAL_CATEGORIES))])
    spec["prompt"] = geneval_prompt(spec)
    scene = scene_for_spec(spec, rng, size)
    return {"prompt": spec["prompt"], "spec": spec, "scene": scene, "image": render(scene)}


def vocabulary_texts() -> list[str]:
    """Texts covering every word the generators can emit (for tokenizer training)."""
    words = list(COLORS) + list(SHAPES) + [plural(s) for s in SHAPES] + list(SIZES) + list(ROWS) + \
        list(COLS) + list(NUMBERS) + list(RELATIONS) + ["yes", "no", "caption en", "a photo of an"]
    return words
