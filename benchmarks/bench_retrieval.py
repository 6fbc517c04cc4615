"""
Retrieval benchmark: our retrievers vs rank_bm25 (BM25Okapi) and raw bm25s on any BEIR-format folder
(corpus.jsonl, queries.jsonl, qrels/test.tsv): nDCG@10, recall@100, index build time, index size on disk and
single-thread queries/s, side by side; then, with --scale N, BM25 speed on N synthetic documents. With
--load-scale N,M,... only the KB load-time section runs: a BM25 KB of N synthetic documents is saved and loaded
with and without verification of kb.json's per-file sha256 (load_retriever(verify=...)).

    python benchmarks/bench_retrieval.py ../shared/data/beir-cisi
    python benchmarks/bench_retrieval.py ../shared/data/beir-cisi --retrievers bm25 --scale 100000
    python benchmarks/bench_retrieval.py ../shared/data/beir-cisi --load-scale 10000,100000
    python benchmarks/bench_retrieval.py DIR --retrievers bm25,dense,hybrid --reranker cross-encoder/ms-marco-MiniLM-L-6-v2

Every BM25 uses the same tokens (nanochat.retrieval.tokenize: lower-cased \\w+ minus our stop words). Metrics come
from nanochat.rag_utils (cross-checked with pytrec_eval when it is installed). Indexes are built with the
machine's threads; queries are timed one at a time from the raw query string (tokenization / query encoding
included) with torch, faiss and BLAS limited to --threads threads. The synthetic corpus samples words from the
real corpus' unigram distribution with document lengths drawn from the real documents.
"""

import os
import sys
import json
import time
import shutil
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nanochat.common import ArgumentParser  # noqa: E402

parser = ArgumentParser(description="Benchmark retrievers on a BEIR-format folder")
parser.add_argument("dir", help="BEIR folder: corpus.jsonl, queries.jsonl, qrels/test.tsv")
parser.add_argument("--retrievers", default="simple,bm25,dense,hybrid", help="comma list of simple,bm25,dense,hybrid")
parser.add_argument("--reranker", default=None, help="cross-encoder name/path for the hybrid retriever")
parser.add_argument("--rrf-weights", default="1,1.5", help="hybrid RRF weights: bm25,dense")
parser.add_argument("--rrf-k", type=float, default=10, help="hybrid RRF k (Cormack et al. use 60)")
parser.add_argument("--fusion-depth", type=int, default=100, help="hybrid: candidates taken from each retriever")
parser.add_argument("--tune-hybrid", action="store_true", help="grid-search RRF k/weights/depth on half the queries")
parser.add_argument("--scale", type=int, default=0, help="also time BM25s on N synthetic documents")
parser.add_argument("--load-scale", default=None,
                    help="comma list of KB sizes: time loading a BM25 KB of that many synthetic documents with and "
                         "without hash verification (only this section runs)")
parser.add_argument("--load-repeats", type=int, default=3, help="loads timed per KB size and mode (median reported)")
parser.add_argument("--scale-rank-bm25-queries", type=int, default=10, help="rank_bm25 is slow at scale: time this many queries")
parser.add_argument("--threads", type=int, default=1, help="threads for the query timing")
parser.add_argument("--min-time", type=float, default=2.0, help="seconds to spend timing each system (at least one pass)")
parser.add_argument("--json", default=None, help="write all results to this JSON file")
args = parser.parse_args()

import numpy as np  # noqa: E402
import torch  # noqa: E402
import faiss  # noqa: E402
import bm25s  # noqa: E402
from rank_bm25 import BM25Okapi  # noqa: E402  (the dev extra: the reference this benchmark compares against)

try:  # optional: limits BLAS threads too when installed
    from threadpoolctl import threadpool_limits
except ImportError:
    threadpool_limits = None
try:  # optional: cross-checks our nDCG / recall when installed
    import pytrec_eval
except ImportError:
    pytrec_eval = None

from nanochat.common import print0, atomic_write_json  # noqa: E402
from nanochat.retrieval import (Document, tokenize, make_retriever, HybridRetriever, reciprocal_rank_fusion,  # noqa: E402
                                load_retriever)
from nanochat.kb import read_kb_meta, verify_kb_files  # noqa: E402
from nanochat.rag_utils import compute_ndcg, compute_retrieval_recall  # noqa: E402

# -----------------------------------------------------------------------------
# data and helpers


def load_beir(d):
    for name in ("corpus.jsonl", "queries.jsonl", os.path.join("qrels", "test.tsv")):
        if not os.path.exists(os.path.join(d, name)):
            raise FileNotFoundError(f"{d} is not a BEIR folder: missing {name}")
    with open(os.path.join(d, "corpus.jsonl"), encoding="utf-8") as f:
        docs = [Document(str(o["_id"]), o.get("title") or "", o["text"]) for o in map(json.loads, f)]
    with open(os.path.join(d, "queries.jsonl"), encoding="utf-8") as f:
        queries = {str(o["_id"]): o["text"] for o in map(json.loads, f)}
    qrels = {}
    with open(os.path.join(d, "qrels", "test.tsv"), encoding="utf-8") as f:
        next(f)  # header
        for lineno, line in enumerate(f, 2):
            parts = line.split()
            if len(parts) != 3:
                raise ValueError(f"qrels/test.tsv:{lineno}: expected 3 columns, got {line!r}")
            if int(parts[2]) > 0:
                qrels.setdefault(parts[0], {})[parts[1]] = int(parts[2])
    return docs, queries, qrels


class thread_limit:
    """Limit torch, faiss and BLAS (threadpoolctl, when installed) to n threads inside the block."""

    def __init__(self, n):
        self.n = n

    def __enter__(self):
        self.torch_threads = torch.get_num_threads()
        torch.set_num_threads(self.n)
        self.faiss_threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(self.n)
        self.blas = threadpool_limits(limits=self.n) if threadpool_limits is not None else None
        return self

    def __exit__(self, *exc):
        torch.set_num_threads(self.torch_threads)
        faiss.omp_set_num_threads(self.faiss_threads)
        if self.blas is not None:
            self.blas.unregister()


def time_queries(search_one, queries, min_time):
    """Queries per second of search_one(query), single queries in a loop, at least one pass over queries."""
    search_one(queries[0])  # warm-up (lazy imports, JIT, caches)
    n, t0 = 0, time.perf_counter()
    with thread_limit(args.threads):
        while True:
            for q in queries:
                search_one(q)
            n += len(queries)
            if time.perf_counter() - t0 >= min_time:
                break
    return n / (time.perf_counter() - t0)


def dir_size(path):
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def evaluate(run, qrels):
    """run: {qid: [doc ids best first]} -> mean nDCG@10 and recall@100 over the judged queries."""
    ndcg = [compute_ndcg(run.get(q, []), rel, 10) for q, rel in qrels.items()]
    recall = [compute_retrieval_recall(run.get(q, []), rel, 100) for q, rel in qrels.items()]
    return float(np.mean(ndcg)), float(np.mean(recall))


def pytrec_check(name, run_scores, qrels, ours):
    if pytrec_eval is None:
        return None
    ev = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.100"})
    res = ev.evaluate({q: {d: float(s) for d, s in r.items()} for q, r in run_scores.items() if q in qrels})
    ref = (float(np.mean([v["ndcg_cut_10"] for v in res.values()])), float(np.mean([v["recall_100"] for v in res.values()])))
    print0(f"  pytrec_eval cross-check {name}: nDCG@10 {ref[0]:.4f} (ours {ours[0]:.4f}), R@100 {ref[1]:.4f} (ours {ours[1]:.4f})")
    return ref


def print_table(rows, title):
    print0(f"\n{title}")
    print0(f"| {'system':<34} | nDCG@10 | R@100 | build s | index MB | queries/s |")
    print0(f"|{'-' * 36}|---------|-------|---------|----------|-----------|")
    for r in rows:
        nd = f"{r['ndcg@10']:.3f}" if r.get("ndcg@10") is not None else "-"
        rc = f"{r['recall@100']:.3f}" if r.get("recall@100") is not None else "-"
        size = f"{r['index_mb']:.2f}" if r.get("index_mb") is not None else "(RAM)"
        print0(f"| {r['system']:<34} | {nd:>7} | {rc:>5} | {r['build_s']:7.2f} | {size:>8} | {r['qps']:9.1f} |")


# -----------------------------------------------------------------------------
# systems: each returns (row, run) where run = {qid: {doc_id: score}} for the top 100


def bench_rank_bm25(docs, queries, judged, qps_queries, min_time, eval_metrics=True):
    t0 = time.perf_counter()
    bm = BM25Okapi([tokenize(d.text) for d in docs])
    build = time.perf_counter() - t0
    ids = [d.id for d in docs]

    def search(q, k=100):
        s = bm.get_scores(tokenize(q))
        top = np.argsort(-s)[:k]
        return [(ids[i], s[i]) for i in top if s[i] != 0]
    run = {q: dict(search(queries[q])) for q in judged} if eval_metrics else {}
    qps = time_queries(search, qps_queries, min_time)
    return {"system": "rank_bm25 BM25Okapi", "build_s": build, "index_mb": None, "qps": qps}, run


def bench_bm25s(docs, queries, judged, qps_queries, min_time, eval_metrics=True):
    t0 = time.perf_counter()
    bm = bm25s.BM25()  # its default variant (lucene idf), numpy backend
    bm.index([tokenize(d.text) for d in docs], show_progress=False)
    build = time.perf_counter() - t0
    ids = np.array([d.id for d in docs])
    tmp = tempfile.mkdtemp()
    bm.save(tmp, show_progress=False)
    size = dir_size(tmp) / 1e6
    shutil.rmtree(tmp)

    def search(q, k=100):
        res, scores = bm.retrieve([tokenize(q)], k=min(k, len(docs)), show_progress=False, n_threads=0)
        return [(ids[i], s) for i, s in zip(res[0], scores[0]) if s != 0]
    run = {q: dict(search(queries[q])) for q in judged} if eval_metrics else {}
    qps = time_queries(search, qps_queries, min_time)
    return {"system": "bm25s (lucene)", "build_s": build, "index_mb": size, "qps": qps}, run


def bench_ours(kind, retriever, build, queries, judged, qps_queries, min_time, label=None, eval_metrics=True):
    tmp = tempfile.mkdtemp()
    kb = os.path.join(tmp, "kb")
    retriever.save(kb)
    kb_mb = dir_size(kb) / 1e6
    # the index proper: the KB directory minus documents.jsonl (the text) and kb.json
    size = kb_mb - (os.path.getsize(os.path.join(kb, "documents.jsonl")) + os.path.getsize(os.path.join(kb, "kb.json"))) / 1e6
    shutil.rmtree(tmp)
    run = {}
    if eval_metrics:
        qids = list(judged)
        results = retriever.batch_retrieve([queries[q] for q in qids], top_k=100)
        run = {q: {d.id: s for d, s in res} for q, res in zip(qids, results)}
    qps = time_queries(lambda q: retriever.retrieve(q, 100), qps_queries, min_time)
    return {"system": label or f"ours: {kind}", "build_s": build, "index_mb": size, "kb_dir_mb": kb_mb, "qps": qps}, run


def build_ours(kind, docs, **kwargs):
    t0 = time.perf_counter()
    r = make_retriever(kind, **kwargs)
    r.add_documents(docs)
    return r, time.perf_counter() - t0


def hybrid_from(bm25, bm25_build, dense, dense_build, **kwargs):
    """A HybridRetriever over the same documents reusing the already built halves' work (the embeddings are
    the expensive part); its build time is reported as the sum of the two builds."""
    h = HybridRetriever(**kwargs)
    h._set_documents(list(dense.documents))
    h.bm25._index_new(h.documents)
    h.dense.add_embeddings(dense.embeddings)
    return h, bm25_build + dense_build


def synthetic_corpus(docs, n, seed=0):
    """n documents whose words are sampled from the real corpus' unigram distribution, lengths from its documents."""
    rng = np.random.default_rng(seed)
    words, counts = np.unique(np.array([w for d in docs for w in d.text.lower().split()]), return_counts=True)
    lengths = np.array([len(d.text.split()) for d in docs])
    doc_lens = rng.choice(lengths, size=n)
    flat = rng.choice(len(words), size=int(doc_lens.sum()), p=counts / counts.sum())
    offsets = np.concatenate([[0], np.cumsum(doc_lens)])
    synth = [Document(f"s{i}", "", " ".join(words[flat[offsets[i]:offsets[i + 1]]])) for i in range(n)]
    return synth, int(doc_lens.sum()), len(words)


def bench_load(docs, sizes, repeats):
    """
    Load time of a saved BM25 KB of each size, verifying kb.json's sha256 of every file or not (sizes and row counts
    are checked either way), and the hashing alone. Page cache warm (right after the save). The two modes alternate
    and the best of `repeats` is kept, in wall time and in this process' CPU time (user + system), which other
    processes on a busy machine disturb much less than wall time.
    """
    rows = []
    for n in sizes:
        synth, n_words, _ = synthetic_corpus(docs, n)
        tmp = tempfile.mkdtemp()
        kb = os.path.join(tmp, "kb")
        t0 = time.perf_counter()
        r = make_retriever("bm25")
        r.add_documents(synth)
        r.save(kb)
        build = time.perf_counter() - t0
        del r, synth
        meta = read_kb_meta(kb)
        times = {}

        def timed(name, fn):
            w, c = time.perf_counter(), time.process_time()
            fn()
            w, c = time.perf_counter() - w, time.process_time() - c
            best = times.get(name, (float("inf"), float("inf")))
            times[name] = (min(best[0], w), min(best[1], c))
        for _ in range(repeats):
            timed("verify", lambda: load_retriever(kb, verify=True))
            timed("no_verify", lambda: load_retriever(kb, verify=False))
            timed("hash", lambda: verify_kb_files(kb, meta, verify=True))
        row = {"documents": n, "words": n_words, "kb_mb": dir_size(kb) / 1e6, "build_s": build,
               **{f"{k}_wall_s": v[0] for k, v in times.items()}, **{f"{k}_cpu_s": v[1] for k, v in times.items()}}
        shutil.rmtree(tmp)
        rows.append(row)
        print0(f"  {n} documents: load {row['verify_wall_s']:.2f}s verified, {row['no_verify_wall_s']:.2f}s not "
               f"(hashing {row['hash_wall_s']:.2f}s of {row['kb_mb']:.0f} MB)")
    print0(f"\nKB load time, BM25, synthetic documents (best of {repeats} loads each, warm page cache; wall / CPU s)")
    print0("| documents | words | KB MB | load, verify | load, verify=False | sha256 of all files | sha256 share of load (CPU) |")
    print0("|----------:|------:|------:|-------------:|-------------------:|--------------------:|---------------------------:|")
    for r in rows:
        print0(f"| {r['documents']:>9,} | {r['words'] / 1e6:.1f}M | {r['kb_mb']:5.0f} | "
               f"{r['verify_wall_s']:5.2f} / {r['verify_cpu_s']:5.2f} | {r['no_verify_wall_s']:7.2f} / {r['no_verify_cpu_s']:5.2f} | "
               f"{r['hash_wall_s']:8.2f} / {r['hash_cpu_s']:5.2f} | {r['hash_cpu_s'] / r['verify_cpu_s']:26.0%} |")
    return rows


# -----------------------------------------------------------------------------
# main

docs, queries, qrels = load_beir(args.dir)
if args.load_scale:
    sizes = [int(x) for x in args.load_scale.split(",") if x.strip()]
    print0(f"{args.dir}: {len(docs)} documents as the model for synthetic KBs of {sizes} documents")
    load_rows = bench_load(docs, sizes, args.load_repeats)
    if args.json:
        atomic_write_json(args.json, {"dataset": os.path.abspath(args.dir), "load": load_rows})
    sys.exit(0)
judged = [q for q in qrels if q in queries]
qrels = {q: qrels[q] for q in judged}
qps_queries = list(queries.values())
kinds = [k.strip() for k in args.retrievers.split(",") if k.strip()]
print0(f"{args.dir}: {len(docs)} documents, {len(queries)} queries ({len(judged)} judged), "
       f"{sum(len(r) for r in qrels.values())} relevance judgments; timing with {args.threads} thread(s)")
results = {"dataset": os.path.abspath(args.dir), "threads": args.threads, "rows": [], "scale": None}
rows = []


def add(row, run):
    if run:
        row["ndcg@10"], row["recall@100"] = evaluate({q: list(r) for q, r in run.items()}, qrels)
        ref = pytrec_check(row["system"], run, qrels, (row["ndcg@10"], row["recall@100"]))
        if ref is not None:
            row["pytrec_eval"] = {"ndcg@10": ref[0], "recall@100": ref[1]}
    rows.append(row)
    print0(f"  {row['system']}: nDCG@10 {row.get('ndcg@10', float('nan')):.4f}  R@100 {row.get('recall@100', float('nan')):.4f}"
           f"  build {row['build_s']:.2f}s  {row['qps']:.1f} q/s")


add(*bench_rank_bm25(docs, queries, judged, qps_queries, args.min_time))
add(*bench_bm25s(docs, queries, judged, qps_queries, args.min_time))
built = {}
for kind in ("simple", "bm25", "dense"):
    if kind in kinds or (kind != "simple" and "hybrid" in kinds):
        built[kind] = build_ours(kind, docs)
        if kind in kinds:
            add(*bench_ours(kind, built[kind][0], built[kind][1], queries, judged, qps_queries, args.min_time))
if "hybrid" in kinds:
    weights = tuple(float(w) for w in args.rrf_weights.split(","))
    fusion = {"weights": weights, "fusion_depth": args.fusion_depth, "rrf_k": args.rrf_k}
    h, hb = hybrid_from(*built["bm25"], *built["dense"], **fusion)
    add(*bench_ours("hybrid", h, hb, queries, judged, qps_queries, args.min_time,
                    label=f"ours: hybrid RRF k={args.rrf_k:g} w={args.rrf_weights}"))
    if args.reranker:
        h2, _ = hybrid_from(*built["bm25"], *built["dense"], reranker=args.reranker, **fusion)
        add(*bench_ours("hybrid", h2, hb, queries, judged, qps_queries, args.min_time,
                        label=f"ours: hybrid + rerank {os.path.basename(args.reranker)}"))
if args.tune_hybrid:
    # split-half tuning: choose (k, weights, depth) on the even-numbered judged queries (sorted ids), report
    # the choice on the odd-numbered ones, which played no part in it
    qids = sorted(judged)
    tune, held = qids[0::2], qids[1::2]
    depth_max = min(1000, len(docs))
    runs = {}
    for kind in ("bm25", "dense"):
        res = built[kind][0].batch_retrieve([queries[q] for q in qids], top_k=depth_max)
        runs[kind] = {q: [d.id for d, _ in r] for q, r in zip(qids, res)}

    def mean_ndcg(qs, ranked):
        return float(np.mean([compute_ndcg(ranked(q), qrels[q], 10) for q in qs]))
    grid = []
    for k in (1, 10, 30, 60, 100):
        for wd in (1.0, 1.5, 2.0, 3.0, 4.0):
            for depth in (20, 50, 100, depth_max):
                def fused(q, k=k, wd=wd, depth=depth):
                    return [i for i, _ in reciprocal_rank_fusion([runs["bm25"][q][:depth], runs["dense"][q][:depth]],
                                                                  k=k, weights=(1.0, wd))]
                grid.append((mean_ndcg(tune, fused), k, wd, depth, mean_ndcg(held, fused)))
    grid.sort(key=lambda g: -g[0])
    print0(f"\nhybrid tuning on {len(tune)} even-numbered judged queries, held-out check on {len(held)} others:")
    for kind in ("bm25", "dense"):
        print0(f"  {kind:<5} nDCG@10 tune {mean_ndcg(tune, runs[kind].get):.4f}  held-out {mean_ndcg(held, runs[kind].get):.4f}")
    for g in grid[:5]:
        print0(f"  RRF k={g[1]:<3} w_dense={g[2]:<3} depth={g[3]:<4}  tune {g[0]:.4f}  held-out {g[4]:.4f}")
    results["hybrid_tuning"] = [dict(zip(("tune", "k", "w_dense", "depth", "held_out"), g)) for g in grid]

print_table(rows, f"Retrieval on {os.path.basename(os.path.abspath(args.dir))} ({len(docs)} docs, {len(judged)} judged queries)")
by = {r["system"]: r for r in rows}
rb, bs = by["rank_bm25 BM25Okapi"], by["bm25s (lucene)"]
print0("\nratios (ours / reference):")
for r in rows:
    if r["system"].startswith("ours"):
        print0(f"  {r['system']:<34} nDCG@10 / rank_bm25 {r['ndcg@10'] / rb['ndcg@10']:.3f}   "
               f"q/s / rank_bm25 {r['qps'] / rb['qps']:.2f}x   q/s / bm25s {r['qps'] / bs['qps']:.2f}x")
results["rows"] = rows

# -----------------------------------------------------------------------------
# --scale N: BM25 speed on a synthetic corpus with the real corpus' statistics

if args.scale:
    synth, n_words, n_types = synthetic_corpus(docs, args.scale)
    print0(f"\nsynthetic corpus: {args.scale} documents, {n_words} words "
           f"(unigram sample of {n_types} word types, lengths from the real corpus)")
    srows = []
    r, t = build_ours("bm25", synth)
    srows.append(bench_ours("bm25", r, t, queries, [], qps_queries, args.min_time, eval_metrics=False)[0])
    del r
    srows.append(bench_bm25s(synth, queries, [], qps_queries, args.min_time, eval_metrics=False)[0])
    srows.append(bench_rank_bm25(synth, queries, [], qps_queries[:args.scale_rank_bm25_queries], 0.0,
                                 eval_metrics=False)[0])
    srows[-1]["system"] += f" ({args.scale_rank_bm25_queries} queries)"
    print_table(srows, f"BM25 at --scale {args.scale} (synthetic; no relevance judgments)")
    print0(f"\n  ours / rank_bm25 q/s: {srows[0]['qps'] / srows[2]['qps']:.1f}x   "
           f"ours / bm25s q/s: {srows[0]['qps'] / srows[1]['qps']:.2f}x   "
           f"build: ours {srows[0]['build_s']:.1f}s, bm25s {srows[1]['build_s']:.1f}s, rank_bm25 {srows[2]['build_s']:.1f}s")
    results["scale"] = {"n": args.scale, "rows": srows}

if args.json:
    atomic_write_json(args.json, results)
    print0(f"wrote {args.json}")
