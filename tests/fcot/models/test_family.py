"""The model-family registry: lookup by model / config / dict / string, the error for an unknown
type, a third family registered from one new module, and what each family reports."""

from __future__ import annotations

import importlib
import sys
import textwrap

import pytest

from fcot.models import FAMILIES, FcotError, ModelFamily, get_family, register_family
from fcot.models.family import model_type_of


def test_registered_families():
    assert set(FAMILIES) >= {"internvl", "internvl_chat"}
    for name, fam in FAMILIES.items():
        assert fam.model_type == name and isinstance(fam, ModelFamily)
    assert get_family({"model_type": "internvl"}) is FAMILIES["internvl"]
    assert get_family("internvl_chat") is FAMILIES["internvl_chat"]


def test_unknown_type_is_a_clear_error():
    with pytest.raises(FcotError, match=r"model_type 'llama' is not supported; supported model types: \['internvl'"):
        get_family({"model_type": "llama"})
    with pytest.raises(FcotError, match="model_type None"):
        get_family(object())
    with pytest.raises(TypeError, match="ModelFamily"):
        register_family(object())


def test_a_third_family_is_one_new_file(tmp_path, monkeypatch):
    """A module dropped into fcot/models/ exporting FAMILY is registered on import, nothing else edited."""
    import fcot.models as models

    src = textwrap.dedent('''
        from fcot.models.family import ModelFamily

        class ToyFamily(ModelFamily):
            model_type = "toy_vlm_for_test"
            description = "a test family"

        FAMILY = ToyFamily()
    ''')
    path = models.__path__[0] + "/toy_vlm_for_test.py"
    with open(path, "w") as fh:
        fh.write(src)
    try:
        for name in [m for m in sys.modules if m == "fcot.models" or m.startswith("fcot.models.")]:
            monkeypatch.delitem(sys.modules, name)
        fresh = importlib.import_module("fcot.models")
        assert fresh.get_family("toy_vlm_for_test").description == "a test family"
    finally:
        import os

        os.remove(path)
    # the test's module was registered in the fresh registry only
    assert "toy_vlm_for_test" not in FAMILIES


def test_duplicate_registration_refused():
    class Other(ModelFamily):
        model_type = "internvl"

    with pytest.raises(ValueError, match="already registered"):
        register_family(Other())


def test_model_type_of():
    class Cfg:
        model_type = "internvl"

    class M:
        config = Cfg()

    assert model_type_of(M()) == model_type_of(Cfg()) == model_type_of({"model_type": "internvl"}) == "internvl"


def test_chat_family_templates_and_tokens():
    fam = get_family("internvl_chat")
    cfg = {"template": "internlm2-chat", "vision_config": {"image_size": 448, "patch_size": 14}, "downsample_ratio": 0.5}
    assert fam.base_tokens(cfg) == 256
    fmt = fam.chat(cfg)
    # OpenGVLab's MPT style: no newline after <|im_end|>, the system turn always present
    assert fmt.prompt("<image>\nq", "S") == "<|im_start|>system\nS<|im_end|><|im_start|>user\n<image>\nq<|im_end|><|im_start|>assistant\n"
    assert fmt.stop == ("<|im_end|>",)
    assert fam.chat({**cfg, "template": "phi3-chat"}).prompt("q", "") == "<|system|>\n<|end|><|user|>\nq<|end|><|assistant|>\n"
    with pytest.raises(FcotError, match="config.template='nope'"):
        fam.chat({**cfg, "template": "nope"})
    assert fam.tiler(cfg).tile_size == 448 and fam.tiler({**cfg, "force_image_size": 224}).tile_size == 224
    native = get_family("internvl")
    assert native.base_tokens({"image_seq_length": 64, "fcot": {"base": {"image_seq_length": 256}}}) == 256
    assert native.base_tokens({"image_seq_length": 256}) == 256
