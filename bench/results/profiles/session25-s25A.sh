#!/bin/bash
# Session 25, call A (unrun: the H200 was refused; call B ran its profile part on an H100): issue 16's W-nano target on the current default (prefill's V by
# 16-token tiles): bf16 against fp8 weights + fp8 KV alternated three times, fp8 KV alone once, fp8 weights +
# fp8 KV with 8,192-token prefill graphs once; then eight repeated runs of fp8 weights + fp8 KV in one process
# with each run's first 24 steps' kernels recorded (--runs-kernels) and the forward's host time by part
# (--time-parts), to catch a slow run's steps with prefill (0.7 s and more against ~0.35) on the GPU or the
# host; then six runs with those steps in CUDA graphs (--prefill-graph-max-tokens 8192): do slow runs remain?
export PYTHONUNBUFFERED=1
R=$OUT/res; mkdir -p $R
L=$OUT/s25A-log.txt
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv | tee $L
t() { s=$(date +%s); PYTHONPATH=$PWD timeout 75 python bench/throughput.py --peers none --results-dir $R --tag s25A --sustained-s 0 "$@" 2>&1 | tee -a $OUT/s25A-full.txt | grep -E "^pagedbatch|Error|error" | sed "s|^|$* :: |" | tee -a $L; echo "  ($(( $(date +%s) - s )) s)" | tee -a $L; }
N8="--workload W-nano --quantization fp8 --kv-cache-dtype fp8"
t --workload W-nano; t $N8; t --workload W-nano; t $N8; t --workload W-nano; t $N8
t --workload W-nano --kv-cache-dtype fp8
t $N8 --prefill-graph-max-tokens 8192
p() { n=$1; s=$2; shift 2; PYTHONPATH=$PWD timeout $s python bench/profile_steps.py --workload W-nano --max-num-seqs 256 \
      --profile-steps 1 --step-detail 0 --quantization fp8 --kv-cache-dtype fp8 "$@" > $OUT/s25A-$n.txt 2>&1
      echo "$n $* rc=$?" | tee -a $L
      grep -E "run [0-9]+|with prefill: wall|first [0-9]+ steps|part:" $OUT/s25A-$n.txt | sed "s|^|$n :: |" | tee -a $L; }
p runs-k 170 --runs 8 --runs-kernels 24 --time-parts
p runs-g8k 120 --runs 6 --prefill-graph-max-tokens 8192
date | tee -a $L
