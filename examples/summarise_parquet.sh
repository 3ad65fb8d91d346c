#!/usr/bin/env bash
# A worked example of dataset generation: a prompt template over a Parquet column, the input's
# columns carried into the results, 4 samples per article (one row each, sample_index 0..3).
#
#   bash examples/summarise_parquet.sh                                  # the demo model, any machine
#   MODEL=Qwen/Qwen2.5-7B-Instruct bash examples/summarise_parquet.sh   # a Hub id (or a model directory)
#
# Writes out/articles.parquet (the input), then out/summaries/ (results/, report.md). Rerunning
# resumes. Each option of the job is on its own line, so adding one is a one-line change.
set -euo pipefail
cd "$(dirname "$0")/.."

python - <<'PY'
import os

import pyarrow as pa
import pyarrow.parquet as pq

articles = [
    ("a1", "Paged attention", "The KV cache is stored in fixed-size blocks, so memory is allocated as "
     "sequences grow and freed the moment they finish.", {"audience": "engineers", "max_words": 30}),
    ("a2", "Prefix caching", "Requests that share a prompt prefix reuse the blocks already computed for it.",
     {"audience": "students", "max_words": 20}),
    ("a3", "Continuous batching", "Finished sequences leave the batch at once and waiting ones take their "
     "place, so the GPU never idles on a straggler.", {"audience": None, "max_words": 25}),
]
table = pa.table({
    "id": [a[0] for a in articles],
    "title": [a[1] for a in articles],
    "body": [a[2] for a in articles],
    "meta": pa.array([a[3] for a in articles],
                     pa.struct([("audience", pa.string()), ("max_words", pa.int32())])),
})
os.makedirs("out", exist_ok=True)
pq.write_table(table, "out/articles.parquet")
PY

python run_batch.py \
    --input out/articles.parquet \
    --output out/summaries \
    ${MODEL:+--model "$MODEL"} \
    --prompt-template-file examples/summarise.j2 \
    --system-prompt "You are a careful editor. Answer with the summary only." \
    --keep-columns title,meta \
    --n 4 \
    --max-tokens 96 \
    --temperature 0.7 \
    --seed 0

python - <<'PY'
import pyarrow.dataset as ds

table = ds.dataset("out/summaries/results").to_table().sort_by([("index", "ascending"), ("sample_index", "ascending")])
for row in table.to_pylist():
    print(f"{row['id']}#{row['sample_index']} {row['title']!r} for {row['meta']['audience']}: {row['output']!r}")
PY
