"""
Our own Mamba2 mixer (Dao & Gu 2024, "Transformers are SSMs: Generalized Models and Efficient Algorithms
Through Structured State Space Duality", arXiv:2405.21060), used by the "M" blocks of nanochat/gpt.py.

Parameter names and shapes equal mamba_ssm.modules.mamba2.Mamba2's defaults (rmsnorm=True,
norm_before_gate=False, conv_bias=True, bias=False, D_has_hdim=False), so state dicts move both ways:
    in_proj.weight (2*d_inner + 2*ngroups*d_state + nheads, d_model)   split as [z, x, B, C, dt]
    conv1d.weight (conv_dim, 1, d_conv), conv1d.bias (conv_dim,)        conv_dim = d_inner + 2*ngroups*d_state
    dt_bias, A_log, D (nheads,), norm.weight (d_inner,), out_proj.weight (d_model, d_inner)

Two implementations of the scan, same weights, chosen once when the layer is built (Mamba2(impl=...), default
from NANOCHAT_MAMBA_IMPL=auto|torch|triton, read at build time only; GPT prints the choice once):
  - torch: pure PyTorch, CPU and GPU. ssd_chunked() is the SSD block decomposition; ssd_sequential() is the
    plain recurrence, kept as the reference the tests compare against.
  - triton: mamba-ssm's Triton kernels (mamba_chunk_scan_combined for training/prefill, selective_state_update
    for decode), imported without running mamba_ssm/__init__.py (which imports a CUDA extension unguarded): bare
    package modules are registered for mamba_ssm, mamba_ssm.ops, mamba_ssm.ops.triton and mamba_ssm.utils, so a
    later `import mamba_ssm.modules.mamba2` works too, but `mamba_ssm.Mamba2` (from the real __init__) does not.
    Asking for it where the kernels cannot load (no CUDA, no mamba-ssm) is an error at build time.
  auto = triton when the kernels load, used for CUDA tensors that are not float64 (the torch scan takes the rest).
Under torch.compile the training scan is a custom op (nanochat::ssd_scan; scan_op=auto|0|1, default from
NANOCHAT_MAMBA_SCAN_OP), so the graph does not break at M layers; prefill with states and the decode step run
outside the graph (torch.compiler.disable). The depthwise conv takes a shifted-sum form there that Inductor fuses
(causal_conv_silu). A Triton launch that fails with OutOfResources falls back to the torch scan, on both paths.

Usage:
    from nanochat.mamba import Mamba2
    m = Mamba2(d_model=768)                    # impl="auto" (or torch / triton), scan_op, recompute: see configure()
    print(m.describe())                        # how its scan runs: implementation, custom op, recompute
    y = m(u)                                   # (B, T, d_model) -> (B, T, d_model), training / full sequence
    conv_state, ssm_state = m.allocate_inference_state(B, device)
    st = types.SimpleNamespace(conv_state=conv_state, ssm_state=ssm_state)
    y = m(prompt, state=st)                    # prefill: the states are updated in place
    y = m(next_token, state=st)                # decode, O(1) per token
"""

import os
import sys
import math
import warnings
import types
import importlib
import importlib.util
import importlib.metadata

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# -----------------------------------------------------------------------------
# The SSD scan in PyTorch
#
# Notation (mamba-ssm's): x (b, l, h, p) inputs per head, dt (b, l, h) step sizes (already softplus'ed),
# A (h,) negative decay rates, B and C (b, l, g, n) with the h heads split into g groups of h//g heads
# that share B and C. The recurrence, per head, with state (p, n):
#     h_t = exp(dt_t * A) * h_{t-1} + dt_t * x_t B_t^T,        y_t = h_t C_t + D * x_t


def _compute_dtype(dtype):
    # float64 stays float64 (tests); everything else (bf16, fp16, fp32) is computed in float32
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_scan_inputs(x, dt, A, B, C, D, initial_state):
    if x.dim() != 4:
        raise ValueError(f"ssd: x must be (batch, seqlen, nheads, headdim), got shape {tuple(x.shape)}")
    b, l, h, p = x.shape
    if B.dim() != 4 or B.shape[:2] != (b, l) or C.shape != B.shape:
        raise ValueError(f"ssd: B and C must be (batch={b}, seqlen={l}, ngroups, d_state), got {tuple(B.shape)} and {tuple(C.shape)}")
    g, n = B.shape[2], B.shape[3]
    if h % g != 0:
        raise ValueError(f"ssd: nheads={h} is not divisible by ngroups={g}")
    if dt.shape != (b, l, h):
        raise ValueError(f"ssd: dt must be (batch, seqlen, nheads) = {(b, l, h)}, got {tuple(dt.shape)}")
    if A.shape != (h,):
        raise ValueError(f"ssd: A must be (nheads,) = ({h},), got {tuple(A.shape)}")
    if D is not None and D.shape != (h,):
        raise ValueError(f"ssd: D must be (nheads,) = ({h},), got {tuple(D.shape)}")
    if initial_state is not None and initial_state.shape != (b, h, p, n):
        raise ValueError(f"ssd: initial_state must be (batch, nheads, headdim, d_state) = {(b, h, p, n)}, got {tuple(initial_state.shape)}")
    return b, l, h, p, g, n


def ssd_sequential(x, dt, A, B, C, D=None, initial_state=None):
    """
    The SSM recurrence one time step at a time: the slow, obviously-correct reference for ssd_chunked.
    Same arguments and returns as ssd_chunked (chunk_size is meaningless here).
    """
    b, l, h, p, g, n = _check_scan_inputs(x, dt, A, B, C, D, initial_state)
    with torch.autocast(device_type=x.device.type, enabled=False):
        return _ssd_sequential(x, dt, A, B, C, D, initial_state, b, l, h, p, g, n)


def _ssd_sequential(x, dt, A, B, C, D, initial_state, b, l, h, p, g, n):
    cdt = _compute_dtype(x.dtype)
    xf, dtf, Af = x.to(cdt), dt.to(cdt), A.to(cdt)
    # each head reads its group's B and C: head i belongs to group i // (h // g)
    Bh = B.to(cdt).repeat_interleave(h // g, dim=2)  # (b, l, h, n)
    Ch = C.to(cdt).repeat_interleave(h // g, dim=2)
    state = torch.zeros(b, h, p, n, dtype=cdt, device=x.device) if initial_state is None else initial_state.to(cdt)
    ys = []
    for t in range(l):
        dA = torch.exp(dtf[:, t] * Af)  # (b, h)
        dBx = (dtf[:, t, :, None] * xf[:, t])[..., None] * Bh[:, t, :, None, :]  # (b, h, p, n)
        state = state * dA[:, :, None, None] + dBx
        y = (state * Ch[:, t, :, None, :]).sum(-1)  # (b, h, p)
        if D is not None:
            y = y + D.to(cdt)[:, None] * xf[:, t]
        ys.append(y)
    y = torch.stack(ys, dim=1) if ys else xf.new_zeros(b, 0, h, p)
    return y.to(x.dtype), state


def _segsum(a):
    """
    a (..., T) -> (..., T, T) with out[..., i, j] = a[j+1] + ... + a[i] for i >= j (0 on the diagonal) and -inf
    above it, so exp(out) is the causal decay matrix. Each entry is a masked cumulative sum of only the terms
    it needs: no difference of two long cumsums (which loses precision when the cumsum is large) and nothing
    positive ever reaches exp (the upper triangle is -inf before the exp, not masked after it).
    """
    T = a.size(-1)
    strictly_lower = torch.ones(T, T, dtype=torch.bool, device=a.device).tril(-1)
    lower = torch.ones(T, T, dtype=torch.bool, device=a.device).tril(0)
    rep = a.unsqueeze(-1).expand(*a.shape, T)  # rep[..., i, j] = a[i]
    out = torch.cumsum(rep.masked_fill(~strictly_lower, 0.0), dim=-2)  # sum over j < k <= i
    return out.masked_fill(~lower, float("-inf"))


def ssd_chunked(x, dt, A, B, C, chunk_size, D=None, initial_state=None):
    """
    Chunked SSD scan (the block decomposition of the paper's section 6, "SSD algorithm").

    x: (b, l, h, p); dt: (b, l, h) already discretised (softplus(dt + dt_bias), clamped); A: (h,) negative;
    B, C: (b, l, g, n); D: (h,) or None; initial_state: (b, h, p, n) or None (zeros).
    Returns y (b, l, h, p) in x's dtype and final_state (b, h, p, n) in the compute dtype: float32, or float64
    when x is float64. Any l works: the last partial chunk is padded with dt = 0, which is exactly neutral
    (decay exp(0) = 1 and zero input), so the padding changes neither y nor the final state.

    Per chunk of Q steps (a = dt*A, the log-decay per step):
      1. diagonal blocks: y_i += sum_{j<=i} (C_i.B_j) exp(a_{j+1}+...+a_i) dt_j x_j     (quadratic, "attention-like")
      2. chunk states:    s_c = sum_j exp(a_{j+1}+...+a_{Q-1}) dt_j x_j B_j^T          (state at chunk end from zero)
      3. state passing:   h_c = exp(a_0+...+a_{Q-1}) h_{c-1} + s_c, all chunks at once through a segsum matrix
      4. off-diagonal:    y_i += exp(a_0+...+a_i) C_i h_{c-1}                           (state entering the chunk)
    """
    b, l, h, p, g, n = _check_scan_inputs(x, dt, A, B, C, D, initial_state)
    if int(chunk_size) < 1:
        raise ValueError(f"ssd_chunked: chunk_size must be >= 1, got {chunk_size}")
    with torch.autocast(device_type=x.device.type, enabled=False):  # the matmuls below must stay in fp32/fp64
        return _ssd_chunked(x, dt, A, B, C, int(chunk_size), D, initial_state, b, l, h, p, g, n)


def _ssd_chunked(x, dt, A, B, C, Q, D, initial_state, b, l, h, p, g, n):
    cdt = _compute_dtype(x.dtype)
    r = h // g  # heads per group
    nc = max(1, math.ceil(l / Q))
    pad = nc * Q - l
    xf, dtf, Bf, Cf = x.to(cdt), dt.to(cdt), B.to(cdt), C.to(cdt)
    if pad:
        xf = F.pad(xf, (0, 0, 0, 0, 0, pad))
        dtf = F.pad(dtf, (0, 0, 0, pad))
        Bf = F.pad(Bf, (0, 0, 0, 0, 0, pad))
        Cf = F.pad(Cf, (0, 0, 0, 0, 0, pad))
    # layout: (batch, chunk, group, head-in-group, position, feature), so every step below is a batched matmul
    xc = xf.reshape(b, nc, Q, g, r, p).permute(0, 1, 3, 4, 2, 5)  # (b, c, g, r, Q, p)
    dtc = dtf.reshape(b, nc, Q, g, r).permute(0, 1, 3, 4, 2)  # (b, c, g, r, Q)
    Bc = Bf.reshape(b, nc, Q, g, n).permute(0, 1, 3, 2, 4).unsqueeze(3)  # (b, c, g, 1, Q, n)
    Cc = Cf.reshape(b, nc, Q, g, n).permute(0, 1, 3, 2, 4).unsqueeze(3)  # (b, c, g, 1, Q, n)
    a = dtc * A.to(cdt).view(g, r, 1)  # (b, c, g, r, Q), <= 0
    a_cumsum = torch.cumsum(a, dim=-1)  # a_0 + ... + a_i, within each chunk
    seg = _segsum(a)  # (b, c, g, r, Q, Q)

    # 1. diagonal blocks
    CB = Cc @ Bc.transpose(-1, -2)  # (b, c, g, 1, Q, Q)
    scores = CB * torch.exp(seg) * dtc.unsqueeze(-2)  # weight of input j in output i
    y = scores @ xc  # (b, c, g, r, Q, p)

    # 2. chunk states (the last row of seg is the decay from each position to the end of the chunk)
    w = torch.exp(seg[..., -1, :]) * dtc  # (b, c, g, r, Q)
    states = (xc * w.unsqueeze(-1)).transpose(-1, -2) @ Bc  # (b, c, g, r, p, n)

    # 3. state passing between chunks: index 0 holds the initial state, index c+1 the state of chunk c
    if initial_state is None:
        h0 = states.new_zeros(b, 1, g, r, p, n)
    else:
        h0 = initial_state.to(cdt).reshape(b, 1, g, r, p, n)
    S = torch.cat([h0, states], dim=1)  # (b, c+1, g, r, p, n)
    chunk_decay = F.pad(a_cumsum[..., -1].permute(0, 2, 3, 1), (1, 0))  # (b, g, r, c+1) total log-decay per chunk
    decay = torch.exp(_segsum(chunk_decay))  # (b, g, r, c+1, c+1)
    new_states = torch.einsum("bgrzc,bcgrpn->bzgrpn", decay, S)
    prev_states = new_states[:, :-1]  # state entering each chunk
    final_state = new_states[:, -1].reshape(b, h, p, n)

    # 4. off-diagonal blocks: contribution of the state entering the chunk
    y = y + (Cc @ prev_states.transpose(-1, -2)) * torch.exp(a_cumsum).unsqueeze(-1)

    y = y.permute(0, 1, 4, 2, 3, 5).reshape(b, nc * Q, h, p)[:, :l]
    if D is not None:
        y = y + xf[:, :l] * D.to(cdt)[:, None]
    return y.to(x.dtype), final_state


def mamba_flops_per_token(d_model, d_state=128, expand=2, headdim=64, ngroups=1, chunk_size=256):
    """
    Forward matmul FLOPs per token of the chunked SSD scan itself (2 FLOPs per multiply-add), excluding
    in_proj/out_proj (normal weight matmuls, counted by the caller from parameter counts) and elementwise work
    (conv, gating, norm, exp, the O(nchunks) state passing). With Q = chunk_size, N = d_state, G = ngroups,
    E = expand*d_model (= nheads*headdim, so headdim itself drops out):
        C.B^T scores inside a chunk   Q*N*G       (per chunk Q*Q*N per group, over Q tokens)
        scores @ x inside a chunk     Q*E         (per chunk Q*Q*headdim per head)
        chunk states x^T B            E*N
        state -> output C h           E*N
        total = 2 * (Q*N*G + Q*E + 2*E*N)
    The Q x Q blocks are counted in full, though only their causal half is useful (as nanochat counts attention).
    Multiply by 3 for forward + backward.
    """
    d_inner = expand * d_model
    if d_inner % headdim != 0:
        raise ValueError(f"expand*d_model = {d_inner} is not divisible by headdim {headdim}")
    Q, N, G, E = chunk_size, d_state, ngroups, d_inner
    return 2 * (Q * N * G + Q * E + 2 * E * N)


# -----------------------------------------------------------------------------
# mamba-ssm's Triton kernels, imported without executing mamba_ssm/__init__.py

_TRITON_OPS = None  # (mamba_chunk_scan_combined, selective_state_update, its forward, its backward) once loaded
_TRITON_ERROR = None  # why they could not be loaded


def _load_triton_ops():
    """Returns (mamba_chunk_scan_combined, selective_state_update, _mamba_chunk_scan_combined_fwd,
    _mamba_chunk_scan_combined_bwd) or None; on failure the reason is kept."""
    global _TRITON_OPS, _TRITON_ERROR
    if _TRITON_OPS is not None or _TRITON_ERROR is not None:
        return _TRITON_OPS
    try:
        if not torch.cuda.is_available():
            raise RuntimeError("torch.cuda.is_available() is False")
        importlib.import_module("triton")
        if "mamba_ssm" not in sys.modules:
            # find_spec of a top-level name locates the package without importing it. We then register bare
            # package modules so that importing the Triton submodules never runs the package __init__s
            # (mamba_ssm/__init__.py imports selective_scan_cuda, a CUDA extension that may not be built).
            spec = importlib.util.find_spec("mamba_ssm")
            if spec is None or not spec.submodule_search_locations:
                raise ImportError("the mamba_ssm package is not installed (pip install mamba-ssm, or put its source on PYTHONPATH)")
            pkgdir = list(spec.submodule_search_locations)[0]
            for sub in ["", "ops", "ops/triton", "utils"]:
                name = "mamba_ssm" + ("." + sub.replace("/", ".") if sub else "")
                if name not in sys.modules:
                    mod = types.ModuleType(name)
                    mod.__path__ = [os.path.join(pkgdir, sub) if sub else pkgdir]
                    sys.modules[name] = mod
        ssd_combined = importlib.import_module("mamba_ssm.ops.triton.ssd_combined")
        ssu = importlib.import_module("mamba_ssm.ops.triton.selective_state_update")
        _TRITON_OPS = (ssd_combined.mamba_chunk_scan_combined, ssu.selective_state_update,
                       ssd_combined._mamba_chunk_scan_combined_fwd, ssd_combined._mamba_chunk_scan_combined_bwd)
    except Exception as e:  # any failure just means "no Triton path"; keep the reason for the error message
        _TRITON_ERROR = f"{type(e).__name__}: {e}"
    return _TRITON_OPS


def triton_available():
    """(ok, reason): whether mamba-ssm's Triton kernels can be used here, and why not."""
    ok = _load_triton_ops() is not None
    return ok, ("" if ok else _TRITON_ERROR)


IMPLS = ("auto", "torch", "triton")
MODES = ("auto", "0", "1")


def _choice(value, allowed, env_var, what):
    """A build-time option: value if given, else the environment variable (read here, once per build), else auto."""
    where = what
    if value is None:
        value, where = os.environ.get(env_var, "auto"), env_var
    value = str(value).strip().lower() or "auto"
    if value not in allowed:
        raise ValueError(f"{where}={value!r}: expected one of {', '.join(allowed)}")
    return value


def resolve_impl(impl=None):
    """
    The scan implementation a layer built with impl=auto|torch|triton (None: NANOCHAT_MAMBA_IMPL, default auto)
    uses: "torch" or "triton". auto takes triton when mamba-ssm's kernels load here, else torch; an explicit
    triton that cannot be honoured (no CUDA, no mamba-ssm, no triton) raises RuntimeError saying why.
    """
    impl = _choice(impl, IMPLS, "NANOCHAT_MAMBA_IMPL", "impl")
    if impl == "torch":
        return "torch"
    ok, reason = triton_available()
    if impl == "triton" and not ok:
        raise RuntimeError(f"Mamba2: impl=triton (NANOCHAT_MAMBA_IMPL or the impl argument) was asked for, but "
                           f"mamba-ssm's Triton kernels are unavailable here ({reason}). Use impl=torch or auto.")
    return "triton" if ok else "torch"


def _mamba_ssm_version():
    try:
        return importlib.metadata.version("mamba-ssm")
    except importlib.metadata.PackageNotFoundError:  # a source checkout on PYTHONPATH has no metadata
        return "source"


# -----------------------------------------------------------------------------
# dispatch: Inductor never traces the scan or the decode step (it crashed compiling the cumsum-based chunked SSD
# on an H100 with torch 2.11; the Triton call is opaque to it anyway). Prefill with states, the decode step and,
# with scan_op=0, the training scan run under compiler.disable; otherwise the state-free training scan is the
# custom op further down. The projections, conv and norm around them still compile. Which path a call takes is
# the layer's build-time choice (Mamba2.impl), passed down as the `triton` flag: nothing here reads the environment.


# Calls the Triton scan could not launch, by (dtypes, sizes, chunk): they go to the torch path from then on.
# Why: mamba-ssm's kernels are autotuned on sizes only (ssd_chunk_scan.py: key=['chunk_size', 'hdim', 'dstate',
# 'IS_CAUSAL']), so a process reuses the config its first call picked, whatever the dtypes of later calls. On an
# H200 (2026-12-03) rag_eval stopped 27 s in with "OutOfResources: shared memory, Required: 279552, Hardware
# limit: 232448" in _chunk_scan_fwd_kernel; the same checkpoint and questions had passed in an earlier process.
# So the config the timing race picks on the first call need not fit a later one (other dtypes, or a prompt
# length that Triton specializes differently: it compiles per argument alignment). The key below leaves the
# sequence length out on purpose: after one failure every call of those dtypes and sizes takes the torch scan,
# which computes the same thing (tests, and benchmarks/check_mamba_triton.py), slower. The direct call (_scan),
# the custom op's forward and its backward share the keys: a failure in any of them moves all three to torch, so
# an op's forward and backward never mix the two paths after the failure.
_TRITON_SCAN_FAILED = {}


def _triton_key(x, B, initial_state, chunk_size):
    return (x.dtype, B.dtype, None if initial_state is None else initial_state.dtype, tuple(x.shape[-2:]),
            tuple(B.shape[-2:]), chunk_size)


def _try_triton(key, launch, what):
    """launch() unless `key` failed before; None (and the key recorded, one warning) on OutOfResources."""
    if key in _TRITON_SCAN_FAILED:
        return None
    try:
        return launch()
    except Exception as e:
        if type(e).__name__ != "OutOfResources":  # triton.runtime.errors.OutOfResources; triton may be absent
            raise
        _TRITON_SCAN_FAILED[key] = str(e)
        warnings.warn(f"mamba-ssm's Triton chunk scan ({what}) could not launch for (x, B, initial state dtypes, "
                      f"x/B trailing sizes, chunk) = {key}: {e}. This call and later ones like it use the "
                      f"torch scan (same result, slower).")
        return None


@torch.compiler.disable
def _scan(x, dt_raw, A, B, C, D, dt_bias, dt_limit, chunk_size, initial_state=None, triton=False, recompute="auto"):
    """(y, final_state) of the chunked scan; dt_raw is in_proj's dt before softplus(dt + dt_bias).
    triton: use mamba-ssm's kernel (the layer decided); recompute: the torch scan's auto|0|1 (see _recompute_scan)."""
    if triton:
        out = _try_triton(_triton_key(x, B, initial_state, chunk_size),
                          lambda: _triton_scan(x, dt_raw, A, B, C, D, dt_bias, dt_limit, chunk_size, initial_state),
                          "direct call")
        if out is not None:
            return out
    return _torch_scan(x, dt_raw, A, B, C, D, dt_bias, dt_limit, chunk_size, initial_state, recompute)


def _triton_scan(x, dt_raw, A, B, C, D, dt_bias, dt_limit, chunk_size, initial_state):
    mamba_chunk_scan_combined = _load_triton_ops()[0]
    kwargs = {} if tuple(dt_limit) == (0.0, float("inf")) else dict(dt_limit=tuple(dt_limit))
    out = mamba_chunk_scan_combined(x, dt_raw, A, B, C, chunk_size, D=D, z=None, dt_bias=dt_bias,
                                    initial_states=initial_state, dt_softplus=True,
                                    return_final_states=initial_state is not None, **kwargs)
    return out if initial_state is not None else (out, None)


def _torch_scan(x, dt_raw, A, B, C, D, dt_bias, dt_limit, chunk_size, initial_state, recompute="auto"):
    if _recompute_scan(x, recompute):
        # the chunk matrices (several (Q, Q) per head and chunk, fp32) dominate training memory: keep only the
        # scan's inputs and recompute the rest in backward (measured: the torch path OOMed at batch 16 x 2048 on
        # an 80 GB H100 without this, benchmarks/RESULTS.md)
        return checkpoint(_discretized_scan, x, dt_raw, A, B, C, D, dt_bias, tuple(dt_limit), chunk_size,
                          initial_state, use_reentrant=False)
    return _discretized_scan(x, dt_raw, A, B, C, D, dt_bias, dt_limit, chunk_size, initial_state)


def _discretized_scan(x, dt_raw, A, B, C, D, dt_bias, dt_limit, chunk_size, initial_state):
    dt = _discretize_dt(dt_raw, dt_bias, dt_limit, _compute_dtype(x.dtype))
    return ssd_chunked(x, dt, A, B, C, chunk_size, D=D, initial_state=initial_state)


def _recompute_scan(x, mode):
    """recompute=auto|0|1 (the layer's, default NANOCHAT_MAMBA_RECOMPUTE): recompute the torch scan's
    intermediates in backward instead of storing them. auto = on for CUDA tensors (where memory binds), off on
    CPU. Only when gradients flow."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return False
    return mode == "1" or (mode == "auto" and x.is_cuda)


# -----------------------------------------------------------------------------
# The training scan as a custom op (nanochat::ssd_scan and its backward nanochat::ssd_scan_bwd). torch.compile
# treats a custom op as one opaque node with a known output shape, so the compiled graph runs through every M
# layer instead of breaking at each compiler.disable'd call (measured on an H200 in one run, d12 at seq 2048: the
# compiled 1-in-4 hybrid trains at 0.96x all-T's tokens/s this way, 0.67x with the breaks; benchmarks/RESULTS.md).
# The forward keeps only the scan's inputs and output; the backward recomputes what it needs: mamba-ssm's own
# backward on the Triton path, and on the torch path a torch.func.vjp of the chunked scan (autograd proper is
# switched off inside an op's implementation). Only the state-free (training) call goes through it; prefill with
# states keeps _scan. `triton` is the layer's choice; an OutOfResources in either op sends that key (and so both
# ops) to the torch path from then on, the same way as the direct call.


@torch.library.custom_op("nanochat::ssd_scan", mutates_args=())
def ssd_scan_op(x: torch.Tensor, dt_raw: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                D: torch.Tensor, dt_bias: torch.Tensor, dt_min: float, dt_max: float, chunk_size: int,
                triton: bool = False) -> torch.Tensor:
    """y (b, l, h, p) in x's dtype, contiguous, of the state-free chunked scan (dt_raw before softplus(dt + dt_bias))."""
    out = None
    if triton:
        fwd = _load_triton_ops()[2]
        out = _try_triton(_triton_key(x, B, None, chunk_size),
                          lambda: fwd(x, dt_raw, A, B, C, chunk_size, D=D, dt_bias=dt_bias, dt_softplus=True,
                                      dt_limit=(dt_min, dt_max))[0],
                          "custom op forward")
    if out is None:
        out = _discretized_scan(x, dt_raw, A, B, C, D, dt_bias, (dt_min, dt_max), chunk_size, None)[0]
    return out.to(x.dtype).contiguous()


@ssd_scan_op.register_fake
def _ssd_scan_fake(x, dt_raw, A, B, C, D, dt_bias, dt_min, dt_max, chunk_size, triton=False):
    return x.new_empty(x.shape)


@torch.library.custom_op("nanochat::ssd_scan_bwd", mutates_args=())
def ssd_scan_bwd_op(dout: torch.Tensor, x: torch.Tensor, dt_raw: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                    C: torch.Tensor, D: torch.Tensor, dt_bias: torch.Tensor, out: torch.Tensor, dt_min: float,
                    dt_max: float, chunk_size: int, triton: bool = False) -> list[torch.Tensor]:
    """Gradients of ssd_scan_op's output with respect to (x, dt_raw, A, B, C, D, dt_bias), in their dtypes."""
    inputs = (x, dt_raw, A, B, C, D, dt_bias)
    grads = None
    if triton:
        bwd = _load_triton_ops()[3]
        res = _try_triton(_triton_key(x, B, None, chunk_size),
                          lambda: bwd(dout, x, dt_raw, A, B, C, out, chunk_size, D=D, dt_bias=dt_bias,
                                      dt_softplus=True, dt_limit=(dt_min, dt_max)),
                          "custom op backward")
        if res is not None:
            dx, ddt, dA, dB, dC, dD, _, ddt_bias, _ = res
            grads = (dx, ddt, dA, dB, dC, dD, ddt_bias)
    if grads is None:
        scan = lambda *t: _discretized_scan(*t, (dt_min, dt_max), chunk_size, None)[0]
        _, vjp = torch.func.vjp(scan, *inputs)
        grads = vjp(dout.to(out.dtype))
    return [g.to(t.dtype).contiguous() for g, t in zip(grads, inputs)]


@ssd_scan_bwd_op.register_fake
def _ssd_scan_bwd_fake(dout, x, dt_raw, A, B, C, D, dt_bias, out, dt_min, dt_max, chunk_size, triton=False):
    return [t.new_empty(t.shape) for t in (x, dt_raw, A, B, C, D, dt_bias)]


def _ssd_scan_setup_context(ctx, inputs, output):
    x, dt_raw, A, B, C, D, dt_bias, dt_min, dt_max, chunk_size, triton = inputs
    ctx.save_for_backward(x, dt_raw, A, B, C, D, dt_bias, output)
    ctx.args = (dt_min, dt_max, chunk_size, triton)


def _ssd_scan_backward(ctx, dout):
    grads = ssd_scan_bwd_op(dout.contiguous(), *ctx.saved_tensors, *ctx.args)
    return (*grads, None, None, None, None)


ssd_scan_op.register_autograd(_ssd_scan_backward, setup_context=_ssd_scan_setup_context)


@torch.compiler.disable
def _ssm_step(ssm_state, x, dt_raw, A, B, C, D, dt_bias, dt_limit, triton=False):
    """One recurrent step. x (b, h, p), dt_raw (b, h), B/C (b, g, n); updates ssm_state in place; y (b, h, p)."""
    b, h, p = x.shape
    g, n = B.shape[1], B.shape[2]
    if triton:
        selective_state_update = _load_triton_ops()[1]
        if tuple(dt_limit) == (0.0, float("inf")):
            dt, bias, softplus = dt_raw, dt_bias, True
        else:  # the decode kernel has no dt_limit: discretise here and hand it a zero bias
            dt, bias, softplus = _discretize_dt(dt_raw, dt_bias, dt_limit, torch.float32), torch.zeros_like(dt_bias, dtype=torch.float32), False
        # stride-0 expansions over headdim (and d_state for A) select the kernel's per-head fast path
        return selective_state_update(ssm_state, x, dt[..., None].expand(b, h, p), A[:, None, None].expand(h, p, n),
                                      B, C, D=D[:, None].expand(h, p), z=None, dt_bias=bias[:, None].expand(h, p),
                                      dt_softplus=softplus)
    sdt = ssm_state.dtype
    with torch.autocast(device_type=x.device.type, enabled=False):
        dt = _discretize_dt(dt_raw, dt_bias, dt_limit, sdt)  # (b, h)
        dA = torch.exp(dt * A.to(sdt))
        xs = x.to(sdt)
        Bh = B.to(sdt).repeat_interleave(h // g, dim=1)  # (b, h, n)
        Ch = C.to(sdt).repeat_interleave(h // g, dim=1)
        new_state = ssm_state * dA[:, :, None, None] + (dt[:, :, None] * xs)[..., None] * Bh[:, :, None, :]
        with torch.no_grad():
            ssm_state.copy_(new_state)
        y = (new_state @ Ch.unsqueeze(-1)).squeeze(-1) + D.to(sdt)[:, None] * xs
    return y.to(x.dtype)


def _discretize_dt(dt_raw, dt_bias, dt_limit, dtype):
    dt = F.softplus(dt_raw.to(dtype) + dt_bias.to(dtype))
    if tuple(dt_limit) != (0.0, float("inf")):
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    return dt


# -----------------------------------------------------------------------------
# the module


def causal_conv_silu(xBC, weight, bias, prefix=None, shifted=None):
    """
    SiLU(causal depthwise conv over time). xBC (B, T, C); weight (C, 1, K) and bias (C,) are nn.Conv1d's;
    prefix (B, C, K-1): the K-1 inputs before xBC (None = zeros, the start of a sequence). Returns (B, T, C).
    Two equal forms: F.conv1d (eager default, one kernel) and a sum of K shifted multiply-adds, the default under
    torch.compile, where Inductor fuses it with the padding and the SiLU into one elementwise kernel (ATen's
    depthwise conv forward+backward kernels were ~20% of the compiled layer's GPU time on an H100).
    """
    Bsz, T, C = xBC.shape
    K = weight.shape[-1]
    if shifted is None:
        shifted = torch.compiler.is_compiling()
    if shifted:
        if prefix is None:
            xp = F.pad(xBC, (0, 0, K - 1, 0))  # (B, T+K-1, C)
        else:
            xp = torch.cat([prefix.transpose(1, 2).to(xBC.dtype), xBC], dim=1)
        w = weight[:, 0, :]  # (C, K); fp32 weights make the sum fp32 under autocast, cast back at the end
        out = bias + sum(xp[:, k:k + T] * w[:, k] for k in range(K))
        return F.silu(out).to(xBC.dtype)
    xt = xBC.transpose(1, 2)  # (B, C, T)
    if prefix is None:
        out = F.conv1d(xt, weight, bias, padding=K - 1, groups=C)[..., :T]  # pads both sides: drop the tail
    else:
        out = F.conv1d(torch.cat([prefix.to(xt.dtype), xt], dim=-1), weight, bias, groups=C)
    return F.silu(out).transpose(1, 2)


class RMSNormGated(nn.Module):
    """norm(y * silu(z)) * weight, RMS over groups of group_size channels (mamba-ssm's norm_before_gate=False)."""

    def __init__(self, hidden_size, group_size, eps=1e-5, device=None, dtype=None):
        super().__init__()
        if hidden_size % group_size != 0:
            raise ValueError(f"RMSNormGated: hidden_size {hidden_size} is not divisible by group_size {group_size}")
        self.eps, self.group_size = eps, group_size
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))

    def forward(self, y, z):
        cdt = _compute_dtype(y.dtype)  # norm statistics in fp32 whatever the activation dtype, like mamba-ssm
        v = (y.to(cdt) * F.silu(z.to(cdt))).unflatten(-1, (-1, self.group_size))
        v = v * torch.rsqrt(v.square().mean(dim=-1, keepdim=True) + self.eps)
        return (v.flatten(-2) * self.weight.to(cdt)).to(y.dtype)


class Mamba2(nn.Module):
    """The Mamba2 mixer: in_proj -> causal depthwise conv + SiLU on xBC -> SSD scan -> gated RMSNorm -> out_proj."""

    def __init__(self, d_model, d_state=128, d_conv=4, expand=2, headdim=64, ngroups=1, chunk_size=256,
                 A_init_range=(1, 16), dt_min=0.001, dt_max=0.1, dt_init_floor=1e-4, dt_limit=(0.0, float("inf")),
                 layer_idx=None, device=None, dtype=None, impl=None, scan_op=None, recompute=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = expand * d_model
        if self.d_inner % headdim != 0:
            raise ValueError(f"Mamba2: d_inner = expand*d_model = {self.d_inner} is not divisible by headdim {headdim}")
        self.headdim, self.nheads, self.ngroups = headdim, self.d_inner // headdim, ngroups
        if self.nheads % ngroups != 0 or self.d_inner % ngroups != 0:
            raise ValueError(f"Mamba2: nheads {self.nheads} (and d_inner {self.d_inner}) must be divisible by ngroups {ngroups}")
        if not (A_init_range[0] > 0 and A_init_range[1] >= A_init_range[0]):
            raise ValueError(f"Mamba2: A_init_range must satisfy 0 < lo <= hi, got {A_init_range}")
        self.chunk_size, self.layer_idx = chunk_size, layer_idx
        self.A_init_range, self.dt_min, self.dt_max, self.dt_init_floor = A_init_range, dt_min, dt_max, dt_init_floor
        self.dt_limit = tuple(dt_limit)
        self.conv_dim = self.d_inner + 2 * ngroups * d_state
        d_in_proj = 2 * self.d_inner + 2 * ngroups * d_state + self.nheads  # [z, x, B, C, dt]
        self.in_proj = nn.Linear(d_model, d_in_proj, bias=False, **factory)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, kernel_size=d_conv, groups=self.conv_dim,
                                padding=d_conv - 1, bias=True, **factory)
        self.dt_bias = nn.Parameter(torch.empty(self.nheads, **factory))
        self.A_log = nn.Parameter(torch.empty(self.nheads, **factory))
        self.D = nn.Parameter(torch.empty(self.nheads, **factory))
        self.norm = RMSNormGated(self.d_inner, group_size=self.d_inner // ngroups, eps=1e-5, **factory)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False, **factory)
        self.reset_parameters()
        # how the scan runs: decided here, once (None: the NANOCHAT_MAMBA_* environment variables, read now)
        self.impl_requested = self.impl = self.scan_op = self.recompute = None
        self.configure(impl=_choice(impl, IMPLS, "NANOCHAT_MAMBA_IMPL", "impl"),
                       scan_op=_choice(scan_op, MODES, "NANOCHAT_MAMBA_SCAN_OP", "scan_op"),
                       recompute=_choice(recompute, MODES, "NANOCHAT_MAMBA_RECOMPUTE", "recompute"))

    def configure(self, impl=None, scan_op=None, recompute=None):
        """
        Set how the scan runs; arguments left None keep their value. impl=auto|torch|triton (see resolve_impl: an
        explicit triton that cannot run here raises RuntimeError); scan_op=auto|0|1: the state-free scan through
        the nanochat::ssd_scan custom op (auto = under torch.compile only); recompute=auto|0|1: the torch scan
        recomputes its chunk matrices in backward (auto = for CUDA tensors). Returns self.
        """
        if impl is not None:
            requested = _choice(impl, IMPLS, None, "impl")
            self.impl = resolve_impl(requested)
            self.impl_requested = requested
        if scan_op is not None:
            self.scan_op = _choice(scan_op, MODES, None, "scan_op")
        if recompute is not None:
            self.recompute = _choice(recompute, MODES, None, "recompute")
        return self

    def describe(self):
        """One line saying how the scan runs (GPT prints it once per model build)."""
        if self.impl == "triton":
            what = f"triton scan (mamba-ssm {_mamba_ssm_version()})"
            if self.impl_requested == "auto":
                what += " for CUDA tensors (torch scan for CPU/float64 ones)"
        elif self.impl_requested == "auto":
            what = f"torch scan (mamba-ssm's Triton kernels unavailable: {triton_available()[1]})"
        else:
            what = "torch scan (asked for)"
        op = {"auto": "scan op under torch.compile", "1": "scan op always", "0": "graph break at the scan under torch.compile"}
        rec = {"auto": "on CUDA", "1": "always", "0": "never"}
        return f"{what}, {op[self.scan_op]}, torch-scan recompute in backward {rec[self.recompute]}"

    def _use_triton(self, dtype, device):
        """Whether a call on tensors of this dtype/device takes the Triton kernels (a property of the tensors and
        of the build-time choice; no environment read)."""
        if self.impl != "triton":
            return False
        if device.type == "cuda" and dtype != torch.float64:
            return True
        if self.impl_requested == "triton":
            raise RuntimeError(f"Mamba2 layer {self.layer_idx}: impl=triton needs CUDA tensors that are not float64, "
                               f"got {dtype} on {device.type}; build the layer with impl=torch or auto")
        return False

    @torch.no_grad()
    def reset_parameters(self):
        """mamba-ssm's init (a no-op on the meta device: call it again after .to_empty())."""
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True  # optimizer groups skip weight decay on these (mamba-ssm's convention)
        # dt log-uniform in [dt_min, dt_max], floored; dt_bias = softplus^{-1}(dt) = dt + log(1 - exp(-dt))
        u = torch.rand(self.nheads, device=self.dt_bias.device, dtype=torch.float32)
        dt = torch.exp(u * (math.log(self.dt_max) - math.log(self.dt_min)) + math.log(self.dt_min))
        dt = dt.clamp(min=self.dt_init_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        A = torch.empty(self.nheads, device=self.A_log.device, dtype=torch.float32).uniform_(*self.A_init_range)
        self.A_log.copy_(torch.log(A))
        self.D.fill_(1.0)
        self.conv1d.reset_parameters()
        self.norm.weight.fill_(1.0)
        self.in_proj.reset_parameters()
        self.out_proj.reset_parameters()

    def allocate_inference_state(self, batch_size, device, dtype=torch.float32):
        """Zero (conv_state (B, conv_dim, d_conv), ssm_state (B, nheads, headdim, d_state)), float32 by default."""
        conv_state = torch.zeros(batch_size, self.conv_dim, self.d_conv, device=device, dtype=dtype)
        ssm_state = torch.zeros(batch_size, self.nheads, self.headdim, self.d_state, device=device, dtype=dtype)
        return conv_state, ssm_state

    def _check_state(self, state, batch):
        cs, ss = getattr(state, "conv_state", None), getattr(state, "ssm_state", None)
        if not isinstance(cs, torch.Tensor) or not isinstance(ss, torch.Tensor):
            raise ValueError(f"Mamba2 layer {self.layer_idx}: state must have tensor attributes conv_state and ssm_state, got {type(state).__name__}")
        if tuple(cs.shape) != (batch, self.conv_dim, self.d_conv):
            raise ValueError(f"Mamba2 layer {self.layer_idx}: conv_state shape {tuple(cs.shape)}, expected {(batch, self.conv_dim, self.d_conv)}")
        if tuple(ss.shape) != (batch, self.nheads, self.headdim, self.d_state):
            raise ValueError(f"Mamba2 layer {self.layer_idx}: ssm_state shape {tuple(ss.shape)}, expected {(batch, self.nheads, self.headdim, self.d_state)}")
        if not (cs.is_floating_point() and ss.is_floating_point()) or cs.dtype in (torch.float16, torch.bfloat16) or ss.dtype in (torch.float16, torch.bfloat16):
            raise ValueError(f"Mamba2 layer {self.layer_idx}: states must be float32 (or float64), got {cs.dtype} and {ss.dtype}")
        return cs, ss

    def forward(self, u, state=None):
        """
        u: (B, T, d_model) -> (B, T, d_model).
        state=None: full-sequence (training) path from zero state.
        state given (attributes conv_state, ssm_state, fp32, mamba-ssm's layouts): they are the initial state and
        are overwritten in place with the state after these tokens. T == 1 runs the O(1) recurrent step; T > 1
        the chunked scan with initial states. The state updates are not differentiated through.
        """
        if u.dim() != 3 or u.shape[-1] != self.d_model:
            raise ValueError(f"Mamba2 layer {self.layer_idx}: input must be (B, T, d_model={self.d_model}), got {tuple(u.shape)}")
        Bsz, T, _ = u.shape
        zxbcdt = self.in_proj(u)
        z, xBC, dt = torch.split(zxbcdt, [self.d_inner, self.conv_dim, self.nheads], dim=-1)
        # at least fp32: in fp16, exp(A_log) can overflow to inf (mamba-ssm's note); fp64 stays fp64 (tests)
        A = -torch.exp(self.A_log.to(_compute_dtype(self.A_log.dtype)))
        if state is not None:
            conv_state, ssm_state = self._check_state(state, Bsz)
        if state is not None and T == 1:
            y = self._step(xBC[:, 0], dt[:, 0], A, conv_state, ssm_state, u.dtype).unsqueeze(1)
        else:
            if state is not None:
                with torch.no_grad():  # the pre-conv inputs to keep: the last d_conv of [old state ; new]
                    history = torch.cat([conv_state, xBC[:, -self.d_conv:].transpose(1, 2).to(conv_state.dtype)], dim=-1)
            # with a state, the conv sees the last d_conv-1 inputs of the previous call before the new ones
            xBC = causal_conv_silu(xBC, self.conv1d.weight, self.conv1d.bias,
                                   prefix=None if state is None else conv_state[:, :, 1:])
            x, Bm, Cm = torch.split(xBC, [self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
            x, Bm, Cm = x.unflatten(-1, (self.nheads, self.headdim)), Bm.unflatten(-1, (self.ngroups, self.d_state)), \
                Cm.unflatten(-1, (self.ngroups, self.d_state))
            # the Triton kernels take the state in fp32; a float64 state (tests) keeps the whole call on torch
            wide = state is not None and ssm_state.dtype == torch.float64
            triton = self._use_triton(torch.float64 if wide else x.dtype, x.device)
            if state is None and (self.scan_op == "1" or (self.scan_op == "auto" and torch.compiler.is_compiling())):
                y = ssd_scan_op(x, dt, A, Bm, Cm, self.D, self.dt_bias, *map(float, self.dt_limit), self.chunk_size,
                                triton)
            else:
                y, final_state = _scan(x, dt, A, Bm, Cm, self.D, self.dt_bias, self.dt_limit, self.chunk_size,
                                       initial_state=None if state is None else ssm_state, triton=triton,
                                       recompute=self.recompute)
            if state is not None:
                with torch.no_grad():
                    conv_state.copy_(history[..., -self.d_conv:])  # last d_conv inputs, oldest first (zero-padded)
                    ssm_state.copy_(final_state)
            y = y.flatten(-2)
        y = self.norm(y, z)
        return self.out_proj(y)

    def _step(self, xBC, dt, A, conv_state, ssm_state, dtype):
        """One token: xBC (B, conv_dim) pre-conv, dt (B, nheads) raw. Returns y (B, d_inner) before the norm."""
        window = torch.cat([conv_state[:, :, 1:], xBC.unsqueeze(-1).to(conv_state.dtype)], dim=-1)  # (B, conv_dim, d_conv)
        with torch.no_grad():
            conv_state.copy_(window)
        # depthwise dot over the window in the state's precision (fp32), then the layer input's dtype, exactly as
        # mamba-ssm's step does (so under autocast with fp32 inputs the whole step stays fp32: a few vectors a token)
        w = self.conv1d.weight.squeeze(1).to(conv_state.dtype)  # (conv_dim, d_conv)
        xBC = F.silu((window * w).sum(-1) + self.conv1d.bias.to(conv_state.dtype)).to(dtype)
        x, Bm, Cm = torch.split(xBC, [self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        triton = self._use_triton(torch.float64 if ssm_state.dtype == torch.float64 else x.dtype, x.device)
        y = _ssm_step(ssm_state, x.unflatten(-1, (self.nheads, self.headdim)), dt, A,
                      Bm.unflatten(-1, (self.ngroups, self.d_state)), Cm.unflatten(-1, (self.ngroups, self.d_state)),
                      self.D, self.dt_bias, self.dt_limit, triton)
        return y.flatten(-2)
