"""
Does retrieval help? Evaluate a checkpoint on QA questions closed-book and with retrieved documents.

    python -m scripts.rag_eval --source rag --knowledge-base data/builtin/kb                 # built-in held-out questions
    python -m scripts.rag_eval --source rag --knowledge-base KB --eval-data my_qa.jsonl --top-k 5
    python -m scripts.rag_eval --retrieval-only --knowledge-base KB                           # no model: retrieval metrics
    torchrun --standalone --nproc_per_node=8 -m scripts.rag_eval -- --source rag --knowledge_base KB

Per mode (closed-book: the question alone; rag: the question with --top-k retrieved documents) it reports
exact match (EM), token F1, answer-contained accuracy, hallucination rate (answer content found in none of the
retrieved documents, nanochat.rag_utils.check_hallucination, judged against the same retrieved documents in
both modes), citation accuracy (rag: the cited [n] point to a gold document) and, for the retriever,
recall@k, precision@k, nDCG@k and MRR against the examples' gold_doc_ids. Prints a table, writes JSON and
markdown (default $NANOCHAT_BASE_DIR/report/rag_eval_results.{json,md}) and the report's rag_eval stage.
"""

import os
import time

import torch.distributed as dist

from nanochat.common import (add_checkpoint_args, compute_init, compute_cleanup, print0, ArgumentParser, get_autocast_ctx,
                             atomic_write_json, atomic_write_text)

MODES = ("closed_book", "rag")


def build_parser():
    parser = ArgumentParser(description="Closed-book vs RAG evaluation of a checkpoint on QA questions.")
    add_checkpoint_args(parser, default_source="rag")
    parser.add_argument("--knowledge-base", type=str, default=None, help="KB directory (None: the built-in stdlib KB)")
    parser.add_argument("--retriever-type", type=str, default=None, help="simple|bm25|dense|hybrid (None: the KB's own type)")
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--eval-data", type=str, default="builtin",
                        help="builtin (held-out stdlib modules) | squad | hotpotqa | pubmedqa:DIR | a QA JSONL file")
    parser.add_argument("--max-examples", type=int, default=300)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--modes", type=str, default="closed_book,rag", help="comma-separated subset of closed_book,rag")
    parser.add_argument("--retrieval-only", action="store_true", help="only the retrieval metrics (no model)")
    parser.add_argument("--output", type=str, default=None, help="path prefix for .json/.md (None: $NANOCHAT_BASE_DIR/report/rag_eval_results)")
    parser.add_argument("--show-examples", type=int, default=3, help="print this many example answers per mode")
    parser.add_argument("--hf-local", type=str, default=None,
                        help="a local mirror of the HF hub datasets: DIR/<repo_id>/<file> is read instead of downloading")
    parser.add_argument("--device-type", type=str, default="", help="cuda | cpu | mps ('': autodetect)")
    return parser


# -----------------------------------------------------------------------------
# scoring one answer

def score_answer(answer, example, documents, with_docs):
    from nanochat.metrics import NO_ANSWER, normalize_answer, exact_match, token_f1, strip_citations
    from nanochat.rag_utils import check_hallucination, citation_correctness, extract_citations_from_response
    answers = example.get("answers") or [NO_ANSWER]
    text = strip_citations(answer)
    norm = normalize_answer(text)
    row = dict(em=float(exact_match(text, answers)), f1=float(token_f1(text, answers)),
               contains=float(any(normalize_answer(a) and normalize_answer(a) in norm for a in answers)),
               hallucination=float(check_hallucination(answer, documents)["hallucinated"]))
    gold = example.get("gold_doc_ids")
    if with_docs and gold:
        row["citation"] = citation_correctness(extract_citations_from_response(answer), documents, gold)
    return row


def retrieval_metrics(retrieved_ids, gold, k):
    from nanochat.rag_utils import compute_retrieval_recall, compute_retrieval_precision, compute_ndcg, compute_mrr
    return dict(recall=compute_retrieval_recall(retrieved_ids, gold, k), precision=compute_retrieval_precision(retrieved_ids, gold, k),
                ndcg=compute_ndcg(retrieved_ids, {g: 1 for g in gold}, k), mrr=compute_mrr(retrieved_ids, gold, k))


def format_tables(summary, modes):
    """Markdown: the run's facts, closed-book and RAG side by side (with the difference), retrieval metrics."""
    facts = [k for k in ("n", "checkpoint", "knowledge_base", "retriever", "top_k", "eval_data") if k in summary]
    lines = ["| run | |", "|---|---|"] + [f"| {k} | {summary[k]} |" for k in facts]
    names = [("em", "exact match (%)"), ("f1", "token F1 (%)"), ("contains", "answer contained (%)"),
             ("hallucination_rate", "hallucination rate (%)"), ("citation_accuracy", "citation accuracy (%)")]
    if any(f"{m}_em" in summary for m in modes):
        head = [{"closed_book": "closed-book", "rag": f"RAG (top {summary['top_k']})"}[m] for m in modes]
        both = len(modes) == 2
        lines += ["", "| metric | " + " | ".join(head) + (" | RAG - closed-book |" if both else " |"),
                  "|---|" + "---|" * (len(modes) + both)]
        for key, name in names:
            vals = [summary.get(f"{m}_{key}") for m in modes]
            if all(v is None for v in vals):
                continue
            cells = ["-" if v is None else f"{v:.2f}" for v in vals]
            if both:
                cells.append("-" if None in vals else f"{vals[1] - vals[0]:+.2f}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    ret = [k for k in summary if k.startswith("retrieval_")]
    if ret:
        lines += ["", "| retrieval (gold documents) | % |", "|---|---|"] + [f"| {k[len('retrieval_'):]} | {summary[k]:.2f} |" for k in ret]
    return "\n".join(lines)


def mean(rows, key):
    vals = [r[key] for r in rows if r.get(key) is not None]
    return sum(vals) / len(vals) if vals else None


# -----------------------------------------------------------------------------

def main():
    args = build_parser().parse_args()
    from tasks.hf import use_hf_local
    use_hf_local(args.hf_local)
    from nanochat.retrieval import RetrievalManager, insert_retrieval_message, results_to_dicts
    from nanochat.report import write_stage, report_dir
    from tasks.registry import load_task, default_kb
    from nanochat.rag_utils import doc_key

    ddp, rank, local_rank, world_size, device = compute_init(args.device_type)
    autocast_ctx = get_autocast_ctx(device.type)
    t0 = time.time()
    kb = args.knowledge_base or default_kb()
    if not os.path.isdir(kb):
        raise FileNotFoundError(f"knowledge base {kb} does not exist; build it with python -m nanochat.retrieval")
    manager = RetrievalManager(args.retriever_type, kb)
    qa = load_task(args.eval_data, "test")
    n = min(len(qa), args.max_examples) if args.max_examples > 0 else len(qa)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        if m not in MODES:
            raise ValueError(f"--modes: unknown mode {m!r}; choose from {', '.join(MODES)}")

    engine = None
    if not args.retrieval_only:
        from nanochat.checkpoint_manager import load_model
        from nanochat.engine import Engine
        model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
        engine = Engine(model, tokenizer)

    # this process's share of the questions; retrieval in one batch
    indices = list(range(rank, n, world_size))
    examples = [qa[i] for i in indices]
    from nanochat.retrieval import last_user_message
    hits = manager.batch_retrieve([last_user_message(e) for e in examples], args.top_k) if examples else []
    rows = []
    shown = {m: 0 for m in modes}
    from tqdm import tqdm
    for example, hit in tqdm(list(zip(examples, hits)), desc="rag_eval", disable=rank != 0 or engine is None,
                             mininterval=2.0):
        docs = results_to_dicts(hit)
        gold = [str(g) for g in example.get("gold_doc_ids") or []]
        row = dict(id=example.get("id"), question=last_user_message(example), answers=example.get("answers"))
        row["retrieved"] = [d["id"] for d in docs]
        if gold:
            row["retrieval"] = retrieval_metrics([doc_key(d) for d in docs], gold, args.top_k)  # chunks count as parents
        if engine is not None:
            question_only = {"messages": [m for m in example["messages"] if m["role"] in ("system", "user")]}
            for mode in modes:
                conv = question_only if mode == "closed_book" else insert_retrieval_message(question_only, docs, "before_user")
                with autocast_ctx:
                    answer = engine.generate_from_conversation(conv, max_tokens=args.max_new_tokens, temperature=0.0)
                row[mode] = dict(answer=answer, **score_answer(answer, example, docs, mode == "rag"))
                if rank == 0 and shown[mode] < args.show_examples:
                    shown[mode] += 1
                    print0(f"[{mode}] Q: {row['question'][:100]!r}\n   A: {answer[:160]!r}\n   gold: {(example.get('answers') or [''])[0][:100]!r}")
        rows.append(row)

    if ddp:
        gathered = [None] * world_size
        dist.all_gather_object(gathered, rows)
        rows = [r for part in gathered for r in part]

    # -------------------------------------------------------------------------
    # aggregate
    summary = dict(n=len(rows), top_k=args.top_k, knowledge_base=kb, retriever=manager.retriever_type, eval_data=args.eval_data)
    ret_rows = [r["retrieval"] for r in rows if "retrieval" in r]
    for key in ("recall", "precision", "ndcg", "mrr"):
        v = mean(ret_rows, key)
        if v is not None:
            summary[f"retrieval_{key}@{args.top_k}"] = round(100 * v, 2)
    if engine is not None:
        summary["checkpoint"] = f"{args.source}/{meta['model_tag']} step {meta['step']}"
        for mode in modes:
            mrows = [r[mode] for r in rows]
            for key, name in (("em", "em"), ("f1", "f1"), ("contains", "contains"), ("hallucination", "hallucination_rate"),
                              ("citation", "citation_accuracy")):
                v = mean(mrows, key)
                if v is not None:
                    summary[f"{mode}_{name}"] = round(100 * v, 2)

    table = format_tables(summary, modes)
    print0(table)
    if rank == 0:
        prefix = args.output or os.path.join(report_dir(), "rag_eval_results")
        atomic_write_json(prefix + ".json", dict(summary=summary, rows=rows))
        atomic_write_text(prefix + ".md", "# RAG evaluation\n\n" + table + "\n")
        print0(f"wrote {prefix}.json and {prefix}.md")
        retrieval_figs = {k: v for k, v in summary.items() if k.startswith("retrieval_")}
        retrieval_figs.update(questions=len(rows), retriever=manager.retriever_type, top_k=args.top_k)
        write_stage("retrieval_eval", retrieval_figs)
        if engine is not None:
            write_stage("rag_eval", summary, markdown=table, time_s=time.time() - t0)
    compute_cleanup()


if __name__ == "__main__":
    main()
