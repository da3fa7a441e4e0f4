"""``python -m cuflash bench --window``: sliding-window attention against FlexAttention.

Cells: bf16, Sq = Sk = S, window ``(w, 0)`` (each query sees itself and the w keys before it), for
each head dim, S and w, forward and backward. TFLOP/s count only the visible (query, key) pairs
(4 D FLOPs each forward, 2.5 times that backward), so a kernel that skips masked tiles well
reaches its dense rate. Beside each window: cuflash's dense causal rate at the same S (the
yardstick of "time grows with the window") and PyTorch FlexAttention compiled with the
equivalent ``mask_mod`` and a block mask, timed in the same run on fresh random inputs.

Backward cells time ``out.backward(dout)`` through each library's autograd (cuflash.torch,
flex_attention), so both pay the same framework costs. CUDA events, after warm-up; the median
of `repeats` timings of `calls` back-to-back calls (`cuflash.bench.torch_gpu`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from cuflash._variant import Variant
from cuflash.bench.torch_gpu import compiled_flex, cuda_torch, time_pass

PASS_FACTOR = {"fwd": 1.0, "bwd": 2.5}


def _flex(torch, seqlen: int, left: int | None):
    """A compiled FlexAttention callable for a causal window of `left` keys (None: causal)."""
    if left is None:
        def mask_mod(b, h, q, kv):
            return kv <= q
    else:
        def mask_mod(b, h, q, kv):
            return (kv <= q) & (q - kv <= left)
    return compiled_flex(torch, seqlen, mask_mod)


def _impls(torch, seqlen: int, window: int | None, flex: bool) -> dict[str, Callable]:
    import cuflash.torch as cft

    pair = None if window is None else (window, 0)
    impls = {"cuflash": lambda q, k, v: cft.attention(q, k, v, causal=True, window=pair,
                                                      layout="bhsd")}
    if flex:
        try:
            impls["flex"] = _flex(torch, seqlen, window)
        except Exception as err:  # no triton, an old torch: say so, go on
            print(f"flex unavailable: {type(err).__name__}: {err}", file=sys.stderr)
    return impls


def run(args: argparse.Namespace) -> list[dict]:
    import torch

    torch.manual_seed(args.seed)
    rows = []
    for head_dim in args.head_dims:
        for seqlen in args.seqlens:
            batch = max(1, args.tokens // seqlen)
            shape = (batch, args.heads, seqlen, head_dim)  # bhsd: FlexAttention's order
            for window in (None, *args.windows):
                variant = Variant.of(causal=True, window=None if window is None else (window, 0))
                pairs = variant.visible_pairs(seqlen, seqlen)
                if variant.causal:
                    pairs = seqlen * seqlen / 2  # the FlashAttention papers' causal count
                flops = 4.0 * batch * args.heads * pairs * head_dim
                for name, fn in _impls(torch, seqlen, window, not args.no_flex).items():
                    inputs = [torch.randn(shape, device="cuda", dtype=torch.bfloat16)
                              for _ in range(4)]
                    for pass_ in ("fwd", "bwd"):
                        try:
                            ms = time_pass(torch, fn, inputs, pass_, args.calls, args.repeats)
                        except Exception as err:
                            print(f"{name} {pass_} D{head_dim} S{seqlen} w{window}: "
                                  f"{type(err).__name__}: {err}", file=sys.stderr)
                            continue
                        rows.append({"impl": name, "pass": pass_, "head_dim": head_dim,
                                     "seqlen": seqlen, "batch": batch, "heads": args.heads,
                                     "window": window, "ms": ms,
                                     "tflops": flops * PASS_FACTOR[pass_] / ms / 1e9})
                    del inputs
                    torch.cuda.empty_cache()
    return rows


def table(rows: list[dict]) -> str:
    """Markdown: one line per (pass, D, S, window) with cuflash, flex, their ratio and
    cuflash's rate over its dense causal rate at the same S."""
    get = {(r["impl"], r["pass"], r["head_dim"], r["seqlen"], r["window"]): r["tflops"]
           for r in rows}
    keys = sorted({(r["pass"], r["head_dim"], r["seqlen"], r["window"] or 0) for r in rows})
    lines = ["| pass | D | S | window | cuflash TFLOP/s | flex TFLOP/s | cuflash/flex "
             "| cuflash / dense causal |", "|---|---|---|---|---|---|---|---|"]
    for p, d, s, w in keys:
        window = w or None
        ours = get.get(("cuflash", p, d, s, window))
        flex = get.get(("flex", p, d, s, window))
        dense = get.get(("cuflash", p, d, s, None))

        def f(x, spec=".0f"):
            return "-" if x is None else format(x, spec)

        ratio = ours / flex if ours and flex else None
        vs_dense = ours / dense if ours and dense and window else None
        lines.append(f"| {p} | {d} | {s} | {'causal' if window is None else window} "
                     f"| {f(ours)} | {f(flex)} | {f(ratio, '.2f')} | {f(vs_dense, '.2f')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cuflash bench --window",
                                     description=__doc__.splitlines()[0])
    ints = lambda text: tuple(int(x) for x in text.split(","))  # noqa: E731
    parser.add_argument("--head-dims", type=ints, default=(64, 128))
    parser.add_argument("--seqlens", type=ints, default=(4096, 8192, 16384, 32768))
    parser.add_argument("--windows", type=ints, default=(256, 1024, 4096))
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32768,
                        help="batch = max(1, tokens // S)")
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-flex", action="store_true", help="time cuflash only")
    parser.add_argument("--out", type=Path, help="write window.json into this directory")
    args = parser.parse_args(argv)
    torch = cuda_torch("--window")
    if torch is None:
        return 2
    rows = run(args)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                "argv": sys.argv}
        (args.out / "window.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
