"""``python -m cuflash bench --mask-mods``: user mask_mods with their block maps against
FlexAttention.

Two masks, bf16, B*S = 16k tokens, H*D = 2048 (H = 16 at D 128, 32 at D 64), Sq = Sk = S:
- documents packed into each sequence (random lengths 128..2048, int32 ids per token), with
  ``causal=True``: ``doc(b, q_idx) == doc(b, kv_idx)``;
- a prefix-LM mask (every query sees the first `prefix(b)` tokens, S/8..S/2, and its causal
  past): ``kv_idx <= q_idx || kv_idx < prefix(b)``, run without `causal`.

In each cell, on the same fresh random inputs: ``cuflash map`` (`cuflash.torch.attention` with a
map built once by `cuflash.block_map` and reused, as every layer of a step would), ``cuflash``
(no map passed: one built per call), ``flex`` (FlexAttention's compiled `flex_attention` with
``create_block_mask`` of the same mask_mod, B given) and ``causal, no mask_mod`` (plain causal
cuflash, the dense yardstick). The map's and Flex's block-mask build times are reported apart,
with the map's density (the fraction of 64 x 64 blocks the kernels walk) and the fraction of
rows whose keys are one interval (masked by their bounds on Hopper). Forward (no grad) and
backward (``out.backward`` of one forward), CUDA events, median of `--repeats` timings of
`--calls` calls after warm-up. Every cuflash output is checked against Flex's (max |difference|)
before it is timed. ``--out DIR`` writes ``mask_mods.json``. Needs torch with a CUDA GPU:
without one it says so and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

import cuflash
from cuflash.bench.config import attention_flops
from cuflash.bench.torch_gpu import compiled_flex, cuda_torch, environment, time_pass

DOCS = cuflash.MaskMod("doc(b, q_idx) == doc(b, kv_idx)")
PREFIX = cuflash.MaskMod("kv_idx <= q_idx || kv_idx < prefix(b)")


def documents(torch, batch: int, seqlen: int, rng):
    """Document ids (batch, seqlen), int32 on the GPU: runs of 128..2048 tokens."""
    ids = np.zeros((batch, seqlen), dtype=np.int32)
    for b in range(batch):
        at, doc = 0, 0
        while at < seqlen:
            n = int(rng.integers(128, 2049))
            ids[b, at:at + n] = doc
            at, doc = at + n, doc + 1
    return torch.from_numpy(ids).cuda()


def masks(torch, batch: int, seqlen: int, rng) -> dict:
    """name -> (cuflash MaskMod, aux, causal, Flex mask_mod)."""
    doc = documents(torch, batch, seqlen, rng)
    prefix = torch.from_numpy(rng.integers(seqlen // 8, seqlen // 2, size=batch)
                              .astype(np.int32)).cuda()

    def flex_docs(b, h, q, kv):
        return (doc[b, q] == doc[b, kv]) & (kv <= q)

    def flex_prefix(b, h, q, kv):
        return (kv <= q) | (kv < prefix[b])

    return {"docs": (DOCS, {"doc": doc}, True, flex_docs),
            "prefix": (PREFIX, {"prefix": prefix}, False, flex_prefix)}


def seconds(torch, fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cuflash bench --mask-mods")
    parser.add_argument("--seqlens", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch = cuda_torch("--mask-mods")
    if torch is None:
        return 2
    record = {"env": environment(torch), "rows": []}
    rng = np.random.default_rng(0)
    for head_dim in args.head_dims:
        heads = 2048 // head_dim
        for seqlen in args.seqlens:
            batch = max(1, 16384 // seqlen)
            inputs = [torch.randn(batch, heads, seqlen, head_dim, device="cuda",
                                  dtype=torch.bfloat16) for _ in range(4)]
            for mask_name, mask in masks(torch, batch, seqlen, rng).items():
                cell = {"seqlen": seqlen, "batch": batch, "heads": heads, "head_dim": head_dim,
                        "mask": mask_name}
                record["rows"] += run_cell(torch, inputs, cell, *mask, args)
            del inputs
            torch.cuda.empty_cache()
    summary(record["rows"])
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "mask_mods.json").write_text(json.dumps(record, indent=1, default=str))
    return 0


def run_cell(torch, inputs, cell: dict, mod, aux, causal: bool, flex_mod, args) -> list[dict]:
    """One (D, S, mask) cell: build times, a check against Flex, then every timing."""
    from torch.nn.attention.flex_attention import create_block_mask

    import cuflash.torch as cft

    q, k = inputs[:2]
    seqlen, batch = cell["seqlen"], cell["batch"]
    options = {"mask_mod": mod, "aux": aux, "causal": causal, "layout": "bhsd"}
    bmap = cuflash.block_map(q, k, **options)
    cell["map_build_ms"] = 1e3 * min(
        seconds(torch, lambda: cuflash.block_map(q, k, **options)) for _ in range(3))
    cell["map_density"] = bmap.density()
    cell["map_intervals"] = bmap.intervals()  # rows masked by their bounds on Hopper
    fns = {"cuflash map": lambda q, k, v: cft.attention(q, k, v, block_map=bmap, **options),
           "cuflash": lambda q, k, v: cft.attention(q, k, v, **options),
           "causal, no mask_mod": lambda q, k, v: cft.attention(q, k, v, causal=True,
                                                                  layout="bhsd")}
    try:
        start = time.perf_counter()
        fns["flex"] = compiled_flex(torch, seqlen, flex_mod, batch=batch)
        cell["flex_block_mask_and_compile_s"] = time.perf_counter() - start
        cell["flex_block_mask_ms"] = 1e3 * min(
            seconds(torch, lambda: create_block_mask(flex_mod, batch, None, seqlen, seqlen,
                                                     device="cuda", _compile=True))
            for _ in range(3))
    except Exception as err:  # no triton: say so, go on
        print(f"flex unavailable: {type(err).__name__}: {err}"[:300], file=sys.stderr)
    with torch.no_grad():
        ref = fns.get("flex", fns["cuflash"])(*inputs[:3]).float()
        for name in ("cuflash map", "cuflash"):
            cell[f"{name} max_diff"] = float((fns[name](*inputs[:3]).float() - ref).abs().max())
    shown = {key: round(x, 4) if isinstance(x, float) else x for key, x in cell.items()}
    print(shown, flush=True)
    rows = []
    for name, fn in fns.items():
        for pass_ in ("fwd", "bwd"):
            flops = attention_flops(batch, cell["heads"], seqlen, seqlen, cell["head_dim"],
                                    causal=True, pass_=pass_)
            try:
                ms = time_pass(torch, fn, inputs, pass_, args.calls, args.repeats)
            except Exception as err:
                print(f"  {name} {pass_}: {type(err).__name__}: {err}"[:300])
                continue
            rows.append({**cell, "impl": name, "pass": pass_, "ms": ms,
                         "tflops_causal_count": flops / ms / 1e9})
            print(f"  D{cell['head_dim']} S{seqlen:5d} {cell['mask']:6s} {pass_} {name:12s} "
                  f"{ms:8.3f} ms", flush=True)
    return rows


def summary(rows: list[dict]) -> None:
    """One Markdown line per cell and pass: cuflash with its map reused, with one per call,
    Flex, Flex's time over the reused map's, plain causal cuflash (ms)."""
    cells: dict = {}
    for row in rows:
        key = (row["head_dim"], row["seqlen"], row["mask"], row["pass"])
        cells.setdefault(key, {})[row["impl"]] = row["ms"]
    print("| D | S | mask | pass | cuflash map ms | cuflash per-call ms | Flex ms | Flex / map "
          "| causal, no mask_mod ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (d, s, mask, pass_), found in sorted(cells.items()):
        mine, flex = found.get("cuflash map"), found.get("flex")
        ratio = f"{flex / mine:.2f}x" if mine and flex else "-"
        per_call, dense = found.get("cuflash"), found.get("causal, no mask_mod")
        print(f"| {d} | {s} | {mask} | {pass_} | {mine or float('nan'):.3f} | "
              f"{per_call or float('nan'):.3f} | {flex or float('nan'):.3f} | {ratio} | "
              f"{dense or float('nan'):.3f} |")


if __name__ == "__main__":
    sys.exit(main())
