"""
Tests for the built-in offline data: tasks/stdlib_docs.py (the harvest, the held-out split, reading docstrings) and
tasks/stdlib_qa.py (KB, QA train/dev/test and SFT files, the StdlibQA / StdlibChat tasks, and the acceptance
property of issue 14: fixed-position copy rules fail on the questions while the questions stay answerable).

    pytest -q tests/test_stdlib_qa.py
"""

import os
import sys
import re
import json
import hashlib

import pytest

from tasks.stdlib_docs import (harvest, module_split, is_eval_module, record_split, top_level_modules, sentences,
                               doc_sentences, signature_params, returns_statement, raise_statements,
                               condition_statements, param_statement, xref_statements)
from tasks.stdlib_qa import (build_stdlib_data, first_sentence, first_paragraph, prose, mentions_held_out_module,
                             contains_answer, qa_split, StdlibQA, StdlibChat, IDENTITY_FILE, QUESTION_TYPES, PER_RECORD)
from tasks.baselines import score_baselines, oracle_documents
from tasks.customjson import CustomJSON

MODULES = ["json", "textwrap", "shlex", "os", "heapq", "re", "random", "queue", "glob", "base64", "fnmatch", "difflib"]
KINDS = {"module", "function", "class", "method", "topic"}


@pytest.fixture(scope="module")
def records():
    return harvest(modules=MODULES, progress=False)

# -----------------------------------------------------------------------------
# stdlib_docs


def test_records_well_formed(records):
    ids = [r["id"] for r in records]
    assert ids == sorted(ids) and len(ids) == len(set(ids))
    docs = [r["doc"] for r in records]
    assert len(docs) == len(set(docs))  # exact duplicate docs dropped
    for r in records:
        assert set(r) == {"id", "module", "name", "kind", "signature", "doc"}
        assert r["kind"] in KINDS and r["doc"].strip() and r["doc"] == r["doc"].strip()
        assert all(isinstance(v, str) for v in r.values())
        if r["kind"] == "topic":
            assert r["id"] == "topic:" + r["name"] and r["module"] == ""
            continue
        assert r["module"].split(".")[0] in MODULES
        assert r["id"] == r["module"] if r["kind"] == "module" else r["id"] == f"{r['module']}.{r['name']}"
        assert not any(part.startswith("_") for part in r["id"].split("."))  # no private names
        assert " at 0x" not in r["signature"]
        if r["kind"] == "method":
            assert r["name"].count(".") == 1 and "self" not in r["signature"].split("(", 1)[-1].split(",")[0]
    by_id = {r["id"]: r for r in records}
    assert by_id["textwrap.dedent"]["signature"] == "dedent(text)"
    assert by_id["textwrap.dedent"]["doc"].startswith("Remove any common leading whitespace")
    assert by_id["textwrap.dedent"]["kind"] == "function"
    assert by_id["json.decoder.JSONDecoder"]["kind"] == "class"
    assert "json.JSONDecoder" not in by_id  # a re-export: the defining module (json.decoder) gets the record
    assert "json.decoder" in by_id and "os.path.join" in by_id  # public submodules, os.path
    assert "os.getcwd" in by_id and "heapq.heappush" in by_id  # C accelerators (posix, _heapq) credited
    assert by_id["json.decoder.JSONDecoder.decode"]["kind"] == "method"
    assert by_id["topic:for"]["doc"].startswith('The "for" statement')
    assert not any(r["id"].startswith("json.tests") or ".test." in r["id"] for r in records)


def test_harvest_is_deterministic_and_quiet(records, capfd):
    again = harvest(modules=MODULES, progress=False)
    assert again == records
    out, err = capfd.readouterr()
    assert out == "" and err == ""  # nothing printed by ~10 imported modules (or by us with progress=False)


def test_full_harvest(capfd):
    records = harvest(progress=True)
    out, _ = capfd.readouterr()
    assert "modules ok" in out and "records" in out
    kinds = {k: sum(r["kind"] == k for r in records) for k in KINDS}
    assert kinds["module"] > 150 and kinds["function"] > 1000 and kinds["class"] > 500 and kinds["topic"] > 50
    tops = {r["module"].split(".")[0] for r in records if r["module"]}
    assert not tops & {"antigravity", "this", "idlelib", "lib2to3", "test", "turtledemo", "distutils"}
    assert not any(r["module"].split(".")[0].startswith("_") for r in records if r["module"])
    blob = json.dumps(records)
    # nothing from this machine leaks into the docs (cgi's environ=os.environ default would print the environment)
    for secret in {os.path.expanduser("~"), sys.prefix, os.getcwd()} - {"/"}:
        assert secret not in blob


def test_split_rule():
    for name in ["json", "urllib", "textwrap", "itertools", "os", "xml", "email"]:
        assert is_eval_module(name) == (int(hashlib.sha1(name.encode()).hexdigest(), 16) % 5 == 0)
    # whole packages go to one side
    for pkg, subs in {"urllib": ["urllib.parse", "urllib.request"], "email": ["email.mime.text", "email.utils"],
                      "xml": ["xml.etree.ElementTree"], "os": ["os.path"]}.items():
        assert all(is_eval_module(s) == is_eval_module(pkg) for s in subs)
    assert is_eval_module("urllib") and is_eval_module("itertools") and not is_eval_module("json")
    for name in ["json", "urllib", "textwrap", "itertools", "os", "xml", "email", "re", "asyncio", "heapq"]:
        h = int(hashlib.sha1(name.encode()).hexdigest(), 16) % 5
        assert module_split(name) == ("eval" if h == 0 else "rag" if h in (1, 2) else "train")
        assert module_split(name + ".sub") == module_split(name)
    assert [module_split(m) for m in ("json", "re", "asyncio", "glob")] == ["train", "rag", "rag", "eval"]
    tops = top_level_modules()
    frac = sum(map(is_eval_module, tops)) / len(tops)
    assert 0.1 < frac < 0.3
    frac_rag = sum(module_split(m) == "rag" for m in tops) / len(tops)
    assert 0.3 < frac_rag < 0.5
    assert record_split({"kind": "topic", "module": "", "id": "topic:for"}) == "train"
    assert record_split({"kind": "function", "module": "urllib.parse", "id": "urllib.parse.quote"}) == "eval"
    assert record_split({"kind": "function", "module": "re", "id": "re.sub"}) == "rag"
    with pytest.raises(ValueError):
        is_eval_module("")
    with pytest.raises(ValueError, match="module_split"):
        module_split(None)

# -----------------------------------------------------------------------------
# text helpers


def test_first_sentence_and_paragraph():
    assert first_sentence("Return x. More text here.") == "Return x."
    assert first_sentence("Split, e.g. on commas. Then stop.") == "Split, e.g. on commas."
    assert first_sentence("gethostbyname(host) -> address\n\nReturn the IP address for a host.") == \
        "Return the IP address for a host."
    assert first_sentence("min(iterable) -> value\nmin(a, b) -> value\n\nWith a single iterable, return its "
                          "smallest item.") == "With a single iterable, return its smallest item."
    assert first_sentence("Wrapped over\ntwo lines. Second.") == "Wrapped over two lines."
    assert first_sentence("version 3.11 is here. Yes.") == "version 3.11 is here."
    assert first_paragraph('The "for" statement\n*******************\n\nThe "for" statement is used to iterate.') \
        == 'The "for" statement is used to iterate.'
    assert first_paragraph("ast\n~~~\n\n   grammar ::= x\n\nThe `ast` module helps.") == "The `ast` module helps."
    topic = ('The "x" statement\n*****************\n\nX statements do\nthings:\n\n   x_stmt ::= "x"\n\n'
             'The simple form is equivalent to\n\n   if y: pass\n\nobject.__x__(self)\n\nIt is rarely used.')
    assert prose(topic) == "X statements do things.\n\nIt is rarely used."
    long = " ".join(["This is a sentence."] * 100)
    assert len(first_paragraph(long, max_chars=100)) <= 100 and first_paragraph(long, 100).endswith(".")


def test_mentions_held_out_module():
    tops = {"urllib", "glob"}
    assert mentions_held_out_module("use urllib.parse.quote", tops)
    assert mentions_held_out_module("see `glob` for that", tops)
    assert mentions_held_out_module("the glob module", tops)
    assert mentions_held_out_module("from urllib import request", tops)
    assert not mentions_held_out_module("a glob pattern like *.py", tops)
    assert not mentions_held_out_module("use json.loads", tops)

# -----------------------------------------------------------------------------
# reading spans out of docstrings (the built-in QA's answers, tasks/baselines.py's per-type rule)


def test_doc_sentences_and_signature_params():
    doc = ("dedent(text)\n\nRemove any common leading\nwhitespace, e.g. tabs. Then stop.\n\nExample:\n>>> dedent('  x')\n"
           "'x'\n\n    indented code. Not prose.\n\nLast one.")
    assert doc_sentences(doc) == ["dedent(text)", "Remove any common leading whitespace, e.g. tabs.", "Then stop.",
                                  "Example:", "Last one."]
    assert sentences("One. Two, e.g. three. four.") == ["One.", "Two, e.g. three. four."]
    assert signature_params("fill(text, width=70, *, sep: str = ' ', d={'a': (1, 2)}, **kwargs)") == \
        [("text", None), ("width", "70"), ("sep", "' '"), ("d", "{'a': (1, 2)}"), ("**kwargs", None)]
    assert signature_params("class X(a, /, b='x,y')") == [("a", None), ("b", "'x,y'")]
    assert signature_params("getvalue()") == [] and signature_params("no parens") == []


def test_docstring_spans():
    sents = ["Return the IP address for a host.", "If the host is unknown, nothing is returned.",
             "Raises ValueError if the name is empty.", "Use gethostbyname_ex() instead.", "See also `socket.getaddrinfo`."]
    assert returns_statement(sents) == ("the IP address for a host", sents[0])
    assert raise_statements(sents) == [("ValueError", "if the name is empty", sents[2])]
    assert raise_statements(["If x is negative, a TypeError is raised."]) == \
        [("TypeError", "If x is negative", "If x is negative, a TypeError is raised.")]
    assert condition_statements(sents) == [("If", "the host is unknown", "nothing is returned", sents[1])]
    assert [(r, n, marked) for r, n, marked, _ in xref_statements(sents)] == \
        [("instead", "gethostbyname_ex", True), ("see", "socket.getaddrinfo", True)]
    doc = ("Draw a circle.\n\nArguments:\nradius -- a number\nextent:  an angle; if not given,\n"
           "         the entire circle. Really.\n\n*steps* is the number of steps, *x* is ignored.")
    sents = doc_sentences(doc)
    assert param_statement(doc, sents, "radius") == ("is", "", "a number", "radius -- a number")
    assert param_statement(doc, sents, "extent")[2] == "an angle; if not given, the entire circle"
    assert param_statement(doc, sents, "steps")[:3] == ("is", "is", "the number of steps")
    assert param_statement(doc, sents, "missing") is None

# -----------------------------------------------------------------------------
# the built-in data


@pytest.fixture(scope="module")
def built(tmp_path_factory, records):
    out = tmp_path_factory.mktemp("builtin")
    build_stdlib_data(out, max_docs=160, max_train=40, max_eval=25, max_sft=30, records=records, progress=False)
    return str(out)


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_qa_split_rule():
    for name in ["json", "urllib", "textwrap", "itertools", "os", "xml", "email", "glob", "base64", "difflib", "re"]:
        h = int(hashlib.sha1(name.encode()).hexdigest(), 16)
        want = {0: "dev", 5: "eval"}.get(h % 10) if h % 5 == 0 else "train" if h % 5 in (1, 2) else None
        assert qa_split(name) == want and qa_split(name + ".sub") == want
    assert [qa_split(m) for m in ("json", "re", "fnmatch", "difflib", "glob", "base64")] == \
        [None, "train", "dev", "dev", "eval", "eval"]
    tops = [m for m in top_level_modules() if is_eval_module(m)]
    dev = [m for m in tops if qa_split(m) == "dev"]
    assert 0.3 < len(dev) / len(tops) < 0.7  # two halves of the held-out modules


def test_files_and_caps(built):
    names = sorted(os.listdir(built))
    assert names == ["kb_documents.jsonl", "manifest.json", "multihop_dev.jsonl", "multihop_eval.jsonl",
                     "multihop_train.jsonl", "qa_dev.jsonl", "qa_eval.jsonl", "qa_train.jsonl", "sft_train.jsonl",
                     "sft_val.jsonl"]  # and no temp files (the multihop files: tasks/stdlib_multihop.py)
    kb = read_jsonl(os.path.join(built, "kb_documents.jsonl"))
    qa = {s: read_jsonl(os.path.join(built, f"qa_{s}.jsonl")) for s in ("train", "dev", "eval")}
    assert len(qa["train"]) == 40 and 0 < len(qa["eval"]) <= 25 and len(qa["dev"]) > 0
    multihop = [ex for name in names if name.startswith("multihop_") for ex in read_jsonl(os.path.join(built, name))]
    kept = {i for rows in qa.values() for ex in rows for i in ex["gold_doc_ids"]} | \
        {d["id"] for ex in multihop for d in ex["documents"]}
    assert len(kb) == max(160, len(kept)) and len(kept) < 160  # every gold document, then a sample up to max_docs
    manifest = json.load(open(os.path.join(built, "manifest.json")))
    assert manifest["counts"]["kb_documents"] == len(kb)
    assert all(manifest["counts"][f"qa_{s}"] == len(rows) for s, rows in qa.items())
    assert manifest["held_out_modules"] == sorted(m for m in MODULES if is_eval_module(m))
    assert manifest["dev_modules"] == ["difflib", "fnmatch"] and manifest["test_modules"] == ["base64", "glob"]
    assert manifest["rag_modules"] == sorted(m for m in MODULES if module_split(m) == "rag")
    assert manifest["python_version"] == sys.version.split()[0]
    assert set(manifest["gold_first_baselines_em"]["eval"]) == {"first_sentence", "header_line", "overlap_sentence",
                                                                "per_type_rule", "best_copy_rule"}
    ids = [d["id"] for d in kb]
    assert len(ids) == len(set(ids))
    for d in kb:
        header, _, docstring = d["content"].partition("\n\n")
        assert d["title"] == d["id"] and docstring.strip() and len(docstring) <= 1200  # the doc_chars cap
        assert d["metadata"]["kind"] in ("function", "class", "method")
        assert d["metadata"]["split"] == module_split(d["metadata"]["module"])
    assert {d["metadata"]["split"] for d in kb} == {"train", "rag", "eval"}  # the KB holds all three sides


def test_qa_splits_gold_and_answers(built):
    kb = {d["id"]: d for d in read_jsonl(os.path.join(built, "kb_documents.jsonl"))}
    modules = {}
    for split in ("train", "dev", "eval"):
        rows = read_jsonl(os.path.join(built, f"qa_{split}.jsonl"))
        per_record, gold_first = {}, 0
        for ex in rows:
            assert ex["messages"][0]["role"] == "user" and ex["messages"][1]["role"] == "assistant"
            assert ex["messages"][1]["content"] == ex["answers"][0]
            (gold,) = ex["gold_doc_ids"]
            assert gold in kb  # every gold document is in the KB
            # qa_train asks about rag modules, qa_dev and qa_eval about the two halves of the eval modules
            assert qa_split(kb[gold]["metadata"]["module"]) == split and ex["module"] == kb[gold]["metadata"]["module"]
            modules.setdefault(split, set()).add(ex["module"].split(".")[0])
            assert contains_answer(kb[gold], ex["answers"][0])  # the answer is a verbatim span of the gold document
            ids = [d["id"] for d in ex["documents"]]
            assert gold in ids and len(ids) == len(set(ids)) <= 3 and all(i in kb for i in ids)  # up to 2 distractors
            assert all(kb[i]["metadata"]["module"] == ex["module"] for i in ids)  # distractors of the same module
            gold_first += ids[0] == gold
            per_record[gold] = per_record.get(gold, 0) + 1
            qtype, question = ex["question_type"], ex["messages"][0]["content"]
            header = kb[gold]["content"].split("\n", 1)[0]
            assert qtype in QUESTION_TYPES and ex["id"] == f"{gold}#{qtype}"
            if qtype == "sig":
                assert header.endswith(ex["answers"][0])
            if qtype == "module":
                assert ex["answers"] == [kb[gold]["metadata"]["module"]]
                short = ex["answers"][0].rsplit(".", 1)[-1]
                assert len(short) < 4 or short not in question.lower()  # no giveaway
            if qtype == "default":  # "What does `p` default to in ...?" -> the "p=value" of the header line
                assert any(f"{p}={ex['answers'][0]}" in header for p in re.findall(r"`(\w+)`", question))
            if qtype in ("returns", "condition", "param", "raises_when"):  # a span inside a sentence, not a sentence
                assert not ex["answers"][0].endswith(".") and ex["answers"][0] != first_sentence(kb[gold]["content"])
        assert max(per_record.values()) <= PER_RECORD
        assert gold_first < len(rows)  # the gold document is not always ranked first
        types = {ex["question_type"] for ex in rows}
        assert len(types & {"default", "returns", "raises", "condition", "param", "xref", "raises_when"}) >= 2
    assert not modules["dev"] & modules["eval"] and not modules["train"] & (modules["dev"] | modules["eval"])


def test_fixed_position_rules_fail_but_questions_stay_answerable(built):
    """The acceptance property of issue 14: on the built questions, every fixed copy rule (first sentence, header
    line, best-overlap sentence of the top document) and the best of them chosen per question stay far below the
    answerability oracle (gold document first + the per-type rule), and the answers are verbatim in a gold
    document. On the pre-rebuild questions (desc/sig/module only) the per-question best copy rule scored ~99."""
    rows = [ex for s in ("train", "dev", "eval") for ex in read_jsonl(os.path.join(built, f"qa_{s}.jsonl"))]
    kb = {d["id"]: d for d in read_jsonl(os.path.join(built, "kb_documents.jsonl"))}
    assert len(rows) >= 60
    table = score_baselines(rows, lambda ex: oracle_documents(ex, ex["documents"]))["all"]
    for rule in ("first_sentence", "header_line", "overlap_sentence"):
        assert table[f"{rule}:em"] <= 35, (rule, table)
    assert table["best_copy_rule:em"] <= 45, table
    assert table["oracle:em"] >= 90 and table["oracle:em"] - table["best_copy_rule:em"] >= 40, table
    verbatim = sum(any(contains_answer(kb[g], ex["answers"][0]) for g in ex["gold_doc_ids"]) for ex in rows)
    assert verbatim >= 0.9 * len(rows)


def test_sft_has_no_eval_or_rag_modules(built):
    eval_tops = [m for m in MODULES if module_split(m) != "train"]
    rows = read_jsonl(os.path.join(built, "sft_train.jsonl")) + read_jsonl(os.path.join(built, "sft_val.jsonl"))
    assert len(rows) > 30
    identity = CustomJSON(IDENTITY_FILE).examples
    assert 30 <= len(identity) <= 50
    identity_users = {c["messages"][-2]["content"] for c in identity}
    assert sum(r["messages"][-2]["content"] in identity_users for r in rows) >= 30  # identity mixed in
    for r in rows:
        text = json.dumps(r)
        for m in eval_tops:
            for pattern in (rf"`{m}\b", rf"(?<![\w.]){m}\.[A-Za-z_]", rf"\b{m} module"):
                assert not re.search(pattern, text), (m, pattern, text[:300])
    train_text = json.dumps(rows)
    assert "`json" in train_text or "json." in train_text  # train modules are there


def test_tasks(built):
    qa = StdlibQA("eval", data_dir=built)
    assert qa.eval_type == "generative" and len(qa) > 0
    ex = qa[0]
    answer = ex["answers"][0]
    assert qa.evaluate(ex, answer + " [1]") is True  # citations stripped
    assert qa.evaluate(ex, "something else entirely") is False
    assert qa.f1(ex, answer) == 1.0 and 0.0 <= qa.f1(ex, "nothing") < 1.0
    assert len(StdlibQA("train", data_dir=built, start=0, stop=10)) == 10
    dev = StdlibQA("dev", data_dir=built)
    assert len(dev) > 0 and {e["id"] for e in dev.examples}.isdisjoint(e["id"] for e in qa.examples)
    chat = StdlibChat("train", data_dir=built)
    assert len(chat) > 0 and chat[0]["messages"][-1]["role"] == "assistant"
    with pytest.raises(ValueError):
        StdlibQA("test", data_dir=built)  # the registry maps test -> eval; the task itself names its files
    with pytest.raises(FileNotFoundError, match="python -m tasks.stdlib_qa"):
        StdlibQA("train", data_dir=os.path.join(built, "missing"))


def test_build_is_deterministic(built, records, tmp_path):
    build_stdlib_data(tmp_path, max_docs=160, max_train=40, max_eval=25, max_sft=30, records=records, progress=False)
    for name in os.listdir(built):
        assert open(os.path.join(built, name), "rb").read() == open(tmp_path / name, "rb").read(), name
