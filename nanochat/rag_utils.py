"""
RAG helpers: prompt formatting, retrieval metrics, citations, a hallucination check, a RAG reward and RAFT
training examples. Pure Python, no model needed.

    from nanochat.rag_utils import compute_ndcg, extract_citations_from_response, compute_rag_reward
    compute_ndcg(["d3", "d1"], {"d1": 1}, k=10)                  # 1 / log2(3) = 0.63
    extract_citations_from_response("Paris [1][3]. See [DOC_2].")  # [1, 3, 2]
    compute_rag_reward("Paris [1]", ["Paris"], docs, gold_doc_ids=["wiki-7"])

Documents anywhere here are dicts {"id", "title", "content", ...} (a retrieval message's documents) or
nanochat.retrieval.Document objects. Answer metrics (normalize_answer, exact_match, token_f1, strip_citations,
NO_ANSWER) live in nanochat/metrics.py.
"""

import re
import math
import random

from nanochat.metrics import NO_ANSWER, strip_citations, citation_numbers, answer_scores, is_abstention
from nanochat.retrieval import tokenize, insert_retrieval_message, as_doc_dict, doc_key  # document-to-dict lives there

# -----------------------------------------------------------------------------
# documents and prompts


def _format_doc(number, doc, max_chars):
    content = doc["content"]
    if max_chars is not None and len(content) > max_chars:
        content = content[:max_chars].rstrip() + "..."
    return f"[{number}] Title: {doc['title']}\nContent: {content}" if doc["title"] else f"[{number}] Content: {content}"


def format_documents_for_prompt(documents, max_chars_per_doc=None):
    """Numbered '[1] Title: ...\\nContent: ...' blocks separated by blank lines (the tokenizer's layout, as
    plain text for CLI display and prompts without special tokens)."""
    docs = [as_doc_dict(d) for d in documents]
    return "\n\n".join(_format_doc(i, d, max_chars_per_doc) for i, d in enumerate(docs, start=1))


def format_multihop_documents(hops, max_chars_per_doc=None):
    """hops: a list of lists of documents. 'Hop h:' sections, documents numbered continuously across hops."""
    sections, number = [], 1
    for h, hop in enumerate(hops, start=1):
        blocks = []
        for d in hop:
            blocks.append(_format_doc(number, as_doc_dict(d), max_chars_per_doc))
            number += 1
        sections.append(f"Hop {h}:\n" + "\n\n".join(blocks))
    return "\n\n".join(sections)


def render_rag_conversation_for_tokenizer(question, documents, answer=None, system=None,
                                          insert_position="before_user"):
    """
    A conversation dict for tokenizer.render_conversation (with answer) or render_for_completion (without):
    [system], user (question), [assistant (answer)], with the retrieval message placed by
    nanochat.retrieval.insert_retrieval_message (for a single question both positions give
    [system], retrieval, user).
    """
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"question must be a non-empty string, got {question!r}")
    messages = [{"role": "system", "content": system}] if system is not None else []
    messages.append({"role": "user", "content": question})
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return insert_retrieval_message({"messages": messages}, [as_doc_dict(d) for d in documents], insert_position)


# -----------------------------------------------------------------------------
# retrieval metrics (binary relevance unless a gain dict is given; trec_eval conventions)


def _unique(ids):
    seen, out = set(), []
    for i in ids:
        if i not in seen:
            seen.add(i)
            out.append(i)
    return out


def compute_retrieval_recall(retrieved_ids, relevant_ids, k):
    """|top-k ∩ relevant| / |relevant| (0.0 when there is nothing relevant)."""
    relevant = set(relevant_ids)
    if not relevant:
        return 0.0
    return len(set(_unique(retrieved_ids)[:k]) & relevant) / len(relevant)


def compute_retrieval_precision(retrieved_ids, relevant_ids, k):
    """|top-k ∩ relevant| / k (trec_eval's P@k: fewer than k retrieved still divides by k)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return len(set(_unique(retrieved_ids)[:k]) & set(relevant_ids)) / k


def compute_ndcg(retrieved_ids, relevance, k):
    """
    nDCG@k with linear gains (as trec_eval / pytrec_eval ndcg_cut): DCG = sum_i rel_i / log2(i + 1) over the
    top k, divided by the DCG of the ideal ordering of the judged gains. relevance: {id: gain}, or an iterable
    of relevant ids (gain 1). 0.0 when nothing is relevant.
    """
    if not isinstance(relevance, dict):
        relevance = {i: 1 for i in relevance}
    dcg = sum(relevance.get(d, 0) / math.log2(i + 2) for i, d in enumerate(_unique(retrieved_ids)[:k]))
    ideal = sorted((g for g in relevance.values() if g > 0), reverse=True)[:k]
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def compute_mrr(retrieved_ids, relevant_ids, k=None):
    """1 / rank of the first relevant document within the top k (all when k is None); 0.0 if none."""
    relevant = set(relevant_ids)
    ranked = _unique(retrieved_ids)
    for rank, d in enumerate(ranked if k is None else ranked[:k], start=1):
        if d in relevant:
            return 1.0 / rank
    return 0.0


# -----------------------------------------------------------------------------
# citations

def extract_citations_from_response(text):
    """The document numbers a response cites, in order of first appearance, without repeats (a citation is a run
    of [n] markers that ends a sentence, a clause or the answer: nanochat/metrics.py)."""
    return citation_numbers(text)


def add_citations(content, numbers):
    """Append ' [1, 3]' to an assistant answer (a string, or a list of parts: the last text part)."""
    if not numbers:
        return content
    marker = " [" + ", ".join(str(n) for n in numbers) + "]"
    if isinstance(content, str):
        return content.rstrip() + marker
    parts = [dict(p) for p in content]
    for p in reversed(parts):
        if p.get("type") == "text":
            p["text"] = p["text"].rstrip() + marker
            return parts
    return parts + [{"type": "text", "text": marker.strip()}]


# -----------------------------------------------------------------------------
# hallucination check and reward

# answer words that are a verdict rather than a claim about the documents' content
_VERDICT_WORDS = frozenset({"yes", "maybe", "true", "false"})


def _content_tokens(text):
    # crude plural folding ("documents" ~ "document") so inflection is not counted as unsupported
    return [w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w for w in tokenize(text)]


def check_hallucination(answer, documents, threshold=0.5):
    """
    Is the answer's content supported by the documents? Content tokens of the answer (lower-cased words minus
    stop words, citations stripped, plurals folded) that appear in none of the documents it cites (all given
    documents when it cites none, or cites only numbers out of range) are unsupported. hallucinated when
    their fraction exceeds threshold. The NO_ANSWER string is never a hallucination.
    Returns {"hallucinated": bool, "unsupported_fraction": float, "unsupported_tokens": [...]}.
    """
    if is_abstention(answer):
        return {"hallucinated": False, "unsupported_fraction": 0.0, "unsupported_tokens": []}
    docs = [as_doc_dict(d) for d in documents]
    cited = [n for n in extract_citations_from_response(answer) if 1 <= n <= len(docs)]
    support_docs = [docs[n - 1] for n in cited] if cited else docs
    support = set()
    for d in support_docs:
        support.update(_content_tokens(d["title"] + "\n" + d["content"]))
    tokens = [t for t in _content_tokens(strip_citations(answer)) if t not in _VERDICT_WORDS]
    unsupported = _unique(t for t in tokens if t not in support)
    fraction = sum(t not in support for t in tokens) / len(tokens) if tokens else 0.0
    return {"hallucinated": fraction > threshold, "unsupported_fraction": fraction, "unsupported_tokens": unsupported}


DEFAULT_REWARD_WEIGHTS = {"em": 0.5, "f1": 0.5, "citation": 0.25, "hallucination": 0.5, "format": 0.5}


def citation_correctness(cited, documents, gold_doc_ids):
    """
    Fraction of the cited numbers that point to gold documents; 0.0 if any cited number is out of range (citing a
    document that is not there is a fabrication). Citing nothing earns no credit (0.0), whatever was retrieved:
    otherwise a model that never cites scores perfectly whenever retrieval missed.
    """
    gold = {str(g) for g in gold_doc_ids}
    docs = [as_doc_dict(d) for d in documents]
    if not cited or any(not 1 <= n <= len(docs) for n in cited):
        return 0.0
    gold_numbers = {i for i, d in enumerate(docs, start=1) if doc_key(d) in gold}
    return sum(n in gold_numbers for n in cited) / len(cited)


def compute_rag_reward(response, answers, documents, gold_doc_ids=None, weights=None, format_errors=None):
    """
    reward = w_em * EM + w_f1 * F1 + w_cite * citation_correctness - w_hall * hallucinated - w_format * malformed
    with default weights em 0.5, f1 0.5, citation 0.25, hallucination 0.5, format 0.5 (a correct, correctly cited,
    supported, well-formed answer scores 1.25; a fabricated wrong one -0.5). EM/F1 are on the response with
    citations stripped (the gold answers normalised the same way). documents: every document the answer could
    cite, in number order ([1] first; for a multi-hop trajectory all hops, numbered continuously). The citation
    term is skipped (None) when gold_doc_ids is None. format_errors: the problems the Engine found in a
    trajectory (unbalanced query tags, no answer, hop cap exceeded: Engine trace "format_errors"); any -> malformed.
    Returns every component.
    """
    w = {**DEFAULT_REWARD_WEIGHTS, **(weights or {})}
    unknown = set(w) - set(DEFAULT_REWARD_WEIGHTS)
    if unknown:
        raise ValueError(f"unknown reward weights {sorted(unknown)}; known: {sorted(DEFAULT_REWARD_WEIGHTS)}")
    answers = [answers] if isinstance(answers, str) else list(answers)
    scores = answer_scores(response, answers)
    cited = extract_citations_from_response(response)
    cite = None if gold_doc_ids is None else citation_correctness(cited, documents, gold_doc_ids)
    hall = check_hallucination(response, documents)
    malformed = float(bool(format_errors))
    reward = (w["em"] * scores["em"] + w["f1"] * scores["f1"] + w["citation"] * (cite or 0.0)
              - w["hallucination"] * hall["hallucinated"] - w["format"] * malformed)
    return {"reward": reward, "em": scores["em"], "f1": scores["f1"], "citation": cite,
            "hallucination": float(hall["hallucinated"]), "unsupported_fraction": hall["unsupported_fraction"],
            "citations": cited, "malformed": malformed}


# -----------------------------------------------------------------------------
# RAFT training examples (Zhang et al., 2024, "RAFT: Adapting Language Model to Domain Specific RAG")


def create_rag_training_example(question, answer, gold_docs, distractor_docs, num_docs=5, p_no_gold=0.2,
                                rng=None, answers=None, system=None):
    """
    A QA conversation in the RAFT style: the gold document(s) shuffled among distractors, target "answer [i]"
    citing the gold positions; with probability p_no_gold the gold documents are left out (only distractors)
    and the target is NO_ANSWER, which teaches the model to abstain rather than guess. rng: a random.Random
    (pass one seeded per example for determinism). Returns the conversation with QA keys answers,
    gold_doc_ids (those present) and documents.
    """
    if not 0.0 <= p_no_gold <= 1.0:
        raise ValueError(f"p_no_gold must be in [0, 1], got {p_no_gold}")
    if num_docs < 1:
        raise ValueError(f"num_docs must be >= 1, got {num_docs}")
    rng = rng or random.Random()
    gold = [as_doc_dict(d) for d in gold_docs]
    if not gold:
        raise ValueError("create_rag_training_example needs at least one gold document")
    gold_ids = {d["id"] for d in gold}
    distractors = [d for d in (as_doc_dict(x) for x in distractor_docs) if d["id"] not in gold_ids]
    if rng.random() < p_no_gold:
        docs = rng.sample(distractors, min(num_docs, len(distractors)))
        target, present, answers = NO_ANSWER, [], [NO_ANSWER]
    else:
        gold = gold[:num_docs]
        docs = gold + rng.sample(distractors, min(num_docs - len(gold), len(distractors)))
        rng.shuffle(docs)
        positions = [i for i, d in enumerate(docs, start=1) if d["id"] in gold_ids]
        target, present = add_citations(answer, positions), [d["id"] for d in gold]
        answers = list(answers) if answers is not None else [answer]
    conversation = render_rag_conversation_for_tokenizer(question, docs, answer=target, system=system)
    conversation.update({"answers": answers, "gold_doc_ids": present, "documents": docs})
    return conversation
