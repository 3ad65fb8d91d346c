#!/bin/bash
# Session 26, call A (2026-12-06): on an H200 (needs_h200), issue 16's targets with the engine's defaults as users
# get them since 134bad7 (prefill graphs up to 8,192 tokens): W-nano bf16 against fp8 weights + fp8 KV alternated
# three times, fp8 KV alone once; W1 at 512 bf16 twice around fp8 once (the single stream has no step the change touches).
export PYTHONUNBUFFERED=1
R=$OUT/res; mkdir -p $R
L=$OUT/s26A-log.txt
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv | tee $L
t() { s=$(date +%s); PYTHONPATH=$PWD timeout 80 python bench/throughput.py --peers none --results-dir $R --tag s26A --sustained-s 0 "$@" 2>&1 | tee -a $OUT/s26A-full.txt | grep -E "^pagedbatch|Error|error" | sed "s|^|$* :: |" | tee -a $L; echo "  ($(( $(date +%s) - s )) s)" | tee -a $L; }
N8="--workload W-nano --quantization fp8 --kv-cache-dtype fp8"
t --workload W-nano; t $N8; t --workload W-nano; t $N8; t --workload W-nano; t $N8
t --workload W-nano --kv-cache-dtype fp8
W1="--workload W1 --max-num-seqs 512"
t $W1; t $W1 --quantization fp8; t $W1
date | tee -a $L
cd $OUT && tar cf s26A-results.tar res && rm -rf res
