"""
Chat with a model in the terminal, optionally grounded in a knowledge base (answers cite [n] sources).

    python -m scripts.chat_cli --source rag --knowledge-base data/builtin/kb        # interactive
    python -m scripts.chat_cli --source rag --knowledge-base KB -p "What does textwrap.dedent do?"   # one shot

    python -m scripts.chat_cli --source refrag --knowledge-base KB --max-hops 3 -p "..."   # multi-hop (REFRAG)

Interactive commands: 'quit' or 'exit' ends, 'clear' starts a new conversation. Tokens stream as they are
generated. With --knowledge-base each user turn retrieves --top-k documents that are placed before the question
(as in RAG fine-tuning); a model that writes follow-up queries (REFRAG) gets --top-k-per-hop new documents per
query from the same KB, up to --max-hops queries. After the answer come the queries it wrote and every source it
was shown, numbered as it cites them ([n], all hops; cited ones marked *).
"""

import sys

import torch

from nanochat.common import add_checkpoint_args, compute_init, ArgumentParser, get_autocast_ctx, run_main
from nanochat.metrics import citation_numbers
from nanochat.checkpoint_manager import load_model
from nanochat.engine import Engine
from nanochat.retrieval import RetrievalManager


NOT_SHOWN = " (not shown: no room in the context)"


def describe_trace(trace):
    """
    The lines shown after an answer: the queries the model wrote, each with what it brought ([n] numbers or the
    Engine's notice), then every source, all hops, numbered as the answer cites them (* = cited; a retrieved
    document that did not fit in the context is listed as not shown).
    """
    lines = []
    blocks = [p for p in trace["parts"] if p["type"] == "documents"]  # one per closed query, in order
    if trace["queries"]:
        lines.append("Searches:")
        for h, query in enumerate(trace["queries"], 1):
            block = blocks[h - 1] if h <= len(blocks) else {"documents": [], "notice": "(cut off)"}
            found = " ".join(f"[{d['number']}]" for d in block["documents"]) or block.get("notice", "")
            lines.append(f"  {h}. {query} -> {found}")
    if trace["documents"]:
        cited = set(citation_numbers(trace["answer"]))
        lines.append("Sources:")
        for d in trace["documents"]:
            mark = "*" if d["number"] in cited else " "
            note = f" (search {d['hop']})" if d["hop"] else ""
            note += "" if d["shown"] else NOT_SHOWN
            lines.append(f" {mark}[{d['number']}] {d.get('title') or d.get('id')}{note}")
    return lines


def main():
    parser = ArgumentParser(description="Chat with a nanochat-rag model (interactive, or one question with -p).")
    add_checkpoint_args(parser, default_source="sft")
    parser.add_argument("-p", "--prompt", type=str, default=None, help="answer this one question and exit")
    parser.add_argument("--knowledge-base", type=str, default=None, help="KB directory to retrieve from (python -m nanochat.retrieval)")
    parser.add_argument("--retriever-type", type=str, default=None, help="simple|bm25|dense|hybrid (None: the KB's own)")
    parser.add_argument("--top-k", type=int, default=3, help="documents retrieved per question")
    parser.add_argument("--top-k-per-hop", type=int, default=3, help="new documents per follow-up query (REFRAG)")
    parser.add_argument("--max-hops", type=int, default=3, help="most follow-up queries per answer (REFRAG)")
    parser.add_argument("--temperature", type=float, default=0.6, help="0 = greedy")
    parser.add_argument("--sample-top-k", type=int, default=50, help="sample among the k most likely tokens (0: all)")
    parser.add_argument("--max-tokens", type=int, default=256, help="most tokens per answer (forced documents included)")
    parser.add_argument("--device-type", type=str, default="", help="cuda | cpu | mps ('': autodetect)")
    args = parser.parse_args()

    _, _, _, _, device = compute_init(args.device_type)
    autocast_ctx = get_autocast_ctx(device.type)
    model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
    manager = None
    if args.knowledge_base:
        manager = RetrievalManager(args.retriever_type, args.knowledge_base)
    engine = Engine(model, tokenizer, retriever=manager, retrieval_top_k=args.top_k_per_hop, max_hops=args.max_hops)
    assistant_end = tokenizer.encode_special("<|assistant_end|>")
    bos = tokenizer.get_bos_token_id()

    def answer(conversation):
        """Stream one answer to stdout, then its queries and sources; returns the trace (Engine.generate_trajectories)."""
        conv = conversation
        if manager is not None:
            conv = manager.augment_conversation(conversation, top_k=args.top_k, insert_position="before_user")
        out, printed, done = [], "", False

        def stream(token_column, mask_column):
            nonlocal printed, done
            if done or token_column[0] in (assistant_end, bos):
                done = True
                return
            out.append(token_column[0])
            text = engine.decode_answer(out)  # document blocks and queries are not shown as the answer
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                sys.stdout.write(text[len(printed):])
                sys.stdout.flush()
                printed = text

        with autocast_ctx:
            trace = engine.generate_trajectories(conv, num_samples=1, max_tokens=args.max_tokens,
                                                 temperature=args.temperature, top_k=args.sample_top_k or None,
                                                 seed=torch.randint(0, 2**31, ()).item(), on_tokens=stream)[0]
        print()
        for line in describe_trace(trace):
            print(line)
        return trace

    if args.prompt is not None:
        answer({"messages": [{"role": "user", "content": args.prompt}]})
        return

    print(f"nanochat-rag chat ({args.source}/{meta['model_tag']}{', KB ' + args.knowledge_base if manager else ''}). "
          "Type 'quit' to exit, 'clear' to start over.")
    conversation = {"messages": []}
    while True:
        try:
            user = input("\nUser: ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            break
        if user.lower() in ("quit", "exit"):
            break
        if user.lower() == "clear":
            conversation = {"messages": []}
            continue
        if not user:
            continue
        conversation["messages"].append({"role": "user", "content": user})
        sys.stdout.write("Assistant: ")
        trace = answer(conversation)
        conversation["messages"].append({"role": "assistant", "content": trace["answer"]})


if __name__ == "__main__":
    run_main(main)
