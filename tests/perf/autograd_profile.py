"""GPU: where the torch autograd step's host time goes (B=1, S=128, H=8, D=64, fp16): cuflash
against SDPA flash and an empty torch.autograd.Function, alternated, medians of 7 rounds of 200
calls, with multi- and single-threaded autograd; then cProfile of 300 single-threaded cuflash
steps. PYTHONPATH=. python3 tests/perf/autograd_profile.py"""

from __future__ import annotations

import cProfile
import io
import pstats
import statistics
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention as sdpa

import cuflash


class Noop(torch.autograd.Function):
    """The Python autograd node's own cost: allocates its output, passes gradients through."""

    @staticmethod
    def forward(ctx, a, b, c):
        return a.new_empty(a.shape)

    @staticmethod
    def backward(ctx, grad):
        return grad, grad, grad


def us_per_call(fn, calls: int = 200) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    shape = (1, 8, 128, 64)
    q, k, v, dout = (torch.randn(shape, device="cuda", dtype=torch.float16) for _ in range(4))
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    sinks, slopes = torch.randn(8, device="cuda"), torch.rand(8, device="cuda")
    cases = {
        "cuflash train": lambda: cuflash.attention(qg, kg, vg, layout="bhsd").backward(dout),
        "sdpa flash train": lambda: sdpa(qg, kg, vg).backward(dout),
        "cuflash fwd (grad)": lambda: cuflash.attention(qg, kg, vg, layout="bhsd"),
        "sdpa flash fwd (grad)": lambda: sdpa(qg, kg, vg),
        "cuflash fwd nograd": lambda: cuflash.attention(q, k, v, layout="bhsd"),
        "cuflash fwd sinks": lambda: cuflash.attention(q, k, v, layout="bhsd", sinks=sinks),
        "cuflash fwd alibi": lambda: cuflash.attention(q, k, v, layout="bhsd",
                                                       alibi_slopes=slopes),
        "cuflash train sinks": lambda: cuflash.attention(qg, kg, vg, layout="bhsd",
                                                         sinks=sinks).backward(dout),
        "torch Function noop": lambda: Noop.apply(qg, kg, vg).backward(dout),
    }
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        for fn in cases.values():
            for _ in range(30):
                fn()
        samples = {name: [] for name in cases}
        for _ in range(7):
            for name, fn in cases.items():
                samples[name].append(us_per_call(fn))
        with torch.autograd.set_multithreading_enabled(False):
            for name in ("cuflash train", "sdpa flash train", "torch Function noop"):
                samples[f"{name} (1 thread)"] = [us_per_call(cases[name]) for _ in range(5)]
        for name, xs in samples.items():
            print(f"{name:30s} median {statistics.median(xs):8.1f} us  min {min(xs):8.1f}")
        profile = cProfile.Profile()
        with torch.autograd.set_multithreading_enabled(False):
            profile.enable()
            for _ in range(300):
                cases["cuflash train"]()
            torch.cuda.synchronize()
            profile.disable()
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(22)
    print(text.getvalue())


if __name__ == "__main__":
    main()
