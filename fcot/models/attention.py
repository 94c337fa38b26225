"""Proportional attention in the LLM: :func:`fcot_kernels.merged_attention` registered in
transformers' attention-function registry (``AttentionInterface``) under ``"fcot_merged"``.

A patched instance's text config (its private copy) gets ``_attn_implementation =
"fcot_merged"``; transformers' attention modules then call :func:`fcot_attention_forward`
instead of SDPA. No module's ``forward`` is replaced. The function finds the instance's
:class:`~fcot.models.base.FcotState` from the module's config and adds ``log(size)`` of every
visual token to its keys' logits (ToMe's proportional attention); text and decoded tokens get 0.

Masks: ``merged_attention`` is causal (bottom-right aligned) with a per-key bias, so a padding
mask becomes a very negative key bias. Other masks (sliding windows, packed sequences, static
caches) raise rather than being approximated.
"""

from __future__ import annotations

import weakref

import torch

import fcot_kernels as fk

from .base import FcotError, FcotState

ATTENTION_NAME = "fcot_merged"
HEAD_DIMS = (64, 80, 96, 128)
"""Head dims ``merged_attention`` supports."""
_MASKED = -1.0e30
"""Key bias of padding (finite, as merged_attention requires; exp() of it is 0 in fp32)."""

_STATES: dict[int, FcotState] = {}
"""id(text config of a patched instance) -> its state."""


def register_state(config, state: FcotState) -> None:
    _STATES[id(config)] = state


def unregister_state(config) -> None:
    _STATES.pop(id(config), None)


def _key_padding(mask: torch.Tensor | None, batch: int, lq: int, lk: int) -> torch.Tensor | None:
    """``keep (B, L_k)`` from transformers' 4-D mask when it is causal + key padding; raise otherwise."""
    if mask is None:
        return None
    if mask.dim() == 4 and mask.shape[-1] > lk:
        mask = mask[..., :lk]  # transformers 4.x may build one column more than the keys (its eager path slices too)
    if mask.dim() != 4 or mask.shape[-2:] != (lq, lk) or mask.shape[1] != 1:
        raise FcotError(f"proportional attention got an attention mask of shape {tuple(mask.shape)}; expected (B, 1, {lq}, {lk})")
    allowed = mask[:, 0] if mask.dtype == torch.bool else mask[:, 0] > torch.finfo(mask.dtype).min / 2
    allowed = allowed.expand(batch, lq, lk)
    keep = allowed[:, -1, :]  # the last query sees every key of its sequence under a causal mask
    causal = torch.ones(lq, lk, dtype=torch.bool, device=mask.device).tril(lk - lq)
    expected = causal & keep[:, None, :]
    real_rows = keep[:, lk - lq:]  # padded query rows are never read: ignore them
    if not bool(((allowed == expected) | ~real_rows[..., None]).all()):
        raise FcotError(
            "proportional attention supports causal masks with padding only (no sliding window, packed "
            "sequences or static cache); turn proportional_attention off for this use"
        )
    return None if bool(keep.all()) else keep


def fcot_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention-function contract: q ``(B, H, L_q, D)``, k/v ``(B, H_kv, L_k, D)``
    -> ``(B, L_q, H, D)``, no weights."""
    state = _STATES.get(id(getattr(module, "config", None)))
    if state is None:
        raise FcotError(
            f"the '{ATTENTION_NAME}' attention runs only inside a model patched by fcot.apply_fcot(..., "
            f"proportional_attention=True); {type(module).__name__} is not part of one"
        )
    if dropout and module.training:
        raise FcotError(f"proportional attention has no attention dropout (got dropout={dropout} in training)")
    if kwargs.get("sliding_window") is not None:
        raise FcotError("proportional attention does not support sliding-window attention layers")
    if not getattr(module, "is_causal", True):
        raise FcotError(f"proportional attention is for the causal LLM; {type(module).__name__} is not causal")
    batch, _, lq, _ = query.shape
    lk = key.shape[2]
    bias = state.key_log_size(batch, lk, query.device)
    cached = state.mask_cache
    if attention_mask is not None and cached is not None and cached[0]() is attention_mask:
        keep = cached[1]
    else:
        keep = _key_padding(attention_mask, batch, lq, lk)
        state.mask_cache = (weakref.ref(attention_mask), keep) if attention_mask is not None else None
    if keep is not None:
        bias = torch.zeros(batch, lk, device=query.device) if bias is None else bias
        bias = bias.masked_fill(~keep, _MASKED)
    out = fk.merged_attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
        key_log_size=bias, causal=True, scale=scaling, backend=state.backend,
    )
    return out, None


def register_attention() -> None:
    """Register ``"fcot_merged"`` with transformers (idempotent): the attention function, and
    SDPA's boolean mask builder for it where transformers has a mask registry (>= 4.53)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, fcot_attention_forward)
    try:
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:  # transformers < 4.53 builds an eager-style float mask itself
        return
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def enable(patch, text_config, layers_module: torch.nn.Module) -> None:
    """Switch the instance's (private) text config to ``"fcot_merged"``; checks that the LLM
    dispatches through ``AttentionInterface`` and that its head dim is supported."""
    if not getattr(type(layers_module), "_supports_attention_backend", False):
        raise FcotError(
            f"proportional_attention=True needs an LLM that dispatches attention through transformers' "
            f"AttentionInterface; {type(layers_module).__name__} does not (set proportional_attention=False)"
        )
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    if head_dim not in HEAD_DIMS:
        raise FcotError(f"proportional attention runs merged_attention, which supports head_dim in {HEAD_DIMS}; the LLM has {head_dim}")
    register_attention()
    # The config is the instance's private copy (dropped by revert), so no undo is needed.
    text_config._attn_implementation = ATTENTION_NAME
    register_state(text_config, patch.state)
    patch.on_revert(lambda: unregister_state(text_config))
