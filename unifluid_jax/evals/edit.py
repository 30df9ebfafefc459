"""Image-editing success on shapes edit pairs (instructions from `shapes.make_edit`).

The instruction is parsed back into its parameters, its referent resolved in the source scene (metadata
objects, or objects detected in the source image), and the objects detected in the edited image checked:
- recolor: an object of the target's shape with the new colour sits at the target's cell;
- remove: nothing at the target's cell and every other source object still there;
- add: an object with the requested size, colour and shape at the requested cell;
- move: the object (shape, colour, size) at the new cell and no such object left at the old one.
`success` is that per-kind check; `exact` is stricter: the edited scene equals the expected target scene
(all objects, with sizes and cells) - nothing else changed.
"""
from __future__ import annotations

import re
from typing import Callable, Sequence

import numpy as np

from unifluid_jax.data import shapes
from unifluid_jax.evals import detector

_C, _S, _Z = "|".join(shapes.COLORS), "|".join(shapes.SHAPES), "|".join(shapes.SIZES)
_CELL = rf"({'|'.join(shapes.ROWS)}) ({'|'.join(shapes.COLS)})"
_REF = rf"the ({_C}) ({_S})(?: at {_CELL})?"
_PARSERS = {
    "recolor": re.compile(rf"make {_REF} ({_C})$"),
    "remove": re.compile(rf"remove {_REF}$"),
    "add": re.compile(rf"add an? ({_Z}) ({_C}) ({_S}) at {_CELL}$"),
    "move": re.compile(rf"move {_REF} to {_CELL}$"),
}


def _cell(row: str | None, col: str | None):
    return None if row is None else (shapes.ROWS.index(row), shapes.COLS.index(col))


def parse_edit(instruction: str) -> dict:
    """Instruction -> {kind, target: {color, shape, cell or None}, new_color | new: {...} | to: cell}."""
    text = instruction.strip().lower()
    for kind, rx in _PARSERS.items():
        m = rx.match(text)
        if not m:
            continue
        g = m.groups()
        if kind == "add":
            return {"kind": kind, "new": {"size": g[0], "color": g[1], "shape": g[2], "cell": _cell(g[3], g[4])}}
        out = {"kind": kind, "target": {"color": g[0], "shape": g[1], "cell": _cell(g[2], g[3])}}
        if kind == "recolor":
            out["new_color"] = g[4]
        elif kind == "move":
            out["to"] = _cell(g[4], g[5])
        return out
    raise ValueError(f"not a shapes edit instruction: {instruction!r}")


def _key(o: dict) -> tuple:
    return (o["shape"], o["color"], o["size"], o["row"], o["col"])


def _resolve(target: dict, objects: list[dict]) -> dict:
    found = [o for o in objects if o["color"] == target["color"] and o["shape"] == target["shape"]
             and (target["cell"] is None or (o["row"], o["col"]) == target["cell"])]
    if len(found) != 1:
        raise ValueError(f"edit target {target} matches {len(found)} source objects")
    return found[0]


def expected_objects(edit: dict, source: list[dict]) -> list[tuple]:
    """The target scene implied by a parsed edit, as sorted (shape, color, size, row, col) tuples."""
    keys = [_key(o) for o in source]
    if edit["kind"] == "add":
        n = edit["new"]
        keys.append((n["shape"], n["color"], n["size"], *n["cell"]))
        return sorted(keys)
    o = _resolve(edit["target"], source)
    keys.remove(_key(o))
    if edit["kind"] == "recolor":
        keys.append((o["shape"], edit["new_color"], o["size"], o["row"], o["col"]))
    elif edit["kind"] == "move":
        keys.append((o["shape"], o["color"], o["size"], *edit["to"]))
    return sorted(keys)


def _at(objects: list[tuple], cell) -> list[tuple]:
    return [k for k in objects if (k[3], k[4]) == tuple(cell)]


def check_edit(instruction: str, source_objects: list[dict], edited_objects: list[dict]) -> dict:
    """{kind, success, exact} for an edit given the source and edited scenes' objects."""
    edit = parse_edit(instruction)
    expected = expected_objects(edit, source_objects)
    got = detector.strip_bbox(edited_objects)
    kind = edit["kind"]
    if kind == "add":
        n = edit["new"]
        ok = (n["shape"], n["color"], n["size"], *n["cell"]) in got
    else:
        o = _resolve(edit["target"], source_objects)
        cell = (o["row"], o["col"])
        if kind == "recolor":
            ok = any(k[0] == o["shape"] and k[1] == edit["new_color"] for k in _at(got, cell))
        elif kind == "remove":
            others = [_key(p) for p in source_objects if p is not o]
            ok = not _at(got, cell) and all(k in got for k in others)
        else:  # move
            ok = (o["shape"], o["color"], o["size"], *edit["to"]) in got and \
                not any(k[:2] == (o["shape"], o["color"]) for k in _at(got, cell))
    return {"kind": kind, "success": bool(ok), "exact": got == expected}


def _objects(source, **detector_kwargs) -> list[dict]:
    """Source given as a scene dict, an object list, or an image (detected)."""
    if isinstance(source, dict):
        return source["objects"]
    if isinstance(source, list) and (not source or isinstance(source[0], dict)):
        return source
    return detector.detect(np.asarray(source), **detector_kwargs)


def score_edits(instructions: Sequence[str], sources, edited_images, **detector_kwargs) -> dict:
    """Per-kind and overall success / exact rates. sources: per edit a scene dict, its object list or
    the source image; edited_images: [B, H, W, 3] (uint8 or float in [-1, 1])."""
    if not len(instructions) == len(sources) == len(edited_images):
        raise ValueError("instructions, sources and edited images must have the same length")
    results = [check_edit(ins, _objects(src, **detector_kwargs), detector.detect(img, **detector_kwargs))
               for ins, src, img in zip(instructions, sources, edited_images)]
    out: dict = {"num_edits": len(results), "results": results}
    for metric in ("success", "exact"):
        out[metric] = float(np.mean([r[metric] for r in results])) if results else float("nan")
        for kind in shapes.EDIT_KINDS:
            rs = [r[metric] for r in results if r["kind"] == kind]
            if rs:
                out[f"{metric}/{kind}"] = float(np.mean(rs))
    return out


def evaluate_edits(edit_fn: Callable[[np.ndarray, list[str]], np.ndarray], examples: Sequence[dict],
                   batch_size: int = 32, **detector_kwargs) -> dict:
    """Run `edit_fn(source_images [B, H, W, 3], instructions) -> edited images` over shapes examples
    (dicts with 'image', 'scene', 'instruction', as from `shapes.example`) and score the edits."""
    edited = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        edited += list(np.asarray(edit_fn(np.stack([e["image"] for e in chunk]),
                                          [e["instruction"] for e in chunk])))
    return score_edits([e["instruction"] for e in examples], [e["scene"] for e in examples], edited,
                       **detector_kwargs)
