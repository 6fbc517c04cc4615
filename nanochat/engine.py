"""
Inference: a per-generation cache (KV for "T" layers, conv/SSM state for "M" layers) and the Engine, a small
tool-using state machine on top of GPT.forward that also runs REFRAG's multi-hop retrieval loop.

    from nanochat.engine import Engine
    engine = Engine(model, tokenizer)                       # REFRAG: retriever=RetrievalManager(...), max_hops=3
    text = engine.generate_from_conversation({"messages": [{"role": "user", "content": "hi"}]}, max_tokens=64)
    traces = engine.generate_trajectories(conversation, num_samples=8, temperature=1.0)  # rollouts, evaluation
    for token_column, mask_column in engine.generate(prompt_ids, num_samples=4, max_tokens=64): ...

How generation runs: the prompt is prefilled once at batch 1, the cache is replicated to num_samples rows, and each
forward feeds one column of tokens per row through the cache. Tools: when a row closes a tool call (<|python_end|>
for the calculator; <|query_end|> for retrieval when the Engine has a retriever), the Engine runs the tool and
queues its output for that row; queued tokens are forced (mask 0) instead of sampled, and they advance the KV and
Mamba states like any other token: the context is never re-prefilled. When every unfinished row has forced tokens
queued, they go through the cache as one multi-token chunk (GPT.forward with T > 1 on top of the cache), so at batch
1 a retrieval hop costs one forward however long its documents are. Adding a tool is one more entry in self.tools.

REFRAG (the trajectory of ../shared/DESIGN.md): the model writes <|query_start|>query<|query_end|>; the Engine
retrieves for it the top retrieval_top_k documents this row has not shown yet (the prompt's own documents count as
shown), numbers them after the row's last number, cuts each to doc_chars characters and forces the block
exactly as tokenizer.render_conversation renders a documents part there. Past max_hops queries, when nothing new is
found, or when no document fits the tokens the row has left, the block carries a notice instead (tokenizer.NOTICE_*).
"""

import math
import warnings
from collections import deque

import torch

from nanochat.gpt import GPT, sample_next_token
from nanochat.execution import use_calculator
from nanochat.rag_utils import as_doc_dict
from nanochat.tokenizer import (DOC_CHARS, MAX_CHARS_PER_TOKEN, NOTICE_HOP_CAP, NOTICE_NO_NEW_DOCUMENTS,
                                NOTICE_NO_ROOM, cut_document)


# -----------------------------------------------------------------------------
# cache

class KVLayerCache:
    def __init__(self, k, v):
        self.k, self.v = k, v  # (B, n_kv_head, max_seq_len, head_dim)


class MambaLayerCache:
    def __init__(self, conv_state, ssm_state):
        self.conv_state, self.ssm_state = conv_state, ssm_state  # fp32 always


class InferenceCache:
    """
    One object per generation. layers[i] is a KVLayerCache for "T" blocks and a MambaLayerCache for "M"
    blocks; pos is the number of tokens already in the cache (all rows advance together).
    KV memory grows with max_seq_len; Mamba state is constant in the context length.
    """

    def __init__(self, model, batch_size, max_seq_len, dtype=None, layers=None, pos=0):
        cfg = model.config
        device = model.get_device()
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.batch_size, self.max_seq_len, self.dtype, self.pos = batch_size, max_seq_len, dtype, pos
        if layers is not None:
            self.layers = layers
            return
        head_dim = cfg.n_embd // cfg.n_head
        self.layers = []
        for block in model.transformer.h:
            if block.kind == "T":
                shape = (batch_size, cfg.n_kv_head, max_seq_len, head_dim)
                self.layers.append(KVLayerCache(torch.zeros(shape, dtype=dtype, device=device),
                                                torch.zeros(shape, dtype=dtype, device=device)))
            else:
                conv_state, ssm_state = block.mixer.allocate_inference_state(batch_size, device)
                self.layers.append(MambaLayerCache(conv_state, ssm_state))

    def replicate(self, num_rows):
        """A new cache of num_rows rows, each a copy of this (batch 1) cache: prefill once, sample many."""
        assert self.batch_size == 1, "replicate() expects a batch-1 cache"
        layers = []
        for layer in self.layers:
            if isinstance(layer, KVLayerCache):
                layers.append(KVLayerCache(layer.k.expand(num_rows, -1, -1, -1).clone(),
                                           layer.v.expand(num_rows, -1, -1, -1).clone()))
            else:
                layers.append(MambaLayerCache(layer.conv_state.expand(num_rows, -1, -1).clone(),
                                              layer.ssm_state.expand(num_rows, -1, -1, -1).clone()))
        new = InferenceCache.__new__(InferenceCache)
        new.batch_size, new.max_seq_len, new.dtype, new.pos, new.layers = num_rows, self.max_seq_len, self.dtype, self.pos, layers
        return new

    def nbytes(self):
        """Bytes held by the cache (KV tensors + Mamba states)."""
        total = 0
        for layer in self.layers:
            tensors = (layer.k, layer.v) if isinstance(layer, KVLayerCache) else (layer.conv_state, layer.ssm_state)
            total += sum(t.numel() * t.element_size() for t in tensors)
        return total

    def reset(self):
        """Empty again without reallocating (the fast decoder reuses its buffers and graph across generations):
        pos 0 and zero Mamba states; stale keys/values past pos are never read (overwritten, or masked)."""
        self.pos = 0
        for layer in self.layers:
            if isinstance(layer, MambaLayerCache):
                layer.conv_state.zero_()
                layer.ssm_state.zero_()

    def first_row(self):
        """A batch-1 cache that is a view of row 0 of this one: writing through it writes this cache."""
        layers = [KVLayerCache(l.k[:1], l.v[:1]) if isinstance(l, KVLayerCache) else
                  MambaLayerCache(l.conv_state[:1], l.ssm_state[:1]) for l in self.layers]
        new = InferenceCache.__new__(InferenceCache)
        new.batch_size, new.max_seq_len, new.dtype, new.pos, new.layers = 1, self.max_seq_len, self.dtype, self.pos, layers
        return new

    def copy_first_row(self):
        """Copy row 0 into every other row (keys/values up to pos, whole Mamba states): replicate() in place."""
        n = self.batch_size - 1
        if n == 0:
            return
        for layer in self.layers:
            if isinstance(layer, KVLayerCache):
                for t in (layer.k, layer.v):
                    t[1:, :, :self.pos].copy_(t[:1, :, :self.pos].expand(n, -1, -1, -1))
            else:
                layer.conv_state[1:].copy_(layer.conv_state[:1].expand(n, -1, -1))
                layer.ssm_state[1:].copy_(layer.ssm_state[:1].expand(n, -1, -1, -1))


def _bucket(n):
    """The static cache length for n positions: n rounded up to a multiple of 2**(bits(n) - 4) (at least 64), and at
    least 256, so generations of similar lengths share one decoder and the masked tail stays small (<= 1/8 of the
    cache past 512 positions)."""
    q = 2 ** max(n.bit_length() - 4, 6)
    return max(256, -(-n // q) * q)


class FastDecoder:
    """
    The one-token decode step with static shapes, over a preallocated cache of batch_size rows and max_seq_len
    positions. The token ids and the position are device tensors (idx (B, 1), pos (1,)); attention reads the whole
    cache with the positions after pos masked (GPT.forward's decode_pos path, gpt.decode_attention); the Mamba
    conv/SSM states are updated in place (copy_, Mamba2._step). So every step is the same kernels on the same
    addresses, whatever the position: on CUDA it is captured once as a CUDA graph and then replayed per token,
    one launch instead of hundreds (batch-1 decode was launch-bound: ~9-17 ms per token at d12 on an H200 for
    weights that read in well under 1 ms, benchmarks/RESULTS.md). On CPU (graph=False) the same step runs eagerly:
    the tests check it equals GPT.forward with a cache. Prefill and multi-token forced chunks run GPT.forward on
    the same cache (self.cache), so the tool state machine of the Engine works on top of it unchanged.
    """

    def __init__(self, model, batch_size, max_seq_len, graph):
        device = model.get_device()
        if max_seq_len > model.cos.size(1):
            model._grow_rotary(max_seq_len)  # before capture: the graph reads the rotary tables at fixed addresses
        self.model, self.batch_size, self.max_seq_len = model, batch_size, max_seq_len
        self.cache = InferenceCache(model, batch_size, max_seq_len)
        self.idx = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.autocast = _autocast_state(device)
        self.signature = _signature(model, self.autocast)
        self.graph = None
        self.logits = None
        if graph:
            try:
                self._capture()
            except RuntimeError as e:  # a capture refused here (another library's unsafe call, a driver limit): the
                self.graph = None     # same step eagerly, still static and still right, only not launch-free
                warnings.warn(f"FastDecoder: CUDA graph capture failed ({e}); decoding with the eager static step")

    def _forward(self):
        return self.model(self.idx, cache=self.cache, decode_pos=self.pos)[:, -1, :]

    def _capture(self):
        enabled, dtype = self.autocast
        # warm up on a side stream (Triton JIT of the Mamba step, cuBLAS workspaces), as torch.cuda.graph asks;
        # this writes position 0 and the Mamba states, which the next prefill resets. Autocast's weight-cast cache
        # is off: a cast cached outside the capture would be read by the graph after autocast frees it
        amp = torch.autocast(self.model.get_device().type, dtype=dtype, enabled=enabled, cache_enabled=False)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), amp:
            for _ in range(2):
                self._forward()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"), amp:  # other threads may use CUDA
            self.logits = self._forward()

    def fits(self, model, batch_size, need):
        """Whether this decoder can run a generation of batch_size rows and need positions for model as it is now
        (same weights and rotary tables at the same addresses, same autocast) without attending over a cache much
        longer than needed."""
        return (model is self.model and batch_size == self.batch_size and need <= self.max_seq_len <= 2 * _bucket(need)
                and self.signature == _signature(model, _autocast_state(model.get_device())))

    def prefill(self, ids):
        """Reset the cache, run the prompt ids (1, T) through row 0 and copy it to every row: (B, V) last logits."""
        self.cache.reset()
        row = self.cache.first_row()
        logits = self.model(ids, cache=row, last_only=True)[:, -1, :]
        self.cache.pos = row.pos
        self.cache.copy_first_row()
        return logits.expand(self.batch_size, -1)

    def step(self, ids):
        """One token per row (ids (B, 1), any device) at cache.pos; returns (B, V) logits, overwritten by the next
        step, and advances cache.pos."""
        if self.cache.pos >= self.max_seq_len:
            raise RuntimeError(f"FastDecoder: position {self.cache.pos} is past the static cache ({self.max_seq_len})")
        self.idx.copy_(ids)
        self.pos.fill_(self.cache.pos)
        if self.graph is not None:
            self.graph.replay()
            logits = self.logits
        else:
            logits = self._forward()
        self.cache.pos += 1
        return logits


def _autocast_state(device):
    return torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type)


def _signature(model, autocast):
    """What a captured step depends on besides its inputs: the addresses and dtypes of the weights and rotary tables
    (a .to(), a rotary growth or a new parameter makes a new decoder), the Mamba implementation, and autocast."""
    params = tuple((p.data_ptr(), p.dtype) for p in model.parameters())
    mixers = tuple(b.mixer.impl for b in model.transformer.h if b.kind == "M")
    return params, model.cos.data_ptr(), model.sin.data_ptr(), mixers, autocast


# -----------------------------------------------------------------------------
# the engine

def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


class RowState:
    """One row of a generation: its tokens, the forced tokens it waits for, the tool call being written, and its
    REFRAG state (documents shown so far, numbering, queries, format problems)."""

    def __init__(self, tokens, documents, shown_keys):
        self.tokens = list(tokens)  # prompt + generated (forced included), through the terminal token
        self.mask = []  # per generated token: 1 sampled, 0 forced
        self.forced = deque()  # tool output waiting to be forced in
        self.tool = None  # the end-token id of the tool call being written, or None
        self.tool_tokens = []
        self.completed = False  # wrote <|assistant_end|> (or <|bos|>)
        self.documents = [dict(d) for d in documents]  # every numbered document, in number order
        self.shown = set(shown_keys)  # identities of the documents the model has seen (never shown twice)
        self.next_number = max((d["number"] for d in self.documents), default=0) + 1
        self.queries = []
        self.blocks = []  # the documents parts forced into this row, in order (the trace's "parts")
        self.errors = []

    def error(self, code):
        if code not in self.errors:
            self.errors.append(code)


class Engine:
    # tokens a forced document block leaves for the answer (at most half of what the row has left): without it,
    # one long block could use up max_tokens and end the row before it answers
    ANSWER_RESERVE = 64

    def __init__(self, model, tokenizer, retriever=None, retrieval_top_k=3, max_hops=3, doc_chars=DOC_CHARS,
                 force_chunks=True, fast_decode=None):
        """
        retriever: anything with retrieve(query, top_k) -> [(Document, score)] or document dicts (a
        RetrievalManager, any KB type); None = no retrieval tool. retrieval_top_k: new documents shown per query
        (the best ones this row has not shown yet). max_hops: follow-up queries answered per row. doc_chars: the
        character cap of every document (tokenizer.cut_document). force_chunks=False forces queued tool output
        one token per forward (the reference the chunked path is tested against).
        fast_decode: the one-token steps through a FastDecoder (static-shape step over a preallocated cache,
        replayed from a CUDA graph on CUDA, run eagerly on CPU); same tokens as the plain path. None (default) =
        on for a GPT on CUDA, off otherwise; False = GPT.forward with a cache at every step (the reference).
        """
        if not _is_int(retrieval_top_k) or retrieval_top_k < 1:
            raise ValueError(f"retrieval_top_k must be a positive int, got {retrieval_top_k!r}")
        if not _is_int(max_hops) or max_hops < 0:
            raise ValueError(f"max_hops must be an int >= 0, got {max_hops!r}")
        if not _is_int(doc_chars) or doc_chars < 1:
            raise ValueError(f"doc_chars must be a positive int, got {doc_chars!r}")
        if fast_decode is not None and not isinstance(fast_decode, bool):
            raise ValueError(f"fast_decode must be None (auto), True or False, got {fast_decode!r}")
        if fast_decode and not isinstance(model, GPT):
            raise ValueError(f"fast_decode=True needs a nanochat GPT (its decode_pos step), got {type(model).__name__}")
        self.model = model
        self.tokenizer = tokenizer
        self.retriever = retriever
        self.retrieval_top_k = retrieval_top_k
        self.max_hops = max_hops
        self.doc_chars = doc_chars
        self.force_chunks = force_chunks
        self.fast_decode = fast_decode
        self._decoder = None  # the FastDecoder of the last fast generation (its cache and graph), reused when it fits
        self._decoder_busy = False  # a generation is using it (an interleaved second one takes the plain path)
        enc = tokenizer.encode_special
        self.bos = tokenizer.get_bos_token_id()
        self.assistant_end = enc("<|assistant_end|>")
        self.query_start, self.query_end = enc("<|query_start|>"), enc("<|query_end|>")
        # only the Engine writes document blocks: the model sampling one of these is a format error
        self.block_tokens = {enc(n) for n in ("<|retrieval_start|>", "<|retrieval_end|>", "<|doc_start|>",
                                              "<|doc_end|>")}
        # tools: end token -> (start token, function(engine, row, text, tokens left) -> list of token ids to force)
        # plain functions, called with the Engine: bound methods here would make the Engine a reference cycle, which
        # `del engine` does not free (only the garbage collector does), and with it the fast decoder's GPU cache
        self.tools = {enc("<|python_end|>"): (enc("<|python_start|>"), Engine._run_calculator)}
        if retriever is not None:
            self.tools[self.query_end] = (self.query_start, Engine._run_retrieval)

    # ---- tools

    def _run_calculator(self, row, expr, left):
        # a refused expression gives "error: ..." (issue 15, item 9): forced like a result, so the model sees it
        enc = self.tokenizer.encode_special
        return [enc("<|output_start|>")] + self.tokenizer.encode(use_calculator(expr)) + [enc("<|output_end|>")]

    def _doc_key(self, doc):
        """A document's identity for "already shown": its id, else its (title, shown content)."""
        if doc.get("id") not in (None, ""):
            return ("id", str(doc["id"]))
        return ("text", doc.get("title") or "", cut_document(doc["content"], self.doc_chars))

    def _run_retrieval(self, row, query, left):
        query = query.strip()
        row.queries.append(query)
        hop = len(row.queries)
        if hop > self.max_hops:
            row.error("hop_cap_exceeded")
            return self._block(row, hop, [], NOTICE_HOP_CAP)
        if not query:
            row.error("empty_query")
            return self._block(row, hop, [], NOTICE_NO_NEW_DOCUMENTS)
        # the top retrieval_top_k documents not shown yet: retrieve deep enough that the shown ones cannot crowd
        # them out (the rule of MultiHopRAGTask and of the gold trajectories in tasks/multihop.py)
        new, keys = [], set()
        for hit in self.retriever.retrieve(query, top_k=self.retrieval_top_k + len(row.shown)):
            doc = as_doc_dict(hit)
            key = self._doc_key(doc)
            if key not in row.shown and key not in keys and len(new) < self.retrieval_top_k:
                new.append(doc)
                keys.add(key)
        if not new:
            return self._block(row, hop, [], NOTICE_NO_NEW_DOCUMENTS)
        # the block must leave room for the answer: drop the lowest-ranked new documents until it fits (they stay
        # unshown, so a later query may bring them)
        budget = left - min(self.ANSWER_RESERVE, left // 2)
        doc_chars = min(self.doc_chars, MAX_CHARS_PER_TOKEN * max(budget, 1))  # never encode what cannot fit
        while new:
            ids = self.tokenizer.render_documents(new, row.next_number, doc_chars)
            if len(ids) <= budget:
                return self._block(row, hop, new, None, doc_chars, ids)
            new.pop()
        return self._block(row, hop, [], NOTICE_NO_ROOM)

    def _block(self, row, hop, docs, notice, doc_chars=None, ids=None):
        """Record a forced retrieval block in the row (documents numbered on, marked shown); returns its ids."""
        shown = []
        for j, doc in enumerate(docs):
            d = {"number": row.next_number + j, "hop": hop, "id": doc["id"], "title": doc["title"],
                 "content": cut_document(doc["content"], doc_chars), "shown": True}
            d.update({k: doc[k] for k in ("parent_id", "score") if k in doc})
            shown.append(d)
            row.shown.add(self._doc_key(doc))
        row.documents.extend(shown)
        row.next_number += len(shown)
        part = {"type": "documents", "documents": shown}
        if notice:
            part["notice"] = notice
        row.blocks.append(part)
        if ids is None:
            ids = self.tokenizer.render_documents([], row.next_number, self.doc_chars, notice)
        return ids

    def _step_tools(self, row, tok, left):
        starts = {start: end for end, (start, _) in self.tools.items()}
        if tok in self.block_tokens:
            row.error("forged_retrieval")
        if self.query_end in self.tools and ((tok == self.query_end and row.tool != self.query_end)
                                             or (tok == self.query_start and row.tool == self.query_end)):
            row.error("unbalanced_query_tags")  # a query closed that was never opened, or opened twice
        if tok in starts:
            row.tool, row.tool_tokens = starts[tok], []
        elif row.tool is not None and tok == row.tool:
            _, fn = self.tools[row.tool]
            row.forced.extend(fn(self, row, self.tokenizer.decode(row.tool_tokens), left))
            row.tool, row.tool_tokens = None, []
        elif row.tool is not None:
            row.tool_tokens.append(tok)

    def _take(self, row, tok, mask, left):
        """Append one token to a row; a sampled one may end the row or call a tool (left: tokens still allowed)."""
        row.tokens.append(tok)
        row.mask.append(mask)
        if mask:  # forced tokens are context: they neither end the row nor call tools
            if tok == self.assistant_end or tok == self.bos:
                row.completed = True
            self._step_tools(row, tok, left)

    # ---- generation

    def _fast_decoder(self, batch_size, need, device):
        """The FastDecoder for this generation, or None for the plain path (fast decode off, or in use by another
        generation of this Engine that is still streaming)."""
        fast = self.fast_decode if self.fast_decode is not None else (isinstance(self.model, GPT) and device.type == "cuda")
        if not fast or self._decoder_busy:
            return None
        if self._decoder is None or not self._decoder.fits(self.model, batch_size, need):
            self._decoder = None  # free the old cache and graph before allocating the new ones
            self._decoder = FastDecoder(self.model, batch_size, _bucket(need), graph=device.type == "cuda")
        return self._decoder

    def release_decoder(self):
        """Drop the fast decoder's static cache and CUDA graph (their memory); the next generation builds new ones.
        Callers that train between generations (refrag_finetune) can call this to give the memory back."""
        if not self._decoder_busy:
            self._decoder = None

    def _sample(self, logits, rows, rngs, temperature, top_k):
        """{row index: token} for the row indices in rows. Row i draws from its own generator, and only when it
        samples, so a row's draws do not depend on the other rows (or on how forced tokens were chunked)."""
        if temperature == 0.0:
            best = torch.argmax(logits, dim=-1).tolist()
            return {i: best[i] for i in rows}
        return {i: sample_next_token(logits[i:i + 1], rngs[i], temperature, top_k).item() for i in rows}

    def _check(self, tokens, num_samples, max_tokens, temperature, top_k, seed):
        """Clear ValueErrors for bad arguments (issue 15, item 6); returns max_tokens clipped to the rotary table."""
        if not isinstance(tokens, list) or not tokens:
            raise ValueError(f"tokens must be a non-empty list of token ids, got {str(tokens)[:80]}")
        vocab = self.model.config.vocab_size
        for i, t in enumerate(tokens):
            if not _is_int(t) or not 0 <= t < vocab:
                raise ValueError(f"prompt token {i} is {t!r}: not a token id in [0, {vocab}) of this model")
        if not _is_int(num_samples) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        if max_tokens is not None and (not _is_int(max_tokens) or max_tokens < 1):
            raise ValueError(f"max_tokens must be a positive int (or None), got {max_tokens!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature < math.inf:
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
        if top_k is not None and (not _is_int(top_k) or top_k < 1):
            raise ValueError(f"top_k must be None (no top-k) or a positive int, got {top_k!r}")
        if not _is_int(seed):
            raise ValueError(f"seed must be an int, got {seed!r}")
        seq_len = self.model.config.sequence_len
        if len(tokens) > seq_len:
            raise ValueError(f"the prompt is {len(tokens)} tokens but the model's context is {seq_len} tokens; "
                             f"shorten the question or pass fewer/shorter documents")
        limit = self.model.rotary_seq_len - len(tokens)
        return limit if max_tokens is None else min(max_tokens, limit)

    def _rows(self, tokens, num_samples, shown_documents):
        """num_samples fresh rows that have seen shown_documents (numbered by position unless they carry "number")."""
        if shown_documents is not None and not isinstance(shown_documents, list):
            raise ValueError(f"shown_documents must be a list of document dicts, got {type(shown_documents).__name__}")
        docs = []
        for i, d in enumerate(shown_documents or []):
            if not isinstance(d, dict) or not isinstance(d.get("content"), str):
                raise ValueError(f"shown_documents[{i}]: expected a dict with a str \"content\", got {str(d)[:100]!r}")
            doc = {"number": d.get("number", i + 1), "hop": d.get("hop", 0), "id": d.get("id"),
                   "title": d.get("title") or "", "content": d["content"], "shown": d.get("shown", True)}
            doc.update({k: d[k] for k in ("parent_id", "score") if d.get(k) is not None})
            docs.append(doc)
        keys = [self._doc_key(d) for d in docs if d["shown"]]
        return [RowState(tokens, docs, keys) for _ in range(num_samples)]

    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, seed=42,
                 shown_documents=None):
        """
        Stream generation for num_samples rows from one prompt. Yields (token_column, mask_column), one entry per
        row (mask 1 = sampled, 0 = forced tool output; after a row's terminal token its entries are filler). Row i
        samples with its own generator seeded seed + i, so row i of a batch is what a single-row generation with
        seed + i produces. shown_documents: the documents already in the prompt (dicts; "number" defaults to the
        position + 1, "shown": False for one trimmed away), so retrieval numbers on after them and never shows
        one twice. Bad arguments raise ValueError here, before anything runs.
        """
        max_tokens = self._check(tokens, num_samples, max_tokens, temperature, top_k, seed)
        rows = self._rows(tokens, num_samples, shown_documents)
        return self._stream(tokens, rows, max_tokens, temperature, top_k, seed)

    @torch.inference_mode()
    def _stream(self, tokens, rows, max_tokens, temperature, top_k, seed):
        model = self.model
        device = model.get_device()
        num_rows = len(rows)
        rngs = []
        for i in range(num_rows):
            g = torch.Generator(device=device)
            g.manual_seed(seed + i)
            rngs.append(g)

        # prefill once at batch 1, then replicate the cache to num_rows rows
        prompt = torch.tensor([tokens], dtype=torch.long, device=device)
        decoder = self._fast_decoder(num_rows, len(tokens) + max_tokens, device)
        if decoder is not None:
            self._decoder_busy = True
            try:
                yield from self._loop(rows, decoder.prefill(prompt), decoder.cache, decoder, max_tokens, rngs,
                                      temperature, top_k, device)
            finally:  # also when the caller stops iterating early (the generator is closed)
                self._decoder_busy = False
            return
        cache = InferenceCache(model, 1, len(tokens) + max_tokens)
        logits = model(prompt, cache=cache, last_only=True)[:, -1, :]
        if num_rows > 1:
            cache = cache.replicate(num_rows)
            logits = logits.expand(num_rows, -1)
        yield from self._loop(rows, logits, cache, None, max_tokens, rngs, temperature, top_k, device)

    def _loop(self, rows, logits, cache, decoder, max_tokens, rngs, temperature, top_k, device):
        """Sample / force one column per forward until max_tokens or every row is done. One-token columns go
        through decoder.step when there is a decoder, multi-token forced chunks through GPT.forward on the cache."""
        produced = 0
        while produced < max_tokens:
            to_sample = [i for i, r in enumerate(rows) if not r.completed and not r.forced]
            sampled = self._sample(logits, to_sample, rngs, temperature, top_k) if to_sample else {}
            left = max_tokens - produced - 1
            chunk = [[] for _ in rows]  # (token, mask) per row for this forward
            for i, row in enumerate(rows):
                if row.completed:
                    chunk[i].append((self.assistant_end, 0))  # filler: the row is done, its state is unused
                    continue
                tok, mask = (row.forced.popleft(), 0) if row.forced else (sampled[i], 1)
                self._take(row, tok, mask, left)
                chunk[i].append((tok, mask))
            # chunked forcing: when every unfinished row has forced tokens queued, feed them in this same forward
            queued = [len(r.forced) for r in rows if not r.completed]
            extra = min(min(queued), left) if self.force_chunks and queued else 0
            for _ in range(extra):
                for i, row in enumerate(rows):
                    tok = self.assistant_end if row.completed else row.forced.popleft()
                    if not row.completed:
                        self._take(row, tok, 0, None)
                    chunk[i].append((tok, 0))
            for j in range(1 + extra):
                yield [c[j][0] for c in chunk], [c[j][1] for c in chunk]
            produced += 1 + extra
            if produced >= max_tokens or all(r.completed for r in rows):
                break
            if decoder is not None and extra == 0:
                logits = decoder.step(torch.tensor([[c[0][0]] for c in chunk], dtype=torch.long))
            else:
                ids = torch.tensor([[t for t, _ in c] for c in chunk], dtype=torch.long, device=device)
                logits = self.model(ids, cache=cache, last_only=True)[:, -1, :]

    def generate_batch(self, tokens, num_samples=1, **kwargs):
        """Non-streaming: returns (results, masks), per row the tokens generated before the terminal token."""
        results = [[] for _ in range(num_samples)]
        masks = [[] for _ in range(num_samples)]
        done = [False] * num_samples
        for token_column, mask_column in self.generate(tokens, num_samples, **kwargs):
            for i, (tok, mask) in enumerate(zip(token_column, mask_column)):
                if done[i]:
                    continue
                if tok == self.assistant_end or tok == self.bos:
                    done[i] = True
                else:
                    results[i].append(tok)
                    masks[i].append(mask)
            if all(done):
                break
        return results, masks

    def generate_trajectories(self, conversation, num_samples=1, max_tokens=None, temperature=1.0, top_k=None,
                              seed=42, on_tokens=None):
        """
        Answer the conversation's last user turn num_samples times (rows from one prefill, each with its own tool
        state), running the REFRAG loop when the Engine has a retriever. max_tokens (None: what the context leaves)
        counts every generated token, forced documents included; the prompt is trimmed as in prepare_prompt.
        on_tokens(token_column, mask_column) is called for every column as it is generated (streaming).
        Returns one trace per row, a dict:
          answer         the text with document blocks and query spans removed (what is scored)
          queries        the queries the row wrote, in order (also those past max_hops)
          documents      every numbered document, in number order (documents[i]["number"] == i + 1): number, hop
                         (0 = the prompt's), id, title, content as shown (cut), shown (False: trimmed from the
                         prompt), plus parent_id/score when known: the citation targets for compute_rag_reward
          tokens         prompt + generated tokens (forced included) through <|assistant_end|> when written
          mask           per generated token (tokens[prompt_len:]): 1 sampled by the model, 0 forced
          prompt_len     len(prompt)
          num_hops       retrievals run (queries within max_hops)
          format_errors  [] or codes: unclosed_query, unbalanced_query_tags, hop_cap_exceeded, empty_query,
                         forged_retrieval (the model wrote a document-block token), no_answer, truncated (no
                         <|assistant_end|> within max_tokens)
          finished       the row wrote <|assistant_end|>
          parts          the assistant message as conversation parts (text / query / documents / python /
                         python_output): appended to the conversation, render_conversation gives these tokens
                         back when the model's tokenization is the canonical one and format_errors is empty
        """
        prompt, max_tokens, documents = self._prepare(conversation, self.model.config.sequence_len
                                                      if max_tokens is None else max_tokens)
        max_tokens = self._check(prompt, num_samples, max_tokens, temperature, top_k, seed)
        rows = self._rows(prompt, num_samples, documents)
        for token_column, mask_column in self._stream(prompt, rows, max_tokens, temperature, top_k, seed):
            if on_tokens is not None:
                on_tokens(token_column, mask_column)
        return [self._trace(row, len(prompt)) for row in rows]

    def _trace(self, row, prompt_len):
        generated = row.tokens[prompt_len:]
        finished = row.completed
        body = generated[:-1] if finished else generated
        errors = list(row.errors)
        if row.tool == self.query_end:
            errors.append("unclosed_query")
        answer = self.decode_answer(body)
        if not answer:
            errors.append("no_answer")
        if not finished:
            errors.append("truncated")
        return {"answer": answer, "queries": list(row.queries), "documents": [dict(d) for d in row.documents],
                "tokens": list(row.tokens), "mask": list(row.mask), "prompt_len": prompt_len,
                "num_hops": min(len(row.queries), self.max_hops), "format_errors": errors, "finished": finished,
                "parts": self._parts(body, row.mask[:len(body)], row.blocks)}

    def _parts(self, body, mask, blocks):
        """The generated tokens as assistant parts; document blocks are the recorded ones (forced, mask 0)."""
        enc = self.tokenizer.encode_special
        spans = {self.query_start: (self.query_end, "query"),
                 enc("<|python_start|>"): (enc("<|python_end|>"), "python"),
                 enc("<|output_start|>"): (enc("<|output_end|>"), "python_output"),
                 enc("<|retrieval_start|>"): (enc("<|retrieval_end|>"), "documents")}
        parts, text, blocks, i = [], [], iter(blocks), 0
        while i < len(body):
            t = body[i]
            kind = spans[t][1] if t in spans else None
            if kind is None or (kind == "documents" and mask[i]):  # a block token the model wrote itself is text
                text.append(t)
                i += 1
                continue
            if text:
                parts.append({"type": "text", "text": self.tokenizer.decode(text)})
                text = []
            j = i + 1
            while j < len(body) and body[j] != spans[t][0]:
                j += 1
            parts.append(next(blocks) if kind == "documents" else {"type": kind, "text": self.tokenizer.decode(body[i + 1:j])})
            i = j + 1
        if text:
            parts.append({"type": "text", "text": self.tokenizer.decode(text)})
        return parts

    def generate_from_conversation(self, conversation, max_tokens=256, temperature=0.0, top_k=None, seed=42,
                                   return_trace=False):
        """
        Answer the conversation's last user turn; returns the assistant's text (document blocks and queries left
        out), or with return_trace=True the whole trace (see generate_trajectories). Prompt budget: prepare_prompt.
        A question that does not fit even without documents raises tokenizer.ConversationTooLong (a ValueError).
        """
        trace = self.generate_trajectories(conversation, 1, max_tokens, temperature, top_k, seed)[0]
        return trace if return_trace else trace["answer"]

    def _prepare(self, conversation, max_tokens):
        if not _is_int(max_tokens) or max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
        seq_len = self.model.config.sequence_len
        reserve = max(1, min(max_tokens, seq_len // 4))
        prompt, documents = self.tokenizer.render_for_completion(conversation, max_tokens=seq_len - reserve,
                                                                 doc_chars=self.doc_chars, return_documents=True)
        return prompt, min(max_tokens, seq_len - len(prompt)), documents

    def prepare_prompt(self, conversation, max_tokens):
        """
        (prompt ids, tokens the answer may have), for generate_from_conversation and chat_cli's streaming.
        The answer is guaranteed min(max_tokens, seq_len // 4) tokens: retrieved documents (lowest-ranked first)
        are dropped only to make that room, so a generous max_tokens does not throw away the documents the
        answer needs; beyond it the answer gets whatever the prompt leaves, up to max_tokens.
        """
        prompt, max_tokens, _ = self._prepare(conversation, max_tokens)
        return prompt, max_tokens

    def decode_answer(self, ids):
        """Assistant tokens -> text, leaving out forced document blocks (context) and the model's search queries."""
        enc = self.tokenizer.encode_special
        r_start, r_end = enc("<|retrieval_start|>"), enc("<|retrieval_end|>")
        kept, skip_to = [], None
        for t in ids:
            if skip_to is not None:
                if t == skip_to:
                    skip_to = None
            elif t == r_start:
                skip_to = r_end
            elif t == self.query_start:
                skip_to = self.query_end
            elif t not in (r_end, self.query_end):
                kept.append(t)
        return self.tokenizer.decode(kept).strip()
