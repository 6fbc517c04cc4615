"""
scripts/chat_eval.py on a tiny trained checkpoint (CPU): a categorical task read from a local hub mirror
(--hf-local) scores exactly what an unbatched, unpadded argmax over the choice letters gives; a generative
task runs through the Engine; bad task names and a missing mirror fail clearly.

    pytest -q tests/test_chat_eval.py
"""

import os
import json

import pytest

from conftest import run_script

ARC_ROWS = [
    {"id": f"q{i}", "question": q, "choices": {"text": t, "label": l}, "answerKey": k}
    for i, (q, t, l, k) in enumerate([
        ("Which is a gas at room temperature?", ["iron", "oxygen", "salt", "wood"], ["A", "B", "C", "D"], "B"),
        ("What do plants need for photosynthesis?", ["light", "sand", "metal"], ["A", "B", "C"], "A"),
        ("Which planet is closest to the Sun?", ["Venus", "Earth", "Mercury", "Mars"], ["1", "2", "3", "4"], "3"),
        ("What is frozen water called?", ["steam", "ice", "fog", "dew", "rain"], ["A", "B", "C", "D", "E"], "B"),
        ("Which animal is a mammal?", ["shark", "whale", "trout", "eel"], ["A", "B", "C", "D"], "B"),
        ("What force pulls objects down?", ["magnetism", "friction", "gravity", "tension"], ["A", "B", "C", "D"], "C"),
        ("Which is a renewable resource?", ["coal", "oil", "wind", "gas"], ["A", "B", "C", "D"], "C"),
    ])
]


def write_arc_mirror(root):
    import pyarrow as pa
    import pyarrow.parquet as pq
    path = root / "allenai" / "ai2_arc" / "ARC-Easy" / "test-00000-of-00001.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(ARC_ROWS), path)
    return root


def reference_correct():
    """Unbatched, unpadded: one forward per question, argmax over its letters' logits."""
    import torch
    from nanochat.checkpoint_manager import load_model
    from tasks.arc import ARC
    model, tok, _ = load_model("base", torch.device("cpu"), phase="eval", model_tag="tiny")
    task = ARC("ARC-Easy", "test")
    correct = 0
    for conv in task:
        ids = tok.render_for_completion(conv, max_tokens=model.config.sequence_len)
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[0, -1]
        letters = conv["letters"]
        pred = letters[int(logits[[tok.encode(l)[0] for l in letters]].argmax())]
        correct += int(task.evaluate(conv, pred))
    return correct


@pytest.mark.slow
def test_chat_eval_categorical_and_generative(sft_env, tmp_path, monkeypatch):
    env, base = dict(sft_env["env"]), sft_env["base"]
    mirror = write_arc_mirror(tmp_path / "hub")
    env["HF_HUB_OFFLINE"] = "1"  # the mirror must be enough
    p = run_script(["scripts.chat_eval", "--source", "base", "--model-tag", "tiny", "-a", "ARC-Easy,StdlibQA",
                    "--max-problems", "3", "--batch-size", "3", "--max-new-tokens", "8", "--hf-local", str(mirror)], env)
    with open(os.path.join(base, "report", "chat_eval.json")) as f:
        figures = json.load(f)["figures"]
    assert "StdlibQA: " in p.stdout and "of 3 " in p.stdout and 0 <= figures["StdlibQA accuracy %"] <= 100
    # all 7 ARC questions (--max-problems applies to StdlibQA too, so run ARC alone)
    p = run_script(["scripts.chat_eval", "--source", "base", "--model-tag", "tiny", "-a", "ARC-Easy",
                    "--batch-size", "3", "--hf-local", str(mirror)], env)
    with open(os.path.join(base, "report", "chat_eval.json")) as f:
        figures = json.load(f)["figures"]
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    monkeypatch.setenv("NANOCHAT_HF_LOCAL", str(mirror))
    want = reference_correct()
    assert f"ARC-Easy: {100 * want / 7:.2f}% of 7 " in p.stdout
    assert figures["ARC-Easy accuracy %"] == round(100 * want / 7, 2) and figures["source"] == "base/tiny"


def test_chat_eval_bad_task_and_missing_mirror(sft_env, tmp_path):
    env = dict(sft_env["env"], HF_HUB_OFFLINE="1")
    p = run_script(["scripts.chat_eval", "--source", "base", "--model-tag", "tiny", "-a", "NoSuchTask"], env,
                   expect_ok=False)
    assert p.returncode != 0 and "unknown task 'NoSuchTask'" in p.stderr
    p = run_script(["scripts.chat_eval", "--source", "base", "--model-tag", "tiny", "-a", "ARC-Easy",
                    "--hf-local", str(tmp_path / "nowhere")], env, expect_ok=False)
    assert p.returncode != 0 and "--hf-local" in p.stderr and "is not a directory" in p.stderr
