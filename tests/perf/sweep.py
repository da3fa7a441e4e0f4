# ruff: noqa: B023, E501  (timing lambdas run inside their loop iteration; table rows are long)
"""Forward sweep vs PyTorch SDPA in one process, fp32/fp64 fwd+bwd vs efficient/math, cold compile
times. Prints Markdown tables (docs/performance.md). Run on a GPU: PYTHONPATH=. python3 tests/perf/sweep.py
"""

import json
import os

import torch
from timing import median_ms  # tests/perf/timing.py (the script's own folder)
from torch.nn.attention import SDPBackend, sdpa_kernel

import cuflash
from cuflash.cuda import _compile

F = torch.nn.functional.scaled_dot_product_attention


def sdpa(be, q, k, v, causal):
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    try:
        with sdpa_kernel(be):
            return median_ms(lambda: F(qt, kt, vt, is_causal=causal))
    except Exception:
        return float("nan")


out = []
print(
    "| dtype | D | mask | "
    + " | ".join(f"S={s}" for s in (512, 1024, 2048, 4096, 8192, 16384))
    + " |"
)
print("|---|---|---|" + "---|" * 6)
for dtype in (torch.bfloat16, torch.float16):
    for D in (64, 128, 256):
        for causal in (False, True):
            cells = []
            for S in (512, 1024, 2048, 4096, 8192, 16384):
                B, H = 16384 // S, 2048 // D
                q, k, v = (torch.randn(B, S, H, D, device="cuda", dtype=dtype) for _ in range(3))
                fl = 4 * B * H * S * S * D * (0.5 if causal else 1)
                t = median_ms(lambda: cuflash.attention(q, k, v, causal=causal))
                tf = sdpa(SDPBackend.FLASH_ATTENTION, q, k, v, causal)
                tc = sdpa(SDPBackend.CUDNN_ATTENTION, q, k, v, causal)
                cells.append(f"{fl / t / 1e9:.0f}/{fl / tf / 1e9:.0f}/{fl / tc / 1e9:.0f}")
                out.append(
                    dict(
                        dtype=str(dtype)[6:],
                        D=D,
                        causal=causal,
                        S=S,
                        cuflash=fl / t / 1e9,
                        flash=fl / tf / 1e9,
                        cudnn=fl / tc / 1e9,
                    )
                )
            print(
                f"| {str(dtype)[6:]} | {D} | {'causal' if causal else 'full'} | "
                + " | ".join(cells)
                + " |",
                flush=True,
            )
print()
print("| dtype | pass | D | mask | cuflash | efficient | math |")
print("|---|---|---|---|---|---|---|")
for dtype in (torch.float32, torch.float64):
    for D in (64, 128):
        for causal in (False, True):
            S = 4096
            B, H = 16384 // S, 2048 // D
            q, k, v = (torch.randn(B, S, H, D, device="cuda", dtype=dtype) for _ in range(3))
            fl = 4 * B * H * S * S * D * (0.5 if causal else 1)
            t = median_ms(lambda: cuflash.attention(q, k, v, causal=causal), 10)
            te = sdpa(SDPBackend.EFFICIENT_ATTENTION, q, k, v, causal)
            tm = sdpa(SDPBackend.MATH, q, k, v, causal)
            print(
                f"| {str(dtype)[6:]} | fwd | {D} | {'causal' if causal else 'full'} | {fl / t / 1e9:.1f} | {fl / te / 1e9:.1f} | {fl / tm / 1e9:.1f} |",
                flush=True,
            )
            o, lse = cuflash.attention(q, k, v, causal=causal, return_lse=True)
            do = torch.randn_like(o)
            tb = median_ms(
                lambda: cuflash.attention_backward(do, q, k, v, o, lse, causal=causal), 5
            )

            def sd_bwd(be):
                qq, kk, vv = (x.detach().transpose(1, 2).requires_grad_() for x in (q, k, v))
                try:
                    with sdpa_kernel(be):
                        y = F(qq, kk, vv, is_causal=causal)
                        g = do.transpose(1, 2)
                        return median_ms(
                            lambda: torch.autograd.grad(y, (qq, kk, vv), g, retain_graph=True), 5
                        )
                except Exception:
                    return float("nan")

            be_, bm_ = sd_bwd(SDPBackend.EFFICIENT_ATTENTION), sd_bwd(SDPBackend.MATH)
            print(
                f"| {str(dtype)[6:]} | bwd | {D} | {'causal' if causal else 'full'} | {2.5 * fl / tb / 1e9:.1f} | {2.5 * fl / be_ / 1e9:.1f} | {2.5 * fl / bm_ / 1e9:.1f} |",
                flush=True,
            )
print()
print("cold-cache first-call compile seconds (fresh CUPY cache on this machine):")
for k_, v_ in sorted(_compile.compile_seconds.items()):
    print(f"  {v_:5.2f} s  {k_}")
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "fwd.json"), "w"))
