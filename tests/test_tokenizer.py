"""
Tests for nanochat/tokenizer.py (and the tok_train / tok_eval CLIs). A 512-token BPE is trained on the Python
standard library's pydoc topics (~465K chars, in every Python install), which takes well under a second.

    pytest -x -q tests/test_tokenizer.py
"""

import os
import sys
import json
import base64
import collections
import subprocess

import pytest
import regex
import torch
import pydoc_data.topics
from hypothesis import given, settings, strategies as st, HealthCheck

from nanochat.tokenizer import (Tokenizer, ConversationTooLong, SPECIAL_TOKENS, SPLIT_PATTERN, get_tokenizer,
                                get_token_bytes, cut_document, DOC_CHARS, MAX_CHARS_PER_TOKEN, NOTICE_HOP_CAP)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_TEXTS = list(pydoc_data.topics.topics.values())
VOCAB = 512
N_BPE = VOCAB - len(SPECIAL_TOKENS)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train_from_iterator(iter(TRAIN_TEXTS), VOCAB)


# text with no lone surrogates (they are not valid UTF-8, so they cannot round-trip through bytes)
unicode_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=300)
EDGE_CASES = [
    "", " ", "\n", "\t\t  \n\n\r\n", "     ", "a" * 2000, "hello world", "don't we'll THEY'RE",
    "12345678901234567890", "3.14159, 1,000,000", "日本語のテキスト", "中文文本测试", "한국어", "Ελληνικά Русский",
    "emoji 🙂🚀👩‍💻🇫🇷❤️👍🏽", "\u200b\u200d\ufeff zero width", "\x00\x01\x7f control", "a\u0301 combining",
    "<|bos|>", "<|assistant_end|>", "<|user_start|>hi<|user_end|>", "<|endoftext|>", "<|", "|>", "<|bos",
]


# -----------------------------------------------------------------------------
# training: against the reference (rustbpe itself, and a pair count)


def test_vocab_layout(tok):
    assert tok.get_vocab_size() == VOCAB
    special = tok.get_special_tokens()
    assert list(special) == SPECIAL_TOKENS
    assert list(special.values()) == list(range(N_BPE, VOCAB))
    assert tok.get_bos_token_id() == N_BPE == tok.encode_special("<|bos|>")
    assert tok.id_to_token(N_BPE + 3) == "<|assistant_start|>"
    assert tok.id_to_token(ord("a")) == "a"


def test_matches_rustbpe_reference(tok):
    # our tiktoken export must encode exactly like the rustbpe tokenizer it was trained from
    import rustbpe
    ref = rustbpe.Tokenizer()
    ref.train_from_iterator(iter(TRAIN_TEXTS), N_BPE, pattern=SPLIT_PATTERN)
    ranks = {bytes(b): r for b, r in ref.get_mergeable_ranks()}
    assert ranks == tok._mergeable_ranks
    for text in EDGE_CASES + TRAIN_TEXTS[:5]:
        assert tok.encode(text) == list(ref.encode(text)), text[:50]


def test_first_merge_is_most_frequent_pair(tok):
    # BPE's first merge is the most frequent adjacent byte pair within the pre-tokenized chunks
    counts = collections.Counter()
    for text in TRAIN_TEXTS:
        for chunk in regex.findall(SPLIT_PATTERN, text):
            b = chunk.encode("utf-8")
            counts.update(zip(b, b[1:]))
    first = tok.enc.decode_single_token_bytes(256)
    assert len(first) == 2
    assert counts[(first[0], first[1])] == max(counts.values())


def test_split_pattern_numbers_two_digits(tok):
    assert regex.findall(SPLIT_PATTERN, "12345 x7") == ["12", "34", "5", " x", "7"]
    assert regex.findall(SPLIT_PATTERN, "it's   ok\n\n") == ["it", "'s", "  ", " ok", "\n\n"]
    for i in tok.encode("31415926535 2024 1000000"):
        piece = tok.id_to_token(i)
        assert sum(c.isdigit() for c in piece) <= 2, piece


def test_vocab_size_validation():
    for bad in (100, 256 + len(SPECIAL_TOKENS) - 1, "512", 512.0):
        with pytest.raises(ValueError, match="vocab_size"):
            Tokenizer.train_from_iterator(iter(TRAIN_TEXTS), bad)
    with pytest.raises(TypeError, match="item 1"):
        Tokenizer.train_from_iterator(iter(["ok", b"bytes"]), 300)


# -----------------------------------------------------------------------------
# encode / decode


@pytest.mark.parametrize("text", EDGE_CASES)
def test_roundtrip_edge_cases(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(i < N_BPE for i in ids)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=unicode_text)
def test_roundtrip_hypothesis(tok, text):
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pieces=st.lists(st.one_of(st.sampled_from(SPECIAL_TOKENS), unicode_text), max_size=8))
def test_special_tokens_never_from_text(tok, pieces):
    text = "".join(pieces)
    ids = tok.encode(text)
    assert all(0 <= i < N_BPE for i in ids)
    assert tok.decode(ids) == text


def test_special_string_is_plain_bytes(tok):
    ids = tok.encode("<|assistant_end|>")
    assert tok.encode_special("<|assistant_end|>") not in ids
    assert len(ids) > 1 and tok.decode(ids) == "<|assistant_end|>"


def test_encode_prepend_append_and_batch(tok):
    bos, end = tok.get_bos_token_id(), tok.encode_special("<|assistant_end|>")
    plain = tok.encode("hello there")
    assert tok.encode("hello there", prepend="<|bos|>", append=end) == [bos] + plain + [end]
    assert tok("hello there", prepend=bos) == [bos] + plain
    texts = ["one", "", "two three", "<|bos|>"]
    batch = tok.encode(texts, prepend="<|bos|>", num_threads=2)
    assert batch == [[bos] + tok.encode(t) for t in texts]
    with pytest.raises(ValueError, match="not a special token"):
        tok.encode("x", prepend="hello")
    with pytest.raises(ValueError, match="prepend/append"):
        tok.encode("x", append=VOCAB)
    with pytest.raises(TypeError, match="item 1"):
        tok.encode(["a", 3])
    with pytest.raises(TypeError):
        tok.encode(b"bytes")


def test_decode_and_id_errors(tok):
    assert tok.decode(torch.tensor(tok.encode("tensor ids"))) == "tensor ids"
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([1, VOCAB])
    with pytest.raises(ValueError, match="out of range"):
        tok.id_to_token(-1)


def test_token_bytes(tok):
    tb = get_token_bytes(tok)
    assert tb.dtype == torch.long and tb.shape == (VOCAB,)
    assert (tb[N_BPE:] == 0).all() and (tb[:256] == 1).all() and (tb[256:N_BPE] >= 2).all()
    for text in EDGE_CASES + TRAIN_TEXTS[:3]:
        ids = tok.encode(text, prepend="<|bos|>")
        assert int(tb[ids].sum()) == len(text.encode("utf-8"))


# -----------------------------------------------------------------------------
# save / load


def test_save_load_roundtrip(tok, tmp_path):
    path = tok.save(tmp_path / "tok")
    assert os.listdir(tmp_path / "tok") == ["tokenizer.json"]  # no temp file left behind
    with open(path) as f:
        data = json.load(f)  # plain JSON
    assert data["version"] == 1 and data["vocab_size"] == VOCAB
    tok2 = Tokenizer.from_directory(tmp_path / "tok")
    assert tok2._mergeable_ranks == tok._mergeable_ranks
    assert tok2.get_special_tokens() == tok.get_special_tokens()
    for text in EDGE_CASES + TRAIN_TEXTS[:3]:
        assert tok2.encode(text) == tok.encode(text)
    tok2.save(tmp_path / "tok")  # overwrite in place
    assert get_tokenizer(tmp_path / "tok").encode("same") == tok.encode("same")


def _edit_json(edit):
    """A tokenizer.json edit that changes the parsed object: edit(data) mutates it in place."""
    def apply(text):
        data = json.loads(text)
        edit(data)
        return json.dumps(data)
    return apply


def _swap_token(data):  # one token's bytes changed, still valid base64: only the digest can tell
    data["mergeable_ranks"][300][0] = base64.b64encode(b"\xff\xfe\xfd").decode()


CORRUPTIONS = [
    (lambda t: t[: len(t) // 2], "not valid JSON"),  # truncated
    (lambda t: t.replace('"version": 1', '"version": 99'), "version 99"),
    (_edit_json(_swap_token), "sha256"),
    (_edit_json(lambda d: d["mergeable_ranks"][5].__setitem__(1, 6)), "entry 5"),
    (_edit_json(lambda d: d["special_tokens"].pop("<|query_end|>")), "special_tokens"),
]


def test_load_errors(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="tok_train"):
        Tokenizer.from_directory(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="tok_train"):
        get_tokenizer(str(tmp_path / "nowhere"))


@pytest.mark.parametrize("edit, message", CORRUPTIONS)
def test_corrupted_file_is_named(tok, tmp_path, edit, message):
    d = tmp_path / "bad"
    path = tok.save(d)
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(edit(text))
    with pytest.raises(ValueError, match=message) as e:
        Tokenizer.from_directory(d)
    assert path in str(e.value)


def test_from_pretrained_offline_is_clear():
    try:
        enc = Tokenizer.from_pretrained("gpt2")
    except RuntimeError as e:
        assert "gpt2" in str(e)
    else:  # cached locally: then it must behave as GPT-2
        assert enc.get_vocab_size() == 50257 and enc.get_bos_token_id() == 50256
        with pytest.raises(ValueError, match="chat special tokens"):
            enc.render_conversation({"messages": [{"role": "user", "content": "hi"}]})


# -----------------------------------------------------------------------------
# render_conversation


DOCS_A = [{"id": "d1", "title": "Paris", "content": "Paris is the capital of France.", "score": 3.2},
          {"id": "d2", "title": "Lyon", "content": "Lyon is a city in France.", "metadata": {"x": 1}},
          {"id": "d3", "content": "A document without a title."}]
DOCS_B = [{"id": "e1", "title": "Rome", "content": "Rome is the capital of Italy."},
          {"id": "e2", "title": "Milan", "content": "Milan is in the north of Italy."},
          {"id": "e3", "title": "Turin", "content": "Turin is in Piedmont."}]


def masked_in(tok, ids, mask):
    return tok.decode([i for i, m in zip(ids, mask) if m])


def block(docs, first=1):
    inner = "".join(f"<|doc_start|>[{i}] " + (f"Title: {d['title']}\n" if d.get("title") else "")
                    + f"Content: {d['content']}<|doc_end|>" for i, d in enumerate(docs, first))
    return f"<|retrieval_start|>{inner}<|retrieval_end|>" if docs else ""


def test_render_simple_and_system_merge(tok):
    conv = {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": "What is 2+2?"},
                         {"role": "assistant", "content": "4, of course."}]}
    ids, mask = tok.render_conversation(conv)
    assert len(ids) == len(mask) and ids[0] == tok.get_bos_token_id() and mask[0] == 0
    assert tok.decode(ids) == ("<|bos|><|user_start|>Be brief.\n\nWhat is 2+2?<|user_end|>"
                               "<|assistant_start|>4, of course.<|assistant_end|>")
    assert masked_in(tok, ids, mask) == "4, of course.<|assistant_end|>"
    a_start = ids.index(tok.encode_special("<|assistant_start|>"))
    assert mask[a_start] == 0 and all(mask[a_start + 1:]) and not any(mask[:a_start])


def test_render_multi_turn_masks(tok):
    conv = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"},
                         {"role": "user", "content": "and?"}, {"role": "assistant", "content": "Bye <|bos|>."}]}
    ids, mask = tok.render_conversation(conv)
    assert masked_in(tok, ids, mask) == "Hello!<|assistant_end|>Bye <|bos|>.<|assistant_end|>"
    assert ids.count(tok.get_bos_token_id()) == 1  # the "<|bos|>" in the text is plain bytes


def test_render_parts(tok):
    parts = [{"type": "text", "text": "Let me compute. "},
             {"type": "python", "text": "2**10"},
             {"type": "python_output", "text": "1024"},
             {"type": "text", "text": " Then search: "},
             {"type": "query", "text": "capital of France"},
             {"type": "documents", "documents": DOCS_A[:2]},
             {"type": "text", "text": "It is Paris [1]."}]
    conv = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": parts}]}
    ids, mask = tok.render_conversation(conv)
    assert tok.decode(ids) == ("<|bos|><|user_start|>q<|user_end|><|assistant_start|>Let me compute. "
                               "<|python_start|>2**10<|python_end|><|output_start|>1024<|output_end|> Then search: "
                               "<|query_start|>capital of France<|query_end|>" + block(DOCS_A[:2])
                               + "It is Paris [1].<|assistant_end|>")
    assert masked_in(tok, ids, mask) == ("Let me compute. <|python_start|>2**10<|python_end|> Then search: "
                                         "<|query_start|>capital of France<|query_end|>It is Paris [1]."
                                         "<|assistant_end|>")
    # every token of the forced pieces is mask 0, including their delimiters
    sp = tok.get_special_tokens()
    for name in ("<|output_start|>", "<|output_end|>", "<|retrieval_start|>", "<|doc_start|>", "<|doc_end|>",
                 "<|retrieval_end|>"):
        assert mask[ids.index(sp[name])] == 0
    for name in ("<|python_start|>", "<|python_end|>", "<|query_start|>", "<|query_end|>", "<|assistant_end|>"):
        assert mask[ids.index(sp[name])] == 1


@pytest.mark.parametrize("position", ["after_system", "before_user"])
def test_render_retrieval_positions(tok, position):
    retrieval = {"role": "retrieval", "documents": DOCS_A}
    msgs = [{"role": "system", "content": "Cite."}, {"role": "user", "content": "Capital?"},
            {"role": "assistant", "content": "Paris [1]."}]
    msgs.insert(1, retrieval)  # with a single user turn both positions are the same place
    if position == "before_user":
        msgs = [msgs[0], {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}] + msgs[1:]
    ids, mask = tok.render_conversation({"messages": msgs})
    text = tok.decode(ids)
    expected_block = ("<|retrieval_start|><|doc_start|>[1] Title: Paris\nContent: Paris is the capital of France."
                      "<|doc_end|><|doc_start|>[2] Title: Lyon\nContent: Lyon is a city in France.<|doc_end|>"
                      "<|doc_start|>[3] Content: A document without a title.<|doc_end|><|retrieval_end|>")
    assert block(DOCS_A) == expected_block
    if position == "after_system":
        assert text == ("<|bos|>" + expected_block + "<|user_start|>Cite.\n\nCapital?<|user_end|>"
                        "<|assistant_start|>Paris [1].<|assistant_end|>")
    else:
        assert text == ("<|bos|><|user_start|>Cite.\n\nHi<|user_end|><|assistant_start|>Hello.<|assistant_end|>"
                        + expected_block + "<|user_start|>Capital?<|user_end|>"
                        "<|assistant_start|>Paris [1].<|assistant_end|>")
    assert masked_in(tok, ids, mask).endswith("Paris [1].<|assistant_end|>")
    assert "Content" not in masked_in(tok, ids, mask)
    # extra document keys (score, metadata, id) are ignored
    plain = [{"title": d.get("title"), "content": d["content"]} for d in DOCS_A]
    msgs2 = [dict(m, documents=plain) if m["role"] == "retrieval" else m for m in msgs]
    assert tok.render_conversation({"messages": msgs2}) == (ids, mask)


def test_render_empty_documents_renders_nothing(tok):
    base = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    with_empty = [{"role": "retrieval", "documents": []}] + base
    assert tok.render_conversation({"messages": with_empty}) == tok.render_conversation({"messages": base})


def trim_conv(docs_a, docs_b):
    # numbering runs on across the conversation: block B's documents are [4]..[6]
    return {"messages": [{"role": "retrieval", "documents": docs_a}, {"role": "user", "content": "First?"},
                         {"role": "assistant", "content": "Paris [1]."},
                         {"role": "retrieval", "documents": docs_b}, {"role": "user", "content": "Second?"},
                         {"role": "assistant", "content": "Rome [4], not Milan [5]."}]}


def trimmed_ids(tok, na, nb):
    """The ids of trim_conv(DOCS_A, DOCS_B) with only the first na / nb documents of each block kept, written out
    by hand: the kept documents keep the numbers they had (A from [1], B from [4])."""
    sp = tok.get_special_tokens()
    ids, mask = [sp["<|bos|>"]] + tok.render_documents(DOCS_A[:na], 1), []
    ids += [sp["<|user_start|>"]] + tok.encode("First?") + [sp["<|user_end|>"], sp["<|assistant_start|>"]]
    mask = [0] * len(ids) + [1] * (len(tok.encode("Paris [1].")) + 1)
    ids += tok.encode("Paris [1].") + [sp["<|assistant_end|>"]]
    rest = tok.render_documents(DOCS_B[:nb], 4) + [sp["<|user_start|>"]] + tok.encode("Second?") + \
        [sp["<|user_end|>"], sp["<|assistant_start|>"]]
    answer = tok.encode("Rome [4], not Milan [5].") + [sp["<|assistant_end|>"]]
    return ids + rest + answer, mask + [0] * len(rest) + [1] * len(answer)


def test_trimming_order_keeps_numbers(tok):
    full_ids, full_mask = tok.render_conversation(trim_conv(DOCS_A, DOCS_B), max_tokens=10_000)
    assert (full_ids, full_mask) == trimmed_ids(tok, 3, 3)
    assert "[4] Title: Rome" in tok.decode(full_ids) and "[1] Title: Rome" not in tok.decode(full_ids)
    assert tok.render_conversation(trim_conv(DOCS_A, DOCS_B), max_tokens=len(full_ids)) == (full_ids, full_mask)
    # documented drop order: B3, A3, B2, A2, B1, A1 (last place in a block first, later block first among equals);
    # a dropped document leaves its number unused: Rome stays [4] and Milan [5] whatever A loses
    stages = [(3, 2), (2, 2), (2, 1), (1, 1), (1, 0), (0, 0)]
    prev_len = len(full_ids)
    for na, nb in stages:
        expected = trimmed_ids(tok, na, nb)
        n = len(expected[0])
        assert n < prev_len - 1  # every stage drops a whole document, so one token less than before is this stage
        # the exact budget of this stage keeps exactly these documents; one token less than the previous stage
        # already drops down to it
        assert tok.render_conversation(trim_conv(DOCS_A, DOCS_B), max_tokens=n) == expected
        assert tok.render_conversation(trim_conv(DOCS_A, DOCS_B), max_tokens=prev_len - 1) == expected
        # the answers are never cut
        assert masked_in(tok, *expected) == "Paris [1].<|assistant_end|>Rome [4], not Milan [5].<|assistant_end|>"
        prev_len = n
    # with every document gone no empty block is left behind: no retrieval token at all
    assert not {tok.encode_special("<|retrieval_start|>"), tok.encode_special("<|retrieval_end|>")} & set(expected[0])
    with pytest.raises(ConversationTooLong) as e:
        tok.render_conversation(trim_conv(DOCS_A, DOCS_B), max_tokens=prev_len - 1)
    # the message gives the length without and with the documents, and the budget
    assert f"is {prev_len} tokens" in str(e.value) and f"({len(full_ids)} with them)" in str(e.value)
    assert f"max_tokens={prev_len - 1}" in str(e.value)


def test_too_long_without_documents(tok):
    conv = {"messages": [{"role": "user", "content": "word " * 500}, {"role": "assistant", "content": "ok"}]}
    n = len(tok.render_conversation(conv, max_tokens=100_000)[0])
    with pytest.raises(ConversationTooLong, match=f"{n} tokens"):
        tok.render_conversation(conv, max_tokens=n - 1)
    with pytest.raises(ValueError, match="max_tokens"):
        tok.render_conversation(conv, max_tokens=0)


@pytest.mark.parametrize("messages, match", [
    ([{"role": "assistant", "content": "a"}], "message 0 has role 'assistant'"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "message 1 has role 'user'"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}], "message 1 has role 'system'"),
    ([{"role": "user", "content": "a"}, {"role": "tool", "content": "t"}], "message 1 has unknown role 'tool'"),
    ([{"role": "user", "content": "a"}, {"role": "retrieval", "documents": DOCS_A},
      {"role": "assistant", "content": "b"}], "message 1 \\(role 'retrieval'\\)"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
      {"role": "retrieval", "documents": DOCS_A}], "message 2 \\(role 'retrieval'\\)"),
    ([{"role": "system", "content": "s"}], "no user message"),
    ([{"role": "user", "content": 3}], "message 0 \\(role 'user'\\)"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "image", "text": "x"}]}],
     "message 1 \\(role 'assistant'\\), part 0"),
    ([{"role": "retrieval", "documents": [{"title": "t"}]}, {"role": "user", "content": "a"}],
     "message 0 \\(role 'retrieval'\\), document 0"),
    ([], "non-empty"),
    (["user: hi"], "message 0 must be a dict"),
])
def test_render_errors(tok, messages, match):
    with pytest.raises(ValueError, match=match):
        tok.render_conversation({"messages": messages})


# -----------------------------------------------------------------------------
# render_for_completion and visualization


# -----------------------------------------------------------------------------
# REFRAG trajectories: continuous numbering, masks, document caps


def refrag_conv(tok):
    return {"messages": [{"role": "retrieval", "documents": DOCS_A}, {"role": "user", "content": "Capital of Italy?"},
                         {"role": "assistant", "content": [
                             {"type": "query", "text": "capital of Italy"},
                             {"type": "documents", "documents": DOCS_B[:2]},
                             {"type": "query", "text": "Italy capital city"},
                             {"type": "documents", "documents": [], "notice": NOTICE_HOP_CAP},
                             {"type": "text", "text": "Rome [4]."}]}]}


def test_refrag_trajectory_numbering_and_mask(tok):
    ids, mask = tok.render_conversation(refrag_conv(tok))
    text = tok.decode(ids)
    assert text == ("<|bos|>" + block(DOCS_A) + "<|user_start|>Capital of Italy?<|user_end|><|assistant_start|>"
                    "<|query_start|>capital of Italy<|query_end|>" + block(DOCS_B[:2], first=4)
                    + "<|query_start|>Italy capital city<|query_end|><|retrieval_start|>" + NOTICE_HOP_CAP
                    + "<|retrieval_end|>Rome [4].<|assistant_end|>")
    # mask 0 on every token of every retrieval block (delimiters, documents, the notice), 1 on the model's own
    # tokens after <|assistant_start|> (queries with their tags, the answer, <|assistant_end|>), 0 before
    sp = tok.get_special_tokens()
    want, inside = [], False
    a_start = ids.index(sp["<|assistant_start|>"])
    for k, t in enumerate(ids):
        if t == sp["<|retrieval_start|>"]:
            inside = True
        want.append(0 if inside or k <= a_start else 1)
        if t == sp["<|retrieval_end|>"]:
            inside = False
    assert mask == want
    assert masked_in(tok, ids, mask) == ("<|query_start|>capital of Italy<|query_end|><|query_start|>Italy capital "
                                         "city<|query_end|>Rome [4].<|assistant_end|>")
    # the Engine forces render_documents(docs, first_number): the very ids the renderer writes for that block
    forced = tok.render_documents(DOCS_B[:2], first_number=4)
    starts = [k for k, t in enumerate(ids) if t == sp["<|retrieval_start|>"]]
    assert ids[starts[1]:starts[1] + len(forced)] == forced
    notice = tok.render_documents([], 6, notice=NOTICE_HOP_CAP)
    assert notice == ids[starts[2]:starts[2] + len(notice)] and notice[-1] == sp["<|retrieval_end|>"]
    assert tok.render_documents([]) == []
    with pytest.raises(ValueError, match="first_number"):
        tok.render_documents(DOCS_B, first_number=0)


def test_render_for_completion_documents(tok):
    conv = refrag_conv(tok)
    conv["messages"] = conv["messages"][:2]  # hop-0 documents and the question
    ids, docs = tok.render_for_completion(conv, return_documents=True)
    assert ids == tok.render_for_completion(conv)
    assert [(d["number"], d["id"], d["shown"]) for d in docs] == [(1, "d1", True), (2, "d2", True), (3, "d3", True)]
    assert docs[0]["title"] == "Paris" and docs[0]["score"] == 3.2 and docs[2]["title"] == ""
    # trimmed documents stay in the list (their numbers are taken) with shown False
    n = len(ids) - len(tok.render_documents(DOCS_A[2:], 3)) + 2
    ids2, docs2 = tok.render_for_completion(conv, max_tokens=n, return_documents=True)
    assert len(ids2) <= n and [d["shown"] for d in docs2] == [True, True, False]


def test_cut_document():
    text = "word " * 1000
    for cap in (1, 3, 4, 10, 57, 100, DOC_CHARS):
        cut = cut_document(text, cap)
        assert len(cut) <= cap and cut_document(cut, cap) == cut  # never longer than the cap; cutting twice is a no-op
    assert cut_document("short", 10) == "short"
    assert cut_document("alpha beta gamma delta", 15) == "alpha beta..."  # at a space when that keeps half
    assert cut_document("x" * 30, 10) == "xxxxxxx..."
    with pytest.raises(ValueError, match="doc_chars"):
        cut_document("x", 0)


def test_documents_are_cut_before_encoding(tok, monkeypatch):
    # a 5 MB document must not be BPE-encoded whole (issue 15, item 8): contents are cut to doc_chars, and to
    # MAX_CHARS_PER_TOKEN * max_tokens characters, before they reach the encoder
    lengths = []
    real = tok.enc

    class Spy:
        def __getattr__(self, name):
            return getattr(real, name)

        def encode_ordinary(self, text):
            lengths.append(len(text))
            return real.encode_ordinary(text)

    monkeypatch.setattr(tok, "enc", Spy())
    huge = {"id": "big", "title": "Big", "content": "all work and no play " * 250_000}
    conv = {"messages": [{"role": "retrieval", "documents": [huge, DOCS_A[0]]}, {"role": "user", "content": "q"},
                         {"role": "assistant", "content": "a"}]}
    ids, _ = tok.render_conversation(conv)
    assert max(lengths) <= DOC_CHARS + 40  # the cut content plus "[1] Title: Big\nContent: "
    assert "all work and no play" in tok.decode(ids) and "[2] Title: Paris" in tok.decode(ids)
    lengths.clear()
    ids, _ = tok.render_conversation(conv, max_tokens=300, doc_chars=10**9)  # no useful cap: the budget bounds it
    assert max(lengths) <= MAX_CHARS_PER_TOKEN * 300 + 40
    assert "all work" not in tok.decode(ids)  # and it is then dropped whole, not cut in tokens
    lengths.clear()
    tok.render_documents([huge], doc_chars=50)
    assert max(lengths) <= 50 + 40
    with pytest.raises(ValueError, match="doc_chars"):
        tok.render_conversation(conv, doc_chars=0)


def test_notice_block_survives_trimming(tok):
    conv = refrag_conv(tok)
    full, _ = tok.render_conversation(conv, max_tokens=10_000)
    no_docs = {"messages": [conv["messages"][1], dict(conv["messages"][2], content=[
        p if p["type"] != "documents" else dict(p, documents=[]) for p in conv["messages"][2]["content"]])]}
    bare, _ = tok.render_conversation(no_docs, max_tokens=10_000)
    ids, _ = tok.render_conversation(conv, max_tokens=len(bare))
    assert ids == bare and NOTICE_HOP_CAP in tok.decode(ids)  # the documents went, the notice block stayed


def test_render_for_completion(tok):
    conv = trim_conv(DOCS_A, DOCS_B)
    ids = tok.render_for_completion(conv)
    assert ids[-1] == tok.encode_special("<|assistant_start|>")
    text = tok.decode(ids)
    assert "Rome [1], not Milan" not in text and "Paris [1].<|assistant_end|>" in text
    prompt_only = {"messages": conv["messages"][:-1]}
    assert tok.render_for_completion(prompt_only) == ids
    assert ids[:-1] == tok.render_conversation(prompt_only)[0]
    # same trimming, with the budget counting <|assistant_start|>
    n = len(tok.render_conversation({"messages": conv["messages"][:-1]})[0])
    trimmed = tok.render_for_completion(conv, max_tokens=n)
    assert len(trimmed) <= n and "Turin" not in tok.decode(trimmed)
    with pytest.raises(ValueError, match="end with a user message"):
        tok.render_for_completion({"messages": conv["messages"][:-2]})


def test_visualize_tokenization(tok):
    ids, mask = tok.render_conversation({"messages": [{"role": "user", "content": "a\nb"},
                                                      {"role": "assistant", "content": "c"}]})
    s = tok.visualize_tokenization(ids, mask, color=False)
    assert s.startswith("<|bos|>|<|user_start|>|") and s.endswith("|<|assistant_start|>|c|<|assistant_end|>")
    assert "\\n" in s and "\n" not in s
    colored = tok.visualize_tokenization(ids, mask)
    assert colored.count("\033[92m") == sum(mask) and colored.count("\033[91m") == len(mask) - sum(mask)
    with pytest.raises(ValueError, match="differ in length"):
        tok.visualize_tokenization(ids, mask[:-1])


# -----------------------------------------------------------------------------
# CLIs


def test_tok_train_help():
    r = subprocess.run([sys.executable, "-m", "scripts.tok_train", "--help"], cwd=REPO, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "--vocab-size" in r.stdout and "--doc-cap" in r.stdout


def test_tok_eval_help():
    r = subprocess.run([sys.executable, "-m", "scripts.tok_eval", "--help"], cwd=REPO, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "--tokenizer-dir" in r.stdout


def test_tok_eval_runs(tok, tmp_path):
    # without a dataset (or offline tiktoken files) it still measures code and multilingual text
    tok.save(tmp_path / "tokenizer")
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(tmp_path))
    r = subprocess.run([sys.executable, "-m", "scripts.tok_eval", "--tokenizer-dir", str(tmp_path / "tokenizer"),
                        "--data-dir", str(tmp_path / "no_data")], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    with open(tmp_path / "report" / "tok_eval.md") as f:
        report = f.read()
    assert "| code |" in report and "| multilingual |" in report and "ours bytes/token" in report


def test_tok_train_end_to_end(tmp_path):
    pytest.importorskip("nanochat.dataset")  # written in parallel; parquet shards with a "text" column
    import pyarrow as pa
    import pyarrow.parquet as pq
    data = tmp_path / "data"
    data.mkdir()
    pq.write_table(pa.table({"text": TRAIN_TEXTS[:60]}), data / "shard_00000.parquet")
    pq.write_table(pa.table({"text": TRAIN_TEXTS[60:]}), data / "shard_00001.parquet")  # last file = val
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(tmp_path))
    r = subprocess.run([sys.executable, "-m", "scripts.tok_train", "--vocab-size", "400", "--data-dir", str(data),
                        "--max-chars", "200000"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "val compression" in r.stdout
    trained = get_tokenizer(str(tmp_path / "tokenizer"))
    assert trained.get_vocab_size() == 400
    # the same capped stream trained in-process gives the same tokenizer
    capped, n = [], 0
    for t in TRAIN_TEXTS[:60]:
        t = t[:10_000][:200_000 - n]
        capped.append(t)
        n += len(t)
        if n >= 200_000:
            break
    assert Tokenizer.train_from_iterator(capped, 400)._mergeable_ranks == trained._mergeable_ranks
