#!/bin/bash
# Session 24, call A: session23-next-C (prefill's V by token tiles: GPU tests, the write alone, W-nano alternated)
# and where fp8 weights' prefill steps spend host time in a run (profile_steps --time-parts).
export PYTHONUNBUFFERED=1
R=$OUT/res; mkdir -p $R
L=$OUT/s24A-log.txt
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv | tee $L
date | tee -a $L
PYTHONPATH=$PWD timeout 150 python -m pytest -q -m gpu -p no:cacheprovider tests/engine/test_triton_decode.py \
  -k "prefill_v_by_token or bit_exact or key_contiguous" > $OUT/gpu-tests-s24A.txt 2>&1; tail -2 $OUT/gpu-tests-s24A.txt | tee -a $L
PYTHONPATH=$PWD timeout 90 python bench/cache_write.py --cases wnano-prefill,wnano-decode --v-tiles 16,32,64 2>&1 | tee -a $L
t() { PYTHONPATH=$PWD timeout 60 python bench/throughput.py --peers none --results-dir $R --sustained-s 0 "$@" 2>&1 | grep -E "^pagedbatch|Error" | sed "s|^|$* :: |" | tee -a $L; }
K="--workload W-nano --kv-cache-dtype fp8"
t $K --prefill-v-tile 0 --tag vt0; t $K --prefill-v-tile 16 --tag vt16; t $K --prefill-v-tile 64 --tag vt64
t $K --prefill-v-tile 0 --tag vt0b; t $K --prefill-v-tile 16 --tag vt16b
t $K --quantization fp8 --prefill-v-tile 0 --tag vt0; t $K --quantization fp8 --prefill-v-tile 16 --tag vt16
date | tee -a $L
p() { n=$1; shift; PYTHONPATH=$PWD timeout 100 python bench/profile_steps.py --workload W-nano --max-num-seqs 256 --profile-steps 1 \
      --runs 2 --step-detail 24 --time-parts "$@" > $OUT/s24A-$n.txt 2>&1; echo "$n $* rc=$?" | tee -a $L;
      grep -E "run [12]:|with prefill: wall|part:|_rotary_cache_write_kernel" $OUT/s24A-$n.txt | sed "s|^|$n :: |" | tee -a $L; }
p fp8w-kv8-vt0 --quantization fp8 --kv-cache-dtype fp8 --prefill-v-tile 0
p kv8-vt0 --kv-cache-dtype fp8 --prefill-v-tile 0
p fp8w-kv8-vt16 --quantization fp8 --kv-cache-dtype fp8 --prefill-v-tile 16
date | tee -a $L
cd $OUT && tar cf s24A-results.tar res && rm -rf res
