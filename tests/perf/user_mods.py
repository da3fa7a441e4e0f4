"""GPU: what a user modification (`cuflash.ScoreMod`, `cuflash.MaskMod`) costs, in one run.

1. Cold compile: the first forward and the first backward of a ScoreMod never compiled before
   (its source carries a fresh constant, so neither the process nor CuPy's disk cache has it),
   B1 S1k H16 D128 bf16 causal, against the same calls once compiled.
2. Speed, bf16, B*S = 16k tokens, H*D = 2048, causal, CUDA events (median of `--repeats`
   timings of `--calls` back-to-back calls, after warm-up), forward and backward (out.backward
   through each library's autograd):
   - softcap 30: cuflash's built-in, the same as a user ScoreMod, FlexAttention's score_mod;
   - documents (random lengths 128..2k, ids per token): cuflash's user MaskMod on the ids,
     cuflash's bool mask array (B, 1, S, S), FlexAttention with the same mask_mod and its block
     mask (its build time reported apart).

PYTHONPATH=. python3 tests/perf/user_mods.py [--seqlens 1024 4096] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

import cuflash
import cuflash.torch as cft
from cuflash.bench.config import attention_flops
from cuflash.bench.mask_mods import documents
from cuflash.bench.torch_gpu import compiled_flex, cuda_torch, environment, time_pass

CAP = 30.0
SOFTCAP = cuflash.ScoreMod("30.f * tanh_for<T>(score * (1.f / 30.f))",
                           grad="1.f - (out / 30.f) * (out / 30.f)")
DOCS = cuflash.MaskMod("doc(b, q_idx) == doc(b, kv_idx)")


def cold_compile(torch) -> dict:
    """Seconds of the first and a later forward and backward of a never-seen ScoreMod."""
    salt = f"{time.time_ns() % 1_000_000}"
    mod = cuflash.ScoreMod(f"score + {salt}e-12f", grad="1")
    q, k, v, dout = (torch.randn(1, 16, 1024, 128, device="cuda", dtype=torch.bfloat16)
                     for _ in range(4))
    found = {}
    for label in ("first", "again"):
        torch.cuda.synchronize()
        start = time.perf_counter()
        out, lse = cuflash.attention(q, k, v, causal=True, score_mod=mod, layout="bhsd",
                                     return_lse=True)
        torch.cuda.synchronize()
        middle = time.perf_counter()
        cuflash.attention_backward(dout, q, k, v, out, lse, causal=True, score_mod=mod,
                                   layout="bhsd")
        torch.cuda.synchronize()
        found[f"fwd_{label}_s"] = middle - start
        found[f"bwd_{label}_s"] = time.perf_counter() - middle
    return found


def impls(torch, seqlen: int, doc) -> dict:
    mask = (doc[:, None, :, None] == doc[:, None, None, :])  # (B, 1, S, S) bool

    def flex_doc_mask(b, h, q, kv):
        return (doc[b, q] == doc[b, kv]) & (kv <= q)

    def flex_cap(score, b, h, q, kv):
        return CAP * torch.tanh(score / CAP)

    def causal(b, h, q, kv):
        return kv <= q

    found = {
        "softcap builtin": lambda q, k, v: cft.attention(q, k, v, causal=True, softcap=CAP,
                                                         layout="bhsd"),
        "softcap user": lambda q, k, v: cft.attention(q, k, v, causal=True,
                                                      score_mod=SOFTCAP, layout="bhsd"),
        "docs user": lambda q, k, v: cft.attention(q, k, v, causal=True, mask_mod=DOCS,
                                                   aux={"doc": doc}, layout="bhsd"),
        "docs mask array": lambda q, k, v: cft.attention(q, k, v, causal=True, mask=mask,
                                                         layout="bhsd"),
        "plain": lambda q, k, v: cft.attention(q, k, v, causal=True, layout="bhsd"),
    }
    extra = {}
    try:
        found["softcap flex"] = compiled_flex(torch, seqlen, causal, flex_cap)
        torch.cuda.synchronize()
        start = time.perf_counter()
        found["docs flex"] = compiled_flex(torch, seqlen, flex_doc_mask, batch=doc.shape[0])
        torch.cuda.synchronize()
        extra["flex block mask + compile s"] = time.perf_counter() - start
    except Exception as err:  # no triton: say so, go on
        print(f"flex unavailable: {type(err).__name__}: {err}", file=sys.stderr)
    return found, extra


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seqlens", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch = cuda_torch("user_mods")
    if torch is None:
        return 2
    record = {"env": environment(torch), "cold": cold_compile(torch), "rows": []}
    print("cold compile:", {k: round(v, 2) for k, v in record["cold"].items()})
    rng = np.random.default_rng(0)
    head_dim, heads = 128, 16
    for seqlen in args.seqlens:
        batch = max(1, 16384 // seqlen)
        doc = documents(torch, batch, seqlen, rng)
        inputs = [torch.randn(batch, heads, seqlen, head_dim, device="cuda",
                              dtype=torch.bfloat16) for _ in range(4)]
        fns, extra = impls(torch, seqlen, doc)
        with torch.no_grad():
            ref = fns["docs mask array"](*inputs[:3]).float()
            got = fns["docs user"](*inputs[:3]).float()
            diff = float((ref - got).abs().max())
        print(f"S{seqlen}: |docs user - docs mask array| = {diff:.3g}; {extra}")
        for name, fn in fns.items():
            for pass_ in ("fwd", "bwd"):
                flops = attention_flops(batch, heads, seqlen, seqlen, head_dim, causal=True,
                                        pass_=pass_)
                try:
                    ms = time_pass(torch, fn, inputs, pass_, args.calls, args.repeats)
                except Exception as err:
                    print(f"  {name} {pass_}: {type(err).__name__}: {err}"[:300])
                    continue
                row = {"seqlen": seqlen, "batch": batch, "impl": name, "pass": pass_,
                       "ms": ms, "tflops": flops / ms / 1e9, **extra}
                record["rows"].append(row)
                print(f"  S{seqlen:5d} {pass_} {name:16s} {ms:8.3f} ms "
                      f"{flops / ms / 1e9:6.1f} TFLOP/s (causal count)", flush=True)
        del inputs, fns
        torch.cuda.empty_cache()
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "user_mods.json").write_text(json.dumps(record, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
