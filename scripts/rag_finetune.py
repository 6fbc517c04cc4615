"""
RAG fine-tuning: teach a model to answer from retrieved documents and cite them as [n].

    python -m scripts.rag_finetune --source sft --knowledge-base data/builtin/kb --retriever-type bm25 --top-k 3
    torchrun --standalone --nproc_per_node=8 -m scripts.rag_finetune --source sft --knowledge_base KB --top_k 5
    python -m scripts.rag_finetune --source base --train-data my_qa.jsonl --knowledge-base KB --block-pattern TTMM

Training conversations are QA examples with a retrieval message inserted (tasks/rag_task.py): the question
retrieves --top-k documents from the KB once, before training (cached), and the target answer cites the gold
document's position. RAFT (Zhang et al. 2024, "RAFT: Adapting Language Model to Domain Specific RAG") is on
by default: when retrieval missed the gold document it is swapped in, and with probability --p-no-gold it is
removed and the target becomes "The documents do not contain the answer.", so the model learns to rely on
the documents and to say when they do not help. Documents are masked out of the loss.

The loop (packing, schedule, eval, checkpointing, resume) is nanochat/sft.py; the result is saved as a `rag`
checkpoint (load_model("rag")). Every flag also takes the seed's underscore spelling (--model_tag, --top_k, ...).
"""

from nanochat.common import ArgumentParser, print0, run_main
from nanochat.retrieval import RetrievalManager
from nanochat.sft import add_sft_args, run_sft
from tasks.rag_task import create_rag_task
from tasks.registry import load_task, default_kb

parser = ArgumentParser(description="RAG fine-tuning: answer from retrieved documents with citations.")
add_sft_args(parser, default_source="sft")
parser.add_argument("--knowledge-base", type=str, default=None,
                    help="KB directory (python -m nanochat.retrieval); None: the built-in stdlib KB for --train-data builtin")
parser.add_argument("--retriever-type", type=str, default=None,
                    help="simple|bm25|dense|hybrid, checked against the KB (None: the KB's own type)")
parser.add_argument("--top-k", type=int, default=3, help="documents per question")
parser.add_argument("--train-data", type=str, default="builtin",
                    help="a task name of tasks/registry.py (builtin, squad, hotpotqa, pubmedqa:DIR) or a QA JSONL file")
parser.add_argument("--rag-kind", type=str, default="rag", choices=["rag", "multihop"],
                    help="single retrieval, or two hops (the second query adds what the first hop found)")
parser.add_argument("--no-raft", action="store_true", help="train on the retrieved documents as they are")
parser.add_argument("--p-no-gold", type=float, default=0.2, help="RAFT: fraction of examples whose gold document is removed")
parser.add_argument("--val-examples", type=int, default=200, help="training questions held back for the val loss")
parser.add_argument("--max-examples", type=int, default=-1, help="use at most this many training questions")


def build_rag_tasks(args):
    """(train_task, val_task): the training questions minus the first --val-examples, which give the val loss."""
    kb = args.knowledge_base or (default_kb() if args.train_data == "builtin" else None)
    if kb is None:
        raise ValueError("--knowledge-base is required unless --train-data builtin")
    manager = RetrievalManager(args.retriever_type, kb)
    qa = load_task(args.train_data, "train")
    n = len(qa) if args.max_examples <= 0 else min(len(qa), args.max_examples)
    n_val = min(args.val_examples, n // 10)
    if args.rag_kind == "multihop":
        common = dict(base_task=qa, retriever=manager, top_k_per_hop=args.top_k, num_hops=2)
        train = create_rag_task("multihop", start=n_val, stop=n, **common)
        val = create_rag_task("multihop", start=0, stop=n_val, **common) if n_val else None
    else:
        common = dict(base_task=qa, retriever=manager, top_k=args.top_k, seed=args.seed)
        train = create_rag_task("rag", raft=not args.no_raft, p_no_gold=args.p_no_gold, start=n_val, stop=n, **common)
        val = create_rag_task("rag", raft=False, start=0, stop=n_val, **common) if n_val else None
    # retrieval happens here, once per example, so the training loop never waits on it
    print0(f"retrieving top-{args.top_k} documents for {n} questions from {kb} ({manager.retriever_type})")
    for t in (train, val):
        if t is not None:
            t.precompute()
    return train, val


if __name__ == "__main__":
    run_main(lambda: run_sft(parser.parse_args(), build_rag_tasks, out_source="rag", stage="rag_finetune"))
