"""How fast the engine's paged decode could stream its KV cache: the decode kernel's loads without its math.

    python bench/decode_stream_probe.py                       # W-nano and W1 shapes, bf16 and fp8 caches (~1 min)
    python bench/decode_stream_probe.py --cases wnano --dtypes fp8 --stages 2,3,4
    python bench/decode_stream_probe.py --device cpu          # correctness only: the interpreter, tiny shapes

The question (docs/benchmarks.md, seventh session): on W-nano's shape the fp8 cache's decode kernel reads 2.8 TB/s
against the bf16 kernel's 4.0, and a program's 64-key tile takes about the same time with either, though fp8's
carries half the bytes. Either the fp8 tile's chain of work bounds the kernel, or the structure it shares with
bf16 (programs of one sequence and KV head, their number and length, each tile's block ids loaded before its
keys, the pipeline depth) cannot stream half-size tiles any faster. This kernel keeps that structure for the
engine's default config on each case (bench/decode_attention.py's cases, caches and block tables): the grid
(sequence, KV head, split) and the engine's split count, the tile of keys, tile t + 1's block ids loaded during
tile t, K's rows and V's blocks addressed as the engine addresses them (V key-contiguous for an fp8 cache, as the
engine stores it), the full tiles unmasked and the last one masked, the warps and stages; it only XORs the
32-bit words it loads. It reads every byte the engine's kernel reads and checks its checksum of them against
the cache. Its time is a ceiling for the structure; the engine's kernel is timed on the same case next to it.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)


@functools.lru_cache(maxsize=None)
def probe_kernel():
    """The probe's kernel, defined at the first call: the CPU run sets TRITON_INTERPRET before triton is imported."""
    global split_tiles  # a module global: Triton's interpreter does not see a nested kernel's closure
    import triton
    import triton.language as tl

    from pagedbatch.engine.attention.triton_decode import split_tiles

    @triton.jit
    def _stream(K, V, Y, block_tables, seq_lens, num_splits, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_bt,
                KW: tl.constexpr, V_BLOCK_WORDS: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                SPLIT: tl.constexpr, V_KEYS: tl.constexpr, NUM_STAGES: tl.constexpr):
        """K: int32 words of the cache, [block, slot, kv head, KW]; V likewise, or (V_KEYS) one run of
        V_BLOCK_WORDS words per (block, kv head). Y[seq, kv head, split]: the XOR of every word read."""
        seq = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        seq_len = tl.load(seq_lens + seq)
        t_lo, t_hi, t_full = split_tiles(seq_len, split, num_splits, BLOCK_N, SPLIT)  # the engine's split
        NB: tl.constexpr = BLOCK_N // BLOCK_SIZE  # blocks a tile spans (tiles start on block boundaries)
        offs_n = tl.arange(0, BLOCK_N)
        offs_w = tl.arange(0, KW)
        offs_b = tl.arange(0, NB)
        offs_vw = tl.arange(0, V_BLOCK_WORDS)
        bt_row = block_tables + seq * s_bt
        Kh = K + kvh * s_kh
        Vh = V + kvh * s_vh
        rows = offs_n % BLOCK_SIZE
        acc_k = tl.zeros([BLOCK_N, KW], tl.int32)
        if V_KEYS:
            acc_v = tl.zeros([NB, V_BLOCK_WORDS], tl.int32)
        else:
            acc_v = tl.zeros([BLOCK_N, KW], tl.int32)
        # Tile t_lo's block ids before the loop, tile t + 1's during tile t, as the engine's kernel loads them
        # (V_KEYS: also one id per block, for the blocks' V runs).
        pos = t_lo * BLOCK_N + offs_n
        blk = tl.load(bt_row + pos // BLOCK_SIZE, mask=pos < seq_len, other=0)
        if V_KEYS:
            bpos = (t_lo * NB + offs_b) * BLOCK_SIZE
            vblk = tl.load(bt_row + bpos // BLOCK_SIZE, mask=bpos < seq_len, other=0)
        # Pipelined as the engine's loop is (its loads feed tl.dot, which Triton pipelines through shared memory
        # with the launch's num_stages; loads that feed no dot are pipelined only by a loop that asks).
        for t in tl.range(t_lo, t_full, num_stages=NUM_STAGES):
            cur = blk
            pos = (t + 1) * BLOCK_N + offs_n
            blk = tl.load(bt_row + pos // BLOCK_SIZE, mask=pos < seq_len, other=0)
            b64 = cur.to(tl.int64)
            acc_k ^= tl.load(Kh + (b64 * s_kb + rows * s_ks)[:, None] + offs_w[None, :])
            if V_KEYS:
                vcur = vblk
                bpos = ((t + 1) * NB + offs_b) * BLOCK_SIZE
                vblk = tl.load(bt_row + bpos // BLOCK_SIZE, mask=bpos < seq_len, other=0)
                acc_v ^= tl.load(Vh + (vcur.to(tl.int64) * s_vb)[:, None] + offs_vw[None, :])
            else:
                acc_v ^= tl.load(Vh + (b64 * s_vb + rows * s_vs)[:, None] + offs_w[None, :])
        t = tl.maximum(t_lo, t_full)
        if t < t_hi:  # the sequence's partial last tile: K masked by key, V's blocks whole (key-contiguous)
            pos = t * BLOCK_N + offs_n
            ok = pos < seq_len
            b64 = tl.load(bt_row + pos // BLOCK_SIZE, mask=ok, other=0).to(tl.int64)
            acc_k ^= tl.load(Kh + (b64 * s_kb + rows * s_ks)[:, None] + offs_w[None, :], mask=ok[:, None], other=0)
            if V_KEYS:
                bpos = (t * NB + offs_b) * BLOCK_SIZE
                vb = tl.load(bt_row + bpos // BLOCK_SIZE, mask=bpos < seq_len, other=0).to(tl.int64)
                acc_v ^= tl.load(Vh + (vb * s_vb)[:, None] + offs_vw[None, :], mask=(bpos < seq_len)[:, None],
                                 other=0)
            else:
                acc_v ^= tl.load(Vh + (b64 * s_vb + rows * s_vs)[:, None] + offs_w[None, :], mask=ok[:, None],
                                 other=0)
        y = tl.xor_sum(tl.xor_sum(acc_k, 1), 0) ^ tl.xor_sum(tl.xor_sum(acc_v, 1), 0)
        tl.store(Y + (seq * tl.num_programs(1) + kvh) * tl.num_programs(2) + split, y)

    return _stream


def word_views(k, v, v_key_contiguous: bool):
    """(K as int32 [blocks, slots, kv heads, words], V as the same or [blocks, kv heads, words of a block]):
    views of one layer's caches (bench/decode_attention.build_case's logical layouts) in their storage order."""
    import torch

    k32 = k.view(torch.int32)
    if v_key_contiguous:  # logical [blocks, slots, heads, D] over storage [blocks, heads, D, slots]
        store = v.permute(0, 2, 3, 1)
        assert store.is_contiguous(), "the V cache is not stored key-contiguous"
        v32 = store.reshape(store.shape[0], store.shape[1], -1).view(torch.int32)
    else:
        v32 = v.view(torch.int32)
    return k32, v32


def reference_xor(k32, v32, table, seq_lens, block_size: int, v_key_contiguous: bool):
    """[seqs, kv heads]: the XOR of every K word of the sequence's keys and every V word the probe reads
    (key-contiguous V: its blocks whole), on the CPU."""
    import numpy as np

    k = k32.cpu().numpy()
    v = v32.cpu().numpy()
    tab = table.cpu().numpy()
    out = np.zeros((len(seq_lens), k.shape[2]), dtype=np.int32)
    for s, n in enumerate(seq_lens.cpu().tolist()):
        nb = -(-n // block_size)
        ids = tab[s, :nb]
        kk = k[ids].reshape(nb * block_size, k.shape[2], -1)[:n]
        x = np.bitwise_xor.reduce(kk.transpose(1, 0, 2).reshape(k.shape[2], -1), axis=1)
        if v_key_contiguous:
            vv = v[ids].transpose(1, 0, 2).reshape(v.shape[1], -1)
        else:
            vv = v[ids].reshape(nb * block_size, v.shape[2], -1)[:n].transpose(1, 0, 2).reshape(v.shape[2], -1)
        out[s] = x ^ np.bitwise_xor.reduce(vv, axis=1)
    return out


def run_case(case, fp8: bool, device, num_sms: int, quick: bool, reps: int, stages: list[int]) -> list[dict]:
    import numpy as np
    import torch

    import decode_attention as da
    from pagedbatch.engine.attention.triton_decode import DEFAULT_DECODE_CONFIG, DECODE_CONFIGS
    from skinny_gemm import graph_ms

    name = DEFAULT_DECODE_CONFIG[1 if fp8 else 2]
    cfg = DECODE_CONFIGS[name]
    group = case.heads // case.kv_heads
    tile = cfg.tile(group)
    if tile % case.block_size:
        raise SystemExit(f"decode_stream_probe: the {tile}-key tile of {name} spans part of a {case.block_size}-token "
                         f"block; the probe reads whole blocks (block sizes up to the tile)")
    splits = cfg.num_splits(case.batch, case.kv_heads, group, case.max_model_len, num_sms)
    v_layout = da.engine_v_layout(fp8)
    key_contig = v_layout == "key-contiguous"
    layers = da.graph_layers(case, fp8, quick)
    data = da.build_case(case, fp8, layers, device, v_layout=v_layout)
    views = [word_views(data["k"][i], data["v"][i], key_contig) for i in range(layers)]
    k32, v32 = views[0]
    kw = k32.shape[-1]
    vbw = v32.shape[-1] if key_contig else kw
    ys = [torch.empty(case.batch, case.kv_heads, splits, dtype=torch.int32, device=device) for _ in range(layers)]

    def call(i, st):
        k, v = views[i]
        sv = (v.stride(0), 0, v.stride(1)) if key_contig else (v.stride(0), v.stride(1), v.stride(2))
        return probe_kernel()[(case.batch, case.kv_heads, splits)](
            k, v, ys[i], data["table"], data["seq_lens"][i], splits, k.stride(0), k.stride(1), k.stride(2), *sv,
            data["table"].stride(0), KW=kw, V_BLOCK_WORDS=vbw, BLOCK_SIZE=case.block_size, BLOCK_N=tile,
            SPLIT=splits > 1, V_KEYS=key_contig, NUM_STAGES=st, num_warps=cfg.num_warps, num_stages=st)

    info = dict(case=case.name, dtype="fp8" if fp8 else "bf16", engine_config=name, splits=splits, tile=tile,
                v_layout=v_layout, kv_bytes_per_call=data["kv_bytes"], layers_per_graph=layers)
    want = reference_xor(k32, v32, data["table"], data["seq_lens"][0], case.block_size, key_contig)
    rows = []
    for st in stages:
        ys[0].fill_(0x5A5A5A5A)
        kernel = call(0, st)
        got = np.bitwise_xor.reduce(ys[0].cpu().numpy(), axis=2)
        if not (got == want).all():
            raise SystemExit(f"decode_stream_probe: {case.name} {info['dtype']} stages {st}: the checksum of the "
                             f"words read differs from the cache's ({int((got != want).sum())} of {got.size} "
                             f"(sequence, head) pairs): the probe does not read what the engine reads")
        row = dict(info, kernel="probe", stages=st, warps=cfg.num_warps)
        if not quick:
            occ = da.occupancy(kernel, cfg.num_warps)
            row.update(registers=occ.get("regs"), smem_kb=occ.get("smem_kb"))
            # Warm replays first: the first config of a case ran ~5% slower (bench/decode_attention.py).
            row["us"] = graph_ms(lambda st=st: [call(i, st) for i in range(layers)], reps, warm_s=0.3) * 1e3 / layers
            row["tb_s"] = data["kv_bytes"] / (row["us"] * 1e-6) / 1e12
        rows.append(row)
    views.clear(), ys.clear(), data.clear()  # free this case's caches before the engine's run builds its own
    if not quick:  # the engine's kernel on the same case (its own copy of the same data)
        eng = da.run_case(case, fp8, [name], device, num_sms, False, reps, v_layout)[0]
        rows.append(dict(info, kernel="engine", stages=cfg.num_stages, warps=cfg.num_warps, us=eng.get("us"),
                         tb_s=eng.get("tb_s"), registers=eng.get("regs"), smem_kb=eng.get("smem_kb"),
                         status=eng.get("status")))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--cases", default="wnano,w1", help="of bench/decode_attention.py's cases")
    ap.add_argument("--dtypes", default="bf16,fp8")
    ap.add_argument("--stages", default=None, help="pipeline stages to try (default: the engine config's)")
    ap.add_argument("--block-size", type=int, default=None,
                    help="the KV cache's block size for every case (default: the case's, 16; a power of two)")
    ap.add_argument("--num-sms", type=int, default=None,
                    help="split counts as on a GPU of this many SMs (default: this GPU's; the CPU run: 132)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--results-dir", default=os.path.join(HERE, "results"))
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    quick = args.device == "cpu"
    if quick:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
    import torch

    import decode_attention as da
    from pagedbatch.engine.attention.triton_decode import DEFAULT_DECODE_CONFIG, DECODE_CONFIGS

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("decode_stream_probe: needs a CUDA GPU (or --device cpu for correctness only)")
    cases = da.QUICK_CASES if quick else da.CASES
    if args.block_size is not None:
        if args.block_size < 16 or args.block_size & (args.block_size - 1):
            ap.error(f"--block-size must be a power of two >= 16, got {args.block_size}")
        cases = {k: dataclasses.replace(c, block_size=args.block_size) for k, c in cases.items()}
    num_sms = args.num_sms or (torch.cuda.get_device_properties(device).multi_processor_count
                               if device.type == "cuda" else 132)
    ceilings = da.measure_ceilings(device) if not quick else {}
    rows = []
    for case_name in args.cases.split(","):
        if case_name not in cases:
            raise SystemExit(f"--cases: unknown {case_name!r} (of {', '.join(cases)})")
        for dtype in args.dtypes.split(","):
            fp8 = dtype == "fp8"
            cfg = DECODE_CONFIGS[DEFAULT_DECODE_CONFIG[1 if fp8 else 2]]
            stages = [int(s) for s in args.stages.split(",")] if args.stages else [cfg.num_stages]
            for r in run_case(cases[case_name], fp8, device, num_sms, quick, args.reps, stages):
                rows.append(r)
                timing = (f"{r['us']:8.1f} us {r['tb_s']:5.2f} TB/s"
                          + (f" ({100 * r['tb_s'] / ceilings['copy_tb_s']:.0f}% of copy)" if ceilings else "")
                          if r.get("us") else "checksum ok")
                print(f"{r['case']:6s} {r['dtype']:4s} {r['kernel']:6s} {r['engine_config']:26s} tile {r['tile']:3d} "
                      f"splits {r['splits']:2d} warps {r['warps']} stages {r['stages']}  {timing}"
                      + (f"  {r['registers']} registers, {r['smem_kb']:.0f} KB shared" if r.get("registers") else ""),
                      flush=True)
    if not quick:
        name = torch.cuda.get_device_name(device)
        day = datetime.date.today().isoformat()
        os.makedirs(args.results_dir, exist_ok=True)
        path = os.path.join(args.results_dir,
                            f"decode_stream_probe-{day}-{name.replace(' ', '_')}{'-' + args.tag if args.tag else ''}.json")
        with open(path, "w") as f:
            json.dump(dict(device=name, date=day, ceilings=ceilings, rows=rows,
                           command="python bench/decode_stream_probe.py " + " ".join(sys.argv[1:] if argv is None else argv)),
                      f, indent=1, default=str)
        print(f"copy {ceilings['copy_tb_s']:.2f} TB/s this run; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
