"""
Tests for nanochat/dataset.py: local data dirs (parquet/jsonl/txt), the train/val split, rank striding,
bad-input errors, hub_file (huggingface_hub against a local stand-in for the hub's resolve endpoint, and offline
from a pre-populated HF cache) and the shard downloader. No network.

    pytest -q tests/test_dataset.py
"""

import os
import re
import json
import hashlib
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import pyarrow as pa
import pyarrow.parquet as pq
from huggingface_hub import constants as hf_constants

from nanochat import dataset
from nanochat.dataset import (list_data_files, iter_texts, iter_documents, read_documents, parquets_iter_batched,
                              download_shards, default_data_dir, hub_file, HubFileUnavailable, FINEWEB_REPO)

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
# hub files, against a local stand-in for the hub

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    """
    What hf_hub_download asks of the hub's /datasets/<repo>/resolve/<revision>/<file>: HEAD answers X-Repo-Commit,
    ETag and Content-Length; GET the bytes (from an offset for a Range request: 206); a missing file is a 404 with
    X-Error-Code: EntryNotFound. Faults: fail_first (500 to the first N requests), cut_first (the first GET of a file
    promises the whole body, sends half and hangs up), get_status (every GET answers that status), not_a_hub (no
    X-Repo-Commit: a proxy or captive portal rather than a hub).
    """

    def __init__(self):
        self.files, self.requests = {}, []  # files: "<repo_id>/<filename>" -> bytes; requests: (method, path, headers)
        self.fail_first, self.cut_first, self.get_status, self.not_a_hub = 0, False, None, False
        self.cut = set()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self):
                hub.answer(self)

            def do_GET(self):
                hub.answer(self)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def answer(self, h):
        self.requests.append((h.command, h.path, h.headers))  # headers: case-insensitive get
        m = re.fullmatch(r"/datasets/([^/]+/[^/]+)/resolve/[^/]+/(.+)", urllib.parse.unquote(h.path))
        key = m and f"{m.group(1)}/{m.group(2)}"
        body = self.files.get(key)
        if self.fail_first > 0:
            self.fail_first -= 1
            return self.send(h, 500, {}, b"")
        if body is None:
            return self.send(h, 404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT}, b"")
        headers = {} if self.not_a_hub else {"X-Repo-Commit": COMMIT}
        headers["ETag"] = f'"{hashlib.sha256(body).hexdigest()}"'
        if h.command == "GET" and self.get_status:
            return self.send(h, self.get_status, {}, b"")
        start = int(re.fullmatch(r"bytes=(\d+)-", h.headers["Range"]).group(1)) if "Range" in h.headers else 0
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(body) - 1}/{len(body)}"
        if h.command == "GET" and self.cut_first and key not in self.cut:
            self.cut.add(key)
            return self.send(h, 200, headers, body, cut=True)
        self.send(h, 206 if start else 200, headers, body[start:])

    def send(self, h, status, headers, body, cut=False):
        h.send_response(status)
        for k, v in {**headers, "Content-Length": str(len(body))}.items():
            h.send_header(k, v)
        h.end_headers()
        if h.command == "GET":
            h.wfile.write(body[: len(body) // 2] if cut else body)

    def methods(self):
        return [m for m, _, _ in self.requests]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def write_hub_cache(cache, repo_id, files, commit=COMMIT):
    """files {filename: bytes} of a hub dataset laid out as huggingface_hub's cache documents it (what copying an HF
    cache to an offline machine gives): datasets--org--name/refs/main -> commit, snapshots/<commit>/<filename>."""
    repo = os.path.join(cache, "datasets--" + repo_id.replace("/", "--"))
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(commit)
    for name, body in files.items():
        path = os.path.join(repo, "snapshots", commit, *name.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(body)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    h = FakeHub()
    monkeypatch.setenv("HF_ENDPOINT", h.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)  # in case the shell had it set when the hub was imported
    monkeypatch.delenv("HF_TOKEN", raising=False)
    yield h
    h.close()


def leftovers(d):
    """Partial downloads anywhere under d."""
    return [os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs if f.endswith((".incomplete", ".tmp"))]


def test_hub_file_downloads_once_into_the_hf_cache(hub, tmp_path, monkeypatch):
    hub.files["org/data/sub/x.jsonl"] = b'{"a": 1}\n'
    monkeypatch.setenv("HF_TOKEN", "secret-token")
    path = hub_file("org/data", "sub/x.jsonl")
    assert path == str(tmp_path / "hf_cache" / "datasets--org--data" / "snapshots" / COMMIT / "sub" / "x.jsonl")
    assert open(path, "rb").read() == b'{"a": 1}\n'
    assert hub.methods() == ["HEAD", "GET"]
    assert all(headers.get("Authorization") == "Bearer secret-token" for _, _, headers in hub.requests)
    assert hub_file("org/data", "sub/x.jsonl") == path and hub.methods().count("GET") == 1  # reused: no new GET
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    n = len(hub.requests)
    assert hub_file("org/data", "sub/x.jsonl") == path and len(hub.requests) == n  # offline: the cache alone
    monkeypatch.delenv("HF_HUB_OFFLINE")
    hub_file("org/data", "sub/x.jsonl", revision="v2")
    assert hub.requests[-1][1] == "/datasets/org/data/resolve/v2/sub/x.jsonl"


def test_hub_file_retries_a_server_error_and_resumes_a_cut_download(hub, tmp_path, monkeypatch):
    # huggingface_hub resumes from the last whole chunk it wrote (10 MiB); 4 KiB chunks keep the test file small
    monkeypatch.setattr(hf_constants, "DOWNLOAD_CHUNK_SIZE", 4096)
    body = bytes(range(256)) * 400
    hub.files["org/data/big.bin"] = body
    hub.fail_first, hub.cut_first = 1, True
    path = hub_file("org/data", "big.bin")
    assert open(path, "rb").read() == body
    assert hub.methods() == ["HEAD", "HEAD", "GET", "GET"]  # 500, then ok; half a body, then the rest
    resumed_at = int(re.fullmatch(r"bytes=(\d+)-", hub.requests[-1][2]["Range"]).group(1))
    assert 0 < resumed_at <= len(body) // 2
    assert not leftovers(tmp_path)


def test_hub_file_failures_are_clear_and_leave_nothing(hub, tmp_path, monkeypatch):
    cache = str(tmp_path / "hf_cache")
    with pytest.raises(HubFileUnavailable) as e:
        hub_file("org/data", "missing.parquet", hint="Try X.")
    msg = str(e.value)
    assert msg.startswith("org/data: missing.parquet (revision main) is not in the Hugging Face cache")
    assert cache in msg and "the hub has no such file" in msg and msg.endswith("Try X.")
    assert hub.methods() == ["HEAD"]  # a 404 is not retried
    hub.files["org/data/f.parquet"] = b"PAR1 some bytes PAR1"
    hub.get_status = 500
    with pytest.raises(HubFileUnavailable, match="the download failed"):
        hub_file("org/data", "f.parquet")
    assert not leftovers(tmp_path) and not os.listdir(os.path.join(cache, "datasets--org--data", "blobs"))
    hub.get_status, hub.not_a_hub = None, True
    with pytest.raises(HubFileUnavailable, match=f"the hub at {hub.url} could not be reached .*X-Repo-Commit"):
        hub_file("org/data", "f.parquet")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    n = len(hub.requests)
    with pytest.raises(HubFileUnavailable, match="HF_HUB_OFFLINE is set, so the hub was not asked"):
        hub_file("org/data", "f.parquet")
    assert len(hub.requests) == n

# -----------------------------------------------------------------------------
# FineWeb-Edu shards


def shard_bytes(tmp_path, i):
    write_parquet(tmp_path / f"src{i}.parquet", [f"shard {i} doc {j}" for j in range(20)], 10)
    return (tmp_path / f"src{i}.parquet").read_bytes()


SHARDS = [f"shard_{i:05d}.parquet" for i in range(3)]


def test_download_shards_links_from_the_cache_and_skips_existing(tmp_path, hub, monkeypatch):
    for i, name in enumerate(SHARDS):
        hub.files[f"{FINEWEB_REPO}/{name}"] = shard_bytes(tmp_path, i)
    out = tmp_path / "base_data"
    paths = download_shards(3, str(out), workers=2)
    assert paths == [str(out / name) for name in SHARDS] and sorted(os.listdir(out)) == SHARDS  # no temp files
    for p in paths:
        assert open(p, "rb").read() == hub.files[f"{FINEWEB_REPO}/{os.path.basename(p)}"]
        assert os.stat(p).st_nlink == 2  # a hard link to the cache's blob: no second copy on disk
    assert list(iter_texts(str(out), "val")) == [f"shard 2 doc {j}" for j in range(20)]
    n = len(hub.requests)
    download_shards(3, str(out), workers=2)
    assert len(hub.requests) == n  # all there: nothing asked
    # the cache on another filesystem: a copy instead
    monkeypatch.setattr(os, "link", lambda src, dst: (_ for _ in ()).throw(OSError(18, "Invalid cross-device link")))
    os.remove(out / SHARDS[0])
    download_shards(1, str(out))
    assert os.stat(out / SHARDS[0]).st_nlink == 1 and (out / SHARDS[0]).read_bytes() == hub.files[
        f"{FINEWEB_REPO}/{SHARDS[0]}"]


def test_download_shards_offline_from_a_copied_cache(tmp_path, hub, monkeypatch):
    write_hub_cache(tmp_path / "hf_cache", FINEWEB_REPO, {name: shard_bytes(tmp_path, i)
                                                          for i, name in enumerate(SHARDS[:2])})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "data"
    download_shards(2, str(out))
    assert list(iter_texts(str(out), "val")) == [f"shard 1 doc {j}" for j in range(20)]
    with pytest.raises(HubFileUnavailable, match=r"shard_00002\.parquet .*HF_HUB_OFFLINE.*tasks\.builtin_corpus"):
        download_shards(3, str(out))
    assert sorted(os.listdir(out)) == SHARDS[:2] and hub.requests == []
    with pytest.raises(ValueError, match="num_shards"):
        download_shards(0, str(out))


def test_cli_help(capsys):
    with pytest.raises(SystemExit):
        dataset.main(["--help"])
    assert "--num-files" in capsys.readouterr().out
