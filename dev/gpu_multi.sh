#!/usr/bin/env bash
# One device-tool call on a multi-GPU machine (issue: multi-GPU DDP), plus the quick single-GPU figures.
# Run from the repo root on the GPU host with .whl (rustbpe, bm25s wheels) and .carry/mamba (mamba_ssm source)
# carried; writes everything under $OUT (one tarball of logs + a summary). CPU dry run (tiny sizes, gloo):
#   SMALL=1 OUT=/tmp/gpu_dry bash dev/gpu_multi.sh
# Every training step writes under its own tag with --overwrite, so a call on a machine that is still warm replaces
# the previous call's checkpoints instead of leaving a higher step of them for the next stage to load.
set -u
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
LOGS=$(mktemp -d); S=$OUT/summary.txt
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1 && ! python3 -c "import rustbpe, bm25s" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:-}:$PWD/.carry/mamba:$PWD
export NANOCHAT_BASE_DIR=${NANOCHAT_BASE_DIR:-/tmp/ncgpu} NANOCHAT_BUILTIN_DIR=${NANOCHAT_BASE_DIR:-/tmp/ncgpu}/builtin
B=$NANOCHAT_BUILTIN_DIR
NGPU=$(python3 -c "import torch; print(torch.cuda.device_count())")
NP=${NP:-$([ "$NGPU" -ge 2 ] && echo "$NGPU" || echo 2)}
if [ "${SMALL:-0}" = 1 ]; then
    MODEL="--depth 2 --block-pattern TM --aspect-ratio 32 --head-dim 32 --mamba-d-state 16 --mamba-headdim 16 --mamba-chunk-size 32"
    SEQ=128; DBS=4; TBS=2048; ITERS=6; VOCAB=1024; SFT_SEQ=128; RAG_SEQ=256; EV=10; COMPILE=0
else
    # d12-sized 1-in-4 attention hybrid; eager (no compile) so every run fits the lease
    MODEL="--depth 12 --block-pattern MMMTMMMTMMMT --aspect-ratio 64 --head-dim 128"
    SEQ=2048; DBS=16; TBS=262144; ITERS=${ITERS:-40}; VOCAB=8192; SFT_SEQ=512; RAG_SEQ=1024; EV=60; COMPILE=${COMPILE:-0}
fi
echo "GPUs: $NGPU ($(python3 -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")')), processes: $NP" | tee -a "$S"
TR="python3 -m torch.distributed.run --standalone --nproc_per_node=$NP -m"
one() { if [ "$NGPU" -ge 1 ]; then CUDA_VISIBLE_DEVICES=0 python3 -m "$@"; else python3 -m "$@"; fi; }
step() { local name=$1; shift; local t0=$SECONDS;
         if [ $SECONDS -gt "${DEADLINE:-430}" ]; then echo "== $name: skipped (deadline)" | tee -a "$S"; return 1; fi; echo "== $name: $*" | tee -a "$S"; "$@" > "$LOGS/$name.log" 2>&1; local rc=$?;
         echo "   rc=$rc ($((SECONDS - t0)) s)" | tee -a "$S"; grep -E "done|val bpb|val loss|checksums|error|Error|^\\| (closed|rag|retrieval|1-in|all-T)" "$LOGS/$name.log" | tail -8 >> "$S";
         [ -d "$NANOCHAT_BASE_DIR/report/logs" ] && cp -r "$NANOCHAT_BASE_DIR/report/logs" "$LOGS/steplogs_$name"; return $rc; }

step data bash -c "python3 -m tasks.builtin_corpus --output $B/corpus && python3 -m tasks.stdlib_qa --output $B --doc-chars 600 && python3 -m scripts.tok_train --vocab-size $VOCAB --data-dir $B/corpus && python3 -m nanochat.retrieval --documents $B/kb_documents.jsonl --output $B/kb --type bm25"
COMMON="$MODEL --max-seq-len $SEQ --device-batch-size $DBS --total-batch-size $TBS --num-iterations $ITERS --data-dir $B/corpus --eval-every 20 --eval-tokens $((DBS * SEQ * 8)) --sample-every -1 --compile $COMPILE --log-every 5"
step base_np $TR scripts.base_train $COMMON --model-tag multi --overwrite
step base_1 one scripts.base_train $COMMON --model-tag single --overwrite
SFT="--num-epochs 2 --device-batch-size $DBS --max-seq-len $SFT_SEQ --eval-every 10 --eval-steps 4 --compile $COMPILE --log-every 5"
step sft_np $TR scripts.chat_sft --source base --model-tag multi --output-tag multi_sft --overwrite --data builtin $SFT
RAG="--knowledge-base $B/kb --top-k 3 --num-epochs 0.5 --device-batch-size $DBS --max-seq-len $RAG_SEQ --eval-every 50 --eval-steps 4 --compile $COMPILE --log-every 10"
step rag_np $TR scripts.rag_finetune --source sft --model-tag multi_sft --output-tag multi_rag --overwrite $RAG
step rag_1 one scripts.rag_finetune --source sft --model-tag multi_sft --output-tag single_rag --overwrite $RAG
step sft_1_same_tokens one scripts.chat_sft --source sft --model-tag multi_sft --output-tag sft_ref --overwrite --data builtin --num-iterations 30 \
    --device-batch-size $DBS --max-seq-len $RAG_SEQ --eval-every 100 --compile $COMPILE --log-every 10
# a checkpoint written by N ranks loads and runs on 1 process
step rag_eval_1 one scripts.rag_eval --source rag --model-tag multi_rag --top-k 3 --max-examples $EV --max-new-tokens 48
if [ "${SMALL:-0}" = 1 ]; then
    step bench_decode python3 benchmarks/bench_model.py --small --sections decode
else
    step bench_decode env CUDA_VISIBLE_DEVICES=0 python3 benchmarks/bench_model.py --sections decode --json "$LOGS/bench_decode.json"
fi
cp "$NANOCHAT_BASE_DIR"/report/*.json "$LOGS/" 2>/dev/null
tar czf "$OUT/gpu_multi_logs.tgz" -C "$LOGS" .
cat "$S"
