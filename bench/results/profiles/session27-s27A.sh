#!/bin/bash
# Session 27, call A (2026-12-06): on an H200 (needs_h200), issue 16's targets with the engine's defaults as users
# get them: W-nano bf16 against fp8 weights + fp8 KV alternated three times, fp8 KV alone, single stream and W1 at
# 512 alternated; then the seven GPU test files if the call's time allows. (Its first version also ran
# --skinny-fp8-max-m 256; call B on an H100 found that 16% slower, so it was dropped.)
export PYTHONUNBUFFERED=1
T0=$(date +%s)
R=$OUT/res; mkdir -p $R
L=$OUT/s27A-log.txt
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv | tee $L
git log --oneline -1 | tee -a $L
t() { s=$(date +%s); PYTHONPATH=$PWD timeout 80 python bench/throughput.py --peers none --results-dir $R --tag s27A --sustained-s 0 "$@" 2>&1 | tee -a $OUT/s27A-full.txt | grep -E "^pagedbatch|Error|error" | sed "s|^|$* :: |" | tee -a $L; echo "  ($(( $(date +%s) - s )) s)" | tee -a $L; }
N8="--workload W-nano --quantization fp8 --kv-cache-dtype fp8"
t --workload W-nano; t $N8; t --workload W-nano; t $N8; t --workload W-nano; t $N8
t --workload W-nano --kv-cache-dtype fp8
t --workload single; t --workload single --quantization fp8; t --workload single; t --workload single --quantization fp8
W1="--workload W1 --max-num-seqs 512"
t $W1; t $W1 --quantization fp8; t $W1
date | tee -a $L
(cd $OUT && tar cf s27A-results.tar res && rm -rf res)
LEFT=$(( 380 - ($(date +%s) - T0) ))
if [ $LEFT -gt 90 ]; then
  PYTHONPATH=$PWD timeout $LEFT python -m pytest -q -m gpu -p no:cacheprovider tests/engine/test_gpu_end_to_end.py \
    tests/engine/test_gpu_fp8.py tests/engine/test_prefill_graphs.py tests/engine/test_fp8_kv_cache.py \
    tests/engine/test_fp8_kv_accuracy.py tests/engine/test_gpu_bf16_logits.py tests/engine/test_block_size.py \
    > $OUT/gpu-tests-s27A.txt 2>&1; tail -3 $OUT/gpu-tests-s27A.txt | tee -a $L
else
  echo "GPU tests not run: $LEFT s left" | tee -a $L
fi
