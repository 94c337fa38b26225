"""Pure-PyTorch reference of the fused compress-and-project path: pixel shuffle -> token merge
(avg / dwconv / conv) -> LayerNorm -> Linear -> GELU -> Linear (the InternVL projector)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._validation import ShuffleGeometry
from .shuffle_merge_norm import layer_norm_ref, merge_windows_ref, pixel_shuffle_ref

MODES = ("avg", "dwconv", "conv")
ACTS = {"gelu": "none", "gelu_tanh": "tanh"}
"""Activation name -> ``F.gelu(approximate=...)``: exact erf GELU or its tanh approximation."""


def avg_merge_weight(mode: str, merge: int, width: int, *, dtype=torch.float32, device=None) -> torch.Tensor | None:
    """The ``merge_weight`` that makes a learnable ``mode`` compute exactly the ``"avg"`` merge.

    ``"dwconv"``: ``(merge, width)`` filled with ``1/merge``; ``"conv"``: ``(width, merge*width)``
    holding ``1/merge`` on the diagonal of each member's ``width x width`` block. ``1/merge`` is a
    power of two, so every product is exact and the sums are the avg merge's sums.
    ``"avg"`` has no parameters: returns ``None``.
    """
    if mode == "avg":
        return None
    if mode == "dwconv":
        return torch.full((merge, width), 1.0 / merge, dtype=dtype, device=device)
    if mode == "conv":
        eye = torch.eye(width, dtype=dtype, device=device) / merge
        return eye.repeat(1, merge)
    raise ValueError(f"mode={mode!r} is not supported; expected one of {MODES}")


def merge_tokens_ref(
    y: torch.Tensor, geom: ShuffleGeometry, mode: str, merge_weight: torch.Tensor | None, merge_bias: torch.Tensor | None
) -> torch.Tensor:
    """Merge the windows of the pixel-shuffled grid ``y (T, H', W', C')`` into ``(T, tokens_out, C')``."""
    members = merge_windows_ref(y, geom)  # (T, H'/mh, W'/mw, merge, C'), members row-major
    if mode == "avg":
        z = (members * (1.0 / geom.merge)).sum(dim=3)  # exact scaling: cannot overflow
    elif mode == "dwconv":
        z = (members * merge_weight).sum(dim=3)
    else:  # conv: one Linear over the concatenated window == Conv2d(kernel = stride = window)
        z = members.flatten(3) @ merge_weight.t()
    if merge_bias is not None:
        z = z + merge_bias
    return z.reshape(geom.tiles, geom.tokens_out, geom.width)


def activation_ref(u: torch.Tensor, act: str) -> torch.Tensor:
    return F.gelu(u, approximate=ACTS[act])


def compress_project_ref(
    x: torch.Tensor,
    *,
    grid: tuple[int, int],
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    scale: float = 0.5,
    merge: int = 1,
    mode: str = "avg",
    merge_weight: torch.Tensor | None = None,
    merge_bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    act: str = "gelu",
    upcast: bool = False,
) -> torch.Tensor:
    """Reference for :func:`fcot_kernels.compress_project` (unvalidated: the op validates).

    Computes in the input dtype like eager PyTorch would (each step rounded to that dtype), or
    in fp32 when ``upcast``; the output is in ``x.dtype`` either way.
    """
    # Built directly (not via shuffle_geometry) so that fp64 inputs work for gradcheck.
    r = round(1.0 / scale)
    geom = ShuffleGeometry(x.shape[0], grid[0], grid[1], x.shape[2], r, merge)
    dtype = x.dtype
    compute = torch.float32 if upcast and dtype != torch.float64 else dtype

    def cast(t):
        return None if t is None else t.to(compute)

    y = pixel_shuffle_ref(x.to(compute).reshape(geom.tiles, geom.grid_h, geom.grid_w, geom.channels), geom.r)
    z = merge_tokens_ref(y, geom, mode, cast(merge_weight), cast(merge_bias))
    h = layer_norm_ref(z, cast(ln_weight), cast(ln_bias), eps)
    u = F.linear(h, cast(w1), cast(b1))
    return F.linear(activation_ref(u, act), cast(w2), cast(b2)).to(dtype)
