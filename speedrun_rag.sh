#!/usr/bin/env bash
# speedrun_rag.sh: from a fresh clone to a model that answers from its own knowledge base, with a report.
#
#   bash speedrun_rag.sh                 # picks the CPU or GPU recipe from the hardware
#   FORCE=1 bash speedrun_rag.sh         # redo every stage (default: a stage done with the same command is skipped)
#
# Stages: venv -> built-in data -> tokenizer -> base model -> SFT -> KB -> RAG fine-tune -> RAG eval (beside baselines)
#         -> REFRAG fine-tune (SFT, then RL) -> multi-hop eval -> one-shot question with citations -> report.md
#
# A stage is done when its completion record, $NANOCHAT_BASE_DIR/report/stages/<stage>.done, exists and matches. The
# record is written after the stage's command has exited with success (so a stage killed in the middle, even while
# saving its checkpoint, has none) and holds the command line and the record id of the stage before it: a stage
# whose command changed, or that follows a stage that was redone, runs again. A training stage that runs again
# replaces its checkpoints (--overwrite). `python -m nanochat.report reset` (or FORCE=1) starts everything afresh.
#
# No GPU: a small but real CPU configuration on the built-in offline corpus and KB, made from the Python
# standard library's own documentation (minutes to ~20 minutes on 2 cores). GPUs: the full recipe under
# torchrun on every GPU, pretraining data downloaded from the HF hub, a d20 hybrid ["T"]*8+["M"]*12.
#
# Environment variables (all optional; defaults depend on CPU/GPU):
#   NANOCHAT_BASE_DIR   where tokenizer, checkpoints, KB eval outputs and the report go (~/.cache/nanochat)
#   FORCE=1             redo every stage            SIZE=tiny   the smallest CPU setting (used by the tests)
#   NPROC               processes for torchrun (default: number of GPUs)
#   VOCAB_SIZE          tokenizer vocabulary        TOK_MAX_CHARS    characters to train the tokenizer on
#   DEPTH               base model depth            BLOCK_PATTERN    e.g. TTTTTTTTMMMMMMMMMMMM (one letter per layer)
#   ASPECT_RATIO        n_embd = DEPTH*ASPECT_RATIO HEAD_DIM         attention head size
#   MAX_SEQ_LEN         context length              DEVICE_BATCH_SIZE rows per forward per process
#   TOTAL_BATCH_SIZE    tokens per base step        BASE_ITERS       base steps (default: Chinchilla 20 tokens/param on GPU)
#   MAMBA_D_STATE MAMBA_HEADDIM MAMBA_CHUNK         Mamba2 sizes
#   NUM_SHARDS          pretraining shards to download (GPU)
#   NANOCHAT_BUILTIN_DIR  where the built-in corpus / KB documents / QA / KB go (<repo>/data/builtin)
#   CORPUS_FLAGS        CPU corpus flags (--with-source: add the stdlib's .py source to its docs)
#   SFT_EPOCHS SFT_DATA (builtin|smoltalk) SFT_BATCH SFT_SEQ       LR_FRAC  fine-tuning lr as a fraction of base lr
#   RAG_EPOCHS RAG_TOP_K RETRIEVER (simple|bm25|dense|hybrid)       RAG_FLAGS rag_finetune flags (GPU: --keep-best --p-no-gold 0.1, CPU: --no-raft)
#   DOC_CHARS           cap on each built-in KB document's docstring (short documents fit a small context)
#   KB_DOCS             a JSONL of your own documents for the KB (default: the built-in stdlib docs)
#   EVAL_EXAMPLES       held-out questions for rag_eval     EVAL_EVERY  val loss every N steps   EVAL_TOKENS  per val bpb
#   REFRAG_EPOCHS REFRAG_SEQ REFRAG_NEW_TOKENS     REFRAG stage 1 epochs, its row length, tokens per multi-hop answer
#   RL_STEPS RL_QUESTIONS RL_SAMPLES                REFRAG stage 2: steps, questions per step per process, samples each
#   MULTIHOP_DIR        real multi-hop data for the GPU recipe (default ../shared/data/multihop; skipped if absent)
#   QUESTION            the final one-shot question
set -euo pipefail
cd "$(dirname "$0")"
REPO=$(pwd)
export NANOCHAT_BASE_DIR=${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}
export NANOCHAT_BUILTIN_DIR=${NANOCHAT_BUILTIN_DIR:-$REPO/data/builtin}  # the built-in corpus, KB docs and QA
BUILTIN=$NANOCHAT_BUILTIN_DIR
export PYTHONUNBUFFERED=1
FORCE=${FORCE:-0}
mkdir -p "$NANOCHAT_BASE_DIR"
LOG="$NANOCHAT_BASE_DIR/speedrun.log"
STAGE_DIR="$NANOCHAT_BASE_DIR/report/stages"
PREV_STAGE=none  # the record id of the last stage run or skipped: a redone stage makes every later one run again

# stage NAME CMD...: run CMD unless NAME's completion record matches (see the header); stop at the first failure,
# naming it. The record: "id: ...", "seconds: ...", then the two lines compared, "after: <id>" and "command: ...".
stage() {
    local name=$1
    shift
    local record="$STAGE_DIR/$name.done" config id t0 seconds
    config="after: $PREV_STAGE
command: $(printf '%q ' "$@")"
    if [ "$FORCE" != "1" ] && [ -f "$record" ] && [ "$(tail -n +3 "$record")" = "$config" ]; then
        PREV_STAGE=$(sed -n 's/^id: //p' "$record")
        echo "== [$name] skipped: done with this command ($record; FORCE=1 to redo)"
        return 0
    fi
    rm -f "$record"  # not done until the command below succeeds, whatever an earlier run recorded
    echo "== [$name] $*"
    t0=$SECONDS
    if ! "$@" 2>&1 | tee -a "$LOG"; then
        echo "!! speedrun failed at stage [$name] (command: $*); see $LOG" >&2
        exit 1
    fi
    seconds=$((SECONDS - t0))
    echo "== [$name] done in $seconds s"
    id="$name $(date +%Y-%m-%dT%H:%M:%S) $$.$RANDOM"
    mkdir -p "$STAGE_DIR"
    printf 'id: %s\nseconds: %s\n%s\n' "$id" "$seconds" "$config" > "$record.tmp"
    mv "$record.tmp" "$record"  # written last, in one rename
    PREV_STAGE=$id
}
# sourced (tests/test_speedrun.py): only the stage function, nothing runs
if [ "${BASH_SOURCE[0]:-$0}" != "$0" ]; then return 0; fi

# -----------------------------------------------------------------------------
# environment: .venv with torch first (the CPU build where there is no NVIDIA GPU), then the project
# an already active virtualenv (e.g. the tests' or CI's) is used as it is; otherwise ./.venv
if [ -z "${VIRTUAL_ENV:-}" ]; then
    if [ ! -x .venv/bin/python ]; then
        echo "== creating .venv"
        python3 -m venv .venv
    fi
    # shellcheck disable=SC1091
    . .venv/bin/activate
fi
if ! python -c "import torch, nanochat, tiktoken, rustbpe, bm25s, faiss" >/dev/null 2>&1; then
    echo "== installing (torch first, then the project)"
    python -m pip install -q --upgrade pip
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        python -m pip install -q torch
    else
        python -m pip install -q torch==2.13.0
    fi
    python -m pip install -q -e ".[dev]"
fi
NGPU=$(python -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")

# -----------------------------------------------------------------------------
# configuration
SIZE=${SIZE:-default}
if [ "$NGPU" -gt 0 ]; then
    NPROC=${NPROC:-$NGPU}
    RUN="torchrun --standalone --nproc_per_node=$NPROC -m"
    VOCAB_SIZE=${VOCAB_SIZE:-65536}; TOK_MAX_CHARS=${TOK_MAX_CHARS:-2000000000}
    DEPTH=${DEPTH:-20}; BLOCK_PATTERN=${BLOCK_PATTERN:-TTTTTTTTMMMMMMMMMMMM}
    ASPECT_RATIO=${ASPECT_RATIO:-64}; HEAD_DIM=${HEAD_DIM:-128}; MAX_SEQ_LEN=${MAX_SEQ_LEN:-2048}
    DEVICE_BATCH_SIZE=${DEVICE_BATCH_SIZE:-32}; TOTAL_BATCH_SIZE=${TOTAL_BATCH_SIZE:-524288}; BASE_ITERS=${BASE_ITERS:--1}
    MAMBA_D_STATE=${MAMBA_D_STATE:-128}; MAMBA_HEADDIM=${MAMBA_HEADDIM:-64}; MAMBA_CHUNK=${MAMBA_CHUNK:-256}
    NUM_SHARDS=${NUM_SHARDS:-240}; DATA_DIR="$NANOCHAT_BASE_DIR/base_data"
    SFT_DATA=${SFT_DATA:-smoltalk}; SFT_EPOCHS=${SFT_EPOCHS:-1}; SFT_BATCH=${SFT_BATCH:-16}; SFT_SEQ=${SFT_SEQ:-2048}
    RAG_EPOCHS=${RAG_EPOCHS:-2}; RAG_TOP_K=${RAG_TOP_K:-5}; RETRIEVER=${RETRIEVER:-hybrid}; RAG_FLAGS=${RAG_FLAGS:---keep-best --p-no-gold 0.1}
    DOC_CHARS=${DOC_CHARS:-1200}; LR_FRAC=${LR_FRAC:-0.1}
    EVAL_EXAMPLES=${EVAL_EXAMPLES:-300}; EVAL_EVERY=${EVAL_EVERY:-250}; EVAL_TOKENS=${EVAL_TOKENS:-10485760}
    REFRAG_EPOCHS=${REFRAG_EPOCHS:-2}; REFRAG_SEQ=${REFRAG_SEQ:-2048}; REFRAG_NEW_TOKENS=${REFRAG_NEW_TOKENS:-768}
    RL_STEPS=${RL_STEPS:-100}; RL_QUESTIONS=${RL_QUESTIONS:-4}; RL_SAMPLES=${RL_SAMPLES:-8}
else
    RUN="python -m"
    if [ "$SIZE" = "tiny" ]; then  # the smallest end-to-end setting (tests/test_speedrun.py), about 2 minutes
        DEF=(1024 3000000 2 TM 32 32 256 4 1024 20 16 16 32 0.05 0.05 10 10 300 2)
        TINY_CAPS="--max-docs 400 --max-train 300 --max-eval 30"
    else  # the CPU default: a few minutes per stage on 2 cores
        DEF=(2048 20000000 4 TMTM 32 32 256 8 2048 900 16 32 64 1 6 200 100 300 30)
    fi
    VOCAB_SIZE=${VOCAB_SIZE:-${DEF[0]}}; TOK_MAX_CHARS=${TOK_MAX_CHARS:-${DEF[1]}}
    DEPTH=${DEPTH:-${DEF[2]}}; BLOCK_PATTERN=${BLOCK_PATTERN:-${DEF[3]}}
    ASPECT_RATIO=${ASPECT_RATIO:-${DEF[4]}}; HEAD_DIM=${HEAD_DIM:-${DEF[5]}}; MAX_SEQ_LEN=${MAX_SEQ_LEN:-${DEF[6]}}
    DEVICE_BATCH_SIZE=${DEVICE_BATCH_SIZE:-${DEF[7]}}; TOTAL_BATCH_SIZE=${TOTAL_BATCH_SIZE:-${DEF[8]}}
    BASE_ITERS=${BASE_ITERS:-${DEF[9]}}
    MAMBA_D_STATE=${MAMBA_D_STATE:-${DEF[10]}}; MAMBA_HEADDIM=${MAMBA_HEADDIM:-${DEF[11]}}; MAMBA_CHUNK=${MAMBA_CHUNK:-${DEF[12]}}
    DATA_DIR="$BUILTIN/corpus"; CORPUS_FLAGS=${CORPUS_FLAGS:---with-source}
    SFT_DATA=${SFT_DATA:-builtin}; SFT_EPOCHS=${SFT_EPOCHS:-${DEF[13]}}; SFT_BATCH=${SFT_BATCH:-$DEVICE_BATCH_SIZE}
    SFT_SEQ=${SFT_SEQ:-$MAX_SEQ_LEN}
    RAG_EPOCHS=${RAG_EPOCHS:-${DEF[14]}}; RAG_TOP_K=${RAG_TOP_K:-2}; RETRIEVER=${RETRIEVER:-bm25}
    # a tiny model learns "copy from the top document" well before "find the right one among shuffled documents",
    # so the CPU default keeps retrieval order (RAFT's shuffling and no-gold examples stay on for GPUs)
    RAG_FLAGS=${RAG_FLAGS:---no-raft}
    DOC_CHARS=${DOC_CHARS:-${DEF[17]}}; LR_FRAC=${LR_FRAC:-0.5}
    EVAL_EXAMPLES=${EVAL_EXAMPLES:-${DEF[15]}}; EVAL_EVERY=${EVAL_EVERY:-${DEF[16]}}
    EVAL_TOKENS=${EVAL_TOKENS:-$((8 * DEVICE_BATCH_SIZE * MAX_SEQ_LEN))}  # 8 val batches per evaluation
    # trajectories hold the hop-0 documents plus a block per follow-up query: twice the RAG context
    REFRAG_EPOCHS=${REFRAG_EPOCHS:-2}; REFRAG_SEQ=${REFRAG_SEQ:-$((2 * MAX_SEQ_LEN))}; REFRAG_NEW_TOKENS=${REFRAG_NEW_TOKENS:-256}
    RL_STEPS=${RL_STEPS:-${DEF[18]}}; RL_QUESTIONS=${RL_QUESTIONS:-2}; RL_SAMPLES=${RL_SAMPLES:-4}
fi
MULTIHOP_DIR=${MULTIHOP_DIR:-$REPO/../shared/data/multihop}
TAG="d${DEPTH}"
KB_DIR="$BUILTIN/kb"
QUESTION=${QUESTION:-}
echo "== nanochat-rag speedrun: $([ "$NGPU" -gt 0 ] && echo "$NGPU GPU(s), $NPROC processes" || echo "CPU") | depth $DEPTH | pattern $BLOCK_PATTERN | base dir $NANOCHAT_BASE_DIR"

if [ "$FORCE" = "1" ] || [ ! -e "$NANOCHAT_BASE_DIR/report/system.json" ]; then
    python -m nanochat.report reset
fi

# -----------------------------------------------------------------------------
# data
if [ "$NGPU" -gt 0 ]; then
    stage download python -m nanochat.dataset -n "$NUM_SHARDS"
else
    stage corpus python -m tasks.builtin_corpus $CORPUS_FLAGS --output "$DATA_DIR"
fi
# the built-in KB documents and QA pairs (train modules / held-out eval modules) are used on GPU too
stage stdlib-qa python -m tasks.stdlib_qa --output "$BUILTIN" --doc-chars "$DOC_CHARS" ${TINY_CAPS:-}

# -----------------------------------------------------------------------------
# tokenizer
stage tok_train python -m scripts.tok_train --vocab-size "$VOCAB_SIZE" --max-chars "$TOK_MAX_CHARS" --data-dir "$DATA_DIR"
stage tok_eval python -m scripts.tok_eval --data-dir "$DATA_DIR"

# -----------------------------------------------------------------------------
# base model
stage base_train $RUN scripts.base_train \
    --depth "$DEPTH" --block-pattern "$BLOCK_PATTERN" --aspect-ratio "$ASPECT_RATIO" --head-dim "$HEAD_DIM" \
    --max-seq-len "$MAX_SEQ_LEN" --device-batch-size "$DEVICE_BATCH_SIZE" --total-batch-size "$TOTAL_BATCH_SIZE" \
    --num-iterations "$BASE_ITERS" --mamba-d-state "$MAMBA_D_STATE" --mamba-headdim "$MAMBA_HEADDIM" \
    --mamba-chunk-size "$MAMBA_CHUNK" --data-dir "$DATA_DIR" --eval-every "$EVAL_EVERY" --eval-tokens "$EVAL_TOKENS" \
    --sample-every -1 --model-tag "$TAG" --overwrite

# -----------------------------------------------------------------------------
# supervised fine-tuning
stage chat_sft $RUN scripts.chat_sft \
    --source base --model-tag "$TAG" --data "$SFT_DATA" --num-epochs "$SFT_EPOCHS" --device-batch-size "$SFT_BATCH" \
    --max-seq-len "$SFT_SEQ" --eval-every "$EVAL_EVERY" --init-lr-frac "$LR_FRAC" --overwrite

# -----------------------------------------------------------------------------
# knowledge base + RAG fine-tuning + evaluation
KB_SOURCE=${KB_DOCS:-$BUILTIN/kb_documents.jsonl}
stage kb_build python -m nanochat.retrieval --documents "$KB_SOURCE" --output "$KB_DIR" --type "$RETRIEVER" --report
stage rag_finetune $RUN scripts.rag_finetune \
    --source sft --model-tag "$TAG" --knowledge-base "$KB_DIR" --top-k "$RAG_TOP_K" --num-epochs "$RAG_EPOCHS" \
    --device-batch-size "$SFT_BATCH" --eval-every "$EVAL_EVERY" --block-pattern "$BLOCK_PATTERN" \
    --init-lr-frac "$LR_FRAC" --overwrite $RAG_FLAGS
stage rag_eval $RUN scripts.rag_eval \
    --source rag --model-tag "$TAG" --knowledge-base "$KB_DIR" --top-k "$RAG_TOP_K" --max-examples "$EVAL_EXAMPLES"

# -----------------------------------------------------------------------------
# REFRAG: the model writes its own follow-up queries (stage 1: gold trajectories; stage 2: RL with Engine rollouts),
# on the built-in two-document questions; then closed-book / single-shot / fixed-rule / REFRAG side by side
stage refrag_finetune $RUN scripts.refrag_finetune \
    --source rag --model-tag "$TAG" --knowledge-base "$KB_DIR" --train-data builtin-multihop --top-k "$RAG_TOP_K" \
    --top-k-per-hop "$RAG_TOP_K" --max-hops 2 --num-epochs "$REFRAG_EPOCHS" --device-batch-size "$SFT_BATCH" \
    --max-seq-len "$REFRAG_SEQ" --eval-every "$EVAL_EVERY" --init-lr-frac "$LR_FRAC" --rl-steps "$RL_STEPS" \
    --rl-questions "$RL_QUESTIONS" --rl-samples "$RL_SAMPLES" --overwrite
stage refrag_eval $RUN scripts.rag_eval \
    --source refrag --model-tag "$TAG" --multihop --knowledge-base "$KB_DIR" --eval-data builtin-multihop \
    --top-k "$RAG_TOP_K" --top-k-per-hop "$RAG_TOP_K" --max-hops 2 --max-new-tokens "$REFRAG_NEW_TOKENS" \
    --max-examples "$EVAL_EXAMPLES"
# GPU: the same on real multi-hop questions (HotpotQA, MuSiQue, 2Wiki) when ../shared/data/multihop is there
if [ "$NGPU" -gt 0 ] && [ -f "$MULTIHOP_DIR/train.jsonl" ]; then
    MH_KB="$NANOCHAT_BASE_DIR/multihop_kb"
    stage mh_kb_build python -m nanochat.retrieval --documents "$MULTIHOP_DIR/corpus.jsonl" --output "$MH_KB" --type bm25
    stage mh_refrag_finetune $RUN scripts.refrag_finetune \
        --source rag --model-tag "$TAG" --output-tag "${TAG}_mh" --knowledge-base "$MH_KB" \
        --train-data "$MULTIHOP_DIR/train.jsonl" --top-k "$RAG_TOP_K" --top-k-per-hop 3 --max-hops 3 \
        --num-epochs "$REFRAG_EPOCHS" --device-batch-size "$SFT_BATCH" --max-seq-len "$REFRAG_SEQ" \
        --rl-steps "$RL_STEPS" --overwrite
    stage mh_refrag_eval $RUN scripts.rag_eval \
        --source refrag --model-tag "${TAG}_mh" --multihop --knowledge-base "$MH_KB" --eval-data "$MULTIHOP_DIR/dev.jsonl" \
        --split dev --top-k "$RAG_TOP_K" --top-k-per-hop 3 --max-hops 3 --max-new-tokens "$REFRAG_NEW_TOKENS" \
        --output "$NANOCHAT_BASE_DIR/report/mh_refrag_eval_results"
fi

# -----------------------------------------------------------------------------
# one question, answered with citations
if [ -z "$QUESTION" ]; then
    QUESTION=$(python -c "
import json
with open('$BUILTIN/qa_eval.jsonl') as f:
    print(json.loads(f.readline())['messages'][0]['content'])")
fi
echo "== [final] Q: $QUESTION"
FINAL_OUT=$(python -m scripts.chat_cli --source rag --model-tag "$TAG" --knowledge-base "$KB_DIR" --top-k "$RAG_TOP_K" \
    --temperature 0 -p "$QUESTION" 2>&1 | tee -a "$LOG") || { echo "!! speedrun failed at stage [final]" >&2; exit 1; }
echo "$FINAL_OUT"
python -c "
import sys
from nanochat.report import write_stage
q, a = sys.argv[1], sys.argv[2]
write_stage('final', {'question': q}, markdown='\`\`\`\n' + a.strip() + '\n\`\`\`')
" "$QUESTION" "$FINAL_OUT"

REPORT=$(python -m nanochat.report generate)
echo "== done. Report: $REPORT"
