#!/bin/bash
# Session 24, call B: prefill V tiles 0 and 16 alternated within one process (profile_steps --runs-v-tiles).
export PYTHONUNBUFFERED=1
L=$OUT/s24B-log.txt
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv | tee $L
p() { n=$1; shift; PYTHONPATH=$PWD timeout 150 python bench/profile_steps.py --workload W-nano --max-num-seqs 256 --profile-steps 1 \
      --runs 8 --runs-v-tiles 0,16 --step-detail 0 "$@" > $OUT/s24B-$n.txt 2>&1; echo "$n $* rc=$?" | tee -a $L;
      grep -E "run [0-9]+ |with prefill: wall" $OUT/s24B-$n.txt | sed "s|^|$n :: |" | tee -a $L; }
p fp8w-kv8 --quantization fp8 --kv-cache-dtype fp8
p kv8 --kv-cache-dtype fp8
date | tee -a $L
