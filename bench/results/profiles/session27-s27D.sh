#!/bin/bash
# Session 27, call D (2026-12-06, an H200, needs_h200; call A cut to the device time left after nine refusals):
# issue 16's W-nano target on the engine's defaults, bf16 against fp8 weights + fp8 KV alternated three times,
# then the single stream bf16 / fp8 once each.
export PYTHONUNBUFFERED=1
R=$OUT/res; mkdir -p $R
L=$OUT/s27D-log.txt
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv | tee $L
git log --oneline -1 | tee -a $L
t() { s=$(date +%s); PYTHONPATH=$PWD timeout 70 python bench/throughput.py --peers none --results-dir $R --tag s27D --sustained-s 0 "$@" 2>&1 | tee -a $OUT/s27D-full.txt | grep -E "^pagedbatch|Error|error" | sed "s|^|$* :: |" | tee -a $L; echo "  ($(( $(date +%s) - s )) s)" | tee -a $L; }
N8="--workload W-nano --quantization fp8 --kv-cache-dtype fp8"
t --workload W-nano; t $N8; t --workload W-nano; t $N8; t --workload W-nano; t $N8
t --workload single; t --workload single --quantization fp8
date | tee -a $L
cd $OUT && tar cf s27D-results.tar res && rm -rf res
