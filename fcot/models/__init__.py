"""One module per model family, each exporting ONE :class:`~fcot.models.family.ModelFamily`
instance named ``FAMILY``; every module of this package is imported here and its ``FAMILY``
registered under its ``model_type`` (:data:`FAMILIES`), so a new family is one new file.
:func:`get_family` finds a model's family (a clear error for an unknown ``model_type``)."""

from __future__ import annotations

import importlib
import pkgutil

from .base import FcotError, FcotOptions, FcotProjector, Patch
from .family import FAMILIES, ChatFormat, FamilyParts, Loaded, ModelFamily, dtype_kwarg, get_family, make_tiler, register_family

_SHARED = {"attention", "autoload", "base", "family", "tiny"}  # helpers, not families

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name.startswith("_") or _info.name in _SHARED:
        continue
    _family = getattr(importlib.import_module(f"{__name__}.{_info.name}"), "FAMILY", None)
    if _family is not None:
        register_family(_family)

__all__ = ["FAMILIES", "ChatFormat", "FamilyParts", "FcotError", "FcotOptions", "FcotProjector", "Loaded", "ModelFamily",
           "Patch", "dtype_kwarg", "get_family", "make_tiler", "register_family"]
