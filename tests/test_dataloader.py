"""
Tests for nanochat/dataloader.py: shapes, BOS-aligned best-fit packing, exact resume from a JSON state, epochs,
and rank disjointness. Uses a byte-level stand-in tokenizer (so a row decodes back to text exactly), plus one run
with the real nanochat tokenizer.

    pytest -q tests/test_dataloader.py
"""

import json
import random

import pytest
import torch

from nanochat.dataloader import tokenizing_distributed_data_loader, prefetch
from nanochat.dataset import iter_texts
from nanochat.tokenizer import Tokenizer

BOS = 256


class ByteTokenizer:
    """Bytes are tokens 0..255, BOS is 256: the smallest tokenizer with the interface the loader uses."""

    def get_bos_token_id(self):
        return BOS

    def encode(self, texts, prepend=None):
        assert isinstance(texts, list)
        return [([prepend] if prepend is not None else []) + list(t.encode("utf-8")) for t in texts]


def make_data(d, n_train=3, docs_per_file=40, n_val=12, seed=0):
    """JSONL files of documents "<0007>xxxxx..." with varied lengths (some longer than a row)."""
    rng = random.Random(seed)
    d.mkdir(exist_ok=True)
    k = 0
    for f in range(n_train + 1):
        n = docs_per_file if f < n_train else n_val
        with open(d / f"{f:02d}.jsonl", "w") as fh:
            for _ in range(n):
                length = rng.choice([3, 10, 25, 40, 70, 150])
                body = "".join(rng.choice("abcdefghij") for _ in range(length))
                fh.write(json.dumps({"text": f"<{k:04d}>{body}"}) + "\n")
                k += 1
    return str(d)


def take(loader, n):
    return [next(loader) for _ in range(n)]


def rows_of(x, y):
    return torch.cat([x, y[:, -1:]], dim=1)  # the full T+1 row


def segments(row):
    """Split a row at BOS tokens into documents (as text, BOS dropped)."""
    row = row.tolist()
    starts = [i for i, t in enumerate(row) if t == BOS]
    assert starts and starts[0] == 0
    return [bytes(row[a + 1:b]).decode("utf-8") for a, b in zip(starts, starts[1:] + [len(row)])]


def test_shapes_bos_and_shift(tmp_path):
    d = make_data(tmp_path / "d")
    loader = tokenizing_distributed_data_loader(ByteTokenizer(), B=4, T=64, split="train", data_dir=d,
                                                ddp_rank=0, ddp_world_size=1)
    for x, y, state in take(loader, 10):
        assert x.shape == y.shape == (4, 64) and x.dtype == y.dtype == torch.long
        assert x.is_contiguous() and y.is_contiguous()
        assert (x[:, 0] == BOS).all()  # every row starts at a document start
        assert torch.equal(x[:, 1:], y[:, :-1])  # targets are inputs shifted by one
        json.dumps(state)  # JSON-serialisable


def test_packing_is_best_fit_of_whole_documents(tmp_path):
    d = make_data(tmp_path / "d")
    docs = {t[:6]: t for t in iter_texts(d, "train")}
    loader = tokenizing_distributed_data_loader(ByteTokenizer(), B=8, T=100, split="train", data_dir=d,
                                                ddp_rank=0, ddp_world_size=1, tokenizer_batch_size=8, buffer_size=16)
    whole = cropped = long_rows = 0
    for x, y, _ in take(loader, 12):
        for row in rows_of(x, y):
            segs = segments(row)
            for i, seg in enumerate(segs):
                if len(seg) >= 6:
                    full = docs[seg[:6]]
                    assert full.startswith(seg)  # every segment is the start of a real document
                    if len(full.encode()) + 1 >= 101:
                        assert i == 0 and len(segs) == 1  # a document longer than a row fills a row alone
                        long_rows += 1
                    if i < len(segs) - 1:
                        assert seg == full  # only the last document of a row may be cropped
                        whole += 1
                    else:
                        cropped += seg != full
    assert whole > 50 and cropped > 0 and long_rows > 0


def test_resume_gives_identical_batches(tmp_path):
    d = make_data(tmp_path / "d", docs_per_file=15)
    kw = dict(tokenizer=ByteTokenizer(), B=3, T=48, split="train", data_dir=d, ddp_rank=0, ddp_world_size=1,
              tokenizer_batch_size=4, buffer_size=6)
    ref = take(tokenizing_distributed_data_loader(**kw), 40)
    assert ref[-1][2]["epoch"] >= 2  # the run wraps around epochs
    for j in (0, 1, 5, 17, 30):
        state = json.loads(json.dumps(ref[j][2]))  # as a checkpoint would store it
        resumed = take(tokenizing_distributed_data_loader(**kw, resume_state=state), 6)
        for (x1, y1, s1), (x2, y2, s2) in zip(ref[j + 1:j + 7], resumed):
            assert torch.equal(x1, x2) and torch.equal(y1, y2) and s1 == s2


def test_val_split_loops(tmp_path):
    d = make_data(tmp_path / "d", n_val=3)
    loader = tokenizing_distributed_data_loader(ByteTokenizer(), B=2, T=32, split="val", data_dir=d,
                                                ddp_rank=0, ddp_world_size=1, tokenizer_batch_size=2, buffer_size=2)
    batches = take(loader, 20)
    assert batches[-1][2]["epoch"] >= 3
    val_ids = {t[:6] for t in iter_texts(d, "val")}
    for x, y, _ in batches:
        for row in rows_of(x, y):
            assert all(s[:6] in val_ids for s in segments(row) if len(s) >= 6)


def test_ranks_see_disjoint_documents(tmp_path):
    d = make_data(tmp_path / "d")
    seen = []
    for rank in range(2):
        loader = tokenizing_distributed_data_loader(ByteTokenizer(), B=4, T=64, split="train", data_dir=d,
                                                    ddp_rank=rank, ddp_world_size=2, tokenizer_batch_size=8,
                                                    buffer_size=8)
        mine = {t[:6] for t in iter_texts(d, "train", start=rank, step=2)}
        ids = set()
        for x, y, state in take(loader, 25):
            assert state["rank"] == rank and state["world_size"] == 2
            for row in rows_of(x, y):
                ids |= {s[:6] for s in segments(row) if len(s) >= 6}
        assert ids <= mine  # only this rank's documents
        assert len(ids) > len(mine) // 2
        seen.append(ids)
    assert not seen[0] & seen[1]


def test_errors(tmp_path):
    d = make_data(tmp_path / "d", n_val=2)
    tok = ByteTokenizer()
    with pytest.raises(ValueError, match="got no documents"):  # 2 val documents for 4 ranks
        next(tokenizing_distributed_data_loader(tok, 2, 16, "val", data_dir=d, ddp_rank=3, ddp_world_size=4))
    _, _, state = next(tokenizing_distributed_data_loader(tok, 2, 16, "train", data_dir=d, ddp_rank=0,
                                                          ddp_world_size=2))
    with pytest.raises(ValueError, match="rank"):
        next(tokenizing_distributed_data_loader(tok, 2, 16, "train", data_dir=d, ddp_rank=1, ddp_world_size=2,
                                                resume_state=state))
    with pytest.raises(ValueError, match="split"):
        next(tokenizing_distributed_data_loader(tok, 2, 16, "val", data_dir=d, ddp_rank=0, ddp_world_size=2,
                                                resume_state=state))
    with pytest.raises(ValueError, match="split must be"):
        next(tokenizing_distributed_data_loader(tok, 2, 16, "test", data_dir=d))
    with pytest.raises(ValueError, match="positive"):
        next(tokenizing_distributed_data_loader(tok, 0, 16, "train", data_dir=d))


def test_real_tokenizer(tmp_path):
    d = make_data(tmp_path / "d")
    tok = Tokenizer.train_from_iterator(iter_texts(d, "train"), 300)
    bos = tok.get_bos_token_id()
    loader = tokenizing_distributed_data_loader(tok, B=2, T=32, split="train", data_dir=d, ddp_rank=0,
                                                ddp_world_size=1)
    for x, y, _ in take(loader, 5):
        assert (x[:, 0] == bos).all() and torch.equal(x[:, 1:], y[:, :-1])
        assert int(x.max()) < tok.get_vocab_size()
        text = tok.decode(rows_of(x, y)[0].tolist())
        assert text.startswith("<|bos|><")  # a document start: "<0012>..."


def test_buffer_of_one_packs_in_stream_order(tmp_path):
    """With a one-document buffer, best fit degenerates to: documents in stream order, the one that does not fit
    is cropped to end the row and its tail dropped. Compare against that, written out directly."""
    d = make_data(tmp_path / "d")
    B, T = 2, 50
    stream = [[BOS] + list(t.encode()) for t in iter_texts(d, "train")] * 3  # three epochs
    expected, row = [], []
    for doc in stream:
        row += doc[:T + 1 - len(row)]
        if len(row) == T + 1:
            expected.append(row)
            row = []
    loader = tokenizing_distributed_data_loader(ByteTokenizer(), B=B, T=T, split="train", data_dir=d, ddp_rank=0,
                                                ddp_world_size=1, tokenizer_batch_size=1, buffer_size=1)
    n = len(expected) // B - 1
    got = [r.tolist() for x, y, _ in take(loader, n) for r in rows_of(x, y)]
    assert got == expected[:n * B]


def test_prefetch_keeps_order_and_raises():
    assert list(prefetch(iter(range(100)), depth=3)) == list(range(100))

    def broken():
        yield 1
        raise ValueError("bad shard")

    it = prefetch(broken())
    assert next(it) == 1
    with pytest.raises(ValueError, match="bad shard"):
        next(it)
