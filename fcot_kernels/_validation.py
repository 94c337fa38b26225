"""Argument checks shared by every op: clear ``TypeError``/``ValueError`` messages that name the
argument, the value received and what was expected. Kernels assume these checks passed.

The validation contract (the same for every backend, run by the public functions before
dispatch, so the backends never disagree on what they accept):

* tensors: a ``torch.Tensor`` with data (not on the ``meta`` device), of the expected rank,
  shape, dtype and device; any strides (the kernels read every tensor through its strides, or
  the launcher makes it contiguous once);
* integers: a Python ``int`` (not a float, not a bool) within their range, at most int64;
* floats: a real number (not a bool), finite, within the argument's documented range (the
  ranges keep every value and its fp32 image finite and non-zero where the kernels need it);
* sizes positive, upper bounds such as ``max_seqlen`` checked against the data.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(
    name: str,
    t: object,
    *,
    ndim: int | None = None,
    dtypes: tuple[torch.dtype, ...] | None = FLOAT_DTYPES,
    shape: tuple[int, ...] | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Check that ``t`` is a tensor with the given rank, dtype, shape and device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type == "meta":
        raise ValueError(f"{name} is a meta tensor (shape {tuple(t.shape)}, no data); the ops need tensors on a CPU or GPU")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} has dtype {t.dtype}; expected one of {_dtype_names(dtypes)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but must be on {device} (the device of x)")
    return t


def check_choice(name: str, value: object, choices: Iterable[object]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; expected one of {choices}")


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

EPS_RANGE = (1e-20, 1.0)
"""Allowed LayerNorm ``eps``: positive and normal in fp32 (the kernels take it as fp32), at most 1."""


def check_float(
    name: str, value: object, *, positive: bool = False, low: float | None = None, high: float | None = None
) -> float:
    """A real number (``int`` or ``float``, not a bool), finite, ``> 0`` when ``positive``, in
    ``[low, high]`` (either bound optional). The message shows the value as it was passed."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} ({value!r})")
    try:
        f = float(value)
    except OverflowError:  # an int beyond the float range
        raise ValueError(f"{name}={value} must be finite (it does not fit a float)") from None
    if not math.isfinite(f):
        raise ValueError(f"{name}={value} must be finite")
    if positive and not f > 0:
        raise ValueError(f"{name}={value} must be > 0")
    if low is not None and f < low:
        raise ValueError(f"{name}={value} is out of range: it must be >= {low}")
    if high is not None and f > high:
        raise ValueError(f"{name}={value} is out of range: it must be <= {high}")
    return f


def check_positive_float(name: str, value: object, *, low: float | None = None, high: float | None = None) -> float:
    """A finite float ``> 0`` (in ``[low, high]`` when given)."""
    return check_float(name, value, positive=True, low=low, high=high)


def check_eps(value: object) -> float:
    """The LayerNorm ``eps``: finite, > 0, in :data:`EPS_RANGE`."""
    return check_float("eps", value, positive=True, low=EPS_RANGE[0], high=EPS_RANGE[1])


@dataclass(frozen=True)
class ShuffleGeometry:
    """Shapes of the pixel-shuffle + merge path for ``x`` of shape ``(tiles, grid_h*grid_w, C)``."""

    tiles: int
    grid_h: int
    grid_w: int
    channels: int
    r: int
    """Pixel-shuffle factor, ``1 / scale``."""
    merge: int

    @property
    def window(self) -> tuple[int, int]:
        """Merge window (rows, cols) on the shuffled grid: 1x1, 1x2 or 2x2."""
        return {1: (1, 1), 2: (1, 2), 4: (2, 2)}[self.merge]

    @property
    def width(self) -> int:
        """Token width after the pixel shuffle, ``C / scale**2``."""
        return self.r * self.r * self.channels

    @property
    def out_grid(self) -> tuple[int, int]:
        mh, mw = self.window
        return self.grid_h // self.r // mh, self.grid_w // self.r // mw

    @property
    def tokens_out(self) -> int:
        h, w = self.out_grid
        return h * w

    @property
    def rows(self) -> int:
        return self.tiles * self.tokens_out


MERGES = (1, 2, 4)

SCALE_MIN = 1.0 / 64
"""Smallest pixel-shuffle scale accepted (r = 64); 1/scale must be an integer."""


def check_grid(grid: object) -> tuple[int, int]:
    """``grid``: a pair (tuple, list or torch.Size) of positive ints (never truncated floats)."""
    if (
        not isinstance(grid, (tuple, list))
        or len(grid) != 2
        or not all(isinstance(g, int) and not isinstance(g, bool) for g in grid)
    ):
        raise TypeError(f"grid must be a pair of ints (grid_h, grid_w), got {grid!r}")
    grid_h, grid_w = grid
    if grid_h < 1 or grid_w < 1 or grid_h > INT64_MAX or grid_w > INT64_MAX:
        raise ValueError(f"grid={tuple(grid)} must be positive")
    return grid_h, grid_w


def check_shuffle_scale(scale: object) -> float:
    """The pixel-shuffle ``scale``: a finite float in ``[1/64, 1]`` (its exact ``1/r`` form is
    checked by the caller)."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float like 0.5, got {type(scale).__name__} ({scale!r})")
    f = check_float("scale", scale, positive=True)
    if not SCALE_MIN <= f <= 1.0:
        raise ValueError(
            f"scale={scale} is not supported: expected 1/r for an integer r in [1, 64] (1.0, 0.5, 0.25, ...)"
        )
    return f


def check_merge(merge: object) -> int:
    """``merge``: an int in :data:`MERGES`."""
    if isinstance(merge, bool) or not isinstance(merge, int):
        raise TypeError(f"merge must be an int, got {type(merge).__name__} ({merge!r}); expected one of {MERGES}")
    if merge not in MERGES:
        raise ValueError(f"merge={merge!r} is not supported; expected one of {MERGES}")
    return merge


def shuffle_geometry(x: torch.Tensor, grid: object, scale: object, merge: object) -> ShuffleGeometry:
    """Validate ``x``/``grid``/``scale``/``merge`` of a pixel-shuffle + merge op."""
    check_tensor("x", x, ndim=3)
    grid_h, grid_w = check_grid(grid)
    tiles, tokens, channels = x.shape
    if grid_h * grid_w != tokens:
        raise ValueError(
            f"grid={tuple(grid)} has {grid_h * grid_w} cells but x has {tokens} tokens per tile "
            f"(x.shape={tuple(x.shape)}); pass the ViT patch grid without the CLS token"
        )
    if tiles < 1 or channels < 1:
        raise ValueError(f"x must have at least one tile and one channel, got shape {tuple(x.shape)}")
    check_shuffle_scale(scale)
    r = round(1.0 / scale)
    if r < 1 or abs(r * scale - 1.0) > 1e-9:
        raise ValueError(
            f"scale={scale} is not supported: expected 1/r for an integer r >= 1 (0.5, 0.25, 1.0); "
            "the pixel shuffle downsamples the grid by r and multiplies the channels by r*r"
        )
    if grid_h % r or grid_w % r:
        raise ValueError(f"grid={tuple(grid)} must be divisible by 1/scale={r} in both dimensions")
    check_merge(merge)
    geom = ShuffleGeometry(tiles, grid_h, grid_w, channels, r, merge)
    mh, mw = geom.window
    if (grid_h // r) % mh or (grid_w // r) % mw:
        raise ValueError(
            f"merge={merge} needs the shuffled grid ({grid_h // r}, {grid_w // r}) to be divisible "
            f"by its window ({mh}, {mw}); got grid={tuple(grid)} with scale={scale}"
        )
    return geom


def check_real(name: str, value: object, *, low: float | None = None, high: float | None = None) -> float:
    """A finite real number (not a bool) in ``[low, high]`` (either bound optional)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} ({value!r})")
    f = check_float(name, value)
    if (low is not None and f < low) or (high is not None and f > high):
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        raise ValueError(f"{name}={value} must be in [{lo}, {hi}]")
    return f


def check_int(name: str, value: object, *, low: int | None = None, high: int = INT64_MAX) -> int:
    """A Python int (not a bool), at least ``low`` when given, within int64 (or ``high``)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if low is not None and value < low:
        raise ValueError(f"{name}={value} must be >= {low}")
    lo = INT64_MIN if low is None else low
    if value < lo or value > high:
        raise ValueError(f"{name}={value} is out of range; expected [{lo}, {high}]")
    return value


def check_same(name: str, t: torch.Tensor, like: torch.Tensor, like_name: str) -> None:
    """``t`` has the dtype and device of ``like`` (e.g. a head and the hidden states it multiplies)."""
    if t.dtype != like.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {like_name} has {like.dtype}; they must match")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but {like_name} is on {like.device}; they must match")


DEBUG_FINITE_ENV = "FCOT_DEBUG_FINITE"
"""Set to 1 to make ops check their inputs for NaN/inf (off by default: it costs a sync)."""


def debug_finite() -> bool:
    """Whether the opt-in non-finite input checks are on (``FCOT_DEBUG_FINITE=1``)."""
    return os.environ.get(DEBUG_FINITE_ENV, "0") not in ("", "0")


def check_finite(name: str, t: torch.Tensor) -> None:
    """Raise when ``t`` holds NaN or inf, with how many and where the first one is."""
    bad = ~torch.isfinite(t)
    count = int(bad.sum())
    if count:
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{name} has {count} non-finite element(s) (first at index {first}: {t[first].item()}); "
            f"checked because {DEBUG_FINITE_ENV}=1"
        )


def host_value_checks(t: torch.Tensor) -> bool:
    """Whether value checks may read ``t`` on the host: CPU tensors in eager mode, or always with
    ``FCOT_DEBUG_FINITE=1``. Elsewhere they run on the device (:func:`torch._assert_async`), so
    that no op synchronises with the host (CUDA graphs, torch.compile without graph breaks)."""
    if torch.compiler.is_compiling():
        return False
    return t.device.type == "cpu" or debug_finite()


def check_finite_values(name: str, t: torch.Tensor) -> None:
    """Reject NaN or inf in ``t`` (always on: for inputs whose outputs cannot carry NaN, e.g.
    indices). A ``ValueError`` with the count and the first position where the value may be read
    on the host (:func:`host_value_checks`); a device-side assert on a GPU and under compile."""
    if not t.numel():
        return
    if not host_value_checks(t):
        torch._assert_async(torch.isfinite(t).all(), f"{name} has non-finite elements; expected finite values")
        return
    if not bool(torch.isfinite(t).all()):
        bad = ~torch.isfinite(t)
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{name} has {int(bad.sum())} non-finite element(s) (first at index {first}: {t[first].item()}); "
            "expected finite values"
        )


def check_int_range(name: str, value: object, *, low: int, high: int | None = None, hint: str = "") -> int:
    """An ``int`` (not a bool) in ``[low, high]``; the message names the allowed range."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    high = INT64_MAX if high is None else high
    if value < low or value > high:
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name}={value} is out of range; expected {bound}{hint}")
    return value
