"""``nn.Module`` wrappers around the fused ops: they hold parameters and call
:mod:`fcot_kernels`; the algorithms live in pure functions (here and in fcot_kernels).

:class:`CompressProjector` is the InternVL projector (LayerNorm -> Linear -> GELU -> Linear)
with the pixel shuffle and a token merge (FCoT-VL's compressor) fused in front of it. Its
submodule names are transformers' (``layer_norm``, ``linear_1``, ``linear_2``), so a
transformers projector's state dict loads as is; OpenGVLab ``mlp1`` state dicts (keys ``0.*``,
``1.*``, ``3.*``) load through :meth:`CompressProjector.load_projector_state_dict`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping

import torch
from torch import nn

import fcot_kernels
from fcot_kernels.reference import avg_merge_weight
from fcot_kernels.validation import check_eps, check_grid, check_int_range, check_merge, check_shuffle_scale

MODES = ("avg", "dwconv", "conv")
ACTS = ("gelu", "gelu_tanh")

_MLP1_TO_HF = {"0.": "layer_norm.", "1.": "linear_1.", "3.": "linear_2."}
_HF_KEYS = tuple(f"{m}.{p}" for m in ("layer_norm", "linear_1", "linear_2") for p in ("weight", "bias"))


def convert_projector_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A projector state dict in transformers naming (``layer_norm``/``linear_1``/``linear_2``).

    Accepts transformers keys (``layer_norm.weight`` ..., optionally under any prefix ending in
    ``multi_modal_projector.``) or OpenGVLab keys (``0.weight``, ``1.weight``, ``3.weight`` ...,
    optionally prefixed ``mlp1.``). Raises ``KeyError`` naming what is missing or unexpected.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        name = key
        for prefix in ("multi_modal_projector.", "mlp1."):
            if prefix in name:
                name = name.split(prefix, 1)[1]
        for old, new in _MLP1_TO_HF.items():
            if name.startswith(old):
                name = new + name[len(old):]
        if name not in _HF_KEYS:
            raise KeyError(f"unexpected projector key {key!r}; expected {_HF_KEYS} or mlp1 keys 0./1./3.(weight|bias)")
        out[name] = value
    missing = [k for k in _HF_KEYS if k not in out]
    if missing:
        raise KeyError(f"projector state dict lacks {missing} (got keys {sorted(state_dict)})")
    return out


def to_mlp1_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`convert_projector_state_dict` for OpenGVLab ``mlp1`` keys."""
    inverse = {v: k for k, v in _MLP1_TO_HF.items()}
    return {inverse[k.split(".")[0] + "."] + k.split(".", 1)[1]: v for k, v in convert_projector_state_dict(state_dict).items()}


def projector_act(act: nn.Module) -> str:
    """``"gelu"`` or ``"gelu_tanh"`` for a projector's activation module (transformers' GELU
    classes or ``nn.GELU``); anything else is an error."""
    name = type(act).__name__
    if getattr(act, "approximate", "none") == "tanh" or "Tanh" in name:
        return "gelu_tanh"
    if name in ("GELU", "GELUActivation"):
        return "gelu"
    raise ValueError(f"unsupported projector activation {name}; CompressProjector implements exact and tanh GELU")


def infer_grid(x: torch.Tensor, grid: tuple[int, int] | None, *, identity_ok: bool) -> tuple[torch.Tensor, tuple[int, int]]:
    """``(x as (tiles, tokens, C), grid)``: a 4-D ``(tiles, H, W, C)`` input gives its grid; a
    3-D one a square grid, or ``(1, tokens)`` when the op is row-wise (``identity_ok``)."""
    if x.dim() == 4:
        if grid is not None and tuple(grid) != tuple(x.shape[1:3]):
            raise ValueError(f"grid={grid} does not match the 4-D input's grid {tuple(x.shape[1:3])}")
        return x.flatten(1, 2), (x.shape[1], x.shape[2])
    if x.dim() != 3:
        raise ValueError(f"x must be (tiles, tokens, C) or (tiles, H, W, C), got shape {tuple(x.shape)}")
    if grid is not None:
        return x, check_grid(tuple(grid) if isinstance(grid, list) else grid)
    side = math.isqrt(x.shape[1])
    if side * side == x.shape[1]:
        return x, (side, side)
    if identity_ok:
        return x, (1, x.shape[1])
    raise ValueError(f"x has {x.shape[1]} tokens per tile, not a square grid: pass grid=(grid_h, grid_w)")


class CompressProjector(nn.Module):
    """Token merge + InternVL projector, fused: ViT patch tokens in, LLM-width embeddings out.

    Args:
        in_features: width of the tokens ``forward`` receives (the ViT width with
            ``scale=0.5``; the pixel-shuffled width with ``scale=1.0``).
        out_features: LLM width.
        hidden_features: width of ``linear_1`` (default ``out_features``, as in InternVL).
        scale: pixel-shuffle scale applied inside (0.5 = InternVL's ``downsample_ratio``;
            1.0 when the input is already shuffled, which with ``merge=1`` makes this module a
            drop-in replacement for transformers' ``InternVLMultiModalProjector``).
        merge: tokens merged per window on the shuffled grid (1, 2 or 4).
        mode: ``"avg"``, ``"dwconv"`` or ``"conv"``; learnable modes start equal to avg.
        act: ``"gelu"`` (exact) or ``"gelu_tanh"``.
        merge_bias: whether a learnable mode has a bias (default True; a warning for avg).
        backend: passed to :func:`fcot_kernels.compress_project` (None: process default).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden_features: int | None = None,
        *,
        scale: float = 0.5,
        merge: int = 1,
        mode: str = "avg",
        act: str = "gelu",
        eps: float = 1e-5,
        merge_bias: bool | None = None,
        backend: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is not supported; expected one of {MODES}")
        if act not in ACTS:
            raise ValueError(f"act={act!r} is not supported; expected one of {ACTS}")
        check_merge(merge)
        check_shuffle_scale(scale)
        check_int_range("in_features", in_features, low=1)
        check_int_range("out_features", out_features, low=1)
        if hidden_features is not None:
            check_int_range("hidden_features", hidden_features, low=1)
        check_eps(eps)
        r = round(1 / scale)
        if r < 1 or abs(r * scale - 1) > 1e-9:
            raise ValueError(f"scale={scale} is not supported: expected 1/r for an integer r (0.5, 1.0)")
        if mode == "avg" and merge_bias is not None:
            warnings.warn("merge_bias has no effect with mode='avg' (avg has no parameters)", stacklevel=2)
        merge_bias = True if merge_bias is None else merge_bias
        factory = dict(device=device, dtype=dtype)
        self.in_features, self.out_features = in_features, out_features
        self.hidden_features = hidden_features or out_features
        self.scale, self.merge, self.mode, self.act, self.backend = scale, merge, mode, act, backend
        width = in_features * r * r
        self.width = width
        self.layer_norm = nn.LayerNorm(width, eps=eps, **factory)
        self.linear_1 = nn.Linear(width, self.hidden_features, **factory)
        self.linear_2 = nn.Linear(self.hidden_features, out_features, **factory)
        if mode == "avg":
            self.register_parameter("merge_weight", None)
            self.register_parameter("merge_bias", None)
        else:
            self.merge_weight = nn.Parameter(torch.empty(avg_merge_weight(mode, merge, width).shape, **factory))
            if merge_bias:
                self.merge_bias = nn.Parameter(torch.empty(width, **factory))
            else:
                self.register_parameter("merge_bias", None)
            self.reset_merge_parameters()

    @torch.no_grad()
    def reset_merge_parameters(self) -> None:
        """Set a learnable merge to exactly the avg merge (bias zero): training starts where
        training-free pooling is."""
        if self.merge_weight is None:
            return
        self.merge_weight.copy_(avg_merge_weight(self.mode, self.merge, self.width))
        if self.merge_bias is not None:
            self.merge_bias.zero_()

    @classmethod
    def from_projector(
        cls,
        module: nn.Module,
        *,
        merge: int = 1,
        mode: str = "avg",
        scale: float = 0.5,
        merge_bias: bool | None = None,
        backend: str | None = None,
    ) -> CompressProjector:
        """A student built from a teacher's projector: its LayerNorm and Linears copied (same
        dtype and device), the merge initialised to avg. ``module`` is a transformers
        ``InternVLMultiModalProjector`` or an OpenGVLab ``mlp1`` Sequential."""
        if all(hasattr(module, n) for n in ("layer_norm", "linear_1", "act", "linear_2")):
            ln, l1, act, l2 = module.layer_norm, module.linear_1, module.act, module.linear_2
        elif isinstance(module, nn.Sequential) and len(module) == 4:
            ln, l1, act, l2 = module[0], module[1], module[2], module[3]
        else:
            raise TypeError(
                f"from_projector needs a transformers InternVLMultiModalProjector or an mlp1 Sequential(LayerNorm, "
                f"Linear, GELU, Linear), got {type(module).__name__}"
            )
        width = ln.normalized_shape[0]
        r = round(1 / scale)
        if width % (r * r):
            raise ValueError(f"the projector's width {width} is not divisible by 1/scale**2 = {r * r}")
        student = cls(
            width // (r * r), l2.out_features, l1.out_features, scale=scale, merge=merge, mode=mode,
            act=projector_act(act), eps=ln.eps, merge_bias=merge_bias, backend=backend,
            device=l1.weight.device, dtype=l1.weight.dtype,
        )
        student.load_projector_state_dict(module.state_dict())
        return student

    def load_projector_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load a projector's weights (transformers or ``mlp1`` keys, see
        :func:`convert_projector_state_dict`); the merge parameters are left as they are."""
        missing, unexpected = self.load_state_dict(convert_projector_state_dict(state_dict), strict=False)
        missing = [k for k in missing if not k.startswith("merge_")]
        if missing or unexpected:
            raise KeyError(f"projector state dict mismatch: missing {missing}, unexpected {unexpected}")

    def projector_state_dict(self, format: str = "transformers") -> dict[str, torch.Tensor]:
        """The projector's weights (without the merge) in ``"transformers"`` or ``"mlp1"`` keys."""
        sd = {k: v for k, v in self.state_dict().items() if k in _HF_KEYS}
        if format == "transformers":
            return sd
        if format == "mlp1":
            return to_mlp1_state_dict(sd)
        raise ValueError(f"format={format!r} is not supported; expected 'transformers' or 'mlp1'")

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """``x``: ``(tiles, tokens, in_features)`` row-major over a grid (square unless ``grid``
        is given) or ``(tiles, H, W, in_features)``. Returns ``(tiles, tokens_out, out_features)``."""
        x, grid = infer_grid(x, grid, identity_ok=self.scale == 1.0 and self.merge == 1)
        return fcot_kernels.compress_project(
            x,
            grid=grid,
            ln_weight=self.layer_norm.weight,
            ln_bias=self.layer_norm.bias,
            w1=self.linear_1.weight,
            b1=self.linear_1.bias,
            w2=self.linear_2.weight,
            b2=self.linear_2.bias,
            scale=self.scale,
            merge=self.merge,
            mode=self.mode,
            merge_weight=self.merge_weight,
            merge_bias=self.merge_bias,
            eps=self.layer_norm.eps,
            act=self.act,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, hidden_features={self.hidden_features}, "
            f"scale={self.scale}, merge={self.merge}, mode={self.mode!r}, act={self.act!r}, backend={self.backend!r}"
        )
