"""
Pretrain a base model (any T/M block pattern) on text shards.

One process (CPU, or one GPU):
    python -m scripts.base_train --depth 4 --block-pattern TMTM --max-seq-len 256 --device-batch-size 8
Several GPUs of one host:
    torchrun --standalone --nproc_per_node=8 -m scripts.base_train -- --depth 20 --block-pattern TTTTTTTTMMMMMMMMMMMM

bf16 autocast on CUDA, fp32 on CPU. Gradient accumulation reaches --total-batch-size tokens per step whatever
the number of processes. Val bits-per-byte every --eval-every steps, samples every --sample-every steps, a
checkpoint at the end (and every --save-every steps) under $NANOCHAT_BASE_DIR/base_checkpoints/<model_tag>;
--resume continues from the last one with the same data order, optimizer state and schedule. A fresh run into a
tag that already holds checkpoints is refused (--overwrite replaces them). A user error (a bad flag value, a
damaged checkpoint) ends with one line "error: ..." and exit status 2.
"""

import gc
import time
import math
import contextlib

import torch
import torch.distributed as dist

from nanochat.common import (compute_init, compute_cleanup, print0, ArgumentParser, get_autocast_ctx, lr_multiplier,
                             step_optimizers, synchronize, get_peak_flops, compile_and_wrap, run_main)
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import get_tokenizer, get_token_bytes
from nanochat.dataloader import tokenizing_distributed_data_loader, prefetch
from nanochat.loss_eval import evaluate_bpb
from nanochat.engine import Engine
from nanochat.checkpoint_manager import (checkpoint_dir, save_checkpoint, load_checkpoint, find_last_step, make_meta,
                                        gather_loader_states, loader_state_for_rank, prepare_checkpoint_dir)
from nanochat.report import log_step, write_stage, reset_log

parser = ArgumentParser(description="Pretrain a hybrid Transformer/Mamba2 base model.")
# model
parser.add_argument("--depth", type=int, default=20, help="number of blocks (n_layer)")
parser.add_argument("--aspect-ratio", type=int, default=64, help="n_embd = depth * aspect_ratio (rounded up to a multiple of head_dim)")
parser.add_argument("--head-dim", type=int, default=128, help="attention head dimension")
parser.add_argument("--n-kv-head", type=int, default=-1, help="key/value heads for GQA (-1 = same as n_head)")
parser.add_argument("--block-pattern", type=str, default=None,
                    help='one letter per block: T = attention+MLP, M = Mamba2+MLP, e.g. "TTMM" or "T,T,M,M" (default all T)')
parser.add_argument("--max-seq-len", type=int, default=2048, help="context length")
parser.add_argument("--mamba-d-state", type=int, default=128)
parser.add_argument("--mamba-d-conv", type=int, default=4)
parser.add_argument("--mamba-expand", type=int, default=2)
parser.add_argument("--mamba-headdim", type=int, default=64)
parser.add_argument("--mamba-ngroups", type=int, default=1)
parser.add_argument("--mamba-chunk-size", type=int, default=256)
# horizon (first one that is set wins: num-iterations, target-flops, target-param-data-ratio)
parser.add_argument("--num-iterations", type=int, default=-1, help="explicit number of optimizer steps")
parser.add_argument("--target-flops", type=float, default=-1.0, help="train for this many FLOPs")
parser.add_argument("--target-param-data-ratio", type=float, default=20.0, help="tokens per parameter (Chinchilla = 20)")
# batch
parser.add_argument("--device-batch-size", type=int, default=32, help="rows per forward pass per process")
parser.add_argument("--total-batch-size", type=int, default=524288, help="tokens per optimizer step, all processes")
# optimization
parser.add_argument("--embedding-lr", type=float, default=0.2, help="AdamW lr for the token embedding")
parser.add_argument("--unembedding-lr", type=float, default=0.004, help="AdamW lr for lm_head")
parser.add_argument("--matrix-lr", type=float, default=0.02, help="Muon lr for block matrices")
parser.add_argument("--mamba-lr", type=float, default=None, help="AdamW lr for Mamba's A_log/D/dt_bias/conv/norm (None: 10x --unembedding-lr)")
parser.add_argument("--weight-decay", type=float, default=0.0)
parser.add_argument("--grad-clip", type=float, default=1.0, help="clip the global grad norm (0 = off)")
parser.add_argument("--warmup-ratio", type=float, default=0.0)
parser.add_argument("--warmdown-ratio", type=float, default=0.2)
parser.add_argument("--final-lr-frac", type=float, default=0.0)
# evaluation / logging / saving
parser.add_argument("--eval-every", type=int, default=250, help="val bpb every N steps (and at the end)")
parser.add_argument("--eval-tokens", type=int, default=10 * 524288, help="tokens per val bpb evaluation")
parser.add_argument("--sample-every", type=int, default=2000, help="print samples every N steps (-1 = only at the end)")
parser.add_argument("--save-every", type=int, default=-1, help="checkpoint every N steps (-1 = only at the end)")
parser.add_argument("--log-every", type=int, default=10)
# data / runtime
parser.add_argument("--data-dir", type=str, default=None, help="directory of .parquet/.jsonl/.txt text shards (None: nanochat.dataset.default_data_dir())")
parser.add_argument("--device-type", type=str, default="", help="cuda | cpu | mps ('': autodetect)")
parser.add_argument("--compile", type=int, default=-1, help="torch.compile the model: 1 or 0 (-1: on for CUDA)")
parser.add_argument("--activation-checkpointing", action="store_true",
                    help="recompute each block's activations in backward (less memory for long sequences, ~1/3 more compute)")
parser.add_argument("--model-tag", type=str, default=None, help="checkpoint folder name (None: d<depth>)")
parser.add_argument("--resume", action="store_true", help="resume from the last checkpoint of --model-tag")
parser.add_argument("--overwrite", action="store_true",
                    help="a fresh run into a --model-tag that already holds checkpoints replaces them "
                         "(without it, such a run is refused: --resume continues it instead)")
parser.add_argument("--seed", type=int, default=42)


def muon_momentum(step):
    # warm Muon's momentum from 0.85 to 0.95 over 300 steps (nanochat's schedule)
    frac = min(step / 300, 1)
    return (1 - frac) * 0.85 + frac * 0.95


def sample_prompts(model, tokenizer, autocast_ctx):
    prompts = ["The json module", "def fibonacci(n):", "The capital of France is", "Python's list.sort() method"]
    engine = Engine(model, tokenizer)
    model.eval()
    for p in prompts:
        ids = tokenizer.encode(p, prepend=tokenizer.get_bos_token_id())
        with autocast_ctx:
            out, _ = engine.generate_batch(ids, num_samples=1, max_tokens=24, temperature=0.0)
        print0(f"  {p!r} -> {tokenizer.decode(out[0])!r}")
    model.train()


def main():
    args = parser.parse_args()

    # -------------------------------------------------------------------------
    # setup

    ddp, rank, local_rank, world_size, device = compute_init(args.device_type)
    master = rank == 0
    device_type = device.type
    torch.manual_seed(args.seed)
    autocast_ctx = get_autocast_ctx(device_type)
    t_start = time.time()

    # one run per tag: a fresh run into an occupied tag is refused unless --overwrite, before any work
    model_tag = args.model_tag or f"d{args.depth}"
    ckpt_dir = checkpoint_dir("base", model_tag)
    run = prepare_checkpoint_dir(ckpt_dir, args.resume, args.overwrite, rank)

    tokenizer = get_tokenizer()
    token_bytes = get_token_bytes(tokenizer, device=device)
    vocab_size = tokenizer.get_vocab_size()
    print0(f"vocab size: {vocab_size:,}")

    # model shape: width grows with depth (nanochat's aspect ratio), heads of head_dim
    model_dim = math.ceil(args.depth * args.aspect_ratio / args.head_dim) * args.head_dim
    n_head = model_dim // args.head_dim
    n_kv_head = n_head if args.n_kv_head == -1 else args.n_kv_head
    config = GPTConfig(sequence_len=args.max_seq_len, vocab_size=vocab_size, n_layer=args.depth, n_head=n_head,
                       n_kv_head=n_kv_head, n_embd=model_dim, block_pattern=args.block_pattern,
                       mamba_d_state=args.mamba_d_state, mamba_d_conv=args.mamba_d_conv, mamba_expand=args.mamba_expand,
                       mamba_headdim=args.mamba_headdim, mamba_ngroups=args.mamba_ngroups,
                       mamba_chunk_size=args.mamba_chunk_size)
    print0(f"model: depth {args.depth}, n_embd {model_dim}, heads {n_head}/{n_kv_head}, pattern {''.join(config.block_pattern)}")
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    model.set_activation_checkpointing(args.activation_checkpointing)
    orig_model = model  # the uncompiled, unwrapped model: for saving, sampling and eval

    start_step, loader_state, loop_state = 0, None, {}
    optim_state = None
    if args.resume:
        start_step = find_last_step(ckpt_dir)
        model_state, optim_state, meta = load_checkpoint(ckpt_dir, start_step, device, load_optimizer=True)
        if meta["model_config"] != config.to_dict():
            raise ValueError(f"--resume: the checkpoint in {ckpt_dir} has config {meta['model_config']} but the flags give {config.to_dict()}")
        orig_model.load_state_dict(model_state)
        loader_state = loader_state_for_rank(meta, rank, world_size, f"--resume from {ckpt_dir} step {start_step}")
        loop_state = meta.get("loop_state", {})
        print0(f"resuming from step {start_step}")

    num_params = orig_model.num_params()
    flops_per_token = orig_model.estimate_flops()
    print0(f"parameters: {num_params:,}; estimated FLOPs per token: {flops_per_token:e}")

    model, eval_model = compile_and_wrap(model, args.compile, ddp, local_rank, device_type)

    # horizon
    tokens_per_fwdbwd = args.device_batch_size * args.max_seq_len
    world_tokens_per_fwdbwd = tokens_per_fwdbwd * world_size
    if args.total_batch_size % world_tokens_per_fwdbwd != 0:
        raise ValueError(f"--total-batch-size {args.total_batch_size} must be a multiple of device_batch_size*max_seq_len*world_size = {world_tokens_per_fwdbwd}")
    grad_accum_steps = args.total_batch_size // world_tokens_per_fwdbwd
    if args.num_iterations > 0:
        num_iterations = args.num_iterations
    elif args.target_flops > 0:
        num_iterations = round(args.target_flops / (flops_per_token * args.total_batch_size))
    else:
        num_iterations = round(args.target_param_data_ratio * num_params / args.total_batch_size)
    num_iterations = max(1, num_iterations)
    print0(f"{num_iterations} steps of {args.total_batch_size:,} tokens ({grad_accum_steps} micro-steps of {args.device_batch_size}x{args.max_seq_len} x {world_size} processes)")
    print0(f"total tokens {num_iterations * args.total_batch_size:,}, tokens:params {num_iterations * args.total_batch_size / num_params:.1f}")

    optimizers = orig_model.setup_optimizers(unembedding_lr=args.unembedding_lr, embedding_lr=args.embedding_lr,
                                             matrix_lr=args.matrix_lr, weight_decay=args.weight_decay, mamba_lr=args.mamba_lr)
    if optim_state is not None:
        for opt, st in zip(optimizers, optim_state):
            opt.load_state_dict(st)
    muon = optimizers[1] if len(optimizers) > 1 else None

    # tokenizing and packing run in a background thread, ahead of the GPU
    train_loader = prefetch(tokenizing_distributed_data_loader(tokenizer, args.device_batch_size, args.max_seq_len, "train",
                                                               device=device, data_dir=args.data_dir, resume_state=loader_state))
    consumed_state = loader_state  # the loader state *before* the batch in hand: what a checkpoint must save
    x, y, next_state = next(train_loader)
    if ddp:  # each rank must read different data: compare a checksum of every rank's first batch
        checksum = torch.tensor([float((x.double() * torch.arange(x.numel(), device=x.device).view_as(x)).sum() % 1e9)],
                                dtype=torch.float64, device=device)
        sums = [torch.zeros_like(checksum) for _ in range(world_size)]
        dist.all_gather(sums, checksum)
        sums = [s.item() for s in sums]
        print0(f"first-batch checksums per rank: {sums}")
        if len(set(sums)) != world_size:  # every rank gets the same sums, so all of them stop here together
            raise RuntimeError(f"ranks read identical first batches (checksums {sums}): the data is not being split "
                               f"across processes")
    eval_steps = max(1, args.eval_tokens // (args.device_batch_size * args.max_seq_len * world_size))

    # -------------------------------------------------------------------------
    # training loop

    if master:  # a fresh run starts its curve anew; a resumed one drops what a crash logged past its checkpoint
        reset_log("base_train", keep_until=start_step or None)
    smooth_loss = loop_state.get("smooth_loss", 0.0)
    total_train_time = loop_state.get("total_train_time", 0.0)
    val_bpb = loop_state.get("val_bpb")
    min_val_bpb = loop_state.get("min_val_bpb", float("inf"))
    timed_tokens, timed_time = 0, 0.0
    step = start_step
    while True:
        last_step = step == num_iterations

        if args.eval_every > 0 and (last_step or step % args.eval_every == 0):
            orig_model.eval()
            val_loader = tokenizing_distributed_data_loader(tokenizer, args.device_batch_size, args.max_seq_len, "val",
                                                            device=device, data_dir=args.data_dir)
            val_bpb = evaluate_bpb(eval_model, val_loader, eval_steps, token_bytes, autocast_ctx)
            min_val_bpb = min(min_val_bpb, val_bpb)
            print0(f"step {step:05d} | val bpb {val_bpb:.4f}")
            log_step("base_train", dict(step=step, val=val_bpb, val_name="val bpb"))
            orig_model.train()

        if master and (last_step or (args.sample_every > 0 and step > 0 and step % args.sample_every == 0)):
            sample_prompts(orig_model, tokenizer, autocast_ctx)

        if last_step or (args.save_every > 0 and step > start_step and step % args.save_every == 0):
            loop = dict(smooth_loss=smooth_loss, total_train_time=total_train_time, val_bpb=val_bpb, min_val_bpb=min_val_bpb)
            meta = make_meta(orig_model, tokenizer, step, user_config=vars(args), **run,
                             dataloader_states=gather_loader_states(consumed_state), loop_state=loop, val_bpb=val_bpb)
            save_checkpoint(ckpt_dir, step, orig_model.state_dict(), [o.state_dict() for o in optimizers], meta, rank=rank)

        if last_step:
            break

        # one optimizer step
        synchronize(device_type)
        t0 = time.time()
        for micro_step in range(grad_accum_steps):
            sync_ctx = model.no_sync() if (ddp and micro_step < grad_accum_steps - 1) else contextlib.nullcontext()
            with sync_ctx, autocast_ctx:
                loss = model(x, y)
            train_loss = loss.detach()
            (loss / grad_accum_steps).backward()
            consumed_state = next_state
            x, y, next_state = next(train_loader)
        grad_norm = None
        if args.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(orig_model.parameters(), args.grad_clip)
        lrm = lr_multiplier(step, num_iterations, args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac)
        if muon is not None:
            for group in muon.param_groups:
                group["momentum"] = muon_momentum(step)
        step_optimizers(optimizers, orig_model, lrm)
        synchronize(device_type)
        dt = time.time() - t0
        step += 1

        if ddp:  # log the loss averaged over processes (the last micro-batch of each)
            dist.all_reduce(train_loss)
            train_loss /= world_size
        loss_f = train_loss.item()
        smooth_loss = 0.9 * smooth_loss + 0.1 * loss_f  # EMA, debiased below (its start is 0)
        debiased = smooth_loss / (1 - 0.9 ** step)
        if step - start_step > 2:  # the first steps include compilation and warm-up
            timed_tokens += args.total_batch_size
            timed_time += dt
        total_train_time += dt
        tok_per_s = args.total_batch_size / dt
        peak = get_peak_flops(device_type)
        mfu = 100 * flops_per_token * tok_per_s / (peak * world_size) if peak else None
        if step % args.log_every == 0 or step == num_iterations:
            mfu_s = f" | mfu {mfu:.1f}%" if mfu is not None else ""
            gn_s = f" | gnorm {grad_norm.item():.3f}" if grad_norm is not None else ""
            print0(f"step {step:05d}/{num_iterations} | loss {debiased:.4f}{gn_s} | lrm {lrm:.2f} | {dt * 1000:.0f} ms | tok/s {tok_per_s:,.0f}{mfu_s}")
        log_step("base_train", dict(step=step, loss=loss_f, lrm=lrm, dt=dt, tok_per_s=tok_per_s))

    # -------------------------------------------------------------------------
    # summary

    avg_tok_per_s = timed_tokens / timed_time if timed_time > 0 else float("nan")
    peak = get_peak_flops(device_type)
    avg_mfu = 100 * flops_per_token * avg_tok_per_s / (peak * world_size) if peak else None
    print0(f"done: {num_iterations} steps, {total_train_time / 60:.2f} min of training, avg {avg_tok_per_s:,.0f} tok/s"
           + (f", MFU {avg_mfu:.1f}%" if avg_mfu is not None else "") + f", final val bpb {val_bpb}")
    if device_type == "cuda":
        print0(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    figures = dict(model_tag=model_tag, block_pattern="".join(config.block_pattern), depth=args.depth, n_embd=model_dim,
                   parameters=num_params, steps=num_iterations, tokens=num_iterations * args.total_batch_size,
                   processes=world_size, device=device_type, tokens_per_s=round(avg_tok_per_s, 1),
                   final_train_loss=round(smooth_loss / (1 - 0.9 ** num_iterations), 4), val_bpb=val_bpb,
                   min_val_bpb=min_val_bpb)
    if avg_mfu is not None:
        figures["mfu_percent"] = round(avg_mfu, 2)
    write_stage("base_train", figures, time_s=time.time() - t_start)
    if ddp:
        # free DDP's reducer while the process group is still registered (as nanochat/sft.py does): if it held the
        # last reference when main returns, gloo's destructor joins its worker threads under the GIL and can deadlock
        dist.barrier()
        del model, eval_model
        gc.collect()
    compute_cleanup()


if __name__ == "__main__":
    run_main(main)
