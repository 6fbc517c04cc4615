"""
Tests for tasks/builtin_corpus.py: the offline pretraining corpus holds only train-module records, splits into
shards with a validation shard last, and rebuilds deterministically and atomically.
"""

import os
import json

import pytest
import pyarrow.parquet as pq

from nanochat.dataset import list_data_files, iter_texts
from tasks.builtin_corpus import build_builtin_corpus
from tasks.stdlib_docs import harvest, module_split

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
