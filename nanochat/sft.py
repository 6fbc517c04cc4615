"""
The fine-tuning loop shared by chat_sft, rag_finetune and refrag_finetune's stage 1: render conversations (mask = 1
only on what the assistant writes), pack them into rows, count steps, evaluate the loss on assistant tokens, train,
checkpoint and resume.

    from nanochat.common import ArgumentParser
    from nanochat.sft import add_sft_args, run_sft
    parser = ArgumentParser(description="...")
    add_sft_args(parser, default_source="sft")          # the shared flags (model, optimisation, eval, saving)
    args = parser.parse_args()
    run_sft(args, build_tasks, out_source="rag", stage="rag_finetune")   # build_tasks(args) -> (train, val)

Conversations are packed whole into rows of max_seq_len+1 tokens; every target that is not an assistant token is
-1 (ignored by the loss). Rank r takes every world_size-th conversation of a seeded shuffle, so each process sees
different data; every rank runs the same number of steps (count_sft_steps takes the max over ranks).
"""

import gc
import time
import math
import contextlib

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from nanochat.common import (compute_init, compute_cleanup, print0, get_autocast_ctx, lr_multiplier, step_optimizers,
                             get_dist_info, synchronize, get_peak_flops, compile_and_wrap, add_checkpoint_args)
from nanochat.checkpoint_manager import (load_model, checkpoint_dir, save_checkpoint, load_checkpoint, find_last_step,
                                         make_meta, gather_loader_states, loader_state_for_rank, prepare_checkpoint_dir)
from nanochat.dataloader import prefetch
from nanochat.dataset import use_hf_local
from nanochat.report import log_step, write_stage, reset_log
from nanochat.tokenizer import ConversationTooLong


# -----------------------------------------------------------------------------
# arguments shared by every script that runs this loop

def add_sft_args(parser, default_source="base"):
    """The flags every fine-tuning script shares (chat_sft, rag_finetune, refrag_finetune stage 1)."""
    # which model to start from
    add_checkpoint_args(parser, default_source)
    parser.add_argument("--block-pattern", type=str, default=None,
                        help="expected block pattern (e.g. TTMM); a checkpoint with another pattern is refused")
    parser.add_argument("--output-tag", type=str, default=None, help="model tag to save under (None: the loaded tag)")
    parser.add_argument("--overwrite", action="store_true",
                        help="a fresh run into an output tag that already holds checkpoints replaces them "
                             "(without it, such a run is refused: --resume continues it instead)")
    parser.add_argument("--hf-local", type=str, default=None,
                        help="a local mirror of the HF hub datasets: DIR/<repo_id>/<file> is read instead of downloading")
    # optimization
    parser.add_argument("--device-batch-size", type=int, default=4, help="rows per forward pass per process")
    parser.add_argument("--max-seq-len", type=int, default=-1, help="row length (-1: the model's sequence_len)")
    parser.add_argument("--grad-accum-steps", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--num-epochs", type=float, default=1.0, help="passes over the training conversations")
    parser.add_argument("--num-iterations", type=int, default=-1, help="explicit number of steps (overrides --num-epochs)")
    parser.add_argument("--embedding-lr", type=float, default=0.2)
    parser.add_argument("--unembedding-lr", type=float, default=0.004)
    parser.add_argument("--matrix-lr", type=float, default=0.02)
    parser.add_argument("--mamba-lr", type=float, default=None)
    parser.add_argument("--init-lr-frac", type=float, default=0.1, help="fraction of the base learning rates to start at")
    parser.add_argument("--warmdown-ratio", type=float, default=1.0, help="fraction of steps of linear decay to 0 at the end")
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    # eval / saving
    parser.add_argument("--eval-every", type=int, default=100, help="val loss every N steps (and at the end)")
    parser.add_argument("--eval-steps", type=int, default=20, help="val batches per evaluation")
    parser.add_argument("--save-every", type=int, default=-1, help="checkpoint every N steps (-1: only at the end)")
    parser.add_argument("--keep-best", action="store_true",
                        help="the final checkpoint gets the weights of the evaluation with the lowest val loss (kept in "
                             "CPU memory by rank 0, since the start or --resume; meta records best_step), for small "
                             "QA sets that overfit (a 10-epoch RAG run on a GPU bottomed at epoch 2.5, benchmarks/RESULTS.md)")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--resume", action="store_true", help="resume from the last checkpoint of the output tag")
    parser.add_argument("--device-type", type=str, default="", help="cuda | cpu | mps ('': autodetect)")
    parser.add_argument("--compile", type=int, default=-1, help="torch.compile: 1 or 0 (-1: on for CUDA)")
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="recompute each block's activations in backward (less memory for long rows, ~1/3 more compute)")
    parser.add_argument("--seed", type=int, default=42)
    return parser


# -----------------------------------------------------------------------------
# data: render + pack

def render_example(tokenizer, conversation, max_tokens):
    """(ids, mask) or None when the conversation cannot fit even without documents."""
    try:
        return tokenizer.render_conversation(conversation, max_tokens=max_tokens)
    except ConversationTooLong:
        return None


def sft_batches(task, tokenizer, B, T, device, rank=0, world_size=1, seed=42, resume_state=None, max_epochs=None):
    """
    Yields (inputs, targets, state): (B, T) LongTensors, targets -1 off the assistant's tokens and on padding.
    Whole conversations are packed greedily, in order, into rows of T+1 tokens (one that does not fit starts
    the next row). `state` = {"epoch", "cursor"} marks the next conversation not yet in a yielded batch, so
    resume_state=state continues with exactly the next batch. max_epochs=None loops forever; otherwise the
    last partial batch is yielded and the generator ends.
    """
    n = len(task)
    if n == 0:
        raise ValueError("the SFT task has no examples")
    state = dict(resume_state or {"epoch": 0, "cursor": 0})
    pad_id = tokenizer.get_bos_token_id()
    epoch, cursor = state["epoch"], state["cursor"]

    def shard(epoch):
        order = np.random.default_rng(seed + epoch).permutation(n)
        return order[rank::world_size]

    mine = shard(epoch)
    if len(mine) == 0 and max_epochs is None:
        raise ValueError(f"rank {rank} gets no examples: the task has {n} examples for {world_size} processes")
    rows, row_ids, row_mask = [], [], []
    skipped = 0

    def emit(rows):
        width = T + 1
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        tgt = torch.full((len(rows), width), -1, dtype=torch.long)
        for i, (r_ids, r_mask) in enumerate(rows):
            ids[i, :len(r_ids)] = torch.tensor(r_ids)
            m = torch.tensor(r_ids)
            m[torch.tensor(r_mask) == 0] = -1
            tgt[i, :len(r_ids)] = m
        inputs = ids[:, :-1]
        targets = tgt[:, 1:]
        if device.type == "cuda":
            return inputs.pin_memory().to(device, non_blocking=True), targets.pin_memory().to(device, non_blocking=True)
        return inputs.to(device), targets.to(device)

    used_this_epoch = 0
    while True:
        if cursor >= len(mine):
            if used_this_epoch == 0 and len(mine) > 0:
                raise ValueError(f"no conversation of this rank's {len(mine)} fits in {T + 1} tokens; raise --max-seq-len")
            epoch, cursor, used_this_epoch = epoch + 1, 0, 0
            if max_epochs is not None and epoch >= max_epochs:
                if row_ids:
                    rows.append((row_ids, row_mask))
                if rows:
                    x, y = emit(rows)
                    yield x, y, dict(epoch=epoch, cursor=0)
                if skipped:
                    print0(f"sft_batches: skipped {skipped} conversations too long for {T + 1} tokens")
                return
            mine = shard(epoch)
        rendered = render_example(tokenizer, task[int(mine[cursor])], T + 1)
        if rendered is None:
            skipped += 1
            cursor += 1
            continue
        ids, mask = rendered
        if row_ids and len(row_ids) + len(ids) > T + 1:
            rows.append((row_ids, row_mask))
            row_ids, row_mask = [], []
            if len(rows) == B:
                x, y = emit(rows)
                rows = []
                yield x, y, dict(epoch=epoch, cursor=cursor)
            continue  # the pending conversation starts the next row
        row_ids = row_ids + ids
        row_mask = row_mask + mask
        cursor += 1
        used_this_epoch += 1


def count_sft_steps(task, tokenizer, B, T, rank, world_size, seed, grad_accum_steps, num_epochs):
    """Optimizer steps in num_epochs epochs of packed rows (max over ranks, so all ranks agree)."""
    cpu = torch.device("cpu")
    total_rows = 0
    whole = math.ceil(num_epochs)
    batches = sft_batches(task, tokenizer, B, T, cpu, rank, world_size, seed, max_epochs=whole)
    # tokenizing a big mixture (smoltalk: ~0.5M conversations) takes a while: show it when it does
    for x, _, _ in tqdm(batches, desc="counting SFT steps", unit=" batches", delay=2.0, mininterval=2.0, disable=rank != 0):
        total_rows += x.size(0)
    steps = math.ceil(total_rows * (num_epochs / whole) / (B * grad_accum_steps))
    if dist.is_available() and dist.is_initialized():
        t = torch.tensor(steps, dtype=torch.long)
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        steps = int(t.item())
    return max(1, steps)


@torch.no_grad()
def evaluate_loss(model, batches, steps, autocast_ctx):
    """Mean loss per assistant token over `steps` batches (all-reduced across processes)."""
    device = next(model.parameters()).device
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    for _ in tqdm(range(steps), desc="val loss", delay=2.0, mininterval=2.0, leave=False, disable=get_dist_info()[1] != 0):
        try:
            x, y, _ = next(batches)
        except StopIteration:
            break
        with autocast_ctx:
            loss = model(x, y, loss_reduction="sum")
        total += loss.double()
        count += (y >= 0).sum().double()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
        dist.all_reduce(count)
    return (total / count.clamp(min=1)).item()


# -----------------------------------------------------------------------------
# the loop


def make_optimizers(model, args, lr_frac):
    """The model's optimizers (GPT.setup_optimizers) with every learning rate at lr_frac of the flags' values."""
    optimizers = model.setup_optimizers(unembedding_lr=args.unembedding_lr, embedding_lr=args.embedding_lr,
                                        matrix_lr=args.matrix_lr, weight_decay=args.weight_decay, mamba_lr=args.mamba_lr)
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["lr"] * lr_frac
            group["initial_lr"] = group["lr"]
    return optimizers

def run_sft(args, build_tasks, out_source="sft", stage="sft", cleanup=True):
    """
    Fine-tune args.source's checkpoint on the tasks build_tasks(args) returns, (train_task, val_task or None), and
    save to out_source (after --hf-local is applied, so hub tasks find their mirror). Returns a dict of key figures
    (also written to the report as `stage`). cleanup=False keeps the process group for a next stage in the same
    process.
    """
    use_hf_local(args.hf_local)
    train_task, val_task = build_tasks(args)
    ddp, rank, local_rank, world_size, device = compute_init(args.device_type)
    device_type = device.type
    master = rank == 0
    autocast_ctx = get_autocast_ctx(device_type)
    t_start = time.time()

    model, tokenizer, meta_in = load_model(args.source, device, phase="train", model_tag=args.model_tag,
                                           step=args.step, block_pattern=args.block_pattern)
    model.set_activation_checkpointing(args.activation_checkpointing)
    out_tag = args.output_tag or meta_in["model_tag"]
    ckpt_dir = checkpoint_dir(out_source, out_tag)
    # one run per tag: a fresh run into an occupied tag is refused unless --overwrite (before any training work)
    run = prepare_checkpoint_dir(ckpt_dir, args.resume, args.overwrite, rank)
    T = args.max_seq_len if args.max_seq_len > 0 else model.config.sequence_len
    # fine-tuning at a longer --max-seq-len than the base's makes the result a model of that context length: the
    # saved config says so, and the Engine then accepts prompts of that length (the rotary table grows on demand)
    model.config.sequence_len = max(model.config.sequence_len, T)
    B = args.device_batch_size
    orig_model = model

    start_step, loader_state, optim_state = 0, None, None
    if args.resume:
        start_step = find_last_step(ckpt_dir)
        model_state, optim_state, meta_r = load_checkpoint(ckpt_dir, start_step, device, load_optimizer=True)
        orig_model.load_state_dict(model_state)
        loader_state = loader_state_for_rank(meta_r, rank, world_size, f"--resume from {ckpt_dir} step {start_step}")
        print0(f"resuming {stage} from step {start_step}")

    model, eval_model = compile_and_wrap(model, args.compile, ddp, local_rank, device_type)

    if args.num_iterations > 0:
        num_iterations = args.num_iterations
    else:
        num_iterations = count_sft_steps(train_task, tokenizer, B, T, rank, world_size, args.seed,
                                         args.grad_accum_steps, args.num_epochs)
    print0(f"{stage}: {len(train_task):,} training conversations, {num_iterations} steps of "
           f"{args.grad_accum_steps} x {B} rows x {T} tokens x {world_size} processes")

    optimizers = make_optimizers(orig_model, args, args.init_lr_frac)
    if optim_state is not None:
        for opt, st in zip(optimizers, optim_state):
            opt.load_state_dict(st)

    # rendering + packing runs in a background thread, ahead of the GPU (nanochat.dataloader.prefetch)
    train_iter = prefetch(sft_batches(train_task, tokenizer, B, T, device, rank, world_size, args.seed, resume_state=loader_state))
    consumed_state = loader_state
    x, y, next_state = next(train_iter)
    flops_per_token = orig_model.estimate_flops()
    peak = get_peak_flops(device_type)

    if master:  # a fresh run starts its curve anew; a resumed one drops what a crash logged past its checkpoint
        reset_log(stage, keep_until=start_step or None)
    step = start_step
    val_loss = first_val = None
    best = None  # --keep-best: (val loss, step, weights on CPU), tracked since this (re)start
    train_loss_f = float("nan")
    timed_tokens, timed_time, total_time = 0, 0.0, 0.0
    while True:
        last_step = step == num_iterations
        if val_task is not None and (last_step or step % args.eval_every == 0):
            orig_model.eval()
            val_iter = sft_batches(val_task, tokenizer, B, T, device, rank, world_size, seed=0, max_epochs=1)
            val_loss = evaluate_loss(eval_model, val_iter, args.eval_steps, autocast_ctx)
            first_val = val_loss if first_val is None else first_val
            print0(f"step {step:05d} | val loss {val_loss:.4f}")
            log_step(stage, dict(step=step, val=val_loss, val_name="val loss"))
            orig_model.train()
            if args.keep_best and master and (best is None or val_loss < best[0]):
                best = (val_loss, step, {k: v.detach().to("cpu", copy=True) for k, v in orig_model.state_dict().items()})
        if last_step or (args.save_every > 0 and step > start_step and step % args.save_every == 0):
            state, extra = orig_model.state_dict(), {}
            if last_step and best is not None:  # the weights of the best evaluation (intermediate saves stay as is, for resume)
                state, extra = best[2], dict(best_step=best[1], best_val_loss=best[0], last_val_loss=val_loss)
                print0(f"--keep-best: saving the weights of step {best[1]} (val loss {best[0]:.4f}; last {val_loss:.4f})")
            meta = make_meta(orig_model, tokenizer, step, user_config=vars(args),
                             dataloader_states=gather_loader_states(consumed_state),
                             model_tag=out_tag, val_loss=best[0] if extra else val_loss, stage=stage, **run,
                             parent=dict(source=args.source, model_tag=meta_in["model_tag"], step=meta_in.get("step")),
                             **extra)
            save_checkpoint(ckpt_dir, step, state, [o.state_dict() for o in optimizers], meta, rank=rank)
        if last_step:
            break

        synchronize(device_type)
        t0 = time.time()
        n_tokens = torch.zeros((), dtype=torch.long, device=device)
        for micro_step in range(args.grad_accum_steps):
            sync_ctx = model.no_sync() if (ddp and micro_step < args.grad_accum_steps - 1) else contextlib.nullcontext()
            with sync_ctx, autocast_ctx:
                loss = model(x, y)
            train_loss = loss.detach()
            (loss / args.grad_accum_steps).backward()
            n_tokens += (y >= 0).sum()
            consumed_state = next_state
            x, y, next_state = next(train_iter)
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(orig_model.parameters(), args.grad_clip)
        lrm = lr_multiplier(step, num_iterations, 0.0, args.warmdown_ratio, 0.0)
        step_optimizers(optimizers, orig_model, lrm)
        synchronize(device_type)
        dt = time.time() - t0
        step += 1
        if ddp:
            dist.all_reduce(train_loss)
            train_loss /= world_size
        train_loss_f = train_loss.item()
        rows_tokens = args.grad_accum_steps * B * T * world_size
        total_time += dt
        if step - start_step > 2:
            timed_tokens += rows_tokens
            timed_time += dt
        if step % args.log_every == 0 or step == num_iterations:
            print0(f"step {step:05d}/{num_iterations} | loss {train_loss_f:.4f} | lrm {lrm:.2f} | {dt * 1000:.0f} ms | "
                   f"tok/s {rows_tokens / dt:,.0f} | assistant tokens {n_tokens.item()}")
        log_step(stage, dict(step=step, loss=train_loss_f, lrm=lrm, dt=dt))

    tok_per_s = timed_tokens / timed_time if timed_time > 0 else float("nan")
    figures = dict(source=args.source, output=f"{out_source}/{out_tag}", steps=num_iterations,
                   train_conversations=len(train_task), block_pattern="".join(orig_model.config.block_pattern),
                   final_train_loss=round(train_loss_f, 4), first_val_loss=first_val, final_val_loss=val_loss,
                   step_time_ms=round(1000 * timed_time / max(1, step - start_step - 2), 1) if timed_time else None,
                   tokens_per_s=round(tok_per_s, 1))
    if best is not None:
        figures.update(best_step=best[1], best_val_loss=best[0])
    if peak:
        figures["mfu_percent"] = round(100 * flops_per_token * tok_per_s / (peak * world_size), 2)
    print0(f"{stage} done: {num_iterations} steps in {total_time:.1f} s; val loss {first_val} -> {val_loss}")
    write_stage(stage, figures, time_s=time.time() - t_start)
    if ddp:
        # free DDP's reducer while the process group is still registered: if the reducer held the last reference
        # when this function returns, gloo's destructor joins its worker threads under the GIL and can deadlock
        dist.barrier()
        del model, eval_model
        gc.collect()
    if cleanup:
        compute_cleanup()
    return figures
