"""
scripts/rag_finetune.py and scripts/rag_eval.py end to end on a tiny model (CPU): a KB built with the CLI,
RAG fine-tuning with the seed's underscore flag spellings, a `rag` checkpoint that load_model("rag") loads,
a block-pattern mismatch refused, and rag_eval's closed-book vs RAG table written as JSON and markdown.
"""

import os
import json

import pytest

from conftest import run_script


def build_kb(env, builtin):
    kb = os.path.join(builtin, "kb")
    if not os.path.exists(os.path.join(kb, "kb.json")):
        run_script(["nanochat.retrieval", "--documents", os.path.join(builtin, "kb_documents.jsonl"), "--output", kb,
                    "--type", "bm25"], env)
    return kb


@pytest.mark.slow
def test_rag_finetune_then_eval(sft_env, monkeypatch):
    env, base, builtin = sft_env["env"], sft_env["base"], str(sft_env["builtin"])
    kb = build_kb(env, builtin)
    # the seed's underscore spellings, a base checkpoint as the source
    p = run_script(["scripts.rag_finetune", "--source", "base", "--model_tag", "tiny", "--knowledge_base", kb,
                    "--retriever_type", "bm25", "--top_k", "2", "--device_batch_size", "4", "--block_pattern", "TM",
                    "--num-iterations", "12", "--eval-every", "6", "--eval-steps", "2", "--val-examples", "16"], env)
    assert "retrieving top-2 documents" in p.stdout
    ckpt = os.path.join(base, "rag_checkpoints", "tiny")
    assert os.path.exists(os.path.join(ckpt, "model_000012.pt"))
    with open(os.path.join(ckpt, "meta_000012.json")) as f:
        meta = json.load(f)
    assert meta["stage"] == "rag_finetune" and meta["parent"]["source"] == "base"
    with open(os.path.join(base, "report", "rag_finetune.json")) as f:
        figures = json.load(f)["figures"]
    assert figures["final_val_loss"] < figures["first_val_loss"]

    # load_model("rag") in-process
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    from nanochat.checkpoint_manager import load_model
    model, tok, meta = load_model("rag", "cpu", phase="eval")
    assert meta["source"] == "rag" and model.config.block_pattern == ["T", "M"]

    # closed-book vs RAG evaluation
    run_script(["scripts.rag_eval", "--source", "rag", "--knowledge_base", kb, "--top_k", "2", "--max-examples", "6",
                "--max-new-tokens", "8"], env)
    with open(os.path.join(base, "report", "rag_eval_results.json")) as f:
        results = json.load(f)
    s = results["summary"]
    for key in ("closed_book_em", "closed_book_f1", "closed_book_contains", "closed_book_hallucination_rate",
                "rag_em", "rag_f1", "rag_contains", "rag_hallucination_rate", "rag_citation_accuracy",
                "retrieval_recall@2", "retrieval_ndcg@2", "retrieval_mrr@2"):
        assert key in s, key
    assert s["n"] == 6 and len(results["rows"]) == 6
    assert all("answer" in r["rag"] and "answer" in r["closed_book"] for r in results["rows"])
    assert os.path.exists(os.path.join(base, "report", "rag_eval_results.md"))


@pytest.mark.slow
def test_block_pattern_mismatch_is_refused(sft_env):
    env, builtin = sft_env["env"], str(sft_env["builtin"])
    kb = build_kb(env, builtin)
    p = run_script(["scripts.rag_finetune", "--source", "base", "--model-tag", "tiny", "--knowledge-base", kb,
                    "--block-pattern", "MT", "--num-iterations", "2"], env, expect_ok=False)
    assert p.returncode != 0
    assert "block pattern mismatch" in p.stderr and "TM" in p.stderr and "MT" in p.stderr


def test_missing_kb_is_a_clear_error(pipeline_env):
    p = run_script(["scripts.rag_finetune", "--source", "base", "--knowledge-base", "/nonexistent/kb",
                    "--num-iterations", "1"], pipeline_env["env"], expect_ok=False)
    assert p.returncode != 0 and "/nonexistent/kb" in p.stderr and "does not exist" in p.stderr


def test_retrieval_only_eval(pipeline_env):
    env, builtin = pipeline_env["env"], str(pipeline_env["builtin"])
    kb = build_kb(env, builtin)
    p = run_script(["scripts.rag_eval", "--retrieval-only", "--knowledge-base", kb, "--top-k", "3"], env)
    assert "retrieval_recall@3" in p.stdout
