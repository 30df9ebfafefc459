"""Shapes-GenEval: ground-truth renders score 100% per category; corrupted images fail."""
import numpy as np

from unifluid_jax.data import shapes
from unifluid_jax.evals import geneval


def _scene_image(spec, seed, size=64):
    scene = shapes.scene_for_spec(spec, np.random.default_rng(seed), size)
    return scene, shapes.render(scene)


def test_ground_truth_renders_score_100():
    prompts = shapes.geneval_prompts(seed=0, n=25)
    images = [_scene_image(spec, i)[1] for i, (_, spec) in enumerate(prompts)]
    out = geneval.score_images(images, prompts)
    for cat in shapes.GENEVAL_CATEGORIES:
        assert out[cat] == 1.0, cat
    assert out["overall"] == 1.0 and out["num_images"] == len(prompts)


def _opposite(spec):
    """A scene where the position spec's subject is clearly on the wrong side of its reference."""
    rel = spec["include"][1]["position"][0]
    subject, ref = {"left of": ((1, 2), (1, 0)), "right of": ((1, 0), (1, 2)),
                    "above": ((2, 1), (0, 1)), "below": ((0, 1), (2, 1))}[rel]
    objs = [shapes.make_object(spec["include"][1]["class"], "red", "large", *subject, 64),
            shapes.make_object(spec["include"][0]["class"], "blue", "large", *ref, 64)]
    return {"size": 64, "objects": objs}


def _recolor(scene, spec):
    """Give every object of a coloured class a different colour."""
    want = {item["class"]: item["color"] for item in spec["include"]}
    objs = []
    for o in scene["objects"]:
        c = o["color"]
        if o["shape"] in want:
            c = next(x for x in shapes.COLORS if x != want[o["shape"]])
        objs.append(shapes.make_object(o["shape"], c, o["size"], o["row"], o["col"], scene["size"]))
    return {"size": scene["size"], "objects": objs}


def _add_same(scene, shape):
    used = {(o["row"], o["col"]) for o in scene["objects"]}
    r, c = next((r, c) for r in range(3) for c in range(3) if (r, c) not in used)
    return {"size": scene["size"], "objects": scene["objects"] + [
        shapes.make_object(shape, "white", "small", r, c, scene["size"])]}


def test_wrong_images_fail():
    bad_images, bad_specs = [], []
    for i, (_, spec) in enumerate(shapes.geneval_prompts(seed=1, n=10)):
        scene, _ = _scene_image(spec, 100 + i)
        cat, inc = spec["tag"], spec["include"]
        wrong = []
        # Missing object: drop one object of the first included class.
        drop = next(j for j, o in enumerate(scene["objects"]) if o["shape"] == inc[0]["class"])
        wrong.append({"size": 64, "objects": scene["objects"][:drop] + scene["objects"][drop + 1:]})
        if cat in ("colors", "color_attr"):
            wrong.append(_recolor(scene, spec))
        if cat == "position":
            wrong.append(_opposite(spec))
        if cat == "counting":
            wrong.append(_add_same(scene, inc[0]["class"]))  # one too many
        wrong.append({"size": 64, "objects": []})
        bad_images += [shapes.render(w) for w in wrong]
        bad_specs += [spec] * len(wrong)
    out = geneval.score_images(bad_images, bad_specs)
    assert not any(out["correct"])
    assert out["overall"] == 0.0
    assert set(shapes.GENEVAL_CATEGORIES) <= set(out)


def test_evaluate_geneval_with_generate_fn():
    prompts = shapes.geneval_prompts(seed=2, n=4)
    calls = []

    def generate_fn(texts):  # an oracle "model": draws a scene for each prompt, float in [-1, 1]
        calls.append(len(texts))
        imgs = [shapes.render(shapes.scene_for_spec(shapes.parse_prompt(t), np.random.default_rng(len(calls))))
                for t in texts]
        return np.stack(imgs).astype(np.float32) / 127.5 - 1.0

    out = geneval.evaluate_geneval(generate_fn, prompts, batch_size=10, images_per_prompt=2)
    assert out["overall"] == 1.0 and out["num_images"] == 2 * len(prompts)
    assert calls == [10, 10, 10, 10, 8]
    # Bare prompt strings work too, and a blank "model" scores 0.
    out = geneval.evaluate_geneval(lambda t: np.zeros((len(t), 64, 64, 3), np.uint8), [p for p, _ in prompts])
    assert out["overall"] == 0.0
