"""
Tests for tasks/stdlib_multihop.py: the question kinds and filters on hand-made records, then the built-in
multi-hop set as tasks/stdlib_qa.py's build_stdlib_data writes it from a few real stdlib modules (answers in the
second gold document, the held-out split, readable by the task classes, and the retrieval gap REFRAG must close).

    pytest -q tests/test_stdlib_multihop.py
"""

import json

import pytest

from tasks.multihop import MultiHopQA, RefragTask, hop_queries, retrieval_gap, shown_documents, all_gold_recall
from tasks.stdlib_multihop import build_multihop_questions, StdlibMultiHop

# -----------------------------------------------------------------------------
# hand-made records


def rec(rid, kind, doc, signature="", module=None):
    module = module or rid.split(".")[0]
    name = rid[len(module) + 1:]
    return {"id": rid, "module": module, "name": name, "kind": kind, "signature": signature, "doc": doc}


def kb_doc(r):
    head = r["signature"] or r["name"]
    return {"id": r["id"], "title": r["id"], "content": f"{head}\n\n{r['doc']}", "metadata": {"module": r["module"]}}


RECORDS = [
    rec("alpha.load", "function", "Read a thing back.\n\nSee dump() for the format.", "load(fp)"),
    rec("alpha.dump", "function", "Write a thing to a file.", "dump(obj, fp)"),
    rec("alpha.copy", "function", "Copy it.\n\nLike visit() but also calls load().", "copy(x)"),  # two references
    rec("alpha.show", "function", "Show it.\n\n>>> dump(x)\nalpha.load()\n", "show(x)"),  # only in a doctest
    rec("alpha.open", "function", "Open a file, returning a Reader object.", "open(path)"),
    rec("alpha.Reader", "class", "A reader of things.", "Reader(path)"),
    rec("alpha.Reader.read_all", "method", "Read every record of the file.", "read_all()"),
    rec("alpha.walk", "function", "Walk the tree.", "walk(top, onvisit=visit)"),
    rec("alpha.visit", "function", "Visit one node of the tree.", "visit(node)"),
    rec("alpha.store", "function", "Store it.\n\nSee dump().", "store(x)"),
    rec("alpha.keep", "function", "Keep it.\n\nSee dump().", "keep(x)"),  # a third question answered by dump
    rec("alpha.echo", "function", "Echo.\n\nCalls dump(); Write a thing to a file.", "echo(x)"),  # answer in doc 1
    rec("beta.save", "function", "Save all.\n\nUses alpha.dump() underneath.", "save()"),  # B in another split
    rec("alpha.MyThing", "class", "A thing.\n\nCall undoLast to undo.", "MyThing()"),
    rec("alpha.MyThing.undoLast", "method", "Undo the last change made.", "undoLast()"),
    rec("gamma.errors.BadThingError", "class", "Raised when a thing is bad.", "BadThingError()",
        module="gamma.errors"),
    rec("gamma.core.run", "function", "Run it.\n\nRaises BadThingError on failure.", "run()", module="gamma.core"),
]
KB = {r["id"]: kb_doc(r) for r in RECORDS}


def describe(r):
    return r["doc"].split("\n")[0]


def split_of(module):
    return {"alpha": "train", "gamma": "train", "beta": "dev"}.get(module.split(".")[0])


def test_question_kinds_and_filters():
    rows, counts = build_multihop_questions(RECORDS, KB, split_of, describe)
    by_id = {r["id"]: r for r in rows["train"]}
    dump_questions = {"alpha.load#ref", "alpha.store#ref", "alpha.keep#ref"}  # at most 2 share one answer
    assert len(set(by_id) & dump_questions) == 2 and counts["dropped_answer_taken"] == 1
    assert set(by_id) - dump_questions == {"alpha.copy#ref", "alpha.open#returns", "alpha.walk#default",
                                          "alpha.MyThing#ref", "gamma.core.run#module"}
    module = by_id["gamma.core.run#module"]  # the module a class named by its bare name lives in
    assert module["messages"][0]["content"] == "Which module defines the exception named in the documentation of " \
                                               "`gamma.core.run`?"
    assert module["answers"] == ["gamma.errors"]
    assert module["gold_doc_ids"] == ["gamma.core.run", "gamma.errors.BadThingError"]
    assert module["hops"][1] == {"question": "Which standard library module defines `BadThingError`?",
                                 "answer": "gamma.errors", "doc_id": "gamma.errors.BadThingError"}
    assert rows["dev"] == [] and rows["eval"] == []
    qid = sorted(set(by_id) & dump_questions)[0]
    ref, a = by_id[qid], qid.split("#")[0]
    assert ref["messages"][0]["content"] == f"What does the function that the documentation of `{a}` refers to do?"
    assert ref["answers"] == ["Write a thing to a file."] and ref["gold_doc_ids"] == [a, "alpha.dump"]
    assert ref["hops"] == [
        {"question": f"Which function does the documentation of `{a}` refer to?", "answer": "dump", "doc_id": a},
        {"question": "What does `alpha.dump` do?", "answer": "Write a thing to a file.", "doc_id": "alpha.dump"}]
    # two names in its prose, but one "like": the relation picks visit
    copy = by_id["alpha.copy#ref"]
    assert copy["hops"][0] == {"question": "Which function is `alpha.copy` compared to in its documentation?",
                               "answer": "visit", "doc_id": "alpha.copy"}
    assert copy["messages"][0]["content"] == "What does the function that `alpha.copy` is compared to in its " \
                                             "documentation do?"
    thing = by_id["alpha.MyThing#ref"]  # a bare camelCase name is a reference; the only one: "named"
    assert thing["messages"][0]["content"] == \
        "What does the method named in the documentation of the class `alpha.MyThing` do?"
    assert thing["hops"][0]["answer"] == "undoLast"
    ret = by_id["alpha.open#returns"]
    assert ret["messages"][0]["content"] == \
        "What does the `read_all()` method of the object that `alpha.open` returns do?"
    assert [h["answer"] for h in ret["hops"]] == ["Reader", "Read every record of the file."]
    assert ret["gold_doc_ids"] == ["alpha.open", "alpha.Reader.read_all"]
    default = by_id["alpha.walk#default"]
    assert default["hops"][0] == {"question": "What is the default value of the `onvisit` parameter of `alpha.walk`?",
                                  "answer": "visit", "doc_id": "alpha.walk"}
    assert default["messages"][0]["content"] == "What does the default `onvisit` of `alpha.walk` do?"
    assert counts["dropped_answer_in_first_document"] == 1  # alpha.echo
    assert counts["dropped_documents_in_two_splits"] == 1  # beta.save -> alpha.dump
    assert counts["train"] == 7
    for r in rows["train"]:
        first, second = KB[r["gold_doc_ids"][0]], KB[r["gold_doc_ids"][1]]
        text = lambda d: d["title"] + "\n" + d["content"]  # a module answer is in the title ("gamma.errors.X")
        assert r["answers"][0] in text(second) and r["answers"][0] not in text(first)
        assert r["hops"][0]["answer"] in first["content"]
        assert {d["id"] for d in r["documents"]} >= set(r["gold_doc_ids"])
        assert r["answers"][0] not in "".join(d["content"] for d in r["documents"] if d["id"] not in r["gold_doc_ids"])


def test_written_rows_read_back(tmp_path):
    rows, _ = build_multihop_questions(RECORDS, KB, split_of, describe)
    path = tmp_path / "multihop_train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows["train"]))
    task = StdlibMultiHop("train", data_dir=str(tmp_path))
    assert len(task) == 7 and isinstance(task, MultiHopQA)
    assert hop_queries(task[0]) == [h["question"] for h in task[0]["hops"]]
    with pytest.raises(FileNotFoundError, match="multihop_dev.jsonl"):
        StdlibMultiHop("dev", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="split"):
        StdlibMultiHop("test", data_dir=str(tmp_path))

# -----------------------------------------------------------------------------
# the real build: build_stdlib_data on a few stdlib modules writes the three files

SMALL_MODULES = ["codecs", "sched", "difflib", "marshal", "cgi", "doctest"]  # rag, rag, dev, dev, test, test


@pytest.fixture(scope="module")
def small_build(tmp_path_factory):
    from tasks.stdlib_docs import harvest
    from tasks.stdlib_qa import build_stdlib_data, qa_split
    assert [qa_split(m) for m in SMALL_MODULES] == ["train", "train", "dev", "dev", "eval", "eval"]
    out = tmp_path_factory.mktemp("builtin")
    records = harvest(modules=SMALL_MODULES, progress=False)
    build_stdlib_data(out, max_docs=200, max_train=40, max_dev=10, max_eval=10, max_sft=20, records=records,
                      progress=False)
    kb = {}
    with open(out / "kb_documents.jsonl", encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            kb[d["id"]] = d
    return out, kb


def test_built_in_set_answers_are_in_the_second_document(small_build):
    from tasks.stdlib_qa import qa_split
    out, kb = small_build
    for split in ("train", "dev", "eval"):
        task = StdlibMultiHop(split, data_dir=str(out))
        assert len(task) >= 3, split
        for ex in task:
            first, second = (kb[i] for i in ex["gold_doc_ids"])  # every document a question shows is in the KB
            assert all(d["id"] in kb for d in ex["documents"])
            text = lambda d: " ".join((d["title"] + "\n" + d["content"]).split())
            assert " ".join(ex["answers"][0].split()) in text(second)
            assert " ".join(ex["answers"][0].split()) not in text(first)
            assert ex["hops"][0]["answer"] in text(first) and ex["hops"][1]["answer"] == ex["answers"][0]
            # the held-out rule of the single-hop set: both documents' modules in this split
            assert qa_split(first["metadata"]["module"]) == split == qa_split(second["metadata"]["module"])


def test_built_in_set_gold_hop_queries_beat_the_question(small_build):
    from nanochat.retrieval import RetrievalManager
    out, kb = small_build
    retriever = RetrievalManager("bm25")
    retriever.add_documents(list(kb.values()))
    rows = [ex for split in ("train", "dev", "eval") for ex in StdlibMultiHop(split, data_dir=str(out))]
    path = out / "all.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    gap = retrieval_gap(MultiHopQA(str(path)), retriever, top_k=3, top_k_per_hop=3, max_hops=2)
    question, hops = gap["question"]["all"]["all_gold"], gap["hop_queries"]["all"]["all_gold"]
    assert hops >= question + 0.2, (question, hops)
    gold = RefragTask(MultiHopQA(str(path)), retriever, top_k=3, top_k_per_hop=3, max_hops=2)
    for conv in gold:  # with the RAFT swap every gold trajectory shows both documents
        assert conv["complete"] and all_gold_recall(shown_documents(conv), conv["gold_doc_ids"]) == 1.0
