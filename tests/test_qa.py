"""
Tests for tasks/qa.py: SQuAD (v1/v2), HotpotQA (hub and original JSON layouts), PubMedQA (the real expert-
labelled set from ../shared/data/pubmedqa when present, plus written fixtures), QAJsonl validation, corpora and
the citation-stripping EM evaluate. No network.

    pytest -x -q tests/test_qa.py
"""

import os
import json
import hashlib
from collections import Counter

import pytest

from nanochat.metrics import NO_ANSWER
from tasks.common import answer_match
from tasks.customjson import CustomJSON
from tasks.qa import (SQuAD, HotpotQA, PubMedQA, QAJsonl, squad_corpus, hotpot_corpus, pubmedqa_corpus,
                      validate_qa_example, squad_doc_id, join_sentences, make_qa_example)
from test_tasks import write_parquet, write_jsonl  # tests/ is on sys.path under pytest


# -----------------------------------------------------------------------------
# SQuAD

CTX_A = "The Amazon river flows through Brazil. It is about 6,400 km long."
CTX_B = "Mount Everest is the highest mountain above sea level, at 8,849 metres."


def squad_rows():
    return [
        {"id": "s1", "title": "Amazon_River", "context": CTX_A,
         "question": "Which country does the Amazon flow through?",
         "answers": {"text": ["Brazil", "Brazil", "in Brazil"], "answer_start": [31, 31, 28]}},
        {"id": "s2", "title": "Amazon_River", "context": CTX_A, "question": "How long is the Amazon?",
         "answers": {"text": ["about 6,400 km"], "answer_start": [50]}},
        {"id": "s3", "title": "Mount_Everest", "context": CTX_B, "question": "How high is Everest?",
         "answers": {"text": ["8,849 metres"], "answer_start": [58]}},
    ]


def test_squad_v1(tmp_path):
    p = write_parquet(tmp_path / "plain_text/validation-00000-of-00001.parquet", squad_rows())
    task = SQuAD("validation", local_path=p, seed=None)
    assert len(task) == 3 and task.eval_type == "generative"
    for ex in task:
        validate_qa_example(ex)
    ex = task[0]
    assert ex["id"] == "s1" and ex["answers"] == ["Brazil", "in Brazil"]  # deduplicated, order kept
    assert ex["messages"] == [{"role": "user", "content": "Which country does the Amazon flow through?"},
                              {"role": "assistant", "content": "Brazil"}]
    doc_id = "Amazon_River#" + hashlib.sha1(CTX_A.encode()).hexdigest()[:12]
    assert squad_doc_id("Amazon_River", CTX_A) == doc_id
    assert ex["documents"] == [{"id": doc_id, "title": "Amazon River", "content": CTX_A}]
    assert ex["gold_doc_ids"] == [doc_id] and ex["answerable"] is True
    assert task.evaluate(ex, "Brazil [1].") and task.evaluate(ex, "in brazil") and not task.evaluate(ex, "Peru")
    corpus = squad_corpus(task)
    assert [d["id"] for d in corpus] == [doc_id, squad_doc_id("Mount_Everest", CTX_B)]
    assert corpus[0] == {"id": doc_id, "title": "Amazon River", "content": CTX_A, "metadata": {"source": "squad"}}
    # the hub-mirror directory layout, and the v2 config name
    assert len(SQuAD("validation", local_path=tmp_path)) == 3
    with pytest.raises(ValueError, match="SQuAD split"):
        SQuAD("test", local_path=p)
    with pytest.raises(ValueError, match="SQuAD version"):
        SQuAD("train", version="v3", local_path=p)


def test_squad_v2_unanswerable(tmp_path):
    rows = squad_rows()[:1] + [{"id": "u1", "title": "Amazon_River", "context": CTX_A,
                                "question": "Who discovered the Amazon?", "answers": {"text": [], "answer_start": []}}]
    p = write_parquet(tmp_path / "squad_v2/train-00000-of-00001.parquet", rows)
    task = SQuAD("train", version="v2", local_path=tmp_path, seed=None)
    ex = task[1]
    validate_qa_example(ex)
    assert ex["answers"] == [] and ex["messages"][-1]["content"] == NO_ANSWER and ex["answerable"] is False
    assert task.evaluate(ex, NO_ANSWER + " [1]") and not task.evaluate(ex, "Orellana")
    # v1 rejects a question without answers
    with pytest.raises(ValueError, match="no answer"):
        SQuAD("train", version="v1", local_path=p, seed=None)[1]
    bad = write_parquet(tmp_path / "bad.parquet", [{**rows[0], "answers": ["Brazil"]}])
    with pytest.raises(ValueError, match=r"bad\.parquet: row 0: 'answers' must be"):
        SQuAD("train", local_path=bad)[0]


# -----------------------------------------------------------------------------
# HotpotQA


def hotpot_row():
    return {
        "id": "h1", "question": "Which city hosts the museum founded by the author of Ludo?",
        "answer": "Lyon", "type": "bridge", "level": "medium",
        "supporting_facts": {"title": ["Ludo (book)", "Musee Ludo", "Ludo (book)"], "sent_id": [0, 1, 1]},
        "context": {"title": ["Ludo (book)", "Lyon", "Musee Ludo"],
                    "sentences": [["Ludo is a book by Ann Roe.", " Roe founded a museum."],
                                  ["Lyon is a city in France."],
                                  ["Musee Ludo is a museum.", "It is in Lyon."]]},
    }


def test_join_sentences():
    assert join_sentences(["A b.", " C d."]) == "A b. C d."
    assert join_sentences(["A b.", "C d."]) == "A b. C d."
    assert join_sentences([" x", "", "y "]) == "x y"
    assert join_sentences([]) == ""


def test_hotpotqa_hub_layout(tmp_path):
    rows = [hotpot_row(), {**hotpot_row(), "id": "h2", "answer": "yes", "type": "comparison"}]
    for k in range(2):
        write_parquet(tmp_path / f"distractor/train-{k:05d}-of-00002.parquet", [rows[k]])
    task = HotpotQA("train", setting="distractor", local_path=tmp_path, seed=None)
    assert len(task) == 2
    ex = task[0]
    validate_qa_example(ex)
    assert ex["id"] == "h1" and ex["answers"] == ["Lyon"] and ex["type"] == "bridge" and ex["level"] == "medium"
    assert ex["gold_doc_ids"] == ["Ludo (book)", "Musee Ludo"]
    assert ex["documents"][0] == {"id": "Ludo (book)", "title": "Ludo (book)",
                                  "content": "Ludo is a book by Ann Roe. Roe founded a museum."}
    assert ex["documents"][2]["content"] == "Musee Ludo is a museum. It is in Lyon."
    assert task.evaluate(ex, "Lyon [2][3]") and not task.evaluate(ex, "Paris")
    assert task[1]["answers"] == ["yes"]
    corpus = hotpot_corpus(task)
    assert [d["id"] for d in corpus] == ["Ludo (book)", "Lyon", "Musee Ludo"]
    assert all(d["metadata"] == {"source": "hotpotqa"} for d in corpus)
    with pytest.raises(ValueError, match="HotpotQA setting"):
        HotpotQA("train", setting="open", local_path=tmp_path)
    with pytest.raises(ValueError, match="HotpotQA split"):
        HotpotQA("test", local_path=tmp_path)


def test_hotpotqa_original_json_layout(tmp_path):
    r = hotpot_row()
    original = {"_id": "h1", "question": r["question"], "answer": r["answer"], "type": r["type"],
                "level": r["level"], "supporting_facts": [["Ludo (book)", 0], ["Musee Ludo", 1]],
                "context": [[t, s] for t, s in zip(r["context"]["title"], r["context"]["sentences"])]}
    p = tmp_path / "hotpot_dev_distractor_v1.json"
    p.write_text(json.dumps([original]))
    hub = write_parquet(tmp_path / "hub.parquet", [r])
    a = HotpotQA("validation", local_path=str(p))[0]
    b = HotpotQA("validation", local_path=hub)[0]
    assert a == b
    bad = write_parquet(tmp_path / "bad.parquet", [{**r, "context": "oops"}])
    with pytest.raises(ValueError, match=r"bad\.parquet: row 0: 'context' must be"):
        HotpotQA("validation", local_path=bad)[0]


# -----------------------------------------------------------------------------
# PubMedQA

def pubmedqa_fixture(d, decisions=("yes", "no", "maybe", "yes"), test_ids=("11", "13")):
    os.makedirs(d, exist_ok=True)
    ori = {}
    for i, dec in enumerate(decisions):
        pmid = str(10 + i)
        ori[pmid] = {"QUESTION": f"Does treatment {i} work?", "CONTEXTS": [f"Background {i}.", f"Results {i}."],
                     "LABELS": ["BACKGROUND", "RESULTS"], "MESHES": ["Humans"], "YEAR": "2001",
                     "reasoning_required_pred": "yes", "reasoning_free_pred": "yes",
                     "final_decision": dec, "LONG_ANSWER": f"Conclusion {i}."}
    with open(os.path.join(d, "ori_pqal.json"), "w") as f:
        json.dump(ori, f)
    with open(os.path.join(d, "test_ground_truth.json"), "w") as f:
        json.dump({k: ori[k]["final_decision"] if k in ori else "yes" for k in test_ids}, f)
    return ori


def test_pubmedqa_fixture(tmp_path):
    pubmedqa_fixture(tmp_path)
    test = PubMedQA("test", local_path=tmp_path, seed=None)
    train = PubMedQA("train", local_path=tmp_path, seed=None)
    assert [e["id"] for e in test] == ["11", "13"] and [e["id"] for e in train] == ["10", "12"]
    ex = test[0]
    validate_qa_example(ex)
    assert ex["answers"] == ["no"] and ex["messages"][-1]["content"] == "no" and ex["gold_doc_ids"] == ["11"]
    assert ex["documents"] == [{"id": "11", "title": "PubMed 11",
                                "content": "BACKGROUND: Background 1.\nRESULTS: Results 1."}]
    assert ex["long_answer"] == "Conclusion 1." and ex["year"] == "2001"
    assert test.evaluate(ex, "No. [1]") and not test.evaluate(ex, "yes")
    corpus = pubmedqa_corpus(tmp_path)
    assert [d["id"] for d in corpus] == ["10", "11", "12", "13"] and corpus[0]["metadata"]["source"] == "pubmedqa"
    with pytest.raises(ValueError, match="PubMedQA split"):
        PubMedQA("validation", local_path=tmp_path)


def test_pubmedqa_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="ori_pqal.json"):
        PubMedQA("test", local_path=tmp_path / "nowhere")
    pubmedqa_fixture(tmp_path / "a", test_ids=("11", "99"))
    with pytest.raises(ValueError, match="not in the labelled set"):
        PubMedQA("test", local_path=tmp_path / "a")
    ori = pubmedqa_fixture(tmp_path / "b")
    with open(tmp_path / "b" / "test_ground_truth.json", "w") as f:
        json.dump({"11": "yes"}, f)  # 11 is "no" in ori_pqal
    with pytest.raises(ValueError, match="disagrees"):
        PubMedQA("test", local_path=tmp_path / "b")
    ori["12"]["final_decision"] = "perhaps"
    with open(tmp_path / "b" / "ori_pqal.json", "w") as f:
        json.dump(ori, f)
    with pytest.raises(ValueError, match="final_decision must be one of"):
        PubMedQA("train", local_path=tmp_path / "b")


def test_pubmedqa_real_expert_set(shared_data):
    pubmedqa = os.path.join(shared_data, "pubmedqa")
    if not os.path.isdir(pubmedqa):
        pytest.skip("../shared/data/pubmedqa is not present")
    train = PubMedQA("train", local_path=pubmedqa)
    test = PubMedQA("test", local_path=pubmedqa)
    assert len(train) == 500 and len(test) == 500
    ids_train, ids_test = {e["id"] for e in train}, {e["id"] for e in test}
    assert not ids_train & ids_test and len(ids_train | ids_test) == 1000
    with open(os.path.join(pubmedqa, "test_ground_truth.json")) as f:
        assert ids_test == set(json.load(f))
    labels = Counter(e["answers"][0] for e in list(train) + list(test))
    assert labels == Counter({"yes": 552, "no": 338, "maybe": 110})
    for ex in list(test)[:50]:
        validate_qa_example(ex)
        assert ex["gold_doc_ids"] == [ex["id"]] and ex["documents"][0]["id"] == ex["id"]
    corpus = pubmedqa_corpus(pubmedqa)
    assert len(corpus) == 1000 and len({d["id"] for d in corpus}) == 1000
    assert all(d["content"] for d in corpus)


# -----------------------------------------------------------------------------
# QAJsonl and the QA example schema


def good_qa(i):
    return {"id": f"q{i}", "messages": [{"role": "user", "content": f"question {i}?"},
                                        {"role": "assistant", "content": f"answer {i} [1]"}],
            "answers": [f"answer {i}", f"ans {i}"], "gold_doc_ids": [f"d{i}"],
            "documents": [{"id": f"d{i}", "title": "T", "content": f"answer {i} is here"}]}


def test_qajsonl_loads(tmp_path):
    no_id = good_qa(2)
    del no_id["id"]
    p = write_jsonl(tmp_path / "qa.jsonl", [good_qa(0), "", good_qa(1), no_id])
    task = QAJsonl(p)
    assert isinstance(task, CustomJSON) and len(task) == 3 and task.eval_type == "generative"
    assert task[2]["id"] == "qa.jsonl:4"
    assert task.evaluate(task[0], "Answer 0 [1].") and task.evaluate(task[0], "ans 0") and \
        not task.evaluate(task[0], "answer 1")
    assert [e["id"] for e in QAJsonl(p, start=1)] == ["q1", "qa.jsonl:4"]


@pytest.mark.parametrize("mutate, reason", [
    (lambda e: e.pop("answers"), "missing 'answers'"),
    (lambda e: e.update(answers="answer"), "'answers' must be a list"),
    (lambda e: e.update(gold_doc_ids="d1"), "'gold_doc_ids' must be a list"),
    (lambda e: e["documents"][0].pop("id"), "needs a string 'id'"),
    (lambda e: e["documents"][0].pop("content"), "string 'content'"),
    (lambda e: e["messages"].pop(), "end with an assistant"),
    (lambda e: e.pop("messages"), "'messages' must be a non-empty list"),
])
def test_qajsonl_bad_line_names_file_and_line(tmp_path, mutate, reason):
    bad = good_qa(9)
    mutate(bad)
    p = write_jsonl(tmp_path / "bad.jsonl", [good_qa(0), bad])
    with pytest.raises(ValueError, match=reason) as e:
        QAJsonl(p)
    assert str(e.value).startswith(f"{p}:2:")


def test_qajsonl_bad_json_and_missing(tmp_path):
    p = write_jsonl(tmp_path / "bad.jsonl", [good_qa(0), good_qa(1), '{"id": '])
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: invalid JSON"):
        QAJsonl(p)
    with pytest.raises(FileNotFoundError):
        QAJsonl(tmp_path / "none.jsonl")


def test_make_qa_example_and_plain_evaluate():
    ex = make_qa_example("x", "q?", [], documents=[], gold_doc_ids=[])
    assert ex["messages"][-1]["content"] == NO_ANSWER
    validate_qa_example(ex)
    ex = make_qa_example("y", "q?", ["42"], target="It is 42 [1].")
    assert ex["messages"][-1]["content"] == "It is 42 [1]." and ex["answers"] == ["42"]
    # a conversation without "answers" is scored against its assistant message
    plain = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "Blue."}]}
    assert answer_match(plain, "blue [2]")
