#!/usr/bin/env bash
# Single-GPU device-tool calls, one phase per call (the machine stays warm between calls, so /tmp/ncgpu persists):
#   PHASE=bench : benchmarks/bench_model.py (train: every pattern x Mamba path eager, plus compiled all-T and
#                 1-in-4 hybrid; decode at 2k/8k/32k) and benchmarks/check_mamba_triton.py
#   PHASE=base  : offline real text (stdlib docs + stdlib and site-packages .py source), tokenizer, KB, then a d8
#                 1-in-4 hybrid and a d8 all-T base model for the same number of steps (compiled, bf16)
#   PHASE=rag   : SFT of the hybrid, RAG fine-tune, rag_eval closed-book vs RAG, and a plain chat_sft with the
#                 same tokens per step as the RAG fine-tune (step-time ratio)
#   PHASE=A     : data (in the background) beside the compiled benchmarks + Mamba check, then the all-T base
#                 (IT_ALLT steps), then the eager and decode benchmarks
#   PHASE=B     : data, the hybrid base (IT_HYB steps), then the rag phase (RAG_EPOCHS epochs of rag_finetune)
# Steps whose artefacts exist on this machine are skipped (FORCE=1 redoes them).
# Measured on an H200 (2026-12-03): data 38 s, mamba_check 280 s, bench_train_compiled 207 s, d8 hybrid base 450
# steps 296 s, all-T 450 steps ~125 s, sft 95 s, rag 10 epochs 142 s, rag_eval 200 questions ~85 s. A call ends at
# 600 s: A and B as written do not fit in one call each; chain follow-up calls inside the 30 s warm window.
# CPU dry run: SMALL=1 PHASE=base OUT=/tmp/o bash dev/gpu_single.sh (then PHASE=rag)
set -u
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"; S=$OUT/summary_${PHASE}.txt
export PYTHONUNBUFFERED=1
if [ -d .whl ] && ! python3 -c "import rustbpe, bm25s" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl; fi
export PYTHONPATH=/tmp/site:$PWD/.carry/mamba:$PWD
export NANOCHAT_BASE_DIR=${NANOCHAT_BASE_DIR:-/tmp/ncgpu}; export NANOCHAT_BUILTIN_DIR=$NANOCHAT_BASE_DIR/builtin
B=$NANOCHAT_BUILTIN_DIR; LOGS=$NANOCHAT_BASE_DIR/logs; mkdir -p "$LOGS"
step() { local name=$1; shift; local t0=$SECONDS
         if [ $SECONDS -gt "${DEADLINE:-520}" ]; then echo "== $name: skipped (deadline)" | tee -a "$S"; return 1; fi
         echo "== $name: $*" | tee -a "$S"; "$@" > "$LOGS/$name.log" 2>&1; local rc=$?
         echo "   rc=$rc ($((SECONDS - t0)) s)" | tee -a "$S"
         grep -E "^done|done:|val bpb|final|^\| |error|Error|PASS|FAIL" "$LOGS/$name.log" | tail -${TAILN:-12} >> "$S"
         [ -d "$NANOCHAT_BASE_DIR/report/logs" ] && cp -r "$NANOCHAT_BASE_DIR/report/logs" "$LOGS/steplogs_$name"
         tar czf "$OUT/logs_${PHASE}.tgz" -C "$LOGS" . 2>/dev/null; return $rc; }  # after every step: a killed call still returns them
if [ "${SMALL:-0}" = 1 ]; then
    D="--depth 2 --aspect-ratio 32 --head-dim 32 --mamba-d-state 16 --mamba-headdim 16 --mamba-chunk-size 32"
    HYB=TM; ALLT=TT; SEQ=128; DBS=4; TBS=1024; IT=6; VOCAB=1024; SRC=""; COMPILE=0; EV=10; RSEQ=256; BSMALL=--small; QA=
else
    D="--depth 8 --aspect-ratio 64 --head-dim 128"
    HYB=MMMTMMMT; ALLT=TTTTTTTT; SEQ=2048; DBS=32; TBS=262144; IT=${IT:-300}; VOCAB=16384
    SRC="--with-source --site-packages --max-chars 3e8"; COMPILE=1; EV=200; RSEQ=1024; BSMALL=; QA="--max-train 6000 --max-docs 8000"  # all the train questions (2,800 overfit in 10 epochs)
fi
data() {  # offline real text, QA + KB, tokenizer; skipped when already built on this machine
    if [ -f "$B/kb/kb.json" ] && ls "$NANOCHAT_BASE_DIR"/tokenizer/* >/dev/null 2>&1 && [ "${FORCE:-0}" != 1 ]; then
        echo "== data: already built" | tee -a "$S"; return 0; fi
    step data bash -c "python3 -m nanochat.dataset --builtin $SRC --output $B/corpus && python3 -m tasks.stdlib_qa --output $B --doc-chars 600 $QA \
        && python3 -m scripts.tok_train --vocab-size $VOCAB --max-chars 5e7 --data-dir $B/corpus \
        && python3 -m nanochat.retrieval --documents $B/kb_documents.jsonl --output $B/kb --type bm25"; }
COMMON="$D --max-seq-len $SEQ --device-batch-size $DBS --total-batch-size $TBS --data-dir $B/corpus \
    --eval-every 100 --eval-tokens $((TBS * 4)) --sample-every -1 --compile $COMPILE --log-every 25"
base() {  # base <pattern> <tag> <iterations>
    if [ -d "$NANOCHAT_BASE_DIR/base_checkpoints/$2" ] && [ "${FORCE:-0}" != 1 ]; then echo "== base_$2: exists" | tee -a "$S"; return 0; fi
    step base_$2 python3 -m scripts.base_train $COMMON --block-pattern $1 --model-tag $2 --num-iterations $3; }
bench_compiled() {
    TAILN=30 step mamba_check python3 benchmarks/check_mamba_triton.py
    TAILN=8 step bench_train_compiled python3 benchmarks/bench_model.py $BSMALL --sections train --compile 1 --steps 10 \
        --patterns "all-T,1-in-4 attention" --impls triton --scan-ops auto,0 --json "$OUT/bench_train_compiled.json"; }
bench_eager() {
    TAILN=14 step bench_train_eager python3 benchmarks/bench_model.py $BSMALL --sections train --compile 0 --steps 6 --warmup 2 --json "$OUT/bench_train_eager.json"
    TAILN=10 step bench_decode python3 benchmarks/bench_model.py $BSMALL --sections decode --json "$OUT/bench_decode.json"; }
rag() {
    step sft python3 -m scripts.chat_sft --source base --model-tag hybrid --data builtin --num-epochs 2 --device-batch-size 32 \
        --max-seq-len 512 --eval-every 20 --eval-steps 4 --compile 0 --log-every 10 --init-lr-frac 0.5
    RAG="--knowledge-base $B/kb --top-k 3 --device-batch-size 16 --max-seq-len $RSEQ --eval-steps 4 --log-every 20 --compile $COMPILE"
    step rag python3 -m scripts.rag_finetune --source sft --model-tag hybrid --num-epochs ${RAG_EPOCHS:-4} --eval-every 25 --keep-best --init-lr-frac 0.5 $RAG
    step sft_same_tokens python3 -m scripts.chat_sft --source sft --model-tag hybrid --output-tag sftref --data builtin \
        --num-iterations 60 --eval-every 1000 --device-batch-size 16 --max-seq-len $RSEQ --log-every 20 --compile $COMPILE
    TAILN=25 step rag_eval python3 -m scripts.rag_eval --source rag --model-tag hybrid --top-k 3 --max-examples $EV --max-new-tokens 48; }
case "$PHASE" in
bench) bench_compiled; bench_eager ;;
base)  data; base $HYB hybrid $IT; base $ALLT allT $IT ;;
rag)   rag ;;
A)     # all-T base + the model benchmarks: the data build (CPU) runs beside the first benchmarks (GPU)
       data > "$LOGS/data_bg.out" 2>&1 & DATA_PID=$!
       bench_compiled; wait $DATA_PID; cat "$LOGS/data_bg.out"
       base $ALLT allT ${IT_ALLT:-$IT}; bench_eager ;;
B)     # hybrid base, then SFT -> RAG fine-tune -> plain SFT at the same tokens/step -> rag_eval
       data; base $HYB hybrid ${IT_HYB:-$IT}; rag ;;
*) echo "PHASE must be bench, base, rag, A or B"; exit 2 ;;
esac
cp "$NANOCHAT_BASE_DIR"/report/*.json "$LOGS/" 2>/dev/null
tar czf "$OUT/logs_${PHASE}.tgz" -C "$LOGS" . 2>/dev/null
cat "$S"
