#!/bin/bash
# Session 24, call D: issue 16's W-nano target with prefill's V by 16-token tiles the default (e7a81e1): bf16
# against fp8 weights + fp8 KV alternated twice, fp8 KV alone once; then the GPU test files with an fp8 cache.
export PYTHONUNBUFFERED=1
R=$OUT/res; mkdir -p $R
L=$OUT/s24D-log.txt
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv | tee $L
t() { s=$(date +%s); PYTHONPATH=$PWD timeout 75 python bench/throughput.py --peers none --results-dir $R --tag s24D --sustained-s 0 "$@" 2>&1 | tee -a $OUT/s24D-full.txt | grep -E "^pagedbatch|Error|error" | sed "s|^|$* :: |" | tee -a $L; echo "  ($(( $(date +%s) - s )) s)" | tee -a $L; }
N8="--workload W-nano --quantization fp8 --kv-cache-dtype fp8"
t --workload W-nano; t $N8; t --workload W-nano; t $N8
t --workload W-nano --kv-cache-dtype fp8
cd $OUT && tar cf s24D-results.tar res && rm -rf res && cd - >/dev/null
PYTHONPATH=$PWD timeout 240 python -m pytest -q -m gpu -p no:cacheprovider tests/engine/test_gpu_end_to_end.py \
  tests/engine/test_prefill_graphs.py tests/engine/test_fp8_kv_cache.py tests/engine/test_fp8_kv_accuracy.py \
  > $OUT/gpu-tests-s24D.txt 2>&1; tail -3 $OUT/gpu-tests-s24D.txt | tee -a $L
date | tee -a $L
