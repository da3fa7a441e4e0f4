"""Command line: ``python -m cuflash {info,check,bench}``.

``info``   versions, NVRTC, GPUs, where the kernel sources and CuPy's compile cache are.
``check``  runs cuflash on the best device present (or ``--device``) over a handful of awkward
           shapes and every dtype the device supports, forward and backward, against the float64
           reference with the accuracy rule of docs/api.md; prints a table and exits 1 on any
           failure.
``bench``  hands its arguments to :func:`cuflash.bench.main`.

Every probe of the machine is guarded: no GPU, no driver or no CuPy is reported, never a crash.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import math
import os
import platform
import secrets
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import cuflash
from cuflash import _accuracy, _dtypes, reference
from cuflash.cuda import _compile

_ENV_SWITCHES = ("CUFLASH_VERBOSE", "CUFLASH_LINEINFO", "CUFLASH_DEBUG")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # everything after "bench" belongs to bench's own parser
        from cuflash import bench

        return bench.main(argv[1:])
    args = _parser().parse_args(argv)
    if args.command == "info":
        return info()
    if args.command == "check":
        return check(device=args.device, seed=args.seed)
    _parser().print_help()
    return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cuflash", description="cuflash: exact FlashAttention for any framework."
    )
    commands = parser.add_subparsers(dest="command", metavar="{info,check,bench}")
    commands.add_parser("info", help="versions, NVRTC, GPUs, kernel sources and compile cache")
    check_parser = commands.add_parser(
        "check", help="run cuflash against the float64 reference; exit 1 on any failure"
    )
    check_parser.add_argument(
        "--device", choices=("cpu", "cuda"), default=None,
        help="where to run (default: CUDA when a GPU is usable, else the CPU)",
    )
    check_parser.add_argument(
        "--seed", type=int, default=None,
        help="random seed of the inputs (default: a fresh one, printed for reproduction)",
    )
    commands.add_parser("bench", help="benchmarks; see python -m cuflash bench --help")
    return parser


# ---- info ------------------------------------------------------------------------------------


def info() -> int:
    """Print what cuflash finds on this machine; never fails for a missing GPU or package."""
    rows: list[tuple[str, str]] = [
        ("cuflash", f"{cuflash.__version__} ({Path(cuflash.__file__).parent})"),
        ("python", f"{platform.python_version()} ({sys.executable})"),
        ("platform", platform.platform()),
        ("numpy", np.__version__),
    ]
    cupy, cupy_error = _import_cupy()
    rows.append(("cupy", cupy.__version__ if cupy else f"not installed ({cupy_error})"))
    for package in ("torch", "jax", "ml_dtypes"):
        rows.append((package, _distribution_version(package)))
    rows.append(("NVRTC", _probe(_nvrtc_version)))
    if cupy is not None:
        rows.append(("CUDA runtime", _probe(lambda: _cuda_version(
            cupy.cuda.runtime.runtimeGetVersion()))))
        rows.append(("CUDA driver", _probe(lambda: _cuda_version(
            cupy.cuda.runtime.driverGetVersion()))))
    gpus, reason = _gpus()
    if not gpus:
        rows.append(("GPU", f"none ({reason})"))
    for gpu in gpus:
        rows.append((f"GPU {gpu.ordinal}", gpu.describe()))
    rows.append(("kernel sources", _probe(lambda: str(_compile.kernels_dir()))))
    rows.append(("kernel cache", _kernel_cache_dir()))
    for name in _ENV_SWITCHES:
        rows.append((name, os.environ.get(name, "unset")))
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


@dataclass(frozen=True)
class Gpu:
    ordinal: int
    name: str
    compute_capability: int  # e.g. 90
    memory_bytes: int

    def describe(self) -> str:
        cc = self.compute_capability
        return (f"{self.name}, compute capability {cc // 10}.{cc % 10} "
                f"(kernels for {_compile.arch_flag(cc)}), {self.memory_bytes / 2**30:.1f} GiB")


def _import_cupy():
    """(cupy, None) or (None, why not)."""
    try:
        import cupy
    except Exception as err:  # ImportError, or a broken CUDA install failing at import
        return None, f"{type(err).__name__}: {err}"
    return cupy, None


def _gpus() -> tuple[list[Gpu], str]:
    """The usable CUDA GPUs, or ``([], why none)``."""
    cupy, error = _import_cupy()
    if cupy is None:
        return [], f"cupy is not importable: {error}"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
        gpus = []
        for ordinal in range(count):
            props = cupy.cuda.runtime.getDeviceProperties(ordinal)
            name = props["name"]
            gpus.append(Gpu(
                ordinal=ordinal,
                name=name.decode() if isinstance(name, bytes) else str(name),
                compute_capability=10 * int(props["major"]) + int(props["minor"]),
                memory_bytes=int(props["totalGlobalMem"]),
            ))
    except Exception as err:  # no driver, no device: CuPy raises its own runtime errors
        return [], f"{type(err).__name__}: {err}"
    return gpus, "device count 0" if not gpus else ""


def _distribution_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _nvrtc_version() -> str:
    from cupy_backends.cuda.libs import nvrtc

    major, minor = nvrtc.getVersion()
    return f"{major}.{minor}"


def _cuda_version(encoded: int) -> str:
    """CUDA's ``1000 * major + 10 * minor`` as text; 0 means no driver."""
    if not encoded:
        return "none"
    return f"{encoded // 1000}.{encoded % 1000 // 10}"


def _kernel_cache_dir() -> str:
    configured = os.environ.get("CUPY_CACHE_DIR")
    if configured:
        return f"{configured} (CUPY_CACHE_DIR)"
    return f"{Path('~/.cupy/kernel_cache').expanduser()} (CuPy's default; set CUPY_CACHE_DIR)"


def _probe(fn: Callable[[], str]) -> str:
    try:
        return fn()
    except Exception as err:  # a report line, never a crash
        return f"unavailable ({type(err).__name__}: {err})"


# ---- check -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One problem of the self-check, in the same id style as the tests."""

    batch: int
    seqlen_q: int
    seqlen_k: int
    heads_q: int
    heads_kv: int
    head_dim: int
    causal: bool = False
    window: tuple[int, int] | None = None
    layout: str = "bshd"
    three_d: bool = False  # no batch axis (batch must be 1)
    scale: float | None = None
    documents: bool = False  # a user mask_mod (documents packed in each sequence), with its map
    bias: bool = False  # an additive float32 (Hq, Sq, Sk) bias (beside a mask_mod: one user kind)
    dropout: float = 0.0  # dropout_p, with a stream drawn from the check's seed

    @property
    def id(self) -> str:
        parts = ["3d" if self.three_d else f"B{self.batch}", f"Sq{self.seqlen_q}",
                 f"Sk{self.seqlen_k}", f"H{self.heads_q}/{self.heads_kv}", f"D{self.head_dim}"]
        if self.causal:
            parts.append("causal")
        if self.window is not None:
            parts.append("window{}:{}".format(*self.window))
        if self.scale is not None:
            parts.append(f"scale{self.scale:g}")
        if self.documents:
            parts.append("docs")
        if self.bias:
            parts.append("bias")
        if self.dropout:
            parts.append(f"dropout{self.dropout:g}")
        parts.append(self.layout)
        return "-".join(parts)

    @property
    def softmax_scale(self) -> float:
        return 1 / math.sqrt(self.head_dim) if self.scale is None else self.scale

    def from_canonical(self, x4: np.ndarray) -> np.ndarray:
        """A ``(B, S, H, D)`` array in this case's layout and rank, C-contiguous."""
        x = x4.swapaxes(1, 2) if self.layout == "bhsd" else x4
        return np.ascontiguousarray(x[0] if self.three_d else x)

    def to_canonical(self, x: np.ndarray) -> np.ndarray:
        """An array of this case's layout and rank as ``(B, S, H, D)``."""
        x = x[None] if self.three_d else x
        return x.swapaxes(1, 2) if self.layout == "bhsd" else x

    def lse_to_canonical(self, lse: np.ndarray) -> np.ndarray:
        return lse[None] if self.three_d else lse


# Small on purpose (the CPU runs them in seconds) and awkward on purpose: tile edges +-1, primes,
# GQA/MQA, Sq != Sk both ways (Sq > Sk causal leaves rows that see no key: zeros, lse = -inf),
# odd head dims, lengths 1 and 0, both layouts, 3-D input.
CASES = (
    Case(2, 128, 128, 4, 4, 64),
    Case(2, 129, 129, 4, 4, 64, causal=True),
    Case(1, 97, 97, 8, 2, 128, causal=True),
    Case(2, 33, 150, 4, 1, 64, causal=True, layout="bhsd"),
    Case(1, 70, 20, 2, 2, 32, causal=True),
    Case(2, 65, 63, 3, 3, 37, layout="bhsd", scale=0.5),
    Case(1, 64, 64, 2, 2, 256, causal=True),
    Case(1, 1, 1, 2, 1, 16, three_d=True),
    Case(1, 1, 77, 4, 2, 64, causal=True, three_d=True, layout="bhsd"),
    Case(1, 16, 0, 2, 2, 64),
    # Sliding windows: cut on both sides, one side only, rows that see nothing (right < -shift).
    Case(2, 300, 300, 4, 2, 64, window=(40, 0)),
    Case(1, 130, 200, 2, 2, 128, window=(17, 5), layout="bhsd"),
    Case(1, 200, 90, 2, 1, 64, window=(3, -1)),
    Case(1, 150, 70, 2, 2, 96, window=(10, 2), causal=True),
    # A user mask_mod (documents of random lengths, ids by batch) through its block map.
    Case(2, 300, 300, 4, 2, 64, causal=True, documents=True),
    Case(1, 130, 200, 2, 2, 128, layout="bhsd", documents=True),
    # The mask_mod beside an additive bias (the user kind then adds it), and dropout (the CPU
    # path; CUDA inputs are refused, so skipped, until the kernels draw the stream).
    Case(2, 300, 300, 4, 2, 64, causal=True, documents=True, bias=True),
    Case(2, 200, 260, 4, 2, 64, causal=True, dropout=0.2),
)

DOCUMENTS = cuflash.MaskMod("qdoc(b, q_idx) == kdoc(b, kv_idx)",
                            numpy=lambda b, h, q, kv, qdoc, kdoc: qdoc[b, q] == kdoc[b, kv])


def _document_ids(batch: int, length: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted int32 document ids ``(batch, length)``: runs of 1..length/3 tokens."""
    runs = rng.integers(1, max(2, length // 3), size=(batch, length))
    return (np.cumsum(runs, axis=1) // max(1, length // 4)).astype(np.int32)


@dataclass(frozen=True)
class DecodeCase:
    """One decoding step of the self-check: `batch` sequences of `cached` keys in a cache of
    pages (`page_size` > 0) or rows, one new key appended, `steps` query steps, causal."""

    batch: int
    steps: int
    cached: int
    heads_q: int
    heads_kv: int
    head_dim: int
    page_size: int = 0

    @property
    def id(self) -> str:
        cache = f"paged{self.page_size}" if self.page_size else "rows"
        return (f"kvcache-B{self.batch}-Sq{self.steps}-Sk{self.cached}+1-H{self.heads_q}/"
                f"{self.heads_kv}-D{self.head_dim}-{cache}")


# attention_with_kvcache (on CUDA, float16/bfloat16: the split-KV decoding kernel)
DECODE_CASES = (
    DecodeCase(3, 1, 300, 16, 4, 128, page_size=16),
    DecodeCase(2, 4, 1000, 8, 1, 64),
)


def check_decode(case: DecodeCase, dtype: str, backend: _Backend,
                 rng: np.random.Generator) -> Row:
    """One `attention_with_kvcache` call against the reference on the cache after the append;
    the cache checked slot by slot too (the new key at its place, nothing else written)."""
    row = _RowMaker(case.id, dtype, backend.label)
    b, n, hkv, d = case.batch, case.cached, case.heads_kv, case.head_dim
    keys = n + 1
    q4, kseq, vseq = (_accuracy.round_to(rng.standard_normal(shape), dtype).astype(np.float64)
                      for shape in ((b, case.steps, case.heads_q, d), (b, keys, hkv, d),
                                    (b, keys, hkv, d)))
    if case.page_size:  # sequence i's keys in shuffled pages
        per = -(-keys // case.page_size)
        table = rng.permutation(b * per + 1)[:b * per].reshape(b, per).astype(np.int32)
        k_cache, v_cache = (np.zeros((b * per + 1, case.page_size, hkv, d)) for _ in range(2))
        for i in range(b):
            for j in range(n):
                at = (table[i, j // case.page_size], j % case.page_size)
                k_cache[at], v_cache[at] = kseq[i, j], vseq[i, j]
    else:
        table = None
        k_cache, v_cache = (np.zeros((b, keys + 7, hkv, d)) for _ in range(2))
        k_cache[:, :n], v_cache[:, :n] = kseq[:, :n], vseq[:, :n]
    host_caches = (k_cache.copy(), v_cache.copy())
    q, kc, vc, kn, vn = (backend.array(x, dtype) for x in (q4, k_cache, v_cache, kseq[:, n:],
                                                            vseq[:, n:]))
    try:
        out, lse = cuflash.attention_with_kvcache(q, kc, vc, k=kn, v=vn, cache_seqlens=n,
                                                  block_table=table, return_lse=True)
        backend.synchronize()
    except Exception as err:
        return row.fail("fwd", f"{type(err).__name__}: {err}")
    ref_out, ref_lse = reference.attention_with_kvcache(
        q4, *host_caches, k=kseq[:, n:], v=vseq[:, n:], cache_seqlens=n, block_table=table,
        return_lse=True)
    naive_out, naive_lse = _accuracy.naive_attention(q4, kseq, vseq, dtype=dtype, causal=True,
                                                     window=None, scale=1 / math.sqrt(d))
    comparisons = [
        _accuracy.compare("out", backend.to_numpy(out), ref_out, naive_out, dtype=dtype),
        _accuracy.compare("lse", backend.to_numpy(lse), ref_lse, naive_lse,
                          dtype=_accuracy.LSE_DTYPE),
    ]
    # The cache afterwards: the new key and value at position n of each sequence, the rest as
    # it was (zeros where nothing was cached).
    want_k, want_v = host_caches
    for i in range(b):
        at = ((table[i, n // case.page_size], n % case.page_size) if case.page_size
              else (i, n))
        want_k[at], want_v[at] = kseq[i, n], vseq[i, n]
    written = [name for name, got, want in (("k_cache", kc, want_k), ("v_cache", vc, want_v))
               if not np.array_equal(backend.to_numpy(got), want)]
    ms = _warm_ms(lambda: cuflash.attention_with_kvcache(q, kc, vc, cache_seqlens=keys,
                                                         block_table=table), backend)
    return row.judged("fwd", comparisons, ms, [f"{name} (slots besides the new key's)"
                                               for name in written])


class _Backend:
    """How `check` makes, poisons and reads arrays on one device."""

    def __init__(self, device: str):
        self.notes: list[str] = []
        if device == "cpu":
            self.xp, self.label, self.dtypes = np, "cpu", _dtypes.CPU_DTYPES
            return
        import cupy

        from cuflash.cuda import _launch

        gpu = cupy.cuda.Device()
        cc = int(gpu.compute_capability)
        self.xp, self.label, self.dtypes = cupy, f"cuda:{gpu.id}", []
        for dtype in _dtypes.GPU_DTYPES:
            min_arch = _launch.fwd_spec(dtype, 64, mask="none", aligned=True).min_arch
            if min_arch > cc:
                self.notes.append(f"{dtype} skipped: its kernels need compute capability >= "
                                  f"{min_arch / 10:.1f}, this GPU has {cc / 10:.1f}")
            elif dtype == _dtypes.BFLOAT16 and _bfloat16_numpy_dtype() is None:
                self.notes.append("bfloat16 skipped: making bfloat16 CuPy arrays needs "
                                  "ml_dtypes and a CuPy that supports it")
            else:
                self.dtypes.append(dtype)

    def array(self, values64: np.ndarray, dtype: str):
        """A device array of ``dtype`` holding `values64` (already representable in it)."""
        host = values64.astype(_numpy_dtype(dtype))
        return host if self.xp is np else self.xp.asarray(host)

    def poisoned(self, shape: tuple[int, ...], dtype: str):
        return self.array(np.full(shape, np.nan), dtype)

    def to_numpy(self, x) -> np.ndarray:
        host = x if self.xp is np else self.xp.asnumpy(x)
        with np.errstate(invalid="ignore"):  # an unwritten output's bits may be signalling NaNs
            return np.asarray(host).astype(np.float64)

    def synchronize(self) -> None:
        if self.xp is not np:
            self.xp.cuda.get_current_stream().synchronize()


def _bfloat16_numpy_dtype():
    """ml_dtypes' bfloat16 when CuPy can hold it, else None."""
    try:
        import cupy
        import ml_dtypes

        cupy.dtype(ml_dtypes.bfloat16)
    except Exception:  # either package missing, or a CuPy without bfloat16
        return None
    return ml_dtypes.bfloat16


def _numpy_dtype(dtype: str):
    return _bfloat16_numpy_dtype() if dtype == _dtypes.BFLOAT16 else np.dtype(dtype)


@dataclass(frozen=True)
class Row:
    """One line of the check table."""

    case: str
    pass_: str  # "fwd" or "bwd"
    dtype: str
    device: str
    status: str  # "ok", "FAIL" or "skip"
    worst: _accuracy.Comparison | None = None
    ms: float | None = None
    detail: str = ""  # why it failed or was skipped


def check(device: str | None = None, seed: int | None = None) -> int:
    """Run every case on `device` ("cpu", "cuda" or None: the best present); 0 iff all pass."""
    if device is None:
        gpus, reason = _gpus()
        device = "cuda" if gpus else "cpu"
        if not gpus:
            print(f"No usable CUDA GPU or driver was found, so the CPU path is checked instead "
                  f"(detail: {reason}).")
    elif device == "cuda":
        gpus, reason = _gpus()
        if not gpus:
            print(f"error: --device cuda, but no usable CUDA GPU or driver was found "
                  f"(detail: {reason})", file=sys.stderr)
            return 2
    seed = secrets.randbits(32) if seed is None else seed
    backend = _Backend(device)
    print(f"cuflash {cuflash.__version__} check on {backend.label}, seed {seed} "
          f"(rerun with --seed {seed})")
    for note in backend.notes:
        print(f"note: {note}")

    rows = []
    for index, case in enumerate(CASES):
        for dtype in backend.dtypes:
            rng = np.random.default_rng((seed, index, _dtypes.GPU_DTYPES.index(dtype)))
            rows.extend(check_case(case, dtype, backend, rng))
    for index, case in enumerate(DECODE_CASES):
        for dtype in backend.dtypes:
            rng = np.random.default_rng((seed, len(CASES) + index,
                                         _dtypes.GPU_DTYPES.index(dtype)))
            rows.append(check_decode(case, dtype, backend, rng))
    _print_table(rows)
    print()
    failed = [r for r in rows if r.status == "FAIL"]
    skipped = [r for r in rows if r.status == "skip"]
    for r in failed:
        print(f"FAIL {r.pass_} {r.case} {r.dtype}: {r.detail}")
    for reason in sorted({r.detail for r in skipped}):
        count = sum(r.detail == reason for r in skipped)
        print(f"skipped {count}: {reason}")
    print(f"{len(rows) - len(failed) - len(skipped)} passed, {len(failed)} failed, "
          f"{len(skipped)} skipped")
    return 1 if failed else 0


def check_case(case: Case, dtype: str, backend: _Backend, rng: np.random.Generator) -> list[Row]:
    """Forward (and, where the device has one, backward) of one case; one Row each."""
    row = _RowMaker(case.id, dtype, backend.label)
    b, sq, sk, hq, hkv, d = (case.batch, case.seqlen_q, case.seqlen_k, case.heads_q,
                             case.heads_kv, case.head_dim)
    # Fresh standard-normal values, rounded to the dtype so that every path sees the same numbers.
    q4, k4, v4 = (_accuracy.round_to(rng.standard_normal(shape), dtype).astype(np.float64)
                  for shape in ((b, sq, hq, d), (b, sk, hkv, d), (b, sk, hkv, d)))
    do4 = _accuracy.round_to(rng.standard_normal(q4.shape), dtype).astype(np.float64)
    host = {name: case.from_canonical(x) for name, x in
            (("q", q4), ("k", k4), ("v", v4), ("dout", do4))}
    q, k, v, dout = (backend.array(host[name], dtype) for name in ("q", "k", "v", "dout"))
    opts = {"causal": case.causal, "window": case.window, "scale": case.scale,
            "layout": case.layout}
    naive_opts = {"dtype": dtype, "causal": case.causal, "window": case.window,
                  "scale": case.softmax_scale}
    ref_opts = dict(opts)
    if case.documents:  # the mask_mod's map built once, for the forward and the backward
        ids = {"qdoc": _document_ids(b, sq, rng), "kdoc": _document_ids(b, sk, rng)}
        aux = {name: x if backend.xp is np else backend.xp.asarray(x) for name, x in ids.items()}
        opts |= {"mask_mod": DOCUMENTS, "aux": aux}
        opts["block_map"] = cuflash.block_map(q, k, mask_mod=DOCUMENTS, aux=aux,
                                              causal=case.causal, window=case.window,
                                              layout=case.layout)
        ref_opts |= {"mask_mod": DOCUMENTS, "aux": ids}
        naive_opts["mask"] = (ids["qdoc"][:, None, :, None] == ids["kdoc"][:, None, None, :])
    if case.bias:
        bias = rng.standard_normal((hq, sq, sk)).astype(np.float32)
        opts["bias"] = backend.array(bias.astype(np.float64), "float32")
        ref_opts["bias"] = naive_opts["bias"] = bias.astype(np.float64)
    if case.dropout:
        stream = (int(rng.integers(2**63)), int(rng.integers(2**63)))
        for options in (opts, ref_opts, naive_opts):
            options |= {"dropout_p": case.dropout, "rng": stream}

    # -- forward: into a NaN-poisoned out=, then against the reference --
    out = backend.poisoned(tuple(host["q"].shape), dtype)
    try:
        result, lse = cuflash.attention(q, k, v, return_lse=True, out=out, **opts)
        backend.synchronize()
    except NotImplementedError as err:  # an option this device does not compute yet
        return [row.skip("fwd", str(err)), row.skip("bwd", str(err))]
    except Exception as err:
        return [row.fail("fwd", f"{type(err).__name__}: {err}")]
    if result is not out:
        return [row.fail("fwd", "attention(out=...) did not return out")]
    got = backend.to_numpy(out)
    unwritten = int(np.isnan(got).sum())
    if unwritten:
        return [row.fail("fwd", f"{unwritten} of {got.size} output elements never written "
                                "(still NaN poison)")]
    ref_out, ref_lse = reference.attention(host["q"], host["k"], host["v"], return_lse=True,
                                           **ref_opts)
    naive_out, naive_lse = _accuracy.naive_attention(q4, k4, v4, **naive_opts)
    comparisons = [
        _accuracy.compare("out", case.to_canonical(got), case.to_canonical(ref_out), naive_out,
                          dtype=dtype),
        _accuracy.compare("lse", case.lse_to_canonical(backend.to_numpy(lse)),
                          case.lse_to_canonical(ref_lse), naive_lse,
                          dtype=_accuracy.LSE_DTYPE),
    ]
    ms = _warm_ms(lambda: cuflash.attention(q, k, v, out=out, **opts), backend)
    rows = [row.judged("fwd", comparisons, ms, _modified(backend, host, q=q, k=k, v=v))]

    # -- backward from cuflash's own out and lse --
    try:
        grads = cuflash.attention_backward(dout, q, k, v, out, lse, **opts)
        backend.synchronize()
    except NotImplementedError as err:
        return [*rows, row.skip("bwd", str(err))]
    except Exception as err:
        return [*rows, row.fail("bwd", f"{type(err).__name__}: {err}")]
    ref_grads = reference.attention_backward(host["dout"], host["q"], host["k"], host["v"],
                                             **ref_opts)
    naive_grads = _accuracy.naive_attention_backward(do4, q4, k4, v4, **naive_opts)
    grad_eps = _accuracy.backward_eps(do4, q4, k4, v4, **naive_opts)
    comparisons = [
        _accuracy.compare(name, case.to_canonical(backend.to_numpy(g)), case.to_canonical(ref),
                          naive, dtype=dtype, eps=eps)
        for name, g, ref, naive, eps in zip(("dq", "dk", "dv"), grads, ref_grads, naive_grads,
                                            grad_eps, strict=True)
    ]
    ms = _warm_ms(lambda: cuflash.attention_backward(dout, q, k, v, out, lse, **opts), backend)
    modified = _modified(backend, host, q=q, k=k, v=v, dout=dout)
    rows.append(row.judged("bwd", comparisons, ms, modified))
    return rows


@dataclass(frozen=True)
class _RowMaker:
    case: str
    dtype: str
    device: str

    def fail(self, pass_: str, detail: str) -> Row:
        return Row(self.case, pass_, self.dtype, self.device, "FAIL", detail=detail)

    def skip(self, pass_: str, detail: str) -> Row:
        return Row(self.case, pass_, self.dtype, self.device, "skip", detail=detail)

    def judged(self, pass_: str, comparisons: list[_accuracy.Comparison], ms: float,
               modified: list[str]) -> Row:
        worst = max(comparisons, key=_badness)
        failures = [c.failure for c in comparisons if not c.ok]
        failures += [f"input {name} was modified" for name in modified]
        status = "FAIL" if failures else "ok"
        return Row(self.case, pass_, self.dtype, self.device, status, worst, ms,
                   "; ".join(f for f in failures if f))


def _badness(c: _accuracy.Comparison) -> float:
    """How close to (or past) its bound a comparison is; failures rank first."""
    if not c.ok:
        return math.inf
    return c.max_error / c.allowed if c.allowed > 0 else 0.0


def _modified(backend: _Backend, host: dict[str, np.ndarray], **arrays) -> list[str]:
    """Names of the inputs whose values differ from what was handed in."""
    return [name for name, x in arrays.items()
            if not np.array_equal(backend.to_numpy(x), host[name])]


def _warm_ms(call: Callable[[], object], backend: _Backend) -> float:
    """Milliseconds of one more call, after the checked one compiled and warmed everything."""
    backend.synchronize()
    start = time.perf_counter()
    call()
    backend.synchronize()
    return 1e3 * (time.perf_counter() - start)


def _print_table(rows: list[Row]) -> None:
    header = ("case", "pass", "dtype", "device", "worst", "max error", "allowed", "status", "ms")
    lines = [header, *(_cells(r) for r in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    right = {"max error", "allowed", "ms"}
    for line in _with_rule(lines, widths):
        print("  ".join(cell.rjust(w) if name in right else cell.ljust(w)
                        for name, cell, w in zip(header, line, widths, strict=True)).rstrip())


def _with_rule(lines: list[tuple[str, ...]], widths: list[int]) -> Iterator[tuple[str, ...]]:
    yield lines[0]
    yield tuple("-" * w for w in widths)
    yield from lines[1:]


def _cells(r: Row) -> tuple[str, ...]:
    if r.worst is None:
        worst = err = allowed = "-"
    else:
        worst, err, allowed = r.worst.name, f"{r.worst.max_error:.2e}", f"{r.worst.allowed:.2e}"
    ms = "-" if r.ms is None else f"{r.ms:.2f}"
    return (r.case, r.pass_, r.dtype, r.device, worst, err, allowed, r.status, ms)


if __name__ == "__main__":
    sys.exit(main())
