"""
Evaluate a chat model on categorical (multiple choice) and generative tasks.

    python -m scripts.chat_eval --source sft -a builtin                  # built-in, offline
    python -m scripts.chat_eval --source sft -a ARC-Easy,MMLU,GSM8K       # from the HF hub (cached)
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_eval -- --source sft -a MMLU

Categorical tasks: the model's logits at the answer position, restricted to the choice letters, pick the
answer (no sampling). Generative tasks: the Engine answers (greedy by default) and the task's evaluate()
scores the text. Under torchrun each process takes every world_size-th example and the counts are summed.
"""

import time

import torch
import torch.distributed as dist
from tqdm import tqdm

from nanochat.common import (add_checkpoint_args, compute_init, compute_cleanup, print0, ArgumentParser, get_autocast_ctx,
                             run_main)
from nanochat.checkpoint_manager import load_model
from nanochat.dataset import use_hf_local
from nanochat.engine import Engine
from nanochat.report import write_stage
from tasks.registry import load_task, task_names

@torch.no_grad()
def run_categorical(model, tokenizer, task, indices, autocast_ctx, batch_size=8, progress=False, desc=None):
    """Number correct: argmax over the letters' logits at the position after <|assistant_start|>."""
    device = model.get_device()
    seq_len = model.config.sequence_len
    correct = 0
    for start in tqdm(range(0, len(indices), batch_size), desc=desc, disable=not progress, mininterval=2.0):
        convs = [task[i] for i in indices[start:start + batch_size]]
        prompts = [tokenizer.render_for_completion(c, max_tokens=seq_len) for c in convs]
        max_len = max(len(p) for p in prompts)
        pad = tokenizer.get_bos_token_id()
        ids = torch.tensor([p + [pad] * (max_len - len(p)) for p in prompts], dtype=torch.long, device=device)
        with autocast_ctx:
            logits = model(ids)
        for row, (conv, p) in enumerate(zip(convs, prompts)):
            letters = conv["letters"]
            letter_ids = [tokenizer.encode(l)[0] for l in letters]
            scores = logits[row, len(p) - 1, letter_ids]
            pred = letters[int(scores.argmax())]
            correct += int(task.evaluate(conv, pred))
    return correct


def run_generative(engine, task, indices, autocast_ctx, max_new_tokens, temperature, top_k, progress=False, desc=None):
    """Number correct (task.evaluate of the Engine's answer; fractional scores add up)."""
    correct = 0
    for i in tqdm(indices, desc=desc, disable=not progress, mininterval=2.0):
        conv = task[i]
        with autocast_ctx:
            answer = engine.generate_from_conversation(conv, max_tokens=max_new_tokens, temperature=temperature, top_k=top_k)
        correct += float(task.evaluate(conv, answer))
    return correct


def main():
    parser = ArgumentParser(description="Evaluate a chat model on tasks (accuracy per task).")
    add_checkpoint_args(parser, default_source="sft")
    parser.add_argument("-a", "--tasks", type=str, default="builtin",
                        help=f"comma-separated names of tasks/registry.py ({', '.join(task_names())})")
    parser.add_argument("--split", type=str, default="test", choices=["dev", "test"], help="which split to score")
    parser.add_argument("--max-problems", type=int, default=None, help="at most this many examples per task (None: all)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="most tokens per generated answer")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (generative tasks)")
    parser.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens (0: all)")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per forward for categorical tasks")
    parser.add_argument("--hf-local", type=str, default=None,
                        help="a local mirror of the HF hub datasets: DIR/<repo_id>/<file> is read instead of downloading")
    parser.add_argument("--device-type", type=str, default="", help="cuda | cpu | mps ('': autodetect)")
    args = parser.parse_args()
    use_hf_local(args.hf_local)
    ddp, rank, local_rank, world_size, device = compute_init(args.device_type)
    autocast_ctx = get_autocast_ctx(device.type)
    model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
    engine = Engine(model, tokenizer)
    results = {}
    t0 = time.time()
    for name in [t.strip() for t in args.tasks.split(",") if t.strip()]:
        task = load_task(name, args.split)
        n = len(task) if args.max_problems is None else min(len(task), args.max_problems)
        indices = list(range(rank, n, world_size))
        t1 = time.time()
        if task.eval_type == "categorical":
            correct = run_categorical(model, tokenizer, task, indices, autocast_ctx, args.batch_size, rank == 0, name)
        else:
            correct = run_generative(engine, task, indices, autocast_ctx, args.max_new_tokens, args.temperature,
                                     args.top_k or None, rank == 0, name)
        counts = torch.tensor([float(correct), float(len(indices))], dtype=torch.float64, device=device)
        if ddp:
            dist.all_reduce(counts)
        acc = (counts[0] / counts[1].clamp(min=1)).item()
        results[name] = acc
        print0(f"{name}: {100 * acc:.2f}% of {int(counts[1].item())} ({time.time() - t1:.1f} s)")
    write_stage("chat_eval", {f"{k} accuracy %": round(100 * v, 2) for k, v in results.items()} |
                {"source": f"{args.source}/{meta['model_tag']}"}, time_s=time.time() - t0)
    compute_cleanup()


if __name__ == "__main__":
    run_main(main)
