#!/bin/bash
# Session 21, call B (2026-12-06): the GPU tests on main, then Hugging Face in the same runs as W1 and W-nano. ~6 min.
export PYTHONUNBUFFERED=1
R=$OUT/res; mkdir -p $R
L=$OUT/s21B-log.txt
nvidia-smi --query-gpu=name --format=csv | tee $L
s=$(date +%s)
PYTHONPATH=$PWD timeout 240 python -m pytest -q -m gpu -p no:cacheprovider tests/engine/test_gpu_end_to_end.py tests/engine/test_gpu_fp8.py tests/engine/test_prefill_graphs.py tests/engine/test_fp8_kv_cache.py tests/engine/test_fp8_kv_accuracy.py tests/engine/test_gpu_bf16_logits.py tests/engine/test_block_size.py > $OUT/gpu-tests.txt 2>&1
tail -3 $OUT/gpu-tests.txt | tee -a $L; echo "  tests ($(( $(date +%s) - s )) s)" | tee -a $L
t() { s=$(date +%s); to=$1; shift; PYTHONPATH=$PWD timeout $to python bench/throughput.py --results-dir $R --tag s21B "$@" 2>&1 | tee -a $OUT/s21B-full.txt | grep -E "^pagedbatch|^hf|^HF|roofline|Error|error" | sed "s|^|$* :: |" | tee -a $L; echo "  ($(( $(date +%s) - s )) s)" | tee -a $L; }
t 120 --workload W1 --max-num-seqs 512 --peers hf-static --hf-max-prompts 64
t 150 --workload W-nano --peers hf-static --hf-max-prompts 64
cd $OUT && tar cf s21B-results.tar res && rm -rf res
