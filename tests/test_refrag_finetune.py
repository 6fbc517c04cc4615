"""
scripts/refrag_finetune.py end to end on a tiny model (CPU): stage 1 (gold trajectories through the shared SFT loop)
and stage 2 (Engine rollouts, compute_rag_reward, policy gradient) under torchrun with 2 gloo processes, the refrag
checkpoints of both stages, load_model("refrag"), rag_eval's multi-hop table on the result, and the seed's command
line stopping with one clear line where it cannot run.
"""

import os
import json

import pytest

from conftest import run_script
from test_rag_finetune import build_kb


@pytest.mark.slow
def test_refrag_both_stages_ddp_then_multihop_eval(sft_env, monkeypatch):
    env, base, builtin = sft_env["env"], sft_env["base"], str(sft_env["builtin"])
    kb = build_kb(env, builtin)
    run_script(["torchrun", "--standalone", "--nproc_per_node=2", "-m", "scripts.refrag_finetune", "--source", "base",
                "--model_tag", "tiny", "--knowledge_base", kb, "--max_hops", "2", "--use_rewards", "true",
                "--top-k", "2", "--top-k-per-hop", "2", "--device-batch-size", "2", "--num-iterations", "4",
                "--eval-every", "2", "--eval-steps", "1", "--rl-steps", "2", "--rl-questions", "2", "--rl-samples", "2",
                "--rl-max-new-tokens", "40", "--rl-eval-every", "1", "--rl-eval-questions", "2", "--val-examples", "2",
                "--log-every", "1"], env, timeout=900)
    ckpt = os.path.join(base, "refrag_checkpoints", "tiny")
    steps = sorted(int(f[5:11]) for f in os.listdir(ckpt) if f.startswith("meta_"))
    assert steps == [4, 6], steps  # stage 1 at its last step, stage 2 after it, one tag
    with open(os.path.join(ckpt, "meta_000006.json")) as f:
        meta = json.load(f)
    assert meta["stage"] == "refrag_rl" and meta["parent"] == {"source": "refrag", "model_tag": "tiny", "step": 4}
    with open(os.path.join(base, "report", "refrag_rl.json")) as f:
        figures = json.load(f)["figures"]
    for key in ("rollouts_per_s", "rollout_tokens_per_s", "generation_share", "final_val_reward", "questions_per_step"):
        assert key in figures, key
    assert figures["questions_per_step"] == 4  # 2 questions x 2 processes
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    from nanochat.checkpoint_manager import load_model
    _, _, loaded = load_model("refrag", "cpu", phase="eval")
    assert loaded["step"] == 6 and loaded["source"] == "refrag"

    # the multi-hop evaluation: closed-book, single-shot, fixed rule, REFRAG and RAG at REFRAG's k, beside baselines
    out = os.path.join(str(base), "mh")
    p = run_script(["scripts.rag_eval", "--source", "refrag", "--multihop", "--knowledge-base", kb, "--eval-data",
                    "builtin-multihop", "--split", "dev", "--max-examples", "3", "--max-new-tokens", "40", "--top-k", "2",
                    "--top-k-per-hop", "2", "--max-hops", "2", "--output", out], env, timeout=600)
    with open(out + ".json") as f:
        res = json.load(f)
    systems = res["summary"]["systems"]
    for system in ("closed_book", "rag", "compare", "multihop_rule", "refrag", "rag_at_refrag_k", "first_sentence", "oracle"):
        assert system in systems, system
    for row in res["rows"]:
        assert row["refrag"]["queries"] <= 2 and row["refrag"]["docs"] >= len(row["retrieved"])
        assert row["rag"]["docs"] == 2 and row["closed_book"]["docs"] == 0
    assert "| REFRAG |" in p.stdout and "all-gold" in p.stdout


def test_seed_command_line_stops_with_one_clear_line(pipeline_env):
    # the seed's README command (torchrun ... --knowledge_base data/kb --max_hops 3 --use_rewards true), one process
    p = run_script(["scripts.refrag_finetune", "--knowledge_base", "/nonexistent/kb", "--max_hops", "3",
                    "--use_rewards", "true"], pipeline_env["env"], expect_ok=False)
    assert p.returncode == 2
    lines = [l for l in p.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "/nonexistent/kb" in lines[0], p.stderr
