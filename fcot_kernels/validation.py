"""The argument checks every op runs before dispatch (the validation contract), for wrappers
such as ``fcot.modules.CompressProjector`` that want to reject bad arguments at construction
time with the same messages. See ``docs/kernels.md`` ("Validation contract").

Each raises ``TypeError`` (wrong type: a float for an int, a bool, a string) or ``ValueError``
(out of range, not finite) naming the argument, the value and what was expected.
"""

from ._validation import (
    EPS_RANGE,
    MERGES,
    check_eps,
    check_float,
    check_grid,
    check_int,
    check_int_range,
    check_merge,
    check_shuffle_scale,
)

__all__ = [
    "EPS_RANGE",
    "MERGES",
    "check_eps",
    "check_float",
    "check_grid",
    "check_int",
    "check_int_range",
    "check_merge",
    "check_shuffle_scale",
]
