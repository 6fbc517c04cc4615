"""
REFRAG fine-tuning: multi-hop RAG where the model writes its own follow-up search queries.

    python -m scripts.refrag_finetune --source rag --knowledge-base data/builtin/kb            # built-in multi-hop set
    python -m scripts.refrag_finetune --source rag --knowledge-base KB --train-data multihop/train.jsonl --max-hops 3
    torchrun --standalone --nproc_per_node=8 -m scripts.refrag_finetune --knowledge_base data/kb --max_hops 3 --use_rewards true
    python -m scripts.refrag_finetune --stage rl --source refrag --knowledge-base KB               # stage 2 only

Stage 1 (--stage sft): supervised warm start on gold trajectories (tasks/multihop.py: the question and its top-k
documents, then a query per missing supporting passage written from the gold hop decomposition, the documents it
retrieves, and the cited answer), mixed with single-hop reading examples so the model still answers one-hop
questions directly. Retrieved tokens are masked out of the loss; only the model's queries and answer are trained.
The loop is nanochat/sft.py's.

Stage 2 (--stage rl, or after stage 1 with --use-rewards true): on-policy RL with the Engine as the rollout engine:
per question N trajectories sampled (the Engine retrieves when the model closes a query and forces the documents),
reward = nanochat.rag_utils.compute_rag_reward (EM, F1, citation correctness, hallucination penalty, format
validity), advantage = reward minus the group mean (GRPO-style, as nanochat's chat_rl), policy-gradient loss on the
model's own tokens only (nanochat/rl.py). Every process handles --rl-questions questions per step, so every rank
makes the same number of backward passes. Logs mean reward, EM, F1, queries per question, all-gold recall, tokens per
rollout, rollouts/s and the share of step time spent generating.

Both stages save `refrag` checkpoints under one tag: stage 1 at its last step S, stage 2 at S + --rl-steps, so
load_model("refrag") loads the RL model and `--step S` the SFT one. Every flag also takes the underscore spelling.
"""

import gc
import time
import contextlib

import torch
import torch.distributed as dist

from nanochat.common import (ArgumentParser, compute_init, compute_cleanup, print0, run_main, get_autocast_ctx,
                             lr_multiplier, step_optimizers, synchronize, compile_and_wrap)
from nanochat.checkpoint_manager import (load_model, checkpoint_dir, save_checkpoint, make_meta, find_last_step,
                                         prepare_checkpoint_dir)
from nanochat.dataset import use_hf_local
from nanochat.engine import Engine
from nanochat.rag_utils import compute_rag_reward, compute_retrieval_recall, doc_key
from nanochat.report import log_step, write_stage, reset_log
from nanochat.retrieval import RetrievalManager, insert_retrieval_message, results_to_dicts, last_user_message
from nanochat.rl import group_advantages, rollout_batch, policy_gradient_loss
from nanochat.sft import add_sft_args, run_sft, make_optimizers
from tasks.common import TaskMixture
from tasks.multihop import RefragTask, HopReadingTask
from tasks.rag_task import create_rag_task
from tasks.registry import load_task, default_kb

parser = ArgumentParser(description="REFRAG: multi-hop RAG with model-written follow-up queries (SFT, then RL).")
add_sft_args(parser, default_source="rag")
parser.add_argument("--stage", type=str, default="all", choices=["sft", "rl", "all"],
                    help="sft: the supervised warm start; rl: the RL stage from --source; all: sft, then rl if --use-rewards")
parser.add_argument("--use-rewards", type=str, default="true", choices=["true", "false"],
                    help="with --stage all: run the RL stage after the warm start")
parser.add_argument("--knowledge-base", type=str, default=None, help="KB directory (None: the built-in stdlib KB)")
parser.add_argument("--retriever-type", type=str, default=None, help="simple|bm25|dense|hybrid, checked against the KB")
parser.add_argument("--train-data", type=str, default="builtin-multihop",
                    help="multi-hop questions: builtin-multihop or a QA JSONL in the multihop schema (with hops)")
parser.add_argument("--single-hop-data", type=str, default="hops",
                    help="single-hop reading examples mixed into stage 1: hops (each gold hop of --train-data as a "
                         "one-hop question), builtin (the built-in QA, built-in KB only), none")
parser.add_argument("--top-k", type=int, default=3, help="documents retrieved for the question (hop 0)")
parser.add_argument("--top-k-per-hop", type=int, default=3, help="documents retrieved per follow-up query")
parser.add_argument("--max-hops", type=int, default=3, help="follow-up queries allowed per question")
parser.add_argument("--val-examples", type=int, default=100, help="training questions held back for validation")
parser.add_argument("--max-examples", type=int, default=-1, help="use at most this many multi-hop training questions")
# stage 2
parser.add_argument("--rl-steps", type=int, default=100, help="RL optimizer steps")
parser.add_argument("--rl-questions", type=int, default=4, help="questions per step per process")
parser.add_argument("--rl-samples", type=int, default=8, help="trajectories sampled per question (the group)")
parser.add_argument("--rl-temperature", type=float, default=1.0, help="sampling temperature of the rollouts")
parser.add_argument("--rl-top-k", type=int, default=50, help="top-k sampling of the rollouts (0: none)")
parser.add_argument("--rl-max-new-tokens", type=int, default=192,
                    help="most generated tokens per rollout (queries, forced documents and the answer)")
parser.add_argument("--rl-init-lr-frac", type=float, default=0.05, help="RL learning rates as a fraction of the base ones")
parser.add_argument("--rl-eval-every", type=int, default=25, help="greedy validation reward every N steps")
parser.add_argument("--rl-eval-questions", type=int, default=32, help="validation questions per evaluation (all ranks)")


# -----------------------------------------------------------------------------
# data


def build_tasks(args):
    """(train, val) of stage 1: gold trajectories mixed with single-hop reading examples; val = trajectories only."""
    manager = RetrievalManager(args.retriever_type, args.knowledge_base or default_kb())
    qa = load_task(args.train_data, "train")
    n = len(qa) if args.max_examples <= 0 else min(len(qa), args.max_examples)
    n_val = min(args.val_examples, n // 4)  # a quarter at most: the built-in sets are small
    common = dict(retriever=manager, top_k=args.top_k, top_k_per_hop=args.top_k_per_hop, max_hops=args.max_hops,
                  seed=args.seed)
    train = [RefragTask(qa, start=n_val, stop=n, **common)]
    val = RefragTask(qa, start=0, stop=n_val, **common) if n_val else None
    if args.single_hop_data == "hops":
        train.append(HopReadingTask(qa, static=True, seed=args.seed, start=n_val, stop=n))
    elif args.single_hop_data == "builtin":
        single = load_task("builtin", "train")
        train.append(create_rag_task("rag", base_task=single, retriever=manager, top_k=args.top_k, raft=True,
                                     seed=args.seed))
    elif args.single_hop_data != "none":
        raise ValueError(f"--single-hop-data must be hops, builtin or none, got {args.single_hop_data!r}")
    print0(f"refrag stage 1: {len(train[0])} multi-hop trajectories + "
           f"{sum(len(t) for t in train[1:])} single-hop examples; {n_val} held back")
    for t in train + [val]:
        if t is not None and hasattr(t, "precompute"):
            t.precompute()
    return TaskMixture(train, seed=args.seed), val


def hop0_conversation(example, docs):
    """The question with its hop-0 documents, as the Engine starts a rollout."""
    question_only = {"messages": [m for m in example["messages"] if m["role"] in ("system", "user")]}
    return insert_retrieval_message(question_only, docs, "before_user")


def score_trace(trace, example):
    """compute_rag_reward of one rollout (all documents it was shown, in number order) + what we log."""
    gold = [str(g) for g in example.get("gold_doc_ids") or []]
    r = compute_rag_reward(trace["answer"], example.get("answers") or [], trace["documents"],
                           gold_doc_ids=gold or None, format_errors=trace.get("format_errors"))
    shown = [doc_key(d) for d in trace["documents"]]
    r["all_gold"] = float(compute_retrieval_recall(shown, gold, max(1, len(shown))) == 1.0) if gold else None
    r["queries"] = len(trace["queries"])
    r["tokens"] = len(trace["mask"])
    return r


# -----------------------------------------------------------------------------
# stage 2: RL


def run_rl(args, source, model_tag, step):
    ddp, rank, local_rank, world_size, device = compute_init(args.device_type)
    device_type = device.type
    master = rank == 0
    autocast_ctx = get_autocast_ctx(device_type)
    t_start = time.time()
    model, tokenizer, meta_in = load_model(source, device, phase="train", model_tag=model_tag, step=step,
                                           block_pattern=args.block_pattern)
    out_tag = args.output_tag or meta_in["model_tag"]
    ckpt_dir = checkpoint_dir("refrag", out_tag)
    continuing = source == "refrag" and meta_in["model_tag"] == out_tag  # stage 2 after stage 1, in its own tag
    start_step = meta_in["step"] if continuing else 0
    if continuing:
        run = dict(run_id=meta_in.get("run_id"), run_started=meta_in.get("run_started"))
    else:
        run = prepare_checkpoint_dir(ckpt_dir, resume=False, overwrite=args.overwrite, rank=rank)
    model.set_activation_checkpointing(args.activation_checkpointing)
    orig_model = model
    # no torch.compile here: rollout batches change shape every step (a recompile each), and generation, which
    # dominates an RL step, runs the eager model through the Engine anyway
    model, _ = compile_and_wrap(model, 0, ddp, local_rank, device_type)
    kb = args.knowledge_base or default_kb()
    manager = RetrievalManager(args.retriever_type, kb)
    engine = Engine(orig_model, tokenizer, retriever=manager, retrieval_top_k=args.top_k_per_hop, max_hops=args.max_hops)

    qa = load_task(args.train_data, "train")
    n = len(qa) if args.max_examples <= 0 else min(len(qa), args.max_examples)
    n_val = min(args.val_examples, n // 4)  # a quarter at most: the built-in sets are small
    if n - n_val < args.rl_questions * world_size:
        raise ValueError(f"{n - n_val} RL questions for {args.rl_questions} x {world_size} per step; lower --rl-questions")
    train_idx, val_idx = list(range(n_val, n)), list(range(0, min(n_val, args.rl_eval_questions)))
    # hop-0 retrieval once, batched, for every question this run can draw
    hop0 = dict(zip(train_idx + val_idx, manager.batch_retrieve([last_user_message(qa[i]) for i in train_idx + val_idx],
                                                                args.top_k)))

    optimizers = make_optimizers(orig_model, args, args.rl_init_lr_frac)
    pad_id = tokenizer.get_bos_token_id()
    seq_len = orig_model.config.sequence_len
    top_k = args.rl_top_k if args.rl_top_k > 0 else None
    g = torch.Generator().manual_seed(args.seed)
    if master:
        reset_log("refrag_rl")

    @torch.no_grad()
    def evaluate():
        """Greedy pass over this rank's share of the validation questions: mean reward / EM / F1 / all-gold."""
        orig_model.eval()
        sums = torch.zeros(5, dtype=torch.float64, device=device)
        for i in val_idx[rank::world_size]:
            ex = qa[i]
            with autocast_ctx:
                tr = engine.generate_trajectories(hop0_conversation(ex, results_to_dicts(hop0[i])), num_samples=1,
                                                  max_tokens=args.rl_max_new_tokens, temperature=0.0)[0]
            r = score_trace(tr, ex)
            sums += torch.tensor([r["reward"], r["em"], r["f1"], r["all_gold"] or 0.0, 1.0], dtype=torch.float64,
                                 device=device)
        if ddp:
            dist.all_reduce(sums)
        orig_model.train()
        c = max(1.0, sums[4].item())
        return dict(val_reward=sums[0].item() / c, val_em=sums[1].item() / c, val_f1=sums[2].item() / c,
                    val_all_gold=sums[3].item() / c)

    first_eval = last_eval = None
    totals = dict(gen_time=0.0, train_time=0.0, rollouts=0, tokens=0)
    for step in range(args.rl_steps + 1):
        last_step = step == args.rl_steps
        if val_idx and (last_step or step % args.rl_eval_every == 0):
            last_eval = evaluate()
            first_eval = first_eval or last_eval
            print0(f"rl step {step:04d} | " + " | ".join(f"{k} {v:.4f}" for k, v in last_eval.items()))
            log_step("refrag_rl", dict(step=step, val=last_eval["val_reward"], val_name="val reward"))
        if last_step:
            break
        # every rank draws its own questions for this step (a seeded permutation shared by all ranks)
        order = torch.randperm(len(train_idx), generator=g).tolist()
        mine = [train_idx[order[(rank * args.rl_questions + j) % len(train_idx)]] for j in range(args.rl_questions)]
        logs = dict(reward=0.0, em=0.0, f1=0.0, queries=0.0, all_gold=0.0, tokens=0.0)
        gen_time = train_time = 0.0
        for j, i in enumerate(mine):
            ex = qa[i]
            synchronize(device_type)
            t0 = time.time()
            orig_model.eval()
            with autocast_ctx:
                traces = engine.generate_trajectories(hop0_conversation(ex, results_to_dicts(hop0[i])),
                                                      num_samples=args.rl_samples, max_tokens=args.rl_max_new_tokens,
                                                      temperature=args.rl_temperature, top_k=top_k,
                                                      seed=args.seed + 1000 * step + 10 * rank + j)
            orig_model.train()
            synchronize(device_type)
            t1 = time.time()
            scores = [score_trace(tr, ex) for tr in traces]
            adv = group_advantages([s["reward"] for s in scores])
            inputs, targets, weights = rollout_batch(traces, adv, pad_id, device, max_len=seq_len)
            sync_ctx = model.no_sync() if (ddp and j < len(mine) - 1) else contextlib.nullcontext()
            with sync_ctx, autocast_ctx:
                loss = policy_gradient_loss(model, inputs, targets, weights) / len(mine)
            loss.backward()
            synchronize(device_type)
            gen_time += t1 - t0
            train_time += time.time() - t1
            for key in logs:
                logs[key] += sum((s[key] or 0.0) for s in scores) / len(scores) / len(mine)
            totals["rollouts"] += len(traces)
            totals["tokens"] += sum(len(tr["mask"]) for tr in traces)
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(orig_model.parameters(), args.grad_clip)
        lrm = lr_multiplier(step, args.rl_steps, 0.0, args.warmdown_ratio, 0.0)
        step_optimizers(optimizers, orig_model, lrm)
        if ddp:
            t = torch.tensor([logs[k] for k in logs], dtype=torch.float64, device=device)
            dist.all_reduce(t)
            logs = {k: v / world_size for k, v in zip(logs, t.tolist())}
        totals["gen_time"] += gen_time
        totals["train_time"] += train_time
        step_time = gen_time + train_time
        if (step + 1) % args.log_every == 0 or step == 0:
            print0(f"rl step {step + 1:04d}/{args.rl_steps} | reward {logs['reward']:.3f} | em {logs['em']:.3f} | "
                   f"f1 {logs['f1']:.3f} | queries/q {logs['queries']:.2f} | all-gold {logs['all_gold']:.3f} | "
                   f"tokens/rollout {logs['tokens']:.0f} | {len(mine) * args.rl_samples * world_size / step_time:.1f} "
                   f"rollouts/s | generation {100 * gen_time / step_time:.0f}% of {step_time:.1f} s")
        log_step("refrag_rl", dict(step=step + 1, loss=-logs["reward"], reward=logs["reward"], lrm=lrm, dt=step_time))

    final_step = start_step + args.rl_steps
    meta = make_meta(orig_model, tokenizer, final_step, user_config=vars(args), model_tag=out_tag, stage="refrag_rl",
                     parent=dict(source=source, model_tag=meta_in["model_tag"], step=meta_in.get("step")),
                     **run, **(last_eval or {}))
    save_checkpoint(ckpt_dir, final_step, orig_model.state_dict(), [o.state_dict() for o in optimizers], meta, rank=rank)
    wall = totals["gen_time"] + totals["train_time"]
    figures = dict(source=f"{source}/{meta_in['model_tag']} step {meta_in.get('step')}",
                   output=f"refrag/{out_tag} step {final_step}", steps=args.rl_steps, samples=args.rl_samples,
                   questions_per_step=args.rl_questions * world_size,
                   rollouts_per_s=round(totals["rollouts"] * world_size / max(wall, 1e-9), 2),
                   rollout_tokens_per_s=round(totals["tokens"] * world_size / max(wall, 1e-9), 1),
                   generation_share=round(totals["gen_time"] / max(wall, 1e-9), 3),
                   **{f"first_{k}": round(v, 4) for k, v in (first_eval or {}).items()},
                   **{f"final_{k}": round(v, 4) for k, v in (last_eval or {}).items()})
    print0(f"refrag rl done: {figures}")
    write_stage("refrag_rl", figures, time_s=time.time() - t_start)
    if ddp:
        dist.barrier()
        del model
        gc.collect()
    compute_cleanup()
    return out_tag, final_step


# -----------------------------------------------------------------------------


def main():
    args = parser.parse_args()
    use_hf_local(args.hf_local)
    if args.stage in ("sft", "all"):
        rl_next = args.stage == "all" and args.use_rewards == "true"
        figures = run_sft(args, build_tasks, out_source="refrag", stage="refrag_sft", cleanup=not rl_next)
        if rl_next:
            out_tag = figures["output"].split("/", 1)[1]
            run_rl(args, "refrag", out_tag, find_last_step(checkpoint_dir("refrag", out_tag)))
    else:
        run_rl(args, args.source, args.model_tag, args.step)


if __name__ == "__main__":
    run_main(main)
