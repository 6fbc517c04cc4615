"""
Tests for the built-in offline data: tasks/stdlib_docs.py (the harvest and the held-out split) and
tasks/stdlib_qa.py (KB, QA, SFT files and the StdlibQA / StdlibChat tasks).

    pytest -q tests/test_stdlib_qa.py
"""

import os
import sys
import re
import json
import hashlib

import pytest

from tasks.stdlib_docs import harvest, module_split, is_eval_module, record_split, top_level_modules
from tasks.stdlib_qa import (build_stdlib_data, first_sentence, first_paragraph, prose, mentions_held_out_module,
                             contains_answer, StdlibQA, StdlibChat, IDENTITY_FILE)
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
# the built-in data


@pytest.fixture(scope="module")
def built(tmp_path_factory, records):
    out = tmp_path_factory.mktemp("builtin")
    build_stdlib_data(out, max_docs=100, max_train=40, max_eval=25, max_sft=30, records=records, progress=False)
    return str(out)


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_files_and_caps(built):
    names = sorted(os.listdir(built))
    assert names == ["kb_documents.jsonl", "manifest.json", "qa_eval.jsonl", "qa_train.jsonl", "sft_train.jsonl",
                     "sft_val.jsonl"]  # and no temp files
    kb = read_jsonl(os.path.join(built, "kb_documents.jsonl"))
    train, ev = read_jsonl(os.path.join(built, "qa_train.jsonl")), read_jsonl(os.path.join(built, "qa_eval.jsonl"))
    assert len(train) == 40 and 0 < len(ev) <= 25
    assert len(kb) == max(100, len({i for ex in train + ev for i in ex["gold_doc_ids"]}))
    manifest = json.load(open(os.path.join(built, "manifest.json")))
    assert manifest["counts"]["kb_documents"] == len(kb) and manifest["counts"]["qa_eval"] == len(ev)
    assert manifest["held_out_modules"] == sorted(m for m in MODULES if is_eval_module(m))
    assert manifest["rag_modules"] == sorted(m for m in MODULES if module_split(m) == "rag")
    assert manifest["python_version"] == sys.version.split()[0]
    ids = [d["id"] for d in kb]
    assert len(ids) == len(set(ids))
    for d in kb:
        assert d["title"] == d["id"] and d["content"].strip() and len(d["content"]) < 1400
        assert d["metadata"]["kind"] in ("function", "class", "method")
        assert d["metadata"]["split"] == module_split(d["metadata"]["module"])
    assert {d["metadata"]["split"] for d in kb} == {"train", "rag", "eval"}  # the KB holds all three sides


def test_qa_splits_gold_and_answers(built):
    kb = {d["id"]: d for d in read_jsonl(os.path.join(built, "kb_documents.jsonl"))}
    for split in ("train", "eval"):
        rows = read_jsonl(os.path.join(built, f"qa_{split}.jsonl"))
        seen_records = set()
        for ex in rows:
            assert ex["messages"][0]["role"] == "user" and ex["messages"][1]["role"] == "assistant"
            assert ex["messages"][1]["content"] == ex["answers"][0]
            (gold,) = ex["gold_doc_ids"]
            assert gold in kb  # every gold document is in the KB
            # qa_train asks about rag modules only, qa_eval about eval modules only: never a pretraining module
            assert module_split(kb[gold]["metadata"]["module"]) == {"train": "rag", "eval": "eval"}[split]
            assert contains_answer(kb[gold], ex["answers"][0])  # the answer is in the gold document
            assert ex["documents"][0]["id"] == gold and all(d["id"] in kb for d in ex["documents"])
            assert gold not in seen_records  # at most one question per record
            seen_records.add(gold)
            if ex["question_type"] == "sig":
                assert kb[gold]["content"].split("\n", 1)[0].endswith(ex["answers"][0])
            if ex["question_type"] == "module":
                assert ex["answers"] == [kb[gold]["metadata"]["module"]]
                short = ex["answers"][0].rsplit(".", 1)[-1]
                assert len(short) < 4 or short not in ex["messages"][0]["content"].lower()  # no giveaway
        types = {ex["question_type"] for ex in rows}
        assert types <= {"desc", "sig", "module"} and len(types) >= 2


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
    chat = StdlibChat("train", data_dir=built)
    assert len(chat) > 0 and chat[0]["messages"][-1]["role"] == "assistant"
    with pytest.raises(ValueError):
        StdlibQA("test", data_dir=built)
    with pytest.raises(FileNotFoundError, match="python -m tasks.stdlib_qa"):
        StdlibQA("train", data_dir=os.path.join(built, "missing"))


def test_build_is_deterministic(built, records, tmp_path):
    build_stdlib_data(tmp_path, max_docs=100, max_train=40, max_eval=25, max_sft=30, records=records, progress=False)
    for name in os.listdir(built):
        assert open(os.path.join(built, name), "rb").read() == open(tmp_path / name, "rb").read(), name
