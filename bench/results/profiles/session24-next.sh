#!/bin/bash
# For the next session (written in session 24, unrun; run it on an H200, needs_h200): issue 16's W-nano target
# with prefill's V by 16-token tiles the default (e7a81e1): bf16 against fp8 weights + fp8 KV alternated three
# times, fp8 KV alone once; then eight repeated runs of fp8 weights + fp8 KV in one process with each run's first
# 24 steps' kernels recorded (--runs-kernels) and the forward's host time by part (--time-parts): if a run's steps
# with prefill come out slow (0.7 s and more against ~0.35), its kernel time says whether the GPU or the host was.
export PYTHONUNBUFFERED=1
R=$OUT/res; mkdir -p $R
L=$OUT/next-log.txt
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv | tee $L
t() { s=$(date +%s); PYTHONPATH=$PWD timeout 75 python bench/throughput.py --peers none --results-dir $R --tag s25 --sustained-s 0 "$@" 2>&1 | tee -a $OUT/next-full.txt | grep -E "^pagedbatch|Error|error" | sed "s|^|$* :: |" | tee -a $L; echo "  ($(( $(date +%s) - s )) s)" | tee -a $L; }
N8="--workload W-nano --quantization fp8 --kv-cache-dtype fp8"
t --workload W-nano; t $N8; t --workload W-nano; t $N8; t --workload W-nano; t $N8
t --workload W-nano --kv-cache-dtype fp8
cd $OUT && tar cf next-results.tar res && rm -rf res && cd - >/dev/null
PYTHONPATH=$PWD timeout 200 python bench/profile_steps.py --workload W-nano --max-num-seqs 256 --profile-steps 1 \
  --step-detail 0 --quantization fp8 --kv-cache-dtype fp8 --runs 8 --runs-kernels 24 --time-parts > $OUT/next-runs.txt 2>&1
grep -E "run [0-9]+|with prefill: wall|first [0-9]+ steps|part:" $OUT/next-runs.txt | tee -a $L
