"""
Tests for nanochat/dataset.py: local data dirs (parquet/jsonl/txt), the train/val split, rank striding,
bad-input errors, and the shard downloader against a local HTTP server.

    pytest -q tests/test_dataset.py
"""

import os
import json
import threading
import http.server

import pytest
import pyarrow as pa
import pyarrow.parquet as pq

from nanochat import dataset
from nanochat.dataset import (list_data_files, iter_texts, iter_documents, read_documents, parquets_iter_batched,
                              download_file, download_shards, default_data_dir)

# -----------------------------------------------------------------------------
# helpers


def write_parquet(path, texts, row_group_size):
    pq.write_table(pa.table({"text": texts}), path, row_group_size=row_group_size)


def write_jsonl(path, objs):
    with open(path, "w", encoding="utf-8") as f:
        for o in objs:
            f.write((o if isinstance(o, str) else json.dumps(o)) + "\n")


@pytest.fixture
def mixed_dir(tmp_path):
    """Train: a parquet file (3 row groups), a jsonl file, a txt file; val: a parquet file (1 row group)."""
    d = tmp_path / "mixed"
    d.mkdir()
    write_parquet(d / "a.parquet", [f"pq doc {i}" for i in range(10)], row_group_size=4)  # groups of 4, 4, 2
    write_jsonl(d / "b.jsonl", [{"text": "jl doc 0"}, "", {"content": "jl doc 1"}, {"text": "   "},
                                {"text": "jl doc 3"}])
    (d / "c.txt").write_text("txt doc 0 line 1\ntxt doc 0 line 2\n\n\ntxt doc 1\n\n  \ntxt doc 2\n")
    write_parquet(d / "z_val.parquet", [f"val doc {i}" for i in range(5)], row_group_size=100)
    (d / "README.md").write_text("not data")
    (d / ".hidden.parquet.tmp").write_text("a temp file of an interrupted write")
    return str(d)


TRAIN_DOCS = ([f"pq doc {i}" for i in range(10)] + ["jl doc 0", "jl doc 1", "jl doc 3"]
              + ["txt doc 0 line 1\ntxt doc 0 line 2", "txt doc 1", "txt doc 2"])
VAL_DOCS = [f"val doc {i}" for i in range(5)]

# -----------------------------------------------------------------------------
# local data


def test_list_and_split(mixed_dir):
    names = [os.path.basename(p) for p in list_data_files(mixed_dir)]
    assert names == ["a.parquet", "b.jsonl", "c.txt", "z_val.parquet"]  # sorted, data files only
    train, val = list(iter_texts(mixed_dir, "train")), list(iter_texts(mixed_dir, "val"))
    assert train == TRAIN_DOCS  # jsonl: text or content, blank/empty skipped; txt: blank-line blocks
    assert val == VAL_DOCS
    assert not set(train) & set(val)


@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 7, 20])
def test_rank_striding_partitions(mixed_dir, split, world):
    everything = list(iter_documents(mixed_dir, split))
    per_rank = [list(iter_documents(mixed_dir, split, start=r, step=world)) for r in range(world)]
    flat = [p for part in per_rank for p in part]
    assert len(flat) == len(set(flat)) == len(everything)  # no overlap, no loss
    assert sorted(flat) == sorted(everything)
    for part in per_rank:  # each rank reads in stream order
        assert [(c, r) for c, r, _ in part] == sorted((c, r) for c, r, _ in part)


def test_striding_by_row_group_and_by_document(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    write_parquet(d / "0.parquet", [f"t{i}" for i in range(12)], row_group_size=3)  # 4 row groups
    write_parquet(d / "1.parquet", [f"v{i}" for i in range(6)], row_group_size=6)  # 1 row group
    # 4 chunks >= 2 ranks: whole row groups per rank (rank 0 gets groups 0 and 2)
    assert list(iter_texts(d, "train", 0, 2)) == ["t0", "t1", "t2", "t6", "t7", "t8"]
    # 1 chunk < 3 ranks: documents are strided instead, so every rank gets some validation data
    assert [list(iter_texts(d, "val", r, 3)) for r in range(3)] == [["v0", "v3"], ["v1", "v4"], ["v2", "v5"]]
    assert len(list(parquets_iter_batched("train", 0, 1, data_dir=str(d)))) == 4  # batches are row groups
    assert list(parquets_iter_batched("train", 1, 2, data_dir=str(d))) == [["t3", "t4", "t5"], ["t9", "t10", "t11"]]


def test_resume_positions_and_read_back(mixed_dir):
    docs = list(iter_documents(mixed_dir, "train", start=1, step=2))
    for k in range(len(docs)):
        c, r, _ = docs[k]
        assert list(iter_documents(mixed_dir, "train", 1, 2, after=(c, r))) == docs[k + 1:]
    positions = [(c, r) for c, r, _ in docs][::-1]
    assert read_documents(mixed_dir, "train", positions) == [t for _, _, t in docs][::-1]
    with pytest.raises(ValueError, match="out of range"):
        read_documents(mixed_dir, "train", [(999, 0)])


def test_parquets_iter_batched_jsonl(tmp_path):
    d = tmp_path / "j"
    d.mkdir()
    write_jsonl(d / "0.jsonl", [{"text": f"d{i}"} for i in range(2500)])
    write_jsonl(d / "1.jsonl", [{"text": "v"}])
    batches = list(parquets_iter_batched("train", data_dir=str(d)))
    assert [len(b) for b in batches] == [1024, 1024, 452]
    assert [t for b in batches for t in b] == [f"d{i}" for i in range(2500)]


def test_bad_inputs(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    write_jsonl(d / "0.jsonl", [{"text": "ok"}, "{not json", {"text": "ok"}])
    write_jsonl(d / "1.jsonl", [{"text": "v"}])
    with pytest.raises(ValueError, match=r"0\.jsonl:2: invalid JSON"):
        list(iter_texts(d, "train"))
    write_jsonl(d / "0.jsonl", [{"text": "ok"}, {"title": "no text"}])
    with pytest.raises(ValueError, match=r"0\.jsonl:2: expected a string under 'text'"):
        list(iter_texts(d, "train"))
    (d / "0.jsonl").unlink()
    (d / "0.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(ValueError, match=r"0\.parquet: not a readable parquet file"):
        list(iter_texts(d, "train"))
    pq.write_table(pa.table({"body": ["x"]}), d / "0.parquet")
    with pytest.raises(ValueError, match="no 'text' column"):
        list(iter_texts(d, "train"))
    (d / "0.parquet").unlink()
    with pytest.raises(ValueError, match="at least 2 are needed"):
        list(iter_texts(d, "train"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_data_files(d / "nope")
    with pytest.raises(ValueError, match="split must be"):
        list(iter_texts(d, "test"))
    with pytest.raises(ValueError, match="start < step"):
        list(iter_texts(d, "val", start=2, step=2))


def test_default_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(tmp_path))
    assert default_data_dir() == str(tmp_path)
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError):
        default_data_dir()
    monkeypatch.delenv("NANOCHAT_DATA_DIR")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    monkeypatch.setattr(dataset, "builtin_corpus_dir", lambda: str(tmp_path / "no_builtin"))
    with pytest.raises(FileNotFoundError, match="tasks.builtin_corpus"):
        default_data_dir()
    base_data = tmp_path / "base" / "base_data"
    base_data.mkdir(parents=True)
    write_parquet(base_data / "shard_00000.parquet", ["x"], 10)
    assert default_data_dir() == str(base_data)

# -----------------------------------------------------------------------------
# downloading, against a local server


class Server:
    """A local HTTP server: fail_first 503s, then the file; truncate: lie about Content-Length."""

    def __init__(self, files):
        self.files, self.requests, self.fail_first, self.truncate = files, [], 0, False
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.requests.append(self.path)
                name = self.path.lstrip("/")
                if len(outer.requests) <= outer.fail_first:
                    self.send_error(503, "try again")
                    return
                if name not in outer.files:
                    self.send_error(404, "no such shard")
                    return
                body = outer.files[name]
                self.send_response(200)
                self.send_header("Content-Length", str(len(body) + (100 if outer.truncate else 0)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/shard_{{index:05d}}.parquet"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        if self.thread is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.thread = None


@pytest.fixture
def server(tmp_path):
    files = {}
    for i in range(3):
        write_parquet(tmp_path / f"src{i}.parquet", [f"shard {i} doc {j}" for j in range(20)], 10)
        files[f"shard_{i:05d}.parquet"] = (tmp_path / f"src{i}.parquet").read_bytes()
    s = Server(files)
    yield s
    s.close()


def test_download_retries_and_skips_existing(tmp_path, server):
    out = tmp_path / "base_data"
    server.fail_first = 2  # two 503s: retried with backoff
    paths = download_shards(3, str(out), workers=2, url_pattern=server.url, backoff=0.01)
    assert [os.path.basename(p) for p in paths] == ["shard_00000.parquet", "shard_00001.parquet", "shard_00002.parquet"]
    for p in paths:
        assert open(p, "rb").read() == server.files[os.path.basename(p)]
    assert len(server.requests) == 5
    assert sorted(os.listdir(out)) == sorted(server.files)  # no temp files left
    assert list(iter_texts(str(out), "val")) == [f"shard 2 doc {j}" for j in range(20)]
    n = len(server.requests)
    download_shards(3, str(out), workers=2, url_pattern=server.url, backoff=0.01)
    assert len(server.requests) == n  # all there: nothing fetched


def test_download_failures_leave_nothing(tmp_path, server):
    out = tmp_path / "dl"
    server.truncate = True  # every response is cut short: retried, then a clear error, and no partial file
    with pytest.raises(ConnectionError, match="could not reach .*after 3 attempts.*--builtin"):
        download_file(server.url.format(index=0), str(out / "shard_00000.parquet"), retries=3, backoff=0.01)
    assert len(server.requests) == 3
    assert os.listdir(out) == []
    server.truncate = False
    with pytest.raises(RuntimeError, match="HTTP 404"):  # a missing shard is not retried
        download_file(server.url.format(index=7), str(out / "shard_00007.parquet"), retries=3, backoff=0.01)
    assert len(server.requests) == 4
    port = server.httpd.server_address[1]
    server.close()  # nobody listening: the offline message
    with pytest.raises(ConnectionError, match="to run offline use"):
        download_file(f"http://127.0.0.1:{port}/x.parquet", str(out / "x.parquet"), retries=2, backoff=0.01)
    assert os.listdir(out) == []


def test_cli_help(capsys):
    with pytest.raises(SystemExit):
        dataset.main(["--help"])
    assert "--num-files" in capsys.readouterr().out
