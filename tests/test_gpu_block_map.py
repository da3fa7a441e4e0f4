"""GPU: block maps of user mask_mods (`cuflash.block_map`, ``block_map=``). The build kernel's
map equals the NumPy form's int for int, entries and row and key bounds (masks by batch, by
head, with holes; every band; ragged shapes), and attention with a map (reused across calls,
or built per call) matches the float64 reference of the same mask as a bool array, forward and
backward, on every kernel family that reads a map (the Hopper forward and dK/dV, sm80 forced)
and on SIMT, which walks the band whole. Skipped, with the reason printed, where no CUDA GPU is
usable.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.gpu_support import require_gpu, to_numpy

require_gpu()

import cuflash  # noqa: E402
from cuflash import reference  # noqa: E402
from tests.accuracy import (  # noqa: E402
    assert_matches_reference,
    backward_eps,
    naive_attention,
    naive_attention_backward,
)
from tests.strategies import Case, make_dout, make_inputs, to_bshd4  # noqa: E402
from tests.test_block_map import MASKS, mask_array  # noqa: E402
from tests.test_gpu_backward import _namespace, _skip_single_family  # noqa: E402

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True, params=["map_bounds", "no_map_bounds"])
def bounds(request, monkeypatch):
    """Every test with maps that keep their row and key bounds (the Hopper kernels mask those
    rows by them) and with maps that do not (the mask_mod on every partial tile)."""
    from cuflash import _block_map

    monkeypatch.setenv(_block_map.BOUNDS_ENV, "1" if request.param == "map_bounds" else "0")
    return request.param

SHAPES = ((130, 200, True, None), (200, 130, False, None), (300, 257, False, (70, 9)),
          (1, 150, True, None), (64, 64, False, (0, 0)))


@pytest.mark.parametrize("name", sorted(MASKS))
def test_the_device_map_equals_the_numpy_map(name):
    """Int for int (entries, row and key bounds), for every band and ragged shape, CuPy aux
    arrays."""
    import cupy

    for i, (sq, sk, causal, window) in enumerate(SHAPES):
        rng = np.random.default_rng(i)
        mod, aux = MASKS[name](2, 4, sq, sk, rng)
        q = np.zeros((2, sq, 4, 16), np.float32)
        k = np.zeros((2, sk, 2, 16), np.float32)
        want = cuflash.block_map(q, k, mask_mod=mod, aux=aux, causal=causal, window=window)
        got = cuflash.block_map(cupy.asarray(q), cupy.asarray(k), mask_mod=mod,
                                aux={n: cupy.asarray(x) for n, x in aux.items()},
                                causal=causal, window=window)
        assert got.shape == want.shape
        # the entries, then each row's and each key's bounds
        np.testing.assert_array_equal(got.data.get(), want.data,
                                      err_msg=f"{name} {sq}x{sk} causal={causal} {window}")


CELLS = [("documents", "bfloat16", 128), ("documents", "float16", 64),
         ("prefix", "bfloat16", 64), ("heads", "float16", 128), ("holes", "bfloat16", 128),
         ("documents", "float32", 64)]


def check(case: Case, seed: int, name: str, reuse: bool) -> None:
    rng = np.random.default_rng(seed)
    mod, aux_np = MASKS[name](case.batch, case.heads_q, case.seqlen_q, case.seqlen_k, rng)
    xp = _namespace(case.dtype)
    q, k, v = make_inputs(case, xp, seed)
    dout = make_dout(case, xp, seed)
    aux = {n: xp.asarray(x) for n, x in aux_np.items()}
    opts = {"causal": case.causal, "window": case.window, "layout": case.layout,
            "mask_mod": mod, "aux": aux}
    if reuse:
        opts["block_map"] = cuflash.block_map(q, k, **opts)
        cuflash.attention(q, k, v, **opts)  # a call before: the map is read, not consumed
    out, lse = cuflash.attention(q, k, v, return_lse=True, **opts)
    grads = cuflash.attention_backward(dout, q, k, v, out, lse, **opts)

    q4, k4, v4, do4 = (to_bshd4(to_numpy(x), case) for x in (q, k, v, dout))
    built = {"causal": case.causal, "window": case.window,
             "mask": mask_array(mod, aux_np, case.batch, case.heads_q, case.seqlen_q,
                                case.seqlen_k)}
    scale = 1.0 / np.sqrt(case.head_dim)
    ref, ref_lse = reference.attention(q4, k4, v4, return_lse=True, **built)
    naive, naive_lse = naive_attention(q4, k4, v4, dtype=case.dtype, scale=scale, **built)
    label = f"{name} {case.id} reuse={reuse}"
    assert_matches_reference(f"{label} out", to_bshd4(to_numpy(out), case), ref, naive,
                             dtype=case.dtype)
    assert_matches_reference(f"{label} lse", to_numpy(lse), ref_lse, naive_lse,
                             dtype="float32")
    refs = reference.attention_grads(do4, q4, k4, v4, **built)
    naives = naive_attention_backward(do4, q4, k4, v4, dtype=case.dtype, scale=scale, **built)
    eps = backward_eps(do4, q4, k4, v4, dtype=case.dtype, scale=scale, **built)
    for which, got, nv, e in zip(("dq", "dk", "dv"), grads, naives, eps, strict=True):
        assert_matches_reference(f"{label} {which}", to_bshd4(to_numpy(got), case),
                                 refs[which[1:]], nv, dtype=case.dtype, eps=e)


@pytest.mark.parametrize(("name", "dtype", "head_dim"), CELLS)
def test_attention_with_a_block_map_matches_the_reference(name, dtype, head_dim, kernel_path):
    """Multi-tile rows and keys, Sq != Sk both ways, one query row, GQA (the dK/dV kernels
    join the group's heads' maps), every band; a map built once and reused, and one per call."""
    _skip_single_family(dtype, kernel_path)
    for i, (sq, sk, causal, window) in enumerate(SHAPES):
        case = Case(batch=2, seqlen_q=sq, seqlen_k=sk, heads_q=4, heads_kv=2,
                    head_dim=head_dim, dtype=dtype, causal=causal, window=window)
        check(case, 100 * i + head_dim, name, reuse=i % 2 == 0)


def test_a_map_for_other_shapes_is_refused_on_cuda():
    import cupy

    mod, aux = MASKS["documents"](1, 2, 128, 128, np.random.default_rng(0))
    q = cupy.zeros((1, 128, 2, 64), cupy.float16)
    short = cupy.zeros((1, 96, 2, 64), cupy.float16)
    aux = {n: cupy.asarray(x) for n, x in aux.items()}
    bmap = cuflash.block_map(q, q, mask_mod=mod, aux=aux)
    with pytest.raises(ValueError, match="block_map: built for another problem"):
        cuflash.attention(short, q, q, mask_mod=mod, aux=aux, block_map=bmap)
    host = cuflash.block_map(np.zeros((1, 128, 2, 64), np.float16),
                             np.zeros((1, 128, 2, 64), np.float16), mask_mod=mod,
                             aux={n: x.get() for n, x in aux.items()})
    with pytest.raises(ValueError, match="device"):
        cuflash.attention(q, q, q, mask_mod=mod, aux=aux, block_map=host)


def test_torch_autograd_reuses_the_forwards_map():
    """A torch call with a mask_mod and no map builds one for its forward and backward: the
    gradients match the reference of the mask as an array."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    mod, aux_np = MASKS["documents"](2, 4, 300, 300, rng)
    q, k, v, dout = (torch.randn(2, 300, h, 64, device="cuda", dtype=torch.bfloat16)
                     for h in (4, 2, 2, 4))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    aux = {n: torch.as_tensor(x, device="cuda") for n, x in aux_np.items()}
    out = cuflash.attention(q, k, v, causal=True, mask_mod=mod, aux=aux)
    out.backward(dout)
    built = {"causal": True, "mask": mask_array(mod, aux_np, 2, 4, 300, 300)}
    q4, k4, v4, do4 = (to_numpy(x) for x in (q, k, v, dout))
    scale = 1.0 / np.sqrt(64)
    ref = reference.attention(q4, k4, v4, **built)
    naive, _ = naive_attention(q4, k4, v4, dtype="bfloat16", scale=scale, **built)
    assert_matches_reference("torch out", to_numpy(out), ref, naive, dtype="bfloat16")
    refs = reference.attention_grads(do4, q4, k4, v4, **built)
    naives = naive_attention_backward(do4, q4, k4, v4, dtype="bfloat16", scale=scale, **built)
    eps = backward_eps(do4, q4, k4, v4, dtype="bfloat16", scale=scale, **built)
    for name, x, nv, e in zip("qkv", (q, k, v), naives, eps, strict=True):
        assert_matches_reference(f"torch d{name}", to_numpy(x.grad), refs[name], nv,
                                 dtype="bfloat16", eps=e)


def test_repeated_calls_replay_and_read_the_aux_arrays_as_they_are():
    """A call with a score_mod, or with a mask_mod and the caller's map, replays from its
    second call (CuPy); the parameter block holds the aux arrays' addresses, so a replay after
    an in-place change reads the new values, and new arrays or a new map plan anew."""
    import cupy

    from cuflash.cuda import _replay

    rng = np.random.default_rng(11)
    mod, aux_np = MASKS["prefix"](2, 4, 200, 200, rng)
    bias = cuflash.ScoreMod("score + shift(h)", grad="1",
                            numpy=lambda s, b, h, q, kv, shift, **rest: s + shift[h])
    q, k, v = (cupy.asarray(rng.standard_normal((2, 200, 4, 64)), dtype=cupy.float16)
               for _ in range(3))
    shift = cupy.zeros(4, cupy.float32)
    aux = {**{n: cupy.asarray(x) for n, x in aux_np.items()}, "shift": shift}
    bmap = cuflash.block_map(q, k, mask_mod=mod, aux=aux)
    opts = {"mask_mod": mod, "score_mod": bias, "aux": aux, "block_map": bmap}
    _replay.clear()
    first = cuflash.attention(q, k, v, **opts)
    assert _replay.size() == 1
    again = cuflash.attention(q, k, v, **opts)
    assert _replay.size() == 1
    cupy.testing.assert_array_equal(first, again)
    shift[...] = cupy.asarray([0.5, -1.0, 2.0, 0.0], cupy.float32)  # in place: read anew
    moved = cuflash.attention(q, k, v, **opts)
    want = cuflash.reference.attention(q.get(), k.get(), v.get(), mask_mod=mod,
                                       score_mod=bias, aux={**aux_np, "shift": shift.get()})
    assert np.abs(moved.get() - want).max() < 1e-2  # fp16 outputs of values ~N(0, 1)
    assert not np.allclose(moved.get(), first.get())
    other = {**opts, "block_map": cuflash.block_map(q, k, mask_mod=mod, aux=aux)}
    cuflash.attention(q, k, v, **other)
    assert _replay.size() == 2


def test_a_call_with_its_map_is_captured_in_a_cuda_graph():
    """torch: forward and backward with a mask_mod, its aux tensors and its map replay, so
    they can be captured; the graph's replays equal eager calls on new values."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(12)
    mod, aux_np = MASKS["documents"](1, 4, 256, 256, rng)
    q, k, v, dout = (torch.randn(1, 256, 4, 64, device="cuda", dtype=torch.float16)
                     for _ in range(4))
    aux = {n: torch.as_tensor(x, device="cuda") for n, x in aux_np.items()}
    opts = {"causal": True, "mask_mod": mod, "aux": aux,
            "block_map": cuflash.block_map(q, k, mask_mod=mod, aux=aux, causal=True)}

    def step():
        out, lse = cuflash.attention(q, k, v, return_lse=True, **opts)
        return (out, *cuflash.attention_backward(dout, q, k, v, out, lse, **opts))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # plans (and compiles) outside capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for trial in range(2):
        for x in (q, k, v, dout):
            x.copy_(torch.randn_like(x))
        graph.replay()
        eager = step()
        torch.cuda.synchronize()
        assert torch.equal(captured[0], eager[0]), f"trial {trial}: out differs from eager"
        for name, got, want in zip(("dq", "dk", "dv"), captured[1:], eager[1:], strict=True):
            # dq sums by atomics, in no fixed order
            assert torch.allclose(got, want, atol=1e-2, rtol=1e-2), f"trial {trial}: {name}"
