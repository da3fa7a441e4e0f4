# ruff: noqa: B023, E501  (timing lambdas run inside their loop iteration; table rows are long)
"""Backward sweep (bf16) vs PyTorch SDPA flash/cudnn in one process; Markdown table out.
Run on a GPU: PYTHONPATH=. python3 tests/perf/sweep_backward.py
"""

import torch
from timing import median_ms  # tests/perf/timing.py (the script's own folder)
from torch.nn.attention import SDPBackend, sdpa_kernel

import cuflash

F = torch.nn.functional.scaled_dot_product_attention


print("| D | mask | S | cuflash bwd | deterministic | flash bwd | cudnn bwd |")
print("|---|---|---|---|---|---|---|")
for D in (64, 128, 256):
    for causal in (False, True):
        for S in (1024, 4096, 16384):
            B, H = 16384 // S, 2048 // D
            q, k, v = (
                torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3)
            )
            fl = 2.5 * 4 * B * H * S * S * D * (0.5 if causal else 1)
            o, lse = cuflash.attention(q, k, v, causal=causal, return_lse=True)
            do = torch.randn_like(o)
            t = median_ms(
                lambda: cuflash.attention_backward(do, q, k, v, o, lse, causal=causal), 15
            )
            td = median_ms(
                lambda: cuflash.attention_backward(
                    do, q, k, v, o, lse, causal=causal, deterministic=True
                ),
                5,
            )
            res = []
            for be in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION):
                qq, kk, vv = (x.detach().transpose(1, 2).requires_grad_() for x in (q, k, v))
                with sdpa_kernel(be):
                    y = F(qq, kk, vv, is_causal=causal)
                    g = do.transpose(1, 2)
                    res.append(
                        median_ms(
                            lambda: torch.autograd.grad(y, (qq, kk, vv), g, retain_graph=True),
                            15,
                        )
                    )
            print(
                f"| {D} | {'causal' if causal else 'full'} | {S} | {fl / t / 1e9:.0f} | {fl / td / 1e9:.0f} | {fl / res[0] / 1e9:.0f} | {fl / res[1] / 1e9:.0f} |",
                flush=True,
            )
