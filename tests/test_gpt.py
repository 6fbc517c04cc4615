"""
Tests for nanochat/gpt.py: config validation, gradients, optimizer groups, FLOPs accounting, activation
checkpointing, rotary length, compile.

    python -m pytest -q tests/test_gpt.py
"""

import pytest
import torch

from nanochat.gpt import GPT, GPTConfig, parse_block_pattern
from nanochat.mamba import mamba_flops_per_token
from conftest import saved_bytes_and_grads


def tiny_config(pattern, **kw):
    n = len(parse_block_pattern(pattern, len(pattern.replace(",", "")))) if isinstance(pattern, str) else len(pattern)
    cfg = dict(sequence_len=64, vocab_size=97, n_layer=n, n_head=4, n_kv_head=2, n_embd=64, block_pattern=pattern,
               mamba_d_state=16, mamba_headdim=16, mamba_chunk_size=8)
    cfg.update(kw)
    return GPTConfig(**cfg)


def make_model(pattern, seed=0, **kw):
    torch.manual_seed(seed)
    model = GPT(tiny_config(pattern, **kw))
    model.init_weights()
    return model


def perturbed(model):
    with torch.no_grad():  # init zeroes lm_head and the output projections: perturb everything so every path counts
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


# -----------------------------------------------------------------------------
# block patterns

def test_block_pattern_spellings():
    assert parse_block_pattern("TTMM", 4) == ["T", "T", "M", "M"]
    assert parse_block_pattern("T,T,M,M", 4) == ["T", "T", "M", "M"]
    assert parse_block_pattern(["T", "m", "T"], 3) == ["T", "M", "T"]
    assert parse_block_pattern(None, 3) == ["T", "T", "T"]
    assert GPTConfig(n_layer=2, n_embd=64, n_head=1, n_kv_head=1, block_pattern="TM").block_pattern == ["T", "M"]


@pytest.mark.parametrize("pattern,n_layer,needle", [
    ("TTX", 3, "'X'"),           # unknown letter named
    ("TTM", 4, "3 blocks"),      # wrong length
    ("", 2, "empty"),
    ([], 2, "empty"),
    (["T", 1], 2, "1"),
    (42, 2, "42"),
    ("T,A", 2, "'A'"),
])
def test_bad_block_patterns_raise(pattern, n_layer, needle):
    with pytest.raises(ValueError) as e:
        GPTConfig(n_layer=n_layer, n_embd=64, n_head=1, n_kv_head=1, block_pattern=pattern)
    assert needle in str(e.value)


def test_bad_head_configs_raise():
    with pytest.raises(ValueError, match="n_kv_head"):
        GPTConfig(n_layer=1, n_embd=64, n_head=4, n_kv_head=3)
    with pytest.raises(ValueError, match="n_head"):
        GPTConfig(n_layer=1, n_embd=60, n_head=7, n_kv_head=7)
    with pytest.raises(ValueError, match="mamba_headdim"):
        GPTConfig(n_layer=1, n_embd=40, n_head=1, n_kv_head=1, block_pattern="M", mamba_headdim=64)


# -----------------------------------------------------------------------------
# training-time behaviour

@pytest.mark.parametrize("pattern", ["TT", "MM", "TMMT"])
def test_every_parameter_gets_a_gradient(pattern):
    model = make_model(pattern)
    opts = model.setup_optimizers()
    idx = torch.randint(0, 97, (2, 24))
    # zero-initialized output projections block gradients at step 0, so take one step first
    for _ in range(2):
        loss = model(idx, idx)
        loss.backward()
        for name, p in model.named_parameters():
            assert p.grad is not None, name
            assert torch.isfinite(p.grad).all(), name
        for o in opts:
            o.step()
        model.zero_grad(set_to_none=True)
    loss = model(idx, idx)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad.abs().sum() > 0, f"no gradient reaches {name}"


def test_optimizer_groups_cover_each_parameter_once():
    model = make_model("TMTM")
    adamw, muon = model.setup_optimizers()
    adam_ids = [id(p) for g in adamw.param_groups for p in g["params"]]
    muon_ids = [id(p) for g in muon.param_groups for p in g["params"]]
    assert len(set(adam_ids) & set(muon_ids)) == 0
    assert sorted(adam_ids + muon_ids) == sorted(id(p) for p in model.parameters())
    names = {id(p): n for n, p in model.named_parameters()}
    muon_names = {names[i] for i in muon_ids}
    adam_names = {names[i] for i in adam_ids}
    assert all(model.get_parameter(n).ndim == 2 for n in muon_names)
    for suffix in ("A_log", "D", "dt_bias", "conv1d.weight", "conv1d.bias", "norm.weight"):
        assert any(n.endswith(suffix) for n in adam_names), suffix
        assert not any(n.endswith(suffix) for n in muon_names), suffix
    assert "transformer.wte.weight" in adam_names and "lm_head.weight" in adam_names
    assert any(n.endswith("mixer.in_proj.weight") for n in muon_names)
    assert any(n.endswith("attn.c_q.weight") for n in muon_names)


def test_optimizer_grouping_errors_name_the_parameter():
    model = make_model("TM")
    model.stray = torch.nn.Parameter(torch.zeros(3))  # belongs to no group
    with pytest.raises(RuntimeError, match=r"1 parameters in no optimizer group: \['stray'\]"):
        model.setup_optimizers()
    model = make_model("TM")
    model.lm_head.weight = model.transformer.wte.weight  # tied: would be stepped twice
    with pytest.raises(RuntimeError, match="parameters in two optimizer groups: .*lm_head.weight"):
        model.setup_optimizers()
    model = make_model("TM")
    model.transformer.h[0].attn.scale = torch.nn.Parameter(torch.ones(4))  # 1-D in a T block
    with pytest.raises(RuntimeError, match=r"1-D parameter transformer.h.0.attn.scale in a T block"):
        model.setup_optimizers()


def test_training_lowers_the_loss():
    model = make_model("TM")
    opts = model.setup_optimizers(matrix_lr=0.02, embedding_lr=0.05, unembedding_lr=0.01)
    idx = torch.randint(0, 97, (4, 32))
    first = None
    for _ in range(30):
        loss = model(idx, idx.roll(-1, 1))
        first = loss.item() if first is None else first
        loss.backward()
        for o in opts:
            o.step()
        model.zero_grad(set_to_none=True)
    assert loss.item() < first - 0.5


def test_ignore_index_and_reduction():
    model = make_model("TM")
    idx = torch.randint(0, 97, (2, 16))
    tgt = idx.clone()
    tgt[:, :8] = -1
    per_tok = model(idx, tgt, loss_reduction="none").view(2, 16)
    assert (per_tok[:, :8] == 0).all()
    assert torch.allclose(model(idx, tgt), per_tok[:, 8:].mean(), atol=1e-6)


def test_state_dict_round_trip(tmp_path):
    model = perturbed(make_model("TMM"))  # so that the logits of two models differ
    path = tmp_path / "m.pt"
    torch.save(model.state_dict(), path)
    other = make_model("TMM", seed=1)
    idx = torch.randint(0, 97, (2, 20))
    assert not torch.allclose(model(idx), other(idx))  # the check below would catch a load that did nothing
    other.load_state_dict(torch.load(path, weights_only=True))
    assert torch.equal(model(idx), other(idx))
    assert set(other.state_dict()) == set(model.state_dict())


def test_estimate_flops_counts_attention_and_ssd():
    t = make_model("TT")
    m = make_model("MM")
    cfg = t.config
    head_dim = cfg.n_embd // cfg.n_head
    nonembed = lambda mod: mod.num_params() - mod.transformer.wte.weight.numel()
    assert t.estimate_flops() == 6 * nonembed(t) + 2 * 12 * cfg.n_head * head_dim * cfg.sequence_len
    ssd = mamba_flops_per_token(cfg.n_embd, cfg.mamba_d_state, cfg.mamba_expand, cfg.mamba_headdim,
                                cfg.mamba_ngroups, cfg.mamba_chunk_size)
    assert ssd > 0
    assert m.estimate_flops() == 6 * nonembed(m) + 2 * 3 * ssd


@pytest.mark.parametrize("pattern", ["TT", "MM", "TM", "MMMT"])
def test_activation_checkpointing_same_gradients(pattern):
    # blocks in float64 (the head's logits are float32 by design): the recomputed forward is the same computation,
    # so the gradients agree to rounding
    model = perturbed(make_model(pattern)).double()
    idx = torch.randint(0, 97, (2, 40))  # 40: five Mamba chunks of 8
    saved_plain, loss_plain, g_plain = saved_bytes_and_grads(model, lambda: model(idx, idx.roll(-1, 1)))
    assert model.set_activation_checkpointing(True) is model
    saved_ckpt, loss_ckpt, g_ckpt = saved_bytes_and_grads(model, lambda: model(idx, idx.roll(-1, 1)))
    assert loss_plain.item() == loss_ckpt.item()
    for n, g in g_plain.items():
        assert g.abs().sum() > 0, n
        assert torch.allclose(g_ckpt[n], g, rtol=1e-10, atol=1e-13), (n, (g_ckpt[n] - g).abs().max().item())
    # the blocks' activations are not kept: only block inputs, the embedding and the head's are
    assert saved_ckpt < saved_plain / 3, (saved_ckpt, saved_plain)
    with torch.no_grad():  # inference ignores the setting
        assert torch.equal(model(idx), model.set_activation_checkpointing(False)(idx))


@pytest.mark.slow
def test_activation_checkpointing_under_compile():
    # dynamo traces the checkpointed blocks whole (fullgraph: no graph break, so the Mamba scan runs as the
    # nanochat::ssd_scan custom op inside the checkpointed region) and AOT autograd recomputes them in backward:
    # the compiled step saves fewer bytes than the compiled step without checkpointing, with the eager gradients.
    # aot_eager runs the same dynamo + AOT autograd partitioning as Inductor without code generation (seconds, not
    # minutes on 2 cores); the Inductor whole-model compile is test_whole_model_torch_compile_matches_eager.
    model = perturbed(make_model("TM"))
    idx = torch.randint(0, 97, (2, 24))
    _, loss_eager, g_eager = saved_bytes_and_grads(model, lambda: model(idx, idx.roll(-1, 1)))
    saved = {}
    for enabled in (False, True):
        torch._dynamo.reset()
        model.set_activation_checkpointing(enabled)
        compiled = torch.compile(model, dynamic=False, fullgraph=True, backend="aot_eager")
        saved[enabled], loss, grads = saved_bytes_and_grads(model, lambda: compiled(idx, idx.roll(-1, 1)))
        assert abs(loss.item() - loss_eager.item()) < 1e-5
        for n, g in g_eager.items():
            assert torch.allclose(grads[n], g, atol=1e-6, rtol=1e-5), (enabled, n)
    assert saved[True] < 0.75 * saved[False], saved


def test_rotary_table_grows_past_ten_times_sequence_len():
    # fine-tuning at a longer --max-seq-len than the base was built with (a 2K base at 32K rows exceeds the 10x
    # table): the tables grow instead of failing, and give what a model built for that length computes
    short = perturbed(make_model("TM", sequence_len=4))
    assert short.rotary_seq_len == 40
    long = make_model("TM", sequence_len=64)
    long.load_state_dict(short.state_dict())
    idx = torch.randint(0, 97, (1, 100))
    assert torch.equal(short(idx), long(idx))
    assert short.rotary_seq_len >= 100 and short.cos.size(1) == short.rotary_seq_len
    assert short.cos.dtype == long.cos.dtype and torch.equal(short.cos[:, :100], long.cos[:, :100])


@pytest.mark.slow
def test_whole_model_torch_compile_matches_eager():
    model = make_model("TMMT")
    idx = torch.randint(0, 97, (2, 24))
    eager = model(idx, idx)
    eager.backward()
    g_eager = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model, dynamic=False)
    loss = compiled(idx, idx)
    loss.backward()
    assert abs(loss.item() - eager.item()) < 1e-5
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, g_eager[n], atol=1e-5, rtol=1e-4), n
