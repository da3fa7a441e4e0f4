"""User score and mask modifications that equal a built-in one: each case gives a ScoreMod /
MaskMod with its aux arrays and the built-in options (softcap, alibi_slopes, bias, mask) that
compute the same attention. The tests run the user's form through cuflash and hold it to the
reference of the built-in, so that the mechanism is proven on real variants; the reference run on
the user's NumPy forms must agree with the built-in's too.

The sources do not depend on the shapes (lengths travel as 0-d aux arrays), so one kernel serves
every shape of a test.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

import cuflash

NAMES = ("softcap", "alibi", "document_relbias")


@dataclass
class UserCase:
    """A user modification and the built-in options it equals."""

    name: str
    score_mod: cuflash.ScoreMod | None
    mask_mod: cuflash.MaskMod | None
    aux: dict[str, np.ndarray]  # NumPy; tests move them where they need
    builtin: dict[str, Any]  # softcap / alibi_slopes / bias / mask as the reference takes them


def softcap_mod(cap: float) -> cuflash.ScoreMod:
    """Gemma 2's logit softcap, as a user would write it: not additive (its derivative is read
    from the modified score)."""
    return cuflash.ScoreMod(
        f"{cap!r}f * tanh(score / {cap!r}f)",
        grad=f"1.f - (out / {cap!r}f) * (out / {cap!r}f)",
        numpy=lambda s, b, h, q, kv, **aux: cap * np.tanh(s / cap),
        numpy_grad=lambda out, b, h, q, kv, **aux: 1.0 - (out / cap) ** 2)


ALIBI = cuflash.ScoreMod(
    "score - slopes(h) * abs(q_idx + shift() - kv_idx)", grad="1",
    numpy=lambda s, b, h, q, kv, slopes, shift, **aux: s - slopes[h] * np.abs(q + shift - kv))

RELBIAS = cuflash.ScoreMod(
    "score + rel(h, q_idx - kv_idx + base())", grad="1",
    numpy=lambda s, b, h, q, kv, rel, base, **aux: s + rel[h, q - kv + base])

DOCUMENTS = cuflash.MaskMod(
    "qdoc(b, q_idx) == kdoc(b, kv_idx)",
    numpy=lambda b, h, q, kv, qdoc, kdoc, **aux: qdoc[b, q] == kdoc[b, kv])


def documents(batch: int, length: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted document ids ``(batch, length)``, int32: runs of random lengths."""
    starts = rng.random((batch, length)) < 0.08
    return np.cumsum(starts, axis=1).astype(np.int32)


def make(name: str, batch: int, heads_q: int, seqlen_q: int, seqlen_k: int,
         rng: np.random.Generator) -> UserCase:
    if name == "softcap":
        cap = float(rng.choice([2.0, 5.0, 30.0]))
        return UserCase(name, softcap_mod(cap), None, {}, {"softcap": cap})
    if name == "alibi":
        slopes = rng.uniform(0.0, 0.5, heads_q).astype(np.float32)
        shift = np.array(seqlen_k - seqlen_q, dtype=np.int32)
        return UserCase(name, ALIBI, None, {"slopes": slopes, "shift": shift},
                        {"alibi_slopes": slopes.astype(np.float64)})
    if name == "document_relbias":
        rel = rng.standard_normal((heads_q, seqlen_q + seqlen_k)).astype(np.float16)
        base = np.array(seqlen_k, dtype=np.int64)
        qdoc = documents(batch, seqlen_q, rng)
        kdoc = documents(batch, seqlen_k, rng)
        rows, cols = np.arange(seqlen_q)[:, None], np.arange(seqlen_k)[None, :]
        bias = rel.astype(np.float64)[:, rows - cols + seqlen_k]  # (Hq, Sq, Sk)
        mask = qdoc[:, None, :, None] == kdoc[:, None, None, :]  # (B, 1, Sq, Sk)
        return UserCase(name, RELBIAS, DOCUMENTS,
                        {"rel": rel, "base": base, "qdoc": qdoc, "kdoc": kdoc},
                        {"bias": bias, "mask": mask})
    raise ValueError(name)


# ---- user modifications beside the built-ins ----------------------------------------------
# A call may give a score_mod / mask_mod and the built-in ALiBi, bias and mask array (and, on
# the CPU, a softcap): the built-ins apply first, then the score_mod, and both masks hide. Each
# case equals built-ins alone, so that cuflash's answer is held to the built-in reference:
#   "double"    DOUBLE after (softcap c, ALiBi a, bias B) equals softcap 2c, ALiBi 2a, bias 2B
#               at twice the scale; its derivative is 2, so dbias = 2 * the built-in's
#   "relbias"   RELBIAS after (ALiBi a, bias B) equals ALiBi a with the bias B + rel
# both optionally with DOCUMENTS beside a mask array M (the built-in mask M & documents).

DOUBLE = cuflash.ScoreMod(
    "2.f * score", grad="2.f", numpy=lambda s, b, h, q, kv, **aux: 2 * s,
    numpy_grad=lambda out, b, h, q, kv, **aux: np.full_like(out, 2.0))
COMBINED = ("double", "relbias")


@dataclass
class CombinedCase:
    """A user modification beside built-ins (`given`, passed with it) and the built-ins alone
    that equal both (`builtin`, with `scale_factor` times the call's scale); `dbias_factor`:
    the call's dbias is that times the built-in's (None: not comparable so)."""

    score_mod: cuflash.ScoreMod
    mask_mod: cuflash.MaskMod | None
    aux: dict[str, np.ndarray]
    given: dict[str, Any]
    builtin: dict[str, Any]
    scale_factor: float
    dbias_factor: float | None


def combined(name: str, batch: int, heads_q: int, seqlen_q: int, seqlen_k: int,
             rng: np.random.Generator, *, softcap: float = 0.0, alibi: tuple | None = None,
             bias_shape: tuple | None = None, mask_shape: tuple | None = None,
             documents_mask: bool = False, dtype=np.float32) -> CombinedCase:
    slopes = None if alibi is None else rng.uniform(0.0, 0.5, alibi).astype(np.float32)
    bias = None if bias_shape is None else rng.standard_normal(bias_shape).astype(dtype)
    keep = None if mask_shape is None else rng.random(mask_shape) < 0.8
    given = {"softcap": softcap, "alibi_slopes": slopes, "bias": bias, "mask": keep}
    aux: dict[str, np.ndarray] = {}
    mask = keep
    if documents_mask:
        aux["qdoc"], aux["kdoc"] = documents(batch, seqlen_q, rng), documents(batch, seqlen_k, rng)
        docs = aux["qdoc"][:, None, :, None] == aux["kdoc"][:, None, None, :]
        mask = docs if keep is None else keep & docs
    mask_mod = DOCUMENTS if documents_mask else None
    if name == "double":
        builtin = {"softcap": 2 * softcap,
                   "alibi_slopes": None if slopes is None else 2 * slopes.astype(np.float64),
                   "bias": None if bias is None else 2 * bias.astype(np.float64), "mask": mask}
        return CombinedCase(DOUBLE, mask_mod, aux, given, builtin, 2.0, 2.0)
    if name == "relbias":
        if softcap:
            raise ValueError("relbias: the built-in bias would have to go before the softcap")
        aux["rel"] = rng.standard_normal((heads_q, seqlen_q + seqlen_k)).astype(np.float16)
        aux["base"] = np.array(seqlen_k, dtype=np.int64)
        rows, cols = np.arange(seqlen_q)[:, None], np.arange(seqlen_k)[None, :]
        rel = aux["rel"].astype(np.float64)[:, rows - cols + seqlen_k]  # (Hq, Sq, Sk)
        total = rel if bias is None else rel + bias.astype(np.float64)
        builtin = {"alibi_slopes": None if slopes is None else slopes.astype(np.float64),
                   "bias": total, "mask": mask}
        return CombinedCase(RELBIAS, mask_mod, aux, given, builtin, 1.0, None)
    raise ValueError(name)
