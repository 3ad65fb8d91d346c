#!/bin/bash
# Session 27, call B (2026-12-06, an H100, while H200s were refused): W-nano fp8 weights + fp8 KV with the
# engine's defaults against fp8 matmuls of up to 256 rows on the skinny GEMM (bf16 activations,
# --skinny-fp8-max-m 256), alternated twice, and bf16 once for the ratio.
export PYTHONUNBUFFERED=1
R=$OUT/res; mkdir -p $R
L=$OUT/s27B-log.txt
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv | tee $L
t() { s=$(date +%s); PYTHONPATH=$PWD timeout 90 python bench/throughput.py --peers none --results-dir $R --tag s27B --sustained-s 0 "$@" 2>&1 | tee -a $OUT/s27B-full.txt | grep -E "^pagedbatch|Error|error" | sed "s|^|$* :: |" | tee -a $L; echo "  ($(( $(date +%s) - s )) s)" | tee -a $L; }
N8="--workload W-nano --quantization fp8 --kv-cache-dtype fp8"
t $N8; t $N8 --skinny-fp8-max-m 256; t $N8; t $N8 --skinny-fp8-max-m 256
t --workload W-nano; t $N8 --skinny-fp8-max-m 64
date | tee -a $L
cd $OUT && tar cf s27B-results.tar res && rm -rf res
