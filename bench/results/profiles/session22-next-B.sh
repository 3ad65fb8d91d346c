#!/bin/bash
# For the next session (written in session 22, unrun): should fp8 weights capture prefill graphs up to 8192 tokens
# by default? Every W-nano fp8-weights ratio since the thirteenth session was measured with
# --prefill-graph-max-tokens 8192 (there +6% over the default 512: fp8's _scaled_mm host path is ~100 us a call).
# Alternated on W-nano and W1 with fp8 weights; each result JSON has load_s (start-up, graph capture included).
export PYTHONUNBUFFERED=1
R=$OUT/res; mkdir -p $R
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/next-B-log.txt
t() { PYTHONPATH=$PWD timeout 75 python bench/throughput.py --peers none --results-dir $R --sustained-s 0 "$@" 2>&1 | grep -E "^pagedbatch|Error" | sed "s|^|$* :: |" | tee -a $OUT/next-B-log.txt; }
N="--workload W-nano --kv-cache-dtype fp8 --quantization fp8"
W="--workload W1 --max-num-seqs 512 --quantization fp8"
t $N --tag g512; t $N --prefill-graph-max-tokens 8192 --tag g8192; t $N --tag g512b; t $N --prefill-graph-max-tokens 8192 --tag g8192b
t $W --tag g512; t $W --prefill-graph-max-tokens 8192 --tag g8192
python - "$R" <<'PY' | tee -a $OUT/next-B-log.txt
import glob, json, sys
for f in sorted(glob.glob(sys.argv[1] + "/*.json")):
    row = next(r for r in json.load(open(f))["rows"] if r.get("engine") == "pagedbatch")
    print(f.rsplit("/", 1)[-1], "load_s %.1f" % row["load_s"])
PY
cd $OUT && tar cf next-B-results.tar res && rm -rf res
