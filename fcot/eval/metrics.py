"""Document-VQA metrics as pure functions: one prediction and its reference answers in, a score
in [0, 1] out. ``score(name, prediction, references)`` dispatches by name; :data:`METRICS` lists them.

Public implementations disagree on edge cases; the conventions here (also in ``docs/eval.md``):

- **Several references**: every metric takes the best score over the references, except VQA
  accuracy, whose definition is about agreement among the references (below).
- **Light normalisation** (exact match, ANLS): strip, lowercase, runs of whitespace -> one
  space. Nothing else (punctuation and articles count).
- **Empty prediction**: scores 0 against any non-empty reference, 1 against an empty one
  (ANLS: two empty strings are identical, distance 0, where ``0/max(0, 0)`` is left undefined
  by the DocVQA definition).
- **ANLS** (DocVQA, InfoVQA; Biten et al. 2019): ``1 - NL`` if ``NL < 0.5`` else 0, with NL the
  Levenshtein distance divided by the longer string's length, best over the references.
- **Relaxed accuracy** (ChartQA; Masry et al. 2022): when prediction and reference both read as
  numbers, correct iff ``|p - t| <= 0.05 |t|``; otherwise the normalised strings must be equal.
  Numbers may carry thousands commas (``1,234`` = 1234) and a trailing ``%``, which is dropped
  without scaling (``45%`` = ``45``: chart answers mix both spellings; pix2struct's reference
  code divides by 100 instead, so ``45%`` != ``45`` there). A target of 0 needs ``p == 0``
  exactly (a 5 % band around 0 is empty; pix2struct falls back to string equality, so ``0.0``
  != ``0`` there, here it is equal).
- **VQA accuracy** (TextVQA, VQAv2): both sides get the standard VQA normalisation (punctuation,
  number words -> digits, articles and common contractions; :func:`vqa_normalize`). With n >= 2
  references, the score is the mean over the n leave-one-out subsets of ``min(1, matches / 3)``,
  matches counted in the subset; with ten references that is the official metric. With one
  reference it is plain equality after normalisation (the leave-one-out subset would be empty).
  The official script normalises the references only when they disagree; here always (it only
  differs on references that normalise differently from themselves, which never match anyway).
"""

from __future__ import annotations

import re
from typing import Callable, Sequence


def _check(prediction: object, references: object) -> list[str]:
    if not isinstance(prediction, str):
        raise TypeError(f"prediction={prediction!r}: expected a str")
    if isinstance(references, str):
        references = [references]
    if not isinstance(references, (list, tuple)) or not references or not all(isinstance(r, str) for r in references):
        raise ValueError(f"references={references!r}: expected a non-empty list of str")
    return list(references)


def normalize(text: str) -> str:
    """Strip, lowercase and collapse whitespace (exact match, ANLS, relaxed accuracy's string case)."""
    return " ".join(text.lower().split())


def exact_match(prediction: str, references: str | Sequence[str]) -> float:
    """1.0 when the normalised prediction equals a normalised reference, else 0.0."""
    refs = _check(prediction, references)
    p = normalize(prediction)
    return float(any(p == normalize(r) for r in refs))


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions, each cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def anls(prediction: str, references: str | Sequence[str], threshold: float = 0.5) -> float:
    """Average Normalized Levenshtein Similarity of one answer: best over references of
    ``1 - NL`` if ``NL < threshold`` else 0 (DocVQA/InfoVQA use threshold 0.5)."""
    refs = _check(prediction, references)
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold={threshold!r}: expected a number in (0, 1] (0.5 for DocVQA/InfoVQA)")
    p = normalize(prediction)
    best = 0.0
    for r in refs:
        r = normalize(r)
        longest = max(len(p), len(r))
        nl = levenshtein(p, r) / longest if longest else 0.0
        best = max(best, 1.0 - nl if nl < threshold else 0.0)
    return best


_NUMBER = re.compile(r"^[+-]?(\d{1,3}(,\d{3})+|\d+)?(\.\d+)?$")


def parse_number(text: str) -> float | None:
    """A number read from an answer: optional sign, thousands commas, decimals, a trailing ``%``
    (dropped, not scaled); None when the text is not one number."""
    t = text.strip().replace(" ", "")
    if t.endswith("%"):
        t = t[:-1]
    if not t or not _NUMBER.match(t) or not any(ch.isdigit() for ch in t):
        return None
    return float(t.replace(",", ""))


def relaxed_accuracy(prediction: str, references: str | Sequence[str], tolerance: float = 0.05) -> float:
    """ChartQA's relaxed accuracy: numbers within ``tolerance`` relative error of the target,
    anything else by normalised string equality; best over references."""
    refs = _check(prediction, references)
    if not 0 <= tolerance < 1:
        raise ValueError(f"tolerance={tolerance!r}: expected a fraction in [0, 1) (0.05 for ChartQA)")
    p = parse_number(prediction)
    for r in refs:
        t = parse_number(r)
        if p is not None and t is not None:
            if abs(p - t) <= tolerance * abs(t):
                return 1.0
        elif normalize(prediction) == normalize(r):
            return 1.0
    return 0.0


# The VQA evaluation script's answer normalisation (VQAv2 / TextVQA), condensed.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldnt": "couldn't", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't", "havent": "haven't", "hes": "he's", "im": "i'm",
    "isnt": "isn't", "itd": "it'd", "itll": "it'll", "ive": "i've", "lets": "let's", "shes": "she's",
    "shouldnt": "shouldn't", "thats": "that's", "theres": "there's", "theyre": "they're", "theyve": "they've",
    "wasnt": "wasn't", "werent": "weren't", "whats": "what's", "wheres": "where's", "whos": "who's", "wont": "won't",
    "wouldnt": "wouldn't", "youre": "you're", "youve": "you've", "yall": "y'all",
}
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                 "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def vqa_normalize(answer: str) -> str:
    """The VQA evaluation's answer processing: whitespace, punctuation (a comma between digits
    goes, ``1,000`` -> ``1000``), periods not in a number, number words -> digits, articles,
    contractions; lowercased."""
    text = answer.replace("\n", " ").replace("\t", " ").strip().lower()
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD_STRIP.sub("", out)
    words = []
    for w in out.split():
        w = _NUMBER_WORDS.get(w, w)
        if w not in _ARTICLES:
            words.append(_CONTRACTIONS.get(w, w))
    return " ".join(words)


def vqa_accuracy(prediction: str, references: str | Sequence[str]) -> float:
    """VQA accuracy: mean over the leave-one-out subsets of the references of
    ``min(1, matches / 3)`` (TextVQA/VQAv2 with ten references); plain equality with one."""
    refs = [vqa_normalize(r) for r in _check(prediction, references)]
    p = vqa_normalize(prediction)
    if len(refs) == 1:
        return float(p == refs[0])
    matches = [p == r for r in refs]
    total = sum(matches)
    return sum(min(1.0, (total - m) / 3) for m in matches) / len(refs)


METRICS: dict[str, Callable[[str, Sequence[str]], float]] = {
    "exact_match": exact_match,
    "anls": anls,
    "relaxed_accuracy": relaxed_accuracy,
    "vqa_accuracy": vqa_accuracy,
}


def score(name: str, prediction: str, references: str | Sequence[str]) -> float:
    """Score one answer with the metric ``name`` (a key of :data:`METRICS`)."""
    if name not in METRICS:
        raise ValueError(f"metric={name!r}: expected one of {sorted(METRICS)}")
    return METRICS[name](prediction, references)


def score_all(predictions: Sequence[str], references: Sequence[Sequence[str]],
              metrics: Sequence[str] = tuple(METRICS)) -> dict[str, float]:
    """Mean of each metric over a set (predictions[i] answers references[i])."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} questions: expected one per question")
    if not predictions:
        raise ValueError("predictions=[]: nothing to score")
    return {m: sum(score(m, p, r) for p, r in zip(predictions, references)) / len(predictions) for m in metrics}
