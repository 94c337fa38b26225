"""Pure-PyTorch references: the semantics every kernel is tested and benchmarked against."""

from .compress_project import avg_merge_weight, compress_project_ref, merge_tokens_ref
from .fused_linear_distill import divergence_ref, fused_linear_distill_ref
from .merged_attention import attention_probs_ref, merged_attention_ref
from .shuffle_merge_norm import pixel_shuffle_ref, shuffle_merge_norm_ref, shuffle_merge_ref
from .tome_merge import tome_match_ref, tome_merge_ref

__all__ = [
    "attention_probs_ref",
    "avg_merge_weight",
    "compress_project_ref",
    "divergence_ref",
    "fused_linear_distill_ref",
    "merge_tokens_ref",
    "merged_attention_ref",
    "pixel_shuffle_ref",
    "shuffle_merge_norm_ref",
    "shuffle_merge_ref",
    "tome_match_ref",
    "tome_merge_ref",
]
