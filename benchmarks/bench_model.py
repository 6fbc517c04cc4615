"""
Model benchmarks: T vs M vs hybrid block patterns, side by side in one run. Needs CUDA for meaningful numbers
(runs on CPU at toy sizes with --small, to check the script itself).

    python benchmarks/bench_model.py                      # everything, d12 shape (n_embd 768), seq 2048
    python benchmarks/bench_model.py --sections train     # training tokens/s + MFU per pattern and Mamba path
    python benchmarks/bench_model.py --sections decode    # decode tokens/s + cache memory at 2k/8k/32k context
    python benchmarks/bench_model.py --small --sections train,decode   # CPU smoke test

Sections:
- train: full training steps (forward, backward, Muon+AdamW) of a 12-layer, 768-wide model at seq 2048,
  torch.compile + bf16, for all-T, all-M, alternating TM, and 1-in-4 attention (MMMT x3); the M patterns with
  the Triton path (mamba-ssm kernels) and the pure-torch path. tokens/s, MFU (GPT.estimate_flops, which counts
  attention and the SSD scan), and the ratio to all-T. Compiled, --scan-ops auto,0 times the M patterns with the
  scan as a custom op in the graph and with a graph break at each scan, side by side.
- decode: prefill a random prompt of 2k/8k/32k tokens, then 64 decode steps at batch 1 with the Engine's cache;
  decode tokens/s and cache bytes for all-T vs the 1-in-4 hybrid.
- memory: activation bytes one Mamba2 layer (torch path) keeps for backward, with the scan's intermediates
  stored vs recomputed in backward (NANOCHAT_MAMBA_RECOMPUTE=0/1), at the d12 shape, batch 1 (counted with
  autograd's saved-tensor hooks, so it runs on CPU too; the checkpoint's own inputs are alive anyway).
(The Mamba2 layer alone, ours vs mamba_ssm's Mamba2, is benchmarks/check_mamba_triton.py.)
Results: a table on stdout, and JSON at --json (or $OUT/bench_model.json when $OUT is set).
"""

import os
import sys
import json
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from nanochat.gpt import GPT, GPTConfig
from nanochat.engine import InferenceCache
from nanochat.common import ArgumentParser, get_peak_flops

PATTERNS = {
    "all-T": "T" * 12,
    "all-M": "M" * 12,
    "alternating TM": "TM" * 6,
    "1-in-4 attention": "MMMT" * 3,
}


def make_model(pattern, args, seq_len):
    cfg = GPTConfig(sequence_len=seq_len, vocab_size=args.vocab_size, n_layer=len(pattern), n_head=args.n_embd // 128,
                    n_kv_head=args.n_embd // 128, n_embd=args.n_embd, block_pattern=pattern,
                    mamba_d_state=args.d_state, mamba_headdim=64 if not args.small else 16,
                    mamba_chunk_size=args.chunk if not args.small else 16)
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device=args.device)
    model.init_weights()
    return model


def bench_train(args):
    rows = []
    device_type = args.device.type
    peak = get_peak_flops(device_type)
    autocast = torch.amp.autocast("cuda", dtype=torch.bfloat16) if device_type == "cuda" else torch.autocast("cpu", enabled=False)
    for name, pattern in PATTERNS.items():
        if args.patterns and name not in args.patterns.split(","):
            continue
        impls = [i for i in ("triton", "torch") if i in args.impls.split(",")] if "M" in pattern else ["-"]
        if args.small:
            pattern = pattern[:4]
        # under compile, the M patterns once per scan form: the custom op inside the graph (auto) and/or a graph
        # break at each scan (0, the form measured before 2026-12-03)
        scan_ops = args.scan_ops.split(",") if ("M" in pattern and args.compile) else ["-"]
        for impl, scan_op in [(i, o) for i in impls for o in scan_ops]:
            if impl == "triton" and device_type != "cuda":
                continue
            if impl != "-":
                os.environ["NANOCHAT_MAMBA_IMPL"] = impl
            if scan_op != "-":
                os.environ["NANOCHAT_MAMBA_SCAN_OP"] = scan_op
            if args.compile:
                torch._dynamo.reset()  # a fresh cache per row (else the recompile limit can silently fall back to eager)
            try:
                torch.manual_seed(0)
                model = make_model(pattern, args, args.seq_len)
                opts = model.setup_optimizers()
                step_model = torch.compile(model, dynamic=False) if args.compile else model
                x = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len), device=args.device)
                y = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len), device=args.device)

                def step():
                    with autocast:
                        loss = step_model(x, y)
                    loss.backward()
                    for o in opts:
                        o.step()
                    model.zero_grad(set_to_none=True)
                    return loss

                for _ in range(args.warmup):
                    step()
                if device_type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.time()
                for _ in range(args.steps):
                    loss = step()
                if device_type == "cuda":
                    torch.cuda.synchronize()
                dt = (time.time() - t0) / args.steps
                tok_s = args.batch_size * args.seq_len / dt
                mfu = 100 * model.estimate_flops() * tok_s / peak if peak else None
                rows.append(dict(pattern=name, blocks=pattern, mamba_impl=impl, scan_op=scan_op, tokens_per_s=tok_s, mfu=mfu,
                                 step_ms=1000 * dt, loss=loss.item(),
                                 peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30 if device_type == "cuda" else None))
            except Exception as e:  # one failing configuration must not hide the others
                rows.append(dict(pattern=name, blocks=pattern, mamba_impl=impl, scan_op=scan_op, error=f"{type(e).__name__}: {e}"[:300]))
            finally:
                os.environ.pop("NANOCHAT_MAMBA_IMPL", None)
                os.environ.pop("NANOCHAT_MAMBA_SCAN_OP", None)
                if device_type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
            print(rows[-1], flush=True)
    base = next((r["tokens_per_s"] for r in rows if r["pattern"] == "all-T" and "tokens_per_s" in r), None)
    print(f"\n### training, n_embd {args.n_embd}, seq {args.seq_len}, batch {args.batch_size}, compile={args.compile}, {args.device_name}")
    print("| pattern | blocks | Mamba path | scan under compile | tokens/s | MFU % | step ms | vs all-T |")
    print("|---|---|---|---|---|---|---|---|")
    scan_name = {"-": "-", "auto": "custom op", "1": "custom op", "0": "graph break"}
    for r in rows:
        if "error" in r:
            print(f"| {r['pattern']} | {r['blocks']} | {r['mamba_impl']} | {scan_name[r['scan_op']]} | error: {r['error'][:80]} | | | |")
            continue
        ratio = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
        mfu = f"{r['mfu']:.1f}" if r["mfu"] is not None else "-"
        print(f"| {r['pattern']} | {r['blocks']} | {r['mamba_impl']} | {scan_name[r['scan_op']]} | {r['tokens_per_s']:,.0f} | {mfu} | {r['step_ms']:.1f} | {ratio} |")
    return rows


@torch.inference_mode()
def bench_decode(args):
    rows = []
    device_type = args.device.type
    autocast = torch.amp.autocast("cuda", dtype=torch.bfloat16) if device_type == "cuda" else torch.autocast("cpu", enabled=False)
    contexts = [int(c) for c in args.contexts.split(",")]
    for name in ("all-T", "1-in-4 attention"):
        pattern = PATTERNS[name][:4] if args.small else PATTERNS[name]
        model = make_model(pattern, args, max(contexts))
        model.eval()
        for ctx in contexts:
            try:
                prompt = torch.randint(0, args.vocab_size, (1, ctx), device=args.device)
                cache = InferenceCache(model, 1, ctx + args.decode_steps)
                with autocast:
                    logits = model(prompt, cache=cache)
                tok = logits[:, -1:].argmax(-1)
                if device_type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.time()
                with autocast:
                    for _ in range(args.decode_steps):
                        tok = model(tok, cache=cache)[:, -1:].argmax(-1)
                if device_type == "cuda":
                    torch.cuda.synchronize()
                dt = time.time() - t0
                rows.append(dict(pattern=name, context=ctx, decode_tokens_per_s=args.decode_steps / dt,
                                 cache_mib=cache.nbytes() / 2**20))
            except Exception as e:
                rows.append(dict(pattern=name, context=ctx, error=f"{type(e).__name__}: {e}"[:300]))
            print(rows[-1], flush=True)
        del model
        if device_type == "cuda":
            torch.cuda.empty_cache()
    print(f"\n### decode at batch 1 ({args.decode_steps} steps after a prefill), {args.device_name}")
    print("| pattern | context | decode tokens/s | cache MiB | cache vs all-T |")
    print("|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['pattern']} | {r['context']} | error: {r['error'][:80]} | | |")
            continue
        t = next((q for q in rows if q["pattern"] == "all-T" and q["context"] == r["context"] and "cache_mib" in q), None)
        ratio = f"{r['cache_mib'] / t['cache_mib']:.3f}" if t else "-"
        print(f"| {r['pattern']} | {r['context']} | {r['decode_tokens_per_s']:.1f} | {r['cache_mib']:.1f} | {ratio} |")
    return rows


def bench_memory(args):
    """Saved-for-backward bytes of one Mamba2 layer (torch path), scan stored vs recomputed."""
    from nanochat.mamba import Mamba2
    torch.manual_seed(0)
    m = Mamba2(args.n_embd, d_state=args.d_state, chunk_size=args.chunk).to(args.device)
    u = torch.randn(1, args.seq_len, args.n_embd, device=args.device)
    rows = []
    old_impl, old_rec = os.environ.get("NANOCHAT_MAMBA_IMPL"), os.environ.get("NANOCHAT_MAMBA_RECOMPUTE")
    os.environ["NANOCHAT_MAMBA_IMPL"] = "torch"
    try:
        for mode in ("0", "1"):
            os.environ["NANOCHAT_MAMBA_RECOMPUTE"] = mode
            saved = [0]

            def pack(t):
                saved[0] += t.numel() * t.element_size()
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = m(u).float().square().mean()
            loss.backward()
            m.zero_grad(set_to_none=True)
            rows.append(dict(recompute=mode == "1", saved_mb=saved[0] / 2**20))
    finally:
        for k, v in (("NANOCHAT_MAMBA_IMPL", old_impl), ("NANOCHAT_MAMBA_RECOMPUTE", old_rec)):
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    print(f"\nMamba2 layer saved for backward, d_model {args.n_embd}, seq {args.seq_len}, batch 1, chunk {args.chunk}")
    print("| scan intermediates | saved MB | ratio |\n|---|---|---|")
    for r in rows:
        print(f"| {'recomputed' if r['recompute'] else 'stored'} | {r['saved_mb']:.1f} | "
              f"{r['saved_mb'] / rows[0]['saved_mb']:.3f} |")
    return rows


def main():
    parser = ArgumentParser(description="T vs M vs hybrid: training throughput/MFU and decode speed/memory.")
    parser.add_argument("--sections", default="train,decode", help="comma-separated: train, decode, memory")
    parser.add_argument("--n-embd", type=int, default=768)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--vocab-size", type=int, default=65536)
    parser.add_argument("--d-state", type=int, default=128)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile", type=int, default=1)
    parser.add_argument("--contexts", default="2048,8192,32768")
    parser.add_argument("--decode-steps", type=int, default=64)
    parser.add_argument("--patterns", default="", help="comma-separated subset of: " + ", ".join(PATTERNS))
    parser.add_argument("--impls", default="triton,torch", help="Mamba paths to time: triton,torch")
    parser.add_argument("--scan-ops", default="auto", help="with --compile 1, the scan forms to time for M patterns: "
                        "auto (custom op inside the graph), 0 (graph break at the scan), or both: auto,0")
    parser.add_argument("--small", action="store_true", help="toy sizes (CPU smoke test)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    args.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    if args.small:
        args.n_embd, args.seq_len, args.batch_size, args.vocab_size = 128, 128, 2, 512
        args.d_state, args.steps, args.warmup, args.compile = 16, 2, 1, 0
        args.contexts, args.decode_steps = "64,128", 4
    if args.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    out = dict(device=args.device_name, torch=torch.__version__, args={k: v for k, v in vars(args).items() if k != "device"})
    sections = args.sections.split(",")
    if "train" in sections:
        out["train"] = bench_train(args)
    if "decode" in sections:
        out["decode"] = bench_decode(args)
    if "memory" in sections:
        out["memory"] = bench_memory(args)
    path = args.json or (os.path.join(os.environ["OUT"], "bench_model.json") if os.environ.get("OUT") else None)
    if path:
        with open(path, "w") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
