"""
Inference: a per-generation cache (KV for "T" layers, conv/SSM state for "M" layers) and the Engine, a small
tool-using state machine on top of GPT.forward.

    from nanochat.engine import Engine
    engine = Engine(model, tokenizer)                      # optional: retriever=RetrievalManager(...)
    text = engine.generate_from_conversation({"messages": [{"role": "user", "content": "hi"}]}, max_tokens=64)
    for token_column, mask_column in engine.generate(prompt_ids, num_samples=4, max_tokens=64): ...

How generation runs: the prompt is prefilled once at batch 1, then the cache is replicated to num_samples
rows, and every step feeds one token per row. Tools: when a row closes a tool call (<|python_end|> for the
calculator; <|query_end|> for retrieval when the Engine has a retriever), the Engine runs the tool and queues
its output tokens for that row; queued tokens are forced (mask 0) instead of sampled, one per step, so they
advance the KV and Mamba states like any other token. Adding a tool is one more entry in self.tools.
"""

from collections import deque

import torch

from nanochat.gpt import sample_next_token
from nanochat.execution import use_calculator


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


# -----------------------------------------------------------------------------
# the engine

class RowState:
    def __init__(self, tokens):
        self.tokens = list(tokens)  # everything in this row so far (prompt included)
        self.forced = deque()  # tool output waiting to be forced in
        self.tool = None  # the end-token id of the tool call being written, or None
        self.tool_tokens = []
        self.completed = False


class Engine:
    def __init__(self, model, tokenizer, retriever=None, retrieval_top_k=3):
        self.model = model
        self.tokenizer = tokenizer
        self.retriever = retriever
        self.retrieval_top_k = retrieval_top_k
        enc = tokenizer.encode_special
        self.bos = tokenizer.get_bos_token_id()
        self.assistant_end = enc("<|assistant_end|>")
        # tools: end token -> (start token, function(text) -> list of token ids to force, or None)
        self.tools = {enc("<|python_end|>"): (enc("<|python_start|>"), self._run_calculator)}
        if retriever is not None:
            self.tools[enc("<|query_end|>")] = (enc("<|query_start|>"), self._run_retrieval)

    def _run_calculator(self, expr):
        result = use_calculator(expr)
        if result is None:
            return None
        enc = self.tokenizer.encode_special
        return [enc("<|output_start|>")] + self.tokenizer.encode(result) + [enc("<|output_end|>")]

    def _run_retrieval(self, query):
        hits = self.retriever.retrieve(query, top_k=self.retrieval_top_k)
        docs = [dict(id=d.id, title=d.title, content=d.content, score=float(s)) for d, s in hits]
        return self.tokenizer.render_documents(docs)

    @torch.inference_mode()
    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, seed=42):
        """
        Stream generation for num_samples rows from one prompt. Yields (token_column, mask_column), one entry
        per row (mask 1 = sampled, 0 = forced tool output). Row i samples with its own generator seeded
        seed + i, so row i of a batch is exactly what a single-row generation with seed + i produces.
        """
        assert isinstance(tokens, list) and len(tokens) > 0 and isinstance(tokens[0], int), "tokens must be a non-empty list of ints"
        model = self.model
        device = model.get_device()
        seq_len = model.config.sequence_len
        if len(tokens) > seq_len:
            raise ValueError(f"the prompt is {len(tokens)} tokens but the model's context is {seq_len} tokens; "
                             f"shorten the question or pass fewer/shorter documents")
        limit = model.rotary_seq_len - len(tokens)
        max_tokens = limit if max_tokens is None else min(max_tokens, limit)
        rngs = []
        for i in range(num_samples):
            g = torch.Generator(device=device)
            g.manual_seed(seed + i)
            rngs.append(g)

        # prefill once at batch 1, then replicate the cache to num_samples rows
        cache = InferenceCache(model, 1, len(tokens) + max_tokens)
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        logits = model(ids, cache=cache)[:, -1, :]
        if num_samples > 1:
            cache = cache.replicate(num_samples)
            logits = logits.expand(num_samples, -1)
        rows = [RowState(tokens) for _ in range(num_samples)]

        for _ in range(max_tokens):
            if temperature == 0.0:
                sampled = torch.argmax(logits, dim=-1).tolist()
            else:
                sampled = [sample_next_token(logits[i:i + 1], rngs[i], temperature, top_k).item() for i in range(num_samples)]
            token_column, mask_column = [], []
            for row, tok in zip(rows, sampled):
                if row.forced:
                    tok, mask = row.forced.popleft(), 0
                else:
                    mask = 1
                token_column.append(tok)
                mask_column.append(mask)
                row.tokens.append(tok)
                if row.completed:
                    continue
                if tok == self.assistant_end or tok == self.bos:
                    row.completed = True
                self._step_tools(row, tok)
            yield token_column, mask_column
            if all(r.completed for r in rows):
                break
            ids = torch.tensor(token_column, dtype=torch.long, device=device).unsqueeze(1)
            logits = model(ids, cache=cache)[:, -1, :]

    def _step_tools(self, row, tok):
        starts = {start: end for end, (start, _) in self.tools.items()}
        if tok in starts:
            row.tool, row.tool_tokens = starts[tok], []
        elif row.tool is not None and tok == row.tool:
            _, fn = self.tools[row.tool]
            forced = fn(self.tokenizer.decode(row.tool_tokens))
            if forced:
                row.forced.extend(forced)
            row.tool, row.tool_tokens = None, []
        elif row.tool is not None:
            row.tool_tokens.append(tok)

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

    def generate_from_conversation(self, conversation, max_tokens=256, temperature=0.0, top_k=None, seed=42):
        """
        Answer the conversation's last user turn; returns the assistant's text (prompt budget: prepare_prompt).
        A question that does not fit even without documents raises tokenizer.ConversationTooLong (a ValueError).
        """
        prompt, max_tokens = self.prepare_prompt(conversation, max_tokens)
        results, _ = self.generate_batch(prompt, num_samples=1, max_tokens=max_tokens, temperature=temperature,
                                         top_k=top_k, seed=seed)
        return self.decode_answer(results[0])

    def prepare_prompt(self, conversation, max_tokens):
        """
        (prompt ids, tokens the answer may have), for generate_from_conversation and chat_cli's streaming.
        The answer is guaranteed min(max_tokens, seq_len // 4) tokens: retrieved documents (lowest-ranked first)
        are dropped only to make that room, so a generous max_tokens does not throw away the documents the
        answer needs; beyond it the answer gets whatever the prompt leaves, up to max_tokens.
        """
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
        seq_len = self.model.config.sequence_len
        reserve = max(1, min(max_tokens, seq_len // 4))
        prompt = self.tokenizer.render_for_completion(conversation, max_tokens=seq_len - reserve)
        return prompt, min(max_tokens, seq_len - len(prompt))

    def decode_answer(self, ids):
        """Assistant tokens -> text, leaving out forced document blocks (they are context, not the answer)."""
        enc = self.tokenizer.encode_special
        r_start, r_end = enc("<|retrieval_start|>"), enc("<|retrieval_end|>")
        kept, inside = [], False
        for t in ids:
            if t == r_start:
                inside = True
            elif t == r_end:
                inside = False
            elif not inside:
                kept.append(t)
        return self.tokenizer.decode(kept).strip()
