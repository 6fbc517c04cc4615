"""
Model-free answer baselines: what a fixed rule scores on the same questions and the same documents a model sees.
Every quality table prints them beside the model rows (scripts/rag_eval.py), so a model's EM reads as "above the
best rule that does not read" or not. Each rule gets the question (and its question_type, when the file has one)
and the documents shown, in rank order; none sees the gold answer.

    from tasks.baselines import baseline_answers, oracle_documents, BASELINE_RULES
    got = baseline_answers(example, documents)   # {"first_sentence": ..., "header_line": ..., "overlap_sentence": ...,
                                                  #  "per_type_rule": ...}
    oracle = baseline_answers(example, oracle_documents(example, documents))["per_type_rule"]
    python -m tasks.baselines --qa data/builtin/qa_dev.jsonl                      # gold document first
    python -m tasks.baselines --qa data/builtin/qa_dev.jsonl --kb data/builtin/kb --top-k 3   # retrieved documents

The rules (documents are {"id", "title", "content"} dicts; content of a built-in KB document is its header line,
a blank line, then the docstring):
    first_sentence    the first prose sentence of document 1 (a leading header/signature line skipped)
    header_line       the first line of document 1
    overlap_sentence  the sentence (or header line) of document 1 that shares the most words with the question
                      (nanochat.retrieval.tokenize: lower-cased words minus stop words; the first one on a tie)
    per_type_rule     the best simple extractive rule per question type we could write: it picks the document
                      whose title matches the `names` in the question (else document 1), reads the question type
                      (the example's question_type, else guessed from the wording), and pulls the span that type
                      asks for: a parameter's default from the header, the text after "Return", the exception
                      after "raises", the consequence of "If <the question's condition>, ...", and so on; for an
                      unknown type (another dataset, multi-hop) the overlap sentence of that document
    oracle            (with oracle_documents) the gold document first, then per_type_rule: what reading the right
                      document with that rule gets, an upper bound for the rule, not for a model
COPY_RULES are the three fixed copy rules; tasks/stdlib_qa.py builds its questions so that each of them, and the
best of them chosen per question, stays far below the oracle.
"""

import re
import json
from collections import Counter, defaultdict

from nanochat.common import ArgumentParser, run_main, read_jsonl
from nanochat.metrics import exact_match, token_f1
from nanochat.retrieval import RetrievalManager, tokenize, doc_key, results_to_dicts
from tasks.stdlib_docs import (SIG_LINE, EXCEPTION, first_sentence as docstring_first_sentence, doc_sentences,
                               signature_params, returns_statement, raise_statements, condition_statements,
                               param_statement, xref_statements)

COPY_RULES = ("first_sentence", "header_line", "overlap_sentence")
BASELINE_RULES = COPY_RULES + ("per_type_rule",)

# -----------------------------------------------------------------------------
# reading one document


def header_line(doc):
    """The first non-blank line of the document's content."""
    for line in doc["content"].splitlines():
        if line.strip():
            return line.strip()
    return ""


def _is_header(line):
    """A signature header: "dedent(text)", "StringIO.getvalue()", "class Vec2D(x, y)"."""
    line = line.strip()
    return bool(SIG_LINE.match(line.removeprefix("class ")))


def _body(doc):
    """The content without a leading header line."""
    content = doc["content"].strip()
    first, _, rest = content.partition("\n")
    return rest.strip() if _is_header(first) else content


def first_sentence(doc):
    """The first prose sentence of the document (tasks/stdlib_docs.first_sentence), a header line skipped."""
    return docstring_first_sentence(_body(doc))


def overlap_sentence(question, doc):
    """The unit of the document (its header line if it has one, then every sentence) with the most question words
    in it."""
    words = set(tokenize(question))
    header = header_line(doc)
    units = ([header] if _is_header(header) else []) + doc_sentences(_body(doc))
    best, best_score = "", -1
    for unit in units:
        score = len(words & set(tokenize(unit)))
        if score > best_score:
            best, best_score = unit, score
    return best

# -----------------------------------------------------------------------------
# the per-type rule


def question_names(question):
    """The `code` names of a question, in order."""
    return re.findall(r"`([^`]+)`", question)


def pick_document(question, documents):
    """The document whose title matches the question's `names` best (the full title 3, a name the title ends
    with 2, a dotted prefix or a component of the title 1), the first one on a tie; document 1 when none does."""
    names = question_names(question)
    best, best_score = documents[0] if documents else None, 0
    for doc in documents:
        title = doc.get("title") or doc.get("id") or ""
        parts = title.split(".")
        score = 0
        for name in names:
            if name == title:
                score += 3
            elif title.endswith("." + name):
                score += 2
            elif title.startswith(name + ".") or name in parts:
                score += 1
        if score > best_score:
            best, best_score = doc, score
    return best


# question_type -> a pattern of its wording (tasks/stdlib_qa.py's templates), for files without question_type;
# tried in this order (the wording of raises last among the reading types, desc last: "What is ...?" is the most
# generic)
TYPE_PATTERNS = [
    ("default", r"default value of the `|default to in\b|is called without `"),
    ("returns", r"\breturn value of\b|\bWhat does .* return\?|\bget back from\b"),
    ("raises_when", r"\braise `[^`]+`\?$"),
    ("condition", r"\bwhat happens (?:if|when|unless)\b|\bsay happens (?:if|when|unless)\b"),
    ("param", r"\bargument of\b|\bpassed as `|^In .*, what is `[^`]+`\?$"),
    ("xref", r"\binstead\b|\brefer to\?|\bsend the reader\b|\bcompared to\b|\bequivalent or similar\b|\bwhat calls\b"),
    ("raises", r"\bexception\b"),
    ("sig", r"\bsignature\b"),
    ("module", r"\bstandard library module\b"),
    ("desc", r"^What does .* do\?$|\bused for\?|^Briefly describe\b|^In one sentence\b|^What is .+\?$"),
]


def question_type(example):
    """The example's question_type, else the first TYPE_PATTERNS entry its question matches, else None."""
    qtype = example.get("question_type")
    if isinstance(qtype, str) and qtype:
        return qtype
    question = _question(example)
    for qtype, pattern in TYPE_PATTERNS:
        if re.search(pattern, question):
            return qtype
    return None


def _question(example):
    users = [m["content"] for m in example.get("messages", []) if m.get("role") == "user"
             and isinstance(m.get("content"), str)]
    return users[-1] if users else example.get("question", "")


def _param_of(question, header):
    """The question's `name` that is a parameter of the header line (the last one: "In `f`, what is `p`?")."""
    params = {n.lstrip("*"): d for n, d in signature_params(header)}
    names = [n for n in question_names(question) if n in params]
    return (names[-1], params[names[-1]]) if names else (None, None)


def per_type_rule(example, documents):
    """The span the question's type asks for, read from pick_document's document (see the module docstring)."""
    if not documents:
        return ""
    question = _question(example)
    qtype = question_type(example)
    doc = pick_document(question, documents)
    header, body = header_line(doc), _body(doc)
    sents = doc_sentences(body)
    if qtype == "desc":
        return first_sentence(doc)
    if qtype == "sig":
        return header.removeprefix("class ")
    if qtype == "module":
        title, names = doc.get("title") or doc.get("id") or "", question_names(question)
        name = next((n for n in names if title.endswith("." + n)), None)
        return title[:-len(name) - 1] if name else title.rsplit(".", 1)[0]
    if qtype == "default":
        _, default = _param_of(question, header)
        return default if default is not None else "None"
    if qtype == "returns":
        returned = returns_statement(sents)
        return returned[0] if returned else first_sentence(doc)
    if qtype in ("raises", "raises_when"):
        raised = raise_statements(sents)
        if qtype == "raises":
            if raised:
                return raised[0][0]
            m = re.search(rf"\b({EXCEPTION})\b", body)
            return m.group(1) if m else ""
        wanted = [n.rsplit(".", 1)[-1] for n in question_names(question)]
        conds = [c for exc, c, _ in raised if c and exc.rsplit(".", 1)[-1] in wanted] or [c for _, c, _ in raised if c]
        return conds[0] if conds else overlap_sentence(question, doc)
    if qtype == "condition":
        m = re.search(r"\b(?:if|when|unless) (.+?)\?$", question)
        wanted = m.group(1).lower() if m else ""
        for kw, cond, consequence, s in condition_statements(sents):
            if cond.lower() == wanted:
                return consequence
        best = overlap_sentence(question, doc)
        return best.split(", ", 1)[1].rstrip(".") if ", " in best else best
    if qtype == "param":
        p, _ = _param_of(question, header)
        names = [p] if p else question_names(question)[::-1]
        for name in names:
            described = param_statement(body, sents, name)
            if described:
                return described[2]
        return overlap_sentence(question, doc)
    if qtype == "xref":
        relation = ("instead" if "instead" in question else "called" if "what calls" in question
                    else "like" if re.search(r"compared to|equivalent or similar", question) else "see")
        own = (doc.get("title") or "").rsplit(".", 1)[-1]
        found = [name for _, name, _, _ in xref_statements(sents, (relation,)) if name != own]
        return found[0] if found else overlap_sentence(question, doc)
    return overlap_sentence(question, doc)

# -----------------------------------------------------------------------------
# entry points


def baseline_answers(example, documents):
    """{rule: answer string} for every rule of BASELINE_RULES on these documents (rank order); "" when there are
    no documents."""
    if not documents:
        return {rule: "" for rule in BASELINE_RULES}
    question, top = _question(example), documents[0]
    return {"first_sentence": first_sentence(top), "header_line": header_line(top),
            "overlap_sentence": overlap_sentence(question, top), "per_type_rule": per_type_rule(example, documents)}


def oracle_documents(example, documents):
    """The gold documents first (in gold_doc_ids order; from the example's own "documents" when it has them, else
    from those shown), then the shown documents that are not gold, in their order."""
    gold = [str(g) for g in example.get("gold_doc_ids") or []]
    pool = {}
    for d in list(documents) + list(example.get("documents") or []):
        pool.setdefault(doc_key(d), d)
    first = [pool[g] for g in gold if g in pool]
    return first + [d for d in documents if doc_key(d) not in gold]


def score_baselines(examples, documents_of):
    """{"all": {rule: {"em", "f1"}}, "by_type": {question_type: {rule: ...}}, "best_copy_rule": em, "n": ...}:
    EM/F1 (%) of every rule and of the oracle; documents_of(example) -> the documents shown for it."""
    sums, counts = defaultdict(Counter), Counter()
    for ex in examples:
        docs = documents_of(ex)
        got = baseline_answers(ex, docs)
        got["oracle"] = baseline_answers(ex, oracle_documents(ex, docs))["per_type_rule"]
        qtype = question_type(ex) or "unknown"
        for key in ("all", qtype):
            counts[key] += 1
            copy_hit = False
            for rule, answer in got.items():
                em = exact_match(answer, ex["answers"])
                copy_hit |= em and rule in COPY_RULES
                sums[key][rule + ":em"] += em
                sums[key][rule + ":f1"] += token_f1(answer, ex["answers"])
            sums[key]["best_copy_rule:em"] += copy_hit
    table = {}
    for key, n in counts.items():
        table[key] = {"n": n, **{k: round(100 * v / n, 1) for k, v in sorted(sums[key].items())}}
    return table


def main():
    parser = ArgumentParser(description="Model-free baselines (EM/F1 %) on a QA JSONL file, per question type")
    parser.add_argument("--qa", required=True, help="QA JSONL file in the tasks/qa.py schema")
    parser.add_argument("--kb", default=None, help="a KB directory: rules read its top-k retrieved documents "
                        "(default: the example's own documents with the gold one first)")
    parser.add_argument("--retriever-type", default="bm25", help="retriever of --kb")
    parser.add_argument("--top-k", type=int, default=3, help="documents shown per question with --kb")
    parser.add_argument("--json", action="store_true", help="print the table as JSON")
    args = parser.parse_args()
    examples = read_jsonl(args.qa)
    if args.kb:
        manager = RetrievalManager(args.retriever_type, args.kb)
        hits = manager.batch_retrieve([_question(ex) for ex in examples], args.top_k)
        shown = {id(ex): results_to_dicts(h) for ex, h in zip(examples, hits)}
        documents_of = lambda ex: shown[id(ex)]
    else:
        documents_of = lambda ex: oracle_documents(ex, ex.get("documents") or [])
    table = score_baselines(examples, documents_of)
    if args.json:
        print(json.dumps(table, indent=2))
        return
    rules = BASELINE_RULES + ("oracle",)
    print(f"{'question type':<14}{'n':>5}" + "".join(f"{r:>18}" for r in rules) + f"{'best_copy_rule':>16}")
    for key in ["all"] + sorted(k for k in table if k != "all"):
        row = table[key]
        print(f"{key:<14}{row['n']:>5}" + "".join(f"{row[r + ':em']:>10.1f}/{row[r + ':f1']:<7.1f}" for r in rules)
              + f"{row['best_copy_rule:em']:>16.1f}")
    print("cells: EM/F1 %; best_copy_rule: EM of the best of first_sentence, header_line, overlap_sentence chosen "
          "per question")


if __name__ == "__main__":
    run_main(main)
