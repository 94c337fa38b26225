"""Visual-token compressors: the interface every compressor shares, and the training-free ones.

The interface
-------------
A compressor maps the visual tokens of a batch of tiles to fewer tokens per tile::

    out = compressor(tokens, grid)              # tokens (tiles, T, C), grid (grid_h, grid_w)
    out.tokens   # (tiles, T_out, C), same dtype, tokens in the tiles' spatial (row-major) order
    out.sizes    # (tiles, T_out) fp32: how many input tokens each output token stands for
    out.source   # (tiles, T) int64: the output index of every input token, -1 if dropped

``T == grid_h * grid_w`` (256 for a 16x16 InternVL tile after the pixel shuffle) and
``T_out = target_count(T, ratio)`` exactly, the same for every tile so the batch stays
rectangular.

**Ratio convention** (FCoT-VL's, one for the whole package): ``ratio`` is the fraction of the
visual tokens *removed*. ``ratio=0.5`` keeps 128 of 256 tokens per tile, ``ratio=0.75`` keeps
64; ``ratio=0`` keeps all. ``target_count(T, ratio) = T - round(T * ratio)`` (at least 1). The sizes feed proportional
attention (``log(size)`` as a key bias). Gradients flow to ``tokens``. The learnable
compressors (FCoT-VL's compression modules) implement the same call.

The registry
------------
:data:`COMPRESSORS` maps a name to a :class:`Compressor` subclass; :func:`build_compressor`
makes one, and ``fcot.apply_fcot(model, compressor=name, ratio=...)`` puts it in a model. A
registered compressor takes *pixel-shuffled* tile tokens (``(tiles, 256, 4*C_vit)`` on InternVL's
16x16 grid) and returns a :class:`Compressed`. Registered: ``none``; ``avg``, ``dwconv`` and
``conv`` (window merges; the learnable two start equal to avg, and inside a model they run
fused into :func:`fcot_kernels.compress_project`); ``tome`` and ``prune`` (training-free).
Registering one more is one decorated class::

    @register_compressor("mine")
    class Mine(Compressor):
        ratios = (0.5,)                      # supported ratios (None: any in [0, 1))
        def forward(self, tokens, grid, *, importance=None) -> Compressed: ...

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
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

import fcot_kernels as fk
import fcot_kernels.reference as fk_ref


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
    """Tokens kept per tile when the fraction ``ratio`` is removed: ``tokens - round(tokens *
    ratio)``, at least 1 (256 -> 128 at 0.5, 64 at 0.75)."""
    return max(1, tokens - round(tokens * ratio))


def _check_ratio(ratio: object) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        raise TypeError(f"ratio must be a float in [0, 1), got {type(ratio).__name__} ({ratio!r})")
    if not 0.0 <= ratio < 1.0:
        raise ValueError(
            f"ratio={ratio} must be in [0, 1): the fraction of visual tokens removed (0.5 keeps 128 of 256, 0.75 keeps 64)"
        )
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
    """ToMe merging down to ``target_count(T, ratio)`` tokens per tile (``ratio`` removed).

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
    """Training-free ToMe merging that removes ``ratio`` of the tokens; see :func:`tome_compress`."""

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
    """Training-free pruning of ``ratio`` of the tokens by importance; see :func:`importance_prune`."""

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


# ---------------------------------------------------------------------------------------------
# The compressor registry (what fcot.apply_fcot plugs into a model)
# ---------------------------------------------------------------------------------------------

WINDOW_MERGE = {0.0: 1, 0.5: 2, 0.75: 4}
"""Ratio -> tokens merged per window on the shuffled grid (1x1, 1x2, 2x2)."""


def window_merge(
    tokens: torch.Tensor,
    grid: tuple[int, int],
    merge: int,
    mode: str = "avg",
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Merge windows of ``merge`` neighbours on the token grid: 1x1, 1x2 (along the last axis) or
    2x2, members row-major, exactly the windows of :func:`fcot_kernels.compress_project`.
    ``mode``: ``"avg"`` (mean), ``"dwconv"`` (``weight (merge, C)``: per-channel weighted sum) or
    ``"conv"`` (``weight (C, merge*C)``: a Linear over the concatenated window); ``bias (C,)``."""
    tiles, count, channels = _check_tokens(tokens, grid)
    mh, mw = {1: (1, 1), 2: (1, 2), 4: (2, 2)}[merge]
    gh, gw = grid
    if gh % mh or gw % mw:
        raise ValueError(f"grid={tuple(grid)} is not divisible by the {mh}x{mw} merge window (merge={merge})")
    members = tokens.reshape(tiles, gh // mh, mh, gw // mw, mw, channels).permute(0, 1, 3, 2, 4, 5)
    members = members.reshape(tiles, count // merge, merge, channels)
    if mode == "avg":
        out = members.mean(dim=2)
    elif mode == "dwconv":
        out = (members * weight).sum(dim=2)
    elif mode == "conv":
        out = members.flatten(2) @ weight.t()
    else:
        raise ValueError(f"mode={mode!r} is not supported; expected 'avg', 'dwconv' or 'conv'")
    return out if bias is None else out + bias


def window_source(tiles: int, grid: tuple[int, int], merge: int, device=None) -> torch.Tensor:
    """``(tiles, T)`` int64: the window (output token) of every input token of :func:`window_merge`."""
    mh, mw = {1: (1, 1), 2: (1, 2), 4: (2, 2)}[merge]
    gh, gw = grid
    rows = torch.arange(gh, device=device)[:, None] // mh
    cols = torch.arange(gw, device=device)[None, :] // mw
    return (rows * (gw // mw) + cols).reshape(1, gh * gw).expand(tiles, gh * gw)


class Compressor(nn.Module):
    """A registered visual-token compressor. Subclasses set the class attributes and implement
    ``forward(tokens, grid, *, importance=None) -> Compressed`` on pixel-shuffled tile tokens.

    Constructed as ``cls(ratio, width=..., backend=...)``: ``ratio`` the fraction of tokens
    removed (checked against :attr:`ratios`), ``width`` the token width (``4 * C_vit``), needed
    by learnable compressors, ``backend`` for the fcot_kernels ops they call.
    """

    name: ClassVar[str] = ""
    ratios: ClassVar[tuple[float, ...] | None] = None
    """Supported ratios (fraction removed); ``None``: any in [0, 1)."""
    merge_mode: ClassVar[str | None] = None
    """``"avg"``/``"dwconv"``/``"conv"`` for window compressors, which a model runs fused into
    :func:`fcot_kernels.compress_project`; ``None`` for compressors that select or merge tokens."""
    needs_importance: ClassVar[bool] = False
    """Whether ``forward`` needs ``importance=`` (tiles, T)."""
    varying_sizes: ClassVar[bool] = False
    """Whether output tokens stand for different numbers of inputs (proportional attention
    changes more than a constant then)."""
    unit_sizes: ClassVar[bool] = False
    """Whether every output token stands for exactly one input (proportional attention adds
    log(1) = 0: it changes nothing)."""

    def __init__(self, ratio: float, *, width: int | None = None, backend: str | None = None) -> None:
        super().__init__()
        ratio = _check_ratio(ratio)
        if self.ratios is not None and ratio not in self.ratios:
            raise ValueError(
                f"compressor {self.name!r} does not support ratio={ratio}; supported: {list(self.ratios)} "
                f"(the fraction of visual tokens removed: 0.5 keeps 128 of 256 per tile, 0.75 keeps 64)"
            )
        self.ratio, self.width, self.backend = ratio, width, backend

    @property
    def merge(self) -> int:
        """Tokens per window for window compressors."""
        return WINDOW_MERGE[self.ratio]

    def tokens_out(self, count: int) -> int:
        """Tokens per tile out of ``count`` in."""
        return target_count(count, self.ratio)

    def check_grid(self, grid: tuple[int, int]) -> None:
        """Raise if this compressor cannot run on a ``grid`` of shuffled tokens."""

    def extra_repr(self) -> str:
        return f"ratio={self.ratio}" + (f", backend={self.backend!r}" if self.backend else "")


COMPRESSORS: dict[str, type[Compressor]] = {}
"""Registered compressors by name (see :func:`register_compressor`)."""


def register_compressor(name: str) -> Callable[[type[Compressor]], type[Compressor]]:
    """Class decorator: register a :class:`Compressor` subclass under ``name``."""

    def deco(cls: type[Compressor]) -> type[Compressor]:
        if not (isinstance(cls, type) and issubclass(cls, Compressor)):
            raise TypeError(f"register_compressor({name!r}) needs a Compressor subclass, got {cls!r}")
        if name in COMPRESSORS and COMPRESSORS[name] is not cls:
            raise ValueError(f"a compressor named {name!r} is already registered ({COMPRESSORS[name].__name__})")
        cls.name = name
        COMPRESSORS[name] = cls
        return cls

    return deco


def get_compressor(name: object) -> type[Compressor]:
    """The registered class for ``name``; an unknown name lists the registered ones."""
    if not isinstance(name, str) or name not in COMPRESSORS:
        raise ValueError(f"compressor={name!r} is not registered; registered compressors: {sorted(COMPRESSORS)}")
    return COMPRESSORS[name]


def build_compressor(name: str, ratio: float, *, width: int | None = None, backend: str | None = None) -> Compressor:
    """``COMPRESSORS[name](ratio, width=width, backend=backend)`` with the name checked."""
    return get_compressor(name)(ratio, width=width, backend=backend)


class WindowCompressor(Compressor):
    """Merge fixed windows of the shuffled grid (FCoT-VL's compression modules): 1x2 windows at
    ratio 0.5, 2x2 at 0.75. Every output stands for ``merge`` inputs."""

    ratios = (0.5, 0.75)
    merge_mode = "avg"

    def __init__(self, ratio: float, *, width: int | None = None, backend: str | None = None) -> None:
        super().__init__(ratio, width=width, backend=backend)
        if self.merge_mode == "avg":
            self.register_parameter("merge_weight", None)
            self.register_parameter("merge_bias", None)
            return
        if not isinstance(width, int) or width <= 0:
            raise ValueError(f"compressor {self.name!r} is learnable and needs width= (the token width), got {width!r}")
        self.merge_weight = nn.Parameter(fk_ref.avg_merge_weight(self.merge_mode, self.merge, width))
        self.merge_bias = nn.Parameter(torch.zeros(width))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Back to exactly the avg merge (bias zero)."""
        if self.merge_weight is not None:
            self.merge_weight.copy_(fk_ref.avg_merge_weight(self.merge_mode, self.merge, self.width))
            self.merge_bias.zero_()

    def check_grid(self, grid: tuple[int, int]) -> None:
        mh, mw = {1: (1, 1), 2: (1, 2), 4: (2, 2)}[self.merge]
        if grid[0] % mh or grid[1] % mw:
            raise ValueError(
                f"compressor {self.name!r} at ratio={self.ratio} merges {mh}x{mw} windows, which do not divide the "
                f"{grid[0]}x{grid[1]} grid of shuffled tokens per tile; use compressor='tome' or 'prune', or another ratio"
            )

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int], *, importance: torch.Tensor | None = None) -> Compressed:
        if importance is not None:
            warnings.warn(f"compressor {self.name!r} ignores importance=; it merges fixed windows", stacklevel=2)
        self.check_grid(tuple(grid))
        out = window_merge(tokens, grid, self.merge, self.merge_mode, self.merge_weight, self.merge_bias)
        tiles = tokens.shape[0]
        sizes = torch.full((tiles, out.shape[1]), float(self.merge), device=tokens.device)
        return Compressed(out, sizes, window_source(tiles, tuple(grid), self.merge, tokens.device))


@register_compressor("none")
class NoCompressor(WindowCompressor):
    """Keep every token (ratio 0): the uncompressed model, through the fused projector."""

    ratios = (0.0,)
    unit_sizes = True


@register_compressor("avg")
class AvgCompressor(WindowCompressor):
    """Average each window (no parameters)."""

    merge_mode = "avg"


@register_compressor("dwconv")
class DWConvCompressor(WindowCompressor):
    """Per-channel weighted sum of each window's members (``merge_weight (merge, W)``), + bias."""

    merge_mode = "dwconv"


@register_compressor("conv")
class ConvCompressor(WindowCompressor):
    """A Linear over each concatenated window (``merge_weight (W, merge*W)``, a Conv2d with
    kernel = stride = window), + bias; starts equal to avg."""

    merge_mode = "conv"


@register_compressor("tome")
class ToMe(Compressor):
    """Training-free ToMe merging (:func:`tome_compress`): exact count, order kept, sizes vary."""

    varying_sizes = True

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int], *, importance: torch.Tensor | None = None) -> Compressed:
        if importance is not None:
            warnings.warn("compressor 'tome' ignores importance=; it merges by similarity", stacklevel=2)
        return tome_compress(tokens, grid, self.ratio, backend=self.backend)


@register_compressor("prune")
class Prune(Compressor):
    """Training-free pruning (:func:`importance_prune`) by ``importance`` (the ViT CLS row's
    attention inside a model; token L2 norms where no importance is given)."""

    unit_sizes = True

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int], *, importance: torch.Tensor | None = None) -> Compressed:
        if importance is None:
            importance = tokens.detach().float().norm(dim=-1)
        return importance_prune(tokens, grid, importance, self.ratio)
