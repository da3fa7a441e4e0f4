"""The implementations a benchmark case times: cuflash, PyTorch SDPA with one backend forced, and
standard attention (NumPy or CuPy) with the S x S matrices in memory."""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

import cuflash
from cuflash.bench.config import CUFLASH, GIB, SDPA_BACKENDS, Case


@dataclass
class Inputs:
    """One set of random inputs, ``(B, S, H, D)`` in the sweep's framework."""

    q: object
    k: object
    v: object
    dout: object

    @property
    def nbytes(self) -> int:
        return sum(int(x.nbytes) for x in (self.q, self.k, self.v, self.dout))


class Impl:
    """An attention implementation: ``prepare`` does the untimed setup of one input set and
    returns the call to time, which returns the arrays it produced."""

    name = ""
    peer = True  # compared against cuflash; its failures are "n/a", not errors

    def context(self):
        return contextlib.nullcontext()

    def skip_reason(self, case: Case, limit_bytes: float) -> str | None:
        return None

    def prepare(self, case: Case, x: Inputs) -> Callable[[], tuple]:
        raise NotImplementedError

    def explain(self, err: BaseException) -> str:
        return describe(err)


class Cuflash(Impl):
    """cuflash's public API on the caller's arrays (bwd: `attention_backward` from a saved
    forward; fwd+bwd: both, the lse kept between them counting as workspace)."""

    name = CUFLASH
    peer = False

    def prepare(self, case: Case, x: Inputs) -> Callable[[], tuple]:
        q, k, v, dout, causal = x.q, x.k, x.v, x.dout, case.causal
        if case.pass_ == "fwd":
            return lambda: (cuflash.attention(q, k, v, causal=causal),)
        if case.pass_ == "bwd":
            out, lse = cuflash.attention(q, k, v, causal=causal, return_lse=True)
            return lambda: cuflash.attention_backward(dout, q, k, v, out, lse, causal=causal)

        def forward_backward():
            out, lse = cuflash.attention(q, k, v, causal=causal, return_lse=True)
            return (out, *cuflash.attention_backward(dout, q, k, v, out, lse, causal=causal))

        return forward_backward


class Sdpa(Impl):
    """``torch.nn.functional.scaled_dot_product_attention`` with one backend forced.

    Inputs are the same (B, S, H, D) tensors, viewed as (B, H, S, D) (no copy: the layout the
    flash backend itself prefers). Backward goes through autograd, as in training.
    """

    def __init__(self, name: str, torch_module):
        self.name = name
        self.torch = torch_module
        from torch.nn.attention import SDPBackend

        self.backend = getattr(SDPBackend, SDPA_BACKENDS[name], None)
        self.warnings: list[str] = []

    @contextlib.contextmanager
    def context(self):
        from torch.nn.attention import sdpa_kernel

        if self.backend is None:
            raise NotImplementedError(f"torch {self.torch.__version__} has no SDPBackend."
                                      f"{SDPA_BACKENDS[self.name]}")
        # SDPA explains why a backend refuses a problem in warnings, then raises "No available
        # kernel"; keep them for the n/a note.
        with warnings.catch_warnings(record=True) as caught, sdpa_kernel(self.backend):
            warnings.simplefilter("always")
            try:
                yield
            finally:
                self.warnings = [str(w.message) for w in caught]

    def skip_reason(self, case: Case, limit_bytes: float) -> str | None:
        if self.name != "sdpa-math":
            return None
        # The math backend materialises (at least) the fp32 B x H x S x S scores.
        return _too_big(case.scores * 4, limit_bytes)

    def prepare(self, case: Case, x: Inputs) -> Callable[[], tuple]:
        torch, sdpa = self.torch, self.torch.nn.functional.scaled_dot_product_attention
        q, k, v, dout = (t.transpose(1, 2) for t in (x.q, x.k, x.v, x.dout))
        causal = case.causal
        if case.pass_ == "fwd":
            return lambda: (sdpa(q, k, v, is_causal=causal),)
        qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
        if case.pass_ == "bwd":
            out = sdpa(qg, kg, vg, is_causal=causal)
            return lambda: torch.autograd.grad(out, (qg, kg, vg), dout, retain_graph=True)

        def forward_backward():
            out = sdpa(qg, kg, vg, is_causal=causal)
            return (out, *torch.autograd.grad(out, (qg, kg, vg), dout))

        return forward_backward

    def explain(self, err: BaseException) -> str:
        reasons = dict.fromkeys(first_line(w).split(" (Triggered internally")[0]
                                for w in self.warnings)
        text = describe(err)
        return f"{'; '.join(reasons)} ({text})"[:400] if reasons else text


class Standard(Impl):
    """Textbook attention with the S x S matrices in memory (NumPy or CuPy): scores by matmul in
    the input dtype, softmax in float32 (float64 for float64), probabilities back to the input
    dtype, matmul with v; backward from the stored probabilities. The causal mask (an additive
    S x S bias) is built in the untimed setup."""

    def __init__(self, name: str, xp, to_xp: Callable):
        self.name, self.xp, self.to_xp = name, xp, to_xp

    def skip_reason(self, case: Case, limit_bytes: float) -> str | None:
        return _too_big(self.bytes_needed(case), limit_bytes)

    def bytes_needed(self, case: Case) -> float:
        item = np.dtype("float64" if case.dtype == "float64" else "float32").itemsize
        low = 2 if case.dtype in ("bfloat16", "float16") else item
        per_score = low + item + low  # scores, softmax in the accumulate dtype, probabilities
        if case.pass_ != "fwd":
            per_score += 2 * item  # dP and dS
        bias = case.seqlen**2 * item if case.causal else 0
        return case.scores * per_score + bias

    def prepare(self, case: Case, x: Inputs) -> Callable[[], tuple]:
        xp = self.xp
        q, k, v, dout = (xp.ascontiguousarray(self.to_xp(t).transpose(0, 2, 1, 3))
                         for t in (x.q, x.k, x.v, x.dout))  # (B, H, S, D)
        scale = 1.0 / math.sqrt(case.head_dim)
        bias = None
        if case.causal:  # -inf above the diagonal
            acc = _accumulate_dtype(xp, q.dtype)
            bias = xp.triu(xp.full((case.seqlen, case.seqlen), -xp.inf, dtype=acc), 1)
        if case.pass_ == "fwd":
            return lambda: (standard_forward(xp, q, k, v, scale, bias)[0],)
        if case.pass_ == "bwd":
            out, p = standard_forward(xp, q, k, v, scale, bias)
            return lambda: standard_backward(xp, dout, q, k, v, out, p, scale)

        def forward_backward():
            out, p = standard_forward(xp, q, k, v, scale, bias)
            return (out, *standard_backward(xp, dout, q, k, v, out, p, scale))

        return forward_backward


def _accumulate_dtype(xp, dtype):
    return xp.float64 if dtype == xp.float64 else xp.float32


def standard_forward(xp, q, k, v, scale: float, bias):
    """softmax(scale * q k^T + bias) v on (B, H, S, D) arrays; returns (out, probabilities)."""
    acc = _accumulate_dtype(xp, q.dtype)
    # -- scores in the input dtype, softmax in the accumulate dtype --
    s = xp.matmul(q, k.swapaxes(-1, -2)).astype(acc, copy=False)
    s *= scale
    if bias is not None:
        s += bias
    s -= s.max(axis=-1, keepdims=True)
    xp.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    p = s.astype(q.dtype, copy=False)
    return xp.matmul(p, v), p


def standard_backward(xp, dout, q, k, v, out, p, scale: float):
    """dq, dk, dv of `standard_forward` from its probabilities `p` (masked entries are 0)."""
    acc = _accumulate_dtype(xp, q.dtype)
    dv = xp.matmul(p.swapaxes(-1, -2), dout)
    # -- dS = P * (dP - rowsum(dO * O)) --
    ds = xp.matmul(dout, v.swapaxes(-1, -2)).astype(acc, copy=False)
    ds -= (dout.astype(acc) * out.astype(acc)).sum(axis=-1, keepdims=True)
    ds *= p
    ds *= scale
    ds = ds.astype(q.dtype, copy=False)
    return xp.matmul(ds, k), xp.matmul(ds.swapaxes(-1, -2), q), dv


def _too_big(needed: float, limit_bytes: float) -> str | None:
    if needed <= limit_bytes:
        return None
    return (f"needs ~{needed / GIB:.0f} GiB for the S x S matrices "
            f"(limit {limit_bytes / GIB:.0f} GiB)")


def describe(err: BaseException) -> str:
    """``Type: first line of the message``, at most 300 characters: a row's note."""
    return f"{type(err).__name__}: {first_line(str(err))}"[:300]


def first_line(text: str) -> str:
    """The first line of `text`, stripped ("" for blank text)."""
    return text.strip().splitlines()[0] if text.strip() else ""
