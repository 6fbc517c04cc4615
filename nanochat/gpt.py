"""
The GPT: a nanochat-style Transformer whose blocks may be attention ("T") or Mamba2 ("M") mixers.

    from nanochat.gpt import GPT, GPTConfig
    config = GPTConfig(n_layer=4, n_embd=256, n_head=2, n_kv_head=2, vocab_size=4096, block_pattern="TMTM")
    model = GPT(config); model.init_weights()        # GPT(config, mamba_impl="torch"): see nanochat/mamba.py
    model.set_activation_checkpointing(True)         # optional: recompute each block in backward (long sequences)
    loss = model(idx, targets)                       # training
    logits = model(idx, cache=cache)                 # inference with an engine.InferenceCache

Notable features (nanochat lineage):
- token embedding, untied lm_head, no biases, parameter-free RMSNorm, pre-norm residual blocks
- attention: rotary position embeddings (RoPE), QK-norm, grouped-query attention (n_kv_head)
- MLP: ReLU^2 (So et al. 2021, "Primer")
- logit softcap (Gemma 2) at 15
- block_pattern: "T" = attention + MLP, "M" = Mamba2 mixer + MLP (Dao & Gu 2024). Hybrids such as
  ["T"]*8 + ["M"]*12 or one attention block in four trade a little quality for a decode cache that does not
  grow with context in the M layers (Jamba, Lieber et al. 2024; Zamba; Nemotron-H).
"""

import math
from dataclasses import dataclass, field, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from nanochat.common import print0
from nanochat.mamba import Mamba2, mamba_flops_per_token


# -----------------------------------------------------------------------------
# config

def parse_block_pattern(pattern, n_layer):
    """
    Normalize a block pattern to a list of "T"/"M" of length n_layer.
    Accepts None (all "T"), a list/tuple of letters, "T,T,M,M" or "TTMM" (spaces ignored, case-insensitive).
    Anything else raises ValueError naming the bad value.
    """
    if pattern is None:
        return ["T"] * n_layer
    if isinstance(pattern, str):
        s = pattern.replace(" ", "")
        letters = s.split(",") if "," in s else list(s)
    elif isinstance(pattern, (list, tuple)):
        letters = list(pattern)
    else:
        raise ValueError(f"block_pattern must be a string or a list of 'T'/'M', got {type(pattern).__name__}: {pattern!r}")
    if len(letters) == 0:
        raise ValueError(f"block_pattern is empty ({pattern!r}); give one 'T' or 'M' per layer")
    out = []
    for i, b in enumerate(letters):
        if not isinstance(b, str) or b.upper() not in ("T", "M"):
            raise ValueError(f"block_pattern {pattern!r}: unknown block letter {b!r} at position {i}; use 'T' (attention) or 'M' (Mamba2)")
        out.append(b.upper())
    if len(out) != n_layer:
        raise ValueError(f"block_pattern {pattern!r} has {len(out)} blocks but n_layer is {n_layer}")
    return out


@dataclass
class GPTConfig:
    sequence_len: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 6  # number of query heads
    n_kv_head: int = 6  # number of key/value heads (GQA)
    n_embd: int = 768
    block_pattern: list = field(default=None)  # list of "T"/"M"; None = all "T"
    # Mamba2 mixer (defaults are mamba_ssm.modules.mamba2.Mamba2's)
    mamba_d_state: int = 128
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_headdim: int = 64
    mamba_ngroups: int = 1
    mamba_chunk_size: int = 256

    def __post_init__(self):
        self.block_pattern = parse_block_pattern(self.block_pattern, self.n_layer)
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if self.n_kv_head < 1 or self.n_head % self.n_kv_head != 0:
            raise ValueError(f"n_head {self.n_head} must be a multiple of n_kv_head {self.n_kv_head}")
        if "M" in self.block_pattern and (self.mamba_expand * self.n_embd) % self.mamba_headdim != 0:
            raise ValueError(f"mamba_expand*n_embd = {self.mamba_expand * self.n_embd} is not divisible by mamba_headdim {self.mamba_headdim}")

    def to_dict(self):
        return asdict(self)


# -----------------------------------------------------------------------------
# layers

def norm(x):
    # parameter-free RMSNorm
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary_emb(x, cos, sin):
    # x: (B, T, H, D); rotate the two halves of the head dimension
    d = x.shape[3] // 2
    x1, x2 = x[..., :d], x[..., d:]
    y1 = x1 * cos + x2 * sin
    y2 = x1 * (-sin) + x2 * cos
    return torch.cat([y1, y2], 3).to(x.dtype)


def decode_attention(q, k, v, valid=None):
    """
    One query per row over the whole cache: q (B, H, 1, D), k/v (B, Hkv, L, D) -> (B, H, 1, D).
    Plain matmuls on purpose: the key length changes at every decode step, and SDPA's per-shape kernel
    selection (cuDNN plans on H100) cost milliseconds per layer per token (measured: all-T d12 decoded at 15-22
    tokens/s on an H100, dev/LOG.md 2026-11-24); these two small matmuls have no per-shape setup.
    valid: None, or an (L,) bool mask of the keys to attend to (the static-shape step masks the unwritten tail).
    """
    B, H, _, D = q.shape
    Hkv = k.size(1)
    qg = q.reshape(B, Hkv, H // Hkv, D)  # query heads grouped under their key/value head (GQA)
    scores = torch.matmul(qg, k.transpose(-1, -2).to(qg.dtype)) * (D ** -0.5)  # (B, Hkv, G, L)
    scores = scores.float() if valid is None else scores.float().masked_fill(~valid, float("-inf"))
    att = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(att, v).reshape(B, H, 1, D).to(q.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.n_embd = config.n_embd
        self.head_dim = config.n_embd // config.n_head
        self.c_q = nn.Linear(self.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(self.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(self.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(self.n_embd, self.n_embd, bias=False)

    def forward(self, x, cos_sin, layer_cache=None, pos=0):
        B, T, C = x.size()
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        cos, sin = cos_sin
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        q, k = norm(q), norm(k)  # QK-norm
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        enable_gqa = self.n_head != self.n_kv_head
        if layer_cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=enable_gqa)
        elif torch.is_tensor(pos):
            # the static-shape one-token step (engine.FastDecoder): pos is a (1,) device tensor, the token is written
            # there and the query attends over the whole preallocated cache with the positions after pos masked, so
            # every step has the same shapes, no host sync, and can be replayed from one CUDA graph
            layer_cache.k.index_copy_(2, pos, k.to(layer_cache.k.dtype))
            layer_cache.v.index_copy_(2, pos, v.to(layer_cache.v.dtype))
            valid = torch.arange(layer_cache.k.size(2), device=x.device) <= pos
            y = decode_attention(q, layer_cache.k.to(q.dtype), layer_cache.v.to(q.dtype), valid)
        else:
            # write this chunk's keys/values at [pos, pos+T) and attend over everything cached so far
            layer_cache.k[:, :, pos:pos + T] = k
            layer_cache.v[:, :, pos:pos + T] = v
            # the cache may be bf16 while q is fp32 (CUDA without autocast): SDPA needs one dtype
            k_all = layer_cache.k[:, :, :pos + T].to(q.dtype)
            v_all = layer_cache.v[:, :, :pos + T].to(q.dtype)
            if T == 1:
                y = decode_attention(q, k_all, v_all)
            elif pos == 0:
                y = F.scaled_dot_product_attention(q, k_all, v_all, is_causal=True, enable_gqa=enable_gqa)
            else:
                # several new tokens on top of a cache: query i sees keys 0..pos+i
                i = torch.arange(T, device=x.device).unsqueeze(1)
                j = torch.arange(pos + T, device=x.device).unsqueeze(0)
                mask = j <= (pos + i)
                y = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, enable_gqa=enable_gqa)
        y = y.transpose(1, 2).contiguous().view(B, T, -1)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config, layer_idx, mamba_impl=None):
        super().__init__()
        self.kind = config.block_pattern[layer_idx]
        if self.kind == "T":
            self.attn = CausalSelfAttention(config, layer_idx)
        else:
            self.mixer = Mamba2(
                d_model=config.n_embd, d_state=config.mamba_d_state, d_conv=config.mamba_d_conv,
                expand=config.mamba_expand, headdim=config.mamba_headdim, ngroups=config.mamba_ngroups,
                chunk_size=config.mamba_chunk_size, layer_idx=layer_idx, impl=mamba_impl,
            )
        self.mlp = MLP(config)

    def forward(self, x, cos_sin, layer_cache=None, pos=0):
        if self.kind == "T":
            x = x + self.attn(norm(x), cos_sin, layer_cache, pos)
        else:
            x = x + self.mixer(norm(x), state=layer_cache)
        x = x + self.mlp(norm(x))
        return x


# -----------------------------------------------------------------------------
# the model

class GPT(nn.Module):
    def __init__(self, config, mamba_impl=None):
        """mamba_impl: how the M blocks scan, auto|torch|triton (None: NANOCHAT_MAMBA_IMPL, default auto), decided
        here once and printed (nanochat.mamba.Mamba2.configure)."""
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(config.vocab_size, config.n_embd),
            "h": nn.ModuleList([Block(config, i, mamba_impl) for i in range(config.n_layer)]),
        })
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # rotary tables: over-allocate (10x) so generation can run past the training length; small and cheap.
        # A longer sequence (fine-tuning at a longer --max-seq-len than the base's) grows them (forward)
        self.rotary_seq_len = config.sequence_len * 10
        head_dim = config.n_embd // config.n_head
        cos, sin = self._precompute_rotary_embeddings(self.rotary_seq_len, head_dim)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.activation_checkpointing = False
        mixers = [block.mixer for block in self.transformer.h if block.kind == "M"]
        if mixers:
            print0(f"mamba: {mixers[0].describe()}")

    def init_weights(self):
        """Initialize all parameters. Call after constructing (possibly on the meta device, then .to_empty())."""
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                # fan-in scaled normal with a fan-out/fan-in correction for non-square matrices
                # (Yang et al. 2023, "A spectral condition for feature learning", arXiv:2310.17813)
                fan_out, fan_in = m.weight.shape
                std = 1.0 / math.sqrt(fan_in) * min(1.0, math.sqrt(fan_out / fan_in))
                nn.init.normal_(m.weight, mean=0.0, std=std)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, mean=0.0, std=1.0)
        for block in self.transformer.h:
            if block.kind == "M":
                block.mixer.reset_parameters()  # Mamba2's own init for conv1d, dt_bias, A_log, D, norm
                fan_out, fan_in = block.mixer.in_proj.weight.shape
                nn.init.normal_(block.mixer.in_proj.weight, std=1.0 / math.sqrt(fan_in) * min(1.0, math.sqrt(fan_out / fan_in)))
                nn.init.zeros_(block.mixer.out_proj.weight)
            else:
                nn.init.zeros_(block.attn.c_proj.weight)
            # residual-branch outputs start at zero, so every block starts as the identity
            nn.init.zeros_(block.mlp.c_proj.weight)
        nn.init.zeros_(self.lm_head.weight)
        head_dim = self.config.n_embd // self.config.n_head
        cos, sin = self._precompute_rotary_embeddings(self.rotary_seq_len, head_dim, device=self.cos.device)
        self.cos, self.sin = cos, sin

    def _grow_rotary(self, seq_len):
        """Rotary tables for at least seq_len positions (doubling, so a run of growing lengths rebuilds rarely)."""
        self.rotary_seq_len = max(seq_len, 2 * self.rotary_seq_len)
        head_dim = self.config.n_embd // self.config.n_head
        cos, sin = self._precompute_rotary_embeddings(self.rotary_seq_len, head_dim, device=self.cos.device)
        self.cos, self.sin = cos.to(self.cos.dtype), sin.to(self.sin.dtype)

    def _precompute_rotary_embeddings(self, seq_len, head_dim, base=10000, device=None):
        if device is None:
            device = self.transformer.wte.weight.device
        if device.type == "meta":
            device = torch.device("cpu")
        channel_range = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)
        inv_freq = 1.0 / (base ** (channel_range / head_dim))
        t = torch.arange(seq_len, dtype=torch.float32, device=device)
        freqs = torch.outer(t, inv_freq)
        cos, sin = freqs.cos(), freqs.sin()
        return cos[None, :, None, :], sin[None, :, None, :]  # (1, T, 1, D/2) broadcasts over B and H

    def get_device(self):
        return self.transformer.wte.weight.device

    def set_activation_checkpointing(self, enabled=True):
        """
        Activation checkpointing per block (torch.utils.checkpoint, non-reentrant): when gradients flow, each
        block keeps only its input and recomputes its activations in backward, one block at a time. Trades ~1/3
        more compute (a second forward) for activation memory that no longer grows with depth x sequence length
        inside the blocks: what long sequences (8K-32K tokens per row) need. Same gradients (tests/test_gpt.py);
        works under torch.compile (Inductor recomputes the tagged region) and with the nanochat::ssd_scan op.
        Inference (a cache, or no grad) never checkpoints.
        """
        self.activation_checkpointing = bool(enabled)
        return self

    # -------------------------------------------------------------------------
    # accounting

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def estimate_flops(self):
        """
        FLOPs per token for one forward+backward pass (training), for MFU.
        6 * (non-embedding parameters) covers every matmul with a weight (attention and Mamba projections,
        MLPs, lm_head). On top: attention scores and values, 12 * n_head * head_dim * T per "T" layer
        (fwd+bwd), and the SSD scan itself per "M" layer (3x the forward matmul FLOPs of the scan, see
        nanochat.mamba.mamba_flops_per_token).
        """
        cfg = self.config
        nparams = self.num_params()
        nparams_embedding = self.transformer.wte.weight.numel()
        head_dim = cfg.n_embd // cfg.n_head
        n_t = cfg.block_pattern.count("T")
        n_m = cfg.block_pattern.count("M")
        attn_flops = 12 * n_t * cfg.n_head * head_dim * cfg.sequence_len
        ssd_flops = 3 * n_m * mamba_flops_per_token(cfg.n_embd, cfg.mamba_d_state, cfg.mamba_expand, cfg.mamba_headdim,
                                                    cfg.mamba_ngroups, cfg.mamba_chunk_size)
        return 6 * (nparams - nparams_embedding) + attn_flops + ssd_flops

    # -------------------------------------------------------------------------
    # optimizers

    def setup_optimizers(self, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.0,
                         mamba_lr=None, adam_betas=(0.8, 0.95)):
        """
        Muon (Jordan et al. 2024) for the 2-D weight matrices inside blocks; AdamW for the embedding, the
        lm_head and every Mamba parameter that is not a 2-D matrix (A_log, D, dt_bias, conv1d, norm.weight):
        orthogonalized updates make sense for linear maps, not for decay rates, biases or depthwise filters.
        Returns [adamw, muon] (muon omitted if there are no matrices). Every parameter lands in exactly one group.
        """
        from nanochat.muon import Muon
        cfg = self.config
        matrix_params, mamba_other = [], []
        for i, block in enumerate(self.transformer.h):
            for name, p in block.named_parameters():
                if p.ndim == 2:
                    matrix_params.append(p)
                elif block.kind == "M":
                    mamba_other.append(p)
                else:
                    raise RuntimeError(f"setup_optimizers: unexpected {p.ndim}-D parameter transformer.h.{i}.{name} "
                                       f"in a T block (only 2-D matrices are expected there)")
        embedding_params = list(self.transformer.wte.parameters())
        lm_head_params = list(self.lm_head.parameters())
        groups = [matrix_params, mamba_other, embedding_params, lm_head_params]
        names = {id(p): n for n, p in self.named_parameters(remove_duplicate=False)}
        ids = [id(p) for g in groups for p in g]
        twice = sorted({names[i] for i in ids if ids.count(i) > 1})
        if twice:
            raise RuntimeError(f"setup_optimizers: parameters in two optimizer groups: {twice}")
        missing = sorted(n for n, p in self.named_parameters() if id(p) not in set(ids))
        if missing:
            raise RuntimeError(f"setup_optimizers: {len(missing)} parameters in no optimizer group: {missing}")
        # AdamW learning rates scale as 1/sqrt(width) relative to a 768-wide model (nanochat's convention)
        dmodel_lr_scale = (cfg.n_embd / 768) ** -0.5
        mamba_lr = unembedding_lr * 10 if mamba_lr is None else mamba_lr
        adam_groups = [
            dict(params=lm_head_params, lr=unembedding_lr * dmodel_lr_scale),
            dict(params=embedding_params, lr=embedding_lr * dmodel_lr_scale),
        ]
        if mamba_other:
            # never decay Mamba's A_log/D/dt_bias/conv/norm (mamba-ssm flags them _no_weight_decay)
            adam_groups.append(dict(params=mamba_other, lr=mamba_lr * dmodel_lr_scale, weight_decay=0.0))
        adamw = torch.optim.AdamW(adam_groups, betas=adam_betas, eps=1e-10, weight_decay=weight_decay,
                                  fused=(self.get_device().type == "cuda"))
        optimizers = [adamw]
        if matrix_params:
            optimizers.append(Muon(matrix_params, lr=matrix_lr, momentum=0.95))
        for opt in optimizers:
            for group in opt.param_groups:
                group["initial_lr"] = group["lr"]
        return optimizers

    # -------------------------------------------------------------------------
    # forward

    def forward(self, idx, targets=None, cache=None, loss_reduction="mean", decode_pos=None, last_only=False):
        """
        idx: (B, T) token ids. targets: (B, T) with -1 = ignore, or None (returns logits).
        cache: an engine.InferenceCache; the new tokens are placed at cache.pos, the cache advances by T.
        decode_pos: the static-shape one-token step of engine.FastDecoder: a (1,) long tensor on the model's device
        (T must be 1); the token goes there instead of cache.pos, and cache.pos is left to the caller.
        last_only: logits of the last position only, (B, 1, V): what generation reads after a prefill (the logits of
        a 32K-token prompt are 8 GiB in fp32 at a 65,536 vocabulary).
        """
        B, T = idx.size()
        if decode_pos is not None:
            pos = decode_pos  # a tensor: no host sync, the same shapes at every position (CUDA graph capture)
            cos_sin = self.cos.index_select(1, pos), self.sin.index_select(1, pos)
        else:
            pos = cache.pos if cache is not None else 0
            if pos + T > self.cos.size(1):
                self._grow_rotary(pos + T)
            cos_sin = self.cos[:, pos:pos + T], self.sin[:, pos:pos + T]
        x = self.transformer.wte(idx)
        x = norm(x)
        checkpointed = self.activation_checkpointing and cache is None and torch.is_grad_enabled()
        for i, block in enumerate(self.transformer.h):
            if checkpointed:
                x = checkpoint(block, x, cos_sin, use_reentrant=False)
            else:
                x = block(x, cos_sin, cache.layers[i] if cache is not None else None, pos)
        x = norm(x)
        if cache is not None and decode_pos is None:
            cache.pos += T
        softcap = 15.0
        if targets is not None:
            logits = self.lm_head(x).float()
            logits = softcap * torch.tanh(logits / softcap)
            return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                                   reduction=loss_reduction)
        logits = self.lm_head(x[:, -1:] if last_only else x).float()
        return softcap * torch.tanh(logits / softcap)

    @torch.inference_mode()
    def generate(self, tokens, max_tokens, temperature=1.0, top_k=None, seed=42):
        """Naive streaming generation without a cache (a reference for the Engine; slow)."""
        device = self.get_device()
        rng = torch.Generator(device=device)
        rng.manual_seed(seed)
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        for _ in range(max_tokens):
            logits = self.forward(ids)[:, -1, :]
            next_ids = sample_next_token(logits, rng, temperature, top_k)
            ids = torch.cat((ids, next_ids), dim=1)
            yield next_ids.item()


def sample_next_token(logits, rng, temperature=1.0, top_k=None):
    """logits (B, V) -> (B, 1). temperature 0 = greedy; top_k None = the whole vocabulary, else a positive int."""
    # ValueError, not assert: asserts vanish under python -O (issue 15, item 6)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0.0 <= temperature < math.inf:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or a positive int, got {top_k!r}")
    if temperature == 0.0:
        return torch.argmax(logits, dim=-1, keepdim=True)
    if top_k is not None:
        k = min(top_k, logits.size(-1))
        vals, idx = torch.topk(logits, k, dim=-1)
        probs = F.softmax(vals / temperature, dim=-1)
        choice = torch.multinomial(probs, num_samples=1, generator=rng)
        return idx.gather(1, choice)
    probs = F.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=rng)
