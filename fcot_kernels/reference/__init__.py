"""Pure-PyTorch references: the semantics every kernel is tested and benchmarked against."""

from .shuffle_merge_norm import pixel_shuffle_ref, shuffle_merge_norm_ref, shuffle_merge_ref
from .tome_merge import tome_match_ref, tome_merge_ref

__all__ = ["pixel_shuffle_ref", "shuffle_merge_norm_ref", "shuffle_merge_ref"]
__all__ += ["tome_match_ref", "tome_merge_ref"]
