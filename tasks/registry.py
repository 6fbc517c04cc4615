"""
The one table of named tasks that the scripts accept (chat_eval -a, rag_finetune --train-data, rag_eval
--eval-data, refrag_finetune), so every script spells a dataset the same way.

    from tasks.registry import load_task, TASKS
    qa = load_task("builtin", "dev")              # built-in stdlib QA, the dev split
    qa = load_task("pubmedqa:../shared/data/pubmedqa", "test")
    qa = load_task("my_qa.jsonl")                  # any JSONL file in the QA schema (tasks/qa.py), multi-hop included
A file whose examples carry "hops" (the multihop schema, tasks/multihop.py) loads as MultiHopQA, which checks them.

Splits are "train", "dev" and "test". Datasets without a dev split of their own map dev to their evaluation split
(say which one in the table); the built-in QA has all three (tasks/stdlib_qa.py: recipes are chosen on dev, test is
reported once per recipe).
"""

import os

from nanochat.common import builtin_dir
from tasks.stdlib_qa import StdlibQA
from tasks.stdlib_multihop import StdlibMultiHop
from tasks.qa import SQuAD, HotpotQA, PubMedQA, QAJsonl
from tasks.multihop import MultiHopQA
from tasks.arc import ARC
from tasks.mmlu import MMLU
from tasks.gsm8k import GSM8K

SPLITS = ("train", "dev", "test")


def _pubmedqa(split, arg):
    if not arg:
        raise ValueError("pubmedqa needs its directory: pubmedqa:DIR (DIR holds ori_pqal.json and test_ground_truth.json)")
    return PubMedQA("train" if split == "train" else "test", local_path=arg)


# name -> (what it is, function(split, argument after "name:") -> Task)
TASKS = {
    "builtin": ("built-in stdlib QA: train = rag modules, dev and test = two disjoint sets of held-out modules",
                lambda split, arg: StdlibQA({"train": "train", "dev": "dev", "test": "eval"}[split])),
    "builtin-multihop": ("built-in stdlib two-document questions with gold hops (same module split as builtin)",
                         lambda split, arg: StdlibMultiHop({"train": "train", "dev": "dev", "test": "eval"}[split])),
    "squad": ("SQuAD v1.1 (HF hub); dev and test are its validation split",
              lambda split, arg: SQuAD("train" if split == "train" else "validation")),
    "hotpotqa": ("HotpotQA distractor (HF hub); dev and test are its validation split",
                 lambda split, arg: HotpotQA("train" if split == "train" else "validation")),
    "pubmedqa": ("PubMedQA expert set from a local dir (pubmedqa:DIR); dev and test are the 500 test ids", _pubmedqa),
    "ARC-Easy": ("ARC-Easy multiple choice (HF hub)", lambda split, arg: ARC("ARC-Easy", "train" if split == "train" else "test")),
    "ARC-Challenge": ("ARC-Challenge multiple choice (HF hub)",
                      lambda split, arg: ARC("ARC-Challenge", "train" if split == "train" else "test")),
    "MMLU": ("MMLU multiple choice (HF hub)",
             lambda split, arg: MMLU("auxiliary_train", "train") if split == "train" else MMLU("all", "test")),
    "GSM8K": ("GSM8K grade-school maths (HF hub)", lambda split, arg: GSM8K("main", "train" if split == "train" else "test")),
}
ALIASES = {"StdlibQA": "builtin"}  # chat_eval's name before the table existed


def default_kb():
    """The built-in stdlib KB directory (python -m nanochat.retrieval --documents <builtin>/kb_documents.jsonl ...)."""
    return os.path.join(builtin_dir(), "kb")


def task_names():
    return list(TASKS) + list(ALIASES)


def load_task(spec, split="test"):
    """A Task from a table name ("builtin", "pubmedqa:DIR", ...) or the path of a QA JSONL file."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if os.path.isfile(spec):
        qa = QAJsonl(spec)
        return MultiHopQA(spec) if any(ex.get("hops") for ex in qa.examples) else qa
    name, _, arg = spec.partition(":")
    name = ALIASES.get(name, name)
    if name not in TASKS:
        hint = f" (no such file either)" if os.sep in spec or spec.endswith(".jsonl") else ""
        raise ValueError(f"unknown task {spec!r}{hint}; choose from {', '.join(TASKS)} or give a QA JSONL file")
    return TASKS[name][1](split, arg)
