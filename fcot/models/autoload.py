"""Compressed checkpoints that the tools people use can load.

``save_pretrained`` on a patched model (the patch binds :func:`save_pretrained` to the
instance) writes what transformers writes, then makes the folder self-contained:

- **the model's own code**: for remote-code models (a class in ``transformers_modules``) every
  ``.py`` file its module imports, relatively and recursively (transformers 4.x copies only the
  config's files when the model class was never registered for an auto class);
- **``fcot_autoload.py``**: a small module that subclasses the model's class and whose
  ``from_pretrained`` calls :func:`fcot.load_compressed`; it imports fcot inside ``try`` (which
  transformers' import check skips) and raises ``ImportError`` naming ``pip install fcot-vl``
  when fcot is missing;
- **``config.json``**: ``auto_map`` entries for the family's auto classes pointing at
  ``fcot_autoload`` (the remote-code family keeps its own ``AutoConfig``), and, for the native
  family, the UNCOMPRESSED ``image_seq_length`` at the top level (the compressed count is in the
  ``fcot`` section and set again by the patch): a plain, untrusted ``from_pretrained`` builds
  the uncompressed model consistently instead of a full projector with the compressed token
  count, so transformers' "Image features and image tokens do not match" cannot be reached
  from the model's own config.

So ``AutoModel.from_pretrained(path, trust_remote_code=True)`` (lmms-eval, VLMEvalKit,
OpenGVLab's scripts) returns the compressed model, the same as ``fcot.load_compressed(path)``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import types
from pathlib import Path
from typing import Any

from torch import nn

AUTOLOAD_MODULE = "fcot_autoload"

_STUB = '''"""Written by fcot-vl (FCoT-VL visual-token compression for InternVL) when this checkpoint was
saved: transformers' auto classes load it through here as the COMPRESSED model, by calling
fcot.load_compressed. Needs the fcot package: pip install fcot-vl"""

try:
    import fcot
except ImportError as e:  # inside try: transformers' import check skips it, so this message is the one shown
    raise ImportError(
        "This checkpoint is an FCoT-VL compressed InternVL (saved by fcot-vl); loading it needs the fcot package: "
        "pip install fcot-vl"
    ) from e

{imports}


def _load(pretrained_model_name_or_path, *model_args, **kwargs):
    kwargs.pop("config", None)  # the auto class's config; fcot reads the checkpoint's own
    kwargs.setdefault("trust_remote_code", True)  # this file runs only when the caller trusted the folder
    for key in ("adapter_kwargs", "code_revision"):
        kwargs.pop(key, None)
    return fcot.load_compressed(pretrained_model_name_or_path, *model_args, model_class={base}, **kwargs)

{classes}'''

_CLASS = '''

class {name}({base}):
    """{base} with FCoT-VL visual-token compression (fcot.load_compressed)."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        return _load(pretrained_model_name_or_path, *model_args, **kwargs)
'''


def save_pretrained(self: nn.Module, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
    """The patched instance's ``save_pretrained``: the class's, then :func:`finish_checkpoint`."""
    restore = _tolerate_no_defaults(self.config)
    try:
        out = type(self).save_pretrained(self, save_directory, *args, **kwargs)
    finally:
        if restore is not None:
            self.config.__class__ = restore
    if _is_main_process(kwargs):
        finish_checkpoint(self, save_directory)
    return out


def _tolerate_no_defaults(config: Any) -> type | None:
    """OpenGVLab's ``InternVLChatConfig()`` without arguments raises ``KeyError``, and transformers
    4.x ``save_pretrained`` builds a default config to find generation parameters, catching only
    ``ValueError``: saving the real model fails there. For the save only, the config instance (the
    patch's private copy) gets a subclass whose lookup treats "no defaults at init" as "nothing
    misplaced"; returns the class to restore, or None when the config builds without arguments."""
    cls = type(config)
    try:
        cls()
        return None
    except ValueError:
        return None  # transformers handles this one itself
    except Exception:
        pass

    def lookup(self):
        try:
            return cls._get_non_default_generation_parameters(self)
        except (KeyError, IndexError, TypeError, AttributeError):
            return {}

    if not hasattr(cls, "_get_non_default_generation_parameters"):
        return None
    config.__class__ = type(cls.__name__, (cls,), {"__module__": cls.__module__, "__qualname__": cls.__qualname__,
                                                   "_get_non_default_generation_parameters": lookup})
    return cls


def _is_main_process(kwargs: dict) -> bool:
    return bool(kwargs.get("is_main_process", True))


def bind_save(patch: Any, model: nn.Module) -> None:
    """Bind :func:`save_pretrained` to ``model`` (a bound method, so ``copy.deepcopy`` rebinds it
    to the copy), undone by the patch's revert."""
    patch.setattr(model, "save_pretrained", types.MethodType(save_pretrained, model))


def remote_code_files(model: nn.Module) -> list[Path]:
    """The ``.py`` files a remote-code model's class needs (its module and every module it
    imports relatively, recursively); ``[]`` for a class transformers ships."""
    module = sys.modules.get(type(model).__module__)
    path = getattr(module, "__file__", None)
    if path is None or not type(model).__module__.startswith("transformers_modules."):
        return []
    from transformers.dynamic_module_utils import get_relative_import_files

    return [Path(path)] + [Path(p) for p in get_relative_import_files(path)]


def finish_checkpoint(model: nn.Module, folder: str | os.PathLike) -> None:
    """Make a folder written by ``save_pretrained`` from a patched model load as the compressed
    model through transformers' auto classes (see the module docstring)."""
    from .family import get_family

    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        return  # saved elsewhere (a state dict only): nothing to complete
    family = get_family(model)
    files = remote_code_files(model)
    for src in files:
        dest = folder / src.name
        if not dest.exists() or not os.path.samefile(src, dest):
            shutil.copyfile(src, dest)
    spec = family.autoload_spec(model)
    # transformers 4.x copies only the DIRECT relative imports of a local folder's module into its
    # module cache: name every code file here so the model's own imports resolve.
    deps = [f.stem for f in files[1:]]
    if deps:
        spec["imports"] += "\n" + "\n".join(f"from .{d} import __name__ as _dep_{k}  # noqa: F401 (copied with it)"
                                             for k, d in enumerate(deps))
    classes = "".join(_CLASS.format(name=name, base="_FcotBase") for name in dict.fromkeys(spec["classes"].values()))
    (folder / f"{AUTOLOAD_MODULE}.py").write_text(
        _STUB.format(imports=spec["imports"], base="_FcotBase", classes=classes), encoding="utf-8")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    auto_map = dict(config.get("auto_map") or {})
    for auto_class, name in spec["classes"].items():
        auto_map[auto_class] = f"{AUTOLOAD_MODULE}.{name}"
    config["auto_map"] = auto_map
    section = config.get("fcot")
    if isinstance(section, dict):
        section["model_class"] = spec["base_ref"]
        for key, value in section.get("base", {}).items():
            config[key] = value  # the uncompressed values at the top level; the patch sets the compressed ones
    tmp = config_path.with_name("config.json.tmp")
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, config_path)


def resolve_model_class(path: str | os.PathLike, ref: str, trust_remote_code: bool) -> type:
    """The class a checkpoint's ``fcot.model_class`` names: ``transformers.<Name>`` for a class
    transformers ships, else ``<module>.<Name>`` of the folder's own code (remote code: needs
    ``trust_remote_code=True``)."""
    import transformers

    if ":" in ref:  # an importable module's class (registered in-process, not remote code)
        import importlib

        module, name = ref.split(":", 1)
        return getattr(importlib.import_module(module), name)
    if "." not in ref:
        cls = getattr(transformers, ref, None)
        if cls is None:
            raise ImportError(f"{path}: the checkpoint's model class {ref!r} is not in transformers {transformers.__version__}")
        return cls
    if not trust_remote_code:
        from .base import FcotError

        raise FcotError(f"{path} holds remote code ({ref}); load it with trust_remote_code=True if you trust the folder")
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    return get_class_from_dynamic_module(ref, str(path))


__all__ = ["AUTOLOAD_MODULE", "bind_save", "finish_checkpoint", "remote_code_files", "resolve_model_class", "save_pretrained"]
