"""
Answer metrics (nanochat/metrics.py): SQuAD normalisation, EM, F1, and the one citation rule that strip_citations,
citation_numbers and rag_utils.extract_citations_from_response share.
"""

import pytest
from hypothesis import given, settings, strategies as st

from nanochat.metrics import (NO_ANSWER, normalize_answer, exact_match, token_f1, strip_citations, citation_numbers,
                              answer_scores, is_abstention)


# -----------------------------------------------------------------------------
# metrics


@pytest.mark.parametrize("s, expected", [
    ("The Quick, Brown Fox!", "quick brown fox"),
    ("  an   apple\ta day ", "apple day"),
    ("Theater of the absurd", "theater of absurd"),  # "the" only as a whole word
    ("U.S.A.", "usa"),
    ("A", ""),
    ("", ""),
    ("1,000,000", "1000000"),
])
def test_normalize_answer(s, expected):
    assert normalize_answer(s) == expected


def test_exact_match_and_f1_squad_cases():
    assert exact_match("The Denver Broncos", ["Denver Broncos", "Broncos"])
    assert exact_match("denver broncos.", "Denver Broncos")
    assert not exact_match("Denver", ["Denver Broncos"])
    # hand-computed F1: pred {cat, sat} vs gold {cat, sat, on, mat}: P=1, R=1/2 -> 2/3
    assert token_f1("the cat sat", ["cat sat on the mat"]) == pytest.approx(2 / 3)
    # repeated tokens count with multiplicity: x x y vs x y y -> common 2, P=R=2/3
    assert token_f1("x x y", ["x y y"]) == pytest.approx(2 / 3)
    assert token_f1("no overlap", ["something else"]) == 0.0
    # max over answers
    assert token_f1("Broncos", ["Denver Broncos", "Broncos"]) == 1.0
    assert token_f1("Denver", ["Denver Broncos", "Carolina"]) == pytest.approx(2 / 3)
    # empty references (SQuAD v2 unanswerable): only an empty prediction matches
    assert exact_match("", []) and not exact_match("something", [])
    assert token_f1("", []) == 1.0 and token_f1("something", []) == 0.0
    assert token_f1("the", ["a"]) == 1.0  # both normalize to empty


def test_strip_citations_only_at_sentence_ends():
    assert strip_citations("Paris is the capital [2, 3].") == "Paris is the capital."
    assert strip_citations("Paris [1]. Berlin [2]") == "Paris. Berlin"
    assert strip_citations("A [1], B [2]; C [3]") == "A, B; C"
    assert strip_citations("Yes [DOC_1][doc 2] [Document-3]") == "Yes"
    assert strip_citations("x [1]\ny [2]") == "x y"
    # bracketed text inside an answer is content
    assert strip_citations("range(2) gives [0, 1] as a list [2].") == "range(2) gives [0, 1] as a list."
    assert strip_citations("Paris [1] is the capital") == "Paris [1] is the capital"
    assert strip_citations("[1] x [a] [12b] [1,]") == "[1] x [a] [12b] [1,]"
    # a run that starts the answer keeps its first group: it is the answer, the rest cite
    assert strip_citations("[0, 1]") == "[0, 1]" and strip_citations("[0, 1] [2]") == "[0, 1]"
    assert exact_match(strip_citations("1998 [1]."), ["1998"]) and not exact_match("1998 [1].", ["1998"])


def test_citation_numbers_follow_strip():
    assert citation_numbers("Paris [1][3]. See [DOC_2].") == [1, 3, 2]
    assert citation_numbers("range(2) gives [0, 1] as a list [2].") == [2]
    assert citation_numbers("[0, 1]") == [] and citation_numbers("no [brackets] list[0:3]") == []


def test_answer_scores_normalise_gold_too():
    # the gold answer "[0, 1]" is content on both sides; a trailing citation on either side is not
    assert answer_scores("[0, 1] [3]", ["[0, 1]"]) == {"em": 1.0, "f1": 1.0}
    assert answer_scores("returns [0, 1]", ["returns [0, 1] [1]."]) == {"em": 1.0, "f1": 1.0}
    assert answer_scores("returns [1, 0] here", ["returns [0, 1] here"])["em"] == 0.0
    assert is_abstention(NO_ANSWER + " [2]") and not is_abstention("Paris [1]")


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=30), st.lists(st.text(max_size=30), min_size=1, max_size=3))
def test_metric_properties(pred, answers):
    f1 = token_f1(pred, answers)
    assert 0.0 <= f1 <= 1.0
    if exact_match(pred, answers):
        assert f1 == 1.0
    # F1 is symmetric in (pred, gold) for a single answer
    assert token_f1(pred, [answers[0]]) == pytest.approx(token_f1(answers[0], [pred]))
    assert exact_match(pred, [pred]) and normalize_answer(normalize_answer(pred)) == normalize_answer(pred)
