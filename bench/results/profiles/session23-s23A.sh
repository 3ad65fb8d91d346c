#!/bin/bash
# Session 23, call A (2026-12-06): on an H200, issue 16's targets with the engine's defaults as users get them
# (64-token blocks, fp8 quantization fused into the norms and SiLU·mul from 33 rows, prefill graphs up to 512
# tokens): W-nano bf16 against fp8 weights + fp8 KV alternated three times, single stream and W1 alternated; then
# the seven GPU test files.
export PYTHONUNBUFFERED=1
R=$OUT/res; mkdir -p $R
L=$OUT/s23A-log.txt
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv | tee $L
t() { s=$(date +%s); PYTHONPATH=$PWD timeout 75 python bench/throughput.py --peers none --results-dir $R --tag s23A --sustained-s 0 "$@" 2>&1 | tee -a $OUT/s23A-full.txt | grep -E "^pagedbatch|Error|error" | sed "s|^|$* :: |" | tee -a $L; echo "  ($(( $(date +%s) - s )) s)" | tee -a $L; }
N8="--workload W-nano --quantization fp8 --kv-cache-dtype fp8"
t --workload W-nano; t $N8; t --workload W-nano; t $N8; t --workload W-nano; t $N8
t --workload W-nano --kv-cache-dtype fp8
t --workload single; t --workload single --quantization fp8; t --workload single; t --workload single --quantization fp8
t --workload W1 --max-num-seqs 512; t --workload W1 --max-num-seqs 512 --quantization fp8; t --workload W1 --max-num-seqs 512
cd $OUT && tar cf s23A-results.tar res && rm -rf res && cd - >/dev/null
PYTHONPATH=$PWD timeout 230 python -m pytest -q -m gpu -p no:cacheprovider tests/engine/test_gpu_end_to_end.py \
  tests/engine/test_gpu_fp8.py tests/engine/test_prefill_graphs.py tests/engine/test_fp8_kv_cache.py \
  tests/engine/test_fp8_kv_accuracy.py tests/engine/test_gpu_bf16_logits.py tests/engine/test_block_size.py \
  > $OUT/gpu-tests-s23A.txt 2>&1; tail -3 $OUT/gpu-tests-s23A.txt | tee -a $L
