"""
Long contexts end to end on CPU at tiny width (issue 17): an 8K-token RAG conversation with 32 retrieved documents
renders whole, packs into one 8192-token row the way nanochat/sft.py trains, and trains one step of a hybrid model
built for --max-seq-len 8192 with activation checkpointing on.

    python -m pytest -q tests/test_long_context.py
"""

import torch
from pydoc_data.topics import topics

from nanochat.gpt import GPT, GPTConfig
from nanochat.sft import sft_batches

SEQ = 8192
N_DOCS = 32


def long_rag_conversation(tokenizer, n_docs=N_DOCS, doc_tokens=230):
    """A RAG conversation: n_docs retrieved documents of ~doc_tokens tokens each (CPython's language-reference
    topics), a question and a cited answer."""
    docs = []
    for key in sorted(topics):
        ids = tokenizer.encode(topics[key])
        if len(ids) >= doc_tokens:
            docs.append(dict(title=key, content=tokenizer.decode(ids[:doc_tokens])))
        if len(docs) == n_docs:
            break
    assert len(docs) == n_docs
    return {"messages": [
        {"role": "retrieval", "documents": docs},
        {"role": "user", "content": f"What does the reference say about {docs[-1]['title']}?"},
        {"role": "assistant", "content": f"It is described in the last document [{n_docs}]."},
    ]}


def test_8k_rag_example_renders_and_trains_one_step(tiny_tokenizer):
    tok = tiny_tokenizer
    conv = long_rag_conversation(tok)
    ids, mask = tok.render_conversation(conv, max_tokens=SEQ + 1)
    doc_start = tok.encode_special("<|doc_start|>")
    assert 7000 < len(ids) <= SEQ + 1, len(ids)
    assert ids.count(doc_start) == N_DOCS  # nothing trimmed: every document made it into the row
    assert 0 < sum(mask) < 30  # only the answer is learned

    # packed into one row by the fine-tuning loop's batcher, as run_sft does at --max-seq-len 8192
    x, y, _ = next(sft_batches([conv], tok, 1, SEQ, torch.device("cpu"), max_epochs=1))
    assert x.shape == (1, SEQ) and (y >= 0).sum().item() == sum(mask)

    # a hybrid (1-in-4 attention) built for 8K tokens, as base_train --max-seq-len 8192 builds it
    torch.manual_seed(0)
    cfg = GPTConfig(sequence_len=SEQ, vocab_size=tok.get_vocab_size(), n_layer=4, n_head=2, n_kv_head=1, n_embd=32,
                    block_pattern="MMMT", mamba_d_state=8, mamba_headdim=16, mamba_chunk_size=64)
    model = GPT(cfg)
    model.init_weights()
    with torch.no_grad():  # init zeroes the output projections: perturb so every block's gradient is non-zero
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.set_activation_checkpointing(True)  # how a long-context run trains (gradients: tests/test_gpt.py)
    loss = model(x, y)
    loss.backward()
    assert torch.isfinite(loss)
    for n, p in model.named_parameters():
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n
    # the step: the loss on this row goes down
    for opt in model.setup_optimizers(matrix_lr=0.02, embedding_lr=0.05, unembedding_lr=0.01):
        opt.step()
    with torch.no_grad():
        assert model(x, y).item() < loss.item()
