#!/bin/bash
# For the next session's first device call (written in session 22, unrun): the 8-warp SiLU·mul+quantize kernel
# (session22-silu-quant-8warps.patch) at 32 rows, where the 4-warp one made W1 3.8% slower fused. If the patched,
# forced-fused runs beat the default (unfused at 32 rows), land the patch and lower FUSE_FP8_QUANT_MIN_ROWS to 17.
# 60 s per run: a cold machine's first W1 run needs more than 45 (session 22, call E).
export PYTHONUNBUFFERED=1
R=$OUT/res; mkdir -p $R
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/next-A-log.txt
t() { PYTHONPATH=$PWD timeout 60 python bench/throughput.py --peers none --results-dir $R --sustained-s 0 "$@" 2>&1 | grep -E "^pagedbatch|Error" | sed "s|^|$* :: |" | tee -a $OUT/next-A-log.txt; }
B="--workload W1 --max-num-seqs 32 --quantization fp8"
N="--workload W-nano --kv-cache-dtype fp8 --quantization fp8 --prefill-graph-max-tokens 8192"
t $B --tag default; t $N --tag default
git apply bench/results/profiles/session22-silu-quant-8warps.patch && echo "patch applied" | tee -a $OUT/next-A-log.txt
PYTHONPATH=$PWD timeout 100 python -m pytest -q -m gpu -p no:cacheprovider tests/engine/test_fused_ops.py \
  tests/engine/test_gpu_fp8.py -k "quantized or fused_into_the_norms" > $OUT/gpu-tests.txt 2>&1; tail -2 $OUT/gpu-tests.txt | tee -a $OUT/next-A-log.txt
t $B --fuse-fp8-quant-min-rows 17 --tag patched17; t $B --tag default2; t $B --fuse-fp8-quant-min-rows 17 --tag patched17b
t $N --fuse-fp8-quant-min-rows 17 --tag patched17; t $N --tag patched33
git checkout pagedbatch/engine/models/fused_ops.py tests/engine/test_fused_ops.py
cd $OUT && tar cf next-A-results.tar res && rm -rf res
