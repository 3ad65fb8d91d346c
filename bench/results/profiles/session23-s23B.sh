#!/bin/bash
# Session 23, call B (2026-12-06, the warm H200 of call A; run as one command line, kept here as a script): W-nano
# fp8 weights + fp8 KV with prefill graphs up to 8192 tokens against the default 512, against fp8 KV alone, against
# the unfused quantization, and bf16 once.
export PYTHONUNBUFFERED=1; R=$OUT/res; mkdir -p $R
t() { PYTHONPATH=$PWD timeout 60 python bench/throughput.py --peers none --results-dir $R --tag s23B --sustained-s 0 "$@" 2>&1 | grep -E "^pagedbatch|Error" | sed "s|^|$* :: |" | tee -a $OUT/s23B-log.txt; }
N8="--workload W-nano --quantization fp8 --kv-cache-dtype fp8"
t $N8 --prefill-graph-max-tokens 8192; t --workload W-nano --kv-cache-dtype fp8; t $N8; t $N8 --prefill-graph-max-tokens 8192
t $N8 --no-fuse-fp8-quant; t --workload W-nano; t $N8 --prefill-graph-max-tokens 8192
cd $OUT && tar cf s23B.tar res && rm -rf res
