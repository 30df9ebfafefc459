"""Shapes-GenEval: GenEval's object-focused text-to-image check on the shapes dataset.

Like GenEval (Ghosh et al. 2023), each prompt carries a structured spec (which classes, how many, which
colour, which relative position); an image is correct when the objects found in it satisfy the spec.
GenEval uses a Mask2Former detector plus CLIP colour classification; here the analytic
`detector.detect` plays that role and `shapes.spec_satisfied` is the rule. Scores are the fraction of
correct images per category (single_object, two_object, counting, colors, position, color_attr);
overall is the unweighted mean over the categories present, as in GenEval.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from unifluid_jax.data import shapes
from unifluid_jax.evals import detector


def _as_spec(item) -> dict:
    """A (prompt, spec) pair, a spec dict, or a bare prompt string (parsed by `shapes.parse_prompt`)."""
    if isinstance(item, str):
        return shapes.parse_prompt(item)
    if isinstance(item, dict):
        return item
    _, spec = item
    return spec


def summarize(specs: Sequence[dict], correct: Sequence[bool]) -> dict:
    """{'overall', <category>: accuracy, 'num_images', 'correct'} from per-image correctness."""
    by_cat: dict[str, list[bool]] = {}
    for spec, ok in zip(specs, correct, strict=True):
        by_cat.setdefault(spec["tag"], []).append(bool(ok))
    cats = [c for c in shapes.GENEVAL_CATEGORIES if c in by_cat] + \
        sorted(c for c in by_cat if c not in shapes.GENEVAL_CATEGORIES)
    out = {c: float(np.mean(by_cat[c])) for c in cats}
    out["overall"] = float(np.mean([out[c] for c in cats])) if cats else float("nan")
    out["num_images"] = len(correct)
    out["correct"] = [bool(c) for c in correct]
    return out


def score_images(images, specs, **detector_kwargs) -> dict:
    """Score generated images ([B, H, W, 3] or a list; uint8 or float in [-1, 1]) against their specs
    (spec dicts, (prompt, spec) pairs or prompt strings). Returns `summarize(...)` plus the detections."""
    specs = [_as_spec(s) for s in specs]
    if len(images) != len(specs):
        raise ValueError(f"{len(images)} images for {len(specs)} specs")
    detections = detector.detect_batch(images, **detector_kwargs)
    correct = [shapes.spec_satisfied(s, d) for s, d in zip(specs, detections)]
    out = summarize(specs, correct)
    out["detections"] = detections
    return out


def evaluate_geneval(generate_fn: Callable[[list[str]], np.ndarray], prompts, batch_size: int = 32,
                     images_per_prompt: int = 1, **detector_kwargs) -> dict:
    """Generate images for `prompts` (from `shapes.geneval_prompts`, or spec dicts / prompt strings)
    with `generate_fn(list_of_prompt_strings) -> [B, H, W, 3]` and score them. GenEval samples 4 images
    per prompt; `images_per_prompt` repeats each prompt (the generator's rng must differ per call)."""
    specs = [_as_spec(p) for p in prompts for _ in range(images_per_prompt)]
    texts = [s.get("prompt") or shapes.geneval_prompt(s) for s in specs]
    images = []
    for i in range(0, len(texts), batch_size):
        batch = list(np.asarray(generate_fn(texts[i:i + batch_size])))
        if len(batch) != len(texts[i:i + batch_size]):
            raise ValueError(f"generate_fn returned {len(batch)} images for {len(texts[i:i + batch_size])} prompts")
        images += batch
    return score_images(images, specs, **detector_kwargs)
