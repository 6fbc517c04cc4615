"""
Tests for nanochat/mamba.py (CPU): the chunked SSD scan against the step-by-step recurrence, the Mamba2 layer's
stateful paths (prefill, multi-token forcing, decode) against its full-sequence forward, gradients, the
mamba-ssm state-dict layout, implementation selection, torch.compile and the FLOP formula.

    python -m pytest -q tests/test_mamba.py
"""

import math
import warnings
import types

import pytest
import torch
import torch.nn as nn

from conftest import saved_bytes_and_grads
import nanochat.mamba as mamba_mod
from nanochat.mamba import (Mamba2, ssd_chunked, ssd_sequential, mamba_flops_per_token, resolve_impl, causal_conv_silu,
                            ssd_scan_op, _discretized_scan)

F64 = torch.float64


@pytest.fixture(autouse=True)
def one_thread():
    # every tensor here is tiny, so one intra-op thread is fastest; and on a shared 2-core machine, 2 BLAS threads
    # contending with other processes made the fp64 layer test take 21 s instead of 0.06 s (measured)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def random_scan_inputs(b, l, h, p, g, n, dtype=F64, seed=0, dt_scale=0.5, A_scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, l, h, p, generator=gen, dtype=dtype)
    dt = torch.rand(b, l, h, generator=gen, dtype=dtype) * dt_scale + 0.01
    A = -(torch.rand(h, generator=gen, dtype=dtype) * A_scale + 0.1)
    B = torch.randn(b, l, g, n, generator=gen, dtype=dtype)
    C = torch.randn(b, l, g, n, generator=gen, dtype=dtype)
    D = torch.randn(h, generator=gen, dtype=dtype)
    h0 = torch.randn(b, h, p, n, generator=gen, dtype=dtype)
    return x, dt, A, B, C, D, h0


def new_state(m, batch, dtype=torch.float32):
    conv_state, ssm_state = m.allocate_inference_state(batch, "cpu", dtype=dtype)
    return types.SimpleNamespace(conv_state=conv_state, ssm_state=ssm_state)


def max_err(a, b):
    return (a - b).abs().max().item()


# -----------------------------------------------------------------------------
# the scan


@pytest.mark.parametrize("ngroups", [1, 2])
@pytest.mark.parametrize("use_D", [False, True])
@pytest.mark.parametrize("use_init", [False, True])
@pytest.mark.parametrize("l", [1, 7, 33, 100])
def test_ssd_chunked_matches_sequential(ngroups, use_D, use_init, l):
    x, dt, A, B, C, D, h0 = random_scan_inputs(2, l, 4, 3, ngroups, 5, seed=l)
    D = D if use_D else None
    h0 = h0 if use_init else None
    y_ref, s_ref = ssd_sequential(x, dt, A, B, C, D=D, initial_state=h0)
    for chunk_size in [1, 3, 8, 16, 64]:
        y, s = ssd_chunked(x, dt, A, B, C, chunk_size, D=D, initial_state=h0)
        assert y.shape == x.shape and y.dtype == F64 and s.shape == (2, 4, 3, 5) and s.dtype == F64
        assert max_err(y, y_ref) <= 1e-10, (chunk_size, max_err(y, y_ref))
        assert max_err(s, s_ref) <= 1e-10, (chunk_size, max_err(s, s_ref))


def test_ssd_sequential_is_the_recurrence():
    # the reference itself, against a literal transcription of h_t = exp(dt A) h_{t-1} + dt B x^T, y = C h + D x
    b, l, h, p, g, n = 1, 6, 2, 2, 1, 3
    x, dt, A, B, C, D, h0 = random_scan_inputs(b, l, h, p, g, n, seed=3)
    y, s = ssd_sequential(x, dt, A, B, C, D=D, initial_state=h0)
    for hi in range(h):
        state = h0[0, hi].clone()
        for t in range(l):
            state = math.exp(dt[0, t, hi].item() * A[hi].item()) * state + dt[0, t, hi] * torch.outer(x[0, t, hi], B[0, t, 0])
            yt = state @ C[0, t, 0] + D[hi] * x[0, t, hi]
            assert max_err(yt, y[0, t, hi]) < 1e-12
        assert max_err(state, s[0, hi]) < 1e-12


def test_ssd_chunked_fp32_and_bf16_inputs():
    x, dt, A, B, C, D, h0 = random_scan_inputs(2, 50, 4, 8, 2, 16, seed=1)
    y_ref, s_ref = ssd_sequential(x, dt, A, B, C, D=D, initial_state=h0)
    y, s = ssd_chunked(x.float(), dt.float(), A.float(), B.float(), C.float(), 16, D=D.float(), initial_state=h0.float())
    assert y.dtype == torch.float32 and s.dtype == torch.float32
    assert max_err(y.double(), y_ref) < 1e-4 and max_err(s.double(), s_ref) < 1e-4
    # bf16 inputs: computed in fp32, returned in bf16
    yb, sb = ssd_chunked(x.bfloat16(), dt.float(), A.float(), B.bfloat16(), C.bfloat16(), 16, D=D.float())
    assert yb.dtype == torch.bfloat16 and sb.dtype == torch.float32
    y32, _ = ssd_chunked(x.bfloat16().float(), dt.float(), A.float(), B.bfloat16().float(), C.bfloat16().float(), 16, D=D.float())
    assert max_err(yb.float(), y32) <= 0.02 * y32.abs().max().item()


def test_ssd_chunked_stable_with_strong_decay():
    # log-decays of -80 per step sum to ~-5000 over a chunk of 64: exp of cumsum differences taken the naive way
    # would overflow (exp(+5000)) in the masked half; the output must stay finite and exact, gradients too.
    x, dt, A, B, C, D, h0 = random_scan_inputs(1, 130, 2, 4, 1, 8, seed=2, dt_scale=5.0, A_scale=16.0)
    y_ref, s_ref = ssd_sequential(x, dt, A, B, C, D=D, initial_state=h0)
    xs, dts, As, Bs, Cs = [t.float().requires_grad_() for t in (x, dt, A, B, C)]
    y, s = ssd_chunked(xs, dts, As, Bs, Cs, 64, D=D.float(), initial_state=h0.float())
    assert torch.isfinite(y).all() and torch.isfinite(s).all()
    assert max_err(y.double(), y_ref) < 1e-4 and max_err(s.double(), s_ref) < 1e-4
    (y.square().sum() + s.square().sum()).backward()
    for t in (xs, dts, As, Bs, Cs):
        assert torch.isfinite(t.grad).all()


def test_ssd_chunked_gradcheck():
    x, dt, A, B, C, D, h0 = random_scan_inputs(1, 5, 2, 2, 1, 3, seed=4)
    inputs = [t.clone().requires_grad_() for t in (x, dt, A, B, C, D, h0)]

    def f(x, dt, A, B, C, D, h0):
        return ssd_chunked(x, dt, A, B, C, 2, D=D, initial_state=h0)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7)


def test_ssd_bad_shapes():
    x, dt, A, B, C, D, h0 = random_scan_inputs(1, 5, 4, 2, 2, 3)
    with pytest.raises(ValueError, match="dt must be"):
        ssd_chunked(x, dt[:, :4], A, B, C, 2)
    with pytest.raises(ValueError, match="not divisible by ngroups"):
        ssd_chunked(x, dt, A, torch.randn(1, 5, 3, 3, dtype=F64), torch.randn(1, 5, 3, 3, dtype=F64), 2)
    with pytest.raises(ValueError, match="initial_state"):
        ssd_chunked(x, dt, A, B, C, 2, initial_state=h0[:, :2])
    with pytest.raises(ValueError, match="chunk_size"):
        ssd_chunked(x, dt, A, B, C, 0)


# -----------------------------------------------------------------------------
# the conv


@pytest.mark.parametrize("T", [1, 3, 4, 17])
def test_causal_conv_silu_forms(T):
    # the eager form (F.conv1d) and the shifted-sum form used under torch.compile, against a literal loop
    gen = torch.Generator().manual_seed(T)
    Bsz, C, K = 2, 6, 4
    x = torch.randn(Bsz, T, C, generator=gen, dtype=F64)
    w = torch.randn(C, 1, K, generator=gen, dtype=F64)
    bias = torch.randn(C, generator=gen, dtype=F64)
    for prefix in [None, torch.randn(Bsz, C, K - 1, generator=gen, dtype=F64)]:
        full = torch.cat([torch.zeros(Bsz, K - 1, C, dtype=F64) if prefix is None else prefix.transpose(1, 2), x], dim=1)
        ref = torch.stack([torch.nn.functional.silu(bias + sum(full[:, t + k] * w[:, 0, k] for k in range(K)))
                           for t in range(T)], dim=1)
        for shifted in [False, True]:
            out = causal_conv_silu(x, w, bias, prefix=prefix, shifted=shifted)
            assert out.shape == (Bsz, T, C) and out.dtype == F64
            assert max_err(out, ref) < 1e-13, (shifted, prefix is None)


# -----------------------------------------------------------------------------
# the layer


def tiny_mamba(dtype, ngroups=1, chunk_size=8, seed=0, **kw):
    torch.manual_seed(seed)
    m = Mamba2(d_model=32, d_state=8, d_conv=4, expand=2, headdim=8, ngroups=ngroups, chunk_size=chunk_size, **kw).to(dtype)
    with torch.no_grad():  # non-trivial values everywhere (the defaults are ones for D and norm.weight)
        m.D.uniform_(0.5, 1.5)
        m.norm.weight.uniform_(0.5, 1.5)
        m.conv1d.bias.uniform_(-0.5, 0.5)
    return m


def run_stateful(m, u, splits, dtype):
    """Feed u in pieces: split sizes > 1 take the chunked path with initial states, 1 the recurrent step."""
    st = new_state(m, u.shape[0], dtype)
    outs, t = [], 0
    for k in splits:
        outs.append(m(u[:, t:t + k], state=st))
        t += k
    assert t == u.shape[1]
    return torch.cat(outs, dim=1), st


@pytest.mark.parametrize("dtype,tol", [(F64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("ngroups", [1, 2])
def test_layer_stateful_paths_match_full_forward(dtype, tol, ngroups):
    m = tiny_mamba(dtype, ngroups=ngroups)
    T = 21  # not a multiple of the chunk size (8)
    u = torch.randn(2, T, 32, dtype=dtype, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y_full = m(u)
        for k in [1, 2, 5, 9]:  # prefixes shorter and longer than d_conv and than a chunk
            y_step, st_step = run_stateful(m, u, [k] + [1] * (T - k), dtype)  # prefill + decode
            assert max_err(y_step, y_full) <= tol, ("prefill+steps", k, max_err(y_step, y_full))
            y_two, st_two = run_stateful(m, u, [k, T - k], dtype)  # prefill + multi-token forcing
            assert max_err(y_two, y_full) <= tol, ("prefill+prefill", k, max_err(y_two, y_full))
            assert max_err(st_two.conv_state, st_step.conv_state) <= tol
            assert max_err(st_two.ssm_state, st_step.ssm_state) <= tol
        y_mixed, st_mixed = run_stateful(m, u, [3, 1, 1, 6, 1, 9], dtype)  # forcing after decoding too
        assert max_err(y_mixed, y_full) <= tol
        y_one, st_one = run_stateful(m, u, [T], dtype)
        assert max_err(y_one, y_full) <= tol
        assert max_err(st_one.ssm_state, st_step.ssm_state) <= tol
    assert st_one.conv_state.dtype == dtype and st_one.ssm_state.dtype == dtype


def test_layer_states_follow_mamba_ssm_conventions():
    m = tiny_mamba(F64)
    u = torch.randn(1, 2, 32, dtype=F64)
    st = new_state(m, 1, F64)
    with torch.no_grad():
        m(u, state=st)
        xBC = m.in_proj(u)[..., m.d_inner:m.d_inner + m.conv_dim]  # pre-conv inputs (B, T, conv_dim)
    # conv_state = the last d_conv pre-conv inputs, oldest first, zero-padded at the start
    assert torch.equal(st.conv_state[:, :, :2], torch.zeros(1, m.conv_dim, 2, dtype=F64))
    assert max_err(st.conv_state[:, :, 2:], xBC.transpose(1, 2)) == 0.0
    # ssm_state = the scan's final state over the post-conv inputs
    with torch.no_grad():
        xc = torch.nn.functional.silu(m.conv1d(xBC.transpose(1, 2))[..., :2]).transpose(1, 2)
        x, Bm, Cm = torch.split(xc, [m.d_inner, m.d_state, m.d_state], dim=-1)
        dt = torch.nn.functional.softplus(m.in_proj(u)[..., -m.nheads:] + m.dt_bias)
        _, s = ssd_sequential(x.unflatten(-1, (m.nheads, m.headdim)), dt, -torch.exp(m.A_log), Bm.unsqueeze(2), Cm.unsqueeze(2))
    assert max_err(st.ssm_state, s) < 1e-12


def test_layer_fp32_states_by_default_and_bad_state():
    m = tiny_mamba(torch.float32)
    conv_state, ssm_state = m.allocate_inference_state(3, "cpu")
    assert conv_state.shape == (3, m.conv_dim, 4) and ssm_state.shape == (3, m.nheads, 8, 8)
    assert conv_state.dtype == torch.float32 and ssm_state.dtype == torch.float32
    assert not conv_state.any() and not ssm_state.any()
    u = torch.randn(3, 4, 32)
    with pytest.raises(ValueError, match="conv_state shape"):
        m(u, state=types.SimpleNamespace(conv_state=conv_state[:2], ssm_state=ssm_state))
    with pytest.raises(ValueError, match="float32"):
        m(u, state=types.SimpleNamespace(conv_state=conv_state.bfloat16(), ssm_state=ssm_state))
    with pytest.raises(ValueError, match="conv_state and ssm_state"):
        m(u, state=object())
    with pytest.raises(ValueError, match="d_model=32"):
        m(torch.randn(3, 4, 31))


def test_layer_dt_limit_consistent_across_paths():
    m = tiny_mamba(F64, dt_limit=(0.01, 0.05))
    u = torch.randn(1, 11, 32, dtype=F64)
    with torch.no_grad():
        y_full = m(u)
        y_step, _ = run_stateful(m, u, [4] + [1] * 7, F64)
        m_free = tiny_mamba(F64)  # same seed, same weights, no limit
        y_free = m_free(u)
    assert max_err(y_step, y_full) < 1e-10
    assert max_err(y_free, y_full) > 1e-6  # the limit is really applied


def test_layer_gradients():
    m = tiny_mamba(torch.float32, ngroups=2)
    u = torch.randn(2, 19, 32, requires_grad=True)
    m(u).square().mean().backward()
    assert torch.isfinite(u.grad).all() and u.grad.abs().sum() > 0
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_recompute_scan_same_gradients_less_saved(monkeypatch):
    m = tiny_mamba(torch.float32, ngroups=2)
    u = torch.randn(2, 64, 32)
    stored, _, g_stored = saved_bytes_and_grads(m.configure(recompute="0"), lambda: m(u).square().mean())
    recomputed, _, g_recomputed = saved_bytes_and_grads(m.configure(recompute="1"), lambda: m(u).square().mean())
    for n in g_stored:
        assert torch.allclose(g_stored[n], g_recomputed[n], rtol=1e-5, atol=1e-7), n
    assert recomputed < stored / 2, (recomputed, stored)  # the (Q, Q) chunk matrices are not kept
    with torch.no_grad():  # inference never checkpoints
        torch.testing.assert_close(m(u), m(u))
    with pytest.raises(ValueError, match="recompute='maybe'"):
        m.configure(recompute="maybe")
    monkeypatch.setenv("NANOCHAT_MAMBA_RECOMPUTE", "1")  # the environment sets the default, at build time
    assert tiny_mamba(torch.float32).recompute == "1"
    monkeypatch.setenv("NANOCHAT_MAMBA_RECOMPUTE", "maybe")
    with pytest.raises(ValueError, match="NANOCHAT_MAMBA_RECOMPUTE='maybe'"):
        tiny_mamba(torch.float32)


def test_layer_bf16_autocast_close_to_fp32():
    m = tiny_mamba(torch.float32)
    u = torch.randn(2, 20, 32)
    with torch.no_grad():
        y32 = m(u)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ybf = m(u)
    assert ybf.dtype == torch.bfloat16
    assert (ybf.float() - y32).norm() / y32.norm() < 3e-2


def test_layer_bf16_weights_without_autocast():
    # a model cast to bf16 (no autocast) runs every path and keeps bf16 activations; states stay fp32
    m32 = tiny_mamba(torch.float32)
    m = tiny_mamba(torch.float32).bfloat16()
    u = torch.randn(2, 13, 32)
    with torch.no_grad():
        y = m(u.bfloat16())
        y_step, st = run_stateful(m, u.bfloat16(), [5, 1, 1, 6], torch.float32)
        y32 = m32(u)
    assert y.dtype == torch.bfloat16 and y_step.dtype == torch.bfloat16
    assert st.ssm_state.dtype == torch.float32 and st.conv_state.dtype == torch.float32
    assert (y.float() - y32).norm() / y32.norm() < 3e-2
    assert (y_step.float() - y32).norm() / y32.norm() < 3e-2


def test_init_and_meta_device():
    m = Mamba2(d_model=64, d_state=16, headdim=16, dt_min=0.001, dt_max=0.1, A_init_range=(1, 16))
    dt = torch.nn.functional.softplus(m.dt_bias.detach())
    assert (dt >= 0.001 * 0.999).all() and (dt <= 0.1 * 1.001).all()
    A = torch.exp(m.A_log.detach())
    assert (A >= 1).all() and (A <= 16).all()
    assert torch.equal(m.D.detach(), torch.ones(m.nheads)) and torch.equal(m.norm.weight.detach(), torch.ones(128))
    for p in (m.dt_bias, m.A_log, m.D):
        assert getattr(p, "_no_weight_decay", False)
    # built on meta, materialised, then initialised (the GPT's path)
    with torch.device("meta"):
        mm = Mamba2(d_model=64, d_state=16, headdim=16)
    mm.to_empty(device="cpu")
    mm.reset_parameters()
    assert torch.isfinite(mm.dt_bias).all() and torch.equal(mm.D.detach(), torch.ones(mm.nheads))
    assert getattr(mm.A_log, "_no_weight_decay", False)
    y = mm(torch.randn(1, 5, 64))
    assert torch.isfinite(y).all()
    with pytest.raises(ValueError, match="headdim"):
        Mamba2(d_model=60, headdim=64)


# -----------------------------------------------------------------------------
# mamba-ssm compatibility


def expected_mamba_ssm_shapes(d_model, d_state=128, d_conv=4, expand=2, headdim=64, ngroups=1):
    d_inner = expand * d_model
    nheads = d_inner // headdim
    conv_dim = d_inner + 2 * ngroups * d_state
    return {
        "dt_bias": (nheads,),
        "A_log": (nheads,),
        "D": (nheads,),
        "in_proj.weight": (2 * d_inner + 2 * ngroups * d_state + nheads, d_model),
        "conv1d.weight": (conv_dim, 1, d_conv),
        "conv1d.bias": (conv_dim,),
        "norm.weight": (d_inner,),
        "out_proj.weight": (d_model, d_inner),
    }


@pytest.mark.parametrize("cfg", [dict(d_model=64), dict(d_model=96, d_state=16, headdim=32, ngroups=2, expand=2, d_conv=3)])
def test_state_dict_matches_mamba_ssm_layout(cfg):
    with torch.device("meta"):
        m = Mamba2(**cfg)
    got = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert got == expected_mamba_ssm_shapes(**cfg)


def test_state_dict_against_mamba_ssm_module():
    try:
        from mamba_ssm.modules.mamba2 import Mamba2 as RefMamba2
    except Exception as e:  # not installed here, or its CUDA extension is missing
        pytest.skip(f"mamba_ssm.modules.mamba2 not importable: {e}")
    ref = RefMamba2(d_model=64, d_state=16, headdim=16, ngroups=2, device="meta")
    ours = Mamba2(d_model=64, d_state=16, headdim=16, ngroups=2, device="meta")
    assert {k: tuple(v.shape) for k, v in ref.state_dict().items()} == {k: tuple(v.shape) for k, v in ours.state_dict().items()}


# -----------------------------------------------------------------------------
# implementation selection


def test_impl_chosen_once_at_build(monkeypatch, capsys):
    # the implementation is decided when the layer is built (argument, or NANOCHAT_MAMBA_IMPL read then), never per
    # forward; an explicit triton that cannot run here is an error at build time, not a silent torch fallback
    monkeypatch.setattr(mamba_mod, "triton_available", lambda: (False, "RuntimeError: no CUDA (test)"))  # any machine
    u = torch.randn(1, 6, 32)
    monkeypatch.setenv("NANOCHAT_MAMBA_IMPL", "torch")
    assert resolve_impl() == "torch" and resolve_impl("auto") == "torch"  # kernels unavailable: auto -> torch
    m = tiny_mamba(torch.float32)
    assert (m.impl, m.impl_requested) == ("torch", "torch")
    y_torch = m(u)
    for value in ("triton", "cuda"):  # changing the environment after the build changes nothing
        monkeypatch.setenv("NANOCHAT_MAMBA_IMPL", value)
        assert torch.equal(m(u), y_torch)
        assert torch.equal(m(u[:, :1], state=new_state(m, 1)), m(u[:, :1], state=new_state(m, 1)))
    monkeypatch.setenv("NANOCHAT_MAMBA_IMPL", "triton")
    with pytest.raises(RuntimeError, match=r"impl=triton .*unavailable here \(RuntimeError: no CUDA \(test\)\)"):
        tiny_mamba(torch.float32)
    monkeypatch.delenv("NANOCHAT_MAMBA_IMPL")
    with pytest.raises(RuntimeError, match="impl=triton"):
        tiny_mamba(torch.float32, impl="triton")
    with pytest.raises(ValueError, match="impl='cuda': expected one of auto, torch, triton"):
        tiny_mamba(torch.float32, impl="cuda")
    monkeypatch.setenv("NANOCHAT_MAMBA_IMPL", "cuda")
    with pytest.raises(ValueError, match="NANOCHAT_MAMBA_IMPL='cuda'"):
        tiny_mamba(torch.float32)
    monkeypatch.delenv("NANOCHAT_MAMBA_IMPL")
    auto = tiny_mamba(torch.float32)
    assert (auto.impl, auto.impl_requested) == ("torch", "auto")
    assert auto.describe().startswith("torch scan (mamba-ssm's Triton kernels unavailable: RuntimeError: no CUDA")
    assert "scan op under torch.compile" in auto.describe()
    # the GPT prints the choice once per build
    from nanochat.gpt import GPT, GPTConfig
    capsys.readouterr()
    GPT(GPTConfig(n_layer=3, n_embd=32, n_head=2, n_kv_head=2, vocab_size=11, block_pattern="MTM", mamba_d_state=8,
                  mamba_headdim=8), mamba_impl="torch")
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("mamba:")]
    assert lines == ["mamba: torch scan (asked for), scan op under torch.compile, torch-scan recompute in backward on CUDA"]


def test_triton_layer_refuses_cpu_tensors(monkeypatch):
    # a layer built for the Triton kernels (here: pretending they load) takes CUDA tensors; asked for explicitly, a
    # CPU or float64 tensor is an error, while auto sends it to the torch scan (the kernels cannot take it)
    monkeypatch.setattr(mamba_mod, "triton_available", lambda: (True, ""))
    u = torch.randn(1, 6, 32)
    strict = tiny_mamba(torch.float32, impl="triton")
    with pytest.raises(RuntimeError, match="impl=triton needs CUDA tensors"):
        strict(u)
    with pytest.raises(RuntimeError, match="impl=triton needs CUDA tensors"):
        strict(u[:, :1], state=new_state(strict, 1))
    auto = tiny_mamba(torch.float32)
    assert auto.impl == "triton" and auto.describe().startswith("triton scan (mamba-ssm ")
    assert torch.equal(auto(u), tiny_mamba(torch.float32, impl="torch")(u))


def _oor_stand_ins(fail_fwd, fail_bwd):
    """mamba-ssm's (direct scan, decode step, op forward, op backward) replaced by torch-computing stand-ins that raise
    an exception called OutOfResources (what _try_triton checks) where asked; calls are counted."""
    OutOfResources = type("OutOfResources", (Exception,), {})
    calls = {"scan": 0, "fwd": 0, "bwd": 0}
    msg = "out of resource: shared memory, Required: 279552, Hardware limit: 232448"

    def scan(x, dt_raw, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None, dt_softplus=True,
             return_final_states=False, dt_limit=(0.0, math.inf)):
        calls["scan"] += 1
        raise OutOfResources(msg)

    def fwd(x, dt_raw, A, B, C, chunk_size, D=None, dt_bias=None, dt_softplus=True, dt_limit=(0.0, math.inf)):
        calls["fwd"] += 1
        if fail_fwd:
            raise OutOfResources(msg)
        out = _discretized_scan(x, dt_raw, A, B, C, D, dt_bias, dt_limit, chunk_size, None)[0]
        return out, None, None, None, None, None

    def bwd(dout, x, dt_raw, A, B, C, out, chunk_size, D=None, dt_bias=None, dt_softplus=True, dt_limit=(0.0, math.inf)):
        calls["bwd"] += 1
        raise OutOfResources(msg) if fail_bwd else AssertionError("the stand-in backward only fails")

    return (scan, None, fwd, bwd), calls


def test_triton_scan_out_of_resources_falls_back_to_torch(monkeypatch):
    # mamba-ssm's autotuned scan can pick a config that needs more shared memory than the GPU has (seen on an
    # H200, nanochat/mamba.py): that call and later ones of the same dtypes/sizes run the torch scan instead,
    # with one warning; any other error from the kernel still propagates
    ops, calls = _oor_stand_ins(fail_fwd=True, fail_bwd=True)
    monkeypatch.setattr(mamba_mod, "_load_triton_ops", lambda: ops)
    monkeypatch.setattr(mamba_mod, "_TRITON_SCAN_FAILED", {})
    x, dt, A, B, C, D, h0 = random_scan_inputs(2, 19, 4, 3, 2, 5)
    dt_raw, dt_bias = torch.log(torch.expm1(dt)) - 0.1, torch.full((4,), 0.1, dtype=F64)
    ref = _discretized_scan(x, dt_raw, A, B, C, D, dt_bias, (0.0, math.inf), 8, h0)
    with pytest.warns(UserWarning, match="could not launch.*use the torch scan"):
        y, state = mamba_mod._scan(x, dt_raw, A, B, C, D, dt_bias, (0.0, math.inf), 8, h0, triton=True)
    assert max_err(y, ref[0]) == 0 and max_err(state, ref[1]) == 0 and calls["scan"] == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning, and the kernel is not tried again for this key
        y2, _ = mamba_mod._scan(x, dt_raw, A, B, C, D, dt_bias, (0.0, math.inf), 8, h0, triton=True)
    assert max_err(y2, ref[0]) == 0 and calls["scan"] == 1
    # another dtype mix is a new key: tried again
    with pytest.warns(UserWarning):
        mamba_mod._scan(x, dt_raw, A, B, C, D, dt_bias, (0.0, math.inf), 8, None, triton=True)
    assert calls["scan"] == 2

    def broken(*args, **kwargs):
        raise RuntimeError("a real bug")
    monkeypatch.setattr(mamba_mod, "_load_triton_ops", lambda: (broken, None, broken, broken))
    with pytest.raises(RuntimeError, match="a real bug"):
        mamba_mod._scan(x.float(), dt_raw.float(), A.float(), B.float(), C.float(), D.float(), dt_bias.float(),
                        (0.0, math.inf), 8, None, triton=True)
    with pytest.raises(RuntimeError, match="a real bug"):
        ssd_scan_op(x.float(), dt_raw.float(), A.float(), B.float(), C.float(), D.float(), dt_bias.float(), 0.0,
                    math.inf, 8, True)


@pytest.mark.parametrize("fail_fwd", [True, False])
def test_scan_op_out_of_resources_falls_back_under_compile(monkeypatch, fail_fwd):
    # the custom-op path (what torch.compile runs) falls back too, and its forward and backward switch together:
    # fail_fwd: the op's forward cannot launch -> torch forward, and the backward of that call and every later call
    # of the key are torch too (the Triton backward is never tried); else the forward launches and the backward
    # cannot -> torch backward, and from then on the forward of that key is torch as well
    ops, calls = _oor_stand_ins(fail_fwd=fail_fwd, fail_bwd=True)
    monkeypatch.setattr(mamba_mod, "_load_triton_ops", lambda: ops)
    monkeypatch.setattr(mamba_mod, "_TRITON_SCAN_FAILED", {})
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = TinyNet()
    u = torch.randn(2, 19, 32)
    y_eager = net(u)  # the torch path, eager (the layer's impl is torch on this machine)
    y_eager.square().sum().backward()
    grads_eager = {k: p.grad.clone() for k, p in net.named_parameters()}
    net.zero_grad(set_to_none=True)
    # now the layer takes the Triton branch for its CPU tensors (stand-in kernels above)
    monkeypatch.setattr(Mamba2, "_use_triton", lambda self, dtype, device: True)
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")  # fullgraph: the scan is the op in the graph
    with pytest.warns(UserWarning, match=f"custom op {'forward' if fail_fwd else 'backward'}.*could not launch"):
        y = compiled(u)
        y.square().sum().backward()
    assert calls == {"scan": 0, "fwd": 1, "bwd": 0 if fail_fwd else 1}
    assert max_err(y, y_eager) <= 1e-6
    for k, p in net.named_parameters():
        assert max_err(p.grad, grads_eager[k]) <= 1e-5 * max(1.0, grads_eager[k].abs().max().item()), k
    net.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the key is known now: no new warning, no Triton call, same numbers
        y = compiled(u)
        y.square().sum().backward()
    assert calls == {"scan": 0, "fwd": 1, "bwd": 0 if fail_fwd else 1}
    assert max_err(y, y_eager) <= 1e-6


# -----------------------------------------------------------------------------
# torch.compile


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.mixer = Mamba2(d_model=32, d_state=8, headdim=8, chunk_size=8)
        self.head = nn.Linear(32, 5)

    def forward(self, u):
        return self.head(u + self.mixer(torch.nn.functional.rms_norm(u, (32,))))


# -----------------------------------------------------------------------------
# the scan as a custom op (what torch.compile sees)


@pytest.mark.parametrize("l,Q,dt_limit", [(37, 8, (0.0, math.inf)), (64, 16, (0.05, 0.4)), (5, 16, (0.0, math.inf))])
def test_scan_op_matches_direct_scan_and_grads(l, Q, dt_limit):
    # the op (forward and its registered backward: torch.func.vjp of the chunked scan) against autograd through
    # the chunked scan itself, float64
    x, dt, A, B, C, D, _ = random_scan_inputs(2, l, 4, 3, 2, 5)
    dt_raw = torch.log(torch.expm1(dt)) - 0.1  # so that softplus(dt_raw + dt_bias) is the sampled dt
    dt_bias = torch.full((4,), 0.1, dtype=F64)
    ins = [t.clone().requires_grad_(True) for t in (x, dt_raw, A, B, C, D, dt_bias)]
    ref_ins = [t.clone().requires_grad_(True) for t in (x, dt_raw, A, B, C, D, dt_bias)]
    y = ssd_scan_op(*ins, float(dt_limit[0]), float(dt_limit[1]), Q)
    y_ref = _discretized_scan(*ref_ins, dt_limit, Q, None)[0]
    assert y.is_contiguous() and y.dtype == x.dtype
    assert max_err(y, y_ref) <= 1e-12
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    (y * w).sum().backward()
    (y_ref * w).sum().backward()
    for name, a, b in zip(["x", "dt_raw", "A", "B", "C", "D", "dt_bias"], ins, ref_ins):
        assert a.grad is not None and max_err(a.grad, b.grad) <= 1e-10 * max(1.0, b.grad.abs().max().item()), name


def test_scan_op_opcheck():
    # torch.library's own consistency checks: schema, fake (meta) kernel vs real output, autograd registration,
    # and AOT dispatch (what torch.compile runs)
    x, dt, A, B, C, D, _ = random_scan_inputs(1, 20, 2, 4, 1, 3, dtype=torch.float32)
    args = (x.requires_grad_(), dt.requires_grad_(), A.requires_grad_(), B, C, D.requires_grad_(),
            torch.zeros(2, requires_grad=True), 0.0, math.inf, 8)
    torch.library.opcheck(ssd_scan_op, args)


def test_scan_op_option(monkeypatch):
    torch.manual_seed(0)
    m = Mamba2(d_model=16, d_state=4, headdim=8, chunk_size=8)
    u = torch.randn(2, 11, 16)
    y0 = m(u)
    assert max_err(m.configure(scan_op="1")(u), y0) <= 1e-6  # eager through the op: same numbers
    with pytest.raises(ValueError, match="scan_op='yes'"):
        m.configure(scan_op="yes")
    monkeypatch.setenv("NANOCHAT_MAMBA_SCAN_OP", "1")  # the default, read at build time
    assert Mamba2(d_model=16, d_state=4, headdim=8).scan_op == "1"
    monkeypatch.setenv("NANOCHAT_MAMBA_SCAN_OP", "yes")
    with pytest.raises(ValueError, match="NANOCHAT_MAMBA_SCAN_OP='yes'"):
        Mamba2(d_model=16, d_state=4, headdim=8)


@pytest.mark.slow
@pytest.mark.parametrize("scan_op,fullgraph", [("auto", True), ("0", False)])
def test_torch_compile_matches_eager(monkeypatch, scan_op, fullgraph):
    # auto: the scan is a custom op, so the layer compiles as one graph (fullgraph=True raises on any graph break,
    # and does with scan_op=0); 0: the compiler.disable'd scan, a graph break, must still be right
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = TinyNet()
    net.mixer.configure(scan_op=scan_op)
    u = torch.randn(2, 19, 32)
    y_eager = net(u)
    y_eager.square().sum().backward()
    grads_eager = {k: p.grad.clone() for k, p in net.named_parameters()}
    net.zero_grad(set_to_none=True)
    compiled = torch.compile(net, fullgraph=fullgraph)
    y_comp = compiled(u)
    y_comp.square().sum().backward()
    assert max_err(y_comp, y_eager) <= 1e-5
    for k, p in net.named_parameters():
        assert max_err(p.grad, grads_eager[k]) <= 1e-5 * max(1.0, grads_eager[k].abs().max().item()), k


# -----------------------------------------------------------------------------
# FLOPs


def test_flops_formula_against_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode
    b, l, Q, n, g, headdim, d_model, expand = 2, 64, 16, 8, 2, 4, 16, 2
    h = expand * d_model // headdim
    x, dt, A, B, C, D, _ = random_scan_inputs(b, l, h, headdim, g, n, dtype=torch.float32)
    with FlopCounterMode(display=False) as counter:
        ssd_chunked(x, dt, A, B, C, Q, D=D)
    counted = counter.get_total_flops()
    nc = l // Q
    state_passing = 2 * b * h * (nc + 1) * (nc + 1) * headdim * n  # the O(nchunks) term the formula leaves out
    formula = mamba_flops_per_token(d_model, n, expand, headdim, g, Q)
    assert counted == b * l * formula + state_passing
    # the documented closed form at a d12-like shape
    assert mamba_flops_per_token(768, 128, 2, 64, 1, 256) == 2 * (256 * 128 + 256 * 1536 + 2 * 1536 * 128)
