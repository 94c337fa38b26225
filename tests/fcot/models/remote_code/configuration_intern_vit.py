"""InternViT config (stand-in)."""

from transformers import PretrainedConfig


class InternVisionConfig(PretrainedConfig):
    model_type = "intern_vit_6b"

    def __init__(self, hidden_size=3200, num_attention_heads=25, intermediate_size=12800, num_hidden_layers=48,
                 image_size=224, patch_size=14, qk_normalization=True, layer_norm_eps=1e-6, drop_path_rate=0.0, **kwargs):
        super().__init__(**kwargs)
        self.hidden_size, self.num_attention_heads = hidden_size, num_attention_heads
        self.intermediate_size, self.num_hidden_layers = intermediate_size, num_hidden_layers
        self.image_size, self.patch_size = image_size, patch_size
        self.qk_normalization, self.layer_norm_eps, self.drop_path_rate = qk_normalization, layer_norm_eps, drop_path_rate
