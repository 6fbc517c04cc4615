"""Tests for nanochat/checkpoint_manager.py: round trip, atomic writes, refusals with clear messages."""

import os
import pickle

import pytest
import torch

from nanochat.gpt import GPT, GPTConfig
from nanochat import checkpoint_manager as cm


def make(tokenizer, pattern="TM"):
    torch.manual_seed(0)
    cfg = GPTConfig(sequence_len=32, vocab_size=tokenizer.get_vocab_size(), n_layer=len(pattern), n_head=2, n_kv_head=1,
                    n_embd=32, block_pattern=pattern, mamba_d_state=8, mamba_headdim=16, mamba_chunk_size=8)
    model = GPT(cfg)
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model


def save(model, tokenizer, source="base", tag="t1", step=5, opts=None):
    d = cm.checkpoint_dir(source, tag)
    meta = cm.make_meta(model, tokenizer, step, user_config={"x": 1})
    cm.save_checkpoint(d, step, model.state_dict(), [o.state_dict() for o in opts] if opts else None, meta)
    return d


def test_round_trip_model_optimizer_meta(base_dir, tiny_tokenizer):
    model = make(tiny_tokenizer, "TMMT")
    opts = model.setup_optimizers()
    idx = torch.randint(0, 100, (2, 12))
    model(idx, idx).backward()
    for o in opts:
        o.step()
    d = save(model, tiny_tokenizer, opts=opts)
    loaded, tok, meta = cm.load_model("base", "cpu", phase="eval", tokenizer=tiny_tokenizer)
    assert meta["model_config"]["block_pattern"] == ["T", "M", "M", "T"]
    assert meta["model_tag"] == "t1" and meta["step"] == 5
    model.eval()
    assert torch.equal(model(idx), loaded(idx))
    _, optim_state, _ = cm.load_checkpoint(d, 5, "cpu", load_optimizer=True)
    fresh = loaded.setup_optimizers()
    for o, st in zip(fresh, optim_state):
        o.load_state_dict(st)
    assert fresh[1].state_dict()["state"].keys() == opts[1].state_dict()["state"].keys()


def test_last_step_and_tag_discovery(base_dir, tiny_tokenizer):
    model = make(tiny_tokenizer)
    for step in (3, 10, 7):
        save(model, tiny_tokenizer, step=step)
    assert cm.find_last_step(cm.checkpoint_dir("base", "t1")) == 10
    # a model file without its meta is an incomplete checkpoint and is ignored
    torch.save(model.state_dict(), os.path.join(cm.checkpoint_dir("base", "t1"), "model_000099.pt"))
    assert cm.find_last_step(cm.checkpoint_dir("base", "t1")) == 10


def test_block_pattern_mismatch_names_both(base_dir, tiny_tokenizer):
    save(make(tiny_tokenizer, "TM"), tiny_tokenizer)
    with pytest.raises(ValueError, match="TM.*MT"):
        cm.load_model("base", "cpu", "eval", block_pattern="MT", tokenizer=tiny_tokenizer)
    cm.load_model("base", "cpu", "eval", block_pattern="T,M", tokenizer=tiny_tokenizer)  # same pattern, other spelling
    # another length (or a bad letter): still names what the checkpoint has
    with pytest.raises(ValueError, match=r"has TM \(2 layers\) but 'TMTM' was requested .*4 blocks but n_layer is 2"):
        cm.load_model("base", "cpu", "eval", block_pattern="TMTM", tokenizer=tiny_tokenizer)
    with pytest.raises(ValueError, match=r"has TM \(2 layers\) but 'TX' was requested .*unknown block letter 'X'"):
        cm.load_model("base", "cpu", "eval", block_pattern="TX", tokenizer=tiny_tokenizer)


def test_tokenizer_mismatch_names_both(base_dir, tiny_tokenizer):
    from nanochat.tokenizer import Tokenizer
    from conftest import stdlib_texts
    save(make(tiny_tokenizer), tiny_tokenizer)
    other = Tokenizer.train_from_iterator(iter(stdlib_texts(100_000)), vocab_size=600)
    with pytest.raises(ValueError, match="512.*600|vocab_size 512"):
        cm.load_model("base", "cpu", "eval", tokenizer=other)
    same_size = Tokenizer.train_from_iterator(iter(stdlib_texts(50_000)), vocab_size=512)
    with pytest.raises(ValueError, match="tokenizer mismatch"):
        cm.load_model("base", "cpu", "eval", tokenizer=same_size)


def test_failed_save_leaves_previous_checkpoint_intact(base_dir, tiny_tokenizer, monkeypatch):
    model = make(tiny_tokenizer)
    d = save(model, tiny_tokenizer, step=1)
    before = sorted(os.listdir(d))
    real_save = torch.save

    def exploding_save(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", exploding_save)
    with pytest.raises(OSError, match="disk full"):
        save(model, tiny_tokenizer, step=2)
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(os.listdir(d)) == before  # no model_000002.pt, no temp file left behind
    assert cm.find_last_step(d) == 1


def test_pickled_objects_are_refused(base_dir, tiny_tokenizer):
    model = make(tiny_tokenizer)
    d = save(model, tiny_tokenizer, step=1)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(os.path.join(d, "model_000001.pt"), "wb") as f:
        pickle.dump({"x": Evil()}, f)
    with pytest.raises(Exception) as e:
        cm.load_model("base", "cpu", "eval", tokenizer=tiny_tokenizer)
    assert "weights_only" in str(e.value) or "Unpickl" in type(e.value).__name__ + str(e.value)


def test_missing_checkpoints_are_clear_errors(base_dir, tiny_tokenizer):
    with pytest.raises(FileNotFoundError, match="rag_checkpoints"):
        cm.load_model("rag", "cpu", "eval", tokenizer=tiny_tokenizer)
    with pytest.raises(ValueError, match="unknown checkpoint source"):
        cm.load_model("nope", "cpu", "eval", tokenizer=tiny_tokenizer)
