"""VQA accuracy: exact match and VQAv2 soft accuracy with the official answer normalisation.

Soft accuracy (Antol et al. 2015; official `vqaEval.py`): with the usual 10 human answers, the score of a
prediction is the average over the 10 leave-one-out subsets of 9 answers of min(#matches in the subset
/ 3, 1); e.g. 1 of 10 humans agreeing gives 0.3, 2 give 0.6, 3 give 0.9, >= 4 give 1.

Normalisation ports the official one: newlines/tabs to spaces, strip; punctuation removed (or replaced
by a space, as the official rule decides), periods not followed by a digit removed, lower case, number
words to digits ("two" -> "2", "none" -> "0"), articles dropped, and common apostrophe-less contractions
restored ("dont" -> "don't"). Difference from the official script, deliberately: it normalises both
sides only when the human answers disagree (they are pre-normalised in VQAv2); here both sides are always
normalised, which is what one wants for datasets that are not pre-normalised. With a single reference
answer the leave-one-out formula is undefined (it always gives 0); we then use normalised exact match.
"""
from __future__ import annotations

import re
from typing import Sequence

import numpy as np

_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
          ",", "?", "!"]
# Official pattern, kept as is: "(?!<=\d)" is a (no-op) lookahead, so this drops periods not followed
# by a digit.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")


def _process_punctuation(text: str) -> str:
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out)


def _process_digit_article(text: str) -> str:
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    words = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words)


def normalize_answer(answer: str) -> str:
    """Official VQA answer normalisation (see module docstring)."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(answer))


def soft_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQAv2 accuracy of one prediction against the human answers (usually 10)."""
    if not answers:
        raise ValueError("need at least one reference answer")
    pred = normalize_answer(prediction)
    gts = [normalize_answer(a) for a in answers]
    if len(gts) == 1:
        return float(pred == gts[0])
    accs = []
    for i in range(len(gts)):
        matches = sum(g == pred for j, g in enumerate(gts) if j != i)
        accs.append(min(1.0, matches / 3.0))
    return float(np.mean(accs))


def exact_match(prediction: str, answer: str, normalize: bool = True) -> bool:
    if normalize:
        return normalize_answer(prediction) == normalize_answer(answer)
    return prediction.strip() == answer.strip()


def vqa_accuracy(predictions: Sequence[str], answers: Sequence[str | Sequence[str]],
                 qtypes: Sequence[str] | None = None) -> dict:
    """{'exact_match', 'soft_accuracy'} over a set (answers: one string or a list of human answers per
    question; exact match uses the first / only one), plus per-qtype breakdowns when `qtypes` is given."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answers")
    answers = [[a] if isinstance(a, str) else list(a) for a in answers]
    em = np.array([exact_match(p, a[0]) for p, a in zip(predictions, answers)], np.float64)
    soft = np.array([soft_accuracy(p, a) for p, a in zip(predictions, answers)], np.float64)
    out = {"exact_match": float(em.mean()) if len(em) else float("nan"),
           "soft_accuracy": float(soft.mean()) if len(soft) else float("nan"), "num_questions": len(em)}
    if qtypes is not None:
        qtypes = np.asarray(qtypes)
        for t in sorted(set(qtypes.tolist())):
            out[f"exact_match/{t}"] = float(em[qtypes == t].mean())
            out[f"soft_accuracy/{t}"] = float(soft[qtypes == t].mean())
    return out
