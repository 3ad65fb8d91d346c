#!/bin/bash
# Session 27, call A (2026-12-06): on an H200 (needs_h200), issue 16's W-nano target with the engine's defaults
# (bf16 against fp8 weights + fp8 KV, alternated three times), the same fp8 run with fp8 matmuls of up to 256 rows
# on the skinny GEMM (activations kept in bf16: --skinny-fp8-max-m 256) between them, fp8 KV alone once, then W1
# at 512 bf16 and fp8 weights.
export PYTHONUNBUFFERED=1
R=$OUT/res; mkdir -p $R
L=$OUT/s27A-log.txt
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv | tee $L
git log --oneline -1 | tee -a $L
t() { s=$(date +%s); PYTHONPATH=$PWD timeout 90 python bench/throughput.py --peers none --results-dir $R --tag s27A --sustained-s 0 "$@" 2>&1 | tee -a $OUT/s27A-full.txt | grep -E "^pagedbatch|Error|error" | sed "s|^|$* :: |" | tee -a $L; echo "  ($(( $(date +%s) - s )) s)" | tee -a $L; }
N8="--workload W-nano --quantization fp8 --kv-cache-dtype fp8"
t --workload W-nano; t $N8; t $N8 --skinny-fp8-max-m 256
t --workload W-nano; t $N8; t $N8 --skinny-fp8-max-m 256
t --workload W-nano; t $N8
t --workload W-nano --kv-cache-dtype fp8
W1="--workload W1 --max-num-seqs 512"
t $W1; t $W1 --quantization fp8
date | tee -a $L
cd $OUT && tar cf s27A-results.tar res && rm -rf res
