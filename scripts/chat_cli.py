"""
Chat with a model in the terminal, optionally grounded in a knowledge base (answers cite [n] sources).

    python -m scripts.chat_cli --source rag --knowledge-base data/builtin/kb        # interactive
    python -m scripts.chat_cli --source rag --knowledge-base KB -p "What does textwrap.dedent do?"   # one shot

Interactive commands: 'quit' or 'exit' ends, 'clear' starts a new conversation. Tokens stream as they are
generated. With --knowledge-base each user turn retrieves --top-k documents that are placed before the
question (as in RAG fine-tuning) and the sources are listed after the answer.
"""

import sys

import torch

from nanochat.common import add_checkpoint_args, compute_init, ArgumentParser, get_autocast_ctx


def main():
    parser = ArgumentParser(description="Chat with a nanochat-rag model (interactive, or one question with -p).")
    add_checkpoint_args(parser, default_source="sft")
    parser.add_argument("-p", "--prompt", type=str, default=None, help="answer this one question and exit")
    parser.add_argument("--knowledge-base", type=str, default=None, help="KB directory to retrieve from (python -m nanochat.retrieval)")
    parser.add_argument("--retriever-type", type=str, default=None, help="simple|bm25|dense|hybrid (None: the KB's own)")
    parser.add_argument("--top-k", type=int, default=3, help="documents retrieved per question")
    parser.add_argument("--temperature", type=float, default=0.6, help="0 = greedy")
    parser.add_argument("--sample-top-k", type=int, default=50, help="sample among the k most likely tokens")
    parser.add_argument("--max-tokens", type=int, default=256, help="most tokens per answer")
    parser.add_argument("--device-type", type=str, default="", help="cuda | cpu | mps ('': autodetect)")
    args = parser.parse_args()

    from nanochat.checkpoint_manager import load_model
    from nanochat.engine import Engine

    _, _, _, _, device = compute_init(args.device_type)
    autocast_ctx = get_autocast_ctx(device.type)
    model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
    manager = None
    if args.knowledge_base:
        from nanochat.retrieval import RetrievalManager
        manager = RetrievalManager(args.retriever_type, args.knowledge_base)
    engine = Engine(model, tokenizer)
    assistant_end = tokenizer.encode_special("<|assistant_end|>")
    bos = tokenizer.get_bos_token_id()

    def answer(conversation):
        """Stream one answer to stdout; returns (text, documents used)."""
        docs = []
        conv = conversation
        if manager is not None:
            conv = manager.augment_conversation(conversation, top_k=args.top_k, insert_position="before_user")
            docs = next(m for m in conv["messages"] if m["role"] == "retrieval")["documents"]
        prompt, max_tokens = engine.prepare_prompt(conv, args.max_tokens)
        out, printed = [], ""
        with autocast_ctx:
            for col, _ in engine.generate(prompt, num_samples=1, max_tokens=max_tokens, temperature=args.temperature,
                                          top_k=args.sample_top_k, seed=torch.randint(0, 2**31, ()).item()):
                if col[0] in (assistant_end, bos):
                    break
                out.append(col[0])
                text = engine.decode_answer(out)
                if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                    sys.stdout.write(text[len(printed):])
                    sys.stdout.flush()
                    printed = text
        print()
        if docs:
            print("Sources:")
            for i, d in enumerate(docs, 1):
                print(f"  [{i}] {d.get('title') or d.get('id')}")
        return engine.decode_answer(out), docs

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
        text, _ = answer(conversation)
        conversation["messages"].append({"role": "assistant", "content": text})


if __name__ == "__main__":
    main()
