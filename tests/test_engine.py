"""
Tests for nanochat/engine.py: the cache (prefill + decode == full forward for T, M and hybrid patterns),
replicated multi-sample generation, the tool state machine (calculator, REFRAG retrieval: numbering, dedupe, hop
cap, chunked forcing, the cache carried across forced documents), and clear errors.

    pytest -q tests/test_engine.py
"""

import re

import pytest
import torch

from nanochat.gpt import GPT, GPTConfig, sample_next_token
from nanochat.engine import Engine, InferenceCache
from nanochat.retrieval import Document
from nanochat.tokenizer import NOTICE_HOP_CAP, NOTICE_NO_NEW_DOCUMENTS, NOTICE_NO_ROOM

PATTERNS = ["TTT", "MMM", "TMMT"]


def make_model(pattern, vocab_size=97, seq_len=64, seed=0, randomize=True):
    torch.manual_seed(seed)
    cfg = GPTConfig(sequence_len=seq_len, vocab_size=vocab_size, n_layer=len(pattern), n_head=4, n_kv_head=2, n_embd=64,
                    block_pattern=pattern, mamba_d_state=16, mamba_headdim=16, mamba_chunk_size=8)
    model = GPT(cfg)
    model.init_weights()
    if randomize:
        # the zero-initialized projections would make every block the identity; give them real weights
        with torch.no_grad():
            for n, p in model.named_parameters():
                if p.ndim == 2 and p.abs().sum() == 0:
                    p.normal_(0, 0.05)
    model.eval()
    return model


@pytest.mark.parametrize("pattern", PATTERNS)
def test_prefill_then_decode_equals_full_forward(pattern):
    model = make_model(pattern)
    idx = torch.randint(0, 97, (2, 37))  # 37 crosses several Mamba chunks of 8 and is not a multiple
    with torch.no_grad():
        full = model(idx)
        for k in (1, 8, 13):
            cache = InferenceCache(model, batch_size=2, max_seq_len=37)
            pieces = [model(idx[:, :k], cache=cache)]
            for t in range(k, 37):
                pieces.append(model(idx[:, t:t + 1], cache=cache))
            inc = torch.cat(pieces, dim=1)
            assert cache.pos == 37
            err = (inc - full).abs().max().item()
            assert err <= 1e-4, f"{pattern} prefix {k}: max error {err}"


@pytest.mark.parametrize("pattern", PATTERNS)
def test_multi_token_chunks_on_top_of_a_cache(pattern):
    # forcing several tokens at once after a prefill (T > 1 with pos > 0) must equal the full forward; chunks
    # shorter than the Mamba conv window (d_conv = 4), across Mamba chunk boundaries (8), and batched rows
    model = make_model(pattern)
    idx = torch.randint(0, 97, (2, 40))
    cuts = [(0, 11), (11, 12), (12, 21), (21, 23), (23, 26), (26, 27), (27, 40)]
    with torch.no_grad():
        full = model(idx)
        cache = InferenceCache(model, batch_size=2, max_seq_len=40)
        inc = torch.cat([model(idx[:, a:b], cache=cache) for a, b in cuts], dim=1)
    assert (inc - full).abs().max().item() <= 1e-4


class CharTokenizer:
    """A stand-in tokenizer for engine tests: ids 0..9 are the digits, then specials, then '+'."""
    specials = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
                "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>", "<|retrieval_start|>",
                "<|retrieval_end|>", "<|doc_start|>", "<|doc_end|>", "<|query_start|>", "<|query_end|>"]
    chars = "0123456789+"

    def get_vocab_size(self):
        return len(self.chars) + len(self.specials)

    def encode_special(self, name):
        return len(self.chars) + self.specials.index(name)

    def get_bos_token_id(self):
        return self.encode_special("<|bos|>")

    def encode(self, text, prepend=None, append=None):
        return [self.chars.index(c) for c in text]

    def decode(self, ids):
        return "".join(self.chars[i] if i < len(self.chars) else self.specials[i - len(self.chars)] for i in ids)


class ScriptedModel(torch.nn.Module):
    """Greedy-emits script[n] where n = how many tokens the Engine has sampled (not forced) so far."""

    def __init__(self, script, vocab_size, seq_len=64):
        super().__init__()
        self.script = script
        self.vocab_size = vocab_size
        self.config = GPTConfig(sequence_len=seq_len, vocab_size=vocab_size, n_layer=1, n_head=1, n_kv_head=1, n_embd=8)
        self.transformer = torch.nn.Module()
        self.transformer.h = []
        self.rotary_seq_len = seq_len * 10
        self.fed = []
        self.n_sampled = 0

    def get_device(self):
        return torch.device("cpu")

    def forward(self, ids, cache=None, last_only=False):
        B, T = ids.shape
        cache.pos += T
        self.fed.append(ids.clone())
        logits = torch.full((B, T, self.vocab_size), -1e9)
        logits[:, -1, self.script[min(self.n_sampled, len(self.script) - 1)]] = 0.0
        return logits


def test_calculator_tool_output_is_forced():
    tok = CharTokenizer()
    ps, pe, ae = tok.encode_special("<|python_start|>"), tok.encode_special("<|python_end|>"), tok.encode_special("<|assistant_end|>")
    os_, oe = tok.encode_special("<|output_start|>"), tok.encode_special("<|output_end|>")
    # the model writes <python_start>2+3<python_end>, then (after the forced output) 5 and <assistant_end>
    model = ScriptedModel([ps, 2, 10, 3, pe, 5, ae], tok.get_vocab_size())
    engine = Engine(model, tok)
    tokens, masks = [], []
    prompt = [tok.get_bos_token_id(), tok.encode_special("<|assistant_start|>")]
    for col, mcol in engine.generate(prompt, num_samples=1, max_tokens=20, temperature=0.0):
        tokens.append(col[0])
        masks.append(mcol[0])
        model.n_sampled += mcol[0]
    assert tokens[:5] == [ps, 2, 10, 3, pe]
    assert tokens[5:8] == [os_, 5, oe], tok.decode(tokens)
    assert masks[5:8] == [0, 0, 0]
    assert masks[:5] == [1] * 5
    assert tokens[8:] == [5, ae]
    # every forced token was fed back through the model (it advances the cache like any token)
    fed = [t.item() for f in model.fed[1:] for t in f[0]]
    assert fed == tokens[:-1]


@pytest.mark.parametrize("expr,result", [("2++", "error: invalid syntax"), ("1/0", "error: division by zero")])
def test_refused_calculator_expression_forces_an_error(tiny_tokenizer, expr, result):
    # issue 15, item 9: the model must see that its call failed, forced the same way as a result
    tok = tiny_tokenizer
    sp = tok.get_special_tokens()
    script = [sp["<|python_start|>"]] + tok.encode(expr) + [sp["<|python_end|>"], sp["<|assistant_end|>"]]
    model = ScriptedModel(script, tok.get_vocab_size())
    engine = Engine(model, tok)
    out, masks = [], []
    for col, mcol in engine.generate([tok.get_bos_token_id()], max_tokens=40, temperature=0.0):
        out.append(col[0])
        masks.append(mcol[0])
        model.n_sampled += mcol[0]
    forced = [sp["<|output_start|>"]] + tok.encode(result) + [sp["<|output_end|>"]]
    n = len(script) - 1
    assert out == script[:n] + forced + [sp["<|assistant_end|>"]]
    assert masks == [1] * n + [0] * len(forced) + [1]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_replicated_samples_equal_single_row_generation(pattern):
    model = make_model(pattern)
    prompt = torch.randint(0, 97, (12,)).tolist()

    class Tok(CharTokenizer):
        def get_vocab_size(self):
            return 97

        def encode_special(self, name):
            return 96 - self.specials.index(name)  # far from anything the model is likely to pick

    engine = Engine(model, Tok())
    batch, _ = engine.generate_batch(prompt, num_samples=3, max_tokens=15, temperature=1.0, seed=7)
    for i in range(3):
        single, _ = engine.generate_batch(prompt, num_samples=1, max_tokens=15, temperature=1.0, seed=7 + i)
        assert batch[i] == single[0], f"row {i}"
    assert len({tuple(r) for r in batch}) > 1, "rows with different seeds should differ"


def test_engine_greedy_matches_naive_generation():
    model = make_model("TMM")
    prompt = torch.randint(0, 97, (9,)).tolist()

    class Tok(CharTokenizer):
        def encode_special(self, name):
            return 200 + self.specials.index(name)  # outside the vocab: never produced

        def get_bos_token_id(self):
            return 200

    engine = Engine(model, Tok())
    out, masks = engine.generate_batch(prompt, num_samples=1, max_tokens=12, temperature=0.0)
    naive = list(model.generate(prompt, max_tokens=12, temperature=0.0))
    assert out[0] == naive
    assert masks[0] == [1] * 12


def test_prompt_longer_than_context_is_a_clear_error():
    model = make_model("TM", seq_len=16)
    engine = Engine(model, CharTokenizer())
    with pytest.raises(ValueError, match="20 tokens.*context is 16"):
        next(engine.generate(list(range(20)), max_tokens=2))


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_tokens=-5), "max_tokens must be a positive int"),
    (dict(max_tokens=0), "max_tokens must be a positive int"),
    (dict(max_tokens=2.5), "max_tokens must be a positive int"),
    (dict(max_tokens="3"), "max_tokens must be a positive int"),
    (dict(tokens=[1, 97, 2]), "prompt token 1 is 97: not a token id in \\[0, 97\\)"),
    (dict(tokens=[-1]), "prompt token 0 is -1"),
    (dict(tokens=[1, True]), "prompt token 1 is True"),
    (dict(tokens=[]), "non-empty list"),
    (dict(tokens=torch.tensor([1, 2])), "non-empty list"),
    (dict(temperature=-0.5), "temperature must be a finite number >= 0"),
    (dict(temperature=float("nan")), "temperature must be a finite number >= 0"),
    (dict(top_k=0), "top_k must be None \\(no top-k\\) or a positive int"),
    (dict(top_k=-3), "top_k must be None"),
    (dict(top_k=True), "top_k must be None"),
    (dict(num_samples=0), "num_samples must be a positive int"),
    (dict(seed=1.5), "seed must be an int"),
    (dict(shown_documents=[{"title": "no content"}]), "shown_documents\\[0\\]"),
])
def test_generate_argument_errors(kwargs, match):
    # issue 15, item 6: each bad argument is a ValueError naming it, raised when generate() is called (before any
    # forward), instead of a tensor-shape error, an IndexError, an assert or a silent "no top-k"
    engine = Engine(make_model("TM", seq_len=16), CharTokenizer())
    args = dict(tokens=[1, 2, 3], max_tokens=4, temperature=1.0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        engine.generate(args.pop("tokens"), **args)


def test_sample_next_token_errors():
    logits, rng = torch.randn(1, 10), torch.Generator().manual_seed(0)
    for bad in (-1.0, float("inf"), True, "1"):
        with pytest.raises(ValueError, match="temperature"):
            sample_next_token(logits, rng, temperature=bad)
    for bad in (0, -2, True, 2.0):
        with pytest.raises(ValueError, match="top_k"):
            sample_next_token(logits, rng, temperature=1.0, top_k=bad)
    assert sample_next_token(logits, rng, temperature=1.0, top_k=1).item() == logits.argmax().item()
    assert 0 <= sample_next_token(logits, rng, temperature=1.0, top_k=None).item() < 10


def test_engine_argument_errors():
    model, tok = make_model("TM", seq_len=16), CharTokenizer()
    for kwargs, match in [(dict(retrieval_top_k=0), "retrieval_top_k"), (dict(max_hops=-1), "max_hops"),
                          (dict(max_hops=True), "max_hops"), (dict(doc_chars=0), "doc_chars")]:
        with pytest.raises(ValueError, match=match):
            Engine(model, tok, **kwargs)


def test_fast_decode_argument_errors():
    tok = CharTokenizer()
    for bad in ("yes", 1, 0):
        with pytest.raises(ValueError, match="fast_decode must be None \\(auto\\), True or False"):
            Engine(make_model("TM", seq_len=16), tok, fast_decode=bad)
    with pytest.raises(ValueError, match="fast_decode=True needs a nanochat GPT"):
        Engine(ScriptedModel([0], tok.get_vocab_size()), tok, fast_decode=True)
    Engine(ScriptedModel([0], tok.get_vocab_size()), tok, fast_decode=False)


class FarTok(CharTokenizer):
    def encode_special(self, name):
        return 200 + self.specials.index(name)  # outside a 97-token vocab: generation never calls a tool

    def get_bos_token_id(self):
        return 200


def test_fast_decoder_is_reused_and_rebuilt():
    # one static cache (and, on CUDA, one graph) serves every generation it fits: a reused cache holds the previous
    # generation's keys/values and Mamba states, and each generation still equals the plain path; a longer one or
    # another batch size builds a new decoder; on CPU the default is the plain path
    model = make_model("TMMT")
    fast, plain = Engine(model, FarTok(), fast_decode=True), Engine(model, FarTok(), fast_decode=False)
    auto = Engine(model, FarTok())
    a, b = torch.randint(0, 97, (30,)).tolist(), torch.randint(0, 97, (9,)).tolist()
    runs = [(a, 2, 20), (b, 2, 12), (a, 2, 20), (b, 3, 12), (a, 3, 300)]
    decoders = []
    for prompt, n, max_tokens in runs:
        kwargs = dict(num_samples=n, max_tokens=max_tokens, temperature=1.0, seed=5)
        assert fast.generate_batch(prompt, **kwargs) == plain.generate_batch(prompt, **kwargs)
        decoders.append(fast._decoder)
    assert decoders[0] is decoders[1] is decoders[2] and decoders[0].max_seq_len == 256
    assert decoders[3] is not decoders[2] and decoders[3].batch_size == 3
    assert decoders[4].max_seq_len == 384 and decoders[4].cache.pos <= 330
    auto.generate_batch(b, max_tokens=3)
    assert auto._decoder is None and plain._decoder is None
    fast.release_decoder()
    assert fast._decoder is None


def test_deleting_the_engine_frees_its_decoder():
    # the static cache is GPU memory on CUDA: `del engine` must free it at once, not at the next garbage collection
    import gc
    import weakref
    engine = Engine(make_model("TM"), FarTok(), fast_decode=True)
    engine.generate_batch([1, 2, 3], max_tokens=3, temperature=0.0)
    ref = weakref.ref(engine._decoder)
    gc.disable()
    try:
        del engine
        assert ref() is None
    finally:
        gc.enable()


def test_interleaved_fast_generations():
    # two streams of one Engine advanced in turn: the second cannot share the static cache, so it takes the plain
    # path; closing a stream early gives the decoder back
    model = make_model("TM")
    engine, plain = Engine(model, FarTok(), fast_decode=True), Engine(model, FarTok(), fast_decode=False)
    p1, p2 = torch.randint(0, 97, (11,)).tolist(), torch.randint(0, 97, (7,)).tolist()
    s1 = engine.generate(p1, num_samples=2, max_tokens=10, temperature=0.0)
    s2 = engine.generate(p2, num_samples=2, max_tokens=10, temperature=0.0)  # same shape: the same decoder fits
    cols1, cols2 = [], []
    for c1, c2 in zip(s1, s2):
        cols1.append(c1[0])
        cols2.append(c2[0])
    assert len(cols1) == len(cols2) == 10
    assert cols1 == [c for c, _ in plain.generate(p1, num_samples=2, max_tokens=10, temperature=0.0)]
    assert cols2 == [c for c, _ in plain.generate(p2, num_samples=2, max_tokens=10, temperature=0.0)]
    s3 = engine.generate(p1, max_tokens=10, temperature=0.0)
    next(s3)
    assert engine._decoder_busy
    s3.close()
    assert not engine._decoder_busy


def test_hybrid_cache_is_smaller_at_long_context():
    t = make_model("TTTT", seq_len=32, randomize=False)
    h = make_model("MMMT", seq_len=32, randomize=False)
    small_t = InferenceCache(t, 1, 256).nbytes()
    big_t = InferenceCache(t, 1, 4096).nbytes()
    big_h = InferenceCache(h, 1, 4096).nbytes()
    assert big_t == 16 * small_t  # attention cache is linear in the context
    assert big_h < big_t / 3  # only one layer in four keeps a KV cache


def test_replicate_copies_states():
    model = make_model("TM")
    cache = InferenceCache(model, 1, 10)
    with torch.no_grad():
        model(torch.randint(0, 97, (1, 5)), cache=cache)
    rep = cache.replicate(3)
    assert rep.pos == 5 and rep.batch_size == 3
    for a, b in zip(cache.layers, rep.layers):
        for name in ("k", "v", "conv_state", "ssm_state"):
            if hasattr(a, name):
                src, dst = getattr(a, name), getattr(b, name)
                assert dst.shape[0] == 3 and torch.equal(dst[2], src[0])
                assert dst.data_ptr() != src.data_ptr()


def test_bf16_cache_with_fp32_model():
    # bf16 is the CUDA default for the KV cache; a fp32 model (no autocast) must still attend over it
    model = make_model("TMT")
    idx = torch.randint(0, 97, (1, 20))
    with torch.no_grad():
        full = model(idx)
        cache = InferenceCache(model, batch_size=1, max_seq_len=20, dtype=torch.bfloat16)
        inc = torch.cat([model(idx[:, :9], cache=cache)] + [model(idx[:, t:t + 1], cache=cache) for t in range(9, 20)],
                        dim=1)
    assert inc.dtype == torch.float32 and (inc - full).abs().max().item() < 0.1  # bf16 keys/values: ~1e-2


def test_generate_from_conversation(tiny_tokenizer):
    from nanochat.tokenizer import ConversationTooLong
    tok = tiny_tokenizer
    model = make_model("TM", vocab_size=tok.get_vocab_size(), seq_len=96)
    engine = Engine(model, tok)
    docs = [{"id": f"d{i}", "title": f"Doc {i}", "content": "The json module encodes and decodes JSON data."}
            for i in range(4)]
    conv = {"messages": [{"role": "retrieval", "documents": docs}, {"role": "user", "content": "What does json do?"}]}
    answer = engine.generate_from_conversation(conv, max_tokens=20, temperature=0.0)
    trace = engine.generate_from_conversation(conv, max_tokens=20, temperature=0.0, return_trace=True)
    prompt = trace["tokens"][:trace["prompt_len"]]
    want = tok.render_for_completion(conv, max_tokens=96 - 20)  # room for the whole answer
    assert prompt == want and len(prompt) <= 76 and len(trace["mask"]) <= 20
    assert len(prompt) < len(tok.render_for_completion(conv, max_tokens=10_000))  # low-ranked documents dropped
    out, _ = engine.generate_batch(want, num_samples=1, max_tokens=20, temperature=0.0, seed=42)
    assert answer == trace["answer"] == engine.decode_answer(out[0]) and isinstance(answer, str)
    assert trace["tokens"][trace["prompt_len"]:][:len(out[0])] == out[0]
    # the prompt's documents are numbered in the trace; the trimmed ones keep their numbers, marked not shown
    assert [d["number"] for d in trace["documents"]] == [1, 2, 3, 4]
    kept = sum(d["shown"] for d in trace["documents"])
    assert 0 < kept < 4 and all(f"[{d['number']}] Title: {d['title']}" in tok.decode(prompt) for d in
                                trace["documents"] if d["shown"])
    # a max_tokens beyond a quarter of the context: documents are dropped only for that quarter
    trace = engine.generate_from_conversation(conv, max_tokens=1000, return_trace=True)
    assert trace["tokens"][:trace["prompt_len"]] == tok.render_for_completion(conv, max_tokens=96 - 24)
    assert len(trace["mask"]) <= 96 - trace["prompt_len"]
    long_q = {"messages": [{"role": "user", "content": "why " * 200}]}
    with pytest.raises(ConversationTooLong, match="tokens even with all retrieved documents dropped"):
        engine.generate_from_conversation(long_q, max_tokens=10)
    with pytest.raises(ValueError, match="max_tokens must be a positive int"):
        engine.generate_from_conversation(conv, max_tokens=0)


# -----------------------------------------------------------------------------
# REFRAG: the model writes queries, the Engine retrieves and forces numbered documents


KB = [Document("k1", "Rome", "Rome is the capital of Italy."), Document("k2", "Milan", "Milan is in the north of Italy."),
      Document("k3", "Turin", "Turin is in Piedmont."), Document("k4", "Paris", "Paris is the capital of France."),
      Document("k5", "Lyon", "Lyon is a city in France.")]
HOP0 = [{"id": "k4", "title": "Paris", "content": "Paris is the capital of France."},
        {"id": "k5", "title": "Lyon", "content": "Lyon is a city in France."}]
CONV = {"messages": [{"role": "retrieval", "documents": HOP0},
                     {"role": "user", "content": "Which city is the capital of Italy?"}]}


class StubRetriever:
    """Word-overlap retrieval over KB (ties by KB order); records every query it is asked."""

    def __init__(self, docs=KB):
        self.docs = docs
        self.queries = []

    def retrieve(self, query, top_k=5):
        self.queries.append(query)
        words = set(re.findall(r"\w+", query.lower()))
        scored = [(len(words & set(re.findall(r"\w+", (d.title + " " + d.content).lower()))), i)
                  for i, d in enumerate(self.docs)]
        ranked = sorted((x for x in scored if x[0] > 0), key=lambda x: (-x[0], x[1]))
        return [(self.docs[i], float(n)) for n, i in ranked[:top_k]]


def script(tok, *pieces):
    """Token ids of pieces: special token names as themselves, anything else encoded as text."""
    specials = tok.get_special_tokens()
    return [t for p in pieces for t in ([specials[p]] if p in specials else tok.encode(p))]


def scripted_sampling(engine, scripts):
    """Row i 'samples' scripts[i] token by token (then <|assistant_end|>); the logits the model gave at each of those
    steps are recorded, so they can be checked against a full forward. Only the choice is scripted."""
    seen = {i: [] for i in range(len(scripts))}

    def sample(logits, rows, rngs, temperature, top_k):
        out = {}
        for i in rows:
            seen[i].append(logits[i].clone())
            k = len(seen[i]) - 1
            out[i] = scripts[i][k] if k < len(scripts[i]) else engine.assistant_end
        return out

    engine._sample = sample
    return seen


def multihop_script(tok):
    # q1 finds Rome and Milan (new: [3], [4]); q2's hits are all shown already (Paris at hop 0, Rome at hop 1);
    # q3 is past max_hops=2; then the answer
    return script(tok, "<|query_start|>", "capital Italy", "<|query_end|>", "Rome, or", "<|query_start|>",
                  "Paris capital", "<|query_end|>", "<|query_start|>", "Turin", "<|query_end|>", "Rome [3].",
                  "<|assistant_end|>")


def run_refrag(tok, pattern, scripts, force_chunks=True, max_tokens=None, seq_len=384, **engine_kwargs):
    model = make_model(pattern, vocab_size=tok.get_vocab_size(), seq_len=seq_len)
    kwargs = dict(retrieval_top_k=2, max_hops=2)
    kwargs.update(engine_kwargs)
    retriever = StubRetriever()
    engine = Engine(model, tok, retriever=retriever, force_chunks=force_chunks, **kwargs)
    seen = scripted_sampling(engine, scripts)
    forwards = []
    real_forward = model.forward

    def counting_forward(ids, *a, **kw):
        forwards.append(ids.shape[1])
        return real_forward(ids, *a, **kw)

    model.forward = counting_forward
    traces = engine.generate_trajectories(CONV, num_samples=len(scripts), max_tokens=max_tokens, temperature=0.0)
    model.forward = real_forward
    return dict(model=model, engine=engine, traces=traces, seen=seen, retriever=retriever, forwards=forwards)


def assert_matches_full_forward(model, trace, seen):
    """The logits behind every sampled token equal a plain forward of the final sequence (no cache)."""
    tokens, p0 = trace["tokens"], trace["prompt_len"]
    with torch.no_grad():
        full = model(torch.tensor([tokens[:-1]]))[0]
    positions = [p0 + j for j, m in enumerate(trace["mask"]) if m]
    assert len(positions) == len(seen)
    for pos, logits in zip(positions, seen):
        err = (full[pos - 1] - logits).abs().max().item()
        assert err <= 1e-4, f"position {pos}: max logit error {err}"
        assert full[pos - 1].argmax().item() == logits.argmax().item()


@pytest.mark.parametrize("pattern", PATTERNS)
def test_refrag_cache_equals_full_forward(tiny_tokenizer, pattern):
    # KV (T layers) and conv/SSM state (M layers) are carried across the forced document blocks, never re-prefilled
    tok = tiny_tokenizer
    run = run_refrag(tok, pattern, [multihop_script(tok)])
    trace = run["traces"][0]
    assert trace["finished"] and trace["mask"].count(0) > 50  # three forced blocks went through the cache
    assert_matches_full_forward(run["model"], trace, run["seen"][0])


def test_refrag_trajectory(tiny_tokenizer):
    tok = tiny_tokenizer
    run = run_refrag(tok, "TM", [multihop_script(tok)])
    trace = run["traces"][0]
    assert trace["queries"] == ["capital Italy", "Paris capital", "Turin"]
    assert run["retriever"].queries == ["capital Italy", "Paris capital"]  # the hop cap: q3 is never run
    assert trace["num_hops"] == 2 and trace["format_errors"] == ["hop_cap_exceeded"]
    assert trace["answer"] == "Rome, orRome [3]."  # queries and documents left out, nothing else
    # numbering continues after the prompt's [1] [2]; dedupe: q2's hits (Paris, Rome) were shown, so nothing new
    assert [(d["number"], d["id"], d["hop"], d["shown"]) for d in trace["documents"]] == [
        (1, "k4", 0, True), (2, "k5", 0, True), (3, "k1", 1, True), (4, "k2", 1, True)]
    assert trace["documents"][2]["content"] == "Rome is the capital of Italy." and trace["documents"][2]["score"] == 2.0
    blocks = [p for p in trace["parts"] if p["type"] == "documents"]
    assert [b.get("notice") for b in blocks] == [None, NOTICE_NO_NEW_DOCUMENTS, NOTICE_HOP_CAP]
    assert [d["number"] for d in blocks[0]["documents"]] == [3, 4] and not blocks[1]["documents"]
    # one format everywhere: the parts appended to the conversation render to exactly the Engine's tokens, and the
    # renderer's loss mask (1 on queries, answer, <|assistant_end|>; 0 on every retrieved token) is the Engine's
    # sampled/forced mask
    conv = {"messages": CONV["messages"] + [{"role": "assistant", "content": trace["parts"]}]}
    ids, mask = tok.render_conversation(conv, max_tokens=10_000)
    assert ids == trace["tokens"]
    assert mask[trace["prompt_len"]:] == trace["mask"] and not any(mask[:trace["prompt_len"]])
    text = tok.decode(trace["tokens"])
    assert "[3] Title: Rome" in text and "[4] Title: Milan" in text and text.count("Title: Paris") == 1


def test_chunked_forcing_equals_one_token_forcing(tiny_tokenizer):
    tok = tiny_tokenizer
    chunked = run_refrag(tok, "TMT", [multihop_script(tok)])
    single = run_refrag(tok, "TMT", [multihop_script(tok)], force_chunks=False)
    a, b = chunked["traces"][0], single["traces"][0]
    assert a == b
    for x, y in zip(chunked["seen"][0], single["seen"][0]):
        assert (x - y).abs().max().item() <= 1e-4
    # one-token forcing: one forward per generated token; chunked: one per sampled token (each forced block rides
    # in the forward of the <|query_end|> that asked for it), so at batch 1 a hop costs one forward
    n_sampled = sum(a["mask"])
    assert len(single["forwards"]) == 1 + len(a["mask"]) - 1
    assert len(chunked["forwards"]) == n_sampled and max(chunked["forwards"][1:]) > 20
    assert sum(chunked["forwards"]) == sum(single["forwards"]) == len(a["tokens"]) - 1


def test_batched_rows_keep_their_own_tool_state(tiny_tokenizer):
    # row 0 runs the multi-hop script, row 1 answers at once, row 2 asks one query: rows sample, force and finish
    # at different steps (mixed columns and filler); each row equals its own single-row run and the full forward
    tok = tiny_tokenizer
    scripts = [multihop_script(tok), script(tok, "Rome.", "<|assistant_end|>"),
               script(tok, "<|query_start|>", "Turin Piedmont", "<|query_end|>", "Turin [3].", "<|assistant_end|>")]
    run = run_refrag(tok, "TM", scripts)
    for i, s in enumerate(scripts):
        alone = run_refrag(tok, "TM", [s])
        assert run["traces"][i] == alone["traces"][0], f"row {i}"
        assert_matches_full_forward(run["model"], run["traces"][i], run["seen"][i])
    assert [d["id"] for d in run["traces"][2]["documents"]] == ["k4", "k5", "k3"]
    assert run["traces"][1]["documents"] == run["traces"][0]["documents"][:2] and run["traces"][1]["queries"] == []


def test_prompt_documents_are_not_shown_again(tiny_tokenizer):
    # a query whose top hits are the hop-0 documents (passed via shown_documents by generate_trajectories) gets them
    # dropped; with max_hops=0 the first query is already past the cap
    tok = tiny_tokenizer
    s = script(tok, "<|query_start|>", "Paris Lyon France", "<|query_end|>", "France.", "<|assistant_end|>")
    trace = run_refrag(tok, "T", [s], max_hops=3)["traces"][0]
    assert [p.get("notice") for p in trace["parts"] if p["type"] == "documents"] == [NOTICE_NO_NEW_DOCUMENTS]
    assert trace["format_errors"] == [] and trace["num_hops"] == 1
    # the top-k *new* documents: Paris (shown at hop 0) ranks second for this query, so Milan comes in instead
    s2 = script(tok, "<|query_start|>", "capital Italy France", "<|query_end|>", "Rome.", "<|assistant_end|>")
    trace = run_refrag(tok, "T", [s2])["traces"][0]
    assert [(d["number"], d["id"]) for d in trace["documents"][2:]] == [(3, "k1"), (4, "k2")]
    run = run_refrag(tok, "T", [s], max_hops=0)
    assert run["retriever"].queries == [] and run["traces"][0]["format_errors"] == ["hop_cap_exceeded"]
    # the same through generate(): shown_documents given by hand, numbers continue after them
    engine = Engine(make_model("T", vocab_size=tok.get_vocab_size(), seq_len=384), tok, retriever=StubRetriever(),
                    retrieval_top_k=2)
    scripted_sampling(engine, [script(tok, "<|query_start|>", "capital", "<|query_end|>", "x", "<|assistant_end|>")])
    prompt = tok.render_for_completion(CONV)
    out, masks = engine.generate_batch(prompt, max_tokens=200, temperature=0.0,
                                       shown_documents=[{"id": "k4", "content": "Paris is the capital of France."}])
    text = tok.decode(out[0])
    assert "[2] Title: Rome" in text and "Paris" not in text  # k4 was shown: Rome and nothing else, numbered 2


def test_document_blocks_leave_room_for_the_answer(tiny_tokenizer):
    # with few tokens left, the lowest-ranked new documents are dropped, then the block says there is no room
    tok = tiny_tokenizer
    s = multihop_script(tok)
    full = run_refrag(tok, "T", [s])["traces"][0]
    block = [p for p in full["parts"] if p["type"] == "documents"][0]
    q1_end = full["tokens"].index(tok.encode_special("<|query_end|>"), full["prompt_len"]) - full["prompt_len"] + 1
    one_doc = len(tok.render_documents(block["documents"][:1], 3))
    assert one_doc <= 64  # so that min(64, left // 2) is left // 2 below
    # after q1 the block may use left - min(64, left // 2) tokens: with left = 2 * one_doc that is one document
    for max_tokens, want in [(q1_end + 2 * one_doc, [3]), (q1_end + 8, [])]:
        trace = run_refrag(tok, "T", [s], max_tokens=max_tokens)["traces"][0]
        first = [p for p in trace["parts"] if p["type"] == "documents"][0]
        assert [d["number"] for d in first["documents"]] == want
        if not want:
            assert first["notice"] == NOTICE_NO_ROOM
        assert len(trace["mask"]) <= max_tokens and "truncated" in trace["format_errors"]


def test_format_errors(tiny_tokenizer):
    tok = tiny_tokenizer
    cases = [
        (script(tok, "Rome.", "<|query_start|>", "more", "<|assistant_end|>"), ["unclosed_query"]),
        (script(tok, "Rome", "<|query_end|>", ".", "<|assistant_end|>"), ["unbalanced_query_tags"]),
        (script(tok, "<|query_start|>", "a", "<|query_start|>", "Rome", "<|query_end|>", "Rome", "<|assistant_end|>"),
         ["unbalanced_query_tags"]),
        (script(tok, "<|query_start|>", " ", "<|query_end|>", "Rome", "<|assistant_end|>"), ["empty_query"]),
        (script(tok, "<|doc_start|>", "Rome", "<|assistant_end|>"), ["forged_retrieval"]),
        (script(tok, "<|query_start|>", "Italy", "<|query_end|>", "<|assistant_end|>"), ["no_answer"]),
        (script(tok, "Rome is the capital"), ["truncated"]),  # never ends: the script's tail is <|assistant_end|>
    ]
    for s, want in cases:
        if want == ["truncated"]:
            s = s * 40
        trace = run_refrag(tok, "T", [s], max_tokens=60)["traces"][0]
        assert trace["format_errors"] == want, (tok.decode(s), trace["format_errors"])
    ok = run_refrag(tok, "T", [script(tok, "Rome [1].", "<|assistant_end|>")])["traces"][0]
    assert ok["format_errors"] == [] and ok["answer"] == "Rome [1]." and ok["finished"]


def test_decode_answer_drops_queries_and_blocks(tiny_tokenizer):
    tok = tiny_tokenizer
    engine = Engine(make_model("T", vocab_size=tok.get_vocab_size()), tok)
    ids = script(tok, "A", "<|query_start|>", "q", "<|query_end|>", "<|retrieval_start|>", "<|doc_start|>", "[1] d",
                 "<|doc_end|>", "<|retrieval_end|>", "B", "<|retrieval_end|>", "<|query_start|>", "never closed")
    assert engine.decode_answer(ids) == "AB"
