"""Pure-PyTorch references: the semantics every kernel is tested and benchmarked against."""

from .fused_linear_distill import divergence_ref, fused_linear_distill_ref
from .shuffle_merge_norm import pixel_shuffle_ref, shuffle_merge_norm_ref, shuffle_merge_ref
from .merged_attention import attention_probs_ref, merged_attention_ref
from .tome_merge import tome_match_ref, tome_merge_ref

__all__ = ["pixel_shuffle_ref", "shuffle_merge_norm_ref", "shuffle_merge_ref"]
__all__ += ["divergence_ref", "fused_linear_distill_ref"]
__all__ += ["attention_probs_ref", "merged_attention_ref"]
__all__ += ["tome_match_ref", "tome_merge_ref"]
