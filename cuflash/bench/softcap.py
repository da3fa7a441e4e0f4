"""``python -m cuflash bench --softcap``: softcap against plain cuflash and FlexAttention.

Cells: bf16, Sq = Sk = S, B*S = ``--tokens`` (16k) and Hq*D = ``--model-dim`` (2048), as in the
main sweep, for each head dim, S and mask (causal or not), forward and backward. In each cell,
on the same fresh random inputs (standard normal), timed in the same run:

- ``cuflash``: `cuflash.torch.attention` with ``softcap=cap`` (the scaled scores become
  ``cap * tanh(s / cap)``, flash-attn's convention);
- ``cuflash-plain``: the same call without a softcap: the yardstick (the target is a
  cuflash / cuflash-plain ratio of at least 0.95);
- ``flex``: PyTorch FlexAttention compiled (``dynamic=False``) with the ``score_mod``
  ``cap * tanh(score / cap)`` (its score is already scaled) and, causal, the causal block mask.

With ``--sinks`` the ``cuflash`` call also gets attention sinks (gpt-oss): one float32 logit
per head (standard normal) that requires grad, so the backward computes their gradient too;
``--cap 0`` then times the sinks alone. FlexAttention has no sinks: it is not timed with them.
With ``--alibi`` both get ALiBi with BLOOM's slopes ``2^(-8 h / H)`` (float32, one per head):
cuflash as ``alibi_slopes``, FlexAttention in its ``score_mod`` (``- slope[h] * |q - kv|``);
it takes ``--cap 0`` (the CUDA kernels do not combine the two yet).

TFLOP/s as the FlashAttention papers count them (`cuflash.bench.attention_flops`): forward
``4*B*H*S*S*D``, halved when causal, backward 2.5 times that; the tanh is not counted, so a
softcap that costs time shows as a lower rate. Backward cells time ``out.backward(dout)``
through each library's autograd (cuflash.torch, flex_attention), so all pay the same framework
costs. CUDA events, after warm-up; the median of `repeats` timings of `calls` back-to-back calls
(`cuflash.bench.torch_gpu`). Each cuflash forward row also records the largest
``|out - flex's out|`` of one forward (``max_abs_diff_flex``), a guard against timing a wrong
result.

A cell that fails (an implementation refusing the problem) is kept as ``error`` with the reason;
``--budget`` (seconds) skips the cells left once it is spent (``budget``). ``--out DIR`` writes
``softcap.json`` (every row, the configuration, the command and the environment: GPU, versions,
date, git commit, source digest) and ``softcap.md`` (the table). Needs torch with a CUDA GPU:
without one it says so and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from cuflash.bench.config import attention_flops, seqlens_arg
from cuflash.bench.torch_gpu import (
    compiled_flex,
    cuda_torch,
    environment,
    provenance,
    time_pass,
)

IMPLS = ("cuflash", "cuflash-plain", "flex")
PASSES = ("fwd", "bwd")
SEQLENS = (1024, 2048, 4096, 8192, 16384)
HEAD_DIMS = (64, 128)
TARGET = 0.95  # cuflash / cuflash-plain, the softcap's cost at most 5%
FLOPS = "fwd = 4*B*H*S*S*D (x0.5 causal); bwd = 2.5*fwd"
CAUSAL = {"both": (False, True), "yes": (True,), "no": (False,)}


# ---- flags -----------------------------------------------------------------------------------


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of integers, got "
                                         f"{text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def _cap(text: str) -> float:
    value = float(text)
    if not value >= 0:  # NaN too
        raise argparse.ArgumentTypeError(f"the softcap must be >= 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cuflash bench --softcap",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--cap", type=_cap, default=30.0,
                        help="the softcap: scaled scores become cap * tanh(s / cap) (default 30;"
                             " 0 only with --sinks or --alibi)")
    parser.add_argument("--sinks", action="store_true",
                        help="give cuflash attention sinks too (one logit per head, with their "
                             "gradient); FlexAttention is then not timed")
    parser.add_argument("--alibi", action="store_true",
                        help="give cuflash and FlexAttention ALiBi too (BLOOM's slopes; with "
                             "--cap 0)")
    parser.add_argument("--head-dims", type=_ints, default=HEAD_DIMS,
                        help="comma list (default 64,128); each must divide --model-dim")
    parser.add_argument("--seqlens", type=seqlens_arg, default=SEQLENS,
                        help="comma list, e.g. 1k,4k,16k (default 1k,2k,4k,8k,16k)")
    parser.add_argument("--causal", choices=tuple(CAUSAL), default="both",
                        help="causal mask, no mask, or both (default)")
    parser.add_argument("--tokens", type=int, default=16384,
                        help="B*S: batch = max(1, tokens // S) (default 16384)")
    parser.add_argument("--model-dim", type=int, default=2048,
                        help="H*D: heads = model-dim // D (default 2048)")
    parser.add_argument("--calls", type=int, default=5,
                        help="back-to-back calls per timing (default 5)")
    parser.add_argument("--repeats", type=int, default=7,
                        help="timings per cell; the median is kept (default 7)")
    parser.add_argument("--budget", type=float,
                        help="seconds for the sweep; the cells left once it is spent are skipped "
                             "(default: no limit)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-flex", action="store_true", help="time cuflash only")
    parser.add_argument("--out", type=Path,
                        help="write softcap.json and softcap.md into this directory")
    return parser


# ---- the cells -------------------------------------------------------------------------------


def cells(args: argparse.Namespace) -> list[tuple[int, int, bool]]:
    """(head_dim, seqlen, causal) of every cell, in the order they run."""
    return [(d, s, c) for d in args.head_dims for s in args.seqlens for c in CAUSAL[args.causal]]


def shape(args: argparse.Namespace, head_dim: int, seqlen: int) -> tuple[int, int, int, int]:
    """(B, H, S, D), bhsd (FlexAttention's order): B*S = tokens, H*D = model dim."""
    return max(1, args.tokens // seqlen), args.model_dim // head_dim, seqlen, head_dim


def alibi_slopes(heads: int) -> list[float]:
    """BLOOM's ALiBi slopes for `heads` heads: 2^(-8 h / H), h = 1..H."""
    return [2.0 ** (-8.0 * h / heads) for h in range(1, heads + 1)]


def _flex(torch, seqlen: int, causal: bool, cap: float, slopes=None) -> Callable:
    """A compiled FlexAttention callable with the softcap (where > 0), then ALiBi with
    `slopes` (a float32 tensor, where given), as its score_mod."""

    def score_mod(score, b, h, q, kv):
        if cap:
            score = cap * torch.tanh(score / cap)
        if slopes is not None:
            score = score - slopes[h] * (q - kv).abs()
        return score

    def causal_mask(b, h, q, kv):
        return kv <= q

    return compiled_flex(torch, seqlen, causal_mask if causal else None, score_mod)


def _impls(torch, seqlen: int, causal: bool, cap: float, flex: bool,
           sinks=None, slopes=None) -> dict[str, Callable]:
    import cuflash.torch as cft

    impls = {
        "cuflash": lambda q, k, v: cft.attention(q, k, v, causal=causal, softcap=cap,
                                                 sinks=sinks, alibi_slopes=slopes,
                                                 layout="bhsd"),
        "cuflash-plain": lambda q, k, v: cft.attention(q, k, v, causal=causal, layout="bhsd"),
    }
    if flex:
        try:
            impls["flex"] = _flex(torch, seqlen, causal, cap, slopes)
        except Exception as err:  # no triton, an old torch: say so, go on
            print(f"flex unavailable: {type(err).__name__}: {err}", file=sys.stderr)
    return impls


def _reason(err: Exception) -> str:
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:200]}"


def _max_diff(torch, fns: dict[str, Callable], inputs) -> float | None:
    """max |cuflash's out - flex's out| of one forward, or None where either is missing or
    fails."""
    if "cuflash" not in fns or "flex" not in fns:
        return None
    q, k, v, _ = inputs
    try:
        with torch.no_grad():
            ours, theirs = fns["cuflash"](q, k, v), fns["flex"](q, k, v)
            return float((ours.float() - theirs.float()).abs().max())
    except Exception:  # the timing rows already say why
        return None


def run(args: argparse.Namespace, deadline: float | None = None) -> list[dict]:
    """One row per (cell, implementation, pass): status "ok" with ``ms`` and ``tflops``,
    "error" with ``error`` (the reason), or "budget" (skipped past `deadline`, a
    `time.perf_counter` value)."""
    import torch

    torch.manual_seed(args.seed)
    flex = not (args.no_flex or args.sinks)
    impl_names = IMPLS if flex else IMPLS[:2]
    rows = []
    for head_dim, seqlen, causal in cells(args):
        batch, heads, _, _ = shape(args, head_dim, seqlen)
        base = {"head_dim": head_dim, "seqlen": seqlen, "batch": batch, "heads": heads,
                "causal": causal}
        if deadline is not None and time.perf_counter() > deadline:
            rows += [{"impl": name, "pass": p, **base, "status": "budget"}
                     for name in impl_names for p in PASSES]
            continue
        inputs = [torch.randn(shape(args, head_dim, seqlen), device="cuda", dtype=torch.bfloat16)
                  for _ in range(4)]
        sinks = slopes = None
        if args.sinks:
            sinks = torch.randn(heads, device="cuda", dtype=torch.float32, requires_grad=True)
        if args.alibi:
            slopes = torch.tensor(alibi_slopes(heads), device="cuda", dtype=torch.float32)
        fns = _impls(torch, seqlen, causal, args.cap, flex, sinks, slopes)
        cell = []
        for name in impl_names:
            softcap = 0.0 if name == "cuflash-plain" else args.cap
            for pass_ in PASSES:
                row = {"impl": name, "pass": pass_, **base, "softcap": softcap,
                       "sinks": args.sinks and name == "cuflash",
                       "alibi": args.alibi and name != "cuflash-plain"}
                flops = attention_flops(batch, heads, seqlen, seqlen, head_dim, causal=causal,
                                        pass_=pass_)
                try:
                    if name not in fns:
                        raise RuntimeError("flex unavailable")
                    ms = time_pass(torch, fns[name], inputs, pass_, args.calls, args.repeats)
                except Exception as err:  # a refused problem, out of memory: say so, go on
                    print(f"{name} {pass_} D{head_dim} S{seqlen} "
                          f"{'causal' if causal else 'full'}: {_reason(err)}", file=sys.stderr)
                    cell.append({**row, "status": "error", "error": _reason(err)})
                    continue
                cell.append({**row, "status": "ok", "ms": ms, "tflops": flops / ms / 1e9})
        diff = _max_diff(torch, fns, inputs)
        for row in cell:
            if row["impl"] == "cuflash" and row["pass"] == "fwd" and row["status"] == "ok":
                row["max_abs_diff_flex"] = diff
        print(progress_line(cell), file=sys.stderr, flush=True)
        rows += cell
        del inputs, fns, sinks, slopes
        torch.cuda.empty_cache()
    return rows


# ---- the table (no GPU needed) -----------------------------------------------------------------


def _value(row: dict | None, field: str, spec: str) -> str:
    """A row's number formatted, its status where it has none ("error", "budget"), else "-"."""
    if row is None:
        return "-"
    if field in row and row[field] is not None:
        return format(row[field], spec)
    return row.get("status") or "-"


def _ratio(a: dict | None, b: dict | None) -> str:
    if a and b and a.get("tflops") and b.get("tflops"):
        return f"{a['tflops'] / b['tflops']:.2f}"
    return "-"


def _keys(rows: list[dict]) -> list[tuple[str, int, int, bool]]:
    """(pass, D, S, causal) of the rows' cells: forward first, then by D, S, full before causal."""
    keys = {(r["pass"], r["head_dim"], r["seqlen"], r["causal"]) for r in rows}
    return sorted(keys, key=lambda k: (PASSES.index(k[0]) if k[0] in PASSES else 9, *k[1:]))


def table(rows: list[dict]) -> str:
    """Markdown: one line per (pass, D, S, mask) with each implementation's TFLOP/s and ms and
    the ratios cuflash / cuflash-plain and cuflash / flex."""
    get = {(r["impl"], r["pass"], r["head_dim"], r["seqlen"], r["causal"]): r for r in rows}
    lines = ["| pass | D | S | B | H | mask | cuflash TFLOP/s | cuflash ms | plain TFLOP/s "
             "| plain ms | flex TFLOP/s | flex ms | cuflash/plain | cuflash/flex |",
             "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key in _keys(rows):
        ours, plain, flex = (get.get((name, *key)) for name in IMPLS)
        any_row = ours or plain or flex
        p, d, s, causal = key
        cells = []
        for row in (ours, plain, flex):
            cells += [_value(row, "tflops", ".0f"), _value(row, "ms", ".3f")]
        lines.append(f"| {p} | {d} | {s} | {any_row['batch']} | {any_row['heads']} "
                     f"| {'causal' if causal else 'full'} | " + " | ".join(cells)
                     + f" | {_ratio(ours, plain)} | {_ratio(ours, flex)} |")
    return "\n".join(lines)


def summary(rows: list[dict]) -> list[str]:
    """Per pass: the median and lowest cuflash / cuflash-plain and cuflash / flex ratios, and
    the cells below the target."""
    get = {(r["impl"], r["pass"], r["head_dim"], r["seqlen"], r["causal"]): r for r in rows}
    lines = []
    for pass_ in PASSES:
        keys = [k for k in _keys(rows) if k[0] == pass_]
        parts = []
        below = []
        for other in ("cuflash-plain", "flex"):
            ratios = {}
            for key in keys:
                ours, theirs = get.get(("cuflash", *key)), get.get((other, *key))
                if ours and theirs and ours.get("tflops") and theirs.get("tflops"):
                    ratios[key] = ours["tflops"] / theirs["tflops"]
            if not ratios:
                continue
            parts.append(f"cuflash/{other.removeprefix('cuflash-')} median "
                         f"{statistics.median(ratios.values()):.2f}, lowest "
                         f"{min(ratios.values()):.2f}")
            if other == "cuflash-plain":
                below = [f"D{d} S{s} {'causal' if c else 'full'} {r:.2f}"
                         for (_, d, s, c), r in ratios.items() if r < TARGET]
        if parts:
            target = (f"below {TARGET}: " + (", ".join(below) if below else "none"))
            lines.append(f"{pass_}: " + "; ".join(parts) + f"; {target}")
    return lines


def progress_line(cell: list[dict]) -> str:
    """The line printed as a cell ends (`cell`: its rows): TFLOP/s, or the status, per
    implementation and pass."""
    first = cell[0]
    parts = [f"{r['impl']} {r['pass']} {_value(r, 'tflops', '.0f')}" for r in cell]
    return (f"D{first['head_dim']} S{first['seqlen']} B{first['batch']} H{first['heads']} "
            f"{'causal' if first['causal'] else 'full'}: " + ", ".join(parts))


def caption(config: dict) -> str:
    mods = f"softcap {config['cap']:g}" + (" and sinks" if config.get("sinks") else "")
    mods += " and ALiBi (BLOOM's slopes)" if config.get("alibi") else ""
    call = "softcap=cap" + (", sinks=sinks (requiring grad)" if config.get("sinks") else "")
    call += ", alibi_slopes=slopes" if config.get("alibi") else ""
    flex_mod = "cap * tanh(score / cap)" if config["cap"] else "score"
    flex_mod += " - slope[h] * |q - kv|" if config.get("alibi") else ""
    flex = ("flex not timed (no sinks)" if config.get("sinks") else
            f"flex = compiled FlexAttention with score_mod {flex_mod}")
    return (f"bf16, B*S = {config['tokens']} tokens, H*D = {config['model_dim']}, {mods}; "
            f"TFLOP/s ({FLOPS}; the modifications not counted) and ms per call; "
            f"cuflash = cuflash.torch.attention({call}), plain = the same without them, {flex}")


def write_outputs(out: Path, record: dict) -> list[Path]:
    """``softcap.json`` (`record` as is) and ``softcap.md`` (caption, table, summary and the
    provenance line) under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    paragraphs = [caption(record["config"]), table(record["rows"]),
                  "\n".join(summary(record["rows"])),
                  provenance(record["environment"], record["command"])]
    paths = [out / "softcap.json", out / "softcap.md"]
    paths[0].write_text(json.dumps(record, indent=1) + "\n")
    paths[1].write_text("\n\n".join(p for p in paragraphs if p) + "\n")
    return paths


# ---- main ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Returns 0, 2 on a usage error or without torch and a CUDA GPU."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.alibi and args.cap:
        parser.error("--alibi takes --cap 0: the CUDA kernels do not combine a softcap with "
                     "ALiBi yet")
    if args.cap == 0 and not (args.sinks or args.alibi):
        parser.error("--cap 0 times nothing but plain cuflash: give a softcap > 0, --sinks or "
                     "--alibi")
    uneven = [d for d in args.head_dims if args.model_dim % d]
    if uneven:
        parser.error(f"--head-dims {uneven[0]} does not divide --model-dim {args.model_dim}")
    torch = cuda_torch("--softcap")
    if torch is None:
        return 2
    began = time.perf_counter()
    print(f"cuflash bench --softcap on {torch.cuda.get_device_name()}: "
          f"{len(cells(args))} cells, softcap {args.cap:g}{' and sinks' if args.sinks else ''}"
          f"{' and ALiBi' if args.alibi else ''}",
          file=sys.stderr, flush=True)
    deadline = None if args.budget is None else began + args.budget
    rows = run(args, deadline)
    config = {**vars(args), "out": None if args.out is None else str(args.out)}
    text = table(rows)
    lines = summary(rows)
    if args.out:
        record = {"command": "python -m cuflash bench --softcap" + "".join(f" {a}" for a in argv),
                  "environment": environment(torch), "config": config, "flops": FLOPS,
                  "units": {"ms": "median milliseconds per call",
                            "tflops": "FLOPs / median / 1e12"},
                  "rows": rows, "summary": lines, "seconds": time.perf_counter() - began}
        paths = write_outputs(args.out, record)
        print(f"wrote {paths[0]} and {paths[1]}", file=sys.stderr)
    print(caption(config))
    print(text)
    for line in lines:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
