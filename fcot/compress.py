"""Visual-token compressors: the interface every compressor shares, and the training-free ones.

The interface
-------------
A compressor maps the visual tokens of a batch of tiles to fewer tokens per tile::

    out = compressor(tokens, grid)              # tokens (tiles, T, C), grid (grid_h, grid_w)
    out.tokens   # (tiles, T_out, C), same dtype, tokens in the tiles' spatial (row-major) order
    out.sizes    # (tiles, T_out) fp32: how many input tokens each output token stands for
    out.source   # (tiles, T) int64: the output index of every input token, -1 if dropped

``T == grid_h * grid_w`` (256 for a 16x16 InternVL tile after the pixel shuffle) and
``T_out = target_count(T, ratio)`` exactly (``round(T * ratio)``: 128 at ratio 0.5, 64 at
0.25), the same for every tile so the batch stays rectangular. The sizes feed proportional
attention (``log(size)`` as a key bias). Gradients flow to ``tokens``. The learnable
compressors (FCoT-VL's compression modules) implement the same call.

Training-free compressors here, each a pure function plus a thin ``nn.Module``:

* :func:`tome_compress` / :class:`ToMeCompressor`: ToMe bipartite merging
  (:func:`fcot_kernels.tome_merge`), rounds of at most ``|A|`` merges until the target count;
  merged tokens are size-weighted averages, sizes sum to ``T``.
* :func:`importance_prune` / :class:`ImportancePruner`: keep the ``T_out`` most important
  tokens (an importance vector per tile, e.g. the ViT CLS row's attention from
  ``merged_attention``'s side-output), in their original order; dropped tokens are gone (each
  kept token has size 1).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

import fcot_kernels as fk


@dataclass
class Compressed:
    """Output of a compressor for a batch of tiles."""

    tokens: torch.Tensor
    """``(tiles, T_out, C)``, in the input dtype, spatial order kept."""
    sizes: torch.Tensor
    """``(tiles, T_out)`` fp32: input tokens represented by each output token."""
    source: torch.Tensor
    """``(tiles, T)`` int64: output index of every input token; -1 where a token was dropped."""


def target_count(tokens: int, ratio: float) -> int:
    """Tokens kept per tile: ``round(tokens * ratio)``, at least 1."""
    return max(1, round(tokens * ratio))


def _check_ratio(ratio: object) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        raise TypeError(f"ratio must be a float in (0, 1], got {type(ratio).__name__} ({ratio!r})")
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio={ratio} must be in (0, 1]: the fraction of tokens kept (0.5 keeps 128 of 256)")
    return float(ratio)


def _check_tokens(tokens: object, grid: object) -> tuple[int, int, int]:
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"tokens must be a torch.Tensor, got {type(tokens).__name__}")
    if tokens.dim() != 3:
        raise ValueError(f"tokens must have shape (tiles, T, C), got {tuple(tokens.shape)}")
    if (
        not isinstance(grid, (tuple, list))
        or len(grid) != 2
        or not all(isinstance(g, int) and not isinstance(g, bool) and g > 0 for g in grid)
    ):
        raise TypeError(f"grid must be a pair of positive ints (grid_h, grid_w), got {grid!r}")
    tiles, count, channels = tokens.shape
    if grid[0] * grid[1] != count:
        raise ValueError(
            f"grid={tuple(grid)} has {grid[0] * grid[1]} cells but tokens has {count} per tile "
            f"(shape {tuple(tokens.shape)})"
        )
    return tiles, count, channels


def tome_compress(
    tokens: torch.Tensor,
    grid: tuple[int, int],
    ratio: float,
    *,
    metric: torch.Tensor | None = None,
    backend: str | None = None,
) -> Compressed:
    """ToMe merging down to ``target_count(T, ratio)`` tokens per tile.

    Each round merges ``min(remaining, |A|)`` tokens with :func:`fcot_kernels.tome_merge`, so
    256 tokens reach 128 in one round and 64 in two. ``metric`` (same leading shape as
    ``tokens``, e.g. ViT keys) drives the matching of the first round and is merged alongside
    the tokens (size-weighted) for later rounds; default the tokens themselves.
    """
    ratio = _check_ratio(ratio)
    tiles, count, _ = _check_tokens(tokens, grid)
    target = target_count(count, ratio)
    x, m = tokens, metric
    size = torch.ones(tiles, count, device=tokens.device)
    source = torch.arange(count, device=tokens.device).expand(tiles, count)
    while x.shape[1] > target:
        n = x.shape[1]
        r = min(n - target, (n + 1) // 2)
        prev_size = size
        x, size, step = fk.tome_merge(x, r=r, metric=m, size=size, backend=backend)
        if m is not None:
            # Carry the metric through the same merge (size-weighted; no gradient, it only picks indices).
            m = m.detach().float() * prev_size[..., None]
            m = torch.zeros(tiles, n - r, m.shape[2], device=m.device).scatter_add_(
                1, step[..., None].expand(-1, -1, m.shape[2]), m
            ) / size[..., None]
        source = step.gather(1, source)
    return Compressed(x, size, source)


def importance_prune(tokens: torch.Tensor, grid: tuple[int, int], importance: torch.Tensor, ratio: float) -> Compressed:
    """Keep the ``target_count(T, ratio)`` tokens of highest ``importance`` (ties: lower index
    first), in their original order. ``importance``: ``(tiles, T)``, any float dtype."""
    ratio = _check_ratio(ratio)
    tiles, count, channels = _check_tokens(tokens, grid)
    if not isinstance(importance, torch.Tensor):
        raise TypeError(f"importance must be a torch.Tensor, got {type(importance).__name__}")
    if tuple(importance.shape) != (tiles, count):
        raise ValueError(f"importance must have shape {(tiles, count)} (one score per token), got {tuple(importance.shape)}")
    if not importance.is_floating_point():
        raise TypeError(f"importance has dtype {importance.dtype}; expected a floating dtype")
    if importance.device != tokens.device:
        raise ValueError(f"importance is on {importance.device} but must be on {tokens.device} (the device of tokens)")
    target = target_count(count, ratio)
    # Stable descending sort: equal importance keeps the earlier token.
    keep = torch.sort(importance.detach().float(), dim=1, descending=True, stable=True).indices[:, :target]
    keep = keep.sort(dim=1).values
    kept = tokens.gather(1, keep[..., None].expand(-1, -1, channels))
    source = torch.full((tiles, count), -1, dtype=torch.int64, device=tokens.device)
    source.scatter_(1, keep, torch.arange(target, device=tokens.device).expand(tiles, target))
    return Compressed(kept, torch.ones(tiles, target, device=tokens.device), source)


class ToMeCompressor(nn.Module):
    """Training-free ToMe merging to ``ratio`` of the tokens; see :func:`tome_compress`."""

    def __init__(self, ratio: float, *, backend: str | None = None) -> None:
        super().__init__()
        self.ratio = _check_ratio(ratio)
        self.backend = backend

    def forward(
        self,
        tokens: torch.Tensor,
        grid: tuple[int, int],
        *,
        metric: torch.Tensor | None = None,
        importance: torch.Tensor | None = None,
    ) -> Compressed:
        if importance is not None:
            warnings.warn("ToMeCompressor ignores importance=; it merges by similarity", stacklevel=2)
        return tome_compress(tokens, grid, self.ratio, metric=metric, backend=self.backend)

    def extra_repr(self) -> str:
        return f"ratio={self.ratio}" + (f", backend={self.backend!r}" if self.backend else "")


class ImportancePruner(nn.Module):
    """Training-free pruning to ``ratio`` of the tokens by importance; see :func:`importance_prune`."""

    def __init__(self, ratio: float) -> None:
        super().__init__()
        self.ratio = _check_ratio(ratio)

    def forward(
        self,
        tokens: torch.Tensor,
        grid: tuple[int, int],
        *,
        importance: torch.Tensor | None = None,
        metric: torch.Tensor | None = None,
    ) -> Compressed:
        if importance is None:
            raise ValueError(
                "ImportancePruner needs importance= (tiles, T), e.g. the attention of the ViT CLS row "
                "from fcot_kernels.merged_attention(..., importance_rows=...)"
            )
        if metric is not None:
            warnings.warn("ImportancePruner ignores metric=; it keeps tokens by importance", stacklevel=2)
        return importance_prune(tokens, grid, importance, self.ratio)

    def extra_repr(self) -> str:
        return f"ratio={self.ratio}"
