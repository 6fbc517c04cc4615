"""
Tests for nanochat/rag_utils.py: metrics on hand-computed cases, citations, the hallucination check, the
reward's components and RAFT examples.

    pytest -q tests/test_rag_utils.py
"""

import math
import random

import pytest

from nanochat.retrieval import Document
from nanochat.rag_utils import (format_documents_for_prompt, format_multihop_documents,
                                render_rag_conversation_for_tokenizer, compute_retrieval_recall,
                                compute_retrieval_precision, compute_ndcg, compute_mrr,
                                extract_citations_from_response, check_hallucination,
                                compute_rag_reward, create_rag_training_example, citation_correctness, add_citations)
from nanochat.metrics import NO_ANSWER
from tasks.common import validate_conversation

DOCS = [
    {"id": "fr", "title": "France", "content": "Paris is the capital and largest city of France."},
    {"id": "de", "title": "Germany", "content": "Berlin is the capital of Germany."},
    {"id": "it", "title": "Italy", "content": "Rome is the capital of Italy, famous for the Colosseum."},
]


def test_format_documents():
    text = format_documents_for_prompt(DOCS[:2])
    assert text == ("[1] Title: France\nContent: Paris is the capital and largest city of France.\n\n"
                    "[2] Title: Germany\nContent: Berlin is the capital of Germany.")
    short = format_documents_for_prompt([Document("x", "", "abcdefghij")], max_chars_per_doc=4)
    assert short == "[1] Content: abcd..."
    multi = format_multihop_documents([DOCS[:2], DOCS[2:]])
    assert multi.startswith("Hop 1:\n[1] Title: France") and "Hop 2:\n[3] Title: Italy" in multi


def test_render_rag_conversation():
    conv = render_rag_conversation_for_tokenizer("Capital of France?", DOCS, answer="Paris [1]", system="Be brief.")
    assert [m["role"] for m in conv["messages"]] == ["system", "retrieval", "user", "assistant"]
    assert conv["messages"][1]["documents"][0] == {"id": "fr", "title": "France", "content": DOCS[0]["content"]}
    validate_conversation(conv)
    prompt = render_rag_conversation_for_tokenizer("Capital of France?", [(Document("a", "A", "text"), 2.5)])
    assert [m["role"] for m in prompt["messages"]] == ["retrieval", "user"]
    assert prompt["messages"][0]["documents"][0]["score"] == 2.5


def test_retrieval_metrics_by_hand():
    ranked = ["d1", "d2", "d3", "d4", "d5"]
    relevant = ["d2", "d5", "d9"]
    assert compute_retrieval_recall(ranked, relevant, 3) == pytest.approx(1 / 3)
    assert compute_retrieval_recall(ranked, relevant, 5) == pytest.approx(2 / 3)
    assert compute_retrieval_recall(ranked, [], 5) == 0.0
    assert compute_retrieval_precision(ranked, relevant, 2) == pytest.approx(1 / 2)
    assert compute_retrieval_precision(ranked[:1], relevant, 4) == 0.0  # P@k divides by k
    assert compute_retrieval_precision(["d2"], relevant, 4) == pytest.approx(1 / 4)
    assert compute_mrr(ranked, relevant) == pytest.approx(1 / 2)
    assert compute_mrr(ranked, ["d5"], k=3) == 0.0
    # binary nDCG@5: hits at ranks 2 and 5; ideal has 3 relevant at ranks 1..3
    dcg = 1 / math.log2(3) + 1 / math.log2(6)
    idcg = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    assert compute_ndcg(ranked, relevant, 5) == pytest.approx(dcg / idcg)
    # graded gains (linear, as trec_eval): gains 3 at rank 1, 1 at rank 3; ideal order 3, 2, 1
    rel = {"d1": 3, "d3": 1, "d7": 2}
    assert compute_ndcg(ranked, rel, 3) == pytest.approx((3 + 1 / 2) / (3 + 2 / math.log2(3) + 1 / 2))
    assert compute_ndcg(["d1", "d3", "d7"], rel, 3) < compute_ndcg(["d1", "d7", "d3"], rel, 3) == 1.0
    assert compute_ndcg(ranked, {}, 10) == 0.0
    assert compute_ndcg(["d2", "d2", "d5"], relevant, 2) == compute_ndcg(["d2", "d5"], relevant, 2)  # repeats once


def test_citation_extraction_and_stripping():
    assert extract_citations_from_response("Paris [1].") == [1]
    assert extract_citations_from_response("A [1, 3], B [2][1]; C [DOC_4], [Doc 5; doc 6]") == [1, 3, 2, 4, 5, 6]
    assert extract_citations_from_response("no citations, just [brackets] and list[0:3]") == []
    assert extract_citations_from_response("gives [0, 1] as a list [2]") == [2]  # the same rule as strip_citations
    assert add_citations("Paris", [2, 1]) == "Paris [2, 1]"
    assert add_citations([{"type": "text", "text": "Paris "}], [1]) == [{"type": "text", "text": "Paris [1]"}]
    assert add_citations("Paris", []) == "Paris"


def test_hallucination_check():
    ok = check_hallucination("Paris is the capital of France [1]", DOCS)
    assert ok == {"hallucinated": False, "unsupported_fraction": 0.0, "unsupported_tokens": []}
    bad = check_hallucination("Madrid hosts the Olympic marathon [1]", DOCS)
    assert bad["hallucinated"] and bad["unsupported_fraction"] == 1.0
    assert bad["unsupported_tokens"] == ["madrid", "host", "olympic", "marathon"]
    # support comes from the cited document only: Berlin is in doc 2, not in the cited doc 1
    cited_wrong = check_hallucination("Berlin capital Germany [1]", DOCS)
    assert cited_wrong["unsupported_tokens"] == ["berlin", "germany"]
    assert cited_wrong["unsupported_fraction"] == pytest.approx(2 / 3) and cited_wrong["hallucinated"]
    assert not check_hallucination("Berlin capital Germany", DOCS)["hallucinated"]  # uncited: all docs support
    assert not check_hallucination(NO_ANSWER, DOCS)["hallucinated"]
    assert not check_hallucination("Yes.", DOCS)["hallucinated"]  # a verdict is not a claim
    half = check_hallucination("Rome Colosseum Madrid Prado", DOCS, threshold=0.5)
    assert half["unsupported_fraction"] == 0.5 and not half["hallucinated"]


def test_reward_components():
    r = compute_rag_reward("Paris [1]", ["Paris"], DOCS, gold_doc_ids=["fr"])
    assert (r["em"], r["f1"], r["citation"], r["hallucination"]) == (1.0, 1.0, 1.0, 0.0)
    assert r["reward"] == pytest.approx(0.5 + 0.5 + 0.25) and r["citations"] == [1]
    r = compute_rag_reward("Paris [2]", ["Paris"], DOCS, gold_doc_ids=["fr"])  # cites the wrong document,
    assert r["citation"] == 0.0 and r["hallucination"] == 1.0  # which does not support "Paris" either
    assert r["reward"] == pytest.approx(1.0 - 0.5)
    r = compute_rag_reward("Paris [1, 2]", ["Paris"], DOCS, gold_doc_ids=["fr"])
    assert r["citation"] == 0.5
    assert compute_rag_reward("Paris [7]", ["Paris"], DOCS, gold_doc_ids=["fr"])["citation"] == 0.0  # out of range
    assert compute_rag_reward("Paris", ["Paris"], DOCS, gold_doc_ids=["fr"])["citation"] == 0.0     # gold, uncited
    # citing nothing earns no citation credit, even when no gold document was retrieved (it used to earn 1.0)
    assert compute_rag_reward(NO_ANSWER, [NO_ANSWER], DOCS, gold_doc_ids=["xx"])["citation"] == 0.0
    r = compute_rag_reward("Madrid marathon", ["Paris"], DOCS, gold_doc_ids=["fr"])
    assert (r["em"], r["f1"], r["citation"], r["hallucination"]) == (0.0, 0.0, 0.0, 1.0)
    assert r["reward"] == pytest.approx(-0.5)
    r = compute_rag_reward("the city of Paris", ["Paris"], DOCS)  # partial answer, no gold ids: no citation term
    assert r["citation"] is None and r["em"] == 0.0
    assert r["f1"] == pytest.approx(0.5)  # "city of paris" vs "paris": precision 1/3, recall 1
    assert r["reward"] == pytest.approx(0.5 * 0.5)
    r = compute_rag_reward("Paris [1]", ["Paris"], DOCS, ["fr"], weights={"em": 1.0, "f1": 0.0, "citation": 0.0})
    assert r["reward"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown reward weights"):
        compute_rag_reward("x", ["x"], DOCS, weights={"emm": 1})
    assert citation_correctness([], DOCS, []) == 0.0
    # a malformed trajectory (the Engine's format_errors) costs w_format
    ok = compute_rag_reward("Paris [1]", ["Paris"], DOCS, ["fr"])
    bad = compute_rag_reward("Paris [1]", ["Paris"], DOCS, ["fr"], format_errors=["unclosed query"])
    assert bad["malformed"] == 1.0 and bad["reward"] == pytest.approx(ok["reward"] - 0.5)
    # bracketed content that is the answer is not a citation; gold answers are normalised the same way
    r = compute_rag_reward("[0, 1] [2]", ["[0, 1]"], [DOCS[0], {"id": "l", "title": "", "content": "[0, 1]"}], ["l"])
    assert (r["em"], r["citation"]) == (1.0, 1.0)


def test_raft_examples():
    gold = [{"id": "g", "title": "Gold", "content": "The answer is 42."}]
    distractors = [{"id": f"d{i}", "title": f"D{i}", "content": f"distractor text {i}"} for i in range(10)]
    positions = set()
    for seed in range(30):
        ex = create_rag_training_example("What is the answer?", "42", gold, distractors, num_docs=5, p_no_gold=0.0,
                                         rng=random.Random(seed))
        validate_conversation(ex)
        docs = ex["messages"][0]["documents"]
        assert len(docs) == 5 and len({d["id"] for d in docs}) == 5
        pos = [i for i, d in enumerate(docs, start=1) if d["id"] == "g"]
        assert len(pos) == 1 and ex["messages"][-1]["content"] == f"42 [{pos[0]}]"
        assert ex["answers"] == ["42"] and ex["gold_doc_ids"] == ["g"] and ex["documents"] == docs
        positions.add(pos[0])
    assert positions == {1, 2, 3, 4, 5}  # the gold document is shuffled among the distractors
    for seed in range(10):
        ex = create_rag_training_example("What is the answer?", "42", gold, distractors, num_docs=5, p_no_gold=1.0,
                                         rng=random.Random(seed))
        docs = ex["messages"][0]["documents"]
        assert len(docs) == 5 and all(d["id"] != "g" for d in docs)
        assert ex["messages"][-1]["content"] == NO_ANSWER and ex["answers"] == [NO_ANSWER]
        assert ex["gold_doc_ids"] == []
    a = create_rag_training_example("q?", "a", gold, distractors, rng=random.Random(7), answers=["a", "A!"])
    b = create_rag_training_example("q?", "a", gold, distractors, rng=random.Random(7), answers=["a", "A!"])
    assert a == b  # deterministic given the rng
    with pytest.raises(ValueError, match="p_no_gold"):
        create_rag_training_example("q?", "a", gold, distractors, p_no_gold=1.5)
    with pytest.raises(ValueError, match="gold document"):
        create_rag_training_example("q?", "a", [], distractors)
