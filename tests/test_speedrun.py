"""
speedrun_rag.sh end to end in its smallest CPU setting (SIZE=tiny): every stage runs, report.md is written
with a section per stage, a second run skips every stage (resumable), and a failing stage is named.
"""

import os
import sys
import subprocess

import pytest

from conftest import REPO


def speedrun(tmp_path, **extra):
    env = dict(os.environ)
    env.update(SIZE="tiny", NANOCHAT_BASE_DIR=str(tmp_path / "base"), NANOCHAT_BUILTIN_DIR=str(tmp_path / "builtin"),
               VIRTUAL_ENV=sys.prefix, PATH=os.path.dirname(sys.executable) + os.pathsep + env["PATH"],
               OMP_NUM_THREADS="1")
    env.update(extra)
    return subprocess.run(["bash", os.path.join(REPO, "speedrun_rag.sh")], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)


@pytest.mark.slow
def test_speedrun_tiny_end_to_end(tmp_path):
    p = speedrun(tmp_path)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    report_dir = tmp_path / "base" / "report"
    report = (report_dir / "report.md").read_text()
    for title in ("Tokenizer training", "Base model pretraining", "Supervised fine-tuning", "RAG fine-tuning",
                  "RAG evaluation", "Final one-shot question", "Time per stage", "## System"):
        assert title in report, title
    assert "rag_em" in report and "closed_book_em" in report
    assert (report_dir / "rag_eval_bars.png").exists() and (report_dir / "base_train_loss.png").exists()
    assert "Report:" in p.stdout and "Sources:" in p.stdout  # the final answer lists its sources
    # resumable: a second run skips every stage
    p2 = speedrun(tmp_path)
    assert p2.returncode == 0, p2.stdout[-3000:] + p2.stderr[-3000:]
    for stage in ("corpus", "stdlib-qa", "tok_train", "base_train", "chat_sft", "kb_build", "rag_finetune", "rag_eval"):
        assert f"[{stage}] skipped" in p2.stdout, stage
    # a failing stage stops the run and is named
    p3 = speedrun(tmp_path, DEPTH="3", BLOCK_PATTERN="TXT")
    assert p3.returncode != 0
    assert "failed at stage [base_train]" in p3.stderr
    assert "'X'" in p3.stdout + p3.stderr  # the bad block letter is named
