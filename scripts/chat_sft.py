"""
Supervised fine-tuning (SFT) on conversations: the loop is nanochat/sft.py, this script picks the data.

    python -m scripts.chat_sft --source base --data builtin          # CPU default: stdlib-docs chat + identity
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_sft -- --source base --data smoltalk

The result is an `sft` checkpoint (load_model("sft")).
"""

import os

from nanochat.common import ArgumentParser, repo_dir, run_main
from nanochat.sft import add_sft_args, run_sft
from tasks.common import TaskMixture
from tasks.customjson import CustomJSON
from tasks.stdlib_qa import StdlibChat
from tasks.smoltalk import SmolTalk
from tasks.mmlu import MMLU
from tasks.gsm8k import GSM8K

# -----------------------------------------------------------------------------
# chat_sft's own data choice

def build_sft_tasks(args):
    """(train_task, val_task) for --data builtin | smoltalk | none, plus any --custom-json files."""
    identity = os.path.join(repo_dir(), "data", "identity_conversations.jsonl")
    extra = [CustomJSON(p) for p in args.custom_json]
    if args.data == "builtin":
        train = [StdlibChat("train")] + extra  # the built-in chat set already mixes in data/identity_conversations.jsonl
        val = StdlibChat("val")
    elif args.data == "smoltalk":
        # nanochat's SFT mixture, plus our identity conversations twice
        train = [SmolTalk(split="train"), MMLU(subset="auxiliary_train", split="train"), GSM8K(subset="main", split="train"),
                 CustomJSON(identity), CustomJSON(identity)] + extra
        val = SmolTalk(split="test")
    elif args.data == "none":
        if not extra:
            raise ValueError("--data none needs at least one --custom-json file")
        train, val = extra, None
    else:
        raise ValueError(f"--data must be builtin, smoltalk or none, got {args.data!r}")
    return TaskMixture(train, seed=args.seed), val


parser = ArgumentParser(description="Supervised fine-tuning of a base model on conversations.")
add_sft_args(parser, default_source="base")
parser.add_argument("--data", type=str, default="builtin", help="builtin (stdlib docs, offline) | smoltalk (HF hub) | none")
parser.add_argument("--custom-json", type=str, action="append", default=[],
                    help="extra JSONL file(s) of {'messages': [...]} conversations (repeatable)")


if __name__ == "__main__":
    run_main(lambda: run_sft(parser.parse_args(), build_sft_tasks, out_source="sft", stage="sft"))
