"""Your own score and mask modifications, written in CUDA C++ and compiled with the kernels.

A `ScoreMod` rewrites each (scaled) score; a `MaskMod` hides keys. Each carries its CUDA form,
compiled by NVRTC into every kernel that runs it, and a NumPy form for the CPU path and the
float64 reference. `cuflash.attention(..., score_mod=, mask_mod=, aux=)` takes them; ``aux``
names read-only arrays that both forms see under those names.

On CUDA a call's modifications become one score kind (`UserKind`): a C++ type whose name carries
a hash of the generated source, so that the kernel's name expression, the compile cache's key
and the log line name exactly that code. Its arrays travel in the parameter block (their
pointers and strides), never in the template.
"""

from __future__ import annotations

import hashlib
import keyword
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from cuflash.cuda._launch_common import MAX_AUX, MAX_AUX_DIMS

# The names the user's code sees besides its aux arrays.
SCORE_ARGS = ("score", "b", "h", "q_idx", "kv_idx")
GRAD_ARGS = ("out", "b", "h", "q_idx", "kv_idx")
MASK_ARGS = ("b", "h", "q_idx", "kv_idx")
# Aux dtypes and their C++ storage types (score.cuh's Aux reads 16-bit floats as float and bool
# as bool).
AUX_TYPES = {"float16": "cuflash::f16", "bfloat16": "cuflash::bf16", "float32": "float",
             "float64": "double", "int32": "int", "int64": "long long", "bool": "unsigned char"}
_IDENTIFIER = re.compile(r"[A-Za-z][A-Za-z0-9_]*\Z")
# Names an aux array may not take: the code's own arguments, the generated members (cf_...),
# and C++ words the generated code or the user's expressions need.
_RESERVED = frozenset({*SCORE_ARGS, *GRAD_ARGS, "cuflash", "A", "T", "Score", "Aux", "this",
                       "auto", "bool", "char", "const", "double", "float", "int", "long",
                       "return", "short", "signed", "unsigned", "void", "true", "false",
                       "if", "else", "for", "while", "do", "switch", "case", "static_cast",
                       "sizeof", "min", "max", "abs", "fabs", "fabsf", "exp", "expf", "log",
                       "logf", "tanh", "tanhf", "sqrt", "sqrtf", "pow", "powf"})


def is_one(grad: str | None) -> bool:
    """Whether a derivative's source is the constant 1 (an added term)."""
    return grad is not None and grad.strip() in ("1", "1.0", "1.f", "1.0f")


def _source(text: object, name: str) -> str:
    if not isinstance(text, str) or not text.strip():
        raise TypeError(f"{name}: expected C++ source text (an expression, or a function body "
                        f"with return), got {text!r}")
    if "#" in text:
        raise ValueError(f"{name}: preprocessor lines are not allowed in a modification's "
                         f"source, got {text!r}")
    return text.strip()


def _callable(fn: object, name: str) -> Callable | None:
    if fn is not None and not callable(fn):
        raise TypeError(f"{name}: expected a callable or None, got {type(fn).__name__}")
    return fn


@dataclass(frozen=True)
class ScoreMod:
    """A modification of each score, FlexAttention's ``score_mod`` in CUDA C++.

    Args:
        cuda: a C++ expression, or a function body that returns a value, of ``score`` (the
            scaled score q·k * scale, in float, or double for float64 inputs), ``b``, ``h``
            (batch and query head), ``q_idx``, ``kv_idx`` (query row and key, ints) and the
            call's aux arrays, each callable with one index per axis: ``rel(h, q_idx -
            kv_idx + 512)``. Example: ``"score + slopes(h) * (kv_idx - q_idx)"``.
        grad: the derivative d(score_mod)/d(score) for the backward, as C++ of ``out`` (the
            modified score: the kernels keep only it), ``b``, ``h``, ``q_idx``, ``kv_idx`` and
            the aux arrays; ``"1"`` for a modification that adds a term. Without it the
            backward raises. Example, a softcap of 30: ``cuda="30.f * tanhf(score / 30.f)"``,
            ``grad="1.f - (out / 30.f) * (out / 30.f)"``.
        numpy: the same modification for the CPU path and `cuflash.reference`, a function
            ``f(score, b, h, q_idx, kv_idx, **aux)`` of broadcasting NumPy arrays.
        numpy_grad: ``f(out, b, h, q_idx, kv_idx, **aux)``, the derivative in NumPy (needed
            for a CPU backward unless `grad` is ``"1"``).
    """

    cuda: str
    grad: str | None = None
    numpy: Callable | None = field(default=None, compare=False)
    numpy_grad: Callable | None = field(default=None, compare=False)

    def __post_init__(self):
        _source(self.cuda, "score_mod")
        if self.grad is not None:
            _source(self.grad, "score_mod.grad")
        _callable(self.numpy, "score_mod.numpy")
        _callable(self.numpy_grad, "score_mod.numpy_grad")
        _enrol(self)

    @property
    def additive(self) -> bool:
        """Whether the derivative is 1 (the modification adds a term)."""
        return is_one(self.grad)


@dataclass(frozen=True)
class MaskMod:
    """Which keys each query sees, FlexAttention's ``mask_mod`` in CUDA C++.

    Args:
        cuda: a C++ boolean expression (or a body that returns one) of ``b``, ``h``, ``q_idx``,
            ``kv_idx`` and the aux arrays: True = attend. Example, documents packed into one
            sequence: ``"doc(q_idx) == doc(kv_idx)"``. It applies beside ``causal`` and
            ``window``; a row that sees no key gets zeros and ``lse = -inf``.
        numpy: the same for the CPU path and `cuflash.reference`: ``f(b, h, q_idx, kv_idx,
            **aux)`` returning a broadcasting boolean array.
    """

    cuda: str
    numpy: Callable | None = field(default=None, compare=False)

    def __post_init__(self):
        _source(self.cuda, "mask_mod")
        _callable(self.numpy, "mask_mod.numpy")
        _enrol(self)


@dataclass(frozen=True)
class UserKind:
    """The compile-time score kind of a call's user modifications: their CUDA sources, each
    aux array's (name, dtype, number of axes), and `arrays`: whether the call also has ALiBi, a
    bias or a mask array, which the kind then applies as score.cuh's Mods does (the terms added
    before the score_mod, the mask array hiding beside the mask_mod). Its `cpp` names the
    generated C++ type."""

    score: str | None
    grad: str | None
    mask: str | None
    aux: tuple[tuple[str, str, int], ...]
    arrays: bool = False

    @property
    def hides(self) -> bool:
        """Whether the kind has a mask_mod (and so a block map)."""
        return self.mask is not None

    @property
    def additive(self) -> bool:
        """Whether the backward may form P at once: no score_mod, or one whose grad is 1."""
        return self.score is None or is_one(self.grad)

    @property
    def cpp(self) -> str:
        digest = hashlib.sha256(repr(self).encode()).hexdigest()[:16]
        return f"cuflash::user::Kind_{digest}"

    def __str__(self) -> str:
        return self.cpp

    def source(self) -> str:
        """The C++ of this kind: its type and its `Score` specialisation (score.cuh's
        interface), compiled after a kernel's source. The user's lines are numbered as
        ``score_mod``, ``score_mod.grad`` and ``mask_mod`` in compile errors."""
        kind = self.cpp.rsplit("::", 1)[1]
        members = "".join(f"  cuflash::Aux<{AUX_TYPES[dtype]}, {ndim}> {name};\n"
                          for name, dtype, ndim in self.aux)
        inits = "".join(f", {name}(p, {slot})" for slot, (name, _, _) in enumerate(self.aux))
        if self.arrays:
            members = "  cuflash::Score<cuflash::Mods, T, A> cf_arrays;  // ALiBi, bias, mask\n" \
                + members
            inits = ", cf_arrays(p)" + inits
        flag = {True: "true", False: "false"}
        score = self.score or "score"
        grad = self.grad or "1"
        keep = self.mask or "true"
        mod_hides = "!cf_whole && cf_inside(row, col) && !cf_keep(cf_b, cf_h, row, col)" \
            if self.hides else "false"
        array_hides = "cf_arrays.hides(row, col)" if self.arrays else "false"
        added = "cf_arrays.add(s, row, col)" if self.arrays else "s"
        # a mask_mod alone leaves the score as it is (no round trip through the scale)
        modified = added if self.score is None else \
            f"static_cast<A>(cf_score({added} * cf_scale, cf_b, cf_h, row, col)) * cf_unscale"
        bind_arrays = "    bound.cf_arrays = cf_arrays.for_head(p, batch, head);\n" \
            if self.arrays else ""
        record = "cf_arrays.record(ds, row, col);" if self.arrays else ""
        return f"""
namespace cuflash {{
namespace user {{
struct {kind} {{
  static constexpr bool kModifies = true, kPositional = true,
                        kHides = {flag[self.hides or self.arrays]},
                        kAdditive = {flag[self.additive]}, kBlockMap = {flag[self.hides]};
}};
}}  // namespace user

template <typename T, typename A> struct Score<user::{kind}, T, A> {{
  A cf_scale, cf_unscale;
  int cf_seqlen_q, cf_seqlen_k, cf_b, cf_h;
  cuflash::BlockMap cf_map;  // the mask_mod's block map (block_map.cuh)
  bool cf_whole;  // on a tile the block map shows whole: the mask_mod is not evaluated
{members}  template <typename Params>
  __device__ __forceinline__ explicit Score(const Params& p)
      : cf_scale(static_cast<A>(p.scale)), cf_unscale(static_cast<A>(1.0 / p.scale)),
        cf_seqlen_q(p.seqlen_q), cf_seqlen_k(p.seqlen_k), cf_b(0), cf_h(0), cf_map(p),
        cf_whole(false){inits} {{}}
  template <typename Params>
  __device__ __forceinline__ Score for_head(const Params& p, int batch, int head) const {{
    Score bound = *this;
    bound.cf_b = batch;
    bound.cf_h = head;
    bound.cf_map = cf_map.for_head(p, batch, head);
{bind_arrays}    return bound;
  }}
  // The block map's view (kBlockMap): key tiles of `tiles` rows [row_begin, row_end) may see,
  // and this Score on one tile (the dK/dV kernels' query ranges: score.cuh's narrow_by_map).
  template <int kBlock>
  __device__ __forceinline__ cuflash::Span key_tiles(cuflash::Span tiles, int row_begin,
                                                     int row_end) const {{
    return cf_map.template key_tiles<kBlock>(tiles, row_begin, row_end);
  }}
  __device__ __forceinline__ Score on_tile(int row_begin, int row_end, int col_begin,
                                           int col_end) const {{
    Score bound = *this;
    bound.cf_whole = cf_map.full(row_begin, row_end, col_begin, col_end);
    return bound;
  }}
  __device__ __forceinline__ bool whole(int row_begin, int row_end, int col_begin,
                                        int col_end) const {{
    return cf_map.full(row_begin, row_end, col_begin, col_end);
  }}
  // whole() for rows inside one of the map's blocks
  __device__ __forceinline__ bool whole_in_block(int row_begin, int col_begin,
                                                 int col_end) const {{
    return cf_map.full_in_block(row_begin, col_begin, col_end);
  }}
  // the keys [x, y) query `row` sees when they are one interval; x < 0 where they are not
  __device__ __forceinline__ int2 row_bounds(int row) const {{ return cf_map.row_bounds(row); }}
  // the queries [x, y) that see key `col`, as row_bounds
  __device__ __forceinline__ int2 col_bounds(int col) const {{ return cf_map.col_bounds(col); }}
  // the score modified (added terms, then the score_mod), not hidden
  __device__ __forceinline__ A cf_modify(A s, int row, int col) const {{
    return {modified};
  }}
  // operator() on a tile the map shows whole: no mask_mod (the mask array still hides)
  __device__ __forceinline__ A unmasked(A s, int row, int col) const {{
    if (!cf_inside(row, col)) return s;
    A hidden;
    minus_infinity(hidden);
    return {array_hides} ? hidden : cf_modify(s, row, col);
  }}
  __device__ __forceinline__ A cf_score(A score, int b, int h, int q_idx, int kv_idx) const {{
{_body(score, "score_mod")}
  }}
  __device__ __forceinline__ A cf_grad(A out, int b, int h, int q_idx, int kv_idx) const {{
{_body(grad, "score_mod.grad")}
  }}
  __device__ __forceinline__ bool cf_keep(int b, int h, int q_idx, int kv_idx) const {{
{_body(keep, "mask_mod")}
  }}
  __device__ __forceinline__ bool cf_inside(int row, int col) const {{
    return row < cf_seqlen_q && col < cf_seqlen_k;
  }}
  // What the mask_mod alone hides: what a block map is built from (never the mask array,
  // so that a map serves calls with other arrays).
  __device__ __forceinline__ bool mask_mod_hides(int row, int col) const {{
    return {mod_hides};
  }}
  __device__ __forceinline__ bool hides(int row, int col) const {{
    return {array_hides} || mask_mod_hides(row, col);
  }}
  __device__ __forceinline__ A operator()(A s, int row, int col) const {{
    if (!cf_inside(row, col)) return s;
    A hidden;
    minus_infinity(hidden);
    if (hides(row, col)) return hidden;
    return cf_modify(s, row, col);
  }}
  __device__ __forceinline__ A slope(A modified, int row, int col) const {{
    A hidden;
    minus_infinity(hidden);
    if (!cf_inside(row, col) || modified == hidden) return A(0);  // P is 0 there
    return static_cast<A>(cf_grad(modified * cf_scale, cf_b, cf_h, row, col));
  }}
  // the backward's dS (after the score_mod's slope): the bias's gradient
  __device__ __forceinline__ void record(A ds, int row, int col) const {{ {record} }}
}};
}}  // namespace cuflash
"""


def _body(text: str, name: str) -> str:
    """The user's code as a member function's body: an expression is returned; a body with a
    return statement stands as written. ``#line`` makes compile errors name `name`'s lines."""
    code = text if re.search(r"\breturn\b", text) else f"return ({text});"
    return f'#line 1 "{name}"\n{code}\n#line 1 "cuflash-generated"'


def reads_index(source: str, name: str) -> bool:
    """Whether C++ `source` may depend on the index `name` (``b`` or ``h``): it names it, or
    reaches into the generated members (``cf_...``)."""
    return re.search(rf"\b{name}\b", source) is not None or "cf_" in source


def kind_of(score_mod: ScoreMod | None, mask_mod: MaskMod | None,
            aux: tuple[tuple[str, str, int], ...], *, arrays: bool = False) -> UserKind | None:
    """The score kind of a call's modifications (None without any); `arrays`: the call also
    has ALiBi, a bias or a mask array."""
    if score_mod is None and mask_mod is None:
        return None
    return UserKind(None if score_mod is None else score_mod.cuda,
                    None if score_mod is None else score_mod.grad,
                    None if mask_mod is None else mask_mod.cuda, aux, bool(arrays))


def check_mods(score_mod: object, mask_mod: object, aux: object):
    """Validate `score_mod`, `mask_mod` and `aux`; returns ``(score_mod, mask_mod, aux
    items)`` with aux as a tuple of (name, array) in the caller's order. Raises naming the
    argument."""
    if score_mod is not None and not isinstance(score_mod, ScoreMod):
        raise TypeError(f"score_mod: expected a cuflash.ScoreMod or None, got "
                        f"{type(score_mod).__name__}")
    if mask_mod is not None and not isinstance(mask_mod, MaskMod):
        raise TypeError(f"mask_mod: expected a cuflash.MaskMod or None, got "
                        f"{type(mask_mod).__name__}")
    if aux is None:
        return score_mod, mask_mod, ()
    if not isinstance(aux, dict):
        raise TypeError(f"aux: expected a dict of name -> array, got {type(aux).__name__}")
    if score_mod is None and mask_mod is None and aux:
        raise ValueError("aux: arrays given without a score_mod or mask_mod to read them")
    if len(aux) > MAX_AUX:
        raise ValueError(f"aux: at most {MAX_AUX} arrays, got {len(aux)}")
    for name, x in aux.items():
        if (not isinstance(name, str) or not _IDENTIFIER.match(name) or keyword.iskeyword(name)
                or name in _RESERVED or name.startswith("cf_")):
            raise ValueError(f"aux: names must be identifiers (a letter, then letters, digits "
                             f"or _), not starting with cf_ and not one of the code's own "
                             f"names ({', '.join((*SCORE_ARGS, 'out'))}), got {name!r}")
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"aux[{name!r}]: expected an array, got {type(x).__name__}")
        if len(x.shape) > MAX_AUX_DIMS:
            raise ValueError(f"aux[{name!r}]: at most {MAX_AUX_DIMS} axes, got shape "
                             f"{tuple(x.shape)}")
    return score_mod, mask_mod, tuple(aux.items())


def aux_signature(items, dtype_name: Callable[[object], str]) -> tuple[tuple[str, str, int], ...]:
    """Each aux array's (name, dtype, axes), checking its dtype."""
    found = []
    for name, x in items:
        dtype = dtype_name(x)
        if dtype not in AUX_TYPES:
            raise TypeError(f"aux[{name!r}]: dtype {dtype} is not supported; expected one of "
                            f"{', '.join(AUX_TYPES)}")
        found.append((name, dtype, len(x.shape)))
    return tuple(found)


def explain_compile_error(kind: UserKind, message: str) -> str:
    """A compile log, narrowed to the user's lines: each error the compiler reported in
    ``score_mod``, ``score_mod.grad`` or ``mask_mod`` (directly, or in cuflash's headers while
    instantiating the user's line, as an aux array read with the wrong number of indices),
    with that source line beneath it; the whole log where no error names one."""
    sources = {"score_mod": kind.score, "score_mod.grad": kind.grad, "mask_mod": kind.mask}
    user = r"(score_mod(?:\.grad)?|mask_mod)"
    lines = []

    def show(name: str, number: int, text: str) -> None:
        source = (sources.get(name) or "").splitlines()
        shown = source[number - 1].strip() if 0 < number <= len(source) else ""
        lines.append(f"  {name}, line {number}: {text}\n      {shown}")

    # Each error starts at a "file(line): error: ..." line and runs to the next one.
    for block in re.split(r"\n(?=\S+\(\d+\): (?:error|warning))", message):
        head = re.match(r"(\S+)\((\d+)\): error: (.*)", block)
        if head is None:
            continue
        direct = re.fullmatch(user, head.group(1))
        if direct:
            show(head.group(1), int(head.group(2)), head.group(3))
            continue
        context = re.search(r"at line (\d+) of " + user, block)
        if context:
            show(context.group(2), int(context.group(1)), head.group(3))
    return "\n".join(lines) if lines else message


# ---- a registry, for torch's custom ops (whose schema takes strings and tensors) -----------
# Each ScoreMod and MaskMod enrols itself when built, under a key of its own (`key`), so that a
# function traced by torch.compile names it by a constant string (hashing it there would not
# trace). The registry keeps every modification built in the process alive.

_REGISTRY: dict[str, object] = {}


def _enrol(mod) -> None:
    key = f"{type(mod).__name__}{id(mod)}"
    object.__setattr__(mod, "key", key)
    _REGISTRY[key] = mod


def register(score_mod: ScoreMod | None, mask_mod: MaskMod | None,
             aux: dict | None) -> tuple[str, list | None]:
    """``(key, tensors)``: a string naming the modifications and their aux arrays' names ("" for
    none), and the aux arrays as a list in that order (None for none): what torch's custom ops
    take in their place (`registered` undoes it). Plain string work, so torch.compile traces
    it."""
    if score_mod is None and mask_mod is None and aux is None:
        return "", None
    names = tuple(aux) if aux else ()
    key = "|".join((getattr(score_mod, "key", ""), getattr(mask_mod, "key", ""), *names))
    return key, [aux[name] for name in names] if names else None


def registered(key: str, tensors) -> dict:
    """The ``score_mod``, ``mask_mod`` and ``aux`` arguments a `register` key stands for."""
    if not key:
        return {}
    score_mod, mask_mod = mods_of(key)
    names = key.split("|")[2:]
    return {"score_mod": score_mod, "mask_mod": mask_mod,
            "aux": dict(zip(names, tensors or (), strict=True)) if names else None}


def mods_of(key: str) -> tuple[ScoreMod | None, MaskMod | None]:
    """The ``(score_mod, mask_mod)`` a non-empty `register` key names."""
    score_key, mask_key = key.split("|")[:2]
    return (_REGISTRY[score_key] if score_key else None,
            _REGISTRY[mask_key] if mask_key else None)


# ---- the NumPy forms (the CPU path and the reference) -------------------------------------


def positions(batch: int, heads: int, rows, cols) -> tuple[np.ndarray, ...]:
    """``(b, h, q_idx, kv_idx)`` int64 arrays broadcasting to ``(batch, heads, len(rows),
    len(cols))``."""
    return (np.arange(batch).reshape(-1, 1, 1, 1), np.arange(heads).reshape(1, -1, 1, 1),
            np.asarray(rows, dtype=np.int64).reshape(1, 1, -1, 1),
            np.asarray(cols, dtype=np.int64).reshape(1, 1, 1, -1))


@dataclass(frozen=True)
class UserCall:
    """The NumPy forms of a call's modifications and its aux arrays (NumPy), for the CPU path:
    `score` and `keep` as `ScoreMod.numpy` and `MaskMod.numpy`; `grad` the derivative (None:
    1, or not needed)."""

    score: Callable | None
    grad: Callable | None
    keep: Callable | None
    aux: dict

    @staticmethod
    def of(score_mod: ScoreMod | None, mask_mod: MaskMod | None, aux: dict, *,
           backward: bool = False) -> UserCall:
        score = grad = keep = None
        if score_mod is not None:
            score = numpy_form(score_mod.numpy, "score_mod.numpy", "the score_mod")
            if backward and not score_mod.additive:
                grad = numpy_form(score_mod.numpy_grad, "score_mod.numpy_grad",
                                  "the score_mod's derivative")
        if mask_mod is not None:
            keep = numpy_form(mask_mod.numpy, "mask_mod.numpy", "the mask_mod")
        return UserCall(score, grad, keep, {name: np.asarray(x) for name, x in aux.items()})


def numpy_form(fn: Callable | None, name: str, what: str) -> Callable:
    """`fn`, or NotImplementedError naming it: the CPU path and the reference need it."""
    if fn is None:
        raise NotImplementedError(
            f"{name}: {what} has no NumPy form; give it one ({name.split('.')[0]}"
            f"(..., numpy=...)) to run on the CPU or in cuflash.reference")
    return fn
