"""InternVLChatConfig (stand-in). Like the real one, it has no usable defaults: building it
without an ``llm_config`` that names its architecture fails."""

import copy

from transformers import LlamaConfig, PretrainedConfig, Qwen2Config

from .configuration_intern_vit import InternVisionConfig
from .configuration_internlm2 import InternLM2Config


class InternVLChatConfig(PretrainedConfig):
    model_type = "internvl_chat"
    is_composition = True

    def __init__(self, vision_config=None, llm_config=None, use_backbone_lora=0, use_llm_lora=0, select_layer=-1,
                 force_image_size=None, downsample_ratio=0.5, template=None, dynamic_image_size=False,
                 use_thumbnail=False, ps_version="v1", min_dynamic_patch=1, max_dynamic_patch=6, **kwargs):
        super().__init__(**kwargs)
        vision_config = vision_config if vision_config is not None else {}
        llm_config = llm_config if llm_config is not None else {}
        self.vision_config = InternVisionConfig(**vision_config)
        arch = llm_config["architectures"][0]  # no default: a KeyError, as in OpenGVLab's code
        if arch == "InternLM2ForCausalLM":
            self.llm_config = InternLM2Config(**llm_config)
        elif arch == "Qwen2ForCausalLM":
            self.llm_config = Qwen2Config(**llm_config)
        elif arch == "LlamaForCausalLM":
            self.llm_config = LlamaConfig(**llm_config)
        else:
            raise ValueError(f"Unsupported architecture: {arch}")
        self.use_backbone_lora, self.use_llm_lora = use_backbone_lora, use_llm_lora
        self.select_layer, self.force_image_size, self.downsample_ratio = select_layer, force_image_size, downsample_ratio
        self.template, self.dynamic_image_size, self.use_thumbnail = template, dynamic_image_size, use_thumbnail
        self.ps_version, self.min_dynamic_patch, self.max_dynamic_patch = ps_version, min_dynamic_patch, max_dynamic_patch

    def to_dict(self):
        out = copy.deepcopy(self.__dict__)
        out["vision_config"] = self.vision_config.to_dict()
        out["llm_config"] = self.llm_config.to_dict()
        out["model_type"] = self.__class__.model_type
        for key in [k for k in out if k.startswith("_")]:
            out.pop(key)
        return out
