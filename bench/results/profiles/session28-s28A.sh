#!/bin/bash
# Session 28, call A (2026-12-06): on an H200. (1) One-row fp8 configs in the decode chain that the earlier
# sweeps did not try (longer programs: 16 rows x 256 B like bf16's 14 tiles a row; deeper pipelines), two rounds;
# a config faster than the table's in both rounds by >= 1% becomes a --skinny-tuned override. (2) Issue 16's
# targets with the engine's defaults: W-nano bf16 against fp8 weights + fp8 KV alternated twice, single stream bf16
# / fp8 (/ fp8 with the overrides) alternated twice, W1 at 512 bf16 and fp8.
export PYTHONUNBUFFERED=1
T0=$(date +%s)
R=$OUT/res; mkdir -p $R
L=$OUT/s28A-log.txt
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv | tee $L
git log --oneline -1 | tee -a $L
V="gate_up=fma bm1 bn16 bk256 sk1 w4 st4;gate_up=fma bm1 bn8 bk512 sk1 w4 st6;gate_up=fma bm1 bn16 bk256 sk1 w4 st6"
V="$V;gate_up=fma bm1 bn8 bk256 sk1 w4 st8;down=fma bm1 bn16 bk256 sk1 w4 st4;down=fma bm1 bn16 bk512 sk1 w4 st6"
V="$V;down=fma bm1 bn8 bk256 sk1 w4 st8;qkv=fma bm1 bn16 bk256 sk1 w4 st4;qkv=fma bm1 bn8 bk512 sk1 w4 st6"
V="$V;o=fma bm1 bn16 bk256 sk1 w4 st4;o=fma bm1 bn8 bk512 sk1 w4 st6;all=fma bm1 bn16 bk256 sk1 w4 st4"
PYTHONPATH=$PWD timeout 200 python bench/decode_chain.py --kinds fp8 --rounds 2 --configs "$V" --results-dir $R \
  2>&1 | tail -40 | tee -a $L
OVR=$(python - $R <<'PY'
import glob, json, sys
rows = json.load(open(sorted(glob.glob(sys.argv[1] + "/decode-chain-*.json"))[-1]))["rows"]
keys = {"qkv": "1,4608,3584,fp8", "o": "1,3584,3584,fp8", "gate_up": "1,37888,3584,fp8",
        "down": "1,3584,18944,fp8,silu_mul"}
base = {r["round"]: r["pdl_on_us"] for r in rows if not r.get("config")}
best = {}
for r in rows:
    if r.get("config") and not r["config"].startswith("all="):
        best.setdefault(r["config"], {})[r["round"]] = r["pdl_on_us"] / base[r["round"]]
pick = {}
for cfg, ratio in best.items():
    name = cfg.split("=")[0]
    if len(ratio) == 2 and max(ratio.values()) <= 0.99 and (name not in pick or sum(ratio.values()) < pick[name][1]):
        pick[name] = (cfg.split("=", 1)[1], sum(ratio.values()))
print(";".join(f"{keys[n]}={c}" for n, (c, _) in pick.items()))
PY
)
echo "overrides: '$OVR'" | tee -a $L
t() { s=$(date +%s); PYTHONPATH=$PWD timeout 80 python bench/throughput.py --peers none --results-dir $R --tag s28A --sustained-s 0 "$@" 2>&1 | tee -a $OUT/s28A-full.txt | grep -E "^pagedbatch|Error|error" | sed "s|^|$* :: |" | tee -a $L; echo "  ($(( $(date +%s) - s )) s)" | tee -a $L; }
S8="--workload single --quantization fp8"
for i in 1 2; do
  t --workload single; t $S8
  if [ -n "$OVR" ]; then t $S8 --skinny-tuned "$OVR"; fi
done
N8="--workload W-nano --quantization fp8 --kv-cache-dtype fp8"
t --workload W-nano; t $N8; t --workload W-nano; t $N8
W1="--workload W1 --max-num-seqs 512"
t $W1; t $W1 --quantization fp8
date | tee -a $L
echo "elapsed $(( $(date +%s) - T0 )) s" | tee -a $L
(cd $OUT && tar cf s28A-results.tar res && rm -rf res)
