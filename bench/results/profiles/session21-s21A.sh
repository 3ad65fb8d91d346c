#!/bin/bash
# Session 21, call A (2026-12-06): on an H200 the issue-16 targets on the engine's default (64-token blocks), W-nano's
# pair alternated twice; then the skinny probe (is the one-row fp8 GEMM math-bound on the H200?). ~8 min.
export PYTHONUNBUFFERED=1
R=$OUT/res; mkdir -p $R
L=$OUT/s21A-log.txt
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv | tee $L
t() { s=$(date +%s); PYTHONPATH=$PWD timeout 90 python bench/throughput.py --peers none --results-dir $R --tag s21A --sustained-s 0 "$@" 2>&1 | tee -a $OUT/s21A-full.txt | grep -E "^pagedbatch|Error|error" | sed "s|^|$* :: |" | tee -a $L; echo "  ($(( $(date +%s) - s )) s)" | tee -a $L; }
t --workload W-nano
t --workload W-nano --quantization fp8 --kv-cache-dtype fp8 --prefill-graph-max-tokens 8192
t --workload single
t --workload single --quantization fp8
t --workload W1 --max-num-seqs 512
t --workload W1 --max-num-seqs 512 --quantization fp8
t --workload W-nano --kv-cache-dtype fp8
t --workload W-nano --quantization fp8 --kv-cache-dtype fp8 --prefill-graph-max-tokens 8192
t --workload W-nano
t --workload prefill
PYTHONPATH=$PWD timeout 150 python bench/skinny_stream_probe.py --shapes gate_up,down,qkv,o --tiles 8:512:4:4,16:512:4:4 --results-dir $R --tag s21A 2>&1 | tee $OUT/s21A-skinny-probe.txt | tail -40 | tee -a $L
PYTHONPATH=$PWD timeout 90 python bench/decode_attention.py --cases wnano,w1,single --configs v2-f8mma-pack-vtail-waves,v2-lt-waves --block-size 64 --results-dir $R --tag=-s21A 2>&1 | tee $OUT/s21A-decode.txt | grep -E "^  v2|^wnano|^w1|^single|wrong|rror" | tee -a $L
cd $OUT && tar cf s21A-results.tar res && rm -rf res
