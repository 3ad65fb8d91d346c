#!/bin/bash
# Session 25, call C: prefill graphs up to 8,192 tokens, now the default (config.prefill_graph_max_tokens; the
# buckets step by 1,024 above 1,024). W-nano bf16 against fp8 weights + fp8 KV alternated three times on the
# new default (issue 16's target), each once with the old 512; W1 at 512 rows bf16 new/old and fp8 new (a 7B
# shape: no slower?); then the prefill-graph GPU tests.
export PYTHONUNBUFFERED=1
R=$OUT/res; mkdir -p $R
L=$OUT/s25C-log.txt
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv | tee $L
t() { s=$(date +%s); PYTHONPATH=$PWD timeout 90 python bench/throughput.py --peers none --results-dir $R --tag s25C --sustained-s 0 "$@" 2>&1 | tee -a $OUT/s25C-full.txt | grep -E "^pagedbatch|Error|error|load_s" | sed "s|^|$* :: |" | tee -a $L; echo "  ($(( $(date +%s) - s )) s)" | tee -a $L; }
N8="--workload W-nano --quantization fp8 --kv-cache-dtype fp8"
t --workload W-nano; t $N8; t --workload W-nano; t $N8; t --workload W-nano; t $N8
t --workload W-nano --prefill-graph-max-tokens 512; t $N8 --prefill-graph-max-tokens 512
t --workload W1 --max-num-seqs 512; t --workload W1 --max-num-seqs 512 --prefill-graph-max-tokens 512
t --workload W1 --max-num-seqs 512 --quantization fp8
PYTHONPATH=$PWD timeout 150 python -m pytest -q -m gpu tests/engine/test_prefill_graphs.py tests/engine/test_gpu_end_to_end.py 2>&1 | tail -4 | tee -a $L
date | tee -a $L
