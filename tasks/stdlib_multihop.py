"""
The built-in multi-hop set: questions about the Python standard library's docs whose answer needs TWO documents
of the built-in KB (tasks/stdlib_qa.py), in the multihop schema of tasks/multihop.py, for REFRAG on the CPU
default and in tests. Written by tasks/stdlib_qa.py's build_stdlib_data (python -m tasks.stdlib_qa) next to the
single-hop files:

    multihop_train.jsonl   questions whose documents are in rag modules
    multihop_dev.jsonl     ... in the dev half of the held-out eval modules
    multihop_eval.jsonl    ... in the test half of the held-out eval modules

    from tasks.stdlib_multihop import StdlibMultiHop
    dev = StdlibMultiHop("dev")                  # a MultiHopQA: RefragTask(dev, kb), hop_queries(dev[0]), ...
    python -m tasks.multihop --data data/builtin/multihop_eval.jsonl --kb data/builtin/kb   # the retrieval gap

Each question names one API document A; hop 1 reads A for the name of another API document B; hop 2 reads B for
the answer, a verbatim span of B's KB document that A's document does not contain: B's description (the single-hop
description rule, passed in as describe) or, for "module", B's module (in B's title). Four kinds, as far as the
docstrings support them:
  "ref"      A's docs point to one other documented API B: one name for a relation of xref_statements
             (tasks/stdlib_docs.py: "use X instead", "see X", "same as / like X", "called by X"), else the only
             documented API its prose names at all (a dotted name, or `name()` / `name` / a camelCase or snake_case
             name resolved in A's class, then A's module; doctests and indented blocks are not read):
             "What does the method that the documentation of `pathlib.Path.link_to` says to use instead do?"
             hop 1 "What does the documentation of ... say to use instead?" -> "hardlink_to",
             hop 2 "What does `pathlib.Path.hardlink_to` do?" -> its description.
  "returns"  A says it returns "a/an X [object|instance]", X a documented class; the question asks about one of X's
             methods: "What does the `findall()` method of the object that `re.compile` returns do?"
             hop 1 "What kind of object does `re.compile` return?" -> "Pattern", hop 2 "What does `re.Pattern.findall`
             do?"
  "default"  a parameter of A defaults to a documented function or class: "What does the default `quote_via` of
             `urllib.parse.urlencode` do?" hop 1 -> "quote_plus", hop 2 "What does `urllib.parse.quote_plus` do?"
  "module"   the module that the one class A's prose names by its bare name lives in (a class of another submodule
             of A's package, or a builtin): "Which module defines the exception named in the documentation of
             `asyncio.tasks.shield`?" hop 1 -> "CancelledError", hop 2 "Which standard library module defines
             `CancelledError`?" -> "asyncio.exceptions".
At most one question per (kind, A); A and B in the same split (split_of); at most MAX_PER_ANSWER questions share an
answer (17 turtle functions name TurtleScreen); a near-repeat (turtle.goto and turtle.TNavigator.goto) is kept once.
On CPython 3.11, all modules (python -m tasks.stdlib_qa prints the counts): 1,059 candidates (ref 754, module 257,
default 30, returns 18) -> train 281 (ref 245, module 15, returns 12, default 9), dev 60 (ref 49, module 7,
default 3, returns 1), eval 29 (ref 28, default 1); most drops are questions about train (pretraining) modules
(386) and answers already taken (192). Single-shot BM25 over the built-in KB (question alone, top 5) shows both
gold documents for 33.2% of the 370 questions (40.8% at top 7, the documents a gold trajectory shows), the gold
hop queries (top 3 each) for 73.5%: the gap REFRAG has to close.

"documents" of each question: A, B and up to 3 other KB documents of their modules that do not contain the answer,
in a sha1 order. The split rule is tasks/stdlib_qa.py's qa_split (whole top-level modules by sha1; rag modules
train, the eval modules halved into dev and test), passed in by the caller as split_of(module).
"""

import os
import re
import hashlib
from collections import Counter

from nanochat.common import builtin_dir, print0
from tasks.common import check_choice
from tasks.multihop import MultiHopQA
from tasks.stdlib_docs import squash, doc_sentences, xref_statements, XREF_RELATIONS

SPLITS = ("train", "dev", "eval")
DATASET = "stdlib-multihop"
NUM_DISTRACTORS = 3
MAX_PER_ANSWER = 2  # questions sharing one answer (one second document): many docs name one popular class


def _h(*parts):
    return hashlib.sha1("\x00".join(parts).encode("utf-8")).hexdigest()


def _contains(doc, text):
    """Whitespace-insensitive containment in a KB document (its title or content)."""
    return squash(text) in squash(doc["title"] + "\n" + doc["content"])


def _body(doc):
    """The prose lines of a KB document's docstring: the signature header, doctests (>>> / ... lines and the output
    lines after them) and indented blocks (code, parameter tables) are left out, so a name there is not taken as a
    reference."""
    body = doc["content"].split("\n\n", 1)[1] if "\n\n" in doc["content"] else ""
    lines, in_doctest = [], False
    for line in body.splitlines():
        in_doctest = line.lstrip().startswith((">>>", "...")) or (in_doctest and line.strip() != "")
        if not in_doctest and not line.startswith(("    ", "\t")):
            lines.append(line)
    return "\n".join(lines)


# a name in prose: `name`, name(), or a dotted name (os.path.join)
_NAME = re.compile(r"(?<![\w.])(`?)([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)(`|\(\))?")
# "Return a Match object", "returning a Pattern object", "Returns an instance of StackSummary"
_RETURNS = re.compile(r"\b(?:[Rr]eturns?|[Rr]eturning)\s+(?:a|an)\s+(?:new\s+)?(?:instance of\s+)?`?"
                      r"([A-Z]\w*(?:\.[A-Za-z_]\w*)*)`?(?:\(\))?(?=[\s.,;:)]|$)")
# a bare name that is no English word: has an underscore or a capital letter after its first letter (addCleanup)
_IDENTIFIER_LIKE = re.compile(r"_|^.+[A-Z]")
_EXCEPTION_NAME = re.compile(r"(Error|Exception|Warning|Exit|Interrupt)$")
# "copy_function=copy2" in a signature
_DEFAULT = re.compile(r"(\w+)=([A-Za-z_][\w.]*)(?=[,)])")


def _owner_class(rec):
    return rec["id"].rsplit(".", 1)[0] if rec["kind"] == "method" else rec["id"] if rec["kind"] == "class" else None


class _Index:
    """The API records that have a KB document, and the lookups the question kinds need."""

    def __init__(self, records, kb_by_id):
        self.recs = {r["id"]: r for r in records
                     if r["kind"] in ("function", "class", "method") and r["id"] in kb_by_id}
        self.kb = kb_by_id
        names = Counter(r["name"] for r in self.recs.values() if r["kind"] in ("function", "class"))
        self.unique = {r["name"]: r["id"] for r in self.recs.values()
                       if r["kind"] in ("function", "class") and names[r["name"]] == 1}
        classes = [((r["module"].split(".")[0], r["name"]), r["id"])
                   for r in self.recs.values() if r["kind"] == "class"]
        per_package = Counter(key for key, _ in classes)
        self.package_classes = {key: rid for key, rid in classes if per_package[key] == 1}
        self.methods = {}
        for r in self.recs.values():
            if r["kind"] == "method":
                self.methods.setdefault(r["id"].rsplit(".", 1)[0], []).append(r)

    def resolve(self, name, rec, marked, anywhere=False):
        """The record id a name in rec's docs means: dotted as is or under rec's module; a marked (`x`, x()) bare
        name in rec's class, then rec's module; anywhere=True also a unique function/class name of any module."""
        cls = _owner_class(rec)
        if "." in name:
            cands = [name, f"{rec['module']}.{name}"]
        elif marked or anywhere or _IDENTIFIER_LIKE.search(name):
            cands = ([f"{cls}.{name}"] if cls else []) + [f"{rec['module']}.{name}"]
        else:
            return None
        for c in cands:
            if c in self.recs:
                return c
        return self.unique.get(name) if anywhere else None


def _ask(rec, phrase):
    """"What does <phrase> do?" for a function or method, "What is <phrase> for?" for a class."""
    return f"What is {phrase} for?" if rec["kind"] == "class" else f"What does {phrase} do?"


def _named(rec):
    """`re.match`, but "the class `re.Match`": a class's KB document starts "class Match(...)", and without the word
    a BM25 query for the class ranks the class's shorter method documents first."""
    return f"the class `{rec['id']}`" if rec["kind"] == "class" else f"`{rec['id']}`"


# how a "ref" question names B through A: (the phrase for B, the hop-1 question), by the relation A's docs state
_RELATION_WORDS = {
    "instead": ("the {w} that the documentation of {a} says to use instead",
                "What does the documentation of {a} say to use instead?"),
    "see": ("the {w} that the documentation of {a} refers to", "Which {w} does the documentation of {a} refer to?"),
    "like": ("the {w} that {a} is compared to in its documentation",
             "Which {w} is {a} compared to in its documentation?"),
    "called": ("the {w} that calls {a}, according to its documentation",
               "According to its documentation, which {w} calls {a}?"),
    None: ("the {w} named in the documentation of {a}", "Which {w} does the documentation of {a} name?"),
}


def _reference(index, rec):
    """(relation or None, B id, the name as written) of the one other API record A's docs point to: one name for a
    relation (tasks/stdlib_docs.xref_statements: "use X instead", "see X", "same as / like X", "called by X"),
    else the only documented API its prose names at all; None if neither is unique."""
    a, adoc = rec["id"], index.kb[rec["id"]]
    sents = doc_sentences(rec["doc"])
    for relation in XREF_RELATIONS:
        found = {(name, sentence) for _, name, marked, sentence in xref_statements(sents, (relation,))
                 if marked or _IDENTIFIER_LIKE.search(name)}
        if len({name for name, _ in found}) == 1:
            name, sentence = sorted(found)[0]
            b = index.resolve(name, rec, True)
            if b and b != a and not a.startswith(b + ".") and _contains(adoc, sentence):
                return relation, b, name
    refs = {}
    for m in _NAME.finditer(_body(adoc)):
        b = index.resolve(m.group(2), rec, m.group(3) == "()" or (m.group(1) == "`" and m.group(3) == "`"))
        if b and b != a and not a.startswith(b + ".") and b not in refs:
            refs[b] = m.group(2)
    if len(refs) == 1:
        (b, written), = refs.items()
        return None, b, written
    return None


def _foreign_class(index, rec):
    """(B id, the name as written) of the one class of another module that A's prose names by its bare name: a
    class of another submodule of A's package (asyncio.events naming ReadTransport of asyncio.transports) or a
    builtin (ValueError), the name unique among the package's documented classes; else None. Not any module: an
    undocumented class of A's package (asyncio's StreamReader has no docstring) would resolve to a namesake
    elsewhere (codecs.StreamReader)."""
    found, top = {}, rec["module"].split(".")[0]
    for m in _NAME.finditer(_body(index.kb[rec["id"]])):
        name = m.group(2)
        marked = m.group(3) == "()" or (m.group(1) == "`" and m.group(3) == "`") or _IDENTIFIER_LIKE.search(name)
        if "." in name or not marked or index.resolve(name, rec, True):
            continue  # dotted names say their module already; a name of A's own class or module is no second hop
        b = index.package_classes.get((top, name)) or index.package_classes.get(("builtins", name))
        if b and index.recs[b]["module"] != rec["module"]:
            found.setdefault(b, name)
    return next(iter(found.items())) if len(found) == 1 else None


def _candidates(index, rec, describe):
    """[(kind, B id, hop-1 question, hop-1 answer, question, hop-2 question, answer)] for record A = rec; the
    answer is describe(B), or B's module for kind "module"."""
    a, out = rec["id"], []
    body = _body(index.kb[a])

    def add(kind, b, hop1_question, hop1_answer, question):
        brec = index.recs[b]
        out.append((kind, b, hop1_question, hop1_answer, question, _ask(brec, _named(brec)), describe(brec)))

    # ref: A's docs point to one other documented API B
    ref = _reference(index, rec)
    if ref:
        relation, b, written = ref
        brec = index.recs[b]
        phrase, hop1 = (t.format(w=brec["kind"], a=_named(rec)) for t in _RELATION_WORDS[relation])
        add("ref", b, hop1, written, _ask(brec, phrase))

    # returns: A returns an X object; ask about one of X's methods
    if rec["kind"] in ("function", "method"):
        for m in _RETURNS.finditer(body):
            x = index.resolve(m.group(1), rec, True, anywhere=True)
            if x and index.recs[x]["kind"] == "class" and x != _owner_class(rec):
                methods = sorted((r for r in index.methods.get(x, []) if describe(r)), key=lambda r: _h(a, r["id"]))
                if methods:
                    meth = methods[0]
                    short = meth["name"].rsplit(".", 1)[1]
                    add("returns", meth["id"], f"What kind of object does `{a}` return?", m.group(1),
                        f"What does the `{short}()` method of the object that `{a}` returns do?")
                break

    # default: a parameter's default value is a documented function or class
    head = index.kb[a]["content"].split("\n", 1)[0]
    for m in _DEFAULT.finditer(rec["signature"] or ""):
        param, value = m.groups()
        if value in ("None", "True", "False", "Ellipsis") or f"{param}={value}" not in head:
            continue
        b = index.resolve(value, rec, True, anywhere=True)
        if b and b != a:
            add("default", b, f"What is the default value of the `{param}` parameter of {_named(rec)}?", value,
                _ask(index.recs[b], f"the default `{param}` of {_named(rec)}"))
            break

    # module: the module that a class A's prose names by its bare name lives in (the title of B's document)
    foreign = _foreign_class(index, rec)
    if foreign:
        b, written = foreign
        what = "exception" if _EXCEPTION_NAME.search(written) else "class"
        out.append(("module", b, f"Which {what} does the documentation of {_named(rec)} name?", written,
                    f"Which module defines the {what} named in the documentation of {_named(rec)}?",
                    f"Which standard library module defines `{written}`?", index.recs[b]["module"]))
    return out


def build_multihop_questions(records, kb_by_id, split_of, describe):
    """
    The built-in multi-hop questions: ({"train": rows, "dev": rows, "eval": rows}, counts).
    records: harvested records (tasks/stdlib_docs.harvest); kb_by_id: KB document dicts by id (tasks/stdlib_qa.py's
    kb_document of each record, the text the retriever shows); split_of(module) -> "train" | "dev" | "eval" | None
    (None: the module's questions are not in this set); describe(record) -> a sentence of the record's docs to
    answer "what does it do" with, or "" (the single-hop description rule). Every gold and distractor document of a
    row is a key of kb_by_id: the caller must keep them in the KB.
    counts: candidates and drops per reason, and questions per split and kind (what the docstrings supported).
    """
    index = _Index(records, kb_by_id)
    by_module = {}
    for d in sorted(kb_by_id.values(), key=lambda d: d["id"]):
        by_module.setdefault(d["metadata"]["module"], []).append(d)
    cands = [(f"{a}#{c[0]}", index.recs[a]) + c for a in sorted(index.recs)
             for c in _candidates(index, index.recs[a], describe)]
    cands.sort(key=lambda c: _h(c[0]))  # which of several similar questions is kept: a sha1 order, not the names'
    rows = {s: [] for s in SPLITS}
    counts, taken, per_second = Counter(), set(), Counter()
    for qid, rec, kind, b, hop1_question, hop1_answer, question, hop2_question, answer in cands:
        a = rec["id"]
        counts[f"candidates_{kind}"] += 1
        brec, adoc, bdoc = index.recs[b], kb_by_id[a], kb_by_id[b]
        split, bsplit = split_of(rec["module"]), split_of(brec["module"])
        if split is None:
            counts["dropped_module_not_in_a_split"] += 1
        elif bsplit != split:
            counts["dropped_documents_in_two_splits"] += 1
        elif not answer or not _contains(bdoc, answer):
            counts["dropped_no_description"] += 1
        elif _contains(adoc, answer):
            counts["dropped_answer_in_first_document"] += 1
        elif not _contains(adoc, hop1_answer):
            counts["dropped_hop1_answer_not_in_first_document"] += 1
        elif (split, kind, rec["name"].rsplit(".", 1)[-1], hop1_answer, answer) in taken:
            counts["dropped_repeat"] += 1  # turtle.goto, turtle.TNavigator.goto, ...: the same question again
        elif per_second[answer] >= MAX_PER_ANSWER:
            counts["dropped_answer_taken"] += 1  # 17 turtle functions name TurtleScreen: keep a few
        else:
            taken.add((split, kind, rec["name"].rsplit(".", 1)[-1], hop1_answer, answer))
            per_second[answer] += 1
            others = [d for m in dict.fromkeys([rec["module"], brec["module"]]) for d in by_module.get(m, [])
                      if d["id"] not in (a, b) and not _contains(d, answer)]
            others = sorted(others, key=lambda d: _h(qid, d["id"]))[:NUM_DISTRACTORS]
            docs = sorted([adoc, bdoc] + others, key=lambda d: _h(qid, "order", d["id"]))
            rows[split].append({
                "id": qid, "dataset": DATASET, "type": kind,
                "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
                "answers": [answer], "gold_doc_ids": [a, b],
                "documents": [{"id": d["id"], "title": d["title"], "content": d["content"]} for d in docs],
                "hops": [{"question": hop1_question, "answer": hop1_answer, "doc_id": a},
                         {"question": hop2_question, "answer": answer, "doc_id": b}],
                "module": rec["module"]})
            counts[f"{split}_{kind}"] += 1
    for split in SPLITS:
        rows[split].sort(key=lambda r: _h("order", r["id"]))  # kinds and modules interleaved
        counts[split] = len(rows[split])
    return rows, dict(sorted(counts.items()))


class StdlibMultiHop(MultiHopQA):
    """The built-in multi-hop questions: split "train" (rag modules), "dev" or "eval" (the two halves of the
    held-out eval modules), from multihop_{split}.jsonl in data_dir (default: the built-in data dir)."""

    def __init__(self, split="train", data_dir=None, **view):
        self.split = check_choice("split", split, SPLITS)
        path = os.path.join(data_dir or builtin_dir(), f"multihop_{split}.jsonl")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found: build the built-in data with `python -m tasks.stdlib_qa`"
                                    + (f" --output {data_dir}" if data_dir else ""))
        super().__init__(path, **view)


def multihop_outputs(records, kb_by_id, split_of, describe, progress=True):
    """build_multihop_questions as the files build_stdlib_data writes: {"multihop_train.jsonl": rows,
    "multihop_dev.jsonl": rows, "multihop_eval.jsonl": rows}; prints the counts when progress is on."""
    rows, counts = build_multihop_questions(records, kb_by_id, split_of, describe)
    if progress:
        print0(f"stdlib_multihop: {counts}")
    return {f"multihop_{split}.jsonl": rows[split] for split in SPLITS}
