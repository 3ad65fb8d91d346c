#!/bin/bash
# Nightly batch job from cron: process the day's prompts into a dated OUT.
# A run killed half-way (reboot, OOM) is finished by the next invocation of
# the same command: results are committed in parts and resumed.
#
# crontab -e:
#   30 2 * * * /path/to/pagedbatch/examples/cron.sh >> /var/log/pagedbatch-cron.log 2>&1
#
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
DAY="$(date +%F)"
INPUT="${INPUT:-/data/prompts/${DAY}.jsonl}"
OUT="${OUT:-/data/generations/${DAY}}"
MODEL="${MODEL:-/models/Qwen2.5-7B-Instruct}"

cd "$REPO"
. .venv/bin/activate
# The job itself refuses a second run on one OUT (cron may fire while a long run is still going: that
# run exits 1 at once, saying which process holds OUT); flock -n here just skips the launch quietly.
exec flock -n "/tmp/pagedbatch-${DAY}.lock" \
  python run_batch.py --config configs/qwen2.5-7b-h100.yaml \
    --input "$INPUT" --output "$OUT" --model "$MODEL"
