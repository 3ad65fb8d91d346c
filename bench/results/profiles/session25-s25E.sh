#!/bin/bash
# Session 25, call E (an H100, after one refused try): what 8,192-token prefill graphs cost at start-up
# and in KV blocks (load_s, num_blocks from each run's JSON), W1 (a 7B shape) and W-nano (0.6B), new default
# against 512, alternated.
export PYTHONUNBUFFERED=1
R=$OUT/res; mkdir -p $R
L=$OUT/s25E-log.txt
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv | tee $L
t() { PYTHONPATH=$PWD timeout 70 python bench/throughput.py --peers none --results-dir $R --tag s25E-$1 --sustained-s 0 "${@:2}" 2>&1 | tee -a $OUT/s25E-full.txt | grep -E "^pagedbatch|Error|error" | sed "s|^|$* :: |" | tee -a $L; }
t w1-8k --workload W1 --max-num-seqs 512; t w1-512 --workload W1 --max-num-seqs 512 --prefill-graph-max-tokens 512
t nano-512 --workload W-nano --prefill-graph-max-tokens 512; t nano-8k --workload W-nano
python - <<'PY' | tee -a $L
import glob, json, os
for f in sorted(glob.glob(os.environ["OUT"] + "/res/*.json")):
    d = json.load(open(f))
    r = d.get("pagedbatch") or d.get("ours") or d
    def find(o, k):
        if isinstance(o, dict):
            if k in o: return o[k]
            for v in o.values():
                x = find(v, k)
                if x is not None: return x
        return None
    print(os.path.basename(f), "load_s", round(find(d, "load_s") or -1, 2), "num_blocks", find(d, "num_blocks"))
PY
