"""fcot: the FCoT-VL method on top of fcot_kernels (compressors, model integration, training
loops, CLI). It uses only the public ``fcot_kernels`` API.

``fcot.apply_fcot(model, processor, compressor="conv", ratio=0.5)`` compresses an InternVL
model's visual tokens in place (one instance); ``fcot.revert_fcot(model)`` undoes it;
``fcot.load_compressed(path)`` loads what ``save_pretrained`` wrote from a patched model.
"""

__version__ = "0.1.0"

from .compress import COMPRESSORS, Compressor, register_compressor  # noqa: E402
from .models.base import FcotError  # noqa: E402
from .patch import apply_fcot, is_patched, load_compressed, revert_fcot  # noqa: E402

__all__ = [
    "COMPRESSORS",
    "Compressor",
    "FcotError",
    "apply_fcot",
    "is_patched",
    "load_compressed",
    "register_compressor",
    "revert_fcot",
]
