"""
scripts/chat_cli.py on a tiny trained checkpoint (CPU): one-shot -p with a knowledge base lists the retrieved
sources in rank order; the interactive loop answers each turn, 'clear' starts over, 'quit' and end of input
both exit cleanly. And what it shows after a multi-hop (REFRAG) answer: the queries, what each brought, and every
source of every hop with its number, cited ones marked.

    pytest -q tests/test_chat_cli.py
"""

import sys
import subprocess

import pytest

from conftest import REPO
from test_rag_finetune import build_kb
from test_engine import run_refrag, multihop_script
from nanochat.metrics import citation_numbers
from nanochat.tokenizer import NOTICE_HOP_CAP, NOTICE_NO_NEW_DOCUMENTS
from scripts.chat_cli import describe_trace, NOT_SHOWN


def test_describe_trace_lists_queries_and_all_sources(tiny_tokenizer):
    # a real Engine trace: the model (scripted) asks three queries; the answer cites [3]
    trace = run_refrag(tiny_tokenizer, "T", [multihop_script(tiny_tokenizer)])["traces"][0]
    assert describe_trace(trace) == [
        "Searches:",
        "  1. capital Italy -> [3] [4]",
        f"  2. Paris capital -> {NOTICE_NO_NEW_DOCUMENTS}",
        f"  3. Turin -> {NOTICE_HOP_CAP}",
        "Sources:",
        "  [1] Paris",
        "  [2] Lyon",
        " *[3] Rome (search 1)",
        "  [4] Milan (search 1)",
    ]
    # a document trimmed from the prompt is listed as not shown (the model never saw it); no queries, no "Searches:"
    trace = dict(trace, queries=[], documents=[dict(d, shown=d["number"] != 2) for d in trace["documents"]])
    assert describe_trace(trace)[:3] == ["Sources:", "  [1] Paris", "  [2] Lyon" + NOT_SHOWN]


def chat(env, *args, stdin=""):
    return subprocess.run([sys.executable, "-m", "scripts.chat_cli", "--source", "base", "--model-tag", "tiny",
                           "--max-tokens", "6", *args], cwd=REPO, env=env, input=stdin, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_chat_cli_one_shot_and_interactive(sft_env):
    env, builtin = sft_env["env"], str(sft_env["builtin"])
    kb = build_kb(env, builtin)
    question = "What does textwrap.dedent do?"
    p = chat(env, "--knowledge-base", kb, "--top-k", "2", "--temperature", "0", "-p", question)
    assert p.returncode == 0, p.stderr
    from nanochat.retrieval import RetrievalManager
    hits = RetrievalManager(None, kb).retrieve(question, 2)
    lines = [line.replace(NOT_SHOWN, "") for line in p.stdout.rstrip("\n").splitlines()]  # 128-token model
    cited = citation_numbers(p.stdout.split("Sources:")[0])  # the answer (a tiny model may write "[1]" by chance)
    want = ["Sources:"] + [f" {'*' if i in cited else ' '}[{i}] {d.title or d.id}" for i, (d, _) in enumerate(hits, 1)]
    assert lines[-3:] == want
    # interactive: two turns, a clear, an empty line (ignored), another turn, quit
    p = chat(env, "--temperature", "0", stdin="hello\nwhat is json?\nclear\n\nhello\nquit\nnever read\n")
    assert p.returncode == 0, p.stderr
    assert "Type 'quit' to exit" in p.stdout and p.stdout.count("Assistant: ") == 3
    assert p.stdout.count("User: ") == 6  # the prompt is shown for every line read, up to quit
    answers = [a.split("\n")[0] for a in p.stdout.split("Assistant: ")[1:]]
    assert answers[2] == answers[0]  # after 'clear', "hello" is answered as in a fresh conversation (greedy)
    # end of input (Ctrl-D) ends the session like quit
    p = chat(env, stdin="hello\n")
    assert p.returncode == 0 and p.stdout.count("Assistant: ") == 1 and "Traceback" not in p.stderr
