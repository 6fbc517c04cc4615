"""nanochat/report.py: stage figures, step logs and stage timings become report.md with tables and PNG plots."""

import os

from nanochat import report


def test_report_sections_plots_and_timings(base_dir):
    report.reset()
    report.log_step("base_train", {"step": 0, "val": 3.0, "val_name": "val bpb"})
    for step in range(1, 6):
        report.log_step("base_train", {"step": step, "loss": 5.0 - step})
    report.write_stage("base_train", {"val_bpb": 1.5, "tokens_per_s": 1234.5}, time_s=12.0)
    report.write_stage("rag_eval", {"closed_book_em": 1.0, "rag_em": 30.0, "closed_book_f1": 5.0, "rag_f1": 40.0})
    report.write_stage("final", {"question": "q?"}, markdown="```\nanswer [1]\n```")
    # speedrun_rag.sh's completion records (the shell writes them; the format is its stage function's)
    stages = os.path.join(report.report_dir(), "stages")
    os.makedirs(stages)
    for i, (name, seconds) in enumerate((("tok_train", 3), ("base_train", 25))):
        path = os.path.join(stages, f"{name}.done")
        with open(path, "w") as f:
            f.write(f"id: {name} 2026-12-04T10:00:00 1.2\nseconds: {seconds}\nafter: none\ncommand: python -m x --y z \n")
        os.utime(path, (1e9 + i, 1e9 + i))  # the table lists stages in the order they finished
    assert [(r["stage"], r["seconds"], r["command"]) for r in report.read_stage_records()][1] == \
        ("base_train", 25.0, "python -m x --y z ")
    path = report.generate()
    text = open(path).read()
    assert "## System" in text and "## Base model pretraining" in text and "| val_bpb | 1.5 |" in text
    assert "## RAG evaluation" in text and "answer [1]" in text
    assert "| tok_train | 3.0 |\n| base_train | 25.0 |" in text
    d = report.report_dir()
    assert os.path.getsize(os.path.join(d, "base_train_loss.png")) > 1000
    assert os.path.getsize(os.path.join(d, "rag_eval_bars.png")) > 1000
    assert "![EM and F1 per system](rag_eval_bars.png)" in text
    # reset starts a fresh report
    report.reset()
    assert not os.path.exists(os.path.join(d, "base_train.json")) and not os.path.exists(stages)


def test_only_rank_zero_writes(base_dir, monkeypatch):
    report.reset()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    report.write_stage("sft", {"x": 1})
    report.log_step("sft", {"step": 1, "loss": 1.0})
    assert not os.path.exists(os.path.join(report.report_dir(), "sft.json"))
    assert not os.path.exists(os.path.join(report.report_dir(), "logs", "sft.jsonl"))
