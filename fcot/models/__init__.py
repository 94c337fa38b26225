"""One file per model family; :data:`PATCHERS` maps ``config.model_type`` to its patch function
(``patch(model, processor, compressor, patch)``), which :func:`fcot.apply_fcot` calls."""

from __future__ import annotations

from .base import FcotError, FcotOptions, FcotProjector, Patch
from .internvl import patch_internvl
from .internvl_chat import patch_internvl_chat

PATCHERS = {
    "internvl": patch_internvl,
    "internvl_chat": patch_internvl_chat,
}
"""``config.model_type`` -> patch function."""

__all__ = ["PATCHERS", "FcotError", "FcotOptions", "FcotProjector", "Patch"]
