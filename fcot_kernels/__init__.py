"""fcot_kernels: fused kernels for FCoT-VL visual-token compression.

One public function per op; each takes ``backend=`` (see :mod:`fcot_kernels.dispatch`) and
has a pure-PyTorch reference in :mod:`fcot_kernels.reference`. Importing this package never
needs a GPU, triton at import time, or the compiled extension.
"""

from ._alloc import poison_outputs
from .dispatch import BackendUnavailableError, BackendStatus, backends, current_backend, use_backend
from .ops.compress_project import compress_project
from .ops.fused_linear_distill import fused_linear_distill
from .ops.merged_attention import merged_attention
from .ops.shuffle_merge_norm import shuffle_merge_norm
from .ops.tome_merge import tome_match, tome_merge

__all__ = [
    "BackendStatus",
    "BackendUnavailableError",
    "backends",
    "compress_project",
    "current_backend",
    "fused_linear_distill",
    "merged_attention",
    "poison_outputs",
    "shuffle_merge_norm",
    "tome_match",
    "tome_merge",
    "use_backend",
]
