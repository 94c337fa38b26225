"""Metrics against hand-computed cases, including the edge cases public implementations disagree on."""

import pytest

from fcot.eval.metrics import (anls, exact_match, levenshtein, parse_number, relaxed_accuracy, score, score_all,
                               vqa_accuracy, vqa_normalize)


def test_exact_match_normalises_case_and_whitespace_only():
    assert exact_match("  Total  42 ", ["total 42"]) == 1.0
    assert exact_match("42.", ["42"]) == 0.0          # punctuation counts
    assert exact_match("b", ["a", "B"]) == 1.0          # any reference
    assert exact_match("", ["x"]) == 0.0
    assert exact_match("", [""]) == 1.0


@pytest.mark.parametrize("a,b,d", [("", "", 0), ("abc", "", 3), ("kitten", "sitting", 3), ("flaw", "lawn", 2), ("a", "a", 0)])
def test_levenshtein(a, b, d):
    assert levenshtein(a, b) == d == levenshtein(b, a)


def test_anls_hand_computed():
    # "kitten" vs "sitting": distance 3, longer length 7 -> NL 3/7 < 0.5 -> 1 - 3/7
    assert anls("kitten", ["sitting"]) == pytest.approx(4 / 7)
    # NL exactly 0.5 is cut to 0 (strictly below the threshold counts)
    assert anls("ab", ["ac"]) == 0.0
    # best over several references
    assert anls("12.50", ["12.5", "99"]) == pytest.approx(1 - 1 / 5)
    assert anls("Corner Market", ["corner market"]) == 1.0
    # empty prediction: 0 against text, 1 against an empty reference
    assert anls("", ["abc"]) == 0.0
    assert anls("", [""]) == 1.0
    assert anls("abcd", ["abce"], threshold=0.2) == 0.0  # NL 0.25 >= 0.2


def test_parse_number():
    assert parse_number("1,234.5") == 1234.5
    assert parse_number("45%") == 45.0
    assert parse_number("-3") == -3.0
    assert parse_number("12,34") is None   # not a thousands grouping
    assert parse_number("abc") is None and parse_number("") is None and parse_number(".") is None


def test_relaxed_accuracy_edges():
    assert relaxed_accuracy("104", ["100"]) == 1.0        # 4 % off
    assert relaxed_accuracy("105.1", ["100"]) == 0.0      # 5.1 % off
    assert relaxed_accuracy("95", ["100"]) == 1.0
    assert relaxed_accuracy("1,234", ["1234"]) == 1.0     # thousands commas
    assert relaxed_accuracy("45%", ["45"]) == 1.0         # percent sign dropped, not scaled
    assert relaxed_accuracy("0.45", ["45%"]) == 0.0
    assert relaxed_accuracy("0.0", ["0"]) == 1.0          # target 0: exact numeric equality
    assert relaxed_accuracy("0.01", ["0"]) == 0.0
    assert relaxed_accuracy("North", ["north"]) == 1.0    # non-numbers: normalised strings
    assert relaxed_accuracy("North", ["100"]) == 0.0
    assert relaxed_accuracy("", ["0"]) == 0.0
    assert relaxed_accuracy("50", ["10", "49"]) == 1.0    # best over references


def test_vqa_normalize():
    assert vqa_normalize("The Two dogs.") == "2 dogs"
    assert vqa_normalize("1,000") == "1000"
    assert vqa_normalize("3.5") == "3.5"
    assert vqa_normalize("dont") == "don't"
    assert vqa_normalize("yes!") == "yes"


def test_vqa_accuracy_leave_one_out():
    refs = ["stop"] * 3 + ["go"] * 7
    # each left-out "stop" leaves 2 matches (2/3); each left-out "go" leaves 3 (1): (3*2/3 + 7*1) / 10
    assert vqa_accuracy("stop", refs) == pytest.approx(0.9)
    assert vqa_accuracy("go", refs) == 1.0
    refs = ["stop"] + ["go"] * 9
    # the one "stop" left out: 0 matches; each "go" left out: 1 match -> 1/3, nine of them: 9/3/10
    assert vqa_accuracy("Stop.", refs) == pytest.approx(0.3)
    assert vqa_accuracy("red", refs) == 0.0
    assert vqa_accuracy("", refs) == 0.0
    assert vqa_accuracy("two", ["2"]) == 1.0          # one reference: equality after normalisation
    assert vqa_accuracy("the cat", ["a cat", "cat"]) == pytest.approx(1 / 3)  # each subset has 1 match


def test_dispatch_and_bad_input():
    assert score("anls", "a", ["a"]) == 1.0
    assert score_all(["a", "b"], [["a"], ["c"]], ["exact_match"]) == {"exact_match": 0.5}
    with pytest.raises(ValueError, match="metric='bleu'"):
        score("bleu", "a", ["a"])
    with pytest.raises(ValueError, match="references"):
        exact_match("a", [])
    with pytest.raises(TypeError, match="prediction"):
        anls(None, ["a"])
    with pytest.raises(ValueError, match="2 predictions for 1 questions"):
        score_all(["a", "b"], [["a"]])
