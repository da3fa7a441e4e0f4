"""``python -m cuflash bench --jax``: `cuflash.jax.attention` under ``jax.jit`` on one GPU against
``jax.nn.dot_product_attention`` (cuDNN and XLA).

1. A correctness check of the jitted GPU path (forward and grad, bf16, GQA, causal, Sq != Sk)
   against `cuflash.reference` by the accuracy rule, printed first.
2. The sweep: bf16, D 64 (H 32) and 128 (H 16), S 1k..16k with B * S = 16k tokens, causal and
   not: a jitted forward and a jitted value_and_grad step of each implementation. Each timing is
   the median over ``--repeats`` rounds of back-to-back calls (enough to fill ~5 ms) rotating over
   three sets of fresh random inputs, after a warm-up call per set; block_until_ready closes each
   round. XLA's implementation holds the S x S logits: it is skipped where they would pass
   ``--xla-logits-gib``.
3. The time per call of a small jitted call (S = 128), where the host path is all there is:
   dispatch then wait (latency), and back-to-back calls (throughput).
4. The table (TFLOP/s and ratios) last.

FLOPs (`cuflash.bench.attention_flops`): forward ``4*B*H*S*S*D``, x0.5 causal (FlashAttention's
count); the value_and_grad step counts forward + backward = 3.5x the forward (backward = 2.5x, as
in the Triton tutorial).

A deadline (``--budget``, seconds for the whole run) skips the sweep cells left, so that the run
ends in about 4 min on an H100 even with a cold kernel cache (first calls, which trace, plan and
compile, are timed apart and summed under the table).

``--out DIR`` also writes ``jax_jit.json`` (every cell, the first-call and small-call figures, the
correctness check and the environment: JAX version, device, date, cuflash's source digest) and
``jax_jit.md`` (the table in Markdown). Needs JAX with a CUDA GPU: without one it says so and
exits with status 2. JAX is imported only to run, so ``--help`` and the table need none.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib.metadata
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import cuflash
from cuflash.bench.config import attention_flops

TOKENS = 16 * 1024
SEQLENS = (1024, 2048, 4096, 8192, 16384)
HEADS = {128: 16, 64: 32}  # head dim -> heads: the same model width, 2048
IMPLS = ("cuflash", "cudnn", "xla")  # cuflash.jax.attention, then dot_product_attention's
MODES = ("fwd", "fwd+bwd")  # a jitted forward, a jitted value_and_grad step
ROUND_SECONDS = 5e-3  # each timed round calls back to back until about this long
INPUT_SETS = 3
SMALL_CALL_SECONDS = 15  # kept back from the budget for the small-call timings
SMALL_CALL = "B1 S128 H16 D128 bf16 causal"
CAPTION = ("TFLOP/s, bf16, B*S = {tokens} tokens; fwd = jitted forward, fwd+bwd = jitted "
           "value_and_grad (3.5x the forward's FLOPs); cf = cuflash.jax.attention, cudnn / xla = "
           "jax.nn.dot_product_attention(implementation=...)")


def pass_flops(batch: int, heads: int, seqlen: int, head_dim: int, causal: bool,
               mode: str) -> float:
    """FLOPs of a jitted forward (`mode` "fwd", ``4*B*H*S*S*D``, x0.5 causal) or value_and_grad
    step ("fwd+bwd", 3.5x that)."""
    return attention_flops(batch, heads, seqlen, seqlen, head_dim, causal=causal, pass_=mode)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cuflash bench --jax",
        description="cuflash.jax.attention under jax.jit on one GPU against "
                    "jax.nn.dot_product_attention (cuDNN and XLA): a correctness check, then "
                    "TFLOP/s of the jitted forward and value_and_grad step (bf16, D 64 and 128, "
                    "S 1k..16k, B*S = 16k tokens, causal and not) and the time per call of a "
                    "small jitted call.")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed rounds per cell and small call; the median is kept "
                             "(default 5)")
    parser.add_argument("--budget", type=float, default=225.0,
                        help="seconds for the whole run; sweep cells past it are skipped "
                             "(default 225)")
    parser.add_argument("--head-dims", type=int, nargs="+", default=[128, 64],
                        choices=sorted(HEADS), help="default 128 64")
    parser.add_argument("--seqlens", type=int, nargs="+", default=list(SEQLENS),
                        help="default " + " ".join(map(str, SEQLENS)))
    parser.add_argument("--xla-logits-gib", type=float, default=4.0,
                        help="skip XLA's implementation where B*H*S*S float32 logits pass this "
                             "(default 4)")
    parser.add_argument("--out", type=Path,
                        help="write jax_jit.json and jax_jit.md into this directory")
    return parser


# ---- the implementations -----------------------------------------------------------------------


def attention_fn(impl: str, causal: bool):
    """``fn(q, k, v)`` in (B, S, H, D)."""
    import jax

    if impl == "cuflash":
        from cuflash import jax as cuflash_jax

        return functools.partial(cuflash_jax.attention, causal=causal)
    return functools.partial(jax.nn.dot_product_attention, is_causal=causal,
                             implementation=impl)


def jitted(impl: str, causal: bool, mode: str):
    """The jitted forward (`mode` "fwd") or value_and_grad step ("fwd+bwd") of `impl`."""
    import jax
    import jax.numpy as jnp

    fn = attention_fn(impl, causal)
    if mode == "fwd":
        return jax.jit(fn)

    def loss(q, k, v, dout):
        return jnp.sum(fn(q, k, v).astype(jnp.float32) * dout)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def input_sets(batch: int, seqlen: int, heads: int, head_dim: int, seed: int):
    """INPUT_SETS fresh (q, k, v, dout), bf16 standard normal, on JAX's default device."""
    import jax
    import jax.numpy as jnp

    shape = (batch, seqlen, heads, head_dim)
    sets = []
    for key in jax.random.split(jax.random.key(seed), INPUT_SETS):
        keys = jax.random.split(key, 4)
        sets.append(tuple(jax.random.normal(k, shape, jnp.bfloat16) for k in keys))
    return jax.block_until_ready(sets)


def median_seconds(fn, sets, repeats: int, takes_dout: bool) -> tuple[float, float]:
    """(first call's seconds, median seconds per call) of `fn` over rotating input sets."""
    import jax

    args = [s if takes_dout else s[:3] for s in sets]
    start = time.perf_counter()
    jax.block_until_ready(fn(*args[0]))
    first = time.perf_counter() - start
    for a in args:
        jax.block_until_ready(fn(*a))
    start = time.perf_counter()
    jax.block_until_ready(fn(*args[1]))
    one = time.perf_counter() - start
    calls = max(1, min(100, math.ceil(ROUND_SECONDS / max(one, 1e-6))))
    samples = []
    for r in range(repeats):
        start = time.perf_counter()
        for i in range(calls):
            out = fn(*args[(r * calls + i) % len(args)])
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - start) / calls)
    return first, statistics.median(samples)


def _reason(err: Exception) -> str:
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:160]}"


# ---- 1. correctness ------------------------------------------------------------------------------


def correctness() -> dict:
    """The jitted GPU path (forward and grad) against the float64 reference; prints each output.

    Returns ``{"ok", "in_graph", "problem", "outputs": [{"name", "max_error", "allowed", "ok",
    "failure"}]}``; ok needs every output within the rule and the kernels inside the jitted graph
    (as XLA buffer callbacks)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from cuflash import jax as cuflash_jax
    from cuflash import reference
    from cuflash._accuracy import backward_eps, compare, naive_attention, naive_attention_backward

    batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim = 2, 300, 357, 8, 2, 64
    rng = np.random.default_rng(0)

    def bf16(shape):  # values exactly representable in bf16, as float64 and as a JAX array
        x = jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
        return np.asarray(x.astype(jnp.float32), np.float64), x

    (q, jq), (k, jk), (v, jv) = (bf16(s) for s in ((batch, seqlen_q, heads_q, head_dim),
                                                   (batch, seqlen_k, heads_kv, head_dim),
                                                   (batch, seqlen_k, heads_kv, head_dim)))
    dout, jdout = bf16((batch, seqlen_q, heads_q, head_dim))
    fn = functools.partial(cuflash_jax.attention, causal=True)
    out = jax.jit(fn)(jq, jk, jv)
    grads = jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * jdout), argnums=(0, 1, 2)))(
        jq, jk, jv)
    scale = 1 / math.sqrt(head_dim)
    options = {"causal": True, "scale": scale}
    naive_out, _ = naive_attention(q, k, v, dtype="bfloat16", **options)
    results = [compare("out", out.astype(jnp.float32), reference.attention(q, k, v, causal=True),
                       naive_out, dtype="bfloat16")]
    refs = reference.attention_backward(dout, q, k, v, causal=True)
    naives = naive_attention_backward(dout, q, k, v, dtype="bfloat16", **options)
    eps = backward_eps(dout, q, k, v, dtype="bfloat16", **options)
    for name, got, ref, naive, e in zip(("dq", "dk", "dv"), grads, refs, naives, eps,
                                        strict=True):
        results.append(compare(name, got.astype(jnp.float32), ref, naive, dtype="bfloat16",
                               eps=e))
    text = jax.jit(fn).lower(jq, jk, jv).as_text()
    in_graph = "xla_buffer_python_gpu_callback" in text
    problem = (f"bf16, B{batch} Sq{seqlen_q} Sk{seqlen_k} H{heads_q}/{heads_kv} D{head_dim} "
               f"causal")
    print(f"correctness (jitted, {problem}; kernels as XLA buffer callbacks: {in_graph}):")
    for r in results:
        print(f"  {r.name:3s} max|err| {r.max_error:.3e} allowed {r.allowed:.3e}  "
              f"{'ok' if r.ok else 'FAIL: ' + r.failure}")
    return {"ok": in_graph and all(r.ok for r in results), "in_graph": in_graph,
            "problem": problem,
            "outputs": [{"name": r.name, "max_error": float(r.max_error),
                         "allowed": float(r.allowed), "ok": r.ok, "failure": r.failure}
                        for r in results]}


# ---- 2. the sweep --------------------------------------------------------------------------------


def sweep(args, deadline: float) -> list[dict]:
    """One row per (D, S, causal): ``row["fwd cuflash"]`` &c. is TFLOP/s, or "budget" (past the
    deadline), "skip" (XLA's logits past ``--xla-logits-gib``) or "error" (the reason under
    ``"<cell> error"``); ``"<cell> first"`` is the first call's seconds and ``"<cell> seconds"``
    the median seconds per call."""
    rows = []
    for head_dim in args.head_dims:
        heads = HEADS[head_dim]
        for seqlen in args.seqlens:
            batch = max(1, TOKENS // seqlen)
            sets = input_sets(batch, seqlen, heads, head_dim, seed=seqlen + head_dim)
            for causal in (False, True):
                row = {"D": head_dim, "S": seqlen, "B": batch, "H": heads, "causal": causal}
                logits_gib = batch * heads * seqlen * seqlen * 4 / 2**30
                for mode in MODES:
                    flops = pass_flops(batch, heads, seqlen, head_dim, causal, mode)
                    for impl in IMPLS:
                        key = f"{mode} {impl}"
                        if time.perf_counter() > deadline:
                            row[key] = "budget"
                            continue
                        if impl == "xla" and logits_gib > args.xla_logits_gib:
                            row[key] = "skip"
                            continue
                        try:
                            first, seconds = median_seconds(
                                jitted(impl, causal, mode), sets, args.repeats,
                                takes_dout=mode != "fwd")
                        except Exception as err:  # a backend refusing a shape: say so, go on
                            row[key] = "error"
                            row[key + " error"] = _reason(err)
                            print(f"  {key} D{head_dim} S{seqlen} causal={causal}: "
                                  f"{_reason(err)}")
                            continue
                        row[key] = flops / seconds / 1e12
                        row[key + " first"] = first
                        row[key + " seconds"] = seconds
                print(progress_line(row), flush=True)
                rows.append(row)
            del sets
    return rows


def progress_line(row: dict) -> str:
    """The line printed as each row of the sweep ends."""
    return (f"D{row['D']:<4d}S{row['S']:<6d}B{row['B']:<3d}"
            f"{'causal' if row['causal'] else 'full':7s}"
            + "  ".join(_cell(row.get(f"{m} {i}")) for m in MODES for i in IMPLS))


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:7.1f}"
    return f"{value or '-':>7s}"


def _ratio(a, b) -> str:
    if isinstance(a, float) and isinstance(b, float):
        return f"{a / b:6.2f}"
    return f"{'-':>6s}"


# ---- 3. a small call ---------------------------------------------------------------------------


def small_call(repeats: int) -> list[tuple[str, float, float]]:
    """(impl, latency us, back-to-back us) of a jitted forward at B=1, S=128, H=16, D=128."""
    import jax

    sets = input_sets(1, 128, 16, 128, seed=1)
    found = []
    for impl in IMPLS:
        fn = jitted(impl, True, "fwd")
        args = [s[:3] for s in sets]
        try:
            for a in args:
                jax.block_until_ready(fn(*a))
        except Exception as err:  # a backend that is missing: say so, go on
            print(f"  small call, {impl}: {_reason(err)}")
            continue
        latency, throughput = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            for i in range(50):
                jax.block_until_ready(fn(*args[i % len(args)]))
            latency.append((time.perf_counter() - start) / 50 * 1e6)
            start = time.perf_counter()
            for i in range(200):
                out = fn(*args[i % len(args)])
            jax.block_until_ready(out)
            throughput.append((time.perf_counter() - start) / 200 * 1e6)
        found.append((impl, statistics.median(latency), statistics.median(throughput)))
    return found


# ---- 4. the table (no JAX needed) --------------------------------------------------------------


def first_seconds(rows: list[dict]) -> dict[str, float]:
    """Seconds of every timed cell's first call (trace, plan, compile), summed per impl."""
    firsts: dict[str, float] = {}
    for r in rows:
        for key, value in r.items():
            if key.endswith(" first"):
                impl = key.split()[1]
                firsts[impl] = firsts.get(impl, 0.0) + value
    return firsts


def firsts_line(rows: list[dict]) -> str:
    return ("first calls (trace, plan, compile; cuflash includes NVRTC where the kernel cache is "
            "cold), seconds in all: "
            + ", ".join(f"{impl} {seconds:.1f}" for impl, seconds in first_seconds(rows).items()))


def small_line(small: list[tuple[str, float, float]]) -> str | None:
    if not small:
        return None
    return (f"small jitted forward ({SMALL_CALL}), us per call: "
            + "; ".join(f"{impl} {lat:.0f} latency / {thr:.0f} back-to-back"
                        for impl, lat, thr in small))


def table_lines(rows: list[dict], small: list[tuple[str, float, float]]) -> list[str]:
    """The table printed at the end of a run, a blank line first."""
    head = (f"{'D':>4s}{'S':>7s}{'B':>4s} {'mask':6s}|{'cf':>7s}{'cudnn':>7s}{'xla':>7s}"
            f"{'cf/cud':>7s}{'cf/xla':>7s} |{'cf':>7s}{'cudnn':>7s}{'xla':>7s}{'cf/cud':>7s}"
            f"{'cf/xla':>7s}")
    lines = ["", CAPTION.format(tokens=TOKENS),
             f"{'':22s}|{'forward':^35s} |{'forward + backward':^35s}", head, "-" * len(head)]
    for r in rows:
        cells = []
        for mode in MODES:
            cf, cud, xla = (r.get(f"{mode} {i}") for i in IMPLS)
            cells.append(f"{_cell(cf)}{_cell(cud)}{_cell(xla)} {_ratio(cf, cud)} "
                         f"{_ratio(cf, xla)}")
        mask = "causal" if r["causal"] else "full"
        lines.append(f"{r['D']:>4d}{r['S']:>7d}{r['B']:>4d} {mask:6s}|{cells[0]} |{cells[1]}")
    lines.append(firsts_line(rows))
    if small:
        lines.append(small_line(small))
    return lines


def table(rows: list[dict], small: list[tuple[str, float, float]]) -> None:
    for line in table_lines(rows, small):
        print(line)


def _md_cell(value) -> str:
    return f"{value:.1f}" if isinstance(value, float) else str(value or "-")


def _md_ratio(a, b) -> str:
    return f"{a / b:.2f}" if isinstance(a, float) and isinstance(b, float) else "-"


def markdown(rows: list[dict], small: list[tuple[str, float, float]],
             notes: list[str] = ()) -> str:
    """The table in Markdown: the caption, one line per row, then the first-call and small-call
    lines and `notes` (environment, correctness), a paragraph each."""
    columns = [f"{mode} {name}" for mode in MODES
               for name in ("cf", "cudnn", "xla", "cf/cudnn", "cf/xla")]
    lines = [CAPTION.format(tokens=TOKENS), "",
             "| D | S | B | mask | " + " | ".join(columns) + " |",
             "|" + "---:|" * 3 + "---|" + "---:|" * len(columns)]
    for r in rows:
        cells = []
        for mode in MODES:
            cf, cud, xla = (r.get(f"{mode} {i}") for i in IMPLS)
            cells += [_md_cell(cf), _md_cell(cud), _md_cell(xla), _md_ratio(cf, cud),
                      _md_ratio(cf, xla)]
        mask = "causal" if r["causal"] else "full"
        lines.append(f"| {r['D']} | {r['S']} | {r['B']} | {mask} | " + " | ".join(cells) + " |")
    after = [firsts_line(rows), *([small_line(small)] if small else []), *notes]
    return "\n".join(lines) + "\n\n" + "\n\n".join(after) + "\n"  # a paragraph each


# ---- the record (--out) ------------------------------------------------------------------------


def jax_environment(device) -> dict:
    """Versions, the JAX device, the date and the source revision, for the JSON."""
    import jax

    from cuflash.bench.provenance import git_state, guard, source_digest

    def version(package: str) -> str | None:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cuflash": cuflash.__version__,
        "jax": jax.__version__,
        "jaxlib": version("jaxlib"),
        "jax_cuda_plugin": version("jax-cuda12-plugin") or version("jax-cuda13-plugin"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device.device_kind,
        "device_platform": device.platform,
        "device_count": guard(lambda: str(jax.device_count())),
        "platform_version": guard(lambda: device.client.platform_version),
        **git_state(),
        "source_digest": guard(source_digest),
    }


def write_outputs(out: Path, record: dict) -> list[Path]:
    """``jax_jit.json`` (`record` as is) and ``jax_jit.md`` (its table) under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    small = [(s["impl"], s["latency_us"], s["back_to_back_us"]) for s in record["small_call"]]
    env, check = record["environment"], record["correctness"]
    notes = [f"correctness (jitted, {check['problem']}): {'PASS' if check['ok'] else 'FAIL'}",
             f"{env.get('device')}, jax {env.get('jax')}, cuflash {env.get('cuflash')} "
             f"(source digest {env.get('source_digest')}), {env.get('date')}; "
             f"`{record['command']}`"]
    paths = [out / "jax_jit.json", out / "jax_jit.md"]
    paths[0].write_text(json.dumps(record, indent=1) + "\n")
    paths[1].write_text(markdown(record["rows"], small, notes))
    return paths


# ---- main ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Returns 0, 1 when the correctness check failed, 2 without JAX or a CUDA GPU."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    try:
        import jax

        from cuflash import jax as cuflash_jax  # noqa: F401  (fails where JAX cannot load)
    except ImportError as err:
        print(f"bench --jax needs JAX with a CUDA GPU; JAX is not importable ({err})",
              file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        device = jax.devices()[0]
    except RuntimeError as err:  # e.g. JAX_PLATFORMS=cuda without a GPU
        print(f"bench --jax needs a CUDA GPU; JAX found no device ({err})", file=sys.stderr)
        return 2
    print(f"cuflash {cuflash.__version__}, jax {jax.__version__}, {device.device_kind} "
          f"({device.platform})", flush=True)
    if device.platform != "gpu":
        print(f"bench --jax needs a CUDA GPU; JAX's device is {device.device_kind} "
              f"({device.platform}): install JAX with CUDA (jax[cuda12]) on a machine with an "
              "NVIDIA GPU", file=sys.stderr)
        return 2
    check = correctness()
    print(flush=True)
    rows = sweep(args, deadline=start + args.budget - SMALL_CALL_SECONDS)
    small = small_call(args.repeats)
    table(rows, small)
    seconds = time.perf_counter() - start
    print(f"correctness: {'PASS' if check['ok'] else 'FAIL'}; {seconds:.0f} s in all")
    if args.out:
        command = "python -m cuflash bench --jax" + "".join(f" {a}" for a in argv)
        config = {**vars(args), "out": str(args.out), "tokens": TOKENS,
                  "heads": {str(d): h for d, h in HEADS.items()}, "input_sets": INPUT_SETS,
                  "round_seconds": ROUND_SECONDS, "small_call_seconds": SMALL_CALL_SECONDS}
        record = {
            "command": command, "environment": jax_environment(device), "config": config,
            "flops": "fwd = 4*B*H*S*S*D (x0.5 causal); fwd+bwd (value_and_grad) = 3.5*fwd",
            "units": {"<mode> <impl>": "TFLOP/s, or budget / skip / error",
                      "<mode> <impl> seconds": "median seconds per call",
                      "<mode> <impl> first": "seconds of the first call (trace, plan, compile)"},
            "correctness": check, "rows": rows,
            "first_call_seconds": first_seconds(rows),
            "small_call": [{"impl": impl, "shape": SMALL_CALL, "latency_us": lat,
                            "back_to_back_us": thr} for impl, lat, thr in small],
            "seconds": seconds,
        }
        paths = write_outputs(args.out, record)
        print(f"wrote {paths[0]} and {paths[1]}")
    return 0 if check["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
