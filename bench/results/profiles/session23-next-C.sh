#!/bin/bash
# For the next session (written in session 23, unrun): prefill's V written by token tiles into the key-contiguous
# fp8 V cache (rotary_cache_write v_tile, triton_backend.PREFILL_V_TILE, off by default). 1) its GPU tests;
# 2) the write alone at 64-token blocks (cache_write.py's prefill slots are block-aligned: every tile is a run);
# 3) W-nano with an fp8 cache and fp8 weights + fp8 cache, tiles 0 / 16 / 64 alternated; 4) the 8,192-token
# prefill step's kernels with and without (profile_steps). If a tile wins end to end, make it the default.
export PYTHONUNBUFFERED=1
R=$OUT/res; mkdir -p $R
L=$OUT/next-C-log.txt
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv | tee $L
PYTHONPATH=$PWD timeout 150 python -m pytest -q -m gpu -p no:cacheprovider tests/engine/test_triton_decode.py \
  -k "prefill_v_by_token or bit_exact or key_contiguous" > $OUT/gpu-tests-next-C.txt 2>&1; tail -2 $OUT/gpu-tests-next-C.txt | tee -a $L
PYTHONPATH=$PWD timeout 90 python bench/cache_write.py --cases wnano-prefill,wnano-decode --v-tiles 16,32,64 2>&1 | tee -a $L
t() { PYTHONPATH=$PWD timeout 60 python bench/throughput.py --peers none --results-dir $R --sustained-s 0 "$@" 2>&1 | grep -E "^pagedbatch|Error" | sed "s|^|$* :: |" | tee -a $L; }
K="--workload W-nano --kv-cache-dtype fp8"
t $K --prefill-v-tile 0 --tag vt0; t $K --prefill-v-tile 16 --tag vt16; t $K --prefill-v-tile 64 --tag vt64
t $K --prefill-v-tile 0 --tag vt0b; t $K --prefill-v-tile 16 --tag vt16b
t $K --quantization fp8 --prefill-v-tile 0 --tag vt0; t $K --quantization fp8 --prefill-v-tile 16 --tag vt16
for vt in 0 16; do
  PYTHONPATH=$PWD timeout 120 python bench/profile_steps.py --workload W-nano --max-num-seqs 256 --kv-cache-dtype fp8 \
    --profile-steps 1 --runs 2 --step-detail 0 --prefill-v-tile $vt > $OUT/profile-vt$vt.txt 2>&1
  grep -E "run [12]:|_rotary_cache_write_kernel" $OUT/profile-vt$vt.txt | sed "s|^|vt$vt :: |" | tee -a $L
done
cd $OUT && tar cf next-C-results.tar res && rm -rf res
