"""Chance baselines: every score next to what the same outputs get against OTHER examples' targets.

A generator that ignores its prompt still draws plausible scenes, and a captioner that ignores its image still
writes fluent captions; their scores are not zero. Scoring each output against the targets of the other
examples of its group (GenEval category, VQA question type) measures exactly that floor: a model beats chance
only by the part of its score that depends on its input.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from unifluid_jax.data import shapes
from unifluid_jax.evals import cider, vqa


def _groups(keys: Sequence[str]) -> dict[str, np.ndarray]:
    keys = np.asarray(keys)
    return {k: np.flatnonzero(keys == k) for k in dict.fromkeys(keys.tolist())}


def _mean_off_diagonal(n: int, hit) -> float:
    """Mean of hit(i, j) over the ordered pairs i != j of a group of n (nan for a group of one)."""
    if n < 2:
        return float("nan")
    return float(np.mean([hit(i, j) for i in range(n) for j in range(n) if i != j]))


def geneval_chance(specs: Sequence[dict], detections: Sequence[list]) -> dict:
    """Per category: the mean correctness of image i against the spec of prompt j (j != i, same category);
    'overall' is their unweighted mean, as in `geneval.summarize`."""
    by_cat = _groups([s["tag"] for s in specs])
    out = {}
    for cat, idx in by_cat.items():
        out[cat] = _mean_off_diagonal(len(idx), lambda i, j: shapes.spec_satisfied(
            specs[idx[j]], detections[idx[i]]))
    cats = [c for c in out if not np.isnan(out[c])]
    out["overall"] = float(np.mean([out[c] for c in cats])) if cats else float("nan")
    return out


def caption_chance(predictions: Sequence[str], references: Sequence[str]) -> dict:
    """Exact match of prediction i against reference j over all pairs i != j; CIDEr-D of the predictions
    against the references rotated by one (each prediction scored on another image's caption)."""
    n = len(predictions)
    norm_p = [cider.simple_tokenize(p) for p in predictions]
    norm_r = [cider.simple_tokenize(r) for r in references]
    em = _mean_off_diagonal(n, lambda i, j: norm_p[i] == norm_r[j])
    rotated = [[references[(i + 1) % n]] for i in range(n)]
    return {"exact_match": em, "cider": cider.cider_d(rotated, list(predictions))[0] if n > 1 else float("nan")}


def vqa_chance(predictions: Sequence[str], answers: Sequence[str], qtypes: Sequence[str]) -> dict:
    """Exact match of answer i against the answer of question j (j != i, same question type), per type and
    overall (weighted by the number of questions of each type, like the real score)."""
    out, total, count = {}, 0.0, 0
    norm_p = [vqa.normalize_answer(p) for p in predictions]
    norm_a = [vqa.normalize_answer(a) for a in answers]
    for t, idx in _groups(qtypes).items():
        acc = _mean_off_diagonal(len(idx), lambda i, j: norm_p[idx[i]] == norm_a[idx[j]])
        out[f"exact_match/{t}"] = acc
        if not np.isnan(acc):
            total, count = total + acc * len(idx), count + len(idx)
    out["exact_match"] = total / count if count else float("nan")
    return out

