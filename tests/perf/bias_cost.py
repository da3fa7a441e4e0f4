"""GPU: forward + backward through torch autograd with a bias, with and without its gradient,
against SDPA's efficient backend with the same bias as attn_mask (bf16 inputs, CUDA events,
milliseconds per call after warm-up). PYTHONPATH=. python3 tests/perf/bias_cost.py"""

from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention as sdpa

import cuflash.torch as ct

CASES = ((128, 2048, 4, 16), (64, 4096, 2, 32))  # D, S, B, H


def ms_per_call(fn, calls: int = 10) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls


def measure(d: int, s: int, b: int, h: int) -> str:
    q, k, v, dout = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16)
                     for _ in range(4))
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    bias = torch.randn(1, h, s, s, device="cuda")
    bias_grad = bias.clone().requires_grad_()

    def step(**extra):
        return lambda: ct.attention(qg, kg, vg, layout="bhsd", **extra).backward(dout)

    plain = ms_per_call(step())
    with_bias = ms_per_call(step(bias=bias))
    with_dbias = ms_per_call(step(bias=bias_grad))
    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
        mask = bias.to(torch.bfloat16)
        mask_grad = mask.clone().requires_grad_()
        peer = ms_per_call(lambda: sdpa(qg, kg, vg, attn_mask=mask).backward(dout))
        peer_grad = ms_per_call(lambda: sdpa(qg, kg, vg, attn_mask=mask_grad).backward(dout))
    return (f"D{d} S{s} B{b} H{h} fwd+bwd ms: cuflash plain {plain:.3f}, bias {with_bias:.3f}, "
            f"bias+dbias {with_dbias:.3f}; SDPA efficient bias {peer:.3f}, bias+dbias "
            f"{peer_grad:.3f}")


def main() -> None:
    torch.manual_seed(0)
    for case in CASES:
        print(measure(*case))


if __name__ == "__main__":
    main()
