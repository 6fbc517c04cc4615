"""
Model benchmarks: all-attention vs hybrid block patterns at the same width and depth, side by side in one run.
Needs CUDA for meaningful numbers; runs on CPU at toy sizes to check the script itself (the smoke command below).

    python benchmarks/bench_model.py                                   # longtrain + decode, d12 shape (12 x 768)
    python benchmarks/bench_model.py --sections longtrain --seq-lens 32768 --checkpointing 0,1
    python benchmarks/bench_model.py --sections decode --contexts 2048,8192,32768 --batch-sizes 1,16
    python benchmarks/bench_model.py --sections train --patterns "all-T,1-in-4 attention" --impls triton --scan-ops auto,0
    python benchmarks/bench_model.py --sections memory
    # CPU smoke test of every section (under a minute): --small sets the toy sizes spelled out on the next line
    python benchmarks/bench_model.py --small --sections train,longtrain,decode,memory --output /tmp/bench_model.json
    #   = --depth 4 --n-embd 64 --head-dim 32 --vocab-size 512 --d-state 16 --mamba-headdim 16 --chunk 32
    #     --seq-len 128 --batch-size 2 --seq-lens 256,512 --tokens-per-step 512 --contexts 64,128 --batch-sizes 1,2
    #     --decode-steps 4 --steps 2 --warmup 1 --compile 0

Patterns at --depth D (a multiple of 4): all-T = T*D, 1-in-4 attention = MMMT repeated, alternating TM = TM
repeated (and all-M = M*D in the train section). n_head = n_embd / head_dim, same for keys/values.

Sections (each prints one table, and the JSON at --output, or $OUT/bench_model.json, is rewritten after every row,
so a run stopped by a time limit keeps what it measured; --time-budget skips the rows not started in time):
- longtrain: full training steps (forward, backward, Muon + AdamW; bf16 autocast on CUDA; torch.compile with
  --compile 1) at each --seq-lens length, with and without activation checkpointing (--checkpointing 0,1), at a
  constant --tokens-per-step (batch = tokens-per-step / seq-len, at least 1): tokens/s, peak memory, step time,
  MFU (GPT.estimate_flops at that length), and the ratio to all-T at the same length and checkpointing. The Mamba
  path is the default choice (auto: mamba-ssm's Triton kernels when they load, the scan as a custom op under
  compile). compile_s is the first (compiling) step's time: what a shorter run must budget for.
- decode: through the public Engine API (Engine.generate, greedy) on a random prompt of each --contexts length:
  prefill = time to the first token (batch-1 prefill of the prompt, the cache replicated to the batch, the
  first argmax), then --decode-steps steps at each --batch-sizes batch (Engine's num_samples): decode tokens/s
  (batch x steps / time), cache MiB (InferenceCache.nbytes of that batch and length) and its ratio to all-T, peak
  memory. One short generation first warms up whatever the Engine sets up per shape.
- train: training tokens/s + MFU at --seq-len / --batch-size per pattern (all four), per Mamba path (--impls
  triton,torch) and, compiled, per scan form (--scan-ops auto: the custom op in the graph; 0: a graph break).
- memory: activation bytes one Mamba2 layer (torch path) keeps for backward, with the scan's intermediates stored
  vs recomputed (recompute=0/1), batch 1 at --seq-len (saved-tensor hooks: runs on CPU too).
(The Mamba2 layer alone, ours vs mamba_ssm's Mamba2, is benchmarks/check_mamba_triton.py.)
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
from pydoc_data.topics import topics

from nanochat.gpt import GPT, GPTConfig
from nanochat.mamba import Mamba2
from nanochat.engine import Engine, InferenceCache
from nanochat.tokenizer import Tokenizer
from nanochat.common import ArgumentParser, get_peak_flops, atomic_write_json, run_main


def patterns(depth):
    return {
        "all-T": "T" * depth,
        "1-in-4 attention": ("MMMT" * depth)[:depth],
        "alternating TM": ("TM" * depth)[:depth],
        "all-M": "M" * depth,
    }


def chosen(args, names):
    """The patterns of `names` that --patterns keeps (all of them when it is empty), as (name, blocks)."""
    keep = [p.strip() for p in args.patterns.split(",") if p.strip()]
    unknown = [p for p in keep if p not in patterns(4)]
    if unknown:
        raise ValueError(f"--patterns: unknown {unknown}; choose from {list(patterns(4))}")
    table = patterns(args.depth)
    return [(n, table[n]) for n in names if not keep or n in keep]


def make_model(blocks, args, seq_len, mamba_impl=None, scan_op=None):
    cfg = GPTConfig(sequence_len=seq_len, vocab_size=args.vocab_size, n_layer=len(blocks),
                    n_head=args.n_embd // args.head_dim, n_kv_head=args.n_embd // args.head_dim, n_embd=args.n_embd,
                    block_pattern=blocks, mamba_d_state=args.d_state, mamba_headdim=args.mamba_headdim,
                    mamba_chunk_size=args.chunk)
    with torch.device("meta"):
        model = GPT(cfg, mamba_impl=mamba_impl)
    model.to_empty(device=args.device)
    model.init_weights()
    if scan_op is not None:
        for block in model.transformer.h:
            if block.kind == "M":
                block.mixer.configure(scan_op=scan_op)
    return model


def sync(args):
    if args.device.type == "cuda":
        torch.cuda.synchronize()


def peak_gib(args):
    return torch.cuda.max_memory_allocated() / 2**30 if args.device.type == "cuda" else None


def fresh_memory(args):
    if args.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def autocast_ctx(args):
    if args.device.type == "cuda":
        return torch.amp.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def out_of_time(args):
    return args.time_budget > 0 and time.time() - args.t_start > args.time_budget


def save(args, out):
    if args.output:
        atomic_write_json(args.output, out)


def measure_training(row, build, args, batch, seq_len, peak):
    """Train a fresh model from build() for the timed steps and put tokens/s, step time, loss, memory and MFU into
    row; an exception (an OOM at 32K without checkpointing, say) is recorded in row so it does not hide the others."""
    model = None
    try:
        torch.manual_seed(0)
        model = build()
        dt, first_s, loss = timed_training(model, args, batch, seq_len)
        tok_s = batch * seq_len / dt
        row.update(tokens_per_s=tok_s, step_ms=1000 * dt, compile_s=first_s, loss=loss, peak_mem_gib=peak_gib(args),
                   mfu=100 * model.estimate_flops() * tok_s / peak if peak else None)
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {e}"[:300]
    finally:
        del model
        fresh_memory(args)


def table_head(title, columns):
    print(f"\n### {title}")
    print("| " + " | ".join(columns) + " |")
    print("|---" * len(columns) + "|")


def table_line(r, keys, measured):
    """One markdown row: the row's key cells, then measured(r)'s cells, or its error message when it failed."""
    head = "| " + " | ".join(str(k) for k in keys) + " |"
    return f"{head} {r['error'][:80]} |" if "error" in r else head + " " + " | ".join(measured(r)) + " |"


def all_t_row(rows, r, keys, field):
    """The all-T row measured at the same settings (keys) as r, with a value for field: the ratios' denominator."""
    return next((q for q in rows if q["pattern"] == "all-T" and field in q and all(q[k] == r[k] for k in keys)), None)


def fmt(v, spec, empty="-"):
    return empty if v is None else format(v, spec)


def timed_training(model, args, batch, seq_len):
    """(step seconds, first-step seconds, last loss) of full optimizer steps on one random batch."""
    opts = model.setup_optimizers()
    step_model = torch.compile(model, dynamic=False) if args.compile else model
    x = torch.randint(0, args.vocab_size, (batch, seq_len), device=args.device)
    y = torch.randint(0, args.vocab_size, (batch, seq_len), device=args.device)

    def step():
        with autocast_ctx(args):
            loss = step_model(x, y)
        loss.backward()
        for o in opts:
            o.step()
        model.zero_grad(set_to_none=True)
        return loss

    t0 = time.time()
    step()
    sync(args)
    first_s = time.time() - t0
    for _ in range(args.warmup - 1):
        step()
    sync(args)
    t0 = time.time()
    for _ in range(args.steps):
        loss = step()
    sync(args)
    return (time.time() - t0) / args.steps, first_s, loss.item()


# -----------------------------------------------------------------------------
# longtrain: tokens/s and peak memory by sequence length, with and without activation checkpointing


def bench_longtrain(args, out):
    rows = out.setdefault("longtrain", [])
    peak = get_peak_flops(args.device.type)
    seq_lens = [int(s) for s in args.seq_lens.split(",")]
    ckpts = [bool(int(c)) for c in args.checkpointing.split(",")]
    for name, blocks in chosen(args, ["all-T", "1-in-4 attention", "alternating TM"]):
        for seq_len in seq_lens:
            for ckpt in ckpts:
                batch = max(1, args.tokens_per_step // seq_len)
                row = dict(pattern=name, blocks=blocks, seq_len=seq_len, batch=batch, checkpointing=ckpt)
                if out_of_time(args):
                    row["error"] = "skipped: --time-budget spent"
                else:
                    if args.compile:
                        torch._dynamo.reset()  # a fresh cache per row (else the recompile limit can fall back to eager)
                    measure_training(row, lambda: make_model(blocks, args, seq_len).set_activation_checkpointing(ckpt),
                                     args, batch, seq_len, peak)
                rows.append(row)
                print(row, flush=True)
                save(args, out)
    table_head(f"training by sequence length, {args.depth} x {args.n_embd}, {args.tokens_per_step:,} tokens per step, "
               f"compile={args.compile}, {args.device_name}", ["pattern", "seq len", "batch", "checkpointing", "tokens/s",
               "vs all-T", "peak GiB", "step ms", "MFU %", "first step s"])
    for r in rows:
        base = all_t_row(rows, r, ("seq_len", "checkpointing"), "tokens_per_s")
        print(table_line(r, [r["pattern"], r["seq_len"], r["batch"], "on" if r["checkpointing"] else "off"], lambda r: [
            f"{r['tokens_per_s']:,.0f}", f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-",
            fmt(r["peak_mem_gib"], ".1f"), f"{r['step_ms']:.0f}", fmt(r["mfu"], ".1f"), f"{r['compile_s']:.1f}"]))


# -----------------------------------------------------------------------------
# decode: prefill time, decode tokens/s and cache memory through the Engine


def bench_tokenizer():
    """The Engine reads its special tokens from a tokenizer; the prompts are random byte ids, so a tiny BPE trained
    on text every Python install has will do (no tokenizer files needed on the benchmark machine)."""
    return Tokenizer.train_from_iterator(iter([topics[k] for k in sorted(topics)[:20]]), vocab_size=512)


def bench_decode(args, out):
    rows = out.setdefault("decode", [])
    tokenizer = bench_tokenizer()
    contexts = [int(c) for c in args.contexts.split(",")]
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    gen = torch.Generator().manual_seed(0)
    for name, blocks in chosen(args, ["all-T", "1-in-4 attention", "alternating TM"]):
        model = make_model(blocks, args, max(contexts) + args.decode_steps + 1)
        model.eval()
        engine = Engine(model, tokenizer)
        for ctx in contexts:
            prompt = torch.randint(0, 256, (ctx,), generator=gen).tolist()  # byte tokens: never a special token
            for bs in batch_sizes:
                row = dict(pattern=name, blocks=blocks, context=ctx, batch=bs)
                if out_of_time(args):
                    row["error"] = "skipped: --time-budget spent"
                    rows.append(row)
                    continue
                try:
                    fresh_memory(args)
                    with autocast_ctx(args):
                        for _ in engine.generate(prompt, num_samples=bs, max_tokens=4, temperature=0.0):
                            pass  # warm-up
                        sync(args)
                        t0 = time.time()
                        stream = engine.generate(prompt, num_samples=bs, max_tokens=args.decode_steps + 1, temperature=0.0)
                        next(stream)  # the column of first tokens: a Python list, so the GPU is done
                        t1 = time.time()
                        steps = sum(1 for _ in stream)
                        t2 = time.time()
                    row.update(prefill_s=t1 - t0, decode_steps=steps, decode_tokens_per_s=bs * steps / (t2 - t1),
                               peak_mem_gib=peak_gib(args))
                    cache = InferenceCache(model, bs, ctx + args.decode_steps + 1)
                    row["cache_mib"] = cache.nbytes() / 2**20
                    del cache
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {e}"[:300]
                finally:
                    fresh_memory(args)
                rows.append(row)
                print(row, flush=True)
                save(args, out)
        del model, engine
        fresh_memory(args)
    table_head(f"prefill + decode through Engine.generate (greedy, {args.decode_steps} steps), {args.depth} x "
               f"{args.n_embd}, {args.device_name}", ["pattern", "context", "batch", "prefill s", "decode tokens/s",
               "vs all-T", "cache MiB", "cache vs all-T", "peak GiB"])
    for r in rows:
        base = all_t_row(rows, r, ("context", "batch"), "cache_mib")
        print(table_line(r, [r["pattern"], r["context"], r["batch"]], lambda r: [
            f"{r['prefill_s']:.3f}", f"{r['decode_tokens_per_s']:,.1f}",
            f"{r['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}x" if base else "-", f"{r['cache_mib']:,.1f}",
            f"{r['cache_mib'] / base['cache_mib']:.3f}" if base else "-", fmt(r["peak_mem_gib"], ".1f")]))


# -----------------------------------------------------------------------------
# train: tokens/s and MFU at one length, per pattern, Mamba path and scan form


def bench_train(args, out):
    rows = out.setdefault("train", [])
    peak = get_peak_flops(args.device.type)
    for name, blocks in chosen(args, ["all-T", "all-M", "alternating TM", "1-in-4 attention"]):
        impls = [i for i in ("triton", "torch") if i in args.impls.split(",")] if "M" in blocks else [None]
        # under compile, the M patterns once per scan form: the custom op inside the graph (auto) and/or a graph
        # break at each scan (0, the form measured before 2026-12-03)
        scan_ops = args.scan_ops.split(",") if ("M" in blocks and args.compile) else [None]
        for impl, scan_op in [(i, o) for i in impls for o in scan_ops]:
            row = dict(pattern=name, blocks=blocks, mamba_impl=impl or "-", scan_op=scan_op or "-")
            if impl == "triton" and args.device.type != "cuda":
                continue
            if out_of_time(args):
                row["error"] = "skipped: --time-budget spent"
            else:
                if args.compile:
                    torch._dynamo.reset()
                measure_training(row, lambda: make_model(blocks, args, args.seq_len, mamba_impl=impl, scan_op=scan_op),
                                 args, args.batch_size, args.seq_len, peak)
            rows.append(row)
            print(row, flush=True)
            save(args, out)
    base = next((r["tokens_per_s"] for r in rows if r["pattern"] == "all-T" and "tokens_per_s" in r), None)
    print(f"\n### training, {args.depth} x {args.n_embd}, seq {args.seq_len}, batch {args.batch_size}, "
          f"compile={args.compile}, {args.device_name}")
    print("| pattern | blocks | Mamba path | scan under compile | tokens/s | MFU % | step ms | vs all-T | peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    scan_name = {"-": "-", "auto": "custom op", "1": "custom op", "0": "graph break"}
    for r in rows:
        head = f"| {r['pattern']} | {r['blocks']} | {r['mamba_impl']} | {scan_name[r['scan_op']]} |"
        if "error" in r:
            print(f"{head} {r['error'][:80]} | | | | |")
            continue
        ratio = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
        print(f"{head} {r['tokens_per_s']:,.0f} | {fmt(r['mfu'], '.1f')} | {r['step_ms']:.1f} | {ratio} | "
              f"{fmt(r['peak_mem_gib'], '.1f')} |")


# -----------------------------------------------------------------------------
# memory: what one Mamba2 layer keeps for backward


def bench_memory(args, out):
    """Saved-for-backward bytes of one Mamba2 layer (torch path), scan stored vs recomputed."""
    rows = out.setdefault("memory", [])
    torch.manual_seed(0)
    m = Mamba2(args.n_embd, d_state=args.d_state, headdim=args.mamba_headdim, chunk_size=args.chunk,
               impl="torch").to(args.device)
    u = torch.randn(1, args.seq_len, args.n_embd, device=args.device)
    for mode in ("0", "1"):
        m.configure(recompute=mode)
        saved = [0]

        def pack(t):
            saved[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = m(u).float().square().mean()
        loss.backward()
        m.zero_grad(set_to_none=True)
        rows.append(dict(recompute=mode == "1", saved_mb=saved[0] / 2**20))
        save(args, out)
    print(f"\n### Mamba2 layer saved for backward, d_model {args.n_embd}, seq {args.seq_len}, batch 1, chunk {args.chunk}")
    print("| scan intermediates | saved MB | ratio |\n|---|---|---|")
    for r in rows:
        print(f"| {'recomputed' if r['recompute'] else 'stored'} | {r['saved_mb']:.1f} | "
              f"{r['saved_mb'] / rows[0]['saved_mb']:.3f} |")


SMALL = dict(depth=4, n_embd=64, head_dim=32, vocab_size=512, d_state=16, mamba_headdim=16, chunk=32, seq_len=128,
             batch_size=2, seq_lens="256,512", tokens_per_step=512, contexts="64,128", batch_sizes="1,2", decode_steps=4,
             steps=2, warmup=1, compile=0)
SECTIONS = {"longtrain": bench_longtrain, "decode": bench_decode, "train": bench_train, "memory": bench_memory}


def main():
    parser = ArgumentParser(description="All-attention vs hybrid: training by sequence length (with/without activation "
                                        "checkpointing), prefill/decode speed and cache memory, Mamba paths.")
    parser.add_argument("--sections", default="longtrain,decode", help="comma-separated: " + ", ".join(SECTIONS))
    parser.add_argument("--patterns", default="", help="comma-separated subset of: " + ", ".join(patterns(4)))
    # model shape (d12 by default: nanochat's 12 layers x 768, head_dim 128, mamba-ssm's Mamba2 defaults)
    parser.add_argument("--depth", type=int, default=12, help="layers (a multiple of 4 for the 1-in-4 pattern)")
    parser.add_argument("--n-embd", type=int, default=768)
    parser.add_argument("--head-dim", type=int, default=128, help="attention head dim (n_head = n_embd / head_dim)")
    parser.add_argument("--vocab-size", type=int, default=65536)
    parser.add_argument("--d-state", type=int, default=128)
    parser.add_argument("--mamba-headdim", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=256, help="Mamba chunk size")
    # longtrain
    parser.add_argument("--seq-lens", default="2048,8192,16384,32768", help="longtrain: sequence lengths")
    parser.add_argument("--tokens-per-step", type=int, default=32768, help="longtrain: batch = this / seq len (>= 1)")
    parser.add_argument("--checkpointing", default="0,1", help="longtrain: activation checkpointing off (0) / on (1)")
    # train, memory
    parser.add_argument("--seq-len", type=int, default=2048, help="train, memory: sequence length")
    parser.add_argument("--batch-size", type=int, default=16, help="train: rows per step")
    parser.add_argument("--impls", default="triton,torch", help="train: Mamba paths to time: triton,torch")
    parser.add_argument("--scan-ops", default="auto", help="train, with --compile 1: the scan forms to time for M patterns: "
                        "auto (custom op inside the graph), 0 (graph break at the scan), or both: auto,0")
    # training steps
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps per row")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first one compiles)")
    parser.add_argument("--compile", type=int, default=1, help="torch.compile the training step: 1 or 0")
    # decode
    parser.add_argument("--contexts", default="2048,8192,32768", help="decode: prompt lengths")
    parser.add_argument("--batch-sizes", default="1,16", help="decode: rows decoded together (Engine num_samples)")
    parser.add_argument("--decode-steps", type=int, default=64)
    # output
    parser.add_argument("--output", "--json", default=None, help="JSON results (default: $OUT/bench_model.json when $OUT is set)")
    parser.add_argument("--small", action="store_true", help="toy sizes for a CPU smoke run (overrides the size flags; "
                        "see the docstring)")
    parser.add_argument("--time-budget", type=float, default=0, help="seconds; rows not started by then are skipped (0: no limit)")
    args = parser.parse_args()
    if args.small:
        vars(args).update(SMALL)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise ValueError(f"--sections: unknown {unknown}; choose from {list(SECTIONS)}")
    if args.warmup < 1 or args.steps < 1:
        raise ValueError("--warmup and --steps must be >= 1")
    chosen(args, [])  # validates --patterns before any work
    args.t_start = time.time()
    args.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    if args.output is None and os.environ.get("OUT"):
        args.output = os.path.join(os.environ["OUT"], "bench_model.json")
    if args.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    out = dict(device=args.device_name, torch=torch.__version__,
               args={k: v for k, v in vars(args).items() if k not in ("device", "t_start")})
    for s in sections:
        SECTIONS[s](args, out)
    out["wall_s"] = time.time() - args.t_start
    save(args, out)
    print(f"\ntotal {out['wall_s']:.0f} s" + (f"; wrote {args.output}" if args.output else ""))


if __name__ == "__main__":
    run_main(main)
