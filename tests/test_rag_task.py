"""
Tests for tasks/rag_task.py on a tiny BM25 knowledge base built in a tmp dir: retrieval caching, gold-citation
targets, RAFT swap-in / no-gold, loss masking of documents through the real tokenizer, StaticRAGTask and
MultiHopRAGTask.

    pytest -q tests/test_rag_task.py
"""

import json

import pytest

from nanochat.metrics import NO_ANSWER
from tasks.common import Task, validate_conversation
from tasks.rag_task import RAGTask, StaticRAGTask, MultiHopRAGTask, create_rag_task, make_hop_query
from nanochat.retrieval import RetrievalManager, build_knowledge_base

KB_DOCS = [
    {"id": "paris", "title": "Paris", "content": "Paris is the capital of France. The Eiffel Tower is in Paris."},
    {"id": "eiffel", "title": "Gustave Eiffel", "content": "Gustave Eiffel was an engineer whose company built the tower."},
    {"id": "berlin", "title": "Berlin", "content": "Berlin is the capital of Germany, on the river Spree."},
    {"id": "rome", "title": "Rome", "content": "Rome is the capital of Italy; the Colosseum is in Rome."},
    {"id": "spree", "title": "Spree", "content": "The Spree is a river that flows through Berlin."},
    {"id": "tides", "title": "Tides", "content": "Ocean tides are caused by the gravity of the Moon."},
    {"id": "everest", "title": "Everest", "content": "Mount Everest is the highest mountain above sea level."},
    {"id": "python", "title": "Python", "content": "Python is a programming language with readable syntax."},
]

QA = [  # our QA schema; gold_doc_ids point into the KB
    {"id": "q0", "question": "Where is the Eiffel Tower?", "answer": "Paris", "gold": ["paris"]},
    {"id": "q1", "question": "Which river flows through the capital of Germany?", "answer": "Spree", "gold": ["spree"]},
    {"id": "q2", "question": "What causes ocean tides?", "answer": "The Moon", "gold": ["tides"]},
    {"id": "q3", "question": "Who built the tower?", "answer": "Gustave Eiffel", "gold": ["everest"]},  # gold not retrieved
    {"id": "q4", "question": "Name a programming language", "answer": "Python", "gold": []},
]


class TinyQA(Task):
    """A small in-test QA task in the shared schema."""

    def __init__(self, rows=QA, **view):
        super().__init__(**view)
        self.rows = rows

    @property
    def eval_type(self):
        return "generative"

    def num_examples(self):
        return len(self.rows)

    def get_example(self, index):
        r = self.rows[index]
        return {"id": r["id"], "messages": [{"role": "user", "content": r["question"]},
                                            {"role": "assistant", "content": r["answer"]}],
                "answers": [r["answer"]], "gold_doc_ids": list(r["gold"])}

    def evaluate(self, conversation, assistant_response):
        return assistant_response.strip() == conversation["answers"][0]


class CountingManager:
    """Wraps a RetrievalManager and counts the calls, to check that retrieval is cached."""

    def __init__(self, manager):
        self.retriever = manager.retriever
        self.manager = manager
        self.calls = []

    def retrieve(self, query, top_k=5):
        self.calls.append(("retrieve", query))
        return self.manager.retrieve(query, top_k)

    def batch_retrieve(self, queries, top_k=5):
        self.calls.append(("batch", len(queries)))
        return self.manager.batch_retrieve(queries, top_k)


@pytest.fixture(scope="module")
def kb(tmp_path_factory):
    d = tmp_path_factory.mktemp("rag")
    src = d / "docs.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in KB_DOCS))
    build_knowledge_base([src], d / "kb", "bm25", show_progress=False)
    return d / "kb"


def retrieval_docs(conversation):
    return [m for m in conversation["messages"] if m["role"] == "retrieval"][0]["documents"]


def test_rag_task_caches_and_cites_gold_rank(kb):
    counting = CountingManager(RetrievalManager("bm25", kb))
    task = RAGTask(TinyQA(), retriever=counting, top_k=3)
    assert len(task) == len(QA) and task.eval_type == "generative"
    for i in range(len(task)):
        conv = task[i]
        validate_conversation(conv)
        assert [m["role"] for m in conv["messages"]] == ["retrieval", "user", "assistant"]
        docs = retrieval_docs(conv)
        assert 1 <= len(docs) <= 3 and all(set(d) == {"id", "title", "content", "score"} for d in docs)
        gold = set(QA[i]["gold"])
        positions = [k for k, d in enumerate(docs, start=1) if d["id"] in gold]
        want = QA[i]["answer"] + (f" [{', '.join(map(str, positions))}]" if positions else "")
        assert conv["messages"][-1]["content"] == want
    assert task[1]["messages"][-1]["content"] == "Spree [2]"  # the gold doc is 2nd: the citation says so
    assert task[0]["messages"][-1]["content"] == "Paris [2]"  # "Gustave Eiffel ... tower" ranks first
    assert task[2]["messages"][-1]["content"] == "The Moon [1]"
    assert task[3]["messages"][-1]["content"] == "Gustave Eiffel"  # gold not retrieved, no RAFT: no citation
    assert len(counting.calls) == len(QA)  # once per example, however often examples are read
    assert task.evaluate(task[0], "Paris") and not task.evaluate(task[0], "Rome")
    assert TinyQA().get_example(0)["messages"][-1]["content"] == "Paris"  # the base is not mutated
    no_cite = RAGTask(TinyQA(), retriever=counting, top_k=3, cite=False)
    assert no_cite[0]["messages"][-1]["content"] == "Paris"


def test_precompute_batches(kb):
    counting = CountingManager(RetrievalManager("bm25", kb))
    task = RAGTask(TinyQA(), retriever=counting, top_k=2, start=1, stop=5, step=2)  # a DDP-style view: 1, 3
    task.precompute(batch_size=1, show_progress=False)
    assert counting.calls == [("batch", 1), ("batch", 1)]
    _ = [task[i] for i in range(len(task))] + [task[0]]
    assert len(counting.calls) == 2
    eager = RAGTask(TinyQA(), knowledge_base_path=kb, top_k=2, precompute=True)
    assert set(eager._cache) == set(range(len(QA)))


def test_raft_swap_in_and_no_gold(kb):
    manager = RetrievalManager("bm25", kb)
    task = RAGTask(TinyQA(), retriever=manager, top_k=3, raft=True, p_no_gold=0.0, seed=1)
    conv = task[3]  # "Who built the tower?": the gold doc (everest) is not retrieved, RAFT swaps it in
    docs = retrieval_docs(conv)
    ids = [d["id"] for d in docs]
    assert "everest" in ids and len(ids) == 3
    assert conv["messages"][-1]["content"] == f"Gustave Eiffel [{ids.index('everest') + 1}]"
    assert conv == task[3] == RAGTask(TinyQA(), retriever=manager, top_k=3, raft=True, p_no_gold=0.0, seed=1)[3]
    positions = set()
    for s in range(12):
        raft = RAGTask(TinyQA(), retriever=manager, top_k=3, raft=True, p_no_gold=0.0, seed=s)
        positions.add([d["id"] for d in retrieval_docs(raft[3])].index("everest"))
    assert len(positions) > 1  # the swap-in position is random (per seed and index)
    assert task[0]["messages"][-1]["content"] == "Paris [2]"  # retrieved gold stays where it was
    drop = RAGTask(TinyQA(), retriever=manager, top_k=3, raft=True, p_no_gold=1.0)
    for i in range(3):
        conv = drop[i]
        assert not set(QA[i]["gold"]) & {d["id"] for d in retrieval_docs(conv)}
        assert conv["messages"][-1]["content"] == NO_ANSWER and conv["answers"] == [NO_ANSWER]
    # q1 matches many documents: after the gold one is dropped, top_k is refilled from the extra depth
    assert len(retrieval_docs(drop[1])) == 3 and "spree" in [d["id"] for d in retrieval_docs(task[1])]
    assert drop[4]["messages"][-1]["content"] == "Python"  # no gold ids: nothing to drop


def test_rendered_documents_are_masked(kb):
    from nanochat.tokenizer import Tokenizer
    texts = [d["content"] for d in KB_DOCS] * 5 + [r["question"] + " " + r["answer"] for r in QA] * 5
    tok = Tokenizer.train_from_iterator(texts, vocab_size=400)
    task = RAGTask(TinyQA(), knowledge_base_path=kb, top_k=3)
    conv = task[1]
    ids, mask = tok.render_conversation(conv, max_tokens=4096)
    assert len(ids) == len(mask)
    start, end = tok.encode_special("<|retrieval_start|>"), tok.encode_special("<|retrieval_end|>")
    a, b = ids.index(start), ids.index(end)
    assert b - a > 10 and all(m == 0 for m in mask[a:b + 1])  # every document token is out of the loss
    astart = ids.index(tok.encode_special("<|assistant_start|>"))
    assert all(m == 0 for m in mask[:astart + 1])
    assert all(m == 1 for m in mask[astart + 1:])  # the answer "Spree [2]" and <|assistant_end|>
    assert tok.decode(ids[astart + 1:-1]) == "Spree [2]"
    for doc in retrieval_docs(conv):  # and the documents really are in the rendered context
        assert doc["content"] in tok.decode(ids[a:b + 1])


def test_static_rag_task(tmp_path):
    rows = [{"id": "s0", "messages": [{"role": "user", "content": "Capital of France?"},
                                      {"role": "assistant", "content": "Paris"}],
             "answers": ["Paris"], "gold_doc_ids": ["fr"],
             "documents": [{"id": "de", "title": "Germany", "content": "Berlin is the capital."},
                           {"id": "fr", "title": "France", "content": "Paris is the capital."},
                           {"id": "it", "title": "Italy", "content": "Rome is the capital."}]},
            {"id": "s1", "messages": [{"role": "user", "content": "Capital of Spain?"},
                                      {"role": "assistant", "content": "Madrid [1]"}],
             "answers": ["Madrid"], "gold_doc_ids": ["es"],
             "documents": [{"id": "es", "title": "Spain", "content": "Madrid is the capital."}]}]
    path = tmp_path / "static.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = StaticRAGTask(path)
    conv = task[0]
    validate_conversation(conv)
    assert [d["id"] for d in retrieval_docs(conv)] == ["de", "fr", "it"]
    assert conv["messages"][-1]["content"] == "Paris [2]"
    assert task[1]["messages"][-1]["content"] == "Madrid [1]"  # already cited: left alone
    capped = StaticRAGTask(path, top_k=1)
    assert [d["id"] for d in retrieval_docs(capped[0])] == ["de"] and capped[0]["messages"][-1]["content"] == "Paris"
    assert task.evaluate(conv, "Paris [2]") and not task.evaluate(conv, "Rome")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n" + json.dumps({k: v for k, v in rows[1].items() if k != "documents"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: .*'documents' list"):
        StaticRAGTask(bad)
    bad.write_text("{oops\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: invalid JSON"):
        StaticRAGTask(bad)


def test_multihop_retrieves_distinct_docs(kb):
    seen_queries = []

    def hop_query(question, docs):
        seen_queries.append(question)
        return make_hop_query(question, docs)

    task = MultiHopRAGTask(TinyQA(), kb, "bm25", top_k_per_hop=2, num_hops=2, hop_query_fn=hop_query)
    conv = task[1]  # "Which river flows through the capital of Germany?"
    validate_conversation(conv)
    docs = retrieval_docs(conv)
    hops = [d["metadata"]["hop"] for d in docs]
    assert hops == [1, 1, 2, 2]
    ids = [d["id"] for d in docs]
    assert len(set(ids)) == 4  # hop 2 excludes what hop 1 found
    assert seen_queries == [QA[1]["question"]] * 2  # called after each hop with the original question
    # hop 2's documents are what the hop-query function's query retrieves, minus hop 1's
    hop2_query = make_hop_query(QA[1]["question"], docs[:2])
    expected = [d.id for d, _ in RetrievalManager("bm25", kb).retrieve(hop2_query, 4) if d.id not in ids[:2]][:2]
    assert ids[2:] == expected
    assert make_hop_query("Q?", [{"title": "Berlin", "content": "x"}, {"title": "", "content": "First one. Second."}]) \
        == "Q? Berlin First one."
    gold_pos = [k for k, d in enumerate(docs, start=1) if d["id"] == "spree"]
    want = "Spree" + (f" [{gold_pos[0]}]" if gold_pos else "")
    assert conv["messages"][-1]["content"] == want
    assert task[1] == conv  # cached and deterministic


def test_create_rag_task(kb, tmp_path):
    assert isinstance(create_rag_task("rag", base_task=TinyQA(), knowledge_base_path=kb), RAGTask)
    assert isinstance(create_rag_task("multihop", base_task=TinyQA(), knowledge_base_path=kb), MultiHopRAGTask)
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                                "documents": []}) + "\n")
    assert isinstance(create_rag_task("static", filepath=path), StaticRAGTask)
    with pytest.raises(ValueError, match="unknown RAG task kind"):
        create_rag_task("nope")
    with pytest.raises(ValueError, match="knowledge_base_path"):
        RAGTask(TinyQA())


def test_raft_no_gold_rate_follows_p(kb):
    manager = RetrievalManager("bm25", kb)
    rows = [QA[0]] * 400
    for p in (0.25, 0.6):
        task = RAGTask(TinyQA(rows), retriever=manager, top_k=3, raft=True, p_no_gold=p, seed=3)
        no_gold = [task[i]["messages"][-1]["content"] == NO_ANSWER for i in range(len(rows))]
        assert abs(sum(no_gold) / len(rows) - p) < 0.07  # binomial sd ~0.025 at n=400
        for i in range(len(rows)):  # every no-gold example really has no gold document, every other one cites it
            docs = retrieval_docs(task[i])
            has_gold = "paris" in [d["id"] for d in docs]
            assert has_gold != no_gold[i]
        again = RAGTask(TinyQA(rows), retriever=manager, top_k=3, raft=True, p_no_gold=p, seed=3)
        assert [again[i] for i in range(50)] == [task[i] for i in range(50)]  # a pure function of (seed, index)


def test_raft_swaps_in_the_answering_chunk_of_a_chunked_gold_document(tmp_path):
    filler = " ".join(f"filler{i}" for i in range(30))
    docs = KB_DOCS + [{"id": "manual", "title": "Manual", "content": filler + " the answer is Quokka island " + filler}]
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in docs))
    build_knowledge_base([src], tmp_path / "kb", "bm25", chunk_size=12, show_progress=False)
    rows = [{"id": "m", "question": "Where is the Eiffel Tower?", "answer": "Quokka island", "gold": ["manual"]}]
    task = RAGTask(TinyQA(rows), knowledge_base_path=tmp_path / "kb", top_k=2, raft=True, p_no_gold=0.0)
    conv = task[0]
    got = retrieval_docs(conv)
    chunk = [d for d in got if d.get("parent_id") == "manual"]
    assert len(chunk) == 1 and "Quokka island" in chunk[0]["content"] and chunk[0]["id"].startswith("manual#")
    assert conv["messages"][-1]["content"] == f"Quokka island [{got.index(chunk[0]) + 1}]"
