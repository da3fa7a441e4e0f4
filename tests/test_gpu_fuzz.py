"""GPU fuzz: one Hypothesis property per (kernel family, dtype), forward and backward.

Each example draws one problem from the whole variant space (tests/strategies.py `problems`:
none / causal / sliding-window masks, GQA and MQA, head dims 1..256, ragged lengths including 0
and 1, Sq != Sk, both layouts, 3-D inputs, packed qkv and strided views) plus the options
(`return_lse`, the backward's `deterministic`), and runs the forward and backward suites' own
checks (tests/test_gpu_forward.py, tests/test_gpu_backward.py: out, lse, dq, dk, dv against the
float64 reference by the accuracy rule, inputs untouched, every output element written). It also
asserts that the family's kernels are the ones that ran:

| family | dtypes | forward | backward dK/dV | how |
| --- | --- | --- | --- | --- |
| hopper | fp16, bf16 | fwd_sm90 | bwd_dkdv_sm90 | cc 9.0 only; head dims multiples of 8 (TMA) |
| sm80 | fp16, bf16 | fwd_sm80 | bwd_dkdv_sm80 | `CUFLASH_FORCE_SM80` set (a no-op off Hopper) |
| simt | fp32, fp64 | fwd_simt | bwd_dkdv_simt | every GPU |

One test per (family, dtype), so a long run is ``examples x 6`` (8 on Hopper) examples, not
examples times every parametrization of the other suites. `CUFLASH_FUZZ_EXAMPLES` sets the count
(default 25); tests/fuzz.sh runs the combinations as parallel processes on one GPU:

    PYTHONPATH=. CUFLASH_FUZZ_EXAMPLES=2000 bash tests/fuzz.sh

`CUFLASH_FUZZ_DB`: a directory for Hypothesis' example database (fuzz.sh gives each run a fresh
one, so that a run generates new examples and a failure's example can be replayed from it).

Skipped, with the reason printed, where no CUDA GPU is usable.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import time
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase

from tests.gpu_support import require_gpu, to_numpy

require_gpu()

import cuflash  # noqa: E402
from cuflash._core import compute_capability  # noqa: E402
from cuflash.cuda import _compile, _replay  # noqa: E402
from tests.strategies import (  # noqa: E402
    AWKWARD_HEAD_DIMS,
    SHORT_DTYPE,
    Case,
    examples,
    make_inputs,
    problems,
    seeds,
)
from tests.test_gpu_backward import _check_case as check_backward  # noqa: E402
from tests.test_gpu_forward import _check_case as check_forward  # noqa: E402
from tests.test_gpu_forward import _namespace  # noqa: E402

pytestmark = pytest.mark.gpu

CC = compute_capability(0)
HAS_TORCH = importlib.util.find_spec("torch") is not None


def _has_cuda_bindings() -> bool:
    """The Hopper kernels need cuda.bindings to encode their TMA tensor maps."""
    try:
        from cuda.bindings import driver  # noqa: F401
    except ImportError:
        return False
    return True


@dataclasses.dataclass(frozen=True)
class Family:
    """One kernel family: its dtypes and the entries (KernelSpec.entry) that must run."""

    name: str
    dtypes: tuple[str, ...]
    forward: str
    dkdv: str
    forbidden: tuple[str, ...]  # entries of other families that must not run


FAMILIES = {
    "hopper": Family("hopper", ("float16", "bfloat16"), "fwd_sm90", "bwd_dkdv_sm90", ()),
    "sm80": Family("sm80", ("float16", "bfloat16"), "fwd_sm80", "bwd_dkdv_sm80",
                   ("fwd_sm90", "bwd_dkdv_sm90")),
    "simt": Family("simt", ("float32", "float64"), "fwd_simt", "bwd_dkdv_simt",
                   ("fwd_sm90", "bwd_dkdv_sm90", "fwd_sm80", "bwd_dkdv_sm80")),
}


def _skip_reason(family: str, dtype: str) -> str | None:
    if family == "hopper" and CC != 90:
        return f"the Hopper kernels run on compute capability 9.0 only, this GPU is {CC}"
    if family == "hopper" and not _has_cuda_bindings():
        return "cuda.bindings is not installed: the Hopper kernels are never taken without it"
    if dtype == "bfloat16" and not HAS_TORCH:
        return "bfloat16 inputs are built with torch, which is not installed"
    return None


def family_params() -> list:
    """pytest params ``(family, dtype)`` with ids like ``hopper-fp16``; skipped ones carry the
    reason (printed once here, as the other GPU modules print theirs)."""
    params = []
    for family in FAMILIES.values():
        for dtype in family.dtypes:
            reason = _skip_reason(family.name, dtype)
            ident = f"{family.name}-{SHORT_DTYPE[dtype]}"
            if reason is not None:
                print(f"skipping {ident}: {reason}")
            params.append(pytest.param(family.name, dtype, id=ident,
                                       marks=pytest.mark.skipif(reason is not None,
                                                                reason=reason or "")))
    return params


@contextlib.contextmanager
def on_family(family: str):
    """Run the cuflash calls inside on `family`'s kernels; yields the list of kernel entries
    (KernelSpec.entry) planned meanwhile. Plans are cleared on entry and exit, so every call
    inside plans (and is recorded) and no plan of one family is replayed under another."""
    saved = os.environ.get("CUFLASH_FORCE_SM80")
    if family == "sm80":
        os.environ["CUFLASH_FORCE_SM80"] = "1"
    else:
        os.environ.pop("CUFLASH_FORCE_SM80", None)
    entries: list[str] = []
    real = _compile.get_function

    def recording(spec, *args, **kwargs):
        entries.append(spec.entry)
        return real(spec, *args, **kwargs)

    _replay.clear()
    try:
        with mock.patch.object(_compile, "get_function", recording):
            yield entries
    finally:
        _replay.clear()
        if saved is None:
            os.environ.pop("CUFLASH_FORCE_SM80", None)
        else:
            os.environ["CUFLASH_FORCE_SM80"] = saved


def assert_family_ran(family: str, case: Case, entries: list[str]) -> None:
    """The forward and the backward's dK/dV step of a non-empty `case` ran on `family`."""
    fam = FAMILIES[family]
    stray = sorted(set(entries) & set(fam.forbidden))
    assert not stray, f"{case.id}: {family} ran {stray} (all planned: {sorted(set(entries))})"
    if case.seqlen_q == 0:
        return  # nothing to compute, nothing launched for the forward
    # Hopper hands Sk == 0 to the sm80 kernels (they write zeros and lse = -inf).
    want = [fam.forward if family != "hopper" or case.seqlen_k > 0 else "fwd_sm80"]
    if case.seqlen_k > 0:
        want.append(fam.dkdv)
    missing = [entry for entry in want if entry not in entries]
    assert not missing, (f"{case.id}: {family} did not run {missing} "
                         f"(planned: {sorted(set(entries))})")


def max_head_dim(dtype: str) -> int:
    """256, except fp16/bf16 on GPUs with 99 KB of shared memory per block (cc 8.6, 8.9, 12.0),
    whose backward stops at 128 (a documented RuntimeError above it)."""
    if dtype in ("float16", "bfloat16") and _compile.smem_limit(0) <= 99 * 1024:
        return 128
    return 256


# Head dims whose rows are whole 16-byte vectors (TMA-legal in every view strategies.py builds):
# the awkward ones among them and any multiple of 8 up to 256.
TMA_AWKWARD_HEAD_DIMS = tuple(sorted({8, 16} | {d for d in AWKWARD_HEAD_DIMS if d % 8 == 0}))


def fuzz_cases(data, family: str, dtype: str) -> Case:
    """One problem of the whole variant space, modest in size (S <= 300, B <= 2, Hq <= 8) so
    that the float64 reference, on the host, stays cheap."""
    case = data.draw(problems(dtypes=(dtype,), max_batch=2, max_heads_kv=2, max_group=4,
                              max_seqlen=300, max_head_dim=max_head_dim(dtype), windows=True),
                     label="case")
    if family == "hopper":
        head_dim = data.draw(st.one_of(st.sampled_from(TMA_AWKWARD_HEAD_DIMS),
                                       st.integers(1, 32).map(lambda n: 8 * n)), label="head_dim")
        case = dataclasses.replace(case, head_dim=head_dim)
    return case


def check_without_lse(case: Case, seed: int) -> None:
    """`return_lse=False` (and no out=) gives the very bits of the call with lse."""
    xp = _namespace(case.dtype)
    q, k, v = make_inputs(case, xp, seed)
    with_lse, _ = cuflash.attention(q, k, v, **case.mask, layout=case.layout, return_lse=True)
    plain = cuflash.attention(q, k, v, **case.mask, layout=case.layout)
    np.testing.assert_array_equal(to_numpy(plain), to_numpy(with_lse),
                                  err_msg=f"{case.id}: return_lse=False changed the output")


# CUFLASH_FUZZ_DB: Hypothesis' example database in that directory (else Hypothesis' default).
_DATABASE = ({"database": DirectoryBasedExampleDatabase(os.environ["CUFLASH_FUZZ_DB"])}
             if os.environ.get("CUFLASH_FUZZ_DB") else {})
# tally is function-scoped on purpose: one count for all the examples of a test.
FUZZ_SETTINGS = settings(max_examples=examples(25), deadline=None, derandomize=False,
                         print_blob=True, **_DATABASE,
                         suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture
def tally(request):
    """Counts the examples of one fuzz test and prints the count when it ends (fuzz.sh reads
    that line from the log)."""
    counts = {"examples": 0, "empty": 0}
    start = time.perf_counter()
    yield counts
    ident = request.node.callspec.id
    seconds = time.perf_counter() - start
    request.node.user_properties.append(("examples", counts["examples"]))
    per = seconds / max(1, counts["examples"])
    print(f"\nfuzz {ident}: {counts['examples']} examples ({counts['empty']} with Sq or Sk = 0) "
          f"in {seconds:.1f} s, {per * 1e3:.0f} ms each")


@pytest.mark.parametrize("family, dtype", family_params())
@FUZZ_SETTINGS
@given(data=st.data(), seed=seeds(), deterministic=st.booleans(), return_lse=st.booleans())
def test_fuzz(family, dtype, tally, data, seed, deterministic, return_lse):
    case = fuzz_cases(data, family, dtype)
    note(f"{case.id} seed={seed} deterministic={deterministic} return_lse={return_lse}")
    tally["examples"] += 1
    tally["empty"] += case.seqlen_q == 0 or case.seqlen_k == 0
    with on_family(family) as entries:
        check_forward(case, seed)
        if not return_lse:
            check_without_lse(case, seed)
        check_backward(case, seed, deterministic=deterministic)
    assert_family_ran(family, case, entries)
