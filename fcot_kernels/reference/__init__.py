"""Pure-PyTorch references: the semantics every kernel is tested and benchmarked against."""

from .shuffle_merge_norm import pixel_shuffle_ref, shuffle_merge_norm_ref, shuffle_merge_ref

__all__ = ["pixel_shuffle_ref", "shuffle_merge_norm_ref", "shuffle_merge_ref"]
from .compress_project import avg_merge_weight, compress_project_ref, merge_tokens_ref

__all__ += ["avg_merge_weight", "compress_project_ref", "merge_tokens_ref"]
