"""
The built-in offline RAG data, made from the Python standard library's documentation (tasks/stdlib_docs.py):
a knowledge base, QA examples whose answers are only in the docs, and closed-book SFT chat. Plus the Task classes
that read them.

    python -m tasks.stdlib_qa                      # -> <repo>/data/builtin/ (git-ignored), ~10 s after the harvest
    python -m tasks.stdlib_qa --output DIR --max-docs 4000 --max-train 3000 --max-dev 300 --max-eval 300

    from tasks.stdlib_qa import StdlibQA, StdlibChat
    train, dev, test = StdlibQA("train"), StdlibQA("dev"), StdlibQA("eval")
    ok = test.evaluate(test[0], "Remove any common leading whitespace from every line in `text`. [1]")

Files written (each to a temp file, all renamed into place together at the end):
    kb_documents.jsonl   one KB document per function/class/method record of train, rag and held-out modules:
                         {"id": "textwrap.dedent", "title": "textwrap.dedent",
                          "content": "dedent(text)\\n\\n<docstring, capped at ~1200 chars>",
                          "metadata": {"module", "kind", "split"}}
                         At most --max-docs documents, always including every gold document of a question, the rest
                         a deterministic (sha1-ordered) sample. Build a retriever over it with
                         python -m nanochat.retrieval --documents kb_documents.jsonl --output DIR --type bm25
    qa_train.jsonl       QA examples (tasks/qa.py schema, plus "question_type" and "module") about rag modules;
    qa_dev.jsonl         qa_dev and qa_eval (the test split) about the two halves of the held-out eval modules.
    qa_eval.jsonl        Question types (question_candidates; every answer a verbatim span of the gold document):
                         reading types, the answer at varied places, found by reading:
                           default      "What does `lineterm` default to in `difflib.context_diff`?" -> "'\\n'"
                                        (a span of the header line)
                           returns      "What do you get back from `inspect.getsourcefile`?" -> "the filename that
                                        can be used to locate an object's source" (after "Return", any sentence)
                           raises       "Which exception does `inspect.Signature.bind` raise?" -> "TypeError"
                           raises_when  "When does `marshal.loads` raise `EOFError`?" -> "If no valid value is found"
                           condition    "... what happens if recursive is true?" -> the rest of the sentence
                                        "If recursive is true, <answer>."
                           param        "What is the `path` argument of ...?" -> what "*path* is ..." or
                                        "path -- ..." says
                           xref         "What does the documentation of `pathlib.Path.link_to` say to use
                                        instead?" -> "hardlink_to" ("Use X instead", "See X", "Same as X")
                         fixed-position types, kept to a small share (FIXED_SHARE) because a copy rule answers them:
                           desc "What does `textwrap.dedent` do?" -> the first sentence; sig -> the header line;
                           module "Which standard library module provides `dedent`?" -> "textwrap"
                         The object is named by its dotted title or a paraphrase ("`dedent` from the `textwrap`
                         module", "the `getvalue` method of `io.StringIO`"). At most PER_RECORD questions per record;
                         gold_doc_ids = [record id]; documents = the gold document and 2 of the same class or module
                         (none holding a long answer), in a sha1 order: the gold one is not always first.
    multihop_{train,dev,eval}.jsonl   the built-in multi-hop questions (tasks/stdlib_multihop.py), same splits.
    sft_train.jsonl      closed-book chat from TRAIN modules only ("What is the `json` module for?" -> the module
    sft_val.jsonl        docstring's first paragraph; language-reference topics; what functions do), plus the
                         hand-written data/identity_conversations.jsonl; ~5% of each goes to val. Any conversation
                         that names an eval or rag module is dropped (mentions_held_out_module).
    manifest.json        python version, counts, question types per split, the EM of the model-free rules of
                         tasks/baselines.py with the gold document first, the module lists and the split rule.

The split rule (tasks/stdlib_docs.module_split, qa_split): whole top-level packages by h = int(sha1(name), 16):
h % 5 in (1, 2) = rag (qa_train), h % 5 in (3, 4) = train, h % 5 == 0 = held out, halved by h % 10: 0 = dev
(qa_dev), 5 = test (qa_eval), so dev and test share no module. The pretraining corpus (python -m
tasks.builtin_corpus) and the SFT chat contain only train modules, so in every QA split the answer can only come
from the retrieved document: RAG fine-tuning has to teach reading (not recall), and dev/test measure what
retrieval adds on modules the RAG fine-tuning never saw either. Recipes (epochs, p_no_gold, top-k, lr) are chosen
on dev; test is reported once per recipe.

Measured on the full build (CPython 3.11, tasks/baselines.py, EM %): with the gold document first the copy rules
score first sentence ~15, header line ~6, best-overlap sentence ~6, the best of the three chosen per question ~21;
a per-question-type extraction rule ~99 (the questions are templated, so a rule that knows the template and the
docstring conventions finds the span; its score with retrieved documents is bounded by retrieval). Before this
rebuild (desc/sig/module only) the copy rules chosen per question scored 99 with the gold document first.
"""

import os
import re
import sys
import json
import hashlib
import contextlib
from collections import Counter

from nanochat.common import repo_dir, builtin_dir, atomic_path, print0, ArgumentParser, run_main
from nanochat.metrics import token_f1, strip_citations, normalize_answer
from tasks.stdlib_docs import (harvest, module_split, record_split, top_level_modules, squash, SIG_LINE,
                               UNDERLINE, paragraphs, prose, first_paragraph, first_sentence, doc_sentences,
                               signature_params, returns_statement, raise_statements, condition_statements,
                               param_statement, xref_statements, XREF_RELATIONS)
from tasks.baselines import score_baselines, oracle_documents, BASELINE_RULES
from tasks.common import assistant_text, check_choice
from tasks.customjson import CustomJSON
from tasks.stdlib_multihop import multihop_outputs

KB_DOC_CHARS = 1200
IDENTITY_FILE = os.path.join(repo_dir(), "data", "identity_conversations.jsonl")


def default_output_dir():
    return builtin_dir()


def _h(*parts):
    """A stable pseudo-random key: deterministic sampling that does not depend on the rest of the data."""
    return hashlib.sha1("\x00".join(parts).encode("utf-8")).hexdigest()


# -----------------------------------------------------------------------------
# reading docstrings

_DANGLING = {"the", "a", "an", "of", "to", "and", "or", "by", "with", "for", "in", "is", "are", "from", "as"}
_BOILERPLATE = ("initialize self", "return repr(self)", "create and return a new object", "helper for pickle",
                "implement ", "see help(", "deprecated", "alias for", "this method is deprecated", "not implemented",
                "documentation for", "xxx", "todo", "internal", "private", "for internal use", "used internally")


def _desc_answer(rec):
    """The first sentence as an answer, or "" if it is too short/long, boilerplate, or just restates a signature."""
    s = first_sentence(rec["doc"]).strip()
    words = s.split()
    if not 20 <= len(s) <= 220 or len(words) < 4:
        return ""
    low = s.lower()
    if low.startswith(_BOILERPLATE) or s.endswith(":") or ">>>" in s or "->" in s or SIG_LINE.match(s):
        return ""
    if words[-1].lower() in _DANGLING:  # a sentence cut short in the docstring itself ("a clone of the")
        return ""
    if s.startswith(rec["name"].rsplit(".", 1)[-1] + "("):  # "register(signum, ...): register a handler ..."
        return ""
    return s


def _sig_ok(sig):
    """A signature worth asking about: informative, short, and without placeholders for unprintable defaults."""
    if not sig or len(sig) > 100 or "<" in sig or "..." in sig or "(" not in sig:
        return False
    params = sig[sig.index("(") + 1:sig.rindex(")")].replace(" ", "")
    return params not in ("", "*args,**kwargs", "*args,**kw", "/", "*args", "**kwargs", "self,/,*args,**kwargs")


def _qualified(rec):
    """The signature as the KB document shows it: "StringIO.getvalue()" for methods, "class X(...)" for classes."""
    head = rec["signature"] or rec["name"]
    if rec["kind"] == "method":
        return rec["name"].rsplit(".", 1)[0] + "." + head
    if rec["kind"] == "class":
        return "class " + head
    return head


def _full_signature(rec):
    """"textwrap.dedent(text)", "io.StringIO.getvalue()": the dotted name with the parameters."""
    sig = rec["signature"]
    return f"{rec['module']}.{rec['name']}{sig[sig.index('('):]}"


def kb_document(rec, doc_chars=KB_DOC_CHARS):
    doc = rec["doc"]
    if len(doc) > doc_chars:  # cut at a paragraph end if that keeps half, else at a word boundary
        cut = doc.rfind("\n\n", 0, doc_chars)
        if cut < doc_chars // 2:
            cut = doc.rfind(" ", 0, doc_chars)
        doc = doc[:cut if cut > 0 else doc_chars].rstrip()
    return {"id": rec["id"], "title": rec["id"], "content": f"{_qualified(rec)}\n\n{doc}",
            "metadata": {"module": rec["module"], "kind": rec["kind"], "split": record_split(rec)}}


def contains_answer(doc, answer):
    """Whitespace-insensitive: KB docstrings keep their line breaks, answers are squashed to one line."""
    return squash(answer) in squash(doc["title"] + "\n" + doc["content"])

# -----------------------------------------------------------------------------
# questions: one candidate per (record, question type), each answer a verbatim span of the record's KB document
#
# The fixed-position types (desc: the first docstring sentence, sig: the header line, module: the title minus its
# last part) are what a copy rule answers without reading; the reading types put the answer at varied places (a
# later sentence, inside the header, inside a sentence) and name the object in varied words, so that a rule has to
# find the right document and the right span. select_questions keeps the fixed types to a small share
# (FIXED_SHARE); tasks/baselines.py measures what the copy rules score (the manifest records it).

READING_TYPES = ("default", "returns", "raises", "raises_when", "condition", "param", "xref")
FIXED_TYPES = ("desc", "sig", "module")
QUESTION_TYPES = READING_TYPES + FIXED_TYPES
FIXED_SHARE = {"desc": 0.16, "sig": 0.08, "module": 0.04}  # of each split; the reading types share the rest
READING_MAX_SHARE = 0.3  # no single reading type above this share of the reading questions (variety)
PER_RECORD = 2  # at most this many questions (of different types) about one record

_DESC_Q = {
    "function": ["What does {ref} do?", "What is {ref} used for?", "In one sentence, what does {ref} do?",
                 "Briefly describe {ref}."],
    "class": ["What is {ref}?", "What is {ref} for?", "Briefly describe {ref}."],
    "method": ["What does {ref} do?", "What is {ref} for?", "Briefly describe {ref}."],
}
_SIG_Q = ["What is the signature of {ref}?", "How is {ref} called? Give its signature.",
          "What arguments does {ref} take? Answer with its signature."]
_MOD_Q = ["Which standard library module provides `{name}`?", "In which Python standard library module is "
          "`{name}` defined?"]
_DEFAULT_Q = ["What is the default value of the `{p}` parameter of {ref}?", "What does `{p}` default to in {ref}?",
              "If {ref} is called without `{p}`, what value does `{p}` take?"]
_RETURNS_Q = ["What does {ref} return?", "What is the return value of {ref}?", "What do you get back from {ref}?"]
_RAISES_Q = ["Which exception does {ref} raise?", "What exception can {ref} raise, according to its documentation?",
             "Name the exception that {ref} is documented to raise."]
_RAISES_WHEN_Q = ["When does {ref} raise `{exc}`?", "Under what condition does {ref} raise `{exc}`?"]
_CONDITION_Q = ["According to the documentation of {ref}, what happens {kw} {cond}?",
                "What does the documentation of {ref} say happens {kw} {cond}?"]
_PARAM_Q = {"is": ["What is the `{p}` argument of {ref}?", "In {ref}, what is `{p}`?"],
            "be": ["What must the `{p}` argument of {ref} be?", "What should be passed as `{p}` to {ref}?"],
            "verb": ["What does the `{p}` argument of {ref} {verb}?"]}
_XREF_Q = {"instead": ["What does the documentation of {ref} say to use instead?",
                       "According to its documentation, what should be used instead of {ref}?"],
           "see": ["Which other function, method or class does the documentation of {ref} refer to?",
                   "Where does the documentation of {ref} send the reader for more?"],
           "like": ["Which other function or method is {ref} compared to in its documentation?",
                    "According to its documentation, {ref} is equivalent or similar to what?"],
           "called": ["According to its documentation, what calls {ref}?"]}


def _pick(templates, *key):
    return templates[int(_h(*key), 16) % len(templates)]


def _ref(rec, key):
    """How a question names the object: its dotted title, or a paraphrase that names its module apart (the title
    is the document's first line; a question need not repeat it to be answerable)."""
    mod, name = rec["module"], rec["name"]
    if rec["kind"] == "method":
        cls, meth = name.rsplit(".", 1)
        forms = [f"`{rec['id']}`", f"the `{meth}` method of `{mod}.{cls}`", f"`{cls}.{meth}` from the `{mod}` module"]
    elif rec["kind"] == "class":
        forms = [f"`{rec['id']}`", f"the `{name}` class of the `{mod}` module", f"`{mod}`'s class `{name}`"]
    else:
        forms = [f"`{rec['id']}`", f"the `{mod}` function `{name}`", f"`{name}` from the `{mod}` module"]
    return _pick(forms, "ref", key)


# a condition that reads as a clause on its own ("the path is a directory"), not "false (the default)"
_CLAUSE_VERB = re.compile(r"\b(?:is|are|was|were|be|been|has|have|had|does|do|did|can|cannot|could|will|would|"
                          r"should|may|might|must|contains?|contained|exists?|fails?|matches|occurs?|returns?|"
                          r"raises?|equals?|gets?|needs?|wants?|uses?|gives?|supports?|ends?|starts?)\b")


def _words(text):
    return len(text.split())


def _param_names(rec):
    return {n for n, _ in signature_params(rec["signature"]) if not n.startswith("*")} - {"self", "cls"}


def _default_candidate(rec, key):
    """(param, default) to ask about: an informative default (a number, a string, a name) when the signature has
    one, else a None/True/False one for a third of the records only, so "answer None" stays a weak prior."""
    params = [(n, d) for n, d in signature_params(rec["signature"]) if d is not None and not n.startswith("*")]
    params = [(n, d) for n, d in params if len(d) <= 40 and "<" not in d and "..." not in d and normalize_answer(d)]
    informative = [(n, d) for n, d in params if d not in ("None", "True", "False")]
    if informative:
        return _pick(informative, "default", key)
    if params and int(_h("default-plain", key), 16) % 3 == 0:
        return _pick(params, "default", key)
    return None


def question_candidates(rec, unique_names, known_names=frozenset(), doc_chars=KB_DOC_CHARS):
    """[(qid, question_type, question, answers)] for one function/class/method record: at most one per type,
    the first answer a verbatim span (up to whitespace) of the record's KB document, and the text it is read from
    (the sentence or line) inside that document too, so the question is answerable from it."""
    rid, kind, out = rec["id"], rec["kind"], []
    doc = kb_document(rec, doc_chars)
    sents = doc_sentences(rec["doc"])
    ref = lambda qtype: _ref(rec, f"{rid}#{qtype}")

    def add(qtype, templates, answers, evidence, **fields):
        answers = [a for a in dict.fromkeys(answers) if a and normalize_answer(a)]
        if answers and contains_answer(doc, answers[0]) and contains_answer(doc, evidence):
            question = _pick(templates, rid, qtype).format(ref=ref(qtype), **fields)
            out.append((f"{rid}#{qtype}", qtype, question, answers))

    # fixed positions: the first sentence, the header line, the title
    desc = _desc_answer(rec)
    if desc:
        add("desc", _DESC_Q[kind], [desc], desc)
    if _sig_ok(rec["signature"]):
        sig = rec["signature"]
        add("sig", _SIG_Q, [sig, _qualified(rec), _full_signature(rec)], sig)  # "f(x)", "C.f(x)" / "class C(x)"
    short = rec["module"].rsplit(".", 1)[-1].lower()
    giveaway = len(short) >= 4 and short in rec["name"].lower()  # TextWrapper -> textwrap is no question
    if kind in ("function", "class") and rec["name"] in unique_names and not giveaway:
        add("module", _MOD_Q, [rec["module"]], rec["module"], name=rec["name"])

    # reading: the answer is inside the header line, or inside a sentence anywhere in the docstring
    default = _default_candidate(rec, rid)
    if default:
        add("default", _DEFAULT_Q, [default[1]], _qualified(rec), p=default[0])
    returned = returns_statement(sents) if kind != "class" else None
    if returned and 2 <= _words(returned[0]) <= 30:
        add("returns", _RETURNS_Q, [returned[0]], returned[1])
    raised = raise_statements(sents)
    if len({exc for exc, _, _ in raised}) == 1:  # one exception named: "which exception" has one answer
        exc = raised[0][0]
        add("raises", _RAISES_Q, [exc, exc.rsplit(".", 1)[-1]], raised[0][2])
        conds = [(cond, s) for _, cond, s in raised if cond]
        if len(conds) == 1 and 2 <= _words(conds[0][0]) <= 30:
            cond, s = conds[0]
            add("raises_when", _RAISES_WHEN_Q, [cond, cond.split(" ", 1)[1]], s, exc=exc)
    for kw, cond, consequence, s in condition_statements(sents)[:1]:
        if _words(consequence) >= 2 and _words(cond) >= 3 and _CLAUSE_VERB.search(cond) and \
                cond.split()[0].lower() not in ("this", "it", "they", "none", "these", "that", "so", "not"):
            add("condition", _CONDITION_Q, [consequence], s, kw=kw.lower(), cond=cond)
    for p in sorted(_param_names(rec), key=lambda p: _h(rid, "param", p)):
        described = param_statement(rec["doc"], sents, p)
        if described and 2 <= _words(described[2]) <= 30:
            form, verb, answer, evidence = described
            verb = {"specifies": "specify", "determines": "determine", "controls": "control", "gives": "give",
                    "indicates": "indicate"}.get(verb, "")
            add("param", _PARAM_Q[form], [answer], evidence, p=p, verb=verb)
            break
    own = {rec["name"], rec["name"].rsplit(".", 1)[-1], rid}
    xrefs = [(r, name, s) for r, name, marked, s in xref_statements(sents)
             if name not in own and (marked or name in known_names)]
    for relation in XREF_RELATIONS:  # one name for the relation in the whole docstring: one answer
        found = [(name, s) for r, name, s in xrefs if r == relation]
        if len({name for name, _ in found}) == 1:
            add("xref", _XREF_Q[relation], [found[0][0]], found[0][1])
            break
    return out


def select_questions(records, unique_names, limit, doc_chars=KB_DOC_CHARS, known_names=frozenset()):
    """
    At most `limit` questions [(qid, question_type, question, answers, record)], in a deterministic sha1 order of
    question ids, at most PER_RECORD per record. The reading types go first (none above READING_MAX_SHARE of
    them), then each fixed-position type up to its FIXED_SHARE of the final count. Each pass first takes at most
    limit // 8 per top-level package, so one big package (tkinter, turtle) cannot dominate a split, then fills.
    """
    cands = []
    for rec in records:
        for qid, qtype, q, answers in question_candidates(rec, unique_names, known_names, doc_chars):
            cands.append((_h(qid), qid, qtype, q, answers, rec))
    cands.sort(key=lambda c: c[0])
    picked, taken, per_record, per_top, per_type = [], set(), Counter(), Counter(), Counter()

    def take(types, caps, total):
        for top_cap in (max(1, limit // 8), None):
            for _, qid, qtype, q, answers, rec in cands:
                top = rec["module"].split(".")[0]
                if len(picked) >= total or qid in taken or qtype not in types or per_type[qtype] >= caps[qtype] \
                        or per_record[rec["id"]] >= PER_RECORD or (top_cap is not None and per_top[top] >= top_cap):
                    continue
                taken.add(qid)
                per_record[rec["id"]] += 1
                per_top[top] += 1
                per_type[qtype] += 1
                picked.append((qid, qtype, q, answers, rec))

    reading_limit = min(limit, max(1, int(limit * (1 - sum(FIXED_SHARE.values())))))
    take(READING_TYPES, {t: max(1, int(READING_MAX_SHARE * reading_limit)) for t in READING_TYPES}, reading_limit)
    take(READING_TYPES, {t: reading_limit for t in READING_TYPES}, reading_limit)  # a short type leaves room
    # the fixed types' shares are of the final count: all of `limit` when the reading types filled their budget
    total = limit if len(picked) == reading_limit else min(limit, round(len(picked) / (1 - sum(FIXED_SHARE.values()))))
    budget, share = total - len(picked), sum(FIXED_SHARE.values())  # split by share, largest remainders first
    caps = {t: int(budget * FIXED_SHARE[t] / share) for t in FIXED_TYPES}
    for t in sorted(FIXED_TYPES, key=lambda t: -(budget * FIXED_SHARE[t] / share) % 1)[:budget - sum(caps.values())]:
        caps[t] += 1
    take(FIXED_TYPES, caps, total)
    return picked

# -----------------------------------------------------------------------------
# closed-book SFT chat (train modules only)

_MODULE_Q = ["What is the `{m}` module for?", "What does the {m} module in the Python standard library do?",
             "Tell me about Python's `{m}` module.", "I keep seeing `import {m}`. What is that module?"]
_TOPIC_Q = ["Explain {t} in Python.", "Can you tell me about {t} in Python?", "What should I know about {t} in Python?"]
_FUNC_Q = ["What does `{id}` do?", "Can you explain `{id}`?", "What is `{id}` for?"]


def mentions_held_out_module(text, held_out_tops):
    """Does text refer to a held-out module: a dotted name (urllib.parse), `name`/'name', "name module/package",
    "import name" / "from name", with name in held_out_tops? Prose words (a "glob" pattern) are fine."""
    for m in re.finditer(r"(?<![\w.])([A-Za-z_]\w*)(?:\.[A-Za-z_]\w*)+", text):
        if m.group(1) in held_out_tops:
            return True
    for pattern in (r"`([A-Za-z_]\w*)", r"'([A-Za-z_]\w*)'", r"\"([A-Za-z_]\w*)\"", r"\b(\w+) (?:module|package)\b",
                    r"\b(?:import|from) (\w+)"):
        for m in re.finditer(pattern, text):
            if m.group(1) in held_out_tops:
                return True
    return False


def _conversation_text(conv):
    parts = []
    for msg in conv["messages"]:
        if msg["role"] == "retrieval":
            parts.extend(d.get("title", "") + "\n" + d["content"] for d in msg["documents"])
        elif isinstance(msg["content"], str):
            parts.append(msg["content"])
        else:
            parts.append(assistant_text(msg))
    return "\n".join(parts)


def _topic_title(doc):
    pars = paragraphs(doc)
    if not pars or len(pars[0]) < 2 or not UNDERLINE.match(pars[0][1].strip()):
        return ""
    title = pars[0][0].strip()
    return title if title[1:2].isupper() else title[0].lower() + title[1:]  # "Assignment statements" -> "assign..."


def sft_conversations(records, max_sft):
    """(key, conversation) pairs of closed-book chat about train-module records."""
    convs = []
    for rec in records:
        if record_split(rec) != "train":
            continue
        kind, rid = rec["kind"], rec["id"]
        if kind == "module":
            ans = first_paragraph(rec["doc"])
            if len(ans.split()) >= 6:
                convs.append(("module", rid, _pick(_MODULE_Q, rid).format(m=rid), ans))
        elif kind == "topic":
            title, ans = _topic_title(rec["doc"]), prose(rec["doc"])
            if title and len(ans.split()) >= 6:
                convs.append(("topic", rid, _pick(_TOPIC_Q, rid).format(t=title), ans))
        else:
            ans = first_paragraph(rec["doc"], max_chars=500)
            if len(ans.split()) >= 6 and not ans.lower().startswith(_BOILERPLATE):
                if _sig_ok(rec["signature"]):
                    ans += f"\n\nUsage: `{_full_signature(rec)}`"
                convs.append(("api", rid, _pick(_FUNC_Q, rid).format(id=rid), ans))
    # every module and topic conversation; API ones fill up to max_sft in sha1 order
    fixed = [c for c in convs if c[0] != "api"]
    api = sorted((c for c in convs if c[0] == "api"), key=lambda c: _h("sft", c[1]))
    chosen = fixed + api[:max(0, max_sft - len(fixed))]
    return [(f"{kind}:{rid}", {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
            for kind, rid, q, a in chosen]


# -----------------------------------------------------------------------------
# build everything


def qa_split(module):
    """Which QA file asks about `module`: "train" (rag modules), "dev" or "eval" (the two halves of the held-out
    eval modules), None (train modules: they are in the pretraining corpus, so no QA asks about them). The eval
    modules are those with h = int(sha1(top-level name), 16) % 5 == 0 (tasks/stdlib_docs.module_split), i.e.
    h % 10 in (0, 5): h % 10 == 0 is dev, h % 10 == 5 is eval (the test split). Whole top-level packages, so dev
    and eval share no module."""
    split = module_split(module)
    if split == "train":
        return None
    if split == "rag":
        return "train"
    h = int(hashlib.sha1(module.split(".")[0].encode("utf-8")).hexdigest(), 16)
    return "dev" if h % 10 == 0 else "eval"


QA_SPLITS = ("train", "dev", "eval")
NUM_DISTRACTORS = 2


def qa_example(qid, qtype, question, answers, rec, gold_doc, pool, squashed):
    """One QA example: the gold document and NUM_DISTRACTORS documents of the same class (a method's siblings)
    or module from `pool`, in a sha1 order (the gold document is not always first). A distractor never holds an
    answer of 3 words or more (that would be a second gold document); a short one ("None", "ValueError") may be
    in a distractor too, which is what makes reading the right document matter. squashed: {id: squash(title +
    content)} of the pool's documents (contains_answer, computed once)."""
    cls = rec["id"].rsplit(".", 1)[0] + "." if rec["kind"] == "method" else None
    long = [squash(a) for a in answers if len(a.split()) >= 3]
    others = [d for d in pool if d["id"] != rec["id"] and not any(a in squashed[d["id"]] for a in long)]
    others.sort(key=lambda d: (not (cls and d["id"].startswith(cls)), _h(qid, d["id"])))
    docs = sorted([gold_doc] + others[:NUM_DISTRACTORS], key=lambda d: _h(qid, "order", d["id"]))
    return {"id": qid, "messages": [{"role": "user", "content": question},
                                    {"role": "assistant", "content": answers[0]}],
            "answers": answers, "gold_doc_ids": [rec["id"]],
            "documents": [{"id": d["id"], "title": d["title"], "content": d["content"]} for d in docs],
            "module": rec["module"], "question_type": qtype}


def gold_first_baselines(rows):
    """EM (%) of each model-free rule (tasks/baselines.py) with the gold document ranked first, and of the best
    fixed copy rule chosen per question: what a model must beat on these questions."""
    if not rows:
        return {}
    table = score_baselines(rows, lambda ex: oracle_documents(ex, ex["documents"]))["all"]
    return {rule: table[f"{rule}:em"] for rule in BASELINE_RULES + ("best_copy_rule",)}


def api_name_sets(api):
    """(unique_names, known_names) of the function/class/method records `api`, the name sets question_candidates
    takes: function/class names that occur once (a "which module" question has one answer), and every name an xref
    may point to."""
    name_counts = Counter(r["name"] for r in api if r["kind"] in ("function", "class"))
    unique_names = {n for n, c in name_counts.items() if c == 1}
    known_names = {r["name"].rsplit(".", 1)[-1] for r in api} | {r["name"] for r in api} | {r["id"] for r in api}
    return unique_names, known_names


def build_stdlib_data(output_dir=None, max_docs=4000, max_train=3000, max_eval=300, max_sft=2000, records=None,
                      modules=None, identity_file=IDENTITY_FILE, progress=True, doc_chars=KB_DOC_CHARS, max_dev=300):
    """Write kb_documents.jsonl, qa_{train,dev,eval}.jsonl, sft_{train,val}.jsonl and manifest.json; returns the
    dir. records: pre-harvested records; else harvest(modules=modules) (modules=None: the whole stdlib)."""
    output_dir = os.fspath(output_dir or default_output_dir())
    if records is None:
        records = harvest(modules=modules, progress=progress)
    api = [r for r in records if r["kind"] in ("function", "class", "method")]
    if not api:
        raise ValueError("no function/class/method records to build from (harvest found nothing?)")
    tops = {split: sorted({r["module"].split(".")[0] for r in api if qa_split(r["module"]) == split})
            for split in QA_SPLITS}
    unique_names, known_names = api_name_sets(api)

    # questions, then the KB: every gold document plus a sha1-ordered sample
    kb_by_id = {r["id"]: kb_document(r, doc_chars) for r in api}
    limits = {"train": max_train, "dev": max_dev, "eval": max_eval}
    qa = {split: select_questions([r for r in api if qa_split(r["module"]) == split], unique_names, limits[split],
                                  doc_chars, known_names)
          for split in QA_SPLITS}
    keep = {rec["id"] for split in qa for *_, rec in qa[split]}
    # the built-in multi-hop set (tasks/stdlib_multihop.py): the same records and KB documents, split by qa_split;
    # its rows become extra output files and its gold and distractor ids join `keep`, so the KB holds every
    # document it shows
    extra_outputs = multihop_outputs(records, kb_by_id, qa_split, _desc_answer, progress)
    keep |= {d["id"] for rows in extra_outputs.values() for row in rows for d in row["documents"]}
    kb_ids = set(keep)
    for r in sorted(api, key=lambda r: _h("kb", r["id"])):
        if len(kb_ids) >= max_docs:
            break
        kb_ids.add(r["id"])
    if len(keep) > max_docs:
        print0(f"stdlib_qa: note: {len(keep)} gold documents exceed --max-docs {max_docs}; the KB keeps them all")
    kb = [kb_by_id[i] for i in sorted(kb_ids)]
    kb_by_module = {}
    for d in kb:
        kb_by_module.setdefault(d["metadata"]["module"], []).append(d)
    squashed = {d["id"]: squash(d["title"] + "\n" + d["content"]) for d in kb}
    qa_rows = {}
    for split in QA_SPLITS:
        rows = [qa_example(qid, qtype, q, answers, rec, kb_by_id[rec["id"]], kb_by_module[rec["module"]], squashed)
                for qid, qtype, q, answers, rec in qa[split]]
        qa_rows[split] = sorted(rows, key=lambda ex: _h("order", ex["id"]))  # types and modules interleaved

    # SFT chat: train modules only, eval and rag module names filtered out, ~5% to val; identity conversations mixed in
    sft = sft_conversations(records, max_sft)
    if identity_file and os.path.exists(identity_file):
        sft += [(f"identity:{i}", c) for i, c in enumerate(CustomJSON(identity_file).examples)]
    elif identity_file:
        raise FileNotFoundError(f"identity conversations not found at {identity_file}")
    # every held-out name of this Python, not just the harvested ones (harvest(modules=...) may be a subset)
    held_out = {m for split in QA_SPLITS for m in tops[split]} | \
        {m for m in top_level_modules() if module_split(m) != "train"}
    kept = [(k, c) for k, c in sft if not mentions_held_out_module(_conversation_text(c), held_out)]
    dropped = len(sft) - len(kept)
    kept.sort(key=lambda kc: _h("order", kc[0]))  # interleave modules, topics, API and identity
    sft_rows = {"train": [], "val": []}
    for key, conv in kept:
        sft_rows["val" if int(_h("val", key), 16) % 20 == 0 else "train"].append(conv)

    manifest = {
        "what": "nanochat-rag built-in RAG data from the Python standard library docs",
        "python_version": sys.version.split()[0],
        "records_harvested": len(records),
        "doc_chars": doc_chars,
        "counts": {"kb_documents": len(kb), **{f"qa_{s}": len(qa_rows[s]) for s in QA_SPLITS},
                   "sft_train": len(sft_rows["train"]), "sft_val": len(sft_rows["val"]),
                   "sft_dropped_for_naming_held_out_modules": dropped},
        "question_types": {s: dict(sorted(Counter(r["question_type"] for r in qa_rows[s]).items())) for s in qa_rows},
        "gold_first_baselines_em": {s: gold_first_baselines(qa_rows[s]) for s in ("dev", "eval")},
        "held_out_modules": sorted(tops["dev"] + tops["eval"]),
        "dev_modules": tops["dev"],
        "test_modules": tops["eval"],
        "rag_modules": tops["train"],
        "split_rule": "a top-level module (and all its submodules) goes by h = int(hashlib.sha1(name.encode())"
                      ".hexdigest(), 16) (tasks/stdlib_docs.py, tasks/stdlib_qa.qa_split): h % 5 in (1, 2) rag "
                      "(qa_train); h % 10 == 0 dev (qa_dev) and h % 10 == 5 test (qa_eval), the two halves of the "
                      "eval modules (h % 5 == 0), disjoint by module; else train (pretraining corpus and SFT chat). "
                      "The pretraining corpus and SFT data contain no record of a rag, dev or test module; the KB "
                      "contains all of them. Recipes are chosen on dev; test is reported once per recipe.",
        "args": {"max_docs": max_docs, "max_train": max_train, "max_dev": max_dev, "max_eval": max_eval,
                 "max_sft": max_sft},
    }
    outputs = {"kb_documents.jsonl": kb, **{f"qa_{s}.jsonl": qa_rows[s] for s in QA_SPLITS},
               "sft_train.jsonl": sft_rows["train"], "sft_val.jsonl": sft_rows["val"], **extra_outputs}
    os.makedirs(output_dir, exist_ok=True)
    with contextlib.ExitStack() as stack:  # every file to a temp path; all renamed only if all were written
        for name, rows in outputs.items():
            tmp = stack.enter_context(atomic_path(os.path.join(output_dir, name)))
            with open(tmp, "w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
        tmp = stack.enter_context(atomic_path(os.path.join(output_dir, "manifest.json")))
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2)
    print0(f"stdlib_qa: {manifest['counts']} -> {output_dir}")
    if progress:
        for split in QA_SPLITS:
            print0(f"stdlib_qa: qa_{split} question types {manifest['question_types'][split]}")
        for split in ("dev", "eval"):
            print0(f"stdlib_qa: qa_{split} EM of the model-free rules, gold document first (tasks/baselines.py): "
                   f"{manifest['gold_first_baselines_em'][split]}")
    return output_dir

# -----------------------------------------------------------------------------
# tasks


def _data_file(data_dir, name):
    path = os.path.join(data_dir or default_output_dir(), name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: build the built-in data with `python -m tasks.stdlib_qa`"
                                + (f" --output {data_dir}" if data_dir else ""))
    return path


class StdlibQA(CustomJSON):
    """QA about the stdlib docs: split "train" (rag modules), "dev" or "eval" (the test split; tasks/registry.py
    maps test to it): the two module-disjoint halves of the held-out eval modules (qa_split). Generative; evaluate
    = SQuAD-normalized exact match (citations stripped); f1 = token F1."""

    def __init__(self, split="train", data_dir=None, **view):
        self.split = check_choice("split", split, QA_SPLITS)
        super().__init__(_data_file(data_dir, f"qa_{split}.jsonl"), **view)

    def validate(self, example, where):
        super().validate(example, where)
        if not isinstance(example.get("answers"), list) or not example["answers"]:
            raise ValueError(f"{where}: example {example.get('id')!r} has no 'answers' list")

    def f1(self, conversation, assistant_response):
        return token_f1(strip_citations(assistant_response), conversation["answers"])


class StdlibChat(CustomJSON):
    """Closed-book chat about train-module docs plus identity conversations: split "train" or "val"."""

    def __init__(self, split="train", data_dir=None, **view):
        self.split = check_choice("split", split, ("train", "val"))
        super().__init__(_data_file(data_dir, f"sft_{split}.jsonl"), **view)


def main():
    parser = ArgumentParser(description="Build the built-in KB / QA / SFT data from the stdlib docs")
    parser.add_argument("--output", type=str, default=None, help="output dir (default <repo>/data/builtin)")
    parser.add_argument("--max-docs", type=int, default=4000, help="KB size cap (gold documents always kept)")
    parser.add_argument("--max-train", type=int, default=3000, help="QA examples (qa_train) about rag modules")
    parser.add_argument("--max-dev", type=int, default=300, help="QA examples (qa_dev) about the dev half of the "
                        "held-out modules")
    parser.add_argument("--max-eval", type=int, default=300, help="QA examples (qa_eval, the test split) about the "
                        "test half of the held-out modules")
    parser.add_argument("--max-sft", type=int, default=2000, help="closed-book SFT conversations (before identity)")
    parser.add_argument("--doc-chars", type=int, default=KB_DOC_CHARS,
                        help="cap on each KB document's docstring (short documents let top-k fit a small context)")
    args = parser.parse_args()
    build_stdlib_data(args.output, args.max_docs, args.max_train, args.max_eval, args.max_sft,
                      doc_chars=args.doc_chars, max_dev=args.max_dev)


if __name__ == "__main__":
    run_main(main)
