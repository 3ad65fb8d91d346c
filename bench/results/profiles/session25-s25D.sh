#!/bin/bash
# Session 25, call D (unrun: no H200 came in seven tries; for the next session, on an H200 with needs_h200): issue 16's W-nano target with prefill graphs up to 8,192 tokens the
# default: bf16 against fp8 weights + fp8 KV alternated twice, fp8 KV alone once.
export PYTHONUNBUFFERED=1
R=$OUT/res; mkdir -p $R
L=$OUT/s25D-log.txt
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv | tee $L
t() { s=$(date +%s); PYTHONPATH=$PWD timeout 90 python bench/throughput.py --peers none --results-dir $R --tag s25D --sustained-s 0 "$@" 2>&1 | tee -a $OUT/s25D-full.txt | grep -E "^pagedbatch|Error|error" | sed "s|^|$* :: |" | tee -a $L; echo "  ($(( $(date +%s) - s )) s)" | tee -a $L; }
N8="--workload W-nano --quantization fp8 --kv-cache-dtype fp8"
t --workload W-nano; t $N8; t --workload W-nano; t $N8
t --workload W-nano --kv-cache-dtype fp8
date | tee -a $L
