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
    systems = s["systems"]
    # model rows, the no-fine-tune row (the checkpoint's parent, the base model) and the model-free baselines
    for system in ("closed_book", "rag", "compare", "first_sentence", "header_line", "overlap_sentence",
                   "per_type_rule", "oracle"):
        assert system in systems, system
    for key in ("em", "f1", "contains", "abstained", "hallucination", "citation", "all_gold", "any_gold"):
        assert key in systems["rag"], key
    assert systems["closed_book"]["citation"] is None and systems["rag"]["citation_always_1"] is not None
    for key in ("retrieval_recall@2", "retrieval_ndcg@2", "retrieval_mrr@2"):
        assert key in s, key
    rows = results["rows"]
    assert s["n"] == 6 and len(rows) == 6
    assert all("answer" in r["rag"] and "answer" in r["closed_book"] for r in rows)
    # the summary is the mean of the rows, and each row's scores are those of its own answer and documents
    from scripts.rag_eval import score_answer, retrieval_metrics, mean
    for system in ("closed_book", "rag", "first_sentence"):
        for key in ("em", "f1"):
            assert systems[system][key] == pytest.approx(100 * sum(r[system][key] for r in rows) / 6, abs=0.01)
    # hallucination over the answers that do not abstain only
    assert systems["rag"]["hallucination"] == mean([r["rag"]["hallucination"] for r in rows])
    qa = [json.loads(x) for x in open(os.path.join(builtin, "qa_eval.jsonl"))][:6]
    for r, ex in zip(rows, qa):
        assert r["question"] == ex["messages"][0]["content"] and len(r["retrieved"]) == 2
        assert r["retrieval"] == retrieval_metrics(r["retrieved"], ex["gold_doc_ids"], 2)
        assert r["rag"]["em"] == score_answer(r["rag"]["answer"], ex, [])["em"]
    assert s["retrieval_recall@2"] == pytest.approx(100 * sum(r["retrieval"]["recall"] for r in rows) / 6, abs=0.01)
    md = open(os.path.join(base, "report", "rag_eval_results.md")).read()
    assert "| RAG |" in md and "| closed-book |" in md and "| rule: first sentence of doc 1 |" in md and "always citing [1]" in md


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
    assert "| retrieval (gold documents) | % |" in p.stdout and "| recall@3 |" in p.stdout
    with open(os.path.join(env["NANOCHAT_BASE_DIR"], "report", "rag_eval_results.json")) as f:
        s = json.load(f)["summary"]
    assert 0 <= s["retrieval_recall@3"] <= 100 and "rag_em" not in s and "closed_book_em" not in s


def test_rag_eval_scoring_and_table():
    from scripts.rag_eval import score_answer, format_tables, summarize
    docs = [{"id": "a", "title": "", "content": "The capital of France is Paris."},
            {"id": "b", "title": "", "content": "Rome is in Italy."}]
    ex = {"answers": ["Paris"], "gold_doc_ids": ["a"]}
    assert score_answer("Paris [1]", ex, docs) == {"em": 1.0, "f1": 1.0, "abstained": 0.0, "contains": 1.0,
                                                   "hallucination": 0.0, "citation": 1.0}
    r = score_answer("It is Paris, France [2]", ex, docs)
    assert r["em"] == 0.0 and r["contains"] == 1.0 and r["citation"] == 0.0 and 0 < r["f1"] < 1
    # citing nothing earns no citation credit; an abstention is counted as such and is never a hallucination
    assert score_answer("Paris", ex, docs)["citation"] == 0.0
    r = score_answer("The documents do not contain the answer.", ex, docs)
    assert r["abstained"] == 1.0 and r["hallucination"] is None and r["em"] == 0.0
    assert score_answer("Moscow", ex, [])["citation"] is None
    # bracketed text that is the answer stays the answer
    assert score_answer("[0, 1] [1]", {"answers": ["[0, 1]"], "gold_doc_ids": ["a"]}, docs)["em"] == 1.0
    rows = [{"rag": {"em": 1.0, "f1": 1.0, "abstained": 0.0, "hallucination": 0.0, "citation": 1.0}, "citation_always_1": 1.0},
            {"rag": {"em": 0.0, "f1": 0.5, "abstained": 1.0, "hallucination": None, "citation": 0.0}, "citation_always_1": 0.0}]
    s = summarize(rows, ["rag"])["rag"]
    assert (s["em"], s["f1"], s["abstained"], s["hallucination"], s["citation_always_1"]) == (50.0, 75.0, 50.0, 0.0, 50.0)
    t = format_tables({"n": 2, "systems": {"rag": s}, "retrieval_recall@3": 90.0})
    assert "| RAG | 50.0 | 75.0 |" in t and "always citing [1]" in t and "| recall@3 | 90.00 |" in t
