"""
Tests for knowledge-base directories (nanochat/kb.py, and the builder and `python -m nanochat.retrieval` CLI on top
of it in nanochat/retrieval.py): document formats, bad lines, chunking, duplicates, --append, kb.json as a manifest
(every file with size + sha256, verified at load), what --output may replace (--replace), crash safety and
clean-up, the build report only with --report, and the warning about documents far beyond any prompt.

    pytest -q tests/test_kb.py
Every test runs with NANOCHAT_BASE_DIR in a temp dir, so nothing here touches the user's ~/.cache/nanochat.
"""

import os
import json
import shutil
import dataclasses
import subprocess
import sys

import numpy as np
import pytest

from nanochat import retrieval as R
from nanochat.rag_utils import citation_correctness, doc_key
from tasks.rag_task import cite_gold
from scripts.rag_eval import retrieval_metrics
from nanochat.kb import chunk_words, list_entries, LONG_DOC_CHARS
from nanochat.retrieval import (BM25Retriever, RetrievalManager, build_knowledge_base, load_retriever,
                                read_kb_meta)
from test_retrieval import SMALL, STDLIB_QUERIES, stdlib_corpus  # the shared small corpora (no tests imported)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def base_dir(tmp_path_factory, monkeypatch):
    """NANOCHAT_BASE_DIR in a temp dir (outside tmp_path, whose listing tests check) for the test and the CLI
    processes it starts (they inherit it)."""
    d = tmp_path_factory.mktemp("nanochat_base")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(d))
    return d


def one_error_line(p):
    """A CLI that failed on bad input: exit 2, one line "error: ..." last on stderr (after any progress bars), no
    traceback. Returns that line."""
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    line = p.stderr.strip().splitlines()[-1]
    assert line.startswith("error: "), p.stderr
    return line


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "nanochat.retrieval", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def small_src(path, rows=SMALL):
    return write_jsonl(path, [{"id": i, "title": t, "content": c} for i, t, c in rows])


# -----------------------------------------------------------------------------
# building: the CLI, formats, bad lines, chunking, duplicates


def test_cli_builds_each_format(tmp_path):
    ours = write_jsonl(tmp_path / "ours.jsonl", [
        {"id": "a", "title": "Alpha", "content": "alpha particles are helium nuclei", "metadata": {"src": "x"}},
        {"title": "Beta", "text": "beta decay emits an electron"}])  # no id: a stable hash id
    beir = write_jsonl(tmp_path / "corpus.jsonl", [{"_id": "b1", "title": "Gamma", "text": "gamma rays are photons"}])
    flash = write_jsonl(tmp_path / "flash.jsonl", [{"id": "f1", "contents": '"Delta"\ndelta is a river landform'}])
    p = run_cli("--documents", ours, beir, flash, "--output", tmp_path / "kb", "--type", "bm25")
    assert p.returncode == 0, p.stderr
    assert "4 documents" in p.stdout and "0 duplicates" in p.stdout
    meta = json.load(open(tmp_path / "kb" / "kb.json"))
    for key in ("format_version", "retriever_type", "model_name", "embedding_dim", "num_documents", "content_hash",
                "build_args", "created", "files"):
        assert key in meta
    assert meta["retriever_type"] == "bm25" and meta["num_documents"] == 4 and meta["format_version"] == 2
    on_disk = sorted(f for f in list_entries(tmp_path / "kb") if f != "kb.json")
    assert sorted(meta["files"]) == on_disk and "bm25s/vocab.index.json" in on_disk  # the manifest lists every file
    assert meta["files"]["documents.jsonl"]["sha256"] == meta["content_hash"]
    rm = RetrievalManager("bm25", tmp_path / "kb")
    by_id = {d.id: d for d in rm.retriever.documents}
    assert by_id["a"].metadata["src"] == "x" and by_id["b1"].title == "Gamma"
    assert by_id["f1"].title == "Delta" and by_id["f1"].content == "delta is a river landform"
    hashed = [i for i in by_id if i.startswith("doc_")]
    assert len(hashed) == 1 and by_id[hashed[0]].title == "Beta"
    assert rm.retrieve("river delta", 1)[0][0].id == "f1"
    lines = [json.loads(x) for x in open(tmp_path / "kb" / "documents.jsonl")]
    assert set(lines[0]) == {"id", "parent_id", "title", "content", "metadata"}


def test_cli_bad_lines_skip_bad_and_empty(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [{"id": "1", "content": "fine text"}, "{not json",
                                             {"id": "3", "title": "no text"}, {"id": "4", "content": "   "},
                                             {"id": "5", "content": "more fine text"}])
    p = run_cli("--documents", src, "--output", tmp_path / "kb")
    assert one_error_line(p).startswith(f"error: {src}:2: invalid JSON")
    assert not (tmp_path / "kb").exists()
    p = run_cli("--documents", src, "--output", tmp_path / "kb", "--skip-bad")
    assert p.returncode == 0, p.stderr
    assert "3 bad lines skipped" in p.stdout and len(load_retriever(tmp_path / "kb")) == 2
    for rows, reason in [([{"id": "3", "title": "t"}], "no text field"), ([{"id": "4", "text": ""}], "empty text"),
                         ([{"_id": 1, "text": ["a"]}], "title/text must be strings"), ([[1, 2]], "expected a JSON object")]:
        bad = write_jsonl(tmp_path / "bad.jsonl", [{"id": "ok", "content": "fine"}] + rows)
        with pytest.raises(ValueError, match=f"{bad}:2: {reason}"):
            build_knowledge_base([bad], tmp_path / "kb2")
    empty = write_jsonl(tmp_path / "empty.jsonl", ["", "{bad"])
    with pytest.raises(ValueError, match="no documents to index"):
        build_knowledge_base([empty], tmp_path / "kb2", skip_bad=True)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_knowledge_base([tmp_path / "missing.jsonl"], tmp_path / "kb2")


def test_chunking_and_duplicates(tmp_path):
    assert chunk_words("a b c d e f g", 3, 1) == ["a b c", "c d e", "e f g"]
    assert chunk_words("a b c d e f g h", 3, 1) == ["a b c", "c d e", "e f g", "g h"]
    assert chunk_words("a b", 5, 2) == ["a b"]
    with pytest.raises(ValueError):
        chunk_words("a b", 2, 2)
    words = " ".join(f"w{i}" for i in range(25))
    src = write_jsonl(tmp_path / "d.jsonl", [{"id": "long", "title": "L", "content": words},
                                             {"id": "short", "content": "tiny doc"},
                                             {"id": "short", "content": "tiny doc"},       # exact duplicate
                                             {"id": "copy", "content": "tiny doc"}])       # same text, other id
    s = build_knowledge_base([src], tmp_path / "kb", chunk_size=10, chunk_overlap=3, show_progress=False)
    assert s["documents"] == 2 and s["duplicates"] == 2 and s["chunks"] == 5
    r = load_retriever(tmp_path / "kb")
    assert [d.id for d in r.documents] == ["long#0", "long#1", "long#2", "long#3", "short"]
    assert r.documents[1].content.split()[:3] == ["w7", "w8", "w9"]  # 3 words of overlap
    assert all(d.metadata["parent_id"] == "long" and d.title == "L" for d in r.documents[:4])
    lines = [json.loads(x) for x in open(tmp_path / "kb" / "documents.jsonl")]
    assert lines[2]["parent_id"] == "long" and lines[4]["parent_id"] == "short"
    clash = write_jsonl(tmp_path / "clash.jsonl", [{"id": "x", "content": "one"}, {"id": "x", "content": "two"}])
    with pytest.raises(ValueError, match=r"clash.jsonl:2: duplicate id 'x'"):
        build_knowledge_base([clash], tmp_path / "kb3")


def test_load_checks(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [{"id": i, "title": t, "content": c} for i, t, c in SMALL])
    build_knowledge_base([src], tmp_path / "kb", "dense", show_progress=False)
    kb = tmp_path / "kb"
    assert len(RetrievalManager("dense", kb, model_name="all-MiniLM-L6-v2")) == len(SMALL)
    with pytest.raises(ValueError, match="built with model 'sentence-transformers/all-MiniLM-L6-v2'.*other/model"):
        load_retriever(kb, model_name="other/model")
    with pytest.raises(ValueError, match="retriever_type is 'dense' but 'bm25' was requested"):
        RetrievalManager("bm25", kb)
    with pytest.raises(ValueError, match="retriever_type is 'dense' but 'bm25' was requested"):
        BM25Retriever.load(kb)
    # edited documents.jsonl: the content hash no longer matches
    docs_path = kb / "documents.jsonl"
    original = docs_path.read_bytes()
    docs_path.write_bytes(original.replace(b"Cats are", b"Cats were"))
    with pytest.raises(ValueError, match=r"documents.jsonl: \d+ bytes but kb.json recorded \d+"):
        load_retriever(kb)
    docs_path.write_bytes(original)
    meta = json.loads((kb / "kb.json").read_text())
    (kb / "kb.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(ValueError, match="format_version 99"):
        load_retriever(kb)
    (kb / "kb.json").write_text(json.dumps(meta))
    os.remove(kb / "index.faiss")
    with pytest.raises(FileNotFoundError, match="missing file index.faiss"):
        load_retriever(kb)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_retriever(tmp_path / "nope")
    os.remove(kb / "kb.json")
    with pytest.raises(FileNotFoundError, match="missing file kb.json"):
        load_retriever(kb)


def test_dense_append_keeps_old_embeddings(tmp_path):
    first = write_jsonl(tmp_path / "a.jsonl", [{"id": i, "title": t, "content": c} for i, t, c in SMALL[:5]])
    more = write_jsonl(tmp_path / "b.jsonl", [{"id": i, "title": t, "content": c} for i, t, c in SMALL[3:]])
    build_knowledge_base([first], tmp_path / "kb", "dense", show_progress=False)
    old = np.load(tmp_path / "kb" / "embeddings.npy")
    s = build_knowledge_base([more], tmp_path / "kb", "dense", append=True, show_progress=False)
    assert s["duplicates"] == 2 and s["chunks"] == 3 and s["total_chunks"] == 8
    new = np.load(tmp_path / "kb" / "embeddings.npy")
    assert new.shape == (8, old.shape[1]) and new[:5].tobytes() == old.tobytes()
    r = load_retriever(tmp_path / "kb")
    fresh = r.encode([d.text for d in r.documents[5:]])
    np.testing.assert_allclose(new[5:], fresh, atol=1e-5)
    assert r.retrieve("highest mountain", 1)[0][0].id == "everest"
    with pytest.raises(ValueError, match="no new documents"):
        build_knowledge_base([more], tmp_path / "kb", "dense", append=True, show_progress=False)
    with pytest.raises(FileNotFoundError, match="no kb.json"):
        build_knowledge_base([more], tmp_path / "nokb", "dense", append=True)


def test_bm25_append_equals_full_build(tmp_path):
    docs = stdlib_corpus()[:150]
    a = write_jsonl(tmp_path / "a.jsonl", [dataclasses.asdict(d) for d in docs[:100]])
    b = write_jsonl(tmp_path / "b.jsonl", [dataclasses.asdict(d) for d in docs[100:]])
    build_knowledge_base([a], tmp_path / "kb", show_progress=False)
    build_knowledge_base([b], tmp_path / "kb", append=True, show_progress=False)
    build_knowledge_base([a, b], tmp_path / "full", show_progress=False)
    r1, r2 = load_retriever(tmp_path / "kb"), load_retriever(tmp_path / "full")
    for q in STDLIB_QUERIES:
        assert [(d.id, s) for d, s in r1.retrieve(q, 5)] == [(d.id, s) for d, s in r2.retrieve(q, 5)]


def test_build_crash_leaves_no_kb_or_the_previous_one(tmp_path, monkeypatch):
    src = write_jsonl(tmp_path / "d.jsonl", [{"id": i, "title": t, "content": c} for i, t, c in SMALL])
    real_save = BM25Retriever._save_index

    def crashing_save(self, d):
        real_save(self, d)  # some index files are written...
        raise RuntimeError("disk full")  # ...then the build dies

    monkeypatch.setattr(BM25Retriever, "_save_index", crashing_save)
    with pytest.raises(RuntimeError, match="disk full"):
        build_knowledge_base([src], tmp_path / "kb", show_progress=False)
    assert os.listdir(tmp_path) == ["d.jsonl"]  # no KB, no temp dir left behind
    monkeypatch.setattr(BM25Retriever, "_save_index", real_save)
    build_knowledge_base([src], tmp_path / "kb", show_progress=False)
    before = {f: (tmp_path / "kb" / f).read_bytes() for f in ("kb.json", "documents.jsonl")}
    more = write_jsonl(tmp_path / "more.jsonl", [{"id": "new", "content": "a brand new document"}])
    monkeypatch.setattr(BM25Retriever, "_save_index", crashing_save)
    with pytest.raises(RuntimeError):
        build_knowledge_base([more], tmp_path / "kb", append=True, show_progress=False)
    assert {f: (tmp_path / "kb" / f).read_bytes() for f in before} == before
    assert sorted(os.listdir(tmp_path)) == ["d.jsonl", "kb", "more.jsonl"]
    assert len(load_retriever(tmp_path / "kb")) == len(SMALL)


def test_output_that_is_not_a_kb_is_refused(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [{"id": "a", "content": "some text"}])
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(ValueError, match=r"not a knowledge base \(no kb.json\) and holds thesis.tex; refusing"):
        build_knowledge_base([src], mine, show_progress=False)
    p = run_cli("--documents", src, "--output", mine, "--replace")  # --replace is for files inside a real KB only
    assert "refusing to replace" in one_error_line(p)
    assert os.listdir(mine) == ["thesis.tex"] and sorted(os.listdir(tmp_path)) == ["d.jsonl", "mine"]
    (tmp_path / "empty").mkdir()  # an empty directory (e.g. made by mkdir -p) is fine
    build_knowledge_base([src], tmp_path / "empty", show_progress=False)
    assert len(load_retriever(tmp_path / "empty")) == 1


def test_non_utf8_line_names_file_and_line(tmp_path):
    src = tmp_path / "d.jsonl"
    src.write_bytes(b'{"id": "1", "content": "fine"}\n{"id": "2", "content": "caf\xe9"}\n{"id": "3", "content": "ok"}\n')
    with pytest.raises(ValueError, match=r"d.jsonl:2: not valid UTF-8"):
        build_knowledge_base([src], tmp_path / "kb", show_progress=False)
    assert not (tmp_path / "kb").exists()
    p = run_cli("--documents", src, "--output", tmp_path / "kb", "--skip_bad")  # underscore spelling works too
    assert p.returncode == 0, p.stderr
    assert "1 bad lines skipped" in p.stdout and [d.id for d in load_retriever(tmp_path / "kb").documents] == ["1", "3"]


def test_cli_underscore_flags(tmp_path):
    words = " ".join(f"w{i}" for i in range(30))
    src = write_jsonl(tmp_path / "d.jsonl", [{"id": "long", "content": words}])
    p = run_cli("--documents", src, "--output", tmp_path / "kb", "--chunk_size", 10, "--chunk_overlap", 2)
    assert p.returncode == 0, p.stderr
    assert [d.id for d in load_retriever(tmp_path / "kb").documents] == ["long#0", "long#1", "long#2", "long#3"]


_KILL_SCRIPT = """
import os, signal, sys
from nanochat import retrieval
where = sys.argv[3]
if where == "save":  # die half way through writing the index
    real = retrieval.BM25Retriever._save_index
    def save(self, d):
        real(self, d)
        os.kill(os.getpid(), signal.SIGKILL)
    retrieval.BM25Retriever._save_index = save
else:  # die in the instant after the old KB was moved aside, before the new one is renamed in
    real_rename = os.rename
    def rename(a, b):
        real_rename(a, b)
        if b.endswith(".old"):
            os.kill(os.getpid(), signal.SIGKILL)
    os.rename = rename
retrieval.build_knowledge_base([sys.argv[1]], sys.argv[2], append=True, show_progress=False)
"""


@pytest.mark.parametrize("where", ["save", "rename"])
def test_killed_build_is_cleaned_up_or_recovered(tmp_path, where):
    src = write_jsonl(tmp_path / "d.jsonl", [{"id": i, "title": t, "content": c} for i, t, c in SMALL])
    more = write_jsonl(tmp_path / "more.jsonl", [{"id": "new", "content": "a brand new document"}])
    build_knowledge_base([src], tmp_path / "kb", show_progress=False)
    p = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, more, tmp_path / "kb", where], cwd=REPO, timeout=120)
    assert p.returncode == -9
    leftovers = sorted(f for f in os.listdir(tmp_path) if f.startswith(".kb."))
    if where == "save":  # the previous KB is intact; the half-written temp dir is left behind, until a load
        assert len(leftovers) == 1 and leftovers[0].endswith(".tmp") and len(load_retriever(tmp_path / "kb")) == len(SMALL)
        assert sorted(os.listdir(tmp_path)) == ["d.jsonl", "kb", "more.jsonl"]
    else:  # no kb/ at all: the old one was moved aside, the complete new one not yet renamed in; loading finishes it
        assert not (tmp_path / "kb").exists() and sorted(f.rsplit(".", 1)[1] for f in leftovers) == ["old", "tmp"]
        assert len(load_retriever(tmp_path / "kb")) == len(SMALL) + 1
        assert sorted(os.listdir(tmp_path)) == ["d.jsonl", "kb", "more.jsonl"]
    # the next build removes whatever the dead run left
    build_knowledge_base([src, more], tmp_path / "kb", show_progress=False)
    assert sorted(os.listdir(tmp_path)) == ["d.jsonl", "kb", "more.jsonl"]
    assert len(load_retriever(tmp_path / "kb")) == len(SMALL) + 1


def test_append_keeps_index_type_and_build_history(tmp_path):
    first = write_jsonl(tmp_path / "a.jsonl", [{"id": i, "title": t, "content": c} for i, t, c in SMALL[:5]])
    more = write_jsonl(tmp_path / "b.jsonl", [{"id": i, "title": t, "content": c} for i, t, c in SMALL[5:]])
    build_knowledge_base([first], tmp_path / "kb", "dense", index_type="hnsw", show_progress=False)
    with pytest.raises(ValueError, match="has a 'hnsw' index but --index flat"):
        build_knowledge_base([more], tmp_path / "kb", "dense", index_type="flat", append=True, show_progress=False)
    build_knowledge_base([more], tmp_path / "kb", "dense", append=True, show_progress=False)
    meta = json.loads((tmp_path / "kb" / "kb.json").read_text())
    assert meta["config"]["index_type"] == "hnsw" and meta["build_args"]["index"] == "hnsw"
    assert meta["build_args"]["documents"] == [os.path.abspath(more)] and meta["build_args"]["append"]
    assert [b["documents"] for b in meta["build_args"]["previous_builds"]] == [[os.path.abspath(first)]]
    assert len(load_retriever(tmp_path / "kb")) == len(SMALL)


def test_kb_json_dim_and_bm25s_files_are_checked(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [{"id": i, "title": t, "content": c} for i, t, c in SMALL])
    build_knowledge_base([src], tmp_path / "dense", "dense", show_progress=False)
    meta = json.loads((tmp_path / "dense" / "kb.json").read_text())
    assert meta["embedding_dim"] == 384
    (tmp_path / "dense" / "kb.json").write_text(json.dumps({**meta, "embedding_dim": 768}))
    with pytest.raises(ValueError, match="384-dim vectors but kb.json says embedding_dim 768"):
        load_retriever(tmp_path / "dense")
    build_knowledge_base([src], tmp_path / "bm25", show_progress=False)
    os.remove(tmp_path / "bm25" / "bm25s" / "vocab.index.json")
    with pytest.raises(FileNotFoundError, match=r"missing file bm25s/vocab.index.json"):
        load_retriever(tmp_path / "bm25")


def test_chunked_kb_cites_and_recalls_parent_documents(tmp_path):
    filler = " ".join(f"filler{i}" for i in range(40))
    src = write_jsonl(tmp_path / "d.jsonl", [
        {"id": "walrus", "title": "Walrus", "content": filler + " the walrus lives in the arctic ocean " + filler},
        {"id": "cats", "content": "cats purr"}])
    build_knowledge_base([src], tmp_path / "kb", chunk_size=20, show_progress=False)
    rm = RetrievalManager("bm25", tmp_path / "kb")
    docs = R.results_to_dicts(rm.retrieve("cats purr", 1) + rm.retrieve("where does the walrus live arctic", 1))
    assert docs[1]["id"].startswith("walrus#") and docs[1]["parent_id"] == "walrus" and doc_key(docs[1]) == "walrus"
    assert docs[0]["id"] == "cats" and "parent_id" not in docs[0]
    assert citation_correctness([2], docs, ["walrus"]) == 1.0 and citation_correctness([1], docs, ["walrus"]) == 0.0
    assert retrieval_metrics([doc_key(d) for d in docs], ["walrus"], 2)["recall"] == 1.0
    conv = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "the arctic"}],
            "gold_doc_ids": ["walrus"]}
    assert cite_gold(conv, docs)["messages"][-1]["content"] == "the arctic [2]"
    parts = rm.retriever.get_parts("walrus")
    assert [d.id for d in parts] == [f"walrus#{i}" for i in range(len(parts))] and len(parts) >= 4
    assert rm.retriever.get_parts("cats")[0].id == "cats" and rm.retriever.get_parts("nope") == []




# -----------------------------------------------------------------------------
# issue 15: what --output may replace, swapped files, bad kb.json, side effects, huge documents, clean-up


def test_output_with_a_kb_json_that_is_no_manifest_is_refused(tmp_path):
    """Issue 15 item 1: any file named kb.json (say {"my": "config"}) made the directory replaceable: data.csv
    was deleted with exit 0."""
    src = write_jsonl(tmp_path / "d.jsonl", [{"id": "a", "content": "some text"}])
    for i, fake in enumerate(['{"my": "config"}', "[1, 2]", "not json", '{"format_version": 1}']):
        mine = tmp_path / f"mine{i}"
        mine.mkdir()
        (mine / "kb.json").write_text(fake)
        (mine / "data.csv").write_text("a,b\n1,2\n")
        p = run_cli("--documents", src, "--output", mine) if i == 0 else None
        if p is not None:
            line = one_error_line(p)
            assert "is not a knowledge base" in line and "data.csv, kb.json" in line
        for replace in (False, True):  # --replace only overrides foreign files inside a real KB
            with pytest.raises(ValueError, match=r"is not a knowledge base .*kb.json.* holds data.csv, kb.json"):
                build_knowledge_base([src], mine, show_progress=False, replace=replace)
        assert sorted(os.listdir(mine)) == ["data.csv", "kb.json"] and (mine / "kb.json").read_text() == fake


def test_rebuild_refuses_files_the_manifest_does_not_list_and_replace_names_them(tmp_path, capsys):
    """Issue 15 item 1: rebuilding a KB the user had put README_mine.txt into deleted it without a word."""
    src = small_src(tmp_path / "d.jsonl")
    kb = tmp_path / "kb"
    build_knowledge_base([src], kb, show_progress=False)
    (kb / "README_mine.txt").write_text("my notes")
    (kb / "bm25s" / "extra.bin").write_bytes(b"x")
    for append in (False, True):
        with pytest.raises(ValueError, match=r"holds files that are not part of its knowledge base: README_mine.txt, "
                                             r"bm25s/extra.bin; move them out, or pass --replace"):
            build_knowledge_base([src], kb, append=append, show_progress=False)
    with pytest.raises(ValueError, match="README_mine.txt"):
        R.main(["--documents", src, "--output", str(kb)])  # the CLI (in-process: run_main makes it one line, exit 2)
    assert (kb / "README_mine.txt").exists() and len(load_retriever(kb)) == len(SMALL)  # the old KB, intact
    capsys.readouterr()
    assert R.main(["--documents", src, "--output", str(kb), "--replace"]) == 0
    err = capsys.readouterr().err
    assert f"--replace: deleting 2 file(s) in {kb} that are not part of the KB: README_mine.txt, bm25s/extra.bin" in err
    assert not (kb / "README_mine.txt").exists() and not (kb / "bm25s" / "extra.bin").exists()
    build_knowledge_base([src], kb, show_progress=False)  # a KB holding only its own files is replaced silently
    with pytest.raises(ValueError, match="is a file, not a KB directory"):
        build_knowledge_base([src], tmp_path / "d.jsonl", show_progress=False)


def _make_format_1(kb):
    """Turn a freshly built KB into what the previous version wrote: format_version 1, no "files"."""
    meta = json.loads((kb / "kb.json").read_text())
    del meta["files"], meta["encoder_probe"]
    (kb / "kb.json").write_text(json.dumps({**meta, "format_version": 1}))
    return meta


def test_format_1_kbs_load_and_are_replaceable_when_they_hold_only_their_index_files(tmp_path):
    """Decision: a kb.json without "files" is a KB of the old format when it has the old fields (format_version 1,
    retriever_type, num_documents, content_hash) and the directory holds only the index files that type wrote."""
    src = small_src(tmp_path / "d.jsonl")
    for kind in ("simple", "bm25"):
        kb = tmp_path / kind
        build_knowledge_base([src], kb, kind, show_progress=False)
        meta = _make_format_1(kb)
        assert len(load_retriever(kb)) == len(SMALL)
        (kb / "documents.jsonl").write_bytes((kb / "documents.jsonl").read_bytes().replace(b"Cats are", b"Cats arf"))
        with pytest.raises(ValueError, match="documents.jsonl: sha256 .* does not match kb.json"):
            load_retriever(kb)
        (kb / "notes.txt").write_text("mine")
        with pytest.raises(ValueError, match=r"not part of its knowledge base: notes.txt"):
            build_knowledge_base([src], kb, kind, show_progress=False)
        os.remove(kb / "notes.txt")
        build_knowledge_base([src], kb, kind, show_progress=False)  # replaced by a format-2 KB
        assert read_kb_meta(kb)["format_version"] == 2
        del meta["content_hash"]  # without the old required fields it is not a KB
        (kb / "kb.json").write_text(json.dumps({**meta, "format_version": 1}))
        with pytest.raises(ValueError, match="format-1 kb.json without content_hash"):
            load_retriever(kb)
        with pytest.raises(ValueError, match="is not a knowledge base"):
            build_knowledge_base([src], kb, kind, show_progress=False)


def test_swapped_index_files_are_refused_naming_the_file(tmp_path):
    """Issue 15 item 2: only documents.jsonl was hashed, so another KB's bm25s/ and bm25_counts.npz loaded and
    answered with documents that contain none of the query words."""
    a = small_src(tmp_path / "a.jsonl")
    b = write_jsonl(tmp_path / "b.jsonl", [{"id": i, "content": f"zebra{k} unicorn{k} walrus{k}"}
                                           for k, (i, _, _) in enumerate(SMALL)])  # same ids and count, other words
    build_knowledge_base([a], tmp_path / "kb1", show_progress=False)
    build_knowledge_base([b], tmp_path / "kb2", show_progress=False)
    shutil.rmtree(tmp_path / "kb1" / "bm25s")
    shutil.copytree(tmp_path / "kb2" / "bm25s", tmp_path / "kb1" / "bm25s")
    shutil.copy(tmp_path / "kb2" / "bm25_counts.npz", tmp_path / "kb1" / "bm25_counts.npz")
    with pytest.raises(ValueError, match=r"kb1/(bm25s/\S+|bm25_counts.npz): .*(copied in from another KB)"):
        load_retriever(tmp_path / "kb1")
    # a change that keeps the size is caught by the sha256 (and only by it: verify=False loads)
    build_knowledge_base([a], tmp_path / "kb3", show_progress=False)
    data = tmp_path / "kb3" / "bm25s" / "data.csc.index.npy"
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0x55
    data.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"kb3/bm25s/data.csc.index.npy: sha256 [0-9a-f]{16}\.\.\. does not match"):
        RetrievalManager("bm25", tmp_path / "kb3")
    assert len(load_retriever(tmp_path / "kb3", verify=False)) == len(SMALL)


def test_dense_kb_records_its_encoder(tmp_path):
    """kb.json keeps the model name, dim and a probe embedding; an encoder that embeds differently is refused."""
    src = small_src(tmp_path / "d.jsonl", SMALL[:3])
    build_knowledge_base([src], tmp_path / "kb", "dense", show_progress=False)
    meta = json.loads((tmp_path / "kb" / "kb.json").read_text())
    assert meta["model_name"] == R.DEFAULT_DENSE_MODEL and meta["embedding_dim"] == 384
    assert {"embeddings.npy", "index.faiss", "documents.jsonl"} <= set(meta["files"])
    assert len(meta["encoder_probe"].split()) == 32
    other = " ".join(str(-float(x)) for x in meta["encoder_probe"].split())  # what another model might give
    (tmp_path / "kb" / "kb.json").write_text(json.dumps({**meta, "encoder_probe": other}))
    with pytest.raises(ValueError, match="now embeds differently"):
        load_retriever(tmp_path / "kb")
    assert len(load_retriever(tmp_path / "kb", verify=False)) == 3


def test_kb_json_list_and_kb_path_that_is_a_file_are_named(tmp_path):
    """Issue 15 item 6: a kb.json that is a JSON list escaped as AttributeError; a KB path that is a file was
    reported as "does not exist"."""
    src = small_src(tmp_path / "d.jsonl")
    build_knowledge_base([src], tmp_path / "kb", show_progress=False)
    (tmp_path / "kb" / "kb.json").write_text("[1, 2, 3]")
    kb_json = str(tmp_path / "kb" / "kb.json")
    with pytest.raises(ValueError, match=f"{kb_json}: expected a JSON object \\(a KB manifest\\), got a JSON list"):
        load_retriever(tmp_path / "kb")
    p = run_cli("--documents", src, "--output", tmp_path / "kb", "--append")
    assert "got a JSON list" in one_error_line(p)
    with pytest.raises(ValueError, match="d.jsonl is a file, not a KB directory"):
        load_retriever(src)


def test_build_report_only_with_report_flag(tmp_path, base_dir):
    """Issue 15 item 7: every build wrote $NANOCHAT_BASE_DIR/report/kb_build.json, overwriting the speedrun's."""
    src = small_src(tmp_path / "d.jsonl")
    assert R.main(["--documents", src, "--output", str(tmp_path / "kb")]) == 0
    assert not (base_dir / "report").exists()
    assert R.main(["--documents", src, "--output", str(tmp_path / "kb"), "--report"]) == 0
    stage = json.loads((base_dir / "report" / "kb_build.json").read_text())
    assert stage["stage"] == "kb_build" and stage["figures"]["documents"] == len(SMALL)


def test_warns_about_documents_far_beyond_any_prompt(tmp_path, capsys):
    """Issue 15 item 8 (build-time part): a 50 MB document was accepted without a word."""
    huge = " ".join(["lorem"] * (LONG_DOC_CHARS // 5))  # just over LONG_DOC_CHARS characters
    src = write_jsonl(tmp_path / "d.jsonl", [{"id": "small", "content": "tiny"}, {"id": "big1", "content": huge},
                                             {"id": "big2", "content": huge + " ipsum"}])
    s = build_knowledge_base([src], tmp_path / "kb", show_progress=False)
    err = capsys.readouterr().err.strip().splitlines()
    assert s["long"] == 2 and len(err) == 1
    assert err[0].startswith("warning: 2 document(s) longer than 100,000 characters (largest 'big2': ")
    assert "--chunk-size" in err[0]
    build_knowledge_base([src], tmp_path / "kb", chunk_size=200, show_progress=False)  # chunked: fine
    assert capsys.readouterr().err == ""
    blob = write_jsonl(tmp_path / "blob.jsonl", [{"id": "b64", "content": "words " + "A" * 5000}])
    build_knowledge_base([blob], tmp_path / "kb", chunk_size=10, show_progress=False)  # 5000 chars > 100 x 10
    assert "1 chunk(s) longer than 1,000 characters" in capsys.readouterr().err


def test_load_removes_temp_dirs_of_dead_builds(tmp_path):
    """The README's claim: leftovers of a killed build are cleaned up by the next load (not only the next build)."""
    src = small_src(tmp_path / "d.jsonl")
    build_knowledge_base([src], tmp_path / "kb", show_progress=False)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = os.getppid()  # pytest's parent: alive, and not us (recover_dir never touches its own process's dirs)
    for pid, tag in ((dead.pid, "dead"), (live, "live")):
        d = tmp_path / f".kb.{pid}.{tag}.tmp"
        d.mkdir()
        (d / "documents.jsonl").write_text("half written")
    load_retriever(tmp_path / "kb")
    assert sorted(os.listdir(tmp_path)) == [f".kb.{live}.live.tmp", "d.jsonl", "kb"]
