"""InternViT (stand-in): CLS token, ``encoder.layers[i]`` with ``norm1``, ``attn.qkv``,
``attn.proj``, optional qk normalisation over all heads, layer scale ``ls1``/``ls2``."""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .configuration_intern_vit import InternVisionConfig


class InternVisionEmbeddings(nn.Module):
    def __init__(self, config):
        super().__init__()
        c, p = config.hidden_size, config.patch_size
        self.class_embedding = nn.Parameter(torch.randn(1, 1, c))
        self.patch_embedding = nn.Conv2d(3, c, kernel_size=p, stride=p)
        self.position_embedding = nn.Parameter(torch.randn(1, (config.image_size // p) ** 2 + 1, c))

    def forward(self, pixel_values):
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(x.shape[0], -1, -1).to(x.dtype)
        return torch.cat([cls, x], dim=1) + self.position_embedding.to(x.dtype)


class InternAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        c = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = c // self.num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(c, 3 * c)
        self.proj = nn.Linear(c, c)
        self.qk_normalization = config.qk_normalization
        if self.qk_normalization:
            self.q_norm, self.k_norm = nn.LayerNorm(c, eps=config.layer_norm_eps), nn.LayerNorm(c, eps=config.layer_norm_eps)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.qk_normalization:
            q = self.q_norm(q.transpose(1, 2).flatten(2)).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
            k = self.k_norm(k.transpose(1, 2).flatten(2)).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class InternVisionEncoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        c = config.hidden_size
        self.norm1, self.norm2 = nn.LayerNorm(c, eps=config.layer_norm_eps), nn.LayerNorm(c, eps=config.layer_norm_eps)
        self.attn = InternAttention(config)
        self.mlp = nn.Sequential(nn.Linear(c, config.intermediate_size), nn.GELU(), nn.Linear(config.intermediate_size, c))
        self.ls1, self.ls2 = nn.Parameter(torch.ones(c)), nn.Parameter(torch.ones(c))

    def forward(self, x):
        x = x + self.attn(self.norm1(x)) * self.ls1
        return x + self.mlp(self.norm2(x)) * self.ls2


class InternVisionEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layers = nn.ModuleList(InternVisionEncoderLayer(config) for _ in range(config.num_hidden_layers))


class InternVisionModel(PreTrainedModel):
    config_class = InternVisionConfig
    main_input_name = "pixel_values"
    _no_split_modules = ["InternVisionEncoderLayer"]

    def __init__(self, config):
        super().__init__(config)
        self.embeddings = InternVisionEmbeddings(config)
        self.encoder = InternVisionEncoder(config)
        self.post_init()

    def _init_weights(self, module):
        pass

    def forward(self, pixel_values=None, output_hidden_states=None, return_dict=None, pixel_embeds=None):
        x = self.embeddings(pixel_values)
        states = [x]
        for layer in self.encoder.layers:
            x = layer(x)
            states.append(x)
        return BaseModelOutputWithPooling(last_hidden_state=x, pooler_output=x[:, 0],
                                          hidden_states=tuple(states) if output_hidden_states else None)
