"""Document-VQA metrics as pure functions: one prediction and its reference answers in, a score
in [0, 1] out. ``score(name, prediction, references, **options)`` dispatches by name;
:data:`METRICS` lists them.

By default every metric computes what the official scorers compute, quirks included, so that
numbers are comparable with the ones published through lmms-eval (``docs/eval.md`` lists where
the official scorers disagree with each other and which one each metric follows):

- **ANLS** (DocVQA, InfoVQA): the Robust Reading Competition script, which lmms-eval copies:
  per reference, the Levenshtein distance of the normalised strings (strip, lowercase, runs of
  whitespace -> one space) over the length of the longer RAW string (``len(s.upper())``, not
  normalised); the best (smallest) NL over the references; ``1 - NL`` kept when it is >= 0.5
  (so NL = 0.5 scores 0.5), else 0. ``convention="paper"`` is the stricter definition of the
  DocVQA paper: NL over the normalised lengths, kept only when NL < ``threshold``.
- **Relaxed accuracy** (ChartQA): pix2struct's ``relaxed_correctness``, as lmms-eval runs it:
  both sides read with Python's ``float`` (``"12."`` = 12, ``"1e3"`` = 1000, ``" 7 "`` = 7,
  ``"1,234"`` and ``"4 5"`` are not numbers); a trailing ``%`` divides by 100 (``"45%"`` =
  0.45); numbers are correct within ``tolerance`` relative error of a non-zero target; else
  (a side is not a number, or the target is 0) lowercase string equality, no stripping. Best
  over the references.
- **VQA accuracy**: ``convention="textvqa"`` (default): TextVQA's official MMF evaluator, which
  lmms-eval uses for TextVQA/VQAv2/VizWiz: every answer (prediction and references) goes
  through the EvalAI answer processor (lowercase, commas and ``?`` dropped, ``'s`` -> `` 's``,
  punctuation, periods not in numbers, number words, articles, the official contraction
  table); the score is the mean over the n leave-one-out subsets of the references of
  ``min(1, matches / 3)``. ``convention="vqav2"``: the official VQAv2 script: the prediction is
  processed (punctuation + digits/articles/contractions, no MMF tokenisation), the references
  only when they disagree, and then by punctuation only. With a single reference the
  leave-one-out subset is empty (every answer would score 0): both conventions score plain
  equality of the processed strings instead.
- **Exact match** (no official scorer; lmms-eval's ``exact_match`` with ``ignore_case``):
  strip, lowercase, runs of whitespace -> one space; best over references.
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


def _choice(name: str, value: object, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ValueError(f"{name}={value!r}: expected one of {list(allowed)}")
    return value  # type: ignore[return-value]


def normalize(text: str) -> str:
    """Strip, lowercase and collapse whitespace (exact match; ANLS' distance)."""
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


def anls(prediction: str, references: str | Sequence[str], threshold: float = 0.5, convention: str = "rrc") -> float:
    """Average Normalized Levenshtein Similarity of one answer (see the module docstring for the
    ``rrc`` default and the stricter ``paper`` convention)."""
    refs = _check(prediction, references)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
        raise ValueError(f"threshold={threshold!r}: expected a number in (0, 1] (0.5 for DocVQA/InfoVQA)")
    _choice("convention", convention, ("rrc", "paper"))
    p = normalize(prediction)
    nls = []
    for r in refs:
        g = normalize(r)
        longest = max(len(r.upper()), len(prediction.upper())) if convention == "rrc" else max(len(g), len(p))
        nls.append(levenshtein(g, p) / longest if longest else 0.0)
    nl = min(nls)
    if convention == "rrc":
        return 1.0 - nl if 1.0 - nl >= 1.0 - threshold else 0.0
    return 1.0 - nl if nl < threshold else 0.0


def _to_float(text: str) -> float | None:
    """pix2struct's number reading: Python ``float``, a trailing ``%`` divided by 100."""
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_accuracy(prediction: str, references: str | Sequence[str], tolerance: float = 0.05) -> float:
    """ChartQA's relaxed accuracy (pix2struct / lmms-eval; see the module docstring); best over
    the references."""
    refs = _check(prediction, references)
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 <= tolerance < 1:
        raise ValueError(f"tolerance={tolerance!r}: expected a fraction in [0, 1) (0.05 for ChartQA)")
    p = _to_float(prediction)
    for r in refs:
        t = _to_float(r)
        if p is not None and t:  # a target of 0 (falsy) falls through to string equality, as in pix2struct
            if abs(p - t) / abs(t) <= tolerance:
                return 1.0
        elif prediction.lower() == r.lower():
            return 1.0
    return 0.0


# The answer processing of the official VQA evaluation and of EvalAI / MMF (TextVQA): the same
# punctuation list, number words, articles and contraction table. The table's capitalised keys
# ("Im", "Ive", "Id've", "I'dve") never match, since the words are lowercased first; the official
# table maps "somebody'd" to "somebodyd". Both kept as the scorers have them.
_CONTRACTIONS = dict(
    aint="ain't", arent="aren't", cant="can't", couldve="could've", couldnt="couldn't", didnt="didn't",
    doesnt="doesn't", dont="don't", hadnt="hadn't", hasnt="hasn't", havent="haven't", hed="he'd", hes="he's",
    howd="how'd", howll="how'll", hows="how's", Im="I'm", Ive="I've", isnt="isn't", itd="it'd", itll="it'll",
    maam="ma'am", mightnt="mightn't", mightve="might've", mustnt="mustn't", mustve="must've", neednt="needn't",
    notve="not've", oclock="o'clock", oughtnt="oughtn't", shant="shan't", shouldve="should've", shouldnt="shouldn't",
    somebodyll="somebody'll", somebodys="somebody's", someoned="someone'd", someonell="someone'll", someones="someone's",
    somethingd="something'd", somethingll="something'll", thats="that's", thered="there'd", therere="there're",
    theres="there's", theyd="they'd", theyll="they'll", theyre="they're", theyve="they've", twas="'twas",
    wasnt="wasn't", weve="we've", werent="weren't", whatll="what'll", whatre="what're", whats="what's",
    whatve="what've", whens="when's", whered="where'd", wheres="where's", whereve="where've", whod="who'd",
    wholl="who'll", whos="who's", whove="who've", whyll="why'll", whyre="why're", whys="why's", wont="won't",
    wouldve="would've", wouldnt="wouldn't", yall="y'all", youd="you'd", youll="you'll", youre="you're",
    youve="you've",
)
_CONTRACTIONS.update({
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hed've": "he'd've", "he'dve": "he'd've", "Id've": "I'd've", "I'dve": "I'd've", "itd've": "it'd've",
    "it'dve": "it'd've", "let's": "let's", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "somethingd've": "something'd've",
    "something'dve": "something'd've", "thered've": "there'd've", "there'dve": "there'd've",
    "theyd've": "they'd've", "they'dve": "they'd've", "wed've": "we'd've", "we'dve": "we'd've",
    "whod've": "who'd've", "who'dve": "who'd've", "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've",
    "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd've": "you'd've", "you'dve": "you'd've",
})
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                 "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = ("a", "an", "the")
_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
# "(?!<=\d)" is a negative lookahead for the text "<=" followed by a digit (the scorers meant a
# lookbehind); kept, it is what they run.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def vqa_punctuation(text: str) -> str:
    """The scorers' ``processPunctuation``: each punctuation mark is deleted when it touches a
    space somewhere in the text, or when the text holds a digit-comma-digit, else replaced by a
    space; then periods not followed by a digit go (at most 32 of them: the scorers pass
    ``re.UNICODE`` where ``sub`` takes its count)."""
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=int(re.UNICODE))


def vqa_digits_articles(text: str) -> str:
    """The scorers' ``processDigitArticle``: lowercase, split on whitespace, number words ->
    digits, articles dropped, then the contraction table."""
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def vqa_normalize(answer: str, convention: str = "textvqa") -> str:
    """One answer as the scorer of ``convention`` processes it: ``textvqa`` (EvalAI / MMF:
    tokenise, whitespace, punctuation, digits/articles/contractions) or ``vqav2`` (the official
    script's prediction processing: whitespace, punctuation, digits/articles/contractions)."""
    _choice("convention", convention, ("textvqa", "vqav2"))
    text = answer
    if convention == "textvqa":
        text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return vqa_digits_articles(vqa_punctuation(text))


def vqa_accuracy(prediction: str, references: str | Sequence[str], convention: str = "textvqa") -> float:
    """VQA accuracy (see the module docstring for the two conventions)."""
    refs = _check(prediction, references)
    _choice("convention", convention, ("textvqa", "vqav2"))
    p = vqa_normalize(prediction, convention)
    if convention == "textvqa":
        refs = [vqa_normalize(r, convention) for r in refs]
    else:
        refs = [r.replace("\n", " ").replace("\t", " ").strip() for r in refs]
        if len(set(refs)) > 1:
            refs = [vqa_punctuation(r) for r in refs]
    if len(refs) == 1:
        return float(p == refs[0])
    matches = [p == r for r in refs]
    total = sum(matches)
    return sum(min(1.0, (total - m) / 3) for m in matches) / len(refs)


METRICS: dict[str, Callable[..., float]] = {
    "exact_match": exact_match,
    "anls": anls,
    "relaxed_accuracy": relaxed_accuracy,
    "vqa_accuracy": vqa_accuracy,
}
OPTIONS: dict[str, tuple[str, ...]] = {
    "exact_match": (),
    "anls": ("threshold", "convention"),
    "relaxed_accuracy": ("tolerance",),
    "vqa_accuracy": ("convention",),
}
"""The keyword options each metric takes (``fcot eval --metric-option anls.convention=paper``)."""


def check_metric_options(options: dict[str, dict] | None) -> dict[str, dict]:
    """``{metric: {option: value}}`` after checking names and values (a bad one raises before any scoring)."""
    options = dict(options or {})
    for metric, opts in options.items():
        if metric not in METRICS:
            raise ValueError(f"metric option for {metric!r}: expected a metric in {sorted(METRICS)}")
        unknown = set(opts) - set(OPTIONS[metric])
        if unknown:
            raise ValueError(f"{metric} has no option {sorted(unknown)}; its options: {list(OPTIONS[metric]) or 'none'}")
        METRICS[metric]("x", ["x"], **opts)  # values validated by the metric itself
    return options


def score(name: str, prediction: str, references: str | Sequence[str], **options) -> float:
    """Score one answer with the metric ``name`` (a key of :data:`METRICS`)."""
    if name not in METRICS:
        raise ValueError(f"metric={name!r}: expected one of {sorted(METRICS)}")
    return METRICS[name](prediction, references, **options)


def score_all(predictions: Sequence[str], references: Sequence[Sequence[str]],
              metrics: Sequence[str] = tuple(METRICS), options: dict[str, dict] | None = None) -> dict[str, float]:
    """Mean of each metric over a set (predictions[i] answers references[i])."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} questions: expected one per question")
    if not predictions:
        raise ValueError("predictions=[]: nothing to score")
    options = check_metric_options(options)
    return {m: sum(score(m, p, r, **options.get(m, {})) for p, r in zip(predictions, references)) / len(predictions)
            for m in metrics}
