"""GPU: the NaN policy (docs/api.md, "Conventions") on every kernel family, forward and backward.

The cases of tests/test_cpu.py::test_nan_policy_matches_the_reference (a NaN in query rows 1 and
5 of query head 2; in element 3 of key 4 of kv head 1, in k or in v; D = 8, Hq = 4, Hkv = 2;
Sq < Sk and Sq > Sk; no mask and causal), with the same expected NaN positions, here also with a
sliding window, on problems of several tiles (a NaN key in a later tile, NaN rows in several query
tiles), with a second, clean batch, and on each GPU kernel family: Hopper (fp16, bf16; compute
capability 9.0), sm80 (forced) and SIMT (fp32, fp64). Forward: `out` and `lse` have NaN exactly
where the policy (and the float64 reference) has them, rows that see no key are zeros with
lse = -inf, and every other entry matches the reference by the accuracy rule. Two cases beyond
the documented policy, +inf in k and +inf in v, are checked against the reference where it is
defined.

Backward: the policy leaves gradients of NaN inputs unspecified, so only what must hold anyway is
asserted: the gradients of the batch and of the kv head group that hold no NaN are finite and
match the reference, in both dQ modes; with the NaN (or inf) in v, dv (which v does not enter)
matches it everywhere.

A NaN or infinity in v[j] under a causal or window mask is the case the kernels repair
(attention/nonfinite.cuh): their tiled P V multiplies it by the exact 0 of rows that do not see
key j, and the rows where that left a NaN are recomputed from the keys they see. The long shapes
put a poisoned key both where a row sees it and, for other rows of the same tile, where it does
not (keys 4 and 260, 110), so the repair must tell the two apart column by column.

Skipped, with the reason printed, where no CUDA GPU is usable.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from tests.gpu_support import require_gpu, to_numpy, torch_cuda

require_gpu()

import cupy  # noqa: E402

import cuflash  # noqa: E402
from cuflash import reference  # noqa: E402
from tests.accuracy import (  # noqa: E402
    assert_matches_reference,
    backward_eps,
    naive_attention,
    naive_attention_backward,
)
from tests.strategies import Case, _to_xp  # noqa: E402
from tests.test_gpu_fuzz import assert_family_ran, family_params, on_family  # noqa: E402

pytestmark = pytest.mark.gpu

BATCH, HEADS_Q, HEADS_KV = 2, 4, 2  # batch 1 and kv head 0 (q heads 0, 1) stay clean
ELEM = 3  # the poisoned element of a row

# (Sq, Sk, D, the query rows of q head 2 poisoned, the keys of kv head 1 poisoned): the CPU test's
# two small problems, then two of several query and key tiles (64 to 192 rows, 16 to 128 keys
# per tile, by kernel) where a NaN key sits in a later key tile and NaN rows in several query
# tiles, some of which see no key when causal.
SHAPES = {
    "Sq<Sk": (6, 9, 8, (1, 5), (4,)),
    "Sq>Sk": (9, 6, 8, (1, 5), (4,)),
    "long-Sq<Sk": (150, 300, 64, (1, 5, 147), (4, 260)),
    "long-Sq>Sk": (300, 150, 64, (1, 5, 140, 297), (4, 110)),
}
WHERE = ("nan_q", "nan_k", "nan_v", "inf_k", "inf_v")


def mask_options(mask: str, sq: int) -> dict:
    if mask == "window":  # cut on both sides; some rows see no key when Sq > Sk
        return {"causal": False, "window": (2, 1) if sq < 50 else (60, 20)}
    return {"causal": mask == "causal", "window": None}


@dataclass
class PolicyCase:
    """Inputs (float64, canonical (B, S, H, D)) and what the policy expects of the forward."""

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    sees: np.ndarray  # (Sq, Sk): the oracle's mask
    nan_out: np.ndarray | None  # where out is NaN (None: not given by the policy)
    nan_lse: np.ndarray | None
    inf_out: np.ndarray  # where out is +inf (the inf_v case)


def policy_case(where: str, shape: str, mask: dict, seed: int = 7) -> PolicyCase:
    """test_cpu.py's construction: random inputs, the non-finite value planted, and the NaN
    positions the policy gives (NaN in q row i: out and lse of row i if it sees a key; in key j of
    k: out and lse of the rows that see j, in the query heads reading that kv head; in v[j, d]:
    out[..., d] of those rows)."""
    sq, sk, d, rows, keys = SHAPES[shape]
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((BATCH, sq, HEADS_Q, d))
    k, v = (rng.standard_normal((BATCH, sk, HEADS_KV, d)) for _ in range(2))
    seen = reference.visible(sq, sk, **mask)
    sees = np.ones((sq, sk), dtype=bool) if seen is None else seen
    nan_out = np.zeros(q.shape, dtype=bool)
    nan_lse = np.zeros((BATCH, HEADS_Q, sq), dtype=bool)
    inf_out = np.zeros(q.shape, dtype=bool)
    bad = np.nan if where.startswith("nan") else np.inf
    if where.endswith("q"):
        q[0, list(rows), 2, ELEM] = bad
        seeing = [i for i in rows if sees[i].any()]
        nan_out[0, seeing, 2, :] = True
        nan_lse[0, 2, seeing] = True
    else:
        (k if where.endswith("k") else v)[0, list(keys), 1, ELEM] = bad
        seeing = sees[:, list(keys)].any(axis=1)
        if where == "nan_k":
            nan_out[0, seeing, 2:, :] = True
            nan_lse[0, 2:, seeing] = True
        elif where == "nan_v":
            nan_out[0, seeing, 2:, ELEM] = True
        elif where == "inf_v":  # p > 0 times inf (the inputs keep every weight well above 0)
            inf_out[0, seeing, 2:, ELEM] = True
    if where.startswith("inf"):
        nan_out = nan_lse = None
    return PolicyCase(q, k, v, sees, nan_out, nan_lse, inf_out)


def _device(x64: np.ndarray, dtype: str):
    xp = torch_cuda() if dtype == "bfloat16" else cupy
    return _to_xp(x64, xp, dtype)


def _clean(x: np.ndarray) -> np.ndarray:
    return np.where(np.isfinite(x), x, 0.0)


def _nan_mismatch(name: str, got: np.ndarray, want: np.ndarray, defined: np.ndarray) -> str:
    """'' when isnan(got) == want wherever `defined`, else where they differ (first few)."""
    bad = (np.isnan(got) != want) & defined
    if not bad.any():
        return ""
    first = [tuple(int(i) for i in at) for at in np.argwhere(bad)[:6]]
    nan_extra = int((bad & np.isnan(got)).sum())
    return (f"{name}: {int(bad.sum())} entries differ from the expected NaN pattern "
            f"({nan_extra} NaN where finite is expected, {int(bad.sum()) - nan_extra} finite "
            f"where NaN is expected); first at {first}")


def _forward(case: PolicyCase, dtype: str, mask: dict):
    q, k, v = (_device(x, dtype) for x in (case.q, case.k, case.v))
    out, lse = cuflash.attention(q, k, v, **mask, return_lse=True)
    return (q, k, v), out, lse


@pytest.mark.parametrize("mask_name", ["none", "causal", "window"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("family, dtype", family_params())
def test_nan_policy_on_the_gpu(family, dtype, where, shape, mask_name):
    mask = mask_options(mask_name, SHAPES[shape][0])
    case = policy_case(where, shape, mask)
    failures: list[str] = []  # every check runs; the test fails at the end with all of them

    def check(what, *args, **kwargs):
        try:
            what(*args, **kwargs)
        except AssertionError as err:
            failures.append(str(err).strip())

    with on_family(family) as entries:
        (q, k, v), out, lse = _forward(case, dtype, mask)
        q64, k64, v64 = (to_numpy(x) for x in (q, k, v))  # the values rounded to dtype
        got, got_lse = to_numpy(out), to_numpy(lse)
        ref, ref_lse = reference.attention(q64, k64, v64, **mask, return_lse=True)
        defined = np.ones(ref.shape, dtype=bool)  # where out's NaN pattern is compared
        if case.nan_out is not None:  # the reference keeps the policy (as on the CPU)
            np.testing.assert_array_equal(np.isnan(ref), case.nan_out, "reference out NaN")
            np.testing.assert_array_equal(np.isnan(ref_lse), case.nan_lse, "reference lse NaN")
            want, want_lse = case.nan_out, case.nan_lse
        elif where == "inf_k":  # NaN in the rows where the key's score is +inf (not -inf)
            want, want_lse = np.isnan(ref), np.isnan(ref_lse)
        else:  # inf_v: +inf in the rows that see the key. In the others the reference has
            # p * inf = 0 * inf = NaN, the kernels the same but only in the tiles they visit:
            # no policy covers it, nothing is compared there.
            defined = ~np.isnan(ref)
            want, want_lse = np.zeros(ref.shape, dtype=bool), np.isnan(ref_lse)
        everywhere = np.ones(ref_lse.shape, dtype=bool)
        failures += [f for f in (_nan_mismatch("out", got, want, defined),
                                 _nan_mismatch("lse", got_lse, want_lse, everywhere)) if f]
        check(np.testing.assert_array_equal, np.isposinf(got)[defined], case.inf_out[defined],
              "out: +inf where the reference has +inf")

        blind = ~case.sees.any(axis=1)  # rows that see no key: zeros and lse = -inf
        nonzero = (got[:, blind] != 0) & defined[:, blind]
        if nonzero.any():
            nans = int(np.isnan(got[:, blind][nonzero]).sum())
            failures.append(f"out: {int(nonzero.sum())} entries of rows that see no key are NaN"
                            if nans == int(nonzero.sum()) else
                            f"out: {int(nonzero.sum())} entries of rows that see no key are not "
                            f"0 (NaN: {nans})")
        if not np.all(np.isneginf(got_lse[:, :, blind])):
            failures.append("lse: a row that sees no key has lse != -inf")

        # Everything else as without the NaN: by the accuracy rule (entries already reported
        # for their NaN left out). For NaN the naive result comes from the inputs with the NaN
        # replaced by 0 (equal wherever the NaN does not reach, and free of the naive's own
        # 0 * NaN); for inf from the inputs themselves.
        scale = 1.0 / np.sqrt(q64.shape[-1])
        naive_in = [_clean(x) for x in (q64, k64, v64)] if where.startswith("nan") else \
            [q64, k64, v64]
        naive, naive_lse = naive_attention(*naive_in, dtype=dtype, **mask, scale=scale)
        skip = want | ~defined | np.isnan(got)
        skip_lse = want_lse | np.isnan(got_lse)
        for name, g, r, n, s, dt in (("out", got, ref, naive, skip, dtype),
                                     ("lse", got_lse, ref_lse, naive_lse, skip_lse, "float32")):
            g, r, n = (np.where(s, 0.0, x) for x in (g, r, n))
            check(assert_matches_reference, name, g, r, n, dtype=dt)

        # -- backward: the clean batch and kv head group, and dv when v holds the value --
        rng = np.random.default_rng(11)
        dout = _device(rng.standard_normal(case.q.shape), dtype)
        do64 = to_numpy(dout)
        clean = [_clean(x) for x in (q64, k64, v64)]
        refs = reference.attention_backward(do64, *clean, **mask)
        naives = naive_attention_backward(do64, *clean, dtype=dtype, **mask, scale=scale)
        eps = backward_eps(do64, *clean, dtype=dtype, **mask, scale=scale)
        for deterministic in (False, True):
            grads = [to_numpy(g) for g in cuflash.attention_backward(
                dout, q, k, v, out, lse, **mask, deterministic=deterministic)]
            for name, g, r, n, e in zip(("dq", "dk", "dv"), grads, refs, naives, eps,
                                        strict=True):
                parts = {"batch 1": np.s_[1:], "batch 0 clean heads":
                         np.s_[:1, :, :2] if name == "dq" else np.s_[:1, :, :1]}
                if name == "dv" and where.endswith("v"):
                    parts = {"all of it": np.s_[:]}
                for part, sl in parts.items():
                    check(assert_matches_reference,
                          f"deterministic={deterministic} {name} ({part})", g[sl], r[sl], n[sl],
                          dtype=dtype, eps=e)
    assert_family_ran(family, _as_case(case, dtype, mask), entries)
    assert not failures, f"{family} {dtype} {where} {shape} {mask_name}:\n  " + "\n  ".join(
        failures)


def _as_case(case: PolicyCase, dtype: str, mask: dict) -> Case:
    """The strategies.Case of a policy case (for assert_family_ran)."""
    b, sq, hq, d = case.q.shape
    return Case(batch=b, seqlen_q=sq, seqlen_k=case.k.shape[1], heads_q=hq,
                heads_kv=case.k.shape[2], head_dim=d, dtype=dtype, **mask)
