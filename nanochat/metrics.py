"""
Answer metrics, the single home for the whole repo (tasks/, nanochat/rag_utils.py, rag_eval, the RL reward):
SQuAD v1.1 normalisation, exact match, token F1, and what counts as a citation.

    from nanochat.metrics import NO_ANSWER, normalize_answer, exact_match, token_f1, strip_citations
    exact_match(strip_citations("1998 [1]."), ["1998"])         # True
    strip_citations("range(2) gives [0, 1] as a list [2].")     # "range(2) gives [0, 1] as a list."
    citation_numbers("Paris [1][3]. Berlin [DOC_2]")            # [1, 3, 2]

A citation is a run of bracketed document numbers ([1], [1, 3], [1][2], [DOC_1], [Doc 2; doc 3]) that ends a
sentence, a clause or the answer: it is followed by the end of the text, a newline, or punctuation (. ! ? ; : ,)
and whitespace. Bracketed text inside an answer ("gives [0, 1] as a list") is content, not a citation, and a run
that starts a line keeps its first group as content ("[0, 1] [2]" -> "[0, 1]"). answer_scores strips citations
from the prediction and from the gold answers alike, so both sides are normalised the same way.
"""

import re
import string
from collections import Counter

# The canonical answer to a question the documents cannot answer (SQuAD v2 unanswerable questions, retrieval
# failures, RAFT's no-gold examples). Everyone uses this exact string so a model can be trained to abstain and
# scored on it.
NO_ANSWER = "The documents do not contain the answer."

# -----------------------------------------------------------------------------
# citations

# one bracket group: [1]  [1, 3]  [1;2]  [DOC_1]  [Doc 2, doc 3]  [document-4]
_NUM = r"(?:doc(?:ument)?[\s_-]*)?\d+"
CITATION_GROUP = re.compile(rf"\[\s*{_NUM}(?:\s*[,;]\s*{_NUM})*\s*\]", re.IGNORECASE)
_BETWEEN = re.compile(r"[\s,;]*")  # what may separate the groups of one run: "[1][2]", "[1], [2]"
_ENDS_CLAUSE = re.compile(r"\s*(?:$|\n|[.!?;:,](?:\s|$))")


def citation_spans(text):
    """The citation groups of text, as re.Match objects in order (see the module docstring for the rule)."""
    groups = list(CITATION_GROUP.finditer(text))
    spans, i = [], 0
    while i < len(groups):
        j = i
        while j + 1 < len(groups) and _BETWEEN.fullmatch(text, groups[j].end(), groups[j + 1].start()):
            j += 1
        run = groups[i:j + 1]
        if _ENDS_CLAUSE.match(text, run[-1].end()):
            line_before = text[:run[0].start()].rsplit("\n", 1)[-1]
            spans.extend(run[1:] if not line_before.strip() else run)
        i = j + 1
    return spans


def citation_numbers(text):
    """The document numbers text cites, in order of first appearance, without repeats."""
    numbers = []
    for m in citation_spans(text):
        for n in re.findall(r"\d+", m.group(0)):
            if int(n) not in numbers:
                numbers.append(int(n))
    return numbers


def strip_citations(text):
    """text without its citations (and the separators before them), whitespace squashed."""
    spans = citation_spans(text)
    if not spans:
        return " ".join(text.split())
    out, pos = [], 0
    for m in spans:
        start = m.start()
        while start > pos and text[start - 1] in " \t,;":  # the space (and run separators) before a group
            start -= 1
        out.append(text[pos:start])
        pos = m.end()
    out.append(text[pos:])
    return " ".join("".join(out).split())


# -----------------------------------------------------------------------------
# answer metrics (SQuAD v1.1 evaluation conventions)

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s):
    """Lowercase, drop ASCII punctuation, drop the articles a/an/the, squash whitespace (the SQuAD order)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def _as_list(answers):
    return [answers] if isinstance(answers, str) else list(answers)


def exact_match(pred, answers):
    """True if the normalized prediction equals any normalized answer. With no answers (SQuAD v2 unanswerable),
    the reference is the empty string, as in the official v2 script."""
    answers = _as_list(answers) or [""]
    p = normalize_answer(pred)
    return any(p == normalize_answer(a) for a in answers)


def _f1(pred_tokens, gold_tokens):
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)  # both empty -> 1, one empty -> 0
    common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if common == 0:
        return 0.0
    precision = common / len(pred_tokens)
    recall = common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1(pred, answers):
    """Max over answers of the F1 between the bags of normalized tokens (float in [0, 1])."""
    answers = _as_list(answers) or [""]
    p = normalize_answer(pred).split()
    return max(_f1(p, normalize_answer(a).split()) for a in answers)


def is_abstention(text):
    """Does the answer say the documents do not hold the answer (NO_ANSWER, citations and case aside)?"""
    return normalize_answer(strip_citations(text)) == normalize_answer(NO_ANSWER)


def answer_scores(pred, answers):
    """{"em", "f1"} of a response against gold answers, citations stripped on both sides."""
    pred = strip_citations(pred)
    gold = [strip_citations(a) for a in _as_list(answers)]
    return {"em": float(exact_match(pred, gold)), "f1": float(token_f1(pred, gold))}
