"""CIDEr-D, computed exactly as pycocoevalcap's `Cider().compute_score`, plus caption exact match.

CIDEr-D (Vedantam et al. 2015, coco-caption variant): per image, n-gram (n = 1..4) tf-idf vectors with
document frequencies counted over the reference sets of the whole corpus (idf = log(#images) -
log(max(1, df))); cosine-like similarity between the candidate and each reference with the candidate's
weights clipped at the reference's (min(h, r) * r), a Gaussian length penalty exp(-delta^2 / (2 sigma^2)),
mean over n, mean over references, times 10. Quirks kept for bit-compatibility with pycocoevalcap:
the "length" in the penalty is the number of bigrams (len - 1 words, 0 for one word), and a norm of 0
leaves the un-normalised dot product.

Tokenisation: `tokenizer="simple"` (default: lower case, punctuation to spaces, split), `"ptb"` (the
Stanford PTB tokenizer shipped with pycocoevalcap, needs `java`), or None for pre-tokenised strings.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Mapping, Sequence

import numpy as np

_PUNCT = re.compile(r"[^\w\s]|_")


def simple_tokenize(text: str) -> str:
    """Lower case, punctuation replaced by spaces, whitespace collapsed."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def ptb_tokenize(texts: Mapping[object, Sequence[str]]) -> dict[object, list[str]]:
    """{key: [caption, ...]} through pycocoevalcap's PTBTokenizer (Stanford CoreNLP 3.4.1, needs java)."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    return PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in texts.items()})


def _tokenize(refs: dict, hyps: dict, tokenizer: str | None) -> tuple[dict, dict]:
    if tokenizer is None:
        return refs, hyps
    if tokenizer == "simple":
        tok = lambda d: {k: [simple_tokenize(c) for c in v] for k, v in d.items()}  # noqa: E731
        return tok(refs), tok(hyps)
    if tokenizer == "ptb":
        return ptb_tokenize(refs), ptb_tokenize(hyps)
    raise ValueError(f"unknown tokenizer {tokenizer!r}; choose 'simple', 'ptb' or None")


def _ngrams(sentence: str, n: int) -> Counter:
    words = sentence.split()
    return Counter(tuple(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def _as_dicts(refs, hyps) -> tuple[dict, dict]:
    """Accept {id: [refs]} / {id: hyp or [hyp]} dicts or parallel lists."""
    if not isinstance(refs, Mapping):
        refs = dict(enumerate(refs))
    if not isinstance(hyps, Mapping):
        hyps = dict(enumerate(hyps))
    if set(refs) != set(hyps):
        raise ValueError("references and hypotheses must have the same keys")
    refs = {k: [v] if isinstance(v, str) else list(v) for k, v in refs.items()}
    hyps = {k: [v] if isinstance(v, str) else list(v) for k, v in hyps.items()}
    for k in refs:
        if len(hyps[k]) != 1 or not refs[k]:
            raise ValueError(f"{k!r}: need exactly one hypothesis and at least one reference")
    return refs, hyps


def cider_d(refs, hyps, n: int = 4, sigma: float = 6.0,
            tokenizer: str | None = "simple") -> tuple[float, np.ndarray]:
    """Corpus CIDEr-D. refs: {id: [reference, ...]} (or a list of lists); hyps: {id: hypothesis} (or a
    list). Returns (mean score, per-image scores in key order) like pycocoevalcap."""
    refs, hyps = _as_dicts(refs, hyps)
    refs, hyps = _tokenize(refs, hyps, tokenizer)
    keys = list(refs)
    crefs = [[_ngrams(r, n) for r in refs[k]] for k in keys]
    ctest = [_ngrams(hyps[k][0], n) for k in keys]
    df: Counter = Counter()
    for rs in crefs:
        df.update(set(g for r in rs for g in r))
    log_num_images = math.log(float(len(crefs)))

    def vec(counts):
        v = [dict() for _ in range(n)]
        norm = [0.0] * n
        length = 0
        for g, tf in counts.items():
            k = len(g) - 1
            v[k][g] = float(tf) * (log_num_images - np.log(max(1.0, df[g])))
            norm[k] += v[k][g] ** 2
            if k == 1:  # pycocoevalcap counts bigrams as the length
                length += tf
        return v, [np.sqrt(x) for x in norm], length

    def sim(vh, nh, lh, vr, nr, lr):
        delta = float(lh - lr)
        val = np.zeros(n)
        for k in range(n):
            for g, w in vh[k].items():
                wr = vr[k].get(g, 0.0)
                val[k] += min(w, wr) * wr
            if nh[k] != 0 and nr[k] != 0:
                val[k] /= nh[k] * nr[k]
            val[k] *= np.e ** (-(delta ** 2) / (2 * sigma ** 2))
        return val

    scores = []
    for test, rs in zip(ctest, crefs):
        vh, nh, lh = vec(test)
        total = np.zeros(n)
        for r in rs:
            total += sim(vh, nh, lh, *vec(r))
        scores.append(float(np.mean(total)) / len(rs) * 10.0)
    scores = np.array(scores)
    return float(np.mean(scores)), scores


def _normalize_caption(text: str) -> str:
    return simple_tokenize(text)


def caption_exact_match(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """Fraction of predictions equal (after lower case / punctuation / whitespace normalisation) to a
    reference (a string or any of a list). For shapes captions the canonical caption is unique."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    hits = []
    for p, r in zip(predictions, references):
        rs = [r] if isinstance(r, str) else list(r)
        hits.append(_normalize_caption(p) in {_normalize_caption(x) for x in rs})
    return float(np.mean(hits)) if hits else float("nan")


def caption_metrics(predictions: Sequence[str], references: Sequence[str | Sequence[str]],
                    tokenizer: str | None = "simple") -> dict:
    """{'cider': corpus CIDEr-D, 'exact_match'} for parallel lists of predictions and references."""
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    score, _ = cider_d(refs, list(predictions), tokenizer=tokenizer)
    return {"cider": score, "exact_match": caption_exact_match(predictions, refs)}
