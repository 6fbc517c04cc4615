"""
Does retrieval help, and does the model read? Evaluate a checkpoint on QA questions, closed-book and with retrieved
documents, beside model-free baselines and the same model family without the fine-tune under test.

    python -m scripts.rag_eval --source rag --split dev                                   # built-in QA, dev split
    python -m scripts.rag_eval --source rag --knowledge-base KB --eval-data my_qa.jsonl --top-k 5
    python -m scripts.rag_eval --source refrag --multihop --knowledge-base KB --eval-data multihop/dev.jsonl
    python -m scripts.rag_eval --retrieval-only --knowledge-base KB                        # no model: retrieval metrics
    torchrun --standalone --nproc_per_node=8 -m scripts.rag_eval --source rag --knowledge_base KB

Systems (rows of the table), all on the same questions and the same retrieved documents:
    closed_book     the model, question only
    rag             the model with the question's top-k documents
    compare         --compare (default: the checkpoint's parent, e.g. the SFT model a rag model was tuned from) with
                    the same documents: what the fine-tune under test adds
    multihop_rule   (--multihop) the model with two hops of a fixed re-query rule (tasks/rag_task.MultiHopRAGTask)
    refrag          (--multihop) the model writes its own follow-up queries (Engine with a retriever, --max-hops)
    rag_at_refrag_k (--multihop) single-shot RAG with k = the mean number of documents REFRAG showed: equal reading cost
    baselines       model-free rules on the rag documents (tasks/baselines.py): first sentence / header line /
                    best-overlap sentence of document 1, the best per-question-type rule, and an oracle (the gold
                    document first + that rule)
Per system: exact match (EM), token F1, answer contained, abstention rate, hallucination rate over the answers that do
not abstain, citation accuracy (citing nothing earns nothing; beside it the score of always citing [1]), all-gold and
any-gold recall of the documents shown, queries per question, answer tokens and seconds per question; by dataset when
the examples carry one. Retrieval metrics (recall@k, precision@k, nDCG@k, MRR) of the single-shot retrieval.

Recipes are chosen on --split dev; the test split is reported once per recipe (tasks/stdlib_qa.py, RESULTS.md).
Writes a table, JSON and markdown (default $NANOCHAT_BASE_DIR/report/rag_eval_results.{json,md}, refrag_eval_results
with --multihop) and the report's rag_eval (refrag_eval) stage.
"""

import os
import time
from collections import defaultdict

import torch.distributed as dist
from tqdm import tqdm

from nanochat.common import (ArgumentParser, add_checkpoint_args, compute_init, compute_cleanup, print0, run_main,
                             get_autocast_ctx, atomic_write_json, atomic_write_text)
from nanochat.checkpoint_manager import load_model
from nanochat.dataset import use_hf_local
from nanochat.engine import Engine
from nanochat.metrics import normalize_answer, strip_citations, is_abstention
from nanochat.rag_utils import (compute_rag_reward, citation_correctness, compute_retrieval_recall,
                                compute_retrieval_precision, compute_ndcg, compute_mrr, doc_key)
from nanochat.report import write_stage, report_dir
from nanochat.retrieval import RetrievalManager, insert_retrieval_message, results_to_dicts, last_user_message
from tasks.baselines import baseline_answers, oracle_documents, BASELINE_RULES
from tasks.rag_task import MultiHopRAGTask
from tasks.registry import load_task, default_kb

parser = ArgumentParser(description="Closed-book vs RAG (vs REFRAG) evaluation of a checkpoint, beside baselines.")
add_checkpoint_args(parser, default_source="rag")
parser.add_argument("--knowledge-base", type=str, default=None, help="KB directory (None: the built-in stdlib KB)")
parser.add_argument("--retriever-type", type=str, default=None, help="simple|bm25|dense|hybrid (None: the KB's own type)")
parser.add_argument("--top-k", type=int, default=3, help="documents retrieved for the question")
parser.add_argument("--eval-data", type=str, default="builtin",
                    help="a task name of tasks/registry.py (builtin, squad, hotpotqa, pubmedqa:DIR) or a QA JSONL file")
parser.add_argument("--split", type=str, default="test", choices=["dev", "test"],
                    help="dev for choosing recipes; test reported once per recipe")
parser.add_argument("--max-examples", type=int, default=300, help="questions to evaluate (-1: all)")
parser.add_argument("--max-new-tokens", type=int, default=64, help="most tokens per answer (a REFRAG answer's "
                    "queries and forced documents count too)")
parser.add_argument("--modes", type=str, default=None,
                    help="comma-separated systems to run (default: closed_book,rag; with --multihop also "
                         "multihop_rule,refrag,rag_at_refrag_k)")
parser.add_argument("--compare", type=str, default="parent",
                    help="the no-fine-tune row: parent (the checkpoint's parent, when it has one), none, or "
                         "SOURCE[:TAG[:STEP]] (e.g. sft:d8)")
parser.add_argument("--no-baselines", action="store_true", help="leave out the model-free baseline rows")
parser.add_argument("--multihop", action="store_true", help="multi-hop mode: add the fixed-rule and REFRAG systems")
parser.add_argument("--max-hops", type=int, default=3, help="REFRAG: follow-up queries per question")
parser.add_argument("--top-k-per-hop", type=int, default=3, help="REFRAG and the fixed rule: documents per follow-up")
parser.add_argument("--retrieval-only", action="store_true", help="only the retrieval metrics (no model)")
parser.add_argument("--output", type=str, default=None,
                    help="path prefix for .json/.md (None: $NANOCHAT_BASE_DIR/report/rag_eval_results)")
parser.add_argument("--show-examples", type=int, default=3, help="print this many example answers per system")
parser.add_argument("--hf-local", type=str, default=None,
                    help="a local mirror of the HF hub datasets: DIR/<repo_id>/<file> is read instead of downloading")
parser.add_argument("--device-type", type=str, default="", help="cuda | cpu | mps ('': autodetect)")

MODEL_SYSTEMS = ("closed_book", "rag", "compare", "multihop_rule", "refrag", "rag_at_refrag_k")
SYSTEM_NAMES = {"closed_book": "closed-book", "rag": "RAG", "compare": "no fine-tune, with documents",
                "multihop_rule": "fixed-rule multi-hop", "refrag": "REFRAG", "rag_at_refrag_k": "RAG at REFRAG's k",
                "first_sentence": "rule: first sentence of doc 1", "header_line": "rule: header line of doc 1",
                "overlap_sentence": "rule: doc 1 sentence sharing most words", "per_type_rule": "rule: best per question type",
                "oracle": "oracle: gold first + per-type rule"}

# -----------------------------------------------------------------------------
# scoring


def score_answer(answer, example, documents):
    """Scores of one answer against the example (answers, gold_doc_ids) and the documents it was shown, in number
    order ([] when closed-book): the components of nanochat.rag_utils.compute_rag_reward plus contains/abstained."""
    answers = example.get("answers") or []
    gold = [str(g) for g in example.get("gold_doc_ids") or []]
    r = compute_rag_reward(answer, answers, documents, gold_doc_ids=gold if documents and gold else None)
    norm = normalize_answer(strip_citations(answer))
    abstained = is_abstention(answer)
    return dict(em=r["em"], f1=r["f1"], abstained=float(abstained),
                contains=float(any(normalize_answer(strip_citations(a)) and normalize_answer(strip_citations(a)) in norm
                                   for a in answers)),
                hallucination=None if abstained else r["hallucination"], citation=r["citation"])


def gold_recall(documents, gold):
    """(all-gold, any-gold) of the documents shown: every / at least one gold document among them (chunks count as
    their parent). None when the example names no gold document."""
    if not gold:
        return None, None
    r = compute_retrieval_recall([doc_key(d) for d in documents], gold, max(1, len(documents)))
    return float(r == 1.0), float(r > 0.0)


def retrieval_metrics(retrieved_ids, gold, k):
    return dict(recall=compute_retrieval_recall(retrieved_ids, gold, k), precision=compute_retrieval_precision(retrieved_ids, gold, k),
                ndcg=compute_ndcg(retrieved_ids, {g: 1 for g in gold}, k), mrr=compute_mrr(retrieved_ids, gold, k))


def mean(values):
    values = [v for v in values if v is not None]
    return 100 * sum(values) / len(values) if values else None


METRICS = [("em", "EM"), ("f1", "F1"), ("contains", "contained"), ("abstained", "abstain"),
           ("hallucination", "halluc."), ("citation", "citation acc."), ("all_gold", "all-gold"),
           ("any_gold", "any-gold"), ("docs", "docs shown"), ("queries", "queries/q"), ("answer_tokens", "answer tok"),
           ("seconds", "s/q")]
PERCENT = {"em", "f1", "contains", "abstained", "hallucination", "citation", "all_gold", "any_gold"}


def summarize(rows, systems):
    """{system: {metric: value}} over the rows (percentages for rates; means for counts), plus by dataset."""
    out = {}
    for system in systems:
        cells = [r[system] for r in rows if system in r]
        if not cells:
            continue
        s = {"n": len(cells)}
        for key, _ in METRICS:
            vals = [c.get(key) for c in cells]
            if key in PERCENT:
                s[key] = mean(vals)
            else:
                vals = [v for v in vals if v is not None]
                s[key] = sum(vals) / len(vals) if vals else None
        if system == "rag":
            s["citation_always_1"] = mean([r.get("citation_always_1") for r in rows])
        by = defaultdict(list)
        for r, c in zip([r for r in rows if system in r], cells):
            if r.get("dataset"):
                by[r["dataset"]].append(c)
        if len(by) > 1:
            s["by_dataset"] = {d: {k: mean([c.get(k) for c in cs]) for k in ("em", "f1", "all_gold")} | {"n": len(cs)}
                               for d, cs in sorted(by.items())}
        out[system] = s
    return out


def format_tables(summary):
    """Markdown: the run's facts, one row per system (model rows first, then baselines), retrieval metrics."""
    facts = [k for k in ("n", "checkpoint", "compare", "eval_data", "split", "knowledge_base", "retriever", "top_k")
             if k in summary]
    lines = ["| run | |", "|---|---|"] + [f"| {k} | {summary[k]} |" for k in facts]
    systems = summary.get("systems", {})
    if systems:
        keys = [(k, name) for k, name in METRICS if any(s.get(k) is not None for s in systems.values())]
        lines += ["", "| system | " + " | ".join(name for _, name in keys) + " |", "|---|" + "---|" * len(keys)]
        for system, s in systems.items():
            cells = ["-" if s.get(k) is None else (f"{s[k]:.1f}" if k in PERCENT else f"{s[k]:.2f}") for k, _ in keys]
            lines.append(f"| {SYSTEM_NAMES.get(system, system)} | " + " | ".join(cells) + " |")
        if systems.get("rag", {}).get("citation_always_1") is not None:
            lines += ["", f"Citation accuracy of always citing [1] on the RAG documents: "
                          f"{systems['rag']['citation_always_1']:.1f}% (the RAG row's citation accuracy stands beside it)."]
        for system, s in systems.items():
            if "by_dataset" in s:
                lines += ["", f"| {SYSTEM_NAMES.get(system, system)} by dataset | n | EM | F1 | all-gold |", "|---|---|---|---|---|"]
                for d, v in s["by_dataset"].items():
                    lines.append(f"| {d} | {v['n']} | " + " | ".join("-" if v[k] is None else f"{v[k]:.1f}"
                                                                  for k in ("em", "f1", "all_gold")) + " |")
    ret = [k for k in summary if k.startswith("retrieval_")]
    if ret:
        lines += ["", "| retrieval (gold documents) | % |", "|---|---|"] + \
                 [f"| {k[len('retrieval_'):]} | {summary[k]:.2f} |" for k in ret]
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# models


def compare_checkpoint(spec, meta):
    """(source, tag, step) of the --compare model, or None."""
    if spec == "none":
        return None
    if spec == "parent":
        parent = meta.get("parent")
        if not parent or parent.get("source") not in ("sft", "rag", "refrag", "base"):
            print0("--compare parent: the checkpoint records no parent; no comparison row")
            return None
        return parent["source"], parent.get("model_tag"), parent.get("step")
    source, _, rest = spec.partition(":")
    tag, _, step = rest.partition(":")
    return source, tag or None, int(step) if step else None


def answer_row(engine, conversation, max_tokens, tokenizer, trace=False):
    """Generate greedily; -> (answer, documents shown in number order, queries, seconds)."""
    t0 = time.time()
    if trace:
        tr = engine.generate_from_conversation(conversation, max_tokens=max_tokens, temperature=0.0, return_trace=True)
        answer, docs, queries = tr["answer"], tr["documents"], tr["queries"]
    else:
        answer = engine.generate_from_conversation(conversation, max_tokens=max_tokens, temperature=0.0)
        docs = next((m["documents"] for m in conversation["messages"] if m.get("role") == "retrieval"), [])
        queries = []
    return answer, docs, queries, time.time() - t0


def system_cell(answer, example, docs, queries, seconds, tokenizer, judge_docs=None):
    """One system's scores on one question. docs: what it was shown, in number order; judge_docs: the documents its
    hallucination is judged against when it was shown none (closed-book: the RAG documents, so both rows are judged
    against the same text)."""
    gold = [str(g) for g in example.get("gold_doc_ids") or []]
    all_gold, any_gold = gold_recall(docs, gold) if docs else (None, None)
    cell = dict(answer=answer, **score_answer(answer, example, docs or judge_docs or []))
    if not docs:
        cell["citation"] = None
    cell.update(all_gold=all_gold, any_gold=any_gold, docs=len(docs), queries=len(queries),
                answer_tokens=len(tokenizer.encode(answer)), seconds=seconds, shown=[d.get("id") for d in docs],
                query_texts=queries)
    return cell


def baseline_cell(answer, example):
    """A model-free rule's answer: only the answer scores (it shows nothing, cites nothing, takes no time)."""
    sc = score_answer(answer, example, [])
    return dict(answer=answer, em=sc["em"], f1=sc["f1"], contains=sc["contains"], abstained=sc["abstained"])


# -----------------------------------------------------------------------------


def main():
    args = parser.parse_args()
    use_hf_local(args.hf_local)
    ddp, rank, local_rank, world_size, device = compute_init(args.device_type)
    autocast_ctx = get_autocast_ctx(device.type)
    t0 = time.time()
    kb = args.knowledge_base or default_kb()
    manager = RetrievalManager(args.retriever_type, kb)
    qa = load_task(args.eval_data, args.split)
    n = min(len(qa), args.max_examples) if args.max_examples > 0 else len(qa)
    default_modes = "closed_book,rag" + (",multihop_rule,refrag,rag_at_refrag_k" if args.multihop else "")
    modes = [m.strip() for m in (args.modes or default_modes).split(",") if m.strip()]
    for m in modes:
        if m not in MODEL_SYSTEMS:
            raise ValueError(f"--modes: unknown system {m!r}; choose from {', '.join(MODEL_SYSTEMS)}")
    if args.retrieval_only:
        modes = []

    engine = compare_engine = refrag_engine = tokenizer = meta = None
    compare = None
    if modes:
        model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
        engine = Engine(model, tokenizer)
        if "refrag" in modes:
            refrag_engine = Engine(model, tokenizer, retriever=manager, retrieval_top_k=args.top_k_per_hop,
                                   max_hops=args.max_hops)
        compare = compare_checkpoint(args.compare, meta)
        if compare is not None:
            cmodel, _, cmeta = load_model(compare[0], device, phase="eval", model_tag=compare[1], step=compare[2],
                                          tokenizer=tokenizer)
            compare_engine = Engine(cmodel, tokenizer)
            compare = f"{compare[0]}/{cmeta['model_tag']} step {cmeta['step']}"
            modes.insert(modes.index("rag") + 1 if "rag" in modes else len(modes), "compare")
    rule = MultiHopRAGTask(qa, retriever=manager, top_k_per_hop=args.top_k_per_hop, num_hops=2) \
        if "multihop_rule" in modes else None

    # this process's share of the questions; single-shot retrieval in one batch
    indices = list(range(rank, n, world_size))
    examples = [qa[i] for i in indices]
    hits = manager.batch_retrieve([last_user_message(e) for e in examples], args.top_k) if examples else []
    rows, shown = [], defaultdict(int)
    for example, hit in tqdm(list(zip(examples, hits)), desc="rag_eval", disable=rank != 0, mininterval=2.0):
        docs = results_to_dicts(hit)
        gold = [str(g) for g in example.get("gold_doc_ids") or []]
        question_only = {"messages": [m for m in example["messages"] if m["role"] in ("system", "user")]}
        with_docs = insert_retrieval_message(question_only, docs, "before_user")
        row = dict(id=example.get("id"), dataset=example.get("dataset"), question=last_user_message(example),
                   answers=example.get("answers"), retrieved=[d["id"] for d in docs])
        if gold:
            row["retrieval"] = retrieval_metrics([doc_key(d) for d in docs], gold, args.top_k)  # chunks count as parents
            row["citation_always_1"] = citation_correctness([1], docs, gold) if docs else None
        if not args.no_baselines and not args.retrieval_only:
            for name, answer in baseline_answers(example, docs).items():
                row[name] = baseline_cell(answer, example)
            row["oracle"] = baseline_cell(baseline_answers(example, oracle_documents(example, docs))["per_type_rule"],
                                          example)
        conversations = {"closed_book": question_only, "rag": with_docs, "compare": with_docs}
        if rule is not None:
            hop_docs = [d for hop in rule.retrieve_hops(row["question"]) for d in hop]
            conversations["multihop_rule"] = insert_retrieval_message(question_only, hop_docs, "before_user")
        conversations["refrag"] = with_docs
        for system in modes:
            if system == "rag_at_refrag_k":
                continue  # needs REFRAG's mean documents: second pass below
            eng = {"compare": compare_engine, "refrag": refrag_engine}.get(system, engine)
            with autocast_ctx:
                answer, sdocs, queries, dt = answer_row(eng, conversations[system], args.max_new_tokens, tokenizer,
                                                        trace=system == "refrag")
            if system == "closed_book":
                row[system] = system_cell(answer, example, [], queries, dt, tokenizer, judge_docs=docs)
            else:
                row[system] = system_cell(answer, example, sdocs, queries, dt, tokenizer)
            if rank == 0 and shown[system] < args.show_examples:
                shown[system] += 1
                print0(f"[{system}] Q: {row['question'][:100]!r}\n   A: {answer[:160]!r}\n   gold: {(example.get('answers') or [''])[0][:100]!r}")
        rows.append(row)

    if "rag_at_refrag_k" in modes and "refrag" in modes:
        # single-shot RAG at REFRAG's reading cost: k = the mean number of documents REFRAG showed (all ranks agree)
        local = [r["refrag"]["docs"] for r in rows]
        if ddp:
            gathered = [None] * world_size
            dist.all_gather_object(gathered, local)
            local = [x for part in gathered for x in part]
        k_eq = max(1, round(sum(local) / max(1, len(local))))
        hits_k = manager.batch_retrieve([r["question"] for r in rows], k_eq) if rows else []
        for row, example, hit in zip(rows, examples, hits_k):
            docs = results_to_dicts(hit)
            conv = insert_retrieval_message({"messages": [m for m in example["messages"] if m["role"] in ("system", "user")]},
                                            docs, "before_user")
            with autocast_ctx:
                answer, sdocs, queries, dt = answer_row(engine, conv, args.max_new_tokens, tokenizer)
            row["rag_at_refrag_k"] = system_cell(answer, example, sdocs, queries, dt, tokenizer)
        print0(f"rag_at_refrag_k: single-shot RAG with k = {k_eq}")

    if ddp:
        gathered = [None] * world_size
        dist.all_gather_object(gathered, rows)
        rows = [r for part in gathered for r in part]

    # -------------------------------------------------------------------------
    # aggregate
    systems = modes + ([] if args.no_baselines or args.retrieval_only else list(BASELINE_RULES) + ["oracle"])
    summary = dict(n=len(rows), eval_data=args.eval_data, split=args.split, knowledge_base=kb,
                   retriever=manager.retriever_type, top_k=args.top_k)
    if meta is not None:
        summary["checkpoint"] = f"{args.source}/{meta['model_tag']} step {meta['step']}"
    if compare is not None:
        summary["compare"] = compare
    ret_rows = [r["retrieval"] for r in rows if "retrieval" in r]
    for key in ("recall", "precision", "ndcg", "mrr"):
        if ret_rows:
            summary[f"retrieval_{key}@{args.top_k}"] = round(100 * sum(r[key] for r in ret_rows) / len(ret_rows), 2)
    summary["systems"] = summarize(rows, systems)
    table = format_tables(summary)
    print0(table)
    if rank == 0:
        stage = "refrag_eval" if args.multihop else "rag_eval"
        prefix = args.output or os.path.join(report_dir(), f"{stage}_results")
        atomic_write_json(prefix + ".json", dict(summary=summary, rows=rows))
        atomic_write_text(prefix + ".md", "# RAG evaluation\n\n" + table + "\n")
        print0(f"wrote {prefix}.json and {prefix}.md")
        figures = {k: v for k, v in summary.items() if k.startswith("retrieval_")}
        figures.update(questions=len(rows), retriever=manager.retriever_type, top_k=args.top_k)
        write_stage("retrieval_eval", figures)
        if modes:  # the report's figures: EM/F1 per system (the markdown table has every metric)
            flat = {f"{sys}_{k}": round(s[k], 2) for sys, s in summary["systems"].items() for k in ("em", "f1")
                    if s.get(k) is not None}
            write_stage(stage, {**{k: v for k, v in summary.items() if k != "systems"}, **flat}, markdown=table,
                        time_s=time.time() - t0)
    compute_cleanup()


if __name__ == "__main__":
    run_main(main)
