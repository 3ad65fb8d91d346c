#!/bin/bash
# Session 26, call C (2026-12-06, any Hopper; call B cut to the device time left): the SiLU·mul + quantize kernel
# alone at W-nano's and W1's widths, then W-nano with fp8 weights + fp8 KV, the kernel's columns a pass (2048, the
# default, against 4096: W-nano's 3,072-column rows read once) alternated twice.
export PYTHONUNBUFFERED=1
R=$OUT/res; mkdir -p $R
L=$OUT/s26C-log.txt
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv | tee $L
PYTHONPATH=$PWD timeout 90 python bench/silu_quant.py --rows 64,256,512 --max-blocks 2048,4096,8192 --json $OUT/silu_quant-pdl.json 2>&1 | tee -a $L
t() { s=$(date +%s); PYTHONPATH=$PWD timeout 70 python bench/throughput.py --peers none --results-dir $R --tag s26C --sustained-s 0 "$@" 2>&1 | tee -a $OUT/s26C-full.txt | grep -E "^pagedbatch|Error|error" | sed "s|^|$* :: |" | tee -a $L; echo "  ($(( $(date +%s) - s )) s)" | tee -a $L; }
N8="--workload W-nano --quantization fp8 --kv-cache-dtype fp8"
t $N8; t $N8 --silu-quant-max-block 4096; t $N8; t $N8 --silu-quant-max-block 4096
date | tee -a $L
cd $OUT && tar cf s26C-results.tar res && rm -rf res
