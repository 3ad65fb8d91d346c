#!/bin/bash
# Session 22, call B: the fp8 quantization fused into the norms / SiLU·mul is now the default
# (linear.FUSE_FP8_QUANT = True). GPU tests on it, then W1 at batch 32 (the mid_gemm route; one
# earlier non-alternated pair had fused slower there) alternated, and W-nano bf16 / fp8w+kv8 once more.
export PYTHONUNBUFFERED=1
R=$OUT/res; mkdir -p $R
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/s22B-log.txt
PYTHONPATH=$PWD timeout 300 python -m pytest -q -m gpu -p no:cacheprovider tests/engine/test_gpu_end_to_end.py \
  tests/engine/test_gpu_fp8.py tests/engine/test_prefill_graphs.py tests/engine/test_fp8_kv_cache.py \
  tests/engine/test_fp8_kv_accuracy.py tests/engine/test_gpu_bf16_logits.py tests/engine/test_block_size.py \
  > $OUT/gpu-tests.txt 2>&1; tail -3 $OUT/gpu-tests.txt | tee -a $OUT/s22B-log.txt
t() { PYTHONPATH=$PWD timeout 60 python bench/throughput.py --peers none --results-dir $R --tag s22B --sustained-s 0 "$@" 2>&1 | grep -E "^pagedbatch|Error" | sed "s|^|$* :: |" | tee -a $OUT/s22B-log.txt; }
B="--workload W1 --max-num-seqs 32 --quantization fp8"
t $B --no-fuse-fp8-quant; t $B; t $B --no-fuse-fp8-quant; t $B
t --workload W-nano; t --workload W-nano --kv-cache-dtype fp8 --quantization fp8 --prefill-graph-max-tokens 8192
cd $OUT && tar cf s22B-results.tar res && rm -rf res
