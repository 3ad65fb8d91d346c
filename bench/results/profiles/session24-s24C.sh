#!/bin/bash
# Session 24, call C: W-nano fp8 weights + fp8 KV, repeated runs: is a slow run's prefill slow on the GPU or the
# host? (the first 24 steps' kernels under a CUDA-only profiler, against their wall)
export PYTHONUNBUFFERED=1
L=$OUT/s24C-log.txt
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv | tee $L
p() { n=$1; shift; PYTHONPATH=$PWD timeout 200 python bench/profile_steps.py --workload W-nano --max-num-seqs 256 --profile-steps 1 \
      --step-detail 0 "$@" > $OUT/s24C-$n.txt 2>&1; echo "$n $* rc=$?" | tee -a $L;
      grep -E "run [0-9]+|with prefill: wall|first [0-9]+ steps" $OUT/s24C-$n.txt | sed "s|^|$n :: |" | tee -a $L; }
p fp8w-kv8-k --quantization fp8 --kv-cache-dtype fp8 --runs 8 --runs-kernels 24
p fp8w-kv8 --quantization fp8 --kv-cache-dtype fp8 --runs 6
date | tee -a $L
