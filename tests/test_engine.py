"""
Tests for nanochat/engine.py: the cache (prefill + decode == full forward for T, M and hybrid patterns),
replicated multi-sample generation, the tool state machine, and clear errors.
"""

import pytest
import torch

from nanochat.gpt import GPT, GPTConfig
from nanochat.engine import Engine, InferenceCache

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
    # forcing several tokens at once after a prefill (T > 1 with pos > 0) must equal the full forward
    model = make_model(pattern)
    idx = torch.randint(0, 97, (1, 30))
    with torch.no_grad():
        full = model(idx)
        cache = InferenceCache(model, batch_size=1, max_seq_len=30)
        inc = torch.cat([model(idx[:, a:b], cache=cache) for a, b in [(0, 11), (11, 12), (12, 21), (21, 30)]], dim=1)
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

    def forward(self, ids, cache=None):
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


def test_rejected_calculator_expression_forces_nothing():
    tok = CharTokenizer()
    ps, pe, ae = tok.encode_special("<|python_start|>"), tok.encode_special("<|python_end|>"), tok.encode_special("<|assistant_end|>")
    model = ScriptedModel([ps, 2, 10, 10, pe, ae], tok.get_vocab_size())  # "2++" is not a valid expression
    engine = Engine(model, tok)
    out, masks = [], []
    for col, mcol in engine.generate([tok.get_bos_token_id()], max_tokens=10, temperature=0.0):
        out.append(col[0])
        masks.append(mcol[0])
        model.n_sampled += mcol[0]
    assert out == [ps, 2, 10, 10, pe, ae] and masks == [1] * 6


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
    docs = [{"id": f"d{i}", "title": f"Doc {i}", "content": "The json module encodes and decodes JSON data. " * 2}
            for i in range(4)]
    conv = {"messages": [{"role": "retrieval", "documents": docs}, {"role": "user", "content": "What does json do?"}]}
    calls = []
    real = engine.generate_batch

    def spy(prompt, **kw):
        calls.append((list(prompt), kw))
        return real(prompt, **kw)

    engine.generate_batch = spy
    answer = engine.generate_from_conversation(conv, max_tokens=20, temperature=0.0)
    prompt, kw = calls[-1]
    want = tok.render_for_completion(conv, max_tokens=96 - 20)  # room for the whole answer
    assert prompt == want and kw["max_tokens"] == 20 and len(prompt) <= 76
    assert len(prompt) < len(tok.render_for_completion(conv, max_tokens=10_000))  # low-ranked documents dropped
    out, _ = real(want, num_samples=1, max_tokens=20, temperature=0.0, seed=42)
    assert answer == engine.decode_answer(out[0]) and isinstance(answer, str)
    # a max_tokens beyond a quarter of the context: documents are dropped only for that quarter
    engine.generate_from_conversation(conv, max_tokens=1000)
    prompt, kw = calls[-1]
    assert prompt == tok.render_for_completion(conv, max_tokens=96 - 24) and kw["max_tokens"] == 96 - len(prompt)
    long_q = {"messages": [{"role": "user", "content": "why " * 200}]}
    with pytest.raises(ConversationTooLong, match="tokens even with all retrieved documents dropped"):
        engine.generate_from_conversation(long_q, max_tokens=10)
    with pytest.raises(ValueError, match="max_tokens must be a positive int"):
        engine.generate_from_conversation(conv, max_tokens=0)
