"""PyTorch integration: cuflash attention as ``torch.library`` custom ops with autograd.

Two ops, registered under the ``cuflash`` namespace, work on CPU and CUDA tensors (the core picks
the path; CUDA kernels run on torch's current stream):

- ``torch.ops.cuflash.attention_fwd(q, k, v, causal, scale, layout, window_left=-1,
  window_right=-1, softcap=0.0, alibi_slopes=None, sinks=None, bias=None, mask=None) ->
  (out, lse)``
- ``torch.ops.cuflash.attention_bwd(dout, q, k, v, out, lse, causal, scale, layout,
  deterministic, window_left=-1, window_right=-1, softcap=0.0, alibi_slopes=None,
  sinks=None, bias=None, mask=None) -> (dq, dk, dv, dsinks, dbias)`` (dsinks and dbias empty
  without sinks and bias)

Each runs the framework-agnostic core (the public :func:`cuflash.attention` /
:func:`cuflash.attention_backward` on detached tensors), has a fake (meta) implementation for
tracing, and the forward's autograd formula calls the backward op, so gradients come from
cuflash's own backward. ``lse`` is not differentiable (as in flash-attn).

Eager autograd does not go through the ops: :func:`attention` applies a plain
``torch.autograd.Function`` that calls the same core, because the dispatcher's custom-op
machinery costs several times the whole host path of a small call. The ops are what
torch.compile traces.

torch.compile (``fullgraph=True``, static and dynamic shapes):

- :func:`attention` here compiles to the op without graph breaks, with or without grad. The
  forward and the backward (traced by AOTAutograd) are single opaque graph nodes, and both can
  be captured in CUDA graphs (``mode="reduce-overhead"``).
- :func:`cuflash.attention` compiles too: under tracing it validates (plain Python on shapes and
  dtypes, folded to constants and guards) and routes to the same op, with or without grad.
  ``out=`` is not supported under torch.compile.
"""

from __future__ import annotations

import torch

from cuflash import _checks, _variant, api

__all__ = ["attention", "attention_bwd", "attention_fwd"]

Tensor = torch.Tensor


def attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False,
              window: tuple[int, int] | None = None, scale: float | None = None,
              softcap: float = 0.0, alibi_slopes: Tensor | None = None,
              sinks: Tensor | None = None, bias: Tensor | None = None,
              mask: Tensor | None = None, layout: str = "bshd", return_lse: bool = False):
    """Exact attention on torch tensors, differentiable with respect to q, k and v.

    Args:
        q: queries, ``(B, Sq, Hq, D)`` for layout ``"bshd"`` or ``(B, Hq, Sq, D)`` for ``"bhsd"``;
            a 3-D tensor (no batch axis) is accepted in either layout. CPU or CUDA, any strides.
        k: keys, ``(B, Sk, Hkv, D)`` (``"bhsd"``: ``(B, Hkv, Sk, D)``), same device and dtype as
            q, ``Hq % Hkv == 0``.
        v: values, shaped like `k`.
        causal: bottom-right aligned causal mask (query i sees key j iff ``j <= i + Sk - Sq``).
        window: sliding window ``(left, right)``, -1 unbounded, as for :func:`cuflash.attention`.
        scale: softmax scale, a number > 0; defaults to ``1 / sqrt(D)``.
        softcap: ``> 0``: scores become ``softcap * tanh(s / softcap)`` after scaling, as for
            :func:`cuflash.attention` (CPU tensors only for now).
        alibi_slopes: ALiBi slopes ``(Hq,)`` or ``(B, Hq)``, float32 or float64, as for
            :func:`cuflash.attention` (CPU tensors only for now; no gradient).
        sinks: attention sinks ``(Hq,)``, float32 or float64, as for :func:`cuflash.attention`
            (CPU tensors only for now); a tensor that requires grad gets its gradient.
        bias: an additive tensor broadcastable to ``(B, Hq, Sq, Sk)``, as for
            :func:`cuflash.attention` (CPU tensors only for now); one that requires grad gets
            its gradient, summed over the axes it was broadcast along.
        mask: a bool tensor broadcastable like `bias`, True = attend (CPU tensors only for now).
        layout: ``"bshd"`` or ``"bhsd"``.
        return_lse: also return the float32 log-sum-exp ``(B, Hq, Sq)`` (``(Hq, Sq)`` for 3-D);
            it carries no gradient.

    Returns:
        ``out`` shaped like q (same device and dtype), or ``(out, lse)``.

    This is what :func:`cuflash.attention` runs for tensors that require grad. Unlike it, this
    function is always the ``cuflash::attention_fwd`` op, so it is the one to call from code
    compiled with ``torch.compile`` that may run without grad (see the module docstring).
    Backward uses ``deterministic=True`` when ``torch.are_deterministic_algorithms_enabled()``.

    See also: `cuflash.attention`, `cuflash.attention_backward`.
    """
    _checks.check_flag("causal", causal)
    _checks.check_flag("return_lse", return_lse)
    left, right = _variant.check_window(window)
    cap = _variant.check_softcap(softcap)
    if torch.compiler.is_compiling():
        out, lse = attention_fwd(q, k, v, causal, scale, layout, left, right, cap, alibi_slopes,
                                 sinks, bias, mask)
    else:
        out, lse = _Attention.apply(q, k, v, causal, scale, layout, (left, right), cap,
                                    alibi_slopes, sinks, bias, mask)
    return (out, lse) if return_lse else out


class _Attention(torch.autograd.Function):
    """The eager autograd node: what the custom op's autograd does, without the dispatcher's
    per-call cost (several hundred microseconds for a forward and backward). torch.compile
    traces the op instead."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale, layout, window, softcap, alibi_slopes, sinks, bias,
                mask):
        # Grad mode is off in here, so the core takes its plain (replayable) path.
        mods = {"softcap": softcap, "alibi_slopes": alibi_slopes, "sinks": sinks, "bias": bias,
                "mask": mask}
        out, lse = api.attention(q, k, v, causal=causal, window=window, scale=scale,
                                 layout=layout, return_lse=True, **mods)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mark_non_differentiable(lse)
        ctx.options = (causal, window, scale, layout, mods)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        causal, window, scale, layout, mods = ctx.options
        if dout.stride(-1) != 1:
            dout = dout.contiguous()  # an expanded gradient (of a sum): one copy, then replayable
        want_dsinks, want_dbias = (bool(ctx.needs_input_grad[i]) for i in (9, 10))
        grads = list(api.attention_backward(
            dout, q, k, v, out, lse, causal=causal, window=window, scale=scale, layout=layout,
            deterministic=torch.are_deterministic_algorithms_enabled(),
            return_dsinks=want_dsinks, return_dbias=want_dbias, **mods))
        dbias = grads.pop() if want_dbias else None
        dsinks = grads.pop() if want_dsinks else None
        return (*grads, None, None, None, None, None, None, dsinks, dbias, None)


@torch.library.custom_op("cuflash::attention_fwd", mutates_args=())
def attention_fwd(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float | None,
                  layout: str, window_left: int = -1, window_right: int = -1,
                  softcap: float = 0.0, alibi_slopes: Tensor | None = None,
                  sinks: Tensor | None = None, bias: Tensor | None = None,
                  mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The forward op: ``(out, lse)`` as :func:`cuflash.attention` with ``return_lse=True``."""
    # Detached, so the core takes its plain path instead of routing back here for autograd.
    return api.attention(q.detach(), k.detach(), v.detach(), causal=causal,
                         window=(window_left, window_right), scale=scale, softcap=softcap,
                         alibi_slopes=alibi_slopes, sinks=_detached(sinks),
                         bias=_detached(bias), mask=mask, layout=layout, return_lse=True)


def _detached(x: Tensor | None) -> Tensor | None:
    return None if x is None else x.detach()


@attention_fwd.register_fake
def _attention_fwd_fake(q, k, v, causal, scale, layout, window_left=-1, window_right=-1,
                        softcap=0.0, alibi_slopes=None, sinks=None, bias=None, mask=None):
    # The core allocates both results contiguous: out like q, lse (B, Hq, Sq) float32.
    if layout == "bhsd":
        lse_shape = q.shape[:-1]
    else:
        lse_shape = (*q.shape[:-3], q.shape[-2], q.shape[-3])
    return q.new_empty(q.shape), q.new_empty(lse_shape, dtype=torch.float32)


@torch.library.custom_op("cuflash::attention_bwd", mutates_args=())
def attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                  causal: bool, scale: float | None, layout: str, deterministic: bool,
                  window_left: int = -1, window_right: int = -1, softcap: float = 0.0,
                  alibi_slopes: Tensor | None = None, sinks: Tensor | None = None,
                  bias: Tensor | None = None,
                  mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The backward op: ``(dq, dk, dv, dsinks, dbias)`` as :func:`cuflash.attention_backward`
    (``dsinks``, ``dbias`` empty without sinks, bias)."""
    tensors = (x.detach() for x in (dout, q, k, v, out, lse))
    grads = list(api.attention_backward(
        *tensors, causal=causal, window=(window_left, window_right), scale=scale,
        softcap=softcap, alibi_slopes=alibi_slopes, sinks=_detached(sinks), bias=_detached(bias),
        mask=mask, layout=layout, deterministic=deterministic, return_dsinks=sinks is not None,
        return_dbias=bias is not None))
    def empty():  # one each: results may not alias one another
        return q.new_empty((0,), dtype=torch.float32)

    dbias = grads.pop() if bias is not None else empty()
    dsinks = grads.pop() if sinks is not None else empty()
    return (*grads, dsinks, dbias)


@attention_bwd.register_fake
def _attention_bwd_fake(dout, q, k, v, out, lse, causal, scale, layout, deterministic,
                        window_left=-1, window_right=-1, softcap=0.0, alibi_slopes=None,
                        sinks=None, bias=None, mask=None):
    def like(x):
        return q.new_empty((0,), dtype=torch.float32) if x is None else x.new_empty(x.shape)

    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), like(sinks),
            like(bias))


def _setup_context(ctx, inputs, output) -> None:
    # trailing: window_left, window_right, softcap, alibi_slopes, sinks, bias, mask
    q, k, v, causal, scale, layout, *trailing = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.mark_non_differentiable(lse)
    ctx.options = (causal, scale, layout, *trailing)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse = ctx.saved_tensors
    causal, scale, layout, *trailing = ctx.options
    dq, dk, dv, dsinks, dbias = attention_bwd(dout, q, k, v, out, lse, causal, scale, layout,
                                              torch.are_deterministic_algorithms_enabled(),
                                              *trailing)
    # A gradient for the sinks and the bias where given (trailing 4 and 5), none for options.
    grads = [None] * len(ctx.options)
    for at, grad in ((3 + 4, dsinks), (3 + 5, dbias)):
        if at < len(ctx.options) and ctx.options[at] is not None:
            grads[at] = grad
    return (dq, dk, dv, *grads)


attention_fwd.register_autograd(_backward, setup_context=_setup_context)
