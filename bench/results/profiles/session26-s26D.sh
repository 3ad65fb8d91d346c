#!/bin/bash
# Session 26, call D (2026-12-06, an H200, needs_h200; call A cut to the device time left): issue 16's W-nano target
# on the engine's defaults since 134bad7 (prefill graphs up to 8,192 tokens): bf16 against fp8 weights + fp8 KV
# alternated twice, fp8 KV alone once.
export PYTHONUNBUFFERED=1
R=$OUT/res; mkdir -p $R
L=$OUT/s26D-log.txt
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv | tee $L
t() { s=$(date +%s); PYTHONPATH=$PWD timeout 70 python bench/throughput.py --peers none --results-dir $R --tag s26D --sustained-s 0 "$@" 2>&1 | tee -a $OUT/s26D-full.txt | grep -E "^pagedbatch|Error|error" | sed "s|^|$* :: |" | tee -a $L; echo "  ($(( $(date +%s) - s )) s)" | tee -a $L; }
N8="--workload W-nano --quantization fp8 --kv-cache-dtype fp8"
t --workload W-nano; t $N8; t --workload W-nano; t $N8
t --workload W-nano --kv-cache-dtype fp8
date | tee -a $L
cd $OUT && tar cf s26D-results.tar res && rm -rf res
