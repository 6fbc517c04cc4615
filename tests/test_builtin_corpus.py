"""
Tests for tasks/builtin_corpus.py: the offline pretraining corpus holds only train-module records, splits into
shards with a validation shard last, and rebuilds deterministically and atomically; --prose adds English prose to
the train shards only. And for tasks/prose.py, the prose extraction from Debian packages, on small hand-made inputs
(no test needs the packages installed).
"""

import os
import re
import gzip
import json

import pytest
import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.dataset import list_data_files, iter_texts
from tasks.builtin_corpus import build_builtin_corpus
from tasks.reading_practice import reading_exercises
from tasks.stdlib_docs import harvest, module_split
from tasks import prose

MODULES = ["json", "textwrap", "shlex", "heapq", "glob", "base64", "fnmatch"]


@pytest.fixture(scope="module")
def records():
    return harvest(modules=MODULES, progress=False, include_topics=False)


def test_builtin_corpus(tmp_path, records):
    assert {module_split(m) for m in MODULES} == {"train", "rag", "eval"}  # the fixture covers all three sides
    out = build_builtin_corpus(tmp_path / "corpus", num_shards=3, records=records, row_group_size=5,
                               progress=False)
    files = list_data_files(out)
    assert [os.path.basename(f) for f in files] == ["shard_00000.parquet", "shard_00001.parquet", "shard_00002.parquet"]
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    train, val = list(iter_texts(out, "train")), list(iter_texts(out, "val"))
    n_train_records = sum(1 for r in records if module_split(r["module"]) == "train")
    assert len(train) + len(val) == n_train_records == manifest["documents"]
    assert manifest["shards"][-1]["split"] == "val" and manifest["shards"][-1]["documents"] == len(val)
    assert sorted(manifest["held_out_modules"]) == sorted(m for m in MODULES if module_split(m) != "train")
    assert not set(train) & set(val)
    assert pq.ParquetFile(files[0]).metadata.num_row_groups >= 2  # row groups of row_group_size docs
    # no record of a held-out module, under any name: module header or dotted id
    for text in train + val:
        header = text.split("\n", 1)[0]
        assert header.startswith("Module ")
        assert module_split(header[len("Module "):]) == "train", header
        for m in MODULES:
            if module_split(m) != "train":
                assert f"Module {m}" not in text
    assert any(t.startswith("Module textwrap\n\ndedent(text)\n\n") for t in train + val)
    # rebuilding replaces the directory atomically and gives the same bytes (deterministic)
    before = {f: open(f, "rb").read() for f in files}
    build_builtin_corpus(out, num_shards=3, records=records, row_group_size=5, progress=False)
    assert {f: open(f, "rb").read() for f in list_data_files(out)} == before
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no temp dirs left behind
    with pytest.raises(ValueError, match="num_shards must be >= 2"):
        build_builtin_corpus(tmp_path / "x", num_shards=1, records=records)


# -----------------------------------------------------------------------------
# --prose: English prose in the train shards only


def _write_prose(path, texts):
    pq.write_table(pa.table({"text": texts, "source": ["test"] * len(texts)}), path)
    return path


def test_builtin_corpus_with_prose(tmp_path, records):
    plain = build_builtin_corpus(tmp_path / "plain", num_shards=3, records=records, progress=False)
    texts = [f"Prose document {i}. The quick brown fox jumps over the lazy dog." for i in range(40)]
    a = _write_prose(tmp_path / "a.parquet", texts[:25])
    b = _write_prose(tmp_path / "b.parquet", texts[25:])
    out = build_builtin_corpus(tmp_path / "with", num_shards=3, records=records, progress=False,
                               prose_files=[a, b])
    # the validation shard is byte-identical to the build without prose; every prose document is in train
    assert open(list_data_files(out)[-1], "rb").read() == open(list_data_files(plain)[-1], "rb").read()
    train, val = list(iter_texts(out, "train")), list(iter_texts(out, "val"))
    assert sorted(t for t in train if t.startswith("Prose")) == sorted(texts)
    assert not [t for t in val if t.startswith("Prose")]
    assert sorted(t for t in train if not t.startswith("Prose")) == sorted(iter_texts(plain, "train"))
    # spread over both train shards and mixed within each (not appended as one block)
    shard0 = pq.read_table(list_data_files(out)[0]).column("text").to_pylist()
    where = [i for i, t in enumerate(shard0) if t.startswith("Prose")]
    assert 0 < len(where) < 40 and where != list(range(len(shard0) - len(where), len(shard0)))
    m = json.load(open(os.path.join(out, "manifest.json")))
    assert m["documents"] == len(train) + len(val)
    assert m["prose"]["documents"] == 40 and m["prose"]["in_validation"] is False
    assert [f["documents"] for f in m["prose"]["files"]] == [25, 15]
    assert sum(s.get("prose_documents", 0) for s in m["shards"]) == 40 and m["shards"][-1]["prose_documents"] == 0
    assert "prose" not in json.load(open(os.path.join(plain, "manifest.json")))
    # deterministic, and a bad prose file is a clear error before anything is written
    before = {os.path.basename(f): open(f, "rb").read() for f in list_data_files(out)}
    build_builtin_corpus(out, num_shards=3, records=records, progress=False, prose_files=[a, b])
    assert {os.path.basename(f): open(f, "rb").read() for f in list_data_files(out)} == before
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="no 'text' column"):
        build_builtin_corpus(tmp_path / "bad", num_shards=3, records=records, prose_files=[tmp_path / "bad.parquet"])
    with pytest.raises(FileNotFoundError, match="build_prose.sh"):
        build_builtin_corpus(tmp_path / "bad", num_shards=3, records=records, prose_files=[tmp_path / "none.parquet"])
    assert not os.path.exists(tmp_path / "bad")


def test_builtin_corpus_with_reading_practice(tmp_path, records):
    plain = build_builtin_corpus(tmp_path / "plain", num_shards=3, records=records, progress=False)
    out = build_builtin_corpus(tmp_path / "with", num_shards=3, records=records, progress=False,
                               reading_practice=True, doc_chars=300, practice_chars=750)
    expected = reading_exercises(records, doc_chars=300, max_chars=750)
    assert expected
    # the exercises are all in the train shards, the validation shard is the build without them, byte for byte
    assert open(list_data_files(out)[-1], "rb").read() == open(list_data_files(plain)[-1], "rb").read()
    train = list(iter_texts(out, "train"))
    assert sorted(t for t in train if t.startswith("[1] Title: ")) == sorted(expected)
    assert sorted(t for t in train if not t.startswith("[1] Title: ")) == sorted(iter_texts(plain, "train"))
    # every document an exercise shows is a train module's (held-out modules never reach pretraining)
    for text in expected:
        for title in re.findall(r"^\[\d+\] Title: (\S+)$", text, re.M):
            assert module_split(title.rsplit(".", 1)[0]) == "train", title
    m = json.load(open(os.path.join(out, "manifest.json")))
    assert m["reading_practice"]["exercises"] == len(expected) and m["reading_practice"]["in_validation"] is False
    assert sum(s.get("train_only_documents", 0) for s in m["shards"]) == len(expected)
    assert "reading_practice" not in json.load(open(os.path.join(plain, "manifest.json")))

# -----------------------------------------------------------------------------
# tasks/prose.py: the extractors on hand-made inputs


def test_html_to_text():
    html = """<html><head><title>Page title</title><script>var x = 1;</script></head><body>
    <div class="navheader"><a href="a.html">Prev</a> Next</div>
    <div role="main"><h1>Signals<a class="headerlink" href="#s">\u00b6</a></h1>
    <p>A signal is a notification sent to a process &amp; it can be caught.</p>
    <pre>echo a code listing that reads like words</pre>
    <ul><li>First point of the list<li>Second point of the list</ul>
    <table><tr><td>col a</td><td>col b</td></tr></table>
    <p>See <a href="../library/glob.html#glob.glob">glob</a> for how patterns are expanded.</p>
    <p>x = f(1, 2) + [3] * {4: 5}</p>
    </div><div class="footer">Copyright 2024</div></body></html>"""
    assert prose.html_to_text(html) == (
        "Signals\n\nA signal is a notification sent to a process & it can be caught.\n\n"
        "First point of the list\n\nSecond point of the list\n\nSee glob for how patterns are expanded.")
    # a paragraph linking to a held-out module's page is dropped whole
    assert "glob" not in prose.html_to_text(html, drop_link=prose.python_doc_link_held_out)


def test_python_doc_filters():
    assert module_split("json") == "train" and module_split("glob") == "eval" and module_split("heapq") == "rag"
    held = prose.python_doc_link_held_out
    assert held("../library/glob.html#glob.glob") and held("library/heapq.html") and held("functions.html") is False
    assert held("../library/functions.html#len")  # builtins are held out
    assert not held("../library/json.html#json.dumps") and not held("../tutorial/index.html")
    ok = prose.python_doc_page_ok
    assert ok("library/json.html", '<span id="module-json"></span>')
    assert not ok("library/glob.html", '<span id="module-glob"></span>')
    assert not ok("library/functions.html", "<p>len(s)</p>")  # no module anchor: builtins or an index
    assert ok("tutorial/classes.html", "") and ok("glossary.html", "") and not ok("whatsnew/3.11.html", "")


def test_rst_to_text():
    rst = """.. SPDX-License-Identifier: GPL-2.0

.. _signals:

=======
Signals
=======

A **signal** is sent by :c:func:`kill` or by the ``tgkill`` call; see
`the manual <https://man7.org>`_ and :ref:`the index <idx>`.

Example::

    kill(pid, SIGTERM);
    return 0;

.. code-block:: c

   int x = 1;

.. note::
   Handlers run on the *same* stack.

- first item of the list
- second item of the list

=====  ===========
Name   Meaning
=====  ===========
TERM   terminate
=====  ===========

+------+------+
| a    | b    |
+------+------+

After the table.
"""
    assert prose.rst_to_text(rst) == (
        "Signals\n\nA signal is sent by kill or by the tgkill call; see the manual and the index.\n\nExample:\n\n"
        "Handlers run on the same stack.\n\nfirst item of the list\n\nsecond item of the list\n\nAfter the table.")


def test_man_to_text():
    bold = lambda s: "".join(c + "\b" + c for c in s)
    rendered = "\n".join([
        "signal(7)        Miscellaneous Information Manual        signal(7)", "",
        bold("NAME"), "       signal - overview of signals", "",
        bold("SYNOPSIS"), "       #include <signal.h>", "",
        bold("DESCRIPTION"), "       Linux supports both POSIX reliable signals and POSIX real-time signals.", "",
        "       if (x) { y(); } /* 1 */", "",
        "   " + bold("Signal dispositions"),
        "       Each signal has a current " + "".join("_\b" + c for c in "disposition") + ".", "",
        bold("SEE ALSO"), "       kill(1), sigaction(2)", "",
        "Linux man-pages 6.03              2023-02-05                  signal(7)"])
    assert prose.man_to_text(rendered) == (
        "signal - overview of signals\n\nDescription\n\nLinux supports both POSIX reliable signals and POSIX "
        "real-time signals.\n\nSignal dispositions\n\nEach signal has a current disposition.")


WORDNET_NOUN = """  1 This software and database is being provided to you, the LICENSEE, by
  2 Princeton University under the following license.
00000100 18 n 01 physicist 0 001 @ 00000200 n 0000 | a scientist trained in physics  
00000200 18 n 02 scientist 0 man_of_science 0 000 | a person with advanced knowledge of one or more sciences  
00000300 18 n 02 Einstein 0 Albert_Einstein 0 002 @i 00000100 n 0000 #p 00000999 n 0000 | physicist born in Germany (1879-1955); "Einstein's theory"  
"""


def test_wordnet():
    synsets = prose.wordnet_synsets(WORDNET_NOUN)
    assert [(s[0], s[1], s[2]) for s in synsets] == [("00000100", 18, ["physicist"]),
                                                     ("00000200", 18, ["scientist", "man of science"]),
                                                     ("00000300", 18, ["Einstein", "Albert Einstein"])]
    assert synsets[2][3] == [("@i", "00000100", "n"), ("#p", "00000999", "n")]
    assert prose.wordnet_lines(synsets, "n") == [
        (18, "physicist: a scientist trained in physics. It is a kind of scientist."),
        (18, "scientist, man of science: a person with advanced knowledge of one or more sciences."),
        (18, 'Einstein, Albert Einstein: physicist born in Germany (1879-1955); "Einstein\'s theory". '
             "It is an instance of physicist.")]  # the part-of target 00000999 is not in the file: left out
    adj = prose.wordnet_synsets("00001740 00 a 01 able(a) 0 000 | having the means to do something  \n")
    assert adj[0][2] == ["able"]
    with pytest.raises(ValueError, match="WordNet data line 1"):
        prose.wordnet_synsets("00000100 18 n zz physicist 0 000 | gloss\n")


def _dictd_b64(n):
    digits = ""
    while True:
        digits = prose._DICTD_B64[n % 64] + digits
        n //= 64
        if n == 0:
            return digits


def test_dictd_entries(tmp_path):
    assert prose.dictd_number("Bdq") == 1 * 64 * 64 + 29 * 64 + 42 and prose.dictd_number("A") == 0
    with pytest.raises(ValueError, match="bad base64 digit"):
        prose.dictd_number("A!")
    entries = ["00-database-info\n   Converted by dictfmt.\n", "LIAR, n.  A lawyer with a roving commission.\n\n",
               "LIFE, n.  A spiritual pickle preserving the body from decay.\n\n"]
    data = "".join(entries).encode("utf-8")
    offs = [0, len(entries[0].encode()), len(entries[0].encode()) + len(entries[1].encode())]
    index = "".join(f"{w}\t{_dictd_b64(o)}\t{_dictd_b64(len(e.encode()))}\n" for w, o, e in
                    [("00-database-info", offs[0], entries[0]), ("life", offs[2], entries[2]),
                     ("liar", offs[1], entries[1]), ("lawyer, roving", offs[1], entries[1])])
    assert prose.dictd_entries(index, data) == entries[1:]  # file order, each range once, info entry skipped
    with pytest.raises(ValueError, match="dictd index line 1"):
        prose.dictd_entries("liar 0 5\n", data)
    # the same through the extractor, from a fake root (the .dict.dz is gzip-compatible)
    os.makedirs(tmp_path / "usr/share/dictd")
    (tmp_path / "usr/share/dictd/devil.index").write_text(index)
    with gzip.open(tmp_path / "usr/share/dictd/devil.dict.dz", "wb") as f:
        f.write(data)
    assert prose.extract_devil(str(tmp_path)) == ["LIAR, n. A lawyer with a roving commission.\n\n"
                                                  "LIFE, n. A spiritual pickle preserving the body from decay."]


def test_gcide_and_dict_entries():
    entry = """Coagulate \\Co*ag"u*late\\, v. t. [imp. & p. p. {Coagulated}; L.
   coagulare to curdle.]
   To cause (a liquid) to change into a curdlike state; as,
   rennet coagulates milk. [Obs.]
   [1913 Webster]

   2. Formerly used of an auto-da-f['e] in [ae]sthetic prose. --Shak.
      [1913 Webster]

   [He] sayth it is so.
"""
    assert prose.gcide_entry(entry) == (
        "Coagulate, v. t. To cause (a liquid) to change into a curdlike state; as, rennet coagulates milk.\n\n"
        "2. Formerly used of an auto-da-f\u00e9 in \u00e6sthetic prose.\n\nHe sayth it is so.")
    foldoc = """Turing Machine

   <computability> A hypothetical machine defined by {Alan
   Turing}.  It reads a {tape}.

   (1995-02-15)
"""
    assert prose.dict_entry(foldoc) == ("Turing Machine\n\n(computability) A hypothetical machine defined by "
                                        "Alan Turing. It reads a tape.")


def test_book_chapters():
    text = ("PRIDE AND PREJUDICE\n\nBy Jane Austen\n\n\n\nChapter 1\n\n\nIt is a truth universally\n"
            "acknowledged.\n\n\"_You_ want to tell me.\"\n\nVOLUME II\n\nCHAPTER 2\n\n"
            "Mr. Bennet was among the\nearliest.\n")
    assert prose.book_chapters(text) == [
        "Pride and Prejudice, by Jane Austen. Chapter 1.\n\nIt is a truth universally acknowledged.\n\n"
        "\"You want to tell me.\"",
        "Pride and Prejudice, by Jane Austen. Chapter 2.\n\nMr. Bennet was among the earliest."]


def test_dedupe_pack_and_share():
    long_a = "A paragraph long enough to count as real text, repeated in two sources here."
    docs = {"first": [f"Intro one.\n\n{long_a}\n\nDownload the ebook"]
                     + [f"Doc {i} is short.\n\nDownload the ebook\n\n\"Yes.\"" for i in range(3)],
            "second": [f"{long_a}\n\nOnly the second source has this paragraph, which is long enough to keep."]}
    out = prose.dedupe(docs, min_doc_chars=10, boilerplate_docs=3)
    # the label in >= 3 documents is dropped, a repeated sentence is not boilerplate
    assert out["first"] == [f"Intro one.\n\n{long_a}"] + [f"Doc {i} is short.\n\n\"Yes.\"" for i in range(3)]
    assert out["second"] == ["Only the second source has this paragraph, which is long enough to keep."]
    assert prose.dedupe(docs, min_doc_chars=500) == {"first": [], "second": []}
    assert prose.pack(["aaaa", "bbbb", "cccc"], max_chars=10) == ["aaaa\n\nbbbb", "cccc"]
    assert prose.pack(["a" * 20], max_chars=10) == ["a" * 20]
    assert prose.letter_share("ab c") == 1.0 and prose.letter_share("a=1;") == 0.25 and prose.letter_share("") == 0


def test_build_prose_fake_root(tmp_path):
    root = tmp_path / "root"
    os.makedirs(root / "usr/share/wordnet")
    for pos in ("noun", "verb", "adj", "adv"):
        (root / f"usr/share/wordnet/data.{pos}").write_text(WORDNET_NOUN if pos == "noun" else "")
    out = tmp_path / "prose" / "p.parquet"
    m = prose.build_prose(out, sources=["wordnet"], root=str(root), progress=False)
    texts, manifest = prose.read_prose(out)
    assert len(texts) == 1 and texts[0].startswith("physicist: a scientist trained in physics.")
    assert manifest == {k: v for k, v in m.items() if k != "bytes"} and manifest["sources"]["wordnet"]["documents"] == 1
    assert manifest["sources"]["wordnet"]["licence"].startswith("WordNet")
    assert json.load(open(str(out) + ".json"))["bytes"] == os.path.getsize(out)
    assert pq.ParquetFile(out).metadata.row_group(0).column(0).compression == "ZSTD"
    assert sorted(os.listdir(tmp_path / "prose")) == ["p.parquet", "p.parquet.json"]  # no temp files left
    with pytest.raises(ValueError, match="unknown prose source"):
        prose.build_prose(out, sources=["wikipedia"], root=str(root))
    with pytest.raises(ValueError, match="no prose documents"):
        prose.build_prose(out, sources=["wordnet"], root=str(root), max_chars=10, progress=False)
