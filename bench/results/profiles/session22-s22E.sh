#!/bin/bash
# Session 22, call E (the last ~4 min of device time): the 33-row threshold (78a4b4e) as the default.
export PYTHONUNBUFFERED=1
R=$OUT/res; mkdir -p $R
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/s22E-log.txt
t() { PYTHONPATH=$PWD timeout 45 python bench/throughput.py --peers none --results-dir $R --tag s22E --sustained-s 0 "$@" 2>&1 | grep -E "^pagedbatch|Error" | sed "s|^|$* :: |" | tee -a $OUT/s22E-log.txt; }
t --workload W1 --max-num-seqs 32 --quantization fp8
t --workload W-nano --kv-cache-dtype fp8 --quantization fp8 --prefill-graph-max-tokens 8192
cd $OUT && tar cf s22E-results.tar res && rm -rf res
