# Ad-hoc variants of the fp8 decode default, added at run time (not in the repo's DECODE_CONFIGS).
import dataclasses, sys
sys.path.insert(0, "bench")
from pagedbatch.engine.attention import triton_decode as td
import decode_attention as da
base = td.DECODE_CONFIGS["v2-f8mma-pack-vtail-waves"]
V = {
    "x-pack-nopf": dict(prefetch_table=False),
    "x-pack-latev": dict(early_v=False),
    "x-pack-s4": dict(num_stages=4),
    "x-pack-r3": dict(resident_per_sm=3),
    "x-pack-r5": dict(resident_per_sm=5),
    "x-pack-w8": dict(num_warps=8),
    "x-pack-n128": dict(block_n=128),
    "x-pack-n32": dict(block_n=32),
}
for k, v in V.items():
    td.DECODE_CONFIGS[k] = dataclasses.replace(base, **v)
names = "v2-f8mma-pack-vtail-waves," + ",".join(V) + ",v2-f8mma-pack-vtail-waves"
sys.exit(da.main(sys.argv[1:] + ["--configs", names]))
