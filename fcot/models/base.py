"""What every model family's patch shares: the options, the per-instance undo log, the
compressed projector that replaces the model's, the runtime state the hooks and the attention
function read, and the checks that run before any forward.

A patch never touches a class or another instance: it rebinds attributes of this instance's
modules (recorded in :class:`Patch` and undone in reverse by ``revert``), registers hooks whose
handles it keeps, and gives the instance its own copy of its config so that a config object
shared with other instances is never mutated.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

import fcot_kernels as fk
from fcot_kernels.reference import pixel_shuffle_ref

from ..compress import Compressor
from ..modules import CompressProjector, convert_projector_state_dict, to_mlp1_state_dict

FCOT_VERSION = 1
"""Version of the ``config.fcot`` section's layout."""


class FcotError(ValueError):
    """A model, processor or input that fcot cannot patch or run, with what to change."""


@dataclass(frozen=True)
class FcotOptions:
    """What ``apply_fcot`` was asked for (validated by :func:`fcot.patch.apply_fcot`)."""

    compressor: str
    """Registered compressor name (:data:`fcot.compress.COMPRESSORS`)."""
    ratio: float
    """Fraction of the visual tokens removed per tile (0.5: 256 -> 128; 0.75: 256 -> 64)."""
    fused: bool
    """Run the image path through the fcot_kernels ops (``backend``); else the PyTorch references."""
    backend: str | None
    """fcot_kernels backend for the fused ops (None: the process default)."""
    proportional_attention: bool
    """Add log(size) of each visual token to its attention logits in the LLM."""

    @property
    def kernel_backend(self) -> str | None:
        return self.backend if self.fused else "reference"


class Patch:
    """The undo log of one patched instance, stored as ``model._fcot_patch``."""

    def __init__(self, model: nn.Module, options: FcotOptions, family: str) -> None:
        self.model, self.options, self.family = model, options, family
        self._undo: list[Callable[[], None]] = []
        self.state = FcotState(options.kernel_backend)
        self.info: dict[str, Any] = {}

    def setattr(self, obj: Any, name: str, value: Any) -> None:
        """``setattr`` on one object, undone by restoring the old value (or removing the
        instance attribute when there was none, so the class attribute shows again)."""
        own = name in vars(obj) or (isinstance(obj, nn.Module) and name in obj._modules)
        old = getattr(obj, name) if own else None
        setattr(obj, name, value)

        def undo() -> None:
            if own:
                setattr(obj, name, old)
            else:
                delattr(obj, name)

        self._undo.append(undo)

    def hook(self, handle: Any) -> None:
        self._undo.append(handle.remove)

    def on_revert(self, fn: Callable[[], None]) -> None:
        self._undo.append(fn)

    def own_config(self) -> Any:
        """Give the instance private deep copies of its config objects (``model.config``, its
        sub-configs, and any other config a submodule holds) and rebind every module attribute
        that held one of the old objects; returns the copy of ``model.config``."""
        from transformers import PretrainedConfig

        top = self.model.config
        roots: dict[int, Any] = {id(top): top}
        for module in self.model.modules():
            for value in vars(module).values():
                if isinstance(value, PretrainedConfig):
                    roots.setdefault(id(value), value)
        olds = list(roots.values())
        news = copy.deepcopy(olds)  # one memo: objects shared among the configs stay shared
        mapping = {id(o): n for o, n in zip(olds, news)}
        for old, new in zip(olds, news):
            for name, value in vars(old).items():
                if isinstance(value, PretrainedConfig):
                    mapping.setdefault(id(value), getattr(new, name))
        for module in self.model.modules():
            for attr, value in list(vars(module).items()):
                if id(value) in mapping and not attr.startswith("_fcot"):
                    self.setattr(module, attr, mapping[id(value)])
        return mapping[id(top)]

    def revert(self) -> None:
        while self._undo:
            self._undo.pop()()


class FcotState:
    """Runtime state of one patched instance, written by the pre-forward hooks and the
    projector, read by the projector and the proportional-attention function."""

    def __init__(self, backend: str | None) -> None:
        self.backend = backend
        self.importance: torch.Tensor | None = None
        self.image_mask: torch.Tensor | None = None
        self.sizes: torch.Tensor | None = None
        self.tile_keep: torch.Tensor | None = None
        self._bias: torch.Tensor | None = None
        self.mask_cache: tuple[Any, Any] | None = None
        """(weak reference to the last attention mask, its key padding): every layer of one
        forward gets the same mask object, so it is checked once."""

    def start(self, image_mask: torch.Tensor | None, tile_keep: torch.Tensor | None = None) -> None:
        """A new sequence begins (prefill): ``image_mask`` (B, L) marks its visual tokens, or None.
        The sizes of its visual tokens are set by the projector, before or after this call
        (transformers >= 5 generate encodes the images before the prefill forward).
        ``tile_keep`` (tiles,) bool: the tiles whose features enter the sequence (OpenGVLab's
        ``image_flags``), None for all."""
        self.image_mask, self.tile_keep, self._bias = image_mask, tile_keep, None

    def set_sizes(self, sizes: torch.Tensor) -> None:
        self.sizes, self._bias = sizes, None

    def key_log_size(self, batch: int, keys: int, device: torch.device) -> torch.Tensor | None:
        """fp32 ``(batch, keys)``: log(size) at the visual tokens of the current sequences, 0
        elsewhere (decoded tokens after the prefill included); None without visual tokens."""
        if self.image_mask is None:
            return None
        if self._bias is None:
            count = int(self.image_mask.sum())
            sizes = self.sizes
            if sizes is not None and self.tile_keep is not None:
                sizes = sizes[self.tile_keep.to(sizes.device)]
            if sizes is None or sizes.numel() != count:
                raise FcotError(
                    f"proportional attention: the sequences hold {count} visual tokens but the last image features had "
                    f"{None if sizes is None else sizes.numel()}"
                )
            bias = torch.zeros(self.image_mask.shape, dtype=torch.float32, device=device)
            bias[self.image_mask.to(device)] = sizes.reshape(-1).to(device=device, dtype=torch.float32).log()
            self._bias = bias
        bias = self._bias
        if bias.shape[0] != batch or bias.shape[1] > keys:
            raise FcotError(
                f"proportional attention: the attention has batch {batch} and {keys} keys but the last prefill of this "
                f"model had shape {tuple(bias.shape)}; run the patched model's forward/generate, not its language model alone"
            )
        if bias.shape[1] < keys:
            bias = torch.nn.functional.pad(bias, (0, keys - bias.shape[1]))
        return bias


def cls_importance(attn: nn.Module, hidden: torch.Tensor, backend: str | None) -> torch.Tensor:
    """``(tiles, N - 1)``: the attention the ViT's CLS row pays each patch in ``attn``'s layer,
    averaged over heads, from :func:`fcot_kernels.merged_attention`'s importance side-output.

    ``attn`` is transformers' ``InternVLVisionAttention`` (q_proj/k_proj, q_norm/k_norm) or
    OpenGVLab's InternViT attention (qkv, optional qk_normalization); ``hidden`` its input."""
    b, n, _ = hidden.shape
    heads, dim = attn.num_heads, attn.head_dim
    if hasattr(attn, "q_proj"):
        q, k = attn.q_norm(attn.q_proj(hidden)), attn.k_norm(attn.k_proj(hidden))
    elif hasattr(attn, "qkv"):
        qkv = attn.qkv(hidden).reshape(b, n, 3, heads * dim)
        q, k = qkv[:, :, 0], qkv[:, :, 1]
        if getattr(attn, "qk_normalization", False):
            q, k = attn.q_norm(q), attn.k_norm(k)
    else:
        raise FcotError(f"cannot read q/k from the ViT attention {type(attn).__name__} (no q_proj or qkv)")
    q, k = q.reshape(b, n, heads, dim), k.reshape(b, n, heads, dim)
    # The output is not needed, only the CLS row's probabilities: k stands in for v.
    _, importance = fk.merged_attention(q, k, k, scale=attn.scale, importance_rows=[0], backend=backend)
    return importance[:, 1:]


def vit_layer_index(select: int, layers: int) -> int:
    """The encoder layer whose output ``hidden_states[select]`` is (``select=-1``: the last)."""
    i = select if select >= 0 else layers + 1 + select
    if not 1 <= i <= layers:
        raise FcotError(f"the vision feature layer {select} is the embeddings, not a ViT layer: compressor='prune' needs one")
    return i - 1


def attach_cls_importance(patch: Patch, attn: nn.Module) -> None:
    """Record the CLS row's attention of ``attn``'s layer on every ViT forward (for ``prune``)."""
    state = patch.state

    def hook(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        with torch.no_grad():
            state.importance = cls_importance(module, hidden, state.backend)

    patch.hook(attn.register_forward_hook(hook, with_kwargs=True))


def passthrough_shuffle(patch: Patch, expected_scale: float) -> Callable[..., torch.Tensor]:
    """Stands in for the model's ``pixel_shuffle``: the fused projector shuffles inside its
    kernel, so the ViT grid passes through unchanged."""

    def pixel_shuffle(vision_features: torch.Tensor, scale_factor: float = 0.5) -> torch.Tensor:
        if abs(scale_factor - expected_scale) > 1e-9:
            raise FcotError(f"pixel_shuffle was called with scale_factor={scale_factor}; fcot was applied for {expected_scale}")
        return vision_features

    return pixel_shuffle


class FcotProjector(CompressProjector):
    """The patched model's projector: ViT patch tokens -> compressor -> InternVL projector.

    Window compressors (``none``/``avg``/``dwconv``/``conv``) run as one
    :func:`fcot_kernels.compress_project` call (shuffle + merge + LayerNorm + MLP); the others
    shuffle, compress (``tome``, ``prune``), then run the projector through the same op with no
    merge. With ``fused=False`` every op is the PyTorch reference. The projector weights keep
    the teacher's names (``layer_norm``/``linear_1``/``linear_2``, or ``0``/``1``/``3`` for an
    OpenGVLab ``mlp1``) in the state dict; the compressor's sit under ``compressor.``.
    """

    def attach(self, compressor: Compressor, patch: Patch, *, key_format: str) -> FcotProjector:
        self.compressor = compressor.to(device=self.linear_1.weight.device, dtype=self.linear_1.weight.dtype)
        self._fcot_state = patch.state
        self._fcot_fused = patch.options.fused
        self._fcot_sizes = patch.options.proportional_attention
        self.key_format = key_format
        if key_format == "mlp1":
            self._register_state_dict_hook(_to_mlp1_keys)
            self._register_load_state_dict_pre_hook(_from_mlp1_keys)
        return self

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        x, grid = _square(x)
        tiles, _, channels = x.shape
        comp, r = self.compressor, round(1 / self.scale)
        common = dict(
            ln_weight=self.layer_norm.weight, ln_bias=self.layer_norm.bias, w1=self.linear_1.weight, b1=self.linear_1.bias,
            w2=self.linear_2.weight, b2=self.linear_2.bias, eps=self.layer_norm.eps, act=self.act, backend=self.backend,
        )
        if comp.merge_mode is not None and self._fcot_fused:
            out = fk.compress_project(
                x, grid=grid, scale=self.scale, merge=comp.merge, mode=comp.merge_mode,
                merge_weight=comp.merge_weight, merge_bias=comp.merge_bias, **common,
            )
            sizes = torch.full(out.shape[:2], float(comp.merge), device=x.device) if self._fcot_sizes else None
        else:
            shuffled_grid = (grid[0] // r, grid[1] // r)
            y = pixel_shuffle_ref(x.reshape(tiles, grid[0], grid[1], channels), r).reshape(tiles, -1, channels * r * r)
            importance = None
            if comp.name == "prune" and self._fcot_state.importance is not None:
                imp = self._fcot_state.importance
                if imp.shape != (tiles, grid[0] * grid[1]):
                    raise FcotError(f"the ViT CLS importance has shape {tuple(imp.shape)}, expected {(tiles, grid[0] * grid[1])}")
                # A shuffled token's importance: the sum over the r x r patches it holds.
                importance = pixel_shuffle_ref(imp.reshape(tiles, grid[0], grid[1], 1), r).sum(-1).reshape(tiles, -1)
                self._fcot_state.importance = None
            res = comp(y, shuffled_grid, importance=importance)
            out = fk.compress_project(res.tokens, grid=(1, res.tokens.shape[1]), scale=1.0, merge=1, mode="avg", **common)
            sizes = res.sizes if self._fcot_sizes else None
        if sizes is not None:
            self._fcot_state.set_sizes(sizes)
        return out

    def extra_repr(self) -> str:
        return super().extra_repr() + f", fused={self._fcot_fused}, key_format={self.key_format!r}"


def _square(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    if x.dim() == 4:
        return x.flatten(1, 2), (x.shape[1], x.shape[2])
    side = math.isqrt(x.shape[1])
    if x.dim() != 3 or side * side != x.shape[1]:
        raise FcotError(f"the projector expects (tiles, side*side, C) ViT tokens, got shape {tuple(x.shape)}")
    return x, (side, side)


_HF_PARTS = ("layer_norm.", "linear_1.", "linear_2.")


def _to_mlp1_keys(module, state_dict, prefix, local_metadata):
    keys = [k for k in state_dict if k.startswith(prefix) and k[len(prefix):].startswith(_HF_PARTS)]
    sub = {k[len(prefix):]: state_dict.pop(k) for k in keys}
    for k, v in to_mlp1_state_dict(sub).items():
        state_dict[prefix + k] = v
    return state_dict


def _from_mlp1_keys(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    keys = [k for k in state_dict if k.startswith(prefix) and k[len(prefix):].split(".")[0] in ("0", "1", "3")]
    if keys:
        sub = {k[len(prefix):]: state_dict.pop(k) for k in keys}
        for k, v in convert_projector_state_dict(sub).items():
            state_dict[prefix + k] = v


def build_projector(teacher: nn.Module, compressor: Compressor, patch: Patch, *, scale: float, key_format: str) -> FcotProjector:
    """The student projector: the teacher's weights (same dtype and device), the compressor."""
    student = FcotProjector.from_projector(teacher, merge=1, mode="avg", scale=scale, backend=patch.options.kernel_backend)
    return student.attach(compressor, patch, key_format=key_format)


def check_image_tokens(
    input_ids: torch.Tensor | None, image_token_id: int, tiles: int | None, tokens_out: int, tokens_base: int, fix: str
) -> torch.Tensor | None:
    """The visual-token mask of ``input_ids`` after checking its count against ``tiles`` x
    ``tokens_out``; an :class:`FcotError` naming the side to fix otherwise."""
    if input_ids is None:
        return None
    mask = input_ids == image_token_id
    if tiles is None:
        return mask
    found, expected = int(mask.sum()), tiles * tokens_out
    if found == expected:
        return mask
    if found == tiles * tokens_base:
        raise FcotError(
            f"input_ids hold {tokens_base} image tokens per tile ({found} for {tiles} tiles) but the fcot-compressed "
            f"model takes {tokens_out} per tile ({expected}): the inputs were made for the uncompressed model. {fix}"
        )
    raise FcotError(
        f"input_ids hold {found} image tokens but pixel_values' {tiles} tiles give {expected} visual tokens "
        f"({tokens_out} per tile after fcot compression). {fix}"
    )


def fcot_section(options: FcotOptions, tokens_out: int, base: dict[str, Any], importance: str | None) -> dict[str, Any]:
    """The ``config.fcot`` section: enough to rebuild the patch (``fcot.load_compressed``)."""
    section = {
        "version": FCOT_VERSION, "compressor": options.compressor, "ratio": options.ratio,
        "proportional_attention": options.proportional_attention, "tokens_per_tile": tokens_out, "base": base,
    }
    if importance is not None:
        section["importance"] = importance
    return section


__all__ = ["FcotError", "FcotOptions", "FcotProjector", "FcotState", "Patch"]
