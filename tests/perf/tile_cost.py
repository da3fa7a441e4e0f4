"""Fixed and per-key cost of the forward, cuflash against SDPA cuDNN (kernel_notes_sm90.md step 25).

Non-causal bf16 with the query length fixed (B = 16384 / Sq, H*D = 2048, so the number of query
tiles is fixed) and the key length varied: the time of a call is fitted as a + b * Sk. `b` is the
cost of a key (per 1024 keys here), `a` what a call costs whatever the keys: launch, the query
tiles' prologue and epilogue, the pipeline's fill and drain. Each length runs both
implementations in 6 rounds of 20 queued calls between CUDA events, the order alternating; the
medians are fitted.

Run on a GPU: PYTHONPATH=. python3 tests/perf/tile_cost.py [--dims 64,256] [--seqlen-q 1024]
    [--seqlens-k 128,256,512,1024,2048]
"""

from __future__ import annotations

import argparse

import numpy as np

ROUNDS, CALLS = 6, 20


def fit(seqlens_k, times_us) -> tuple[float, float]:
    """Least-squares a (us) and b (us per 1024 keys) of time = a + b * Sk."""
    slope, intercept = np.polyfit(np.asarray(seqlens_k, float), np.asarray(times_us, float), 1)
    return float(intercept), float(slope * 1024)


def main() -> None:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import cuflash

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", default="64,256")
    parser.add_argument("--seqlen-q", type=int, default=1024)
    parser.add_argument("--seqlens-k", default="128,256,512,1024,2048")
    args = parser.parse_args()
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def timed(fn) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(CALLS):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / CALLS * 1e3

    print("| D | Sk | cuflash us | cudnn us |\n|---|---|---|---|")
    fits = []
    for head_dim in (int(d) for d in args.dims.split(",")):
        batch, heads, sq = 16384 // args.seqlen_q, 2048 // head_dim, args.seqlen_q
        lengths = [int(s) for s in args.seqlens_k.split(",")]
        medians = {"cuflash": [], "cudnn": []}
        for sk in lengths:
            q = torch.randn(batch, sq, heads, head_dim, device="cuda", dtype=torch.bfloat16)
            k, v = (torch.randn(batch, sk, heads, head_dim, device="cuda", dtype=torch.bfloat16)
                    for _ in range(2))
            qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))

            def ours(q=q, k=k, v=v):
                cuflash.attention(q, k, v)

            def cudnn(qh=qh, kh=kh, vh=vh):
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    sdpa(qh, kh, vh)

            calls = [("cuflash", ours), ("cudnn", cudnn)]
            for _, fn in calls:
                timed(fn)  # warm-up
            times = {name: [] for name, _ in calls}
            for r in range(ROUNDS):
                for name, fn in calls if r % 2 == 0 else calls[::-1]:
                    times[name].append(timed(fn))
            for name in medians:
                medians[name].append(float(np.median(times[name])))
            print(f"| {head_dim} | {sk} | {medians['cuflash'][-1]:.1f} | "
                  f"{medians['cudnn'][-1]:.1f} |", flush=True)
        fits += [(head_dim, name, *fit(lengths, medians[name])) for name in medians]
    print("\n| D | impl | a (us) | b (us per 1024 keys) |\n|---|---|---|---|")
    for head_dim, name, a, b in fits:
        print(f"| {head_dim} | {name} | {a:.1f} | {b:.1f} |")


if __name__ == "__main__":
    main()
