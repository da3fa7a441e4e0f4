"""What ``bench --window``, ``--softcap`` and ``--ring`` share: torch on a CUDA GPU, timed
with CUDA events, against PyTorch FlexAttention compiled anew for each cell.

`median_ms` times a callable (after warm-up, the median of `repeats` timings of `calls`
back-to-back calls); `time_pass` times a forward without grad or a backward through autograd;
`compiled_flex` builds FlexAttention for one problem; `cuda_torch` is torch where it sees a CUDA
GPU; `environment` is what ran where, for a JSON record, and `provenance` the Markdown line that
says it. torch is imported only by `cuda_torch`: the others take it as an argument, so that
their modules load (``--help``, the tables) without it.
"""
from __future__ import annotations

import datetime
import platform
import statistics
import sys
from collections.abc import Callable

import cuflash


def cuda_torch(mode: str):
    """torch, where it is importable and sees a CUDA GPU; else None, having said why on stderr
    (``bench {mode} needs ...``)."""
    try:
        import torch
    except ImportError:
        print(f"bench {mode} needs torch with CUDA", file=sys.stderr)
        return None
    if not torch.cuda.is_available():
        print(f"bench {mode} needs a CUDA GPU (torch.cuda.is_available() is False)",
              file=sys.stderr)
        return None
    return torch


def median_ms(torch, fn: Callable[[], object], calls: int, repeats: int) -> float:
    """Milliseconds per call of `fn`: 3 warm-up calls, then the median of `repeats` CUDA-event
    timings of `calls` back-to-back calls."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        stop.record()
        stop.synchronize()
        samples.append(start.elapsed_time(stop) / calls)
    return statistics.median(samples)


def time_pass(torch, fn, inputs, pass_: str, calls: int, repeats: int) -> float:
    """Milliseconds per forward (`fn(q, k, v)` without grad) or per backward through autograd
    (``out.backward(dout)`` of one forward, its graph retained); `inputs` is (q, k, v, dout)."""
    q, k, v, dout = inputs
    if pass_ == "fwd":
        with torch.no_grad():
            return median_ms(torch, lambda: fn(q, k, v), calls, repeats)
    out = fn(*(x.detach().requires_grad_() for x in (q, k, v)))
    return median_ms(torch, lambda: out.backward(dout, retain_graph=True), calls, repeats)


def compiled_flex(torch, seqlen: int, mask_mod: Callable | None = None,
                  score_mod: Callable | None = None, batch: int | None = None) -> Callable:
    """``fn(q, k, v)``: FlexAttention (bhsd) compiled with ``dynamic=False`` for Sq = Sk =
    `seqlen`, with `score_mod` and, for a `mask_mod`, a block mask built from it (None: no
    mask) for `batch` batches (None: one, broadcast; a mask_mod that reads its batch index
    needs the batch). Resets dynamo first: call it once per cell, not per call."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    # Each cell compiles anew: past torch.compile's recompile limit flex_attention falls back
    # to an unfused path that runs ~100x slower (seen after the first few cells of a run).
    torch._dynamo.reset()
    options = {}
    if mask_mod is not None:
        options["block_mask"] = create_block_mask(mask_mod, batch, None, seqlen, seqlen,
                                                  device="cuda",
                                                  _compile=True)  # uncompiled: S x S in memory
    if score_mod is not None:
        options["score_mod"] = score_mod
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v: compiled(q, k, v, **options)


def environment(torch) -> dict:
    """The GPU, versions, date and source revision (git state and `source_digest`), for JSON."""
    from cuflash.bench.provenance import git_state, guard, source_digest

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": guard(torch.cuda.get_device_name),
        "cuflash": cuflash.__version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        **git_state(),
        "source_digest": guard(source_digest),
    }


def provenance(env: dict, command: str, gpus: int | None = None) -> str:
    """The Markdown line saying what ran where: an `environment` record and the command;
    `gpus`: how many GPUs took part, where more than one may."""
    count = "" if gpus is None else f" x {gpus}"
    dirty = ", dirty" if env.get("git_dirty") else ""
    return (f"{env.get('gpu')}{count}, torch {env.get('torch')}, cuflash {env.get('cuflash')} "
            f"(commit {env.get('git_commit')}{dirty}, source digest "
            f"{env.get('source_digest')}), {env.get('date')}; `{command}`")
