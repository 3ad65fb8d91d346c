#!/bin/bash
# Session 26, call B (2026-12-06, any Hopper): the fp8 activation kernels alone (bench/silu_quant.py, new), the
# SiLU·mul + quantize kernel's columns a pass (fused_ops.SILU_QUANT_MAX_BLOCK) end to end, and its GPU tests.
export PYTHONUNBUFFERED=1
R=$OUT/res; mkdir -p $R
L=$OUT/s26B-log.txt
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv | tee $L
PYTHONPATH=$PWD timeout 150 python bench/silu_quant.py --json $OUT/silu_quant-pdl.json 2>&1 | tee -a $L
PYTHONPATH=$PWD timeout 60 python bench/silu_quant.py --models wnano --rows 256 --no-pdl --json $OUT/silu_quant-nopdl.json 2>&1 | tee -a $L
PYTHONPATH=$PWD timeout 120 python -m pytest -q -p no:cacheprovider tests/engine/test_fused_ops.py 2>&1 | tail -2 | tee -a $L
t() { s=$(date +%s); PYTHONPATH=$PWD timeout 80 python bench/throughput.py --peers none --results-dir $R --tag s26B --sustained-s 0 "$@" 2>&1 | tee -a $OUT/s26B-full.txt | grep -E "^pagedbatch|Error|error" | sed "s|^|$* :: |" | tee -a $L; echo "  ($(( $(date +%s) - s )) s)" | tee -a $L; }
N8="--workload W-nano --quantization fp8 --kv-cache-dtype fp8"
t $N8; t $N8 --silu-quant-max-block 4096; t $N8; t $N8 --silu-quant-max-block 4096
W1="--workload W1 --max-num-seqs 512 --quantization fp8"
t $W1; t $W1 --silu-quant-max-block 8192
date | tee -a $L
cd $OUT && tar cf s26B-results.tar res && rm -rf res
