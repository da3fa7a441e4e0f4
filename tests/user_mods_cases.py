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
