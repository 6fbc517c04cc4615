"""nanochat/report.py: stage figures, step logs and stage timings become report.md with tables and PNG plots."""

import os
import json

from nanochat import report


def test_report_sections_plots_and_timings(base_dir):
    report.reset()
    report.log_step("base_train", {"step": 0, "val": 3.0, "val_name": "val bpb"})
    for step in range(1, 6):
        report.log_step("base_train", {"step": step, "loss": 5.0 - step})
    report.write_stage("base_train", {"val_bpb": 1.5, "tokens_per_s": 1234.5}, time_s=12.0)
    report.write_stage("rag_eval", {"closed_book_em": 1.0, "rag_em": 30.0, "closed_book_f1": 5.0, "rag_f1": 40.0})
    report.write_stage("final", {"question": "q?"}, markdown="```\nanswer [1]\n```")
    with open(os.path.join(report.report_dir(), "timings.jsonl"), "w") as f:
        f.write(json.dumps({"stage": "base_train", "seconds": 20}) + "\n")
        f.write(json.dumps({"stage": "base_train", "seconds": 25}) + "\n")  # a re-run: the latest time counts
    path = report.generate()
    text = open(path).read()
    assert "## System" in text and "## Base model pretraining" in text and "| val_bpb | 1.5 |" in text
    assert "## RAG evaluation" in text and "answer [1]" in text
    assert "| base_train | 25.0 |" in text and "| base_train | 20.0 |" not in text
    d = report.report_dir()
    assert os.path.getsize(os.path.join(d, "base_train_loss.png")) > 1000
    assert os.path.getsize(os.path.join(d, "rag_eval_bars.png")) > 1000
    assert "![closed-book vs RAG](rag_eval_bars.png)" in text
    # reset starts a fresh report
    report.reset()
    assert not os.path.exists(os.path.join(d, "base_train.json")) and not os.path.exists(os.path.join(d, "timings.jsonl"))


def test_only_rank_zero_writes(base_dir, monkeypatch):
    report.reset()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    report.write_stage("sft", {"x": 1})
    report.log_step("sft", {"step": 1, "loss": 1.0})
    assert not os.path.exists(os.path.join(report.report_dir(), "sft.json"))
    assert not os.path.exists(os.path.join(report.report_dir(), "logs", "sft.jsonl"))
