"""
Multi-hop QA in the multihop schema (../shared/data/multihop: HotpotQA, MuSiQue, 2WikiMultihopQA, StrategyQA; the
built-in stdlib set of tasks/stdlib_multihop.py) and the views REFRAG trains and is scored on:

    from tasks.multihop import MultiHopQA, RefragTask, HopReadingTask, hop_queries, recall_by_dataset
    dev = MultiHopQA("../shared/data/multihop/dev.jsonl")        # any file in the schema, validated (file:line)
    hop_queries(dev[0])          # ["Who is the performer of ...?", "What is the date of birth of Dillon Francis?"]
    gold = RefragTask(MultiHopQA(".../train.jsonl"), "KB_DIR", top_k=5, top_k_per_hop=3, max_hops=3)
    gold.precompute()            # every retrieval once, batched
    conversation = gold[0]       # the gold REFRAG trajectory (below), for tokenizer.render_conversation / SFT
    reading = HopReadingTask(MultiHopQA(".../train.jsonl"))   # one single-hop reading example per usable hop
    recall_by_dataset([(ex["dataset"], shown_documents(conv), ex["gold_doc_ids"]) for ...])

The schema (one JSON object per line; ../shared/data/multihop/README.md) is the QA schema of tasks/qa.py with the
supporting passages and, where the dataset gives them, the hops:

    {"id", "dataset"?, "type"?, "level"?,
     "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": canonical answer}],
     "answers": [canonical answer, aliases...], "gold_doc_ids": [supporting passage ids, hop order where known],
     "documents": [{"id", "title", "content"}, ...],           # the question's own passages (gold + distractors)
     "hops": [{"question", "answer" (str or null), "doc_id" (str or null)}, ...]}

Hop queries (hop_queries): each hop's sub-question with earlier answers filled in. MuSiQue and 2Wiki sub-questions
come filled; MuSiQue's "entity >> relation" form is read as "What is the relation of entity?" (the template 2Wiki
dev hops use; the same BM25 words, so the same recall, but a query a model can imitate); HotpotQA hop questions are
passage titles (kept: the entity to search for); StrategyQA steps keep raw "#k" references and have no step
answers, so a "#k" becomes the referenced step's own query in parentheses ("What did (What was George Fox the
founder of) advocate for?"). On train.jsonl's 180 StrategyQA steps with a passage and a "#k", BM25 top-3 over
corpus.jsonl finds the step's passage for 43.9% of them this way, 31.1% with the reference dropped, 28.9% with
"#k" left as is.

A gold REFRAG trajectory (RefragTask; ../shared/DESIGN.md "A REFRAG trajectory"):

    {"messages": [{"role": "retrieval", "documents": hop0},      # top_k retrieved for the question (as in RAG)
                  {"role": "user", "content": question},
                  {"role": "assistant", "content": [{"type": "query", "text": hop query},
                                                    {"type": "documents", "documents": new docs}, ...,
                                                    {"type": "text", "text": "answer [2, 7]"}]}],
     "answers", "gold_doc_ids", "hops", "id", "dataset", "complete": every hop passage was shown}

Documents are numbered continuously at render time ([1]..[k] for hop 0, then on), so the answer cites positions
in the concatenation of every block (a chunk counts as its parent, nanochat.rag_utils.doc_key).
"""

import os
import re
import copy
import random

from tqdm import tqdm

from nanochat.common import ArgumentParser, run_main
from nanochat.metrics import token_f1, strip_citations, normalize_answer
from nanochat.rag_utils import as_doc_dict, doc_key
from nanochat.retrieval import RetrievalManager, insert_retrieval_message, results_to_dicts, last_user_message
from nanochat.tokenizer import NOTICE_NO_NEW_DOCUMENTS
from tasks.common import Task, TaskOver, assistant_text
from tasks.qa import QAJsonl
from tasks.rag_task import cite_gold

# -----------------------------------------------------------------------------
# the schema


class MultiHopQA(QAJsonl):
    """Any JSONL file in the multihop schema, validated line by line (errors name file:line): the QA schema
    (QAJsonl) plus non-empty answers and gold_doc_ids, a documents list, and hops when present. Examples without
    an id get "<file name>:<line>", without a dataset the file's name. Generative: evaluate = SQuAD-normalized EM
    (citations stripped) against answers; f1 = token F1."""

    def validate(self, example, where):
        super().validate(example, where)
        if not example["answers"]:
            raise ValueError(f"{where}: 'answers' must be a non-empty list of strings")
        if not example.get("gold_doc_ids"):
            raise ValueError(f"{where}: 'gold_doc_ids' must be a non-empty list of supporting passage ids")
        if not isinstance(example.get("documents"), list):
            raise ValueError(f"{where}: 'documents' must be a list of the question's passages ({{id, title, content}})")
        hops = example.get("hops")
        if hops is not None:
            if not isinstance(hops, list):
                raise ValueError(f"{where}: 'hops' must be a list, got {type(hops).__name__}")
            for j, hop in enumerate(hops):
                if not isinstance(hop, dict) or not isinstance(hop.get("question"), str):
                    raise ValueError(f"{where}: hop {j} must be an object with a string 'question', got {hop!r:.200}")
                for key in ("answer", "doc_id"):
                    if hop.get(key) is not None and not isinstance(hop[key], str):
                        raise ValueError(f"{where}: hop {j} '{key}' must be a string or null, got {hop[key]!r:.100}")
        for key in ("dataset", "type"):
            if example.get(key) is not None and not isinstance(example[key], str):
                raise ValueError(f"{where}: '{key}' must be a string, got {example[key]!r:.100}")
        example.setdefault("dataset", os.path.splitext(os.path.basename(where.rsplit(":", 1)[0]))[0])

    def f1(self, conversation, assistant_response):
        return token_f1(strip_citations(assistant_response), conversation["answers"])


# -----------------------------------------------------------------------------
# hop queries

_REFERENCE = re.compile(r"#(\d+)")
_RELATION = re.compile(r"^(.+?)\s*>>\s*(.+)$")  # MuSiQue's "Hello Love >> performer"


def hop_queries(example):
    """One query per hop of example["hops"] (aligned with it; [] without hops): the sub-question with each "#k"
    reference to an earlier hop replaced by that hop's answer, or, when it has none, by that hop's own query in
    parentheses (a reference to a later or missing hop is dropped); "entity >> relation" is read as "What is the
    relation of entity?"."""
    hops = example.get("hops") or []
    out = []
    for j, hop in enumerate(hops):
        def fill(m, j=j):
            k = int(m.group(1)) - 1
            if not 0 <= k < j:
                return ""
            return hops[k].get("answer") or f"({out[k].rstrip(' ?')})"
        query = " ".join(_REFERENCE.sub(fill, hop["question"]).split())
        m = _RELATION.match(query)
        if m:
            query = f"What is the {m.group(2).rstrip(' ?')} of {m.group(1)}?"
        out.append(query)
    return out


# -----------------------------------------------------------------------------
# recall of the documents shown (what rag_eval --multihop reports)


def shown_documents(conversation):
    """Every document a conversation shows, in render (= citation number) order: retrieval messages and the
    assistant's documents parts."""
    docs = []
    for m in conversation["messages"]:
        if m.get("role") == "retrieval":
            docs.extend(m["documents"])
        elif m.get("role") == "assistant" and isinstance(m.get("content"), list):
            for part in m["content"]:
                if part.get("type") == "documents":
                    docs.extend(part["documents"])
    return docs


def _keys(shown):
    """Documents (dicts: a chunk counts as its parent) or plain ids -> the set of ids they answer for."""
    return {d if isinstance(d, str) else doc_key(d) for d in shown}


def all_gold_recall(shown, gold_doc_ids):
    """1.0 if every gold passage is among `shown` (documents or ids), else 0.0; None without gold."""
    gold = {str(g) for g in gold_doc_ids or []}
    return float(gold <= _keys(shown)) if gold else None


def any_gold_recall(shown, gold_doc_ids):
    """1.0 if at least one gold passage is among `shown`, else 0.0; None without gold."""
    gold = {str(g) for g in gold_doc_ids or []}
    return float(bool(gold & _keys(shown))) if gold else None


def recall_by_dataset(rows):
    """rows: (dataset, shown documents or ids, gold_doc_ids). -> {dataset: {"n", "all_gold", "any_gold"}, ...,
    "all": {...}} (means over the rows that have gold; datasets sorted, "all" last)."""
    sums = {}
    for dataset, shown, gold in rows:
        a, b = all_gold_recall(shown, gold), any_gold_recall(shown, gold)
        if a is None:
            continue
        for key in (dataset, "all"):
            s = sums.setdefault(key, [0, 0.0, 0.0])
            s[0], s[1], s[2] = s[0] + 1, s[1] + a, s[2] + b
    order = sorted(k for k in sums if k != "all") + (["all"] if "all" in sums else [])
    return {k: {"n": sums[k][0], "all_gold": sums[k][1] / sums[k][0], "any_gold": sums[k][2] / sums[k][0]}
            for k in order}


# -----------------------------------------------------------------------------
# gold REFRAG trajectories


def _manager(retriever, retriever_type):
    if isinstance(retriever, (str, os.PathLike)):
        return RetrievalManager(retriever_type, os.fspath(retriever))
    if not hasattr(retriever, "batch_retrieve"):
        raise ValueError(f"retriever must be a KB directory or have batch_retrieve(), got {type(retriever).__name__}")
    return retriever


class RefragTask(TaskOver):
    """
    Gold REFRAG trajectories from the hops of a multihop-schema task (see the module docstring for the format):
    hop 0 shows the top_k documents retrieved for the question; then, for each hop in order whose supporting
    passage is not shown yet, the assistant writes the hop query (hop_queries) and sees its top_k_per_hop
    documents not shown before; at most max_hops queries; the answer is the canonical answer citing every gold
    passage shown. Hops without a passage (StrategyQA operation steps) or with an empty query ask nothing.
    RAFT-style (Zhang et al., 2024), when a hop query's retrieval misses its passage, the passage is swapped in at
    a seeded random position among the hop's documents (never over another gold passage), so the trajectory
    always reads the evidence it went for; raft=False keeps the retrieval as is. "complete" says whether every hop
    passage ended up shown (False when max_hops cut the hops short). A query that finds nothing new gets an empty
    documents part with the Engine's notice (nanochat.tokenizer.NOTICE_NO_NEW_DOCUMENTS). Every random choice is a
    pure function of (seed, index). retriever: a KB directory (loaded as retriever_type) or any object with
    batch_retrieve (a RetrievalManager, a retriever).
    """

    def __init__(self, base_task, retriever, top_k=5, top_k_per_hop=3, max_hops=3, seed=0, raft=True,
                 retriever_type="bm25", insert_position="before_user", precompute=False, **view):
        super().__init__(base_task, **view)
        for name, value, low in (("top_k", top_k, 1), ("top_k_per_hop", top_k_per_hop, 1), ("max_hops", max_hops, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        self.retriever = _manager(retriever, retriever_type)
        self.top_k, self.top_k_per_hop, self.max_hops = top_k, top_k_per_hop, max_hops
        self.seed, self.raft, self.insert_position = seed, raft, insert_position
        # a hop query's results must still hold top_k_per_hop new documents after removing all shown before it
        self.hop_depth = top_k + max_hops * top_k_per_hop
        self._cache = {}  # base index -> (question results, {hop index: results}), documents as dicts
        if precompute:
            self.precompute()

    def _hop_jobs(self, example):
        """[(hop index, query)] of the hops that can ask for a passage."""
        return [(j, q) for j, (hop, q) in enumerate(zip(example.get("hops") or [], hop_queries(example)))
                if hop.get("doc_id") and q]

    def precompute(self, batch_size=256, show_progress=True):
        """Retrieve for the question and every hop query of each example of this view, batched."""
        todo = [i for i in self._view() if i not in self._cache]
        for s in tqdm(range(0, len(todo), batch_size), desc="refrag retrieval", disable=not show_progress or not todo):
            idx = todo[s:s + batch_size]
            examples = [self.base_task[i] for i in idx]
            questions = self.retriever.batch_retrieve([last_user_message(ex) for ex in examples], self.top_k)
            jobs = [(i, j, q) for i, ex in zip(idx, examples) for j, q in self._hop_jobs(ex)]
            results = self.retriever.batch_retrieve([q for _, _, q in jobs], self.hop_depth) if jobs else []
            for i, res in zip(idx, questions):
                self._cache[i] = (results_to_dicts(res), {})
            for (i, j, _), res in zip(jobs, results):
                self._cache[i][1][j] = results_to_dicts(res)

    def retrieved(self, index, example=None):
        """(hop-0 documents, {hop index: documents retrieved for its query}) of example `index`, cached."""
        if index not in self._cache:
            example = self.base_task[index] if example is None else example
            hop0 = results_to_dicts(self.retriever.retrieve(last_user_message(example), self.top_k))
            self._cache[index] = (hop0, {j: results_to_dicts(self.retriever.retrieve(q, self.hop_depth))
                                         for j, q in self._hop_jobs(example)})
        return self._cache[index]

    def _passage(self, example, doc_id, answer):
        """A hop's passage as the KB holds it (of a chunked one, the chunk with the hop's answer, else the first),
        else from the example's own documents; None if neither has it."""
        kb = getattr(self.retriever, "retriever", self.retriever)
        parts = kb.get_parts(doc_id) if hasattr(kb, "get_parts") else []
        if parts:
            best = next((p for p in parts if answer and answer.lower() in p.content.lower()), parts[0])
            return {**as_doc_dict(best), "score": 0.0}
        for d in example.get("documents") or []:
            if doc_key(d) == doc_id:
                return {**as_doc_dict(d), "score": 0.0}
        return None

    def get_example(self, index):
        example = self.base_task[index]
        hop0, per_hop = self.retrieved(index, example)
        rng = random.Random(self.seed * 1_000_003 + index)
        gold = {str(g) for g in example["gold_doc_ids"]}
        hops = example.get("hops") or []
        shown = [dict(d) for d in hop0[:self.top_k]]
        seen_ids, seen_keys = {d["id"] for d in shown}, {doc_key(d) for d in shown}
        parts, queries = [], 0
        for j, query in self._hop_jobs(example):
            doc_id = hops[j]["doc_id"]
            if doc_id in seen_keys:
                continue  # this hop's passage is already on the page: no query needed
            if queries == self.max_hops:
                break
            new = [dict(d) for d in per_hop[j] if d["id"] not in seen_ids][:self.top_k_per_hop]
            if self.raft and not any(doc_key(d) == doc_id for d in new):
                passage = self._passage(example, doc_id, hops[j].get("answer"))
                if passage is not None and passage["id"] not in seen_ids:
                    free = [p for p, d in enumerate(new) if doc_key(d) not in gold]
                    if len(new) >= self.top_k_per_hop and free:
                        new[rng.choice(free)] = passage
                    else:  # room left, or every document is another gold passage: one more document
                        new.insert(rng.randint(0, len(new)), passage)
            block = {"type": "documents", "documents": new}
            if not new:  # what the Engine shows when a query finds nothing new
                block["notice"] = NOTICE_NO_NEW_DOCUMENTS
            parts += [{"type": "query", "text": query}, block]
            shown += new
            seen_ids.update(d["id"] for d in new)
            seen_keys.update(doc_key(d) for d in new)
            queries += 1
        answer = assistant_text(example["messages"][-1])  # the canonical answer (a conversation ends with it)
        conversation = {k: v for k, v in example.items() if k != "documents"}
        conversation["messages"] = example["messages"][:-1] + [
            {"role": "assistant", "content": parts + [{"type": "text", "text": answer}]}]
        conversation = insert_retrieval_message(conversation, hop0[:self.top_k], self.insert_position)
        conversation["complete"] = all(h["doc_id"] in seen_keys for h in hops if h.get("doc_id"))
        return cite_gold(conversation, shown)


# -----------------------------------------------------------------------------
# single-hop reading examples from the hops


def _contains(text, answer):
    """Normalized word-sequence containment (SQuAD normalization on both sides)."""
    a = normalize_answer(answer)
    return bool(a) and f" {a} " in f" {normalize_answer(text)} "


class HopReadingTask(Task):
    """
    Every usable hop of a multihop-schema task as a single-hop QA example (the QA schema of tasks/qa.py):
    {"messages": [user: hop query, assistant: hop answer], "answers": [hop answer], "gold_doc_ids": [hop passage],
     "documents": the passage among up to num_distractors of the question's other documents (those that do not
     contain the answer), at a seeded random position}. For RAGTask (retrieval from a KB, RAFT) as is; static=True
    puts those documents in a retrieval message with the gold citation (as StaticRAGTask does).
    Skipped, and counted in self.skipped: hops without an answer (StrategyQA steps, HotpotQA comparisons),
    "search key" hops whose question is their passage's title (HotpotQA), hops whose passage is not among the
    question's documents, hops whose answer is not in their passage (normalized words), and repeats of a
    (query, passage) pair already taken.
    """

    def __init__(self, base_task, num_distractors=4, seed=0, static=False, insert_position="before_user", **view):
        super().__init__(**view)
        self.base_task, self.static, self.insert_position = base_task, static, insert_position
        self.skipped = {"no_answer": 0, "search_key": 0, "no_passage": 0, "answer_not_in_passage": 0, "repeat": 0}
        self.examples, taken = [], set()
        for example in base_task:
            docs = {doc_key(d): d for d in example.get("documents") or []}
            for j, (hop, query) in enumerate(zip(example.get("hops") or [], hop_queries(example))):
                passage = docs.get(hop.get("doc_id"))
                if not hop.get("answer"):
                    self.skipped["no_answer"] += 1
                elif passage is None:
                    self.skipped["no_passage"] += 1
                elif normalize_answer(hop["question"]) == normalize_answer(passage.get("title") or ""):
                    self.skipped["search_key"] += 1
                elif not _contains(f"{passage.get('title') or ''}\n{passage['content']}", hop["answer"]):
                    self.skipped["answer_not_in_passage"] += 1
                elif (query, hop["doc_id"]) in taken:
                    self.skipped["repeat"] += 1
                else:
                    taken.add((query, hop["doc_id"]))
                    self.examples.append(self._example(example, j, query, hop, passage, num_distractors, seed))
        self.dataset_counts = {}
        for ex in self.examples:
            self.dataset_counts[ex["dataset"]] = self.dataset_counts.get(ex["dataset"], 0) + 1

    @staticmethod
    def _example(example, j, query, hop, passage, num_distractors, seed):
        qid = f"{example['id']}#hop{j + 1}"
        rng = random.Random(f"{seed}:{qid}")
        others = [d for d in example.get("documents") or [] if doc_key(d) != hop["doc_id"]
                  and not _contains(f"{d.get('title') or ''}\n{d['content']}", hop["answer"])]
        docs = [as_doc_dict(d) for d in rng.sample(others, min(num_distractors, len(others)))]
        docs.insert(rng.randint(0, len(docs)), as_doc_dict(passage))
        return {"id": qid, "dataset": example.get("dataset"),
                "messages": [{"role": "user", "content": query}, {"role": "assistant", "content": hop["answer"]}],
                "answers": [hop["answer"]], "gold_doc_ids": [hop["doc_id"]], "documents": docs}

    @property
    def eval_type(self):
        return "generative"

    def num_examples(self):
        return len(self.examples)

    def get_example(self, index):
        example = copy.deepcopy(self.examples[index])
        if not self.static:
            return example
        conversation = insert_retrieval_message(example, example["documents"], self.insert_position)
        return cite_gold(conversation, example["documents"])

    def evaluate(self, conversation, assistant_response):
        return self.base_task.evaluate(conversation, assistant_response)


# -----------------------------------------------------------------------------
# how far single-shot retrieval is from what the gold hop queries find (the gap REFRAG has to close)


def retrieval_gap(task, retriever, top_k=6, top_k_per_hop=3, max_hops=4, batch_size=256):
    """
    All-/any-gold recall by dataset of three ways to fill the page, with no model:
      "question": the question's top_k (single-shot RAG);
      "hop_queries": the union of each hop query's top_k_per_hop, the question unused (the per-hop oracle of
                     ../shared/data/multihop/README.md);
      "trajectory": the gold REFRAG trajectory without RAFT swaps (the question's top_k, then each needed hop
                    query's top_k_per_hop new documents, at most max_hops queries), plus "mean_shown" documents.
    Examples without hops count for "question" and "trajectory" only.
    """
    retriever = _manager(retriever, "bm25")
    gold_task = RefragTask(task, retriever, top_k=top_k, top_k_per_hop=top_k_per_hop, max_hops=max_hops, raft=False)
    gold_task.precompute(batch_size=batch_size, show_progress=False)
    rows = {"question": [], "hop_queries": [], "trajectory": []}
    shown_counts = []
    for i in range(len(task)):
        example, conversation = task[i], gold_task[i]
        dataset, gold = example.get("dataset"), example["gold_doc_ids"]
        hop0, per_hop = gold_task.retrieved(i, example)
        rows["question"].append((dataset, hop0[:top_k], gold))
        if per_hop:
            union = [d for j in sorted(per_hop) for d in per_hop[j][:top_k_per_hop]]
            rows["hop_queries"].append((dataset, union, gold))
        shown = shown_documents(conversation)
        shown_counts.append(len(shown))
        rows["trajectory"].append((dataset, shown, gold))
    out = {name: recall_by_dataset(r) for name, r in rows.items()}
    out["mean_shown"] = sum(shown_counts) / max(1, len(shown_counts))
    return out


def print_retrieval_gap(gap, top_k, top_k_per_hop):
    """A markdown table of retrieval_gap's result."""
    names = [("question", f"question top-{top_k}"), ("hop_queries", f"gold hop queries top-{top_k_per_hop} each"),
             ("trajectory", "gold trajectory (question + hop queries)")]
    print("| dataset | n | " + " | ".join(f"{label} all-gold / any-gold" for _, label in names) + " |")
    print("|---|---|" + "---|" * len(names))
    for dataset, q in gap["question"].items():
        cells = []
        for name, _ in names:
            r = gap[name].get(dataset)
            cells.append(f"{r['all_gold']:.3f} / {r['any_gold']:.3f} (n={r['n']})" if r else "-")
        print(f"| {dataset} | {q['n']} | " + " | ".join(cells) + " |")
    print(f"documents shown per gold trajectory: {gap['mean_shown']:.2f}")


def main():
    parser = ArgumentParser(description="Retrieval recall of the question alone vs the gold hop queries, on a file in "
                                        "the multihop schema over a KB directory (python -m nanochat.retrieval)")
    parser.add_argument("--data", required=True, help="JSONL file in the multihop schema")
    parser.add_argument("--kb", required=True, help="KB directory")
    parser.add_argument("--top-k", type=int, default=6, help="documents retrieved for the question")
    parser.add_argument("--top-k-per-hop", type=int, default=3, help="documents retrieved per hop query")
    parser.add_argument("--max-hops", type=int, default=4, help="hop queries per gold trajectory")
    args = parser.parse_args()
    gap = retrieval_gap(MultiHopQA(args.data), args.kb, args.top_k, args.top_k_per_hop, args.max_hops)
    print_retrieval_gap(gap, args.top_k, args.top_k_per_hop)


if __name__ == "__main__":
    run_main(main)
