"""Metrics against the official scorers: a hand-checked table of the cases the issue names (and
where the scorers disagree), and a few hundred generated cases compared with an independent
transcription of each official definition (official_scorers.py)."""

import random

import pytest

from fcot.eval import metrics as M
from fcot.eval.metrics import (anls, check_metric_options, exact_match, levenshtein, relaxed_accuracy, score, score_all,
                               vqa_accuracy, vqa_normalize)

from . import official_scorers as official


def test_exact_match_normalises_case_and_whitespace_only():
    assert exact_match("  Total  42 ", ["total 42"]) == 1.0
    assert exact_match("42.", ["42"]) == 0.0
    assert exact_match("b", ["a", "B"]) == 1.0
    assert exact_match("", ["x"]) == 0.0 and exact_match("", [""]) == 1.0


@pytest.mark.parametrize("a,b,d", [("", "", 0), ("abc", "", 3), ("kitten", "sitting", 3), ("flaw", "lawn", 2), ("a", "a", 0)])
def test_levenshtein(a, b, d):
    assert levenshtein(a, b) == d == levenshtein(b, a)


# (prediction, references, expected) worked out by hand from the official definitions.
ANLS_TABLE = [
    ("kitten", ["sitting"], 4 / 7),
    ("ab", ["ac"], 0.5),                     # NL = 0.5 exactly: RRC keeps 1 - NL >= 0.5
    ("abc", ["xyz"], 0.0),
    ("12.50", ["12.5", "99"], 1 - 1 / 5),
    ("Corner Market", ["corner market"], 1.0),
    ("  abcd", ["abxy"], 1 - 2 / 6),         # RRC's length is the RAW prediction's (6), the distance the normalised one (2)
    ("a  b", ["a b"], 1.0),
    ("", ["x"], 0.0),
    ("", [""], 1.0),
    ("straße", ["STRASSE"], 1 - 2 / 7),      # distance("straße", "strasse") = 2; len("straße".upper()) = 7
]


@pytest.mark.parametrize("p,refs,want", ANLS_TABLE)
def test_anls_table(p, refs, want):
    assert anls(p, refs) == pytest.approx(want)
    assert official.rrc_anls(p, refs) == pytest.approx(want)


def test_anls_paper_convention_is_stricter():
    assert anls("ab", ["ac"], convention="paper") == 0.0          # NL < 0.5 required
    assert anls("  abcdef", ["abcdxy"]) == pytest.approx(1 - 2 / 8)                      # RRC: raw length 8
    assert anls("  abcdef", ["abcdxy"], convention="paper") == pytest.approx(1 - 2 / 6)  # normalised lengths
    with pytest.raises(ValueError, match="convention='x'"):
        anls("a", ["a"], convention="x")
    with pytest.raises(ValueError, match="threshold"):
        anls("a", ["a"], threshold=0)


RELAXED_TABLE = [
    ("12.", ["12"], 1.0),          # float("12.") = 12: models end short answers with a period
    ("1e3", ["1000"], 1.0),        # scientific notation is a number
    ("4 5", ["45"], 0.0),          # not a number, and "4 5" != "45"
    ("45%", ["0.45"], 1.0),        # % divides by 100
    ("45%", ["45"], 0.0),
    ("1,234", ["1234"], 0.0),      # commas: not a number, strings differ
    ("103", ["100"], 1.0), ("106", ["100"], 0.0), ("-96", ["-100"], 1.0),
    ("0.0", ["0"], 0.0),           # target 0 is falsy: string equality
    ("0", ["0"], 1.0),
    ("Yes", ["yes"], 1.0), (" yes", ["yes"], 0.0),   # lowercase equality, no strip
    (" 7 ", ["7"], 1.0),           # float() strips whitespace
    ("1_000", ["1000"], 1.0),      # Python's float reads digit separators
    ("nan", ["nan"], 0.0),         # NaN is a number that equals nothing
    ("x", ["a", "X"], 1.0),
]


@pytest.mark.parametrize("p,refs,want", RELAXED_TABLE)
def test_relaxed_table(p, refs, want):
    assert relaxed_accuracy(p, refs) == want
    assert max(float(official.pix2struct_relaxed(p, r)) for r in refs) == want


VQA_TABLE = [
    # (prediction, references, textvqa (MMF / lmms-eval), vqav2 (official VQAv2 script))
    ("Two", ["2"] * 10, 1.0, 1.0),
    ("Yes", ["yes"] * 10, 1.0, 1.0),
    ("yes", ["Yes"] * 10, 1.0, 0.0),                       # VQAv2 leaves agreeing references unprocessed
    ("oclock", ["o'clock"] * 3 + ["x"] * 7, 0.9, 0.9),    # the official table maps oclock -> o'clock
    ("im", ["i'm"] * 10, 0.0, 0.0),                        # "Im" is capitalised in the table: never applied
    ("shouldve", ["should've"] * 10, 1.0, 1.0),
    ("the cat's toy", ["cat 's toy"] * 10, 1.0, 0.0),     # MMF splits 's
    ("1,000", ["1000"] * 10, 1.0, 1.0),
    ("a dog", ["dog"] * 4 + ["cat"] * 6, 1.0, 1.0),
    ("dog", ["dog", "dog", "cat"] + ["x"] * 7, 0.6, 0.6),
    ("yes", ["yes"], 1.0, 1.0), ("no", ["yes"], 0.0, 0.0),
]


@pytest.mark.parametrize("p,refs,textvqa,vqav2", VQA_TABLE)
def test_vqa_table(p, refs, textvqa, vqav2):
    if len(refs) > 1:
        assert official.mmf_textvqa_accuracy(p, refs) == pytest.approx(vqa_accuracy(p, refs))
        assert official.VQAv2Eval().evaluate(p, refs) == pytest.approx(vqa_accuracy(p, refs, convention="vqav2"))
    assert vqa_accuracy(p, refs) == pytest.approx(textvqa)
    assert vqa_accuracy(p, refs, convention="vqav2") == pytest.approx(vqav2)


def test_contraction_table_is_the_official_one():
    assert M._CONTRACTIONS == official.CONTRACTIONS
    assert vqa_normalize("You'll") == "you'll" and vqa_normalize("youll") == "you'll"
    assert vqa_normalize("weve") == "we've" and vqa_normalize("lets") == "lets" and vqa_normalize("shes") == "shes"


# --- generated cases against the oracle -------------------------------------------------------

WORDS = ["yes", "no", "Yes.", "two", "2", "the dog", "a cat", "dog", "oclock", "o'clock", "shouldve", "im", "I'm",
         "it's", "its", "1,000", "1000", "1.5", "3.14.", "(a)", "a-b", "a - b", "x/y", "\"q\"", "well...", "what?",
         "cat's", "10%", "0.10", "1e3", "12.", " 12 ", "4 5", "45", "", " ", "None", "zero", "ten", "Ten apples",
         "$5", "5", "e.g. this", "U.S.A.", "usa", "co-op", "coop", "the", "an apple", "the 3rd", "3rd", "y'all",
         "yall", "somebody'd", "wont", "won't", "1,2,3", "1 2 3", "straße", "STRASSE", "Hello  World", "hello world"]


def _cases(rng, n):
    for _ in range(n):
        k = rng.choice([1, 2, 3, 5, 10])
        refs = [rng.choice(WORDS) for _ in range(k)]
        if rng.random() < 0.3:
            refs = [refs[0]] * k
        pred = rng.choice(WORDS + refs)
        yield pred, refs


@pytest.fixture
def rng():
    from tests.conftest import RUN_SEED

    return random.Random(RUN_SEED)


def test_vqa_accuracy_against_official(rng):
    for pred, refs in _cases(rng, 300):
        if len(refs) == 1:
            continue
        assert vqa_accuracy(pred, refs) == pytest.approx(official.mmf_textvqa_accuracy(pred, refs)), (pred, refs)
        assert vqa_accuracy(pred, refs, convention="vqav2") == pytest.approx(official.VQAv2Eval().evaluate(pred, refs)), \
            (pred, refs)


def test_anls_against_official(rng):
    for pred, refs in _cases(rng, 300):
        assert anls(pred, refs) == pytest.approx(official.rrc_anls(pred, refs)), (pred, refs)


def test_relaxed_against_official(rng):
    for pred, refs in _cases(rng, 300):
        want = max(float(official.pix2struct_relaxed(pred, r)) for r in refs)
        assert relaxed_accuracy(pred, refs) == want, (pred, refs)


def test_score_and_options():
    assert score("anls", "ab", ["ac"], convention="paper") == 0.0
    assert score_all(["ab", "x"], [["ac"], ["x"]], ["anls"], options={"anls": {"convention": "paper"}}) == {"anls": 0.5}
    with pytest.raises(ValueError, match="has no option"):
        check_metric_options({"anls": {"tolerance": 0.1}})
    with pytest.raises(ValueError, match="expected a metric"):
        check_metric_options({"bleu": {}})
    with pytest.raises(ValueError, match="metric='bleu'"):
        score("bleu", "a", ["a"])
    with pytest.raises(TypeError, match="expected a str"):
        exact_match(3, ["3"])
    with pytest.raises(ValueError, match="non-empty list"):
        anls("a", [])
