#!/bin/bash
# Session 21, call E (the last ~7 min of device time): does fusing the per-token fp8 quantization into the kernels
# before each linear (--fuse-fp8-quant) win back what fp8 weights cost W-nano on the H200 (fp8 KV alone 1.36x,
# with fp8 weights 1.29x)? Alternated.
export PYTHONUNBUFFERED=1
R=$OUT/res; mkdir -p $R
t() { PYTHONPATH=$PWD timeout 45 python bench/throughput.py --peers none --results-dir $R --tag s21E --sustained-s 0 --workload W-nano --kv-cache-dtype fp8 "$@" 2>&1 | grep -E "^pagedbatch|Error" | sed "s|^|$* :: |" | tee -a $OUT/s21E-log.txt; }
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/s21E-log.txt
Q="--quantization fp8 --prefill-graph-max-tokens 8192"
t $Q --fuse-fp8-quant; t $Q; t $Q --fuse-fp8-quant; t $Q; t
w() { PYTHONPATH=$PWD timeout 45 python bench/throughput.py --peers none --results-dir $R --tag s21E --sustained-s 0 --workload W1 --max-num-seqs 512 --quantization fp8 "$@" 2>&1 | grep -E "^pagedbatch|Error" | sed "s|^|W1 fp8 $* :: |" | tee -a $OUT/s21E-log.txt; }
w --fuse-fp8-quant; w
cd $OUT && tar cf s21E-results.tar res && rm -rf res
