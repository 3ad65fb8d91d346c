#!/bin/bash
# Session 28, call B (2026-12-06): the GPU tests on main, the end-to-end files first, then the kernel files while
# the call's time lasts (each file group its own pytest run, so what finished is kept).
export PYTHONUNBUFFERED=1
T0=$(date +%s)
L=$OUT/s28B-log.txt
nvidia-smi --query-gpu=name --format=csv,noheader | tee $L
git log --oneline -1 | tee -a $L
g() { LEFT=$(( 560 - ($(date +%s) - T0) )); if [ $LEFT -lt 40 ]; then echo "not run ($LEFT s left): $*" | tee -a $L; return; fi
  PYTHONPATH=$PWD timeout $LEFT python -m pytest -q -m gpu -p no:cacheprovider "$@" > $OUT/t.txt 2>&1
  echo "== $* (rc $?)" >> $OUT/gpu-tests-s28B.txt; cat $OUT/t.txt >> $OUT/gpu-tests-s28B.txt
  echo "$*: $(tail -n 1 $OUT/t.txt)" | tee -a $L; }
g tests/engine/test_gpu_end_to_end.py tests/engine/test_gpu_fp8.py tests/engine/test_gpu_bf16_logits.py \
  tests/engine/test_prefill_graphs.py tests/engine/test_fp8_kv_cache.py tests/engine/test_fp8_kv_accuracy.py
g tests/engine/test_fused_ops.py tests/engine/test_pdl.py tests/engine/test_sampling_kernels.py \
  tests/engine/test_sampler.py tests/engine/test_structured_output.py tests/engine/test_triton_paged.py
g tests/engine/test_triton_attention.py
g tests/engine/test_skinny_gemm.py
g tests/engine/test_triton_decode.py
g tests/engine/test_mid_gemm.py
rm -f $OUT/t.txt
echo "elapsed $(( $(date +%s) - T0 )) s" | tee -a $L
