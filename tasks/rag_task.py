"""
RAG tasks: views over QA examples whose conversations carry a "retrieval" message of documents, ready for
tokenizer.render_conversation (documents are masked out of the loss there) and for rag_eval.

    from tasks.rag_task import RAGTask, StaticRAGTask, MultiHopRAGTask, create_rag_task
    train = RAGTask(SomeQATask("train"), knowledge_base_path="kb/", retriever_type="bm25", top_k=5, raft=True)
    train.precompute()                        # retrieve everything once, batched, with a progress bar
    conversation = train[0]                   # {"messages": [retrieval, user, assistant "answer [2]"], ...}
    static = StaticRAGTask("qa_with_docs.jsonl", top_k=5)                  # documents already in the file
    multi = MultiHopRAGTask(task, "kb/", "bm25", top_k_per_hop=3, num_hops=2)

Citations: when an example has gold_doc_ids (the QA schema) and cite=True, the assistant's answer gets " [i]"
for the position(s) of the gold document(s) among the retrieved ones (a chunk "doc#i" of a chunked KB counts as
its parent document "doc"). RAFT (Zhang et al., 2024) for training:
raft=True makes sure the gold document is there (swapped in at a random position when retrieval missed it),
except with probability p_no_gold, where it is removed and the target becomes NO_ANSWER. Every random choice is
a pure function of (seed, index).
"""

import copy
import random

from tqdm import tqdm

from nanochat.metrics import NO_ANSWER
from tasks.common import Task, TaskOver, assistant_text
from tasks.customjson import CustomJSON
from nanochat.retrieval import RetrievalManager, insert_retrieval_message, results_to_dicts, last_user_message
from nanochat.rag_utils import add_citations, as_doc_dict, doc_key, extract_citations_from_response

# -----------------------------------------------------------------------------
# helpers shared by the tasks


def _last_assistant(conversation):
    for m in reversed(conversation["messages"]):
        if m.get("role") == "assistant":
            return m
    return None


def cite_gold(conversation, documents, cite=True):
    """Add " [i]" citing the gold documents' positions to the last assistant answer (unless it already cites)."""
    gold = {str(g) for g in conversation.get("gold_doc_ids") or []}
    msg = _last_assistant(conversation)
    if not cite or not gold or msg is None:
        return conversation
    positions = [i for i, d in enumerate(documents, start=1) if doc_key(d) in gold]
    content = msg["content"]
    text = content if isinstance(content, str) else assistant_text(msg)
    if positions and not extract_citations_from_response(text):
        msg["content"] = add_citations(content, positions)
    return conversation


def set_no_answer(conversation):
    """The target becomes NO_ANSWER (the documents do not hold the answer)."""
    msg = _last_assistant(conversation)
    if msg is not None:
        msg["content"] = NO_ANSWER
    conversation["answers"] = [NO_ANSWER]
    return conversation


def _base_manager(retriever, knowledge_base_path, retriever_type):
    if retriever is not None:
        return retriever
    if knowledge_base_path is None:
        raise ValueError("a RAG task needs knowledge_base_path (a KB directory) or retriever= (a RetrievalManager)")
    return RetrievalManager(retriever_type, knowledge_base_path)


# -----------------------------------------------------------------------------
# RAGTask: retrieval from a KB, cached once per example


class RAGTask(TaskOver):

    def __init__(self, base_task, knowledge_base_path=None, retriever_type="bm25", top_k=5,
                 insert_position="before_user", retriever=None, raft=False, p_no_gold=0.2, seed=0, cite=True,
                 precompute=False, **view):
        super().__init__(base_task, **view)
        if not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be an int >= 1, got {top_k!r}")
        if not 0.0 <= p_no_gold <= 1.0:
            raise ValueError(f"p_no_gold must be in [0, 1], got {p_no_gold}")
        self.retriever = _base_manager(retriever, knowledge_base_path, retriever_type)
        self.top_k, self.insert_position = top_k, insert_position
        self.raft, self.p_no_gold, self.seed, self.cite = raft, p_no_gold, seed, cite
        # RAFT may drop the gold documents, so it retrieves a few extra to refill top_k
        self.depth = top_k + 3 if raft else top_k
        self._cache = {}  # base index -> retrieved documents (dicts)
        if precompute:
            self.precompute()

    def precompute(self, batch_size=256, show_progress=True):
        """Retrieve for every example of this view not yet cached, batch_size queries per batch_retrieve call."""
        todo = [i for i in self._view() if i not in self._cache]
        for s in tqdm(range(0, len(todo), batch_size), desc="retrieval", disable=not show_progress or not todo):
            idx = todo[s:s + batch_size]
            queries = [last_user_message(self.base_task[i]) for i in idx]
            for i, results in zip(idx, self.retriever.batch_retrieve(queries, self.depth)):
                self._cache[i] = results_to_dicts(results)

    def retrieved(self, index, example=None):
        if index not in self._cache:
            example = self.base_task[index] if example is None else example
            self._cache[index] = results_to_dicts(self.retriever.retrieve(last_user_message(example), self.depth))
        return self._cache[index]

    def _gold_document(self, example, gold):
        """A gold document's text: from the example's own documents, else from the KB (of a chunked gold
        document, the chunk that contains an answer, else its first chunk)."""
        for d in example.get("documents") or []:
            if doc_key(as_doc_dict(d)) in gold:
                return {**as_doc_dict(d), "score": 0.0}
        kb = getattr(self.retriever, "retriever", self.retriever)
        answers = [a.lower() for a in example.get("answers") or [] if isinstance(a, str) and a.strip()]
        for g in sorted(gold):
            parts = kb.get_parts(g) if hasattr(kb, "get_parts") else []
            if parts:
                best = next((p for p in parts if any(a in p.content.lower() for a in answers)), parts[0])
                return {**as_doc_dict(best), "score": 0.0}
        return None

    def get_example(self, index):
        example = self.base_task[index]
        docs = [dict(d) for d in self.retrieved(index, example)]
        gold = {str(g) for g in example.get("gold_doc_ids") or []}
        no_answer = False
        if self.raft and gold:
            rng = random.Random(self.seed * 1_000_003 + index)
            if rng.random() < self.p_no_gold:
                docs, no_answer = [d for d in docs if doc_key(d) not in gold], True
            elif not any(doc_key(d) in gold for d in docs[:self.top_k]):
                g = self._gold_document(example, gold)
                docs = docs[:self.top_k]
                if g is None:
                    no_answer = True  # the gold text is nowhere to be found: the documents cannot answer
                elif len(docs) < self.top_k:
                    docs.insert(rng.randint(0, len(docs)), g)
                else:
                    docs[rng.randrange(len(docs))] = g
        docs = docs[:self.top_k]
        conversation = insert_retrieval_message(example, docs, self.insert_position)
        return set_no_answer(conversation) if no_answer else cite_gold(conversation, docs, self.cite)


# -----------------------------------------------------------------------------
# StaticRAGTask: documents already attached to each example


class StaticRAGTask(CustomJSON):
    """QA examples from a JSONL file (our QA schema) whose pre-retrieved "documents" become the retrieval message."""

    def __init__(self, filepath, top_k=None, cite=True, insert_position="before_user", **view):
        self.top_k, self.cite, self.insert_position = top_k, cite, insert_position
        super().__init__(filepath, **view)

    def validate(self, example, where):
        super().validate(example, where)
        docs = example.get("documents")
        if not isinstance(docs, list):
            raise ValueError(f"{where}: a StaticRAGTask example needs a 'documents' list")
        try:
            example["documents"] = [as_doc_dict(d) for d in docs]
        except (ValueError, AttributeError) as e:
            raise ValueError(f"{where}: bad document ({e})") from None

    def get_example(self, index):
        example = super().get_example(index)
        docs = example["documents"][:self.top_k]
        conversation = insert_retrieval_message(example, docs, self.insert_position)
        return cite_gold(conversation, docs, self.cite)


# -----------------------------------------------------------------------------
# MultiHopRAGTask: hop 2 retrieves with what hop 1 found


def _first_sentence(text, max_chars=200):
    end = min([i for i in (text.find(". "), text.find("\n")) if i >= 0] or [len(text)])
    return text[:min(end + 1, max_chars)].strip()


def make_hop_query(question, previous_docs):
    """The next hop's query: the question plus the titles (first sentences when untitled) of the previous hop's
    documents (a bridge-entity heuristic; REFRAG replaces this with a query the model writes)."""
    return " ".join([question] + [d["title"] or _first_sentence(d["content"]) for d in previous_docs])


class MultiHopRAGTask(TaskOver):

    def __init__(self, base_task, knowledge_base_path=None, retriever_type="bm25", top_k_per_hop=3, num_hops=2,
                 retriever=None, insert_position="before_user", cite=True, hop_query_fn=make_hop_query, **view):
        super().__init__(base_task, **view)
        if top_k_per_hop < 1 or num_hops < 1:
            raise ValueError(f"need top_k_per_hop >= 1 and num_hops >= 1, got {top_k_per_hop}, {num_hops}")
        self.retriever = _base_manager(retriever, knowledge_base_path, retriever_type)
        self.top_k_per_hop, self.num_hops = top_k_per_hop, num_hops
        self.insert_position, self.cite, self.hop_query_fn = insert_position, cite, hop_query_fn
        self._cache = {}

    def retrieve_hops(self, question):
        """[[hop-1 docs], [hop-2 docs], ...]: each hop's documents are new (not retrieved by an earlier hop)."""
        hops, seen, query = [], set(), question
        for h in range(1, self.num_hops + 1):
            results = results_to_dicts(self.retriever.retrieve(query, self.top_k_per_hop + len(seen)))
            new = [d for d in results if d["id"] not in seen][:self.top_k_per_hop]
            for d in new:
                d["metadata"] = {"hop": h}
                seen.add(d["id"])
            hops.append(new)
            query = self.hop_query_fn(question, new)
        return hops

    def precompute(self, show_progress=True):
        for i in tqdm(list(self._view()), desc="multi-hop retrieval", disable=not show_progress):
            self.retrieved(i)

    def retrieved(self, index, example=None):
        if index not in self._cache:
            example = self.base_task[index] if example is None else example
            self._cache[index] = [d for hop in self.retrieve_hops(last_user_message(example)) for d in hop]
        return self._cache[index]

    def get_example(self, index):
        example = self.base_task[index]
        docs = [copy.deepcopy(d) for d in self.retrieved(index, example)]
        conversation = insert_retrieval_message(example, docs, self.insert_position)
        return cite_gold(conversation, docs, self.cite)


RAG_TASKS = {"rag": RAGTask, "static": StaticRAGTask, "multihop": MultiHopRAGTask}


def create_rag_task(kind="rag", **kwargs):
    """kind: rag (RAGTask), static (StaticRAGTask) or multihop (MultiHopRAGTask); kwargs go to the class."""
    if kind not in RAG_TASKS:
        raise ValueError(f"unknown RAG task kind {kind!r}; choose from {', '.join(RAG_TASKS)}")
    return RAG_TASKS[kind](**kwargs)
