"""
The built-in offline RAG data, made from the Python standard library's documentation (tasks/stdlib_docs.py):
a knowledge base, QA examples whose answers are only in the docs, and closed-book SFT chat. Plus the Task classes
that read them.

    python -m tasks.stdlib_qa                      # -> <repo>/data/builtin/ (git-ignored), a few seconds
    python -m tasks.stdlib_qa --output DIR --max-docs 4000 --max-train 3000 --max-eval 300

    from tasks.stdlib_qa import StdlibQA, StdlibChat
    train, held_out = StdlibQA("train"), StdlibQA("eval")
    ok = held_out.evaluate(held_out[0], "Remove any common leading whitespace from every line in `text`. [1]")

Files written (each to a temp file, all renamed into place together at the end):
    kb_documents.jsonl   one KB document per function/class/method record of BOTH train and held-out modules:
                         {"id": "textwrap.dedent", "title": "textwrap.dedent",
                          "content": "dedent(text)\\n\\n<docstring, capped at ~1200 chars>",
                          "metadata": {"module", "kind", "split"}}
                         At most --max-docs documents, always including every gold document of a question, the rest
                         a deterministic (sha1-ordered) sample. Build a retriever over it with
                         python -m nanochat.retrieval --documents kb_documents.jsonl --output DIR --type bm25
    qa_train.jsonl       QA examples (tasks/qa.py schema) about RAG modules, qa_eval.jsonl about EVAL ones:
                         (a) "What does `textwrap.dedent` do?" -> the docstring's first sentence
                         (b) "What is the signature of `textwrap.dedent`?" -> "dedent(text)"
                         (c) "Which standard library module provides `dedent`?" -> "textwrap" (only if the name is
                             unique among all harvested functions and classes and does not contain the module's)
                         at most one question per record, trivial ones filtered out (see _desc_answer / _sig_ok);
                         gold_doc_ids = [record id]; documents = [gold, up to 2 KB documents of the same module].
    sft_train.jsonl      closed-book chat from TRAIN modules only ("What is the `json` module for?" -> the module
    sft_val.jsonl        docstring's first paragraph; language-reference topics; what functions do), plus the
                         hand-written data/identity_conversations.jsonl; ~5% of each goes to val. Any conversation
                         that names an eval or rag module is dropped (mentions_held_out_module).
    manifest.json        python version, counts, the held-out module list and the split rule.

The split rule (tasks/stdlib_docs.module_split): whole top-level packages by sha1(name) % 5: 0 = eval,
1-2 = rag, 3-4 = train. The pretraining corpus (python -m tasks.builtin_corpus) and the SFT chat contain
only train modules, so in qa_train and qa_eval alike the answer can only come from the retrieved document: RAG
fine-tuning has to teach reading (not recall), and qa_eval measures what retrieval adds on modules the RAG
fine-tuning never saw either.
"""

import os
import re
import sys
import copy
import json
import hashlib
import argparse
import contextlib
from collections import Counter

from nanochat.common import repo_dir, builtin_dir, atomic_path, print0
from tasks.stdlib_docs import (harvest, module_split, record_split, top_level_modules, squash, SIG_LINE,
                                  UNDERLINE, paragraphs, prose, first_paragraph, first_sentence)
from nanochat.metrics import exact_match, token_f1, strip_citations
from tasks.common import Task, assistant_text, check_choice
from tasks.customjson import CustomJSON

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
# questions

_DESC_Q = {
    "function": ["What does `{id}` do?", "What is `{id}` used for?", "In one sentence, what does `{id}` do?",
                 "Briefly describe the function `{id}`."],
    "class": ["What is `{id}`?", "What is the class `{id}` for?", "Briefly describe the class `{id}`."],
    "method": ["What does the method `{id}` do?", "What does `{id}` do?", "Briefly describe `{id}`."],
}
_SIG_Q = ["What is the signature of `{id}`?", "How is `{id}` called? Give its signature.",
          "What arguments does `{id}` take? Answer with its signature."]
_MOD_Q = ["Which standard library module provides `{name}`?", "In which Python standard library module is "
          "`{name}` defined?"]


def _pick(templates, key):
    return templates[int(_h(key), 16) % len(templates)]


def question_candidates(rec, unique_names, doc_chars=KB_DOC_CHARS):
    """[(qid, question, answers)] for one function/class/method record; the first answer is always in the record's
    KB document (its title or content)."""
    rid, out = rec["id"], []
    desc = _desc_answer(rec)
    if desc:
        qid = f"{rid}#desc"
        out.append((qid, _pick(_DESC_Q[rec["kind"]], qid).format(id=rid), [desc]))
    if _sig_ok(rec["signature"]):
        qid = f"{rid}#sig"
        sig = rec["signature"]
        answers = [sig] + ([_qualified(rec)] if rec["kind"] == "method" else []) + [_full_signature(rec)]
        out.append((qid, _pick(_SIG_Q, qid).format(id=rid), answers))
    short = rec["module"].rsplit(".", 1)[-1].lower()
    giveaway = len(short) >= 4 and short in rec["name"].lower()  # TextWrapper -> textwrap is no question
    if rec["kind"] in ("function", "class") and rec["name"] in unique_names and not giveaway:
        qid = f"{rid}#module"
        out.append((qid, _pick(_MOD_Q, qid).format(name=rec["name"]), [rec["module"]]))
    doc = kb_document(rec, doc_chars)
    return [c for c in out if contains_answer(doc, c[2][0])]


def select_questions(records, unique_names, limit, doc_chars=KB_DOC_CHARS):
    """
    At most `limit` questions, at most one per record, in a deterministic sha1 order of question ids. A first pass
    takes at most limit // 8 per top-level package, so one big package (tkinter, turtle) cannot dominate a split;
    a second pass fills what is left.
    """
    cands = []
    for rec in records:
        for qid, q, answers in question_candidates(rec, unique_names, doc_chars):
            cands.append((_h(qid), qid, q, answers, rec))
    cands.sort(key=lambda c: c[0])
    used, picked, per_top = set(), [], Counter()
    for cap in (max(1, limit // 8), None):
        for _, qid, q, answers, rec in cands:
            top = rec["module"].split(".")[0]
            if len(picked) >= limit or rec["id"] in used or (cap is not None and per_top[top] >= cap):
                continue
            used.add(rec["id"])
            per_top[top] += 1
            picked.append((qid, q, answers, rec))
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


def build_stdlib_data(output_dir=None, max_docs=4000, max_train=3000, max_eval=300, max_sft=2000, records=None,
                      modules=None, identity_file=IDENTITY_FILE, progress=True, doc_chars=KB_DOC_CHARS):
    """Write kb_documents.jsonl, qa_{train,eval}.jsonl, sft_{train,val}.jsonl and manifest.json; returns the dir.
    records: pre-harvested records; else harvest(modules=modules) (modules=None: the whole stdlib)."""
    output_dir = os.fspath(output_dir or default_output_dir())
    if records is None:
        records = harvest(modules=modules, progress=progress)
    api = [r for r in records if r["kind"] in ("function", "class", "method")]
    if not api:
        raise ValueError("no function/class/method records to build from (harvest found nothing?)")
    tops = {split: sorted({r["module"].split(".")[0] for r in records if r["module"] and module_split(r["module"]) == split})
            for split in ("eval", "rag")}
    name_counts = Counter(r["name"] for r in api if r["kind"] in ("function", "class"))
    unique_names = {n for n, c in name_counts.items() if c == 1}

    # questions (at most one per record), then the KB: every gold document plus a sha1-ordered sample
    kb_by_id = {r["id"]: kb_document(r, doc_chars) for r in api}
    qa = {}
    for split, source, limit in (("train", "rag", max_train), ("eval", "eval", max_eval)):
        qa[split] = select_questions([r for r in api if record_split(r) == source], unique_names, limit, doc_chars)
    gold = {rec["id"] for split in qa for _, _, _, rec in qa[split]}
    kb_ids = set(gold)
    for r in sorted(api, key=lambda r: _h("kb", r["id"])):
        if len(kb_ids) >= max_docs:
            break
        kb_ids.add(r["id"])
    if len(gold) > max_docs:
        print0(f"stdlib_qa: note: {len(gold)} gold documents exceed --max-docs {max_docs}; the KB keeps them all")
    kb = [kb_by_id[i] for i in sorted(kb_ids)]
    kb_by_module = {}
    for d in kb:
        kb_by_module.setdefault(d["metadata"]["module"], []).append(d)

    def example(qid, question, answers, rec):
        gold_doc = kb_by_id[rec["id"]]
        others = [d for d in kb_by_module.get(rec["module"], []) if d["id"] != rec["id"]]
        others = sorted(others, key=lambda d: _h(qid, d["id"]))[:2]
        docs = [{"id": d["id"], "title": d["title"], "content": d["content"]} for d in [gold_doc] + others]
        return {"id": qid, "messages": [{"role": "user", "content": question},
                                        {"role": "assistant", "content": answers[0]}],
                "answers": answers, "gold_doc_ids": [rec["id"]], "documents": docs,
                "module": rec["module"], "question_type": qid.rsplit("#", 1)[1]}

    qa_rows = {split: [example(*p) for p in qa[split]] for split in qa}

    # SFT chat: train modules only, eval and rag module names filtered out, ~5% to val; identity conversations mixed in
    sft = sft_conversations(records, max_sft)
    if identity_file and os.path.exists(identity_file):
        sft += [(f"identity:{i}", c) for i, c in enumerate(CustomJSON(identity_file).examples)]
    elif identity_file:
        raise FileNotFoundError(f"identity conversations not found at {identity_file}")
    # every held-out name of this Python, not just the harvested ones (harvest(modules=...) may be a subset)
    held_out = set(tops["eval"]) | set(tops["rag"]) | {m for m in top_level_modules() if module_split(m) != "train"}
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
        "counts": {"kb_documents": len(kb), "qa_train": len(qa_rows["train"]), "qa_eval": len(qa_rows["eval"]),
                   "sft_train": len(sft_rows["train"]), "sft_val": len(sft_rows["val"]),
                   "sft_dropped_for_naming_held_out_modules": dropped},
        "question_types": {s: dict(Counter(r["question_type"] for r in qa_rows[s])) for s in qa_rows},
        "held_out_modules": tops["eval"],
        "rag_modules": tops["rag"],
        "split_rule": "a top-level module (and all its submodules) goes by h = int(hashlib.sha1(name.encode())"
                      ".hexdigest(), 16) % 5 (tasks/stdlib_docs.py): h == 0 eval (qa_eval), h in (1, 2) rag "
                      "(qa_train), else train (pretraining corpus and SFT chat). The pretraining corpus and SFT "
                      "data contain no record of an eval or rag module; the KB contains all three.",
        "args": {"max_docs": max_docs, "max_train": max_train, "max_eval": max_eval, "max_sft": max_sft},
    }
    outputs = {"kb_documents.jsonl": kb, "qa_train.jsonl": qa_rows["train"], "qa_eval.jsonl": qa_rows["eval"],
               "sft_train.jsonl": sft_rows["train"], "sft_val.jsonl": sft_rows["val"]}
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
    """QA about the stdlib docs: split "train" (rag modules) or "eval" (eval modules). Generative; evaluate =
    SQuAD-normalized exact match (citations stripped); f1 = token F1."""

    def __init__(self, split="train", data_dir=None, **view):
        self.split = check_choice("split", split, ("train", "eval"))
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


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Build the built-in KB / QA / SFT data from the stdlib docs")
    parser.add_argument("--output", type=str, default=None, help="output dir (default <repo>/data/builtin)")
    parser.add_argument("--max-docs", type=int, default=4000, help="KB size cap (gold documents always kept)")
    parser.add_argument("--max-train", type=int, default=3000, help="QA examples (qa_train) about rag modules")
    parser.add_argument("--max-eval", type=int, default=300, help="QA examples about held-out modules")
    parser.add_argument("--max-sft", type=int, default=2000, help="closed-book SFT conversations (before identity)")
    parser.add_argument("--doc-chars", type=int, default=KB_DOC_CHARS,
                        help="cap on each KB document's docstring (short documents let top-k fit a small context)")
    args = parser.parse_args()
    build_stdlib_data(args.output, args.max_docs, args.max_train, args.max_eval, args.max_sft, doc_chars=args.doc_chars)
