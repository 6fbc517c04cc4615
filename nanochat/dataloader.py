"""
The pretraining data loader: documents -> tokens -> (inputs, targets) batches of B rows of T tokens, with every row
starting at a document start (BOS-aligned best-fit packing), rank-strided for DDP and exactly resumable.

    from nanochat.dataloader import tokenizing_distributed_data_loader
    loader = tokenizing_distributed_data_loader(tokenizer, B=32, T=2048, split="train", device="cuda")
    for step, (x, y, state) in enumerate(loader):
        ...                                     # checkpoint `state` (a small JSON-able dict) with the model
    loader = tokenizing_distributed_data_loader(..., resume_state=state)   # continues with the very next batch

Packing. Each document is tokenized with <|bos|> prepended; a buffer holds up to `buffer_size` tokenized documents
(refilled `tokenizer_batch_size` documents at a time). A row of T+1 tokens is filled left to right:
  1. a row starts with the longest buffered document if that one is at least a row long: its first T+1 tokens
     are the whole row (the best use of a long document under BOS alignment);
  2. otherwise, while space is left, put the LARGEST buffered document that fits whole (best fit, oldest first
     among equal lengths);
  3. when none fits, crop the SHORTEST buffered document to exactly fill the row's end (the crop that throws
     away the fewest tokens) and drop its tail.
So there is no padding and no wasted row space, every row starts with <|bos|> at a document start, and every
document in a row is whole except possibly the last one. We drop cropped tails rather than carry them over: a tail
would start mid-document, breaking the alignment that lets every token attend back to its document's start
(nanochat's choice too). Rule 1 is ours: without it, documents longer than a row never fit, pile up in the buffer
and shrink the pool best fit chooses from (measured on the built-in corpus at T=512, buffer 256: the buffer ends
up 255/256 long documents and mid-row crops throw away ~8% of tokens; with rule 1, ~1%, on top of the unavoidable
loss of the tails of documents longer than a row). Rows are inputs = row[:-1], targets = row[1:].

Exact resume. The state after a batch is {epoch, the position (chunk, row) of the last document read, the positions
of the documents in the buffer, in order}; nanochat/dataset.py can read documents back by position, so resuming
re-reads and re-tokenizes just the buffered documents and continues the stream after `last`: the next batches are
identical to those of an uninterrupted run. Both splits loop over epochs forever (the caller takes as many steps
as it wants); the state's epoch counts passes over this rank's documents.
"""

import queue
import bisect
import threading

import torch

from nanochat.common import get_dist_info
from nanochat.dataset import default_data_dir, iter_documents, read_documents

STATE_VERSION = 1


def _check_state(state, split, rank, world_size):
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise ValueError(f"resume_state is not a dataloader state (version {STATE_VERSION}): {str(state)[:200]}")
    for key, want in (("split", split), ("rank", rank), ("world_size", world_size)):
        if state.get(key) != want:
            raise ValueError(f"resume_state was saved with {key}={state.get(key)!r} but this loader has "
                             f"{key}={want!r}: "
                             f"positions are per rank of a given world size, so resume with the same setup")
    last, buf = state.get("last"), state.get("buffer")
    ok = isinstance(state.get("epoch"), int) and isinstance(buf, list) and (last is None or len(last) == 2)
    ok = ok and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in buf)
    if not ok:
        raise ValueError(f"resume_state is malformed: {str(state)[:200]}")


def tokenizing_distributed_data_loader(tokenizer, B, T, split, device="cpu", data_dir=None, resume_state=None,
                                       ddp_rank=None, ddp_world_size=None, tokenizer_batch_size=128, buffer_size=256):
    """
    Generator of (inputs, targets, state): LongTensors (B, T) on device, and the state to pass as resume_state to
    continue right after this batch. tokenizer: needs get_bos_token_id() and encode(list_of_str, prepend=bos_id).
    data_dir: default nanochat.dataset.default_data_dir(). Rank / world size default to the torchrun environment.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if not (isinstance(B, int) and B >= 1 and isinstance(T, int) and T >= 1):
        raise ValueError(f"B and T must be positive ints, got B={B!r} T={T!r}")
    if tokenizer_batch_size < 1 or buffer_size < 1:
        raise ValueError(f"tokenizer_batch_size and buffer_size must be >= 1, got {tokenizer_batch_size}, "
                         f"{buffer_size}")
    if ddp_rank is None or ddp_world_size is None:
        _, rank, _, world_size = get_dist_info()
        ddp_rank = rank if ddp_rank is None else ddp_rank
        ddp_world_size = world_size if ddp_world_size is None else ddp_world_size
    rank, world_size = int(ddp_rank), int(ddp_world_size)
    data_dir = default_data_dir() if data_dir is None else data_dir
    device = torch.device(device)
    pin = device.type == "cuda"
    bos = tokenizer.get_bos_token_id()
    row_len = T + 1

    # stream state: `last` is the position of the last document read in the current epoch (None: epoch start)
    epoch, last = 0, None
    # the buffer: seq -> (position, token ids) in arrival order (what the state records), plus its keys sorted by
    # (length, -seq) so best fit is a bisect: the largest document that fits, the oldest among equal lengths
    buffer, by_len, next_seq = {}, [], 0

    def add(position, ids):
        nonlocal next_seq
        buffer[next_seq] = (position, ids)
        bisect.insort(by_len, (len(ids), -next_seq))
        next_seq += 1

    if resume_state is not None:
        _check_state(resume_state, split, rank, world_size)
        epoch = resume_state["epoch"]
        last = None if resume_state["last"] is None else tuple(resume_state["last"])
        positions = [tuple(p) for p in resume_state["buffer"]]
        if positions:
            texts = read_documents(data_dir, split, positions)
            for position, ids in zip(positions, tokenizer.encode(texts, prepend=bos)):
                add(position, ids)
    docs = iter_documents(data_dir, split, rank, world_size, after=last)
    read_this_epoch = last is not None  # a whole epoch with no document for this rank is an error, not a hang

    def refill():
        nonlocal epoch, last, docs, read_this_epoch
        positions, texts = [], []
        while len(texts) < tokenizer_batch_size:
            try:
                c, r, text = next(docs)
            except StopIteration:
                if not read_this_epoch:
                    raise ValueError(f"rank {rank} of {world_size} got no documents from the {split} split of "
                                     f"{data_dir}: add data, or use fewer ranks") from None
                epoch, last, read_this_epoch = epoch + 1, None, False
                docs = iter_documents(data_dir, split, rank, world_size)
                continue
            last, read_this_epoch = (c, r), True
            positions.append((c, r))
            texts.append(text)
        for position, ids in zip(positions, tokenizer.encode(texts, prepend=bos)):
            add(position, ids)

    def take(k):
        _, neg_seq = by_len.pop(k)
        return buffer.pop(-neg_seq)[1]

    while True:
        rows = []
        for _ in range(B):
            row = []
            while len(row) < row_len:
                if len(buffer) < buffer_size:
                    refill()
                space = row_len - len(row)
                if not row and by_len[-1][0] >= row_len:  # a document at least a row long fills a row by itself
                    row.extend(take(len(by_len) - 1)[:row_len])
                    continue
                k = bisect.bisect_right(by_len, (space, 1)) - 1  # (space, 1) sorts after every (space, -seq)
                if k >= 0:
                    row.extend(take(k))  # the largest document that fits whole
                else:  # nothing fits whole: crop the shortest document to fill the row exactly
                    row.extend(take(0)[:space])
            rows.append(row)
        batch = torch.tensor(rows, dtype=torch.long)
        inputs, targets = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
        if pin:  # pinned host memory makes the copy asynchronous; the caching host allocator keeps it alive
            inputs = inputs.pin_memory().to(device, non_blocking=True)
            targets = targets.pin_memory().to(device, non_blocking=True)
        elif device.type != "cpu":
            inputs, targets = inputs.to(device), targets.to(device)
        state = {"version": STATE_VERSION, "split": split, "rank": rank, "world_size": world_size, "epoch": epoch,
                 "last": None if last is None else list(last), "buffer": [list(p) for p, _ in buffer.values()]}
        yield inputs, targets, state


def prefetch(iterator, depth=2):
    """
    Run a batch iterator in a background thread, up to `depth` batches ahead, so tokenizing, rendering and
    packing the next batches overlaps with the accelerator working on the current one (the main thread waits
    on the GPU with the GIL released). Order, and so every (batch, state) pair, is unchanged; an exception in
    the producer is re-raised here.
    """
    q = queue.Queue(maxsize=depth)
    done = object()

    def produce():
        try:
            for item in iterator:
                q.put(item)
            q.put(done)
        except BaseException as e:  # hand it to the consumer
            q.put(e)

    threading.Thread(target=produce, daemon=True).start()
    while True:
        item = q.get()
        if item is done:
            return
        if isinstance(item, BaseException):
            raise item
        yield item
