"""The accuracy rule (docs/api.md) for the tests: the package's own `cuflash._accuracy`, which
`python -m cuflash check` uses too (one rule, one place)."""

from cuflash._accuracy import (
    EPS,
    LSE_DTYPE,
    assert_matches_reference,
    backward_eps,
    compare,
    naive_attention,
    naive_attention_backward,
    naive_bias_gradient,
    naive_sinks_gradient,
    round_to,
)

__all__ = [
    "EPS",
    "LSE_DTYPE",
    "assert_matches_reference",
    "backward_eps",
    "compare",
    "naive_attention",
    "naive_attention_backward",
    "naive_bias_gradient",
    "naive_sinks_gradient",
    "round_to",
]
