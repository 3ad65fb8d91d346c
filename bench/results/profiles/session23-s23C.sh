#!/bin/bash
# Session 23, call C (2026-12-06): where W-nano's decode time goes now, bf16 against fp8 weights + fp8 KV and fp8 KV
# alone (whole runs by batch size, then 8 full-batch decode steps under torch.profiler: kernels and idle gaps).
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv | tee $OUT/s23C-log.txt
p() { n=$1; shift; PYTHONPATH=$PWD timeout 120 python bench/profile_steps.py --workload W-nano --max-num-seqs 256 --profile-steps 1 \
      --runs 2 --step-detail 0 --timeline 8 "$@" > $OUT/s23C-$n.txt 2>&1; echo "$n $* rc=$?" | tee -a $OUT/s23C-log.txt; }
p fp8w-kv8 --quantization fp8 --kv-cache-dtype fp8
p kv8 --kv-cache-dtype fp8
# p bf16 --kv-cache-dtype auto   (dropped: too little device time left in session 23)
