"""A tiny stand-in for OpenGVLab's remote-code ``InternVLChatModel`` (what
``from_pretrained("OpenGVLab/InternVL2-2B", trust_remote_code=True)`` returns), written for the
fcot tests from the contract of ``internvl_chat/internvl/model/internvl_chat/
modeling_internvl_chat.py``: the same attributes (``vision_model``, ``mlp1`` = Sequential(
LayerNorm, Linear, GELU, Linear), ``language_model``, ``num_image_token``,
``downsample_ratio``, ``ps_version``, ``select_layer``, ``img_context_token_id``, ``template``)
and the same ``pixel_shuffle`` / ``extract_feature`` / ``forward`` / ``generate`` / ``chat`` /
``batch_chat`` behaviour. The ViT follows InternViT's layout (CLS token, ``encoder.layers[i]``
with ``norm1``, ``attn.qkv``, ``attn.proj``, optional qk normalisation over all heads, layer
scale). The LLM is transformers' Qwen2 (as in InternVL2-1B). ``.cuda()`` calls of the
original are ``.to(self.device)`` here, so it runs on a CPU.

``register()`` registers the config under ``model_type="internvl_chat"`` with transformers'
Auto classes (in-process; no remote code), so ``fcot.load_compressed`` can rebuild it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import transformers
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutputWithPast

from .tiny_internvl import IMG_CONTEXT, IMG_END, IMG_START, WORDS, tiny_tokenizer

SEP = "<|im_end|>"


class TinyInternVisionConfig(PretrainedConfig):
    model_type = "tiny_intern_vit"

    def __init__(self, hidden_size=128, num_attention_heads=2, intermediate_size=64, num_hidden_layers=2,
                 image_size=64, patch_size=8, qk_normalization=False, layer_norm_eps=1e-6, **kwargs):
        super().__init__(**kwargs)
        self.hidden_size, self.num_attention_heads = hidden_size, num_attention_heads
        self.intermediate_size, self.num_hidden_layers = intermediate_size, num_hidden_layers
        self.image_size, self.patch_size = image_size, patch_size
        self.qk_normalization, self.layer_norm_eps = qk_normalization, layer_norm_eps


class TinyInternVLChatConfig(PretrainedConfig):
    model_type = "internvl_chat"
    sub_configs = {"vision_config": TinyInternVisionConfig, "llm_config": transformers.Qwen2Config}

    def __init__(self, vision_config=None, llm_config=None, downsample_ratio=0.5, ps_version="v2", select_layer=-1,
                 template="tiny", force_image_size=None, **kwargs):
        super().__init__(**kwargs)
        vision_config = vision_config or {}
        llm_config = llm_config or {}
        self.vision_config = vision_config if isinstance(vision_config, PretrainedConfig) else TinyInternVisionConfig(**vision_config)
        if isinstance(llm_config, PretrainedConfig):
            self.llm_config = llm_config
        else:
            llm_config = {k: v for k, v in llm_config.items() if k != "model_type"}
            self.llm_config = transformers.Qwen2Config(**llm_config)
        self.downsample_ratio, self.ps_version, self.select_layer = downsample_ratio, ps_version, select_layer
        self.template, self.force_image_size = template, force_image_size


class TinyVisionEmbeddings(nn.Module):
    def __init__(self, config: TinyInternVisionConfig) -> None:
        super().__init__()
        c, p = config.hidden_size, config.patch_size
        self.class_embedding = nn.Parameter(torch.randn(1, 1, c))
        self.patch_embedding = nn.Conv2d(3, c, kernel_size=p, stride=p)
        self.num_positions = (config.image_size // p) ** 2 + 1
        self.position_embedding = nn.Parameter(torch.randn(1, self.num_positions, c))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(x.shape[0], -1, -1).to(x.dtype)
        return torch.cat([cls, x], dim=1) + self.position_embedding.to(x.dtype)


class TinyInternAttention(nn.Module):
    def __init__(self, config: TinyInternVisionConfig) -> None:
        super().__init__()
        c = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = c // self.num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(c, 3 * c)
        self.proj = nn.Linear(c, c)
        self.qk_normalization = config.qk_normalization
        if self.qk_normalization:
            self.q_norm, self.k_norm = nn.LayerNorm(c), nn.LayerNorm(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.qk_normalization:  # over all heads at once, as InternViT-6B
            q = self.q_norm(q.transpose(1, 2).flatten(2)).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
            k = self.k_norm(k.transpose(1, 2).flatten(2)).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class TinyInternLayer(nn.Module):
    def __init__(self, config: TinyInternVisionConfig) -> None:
        super().__init__()
        c = config.hidden_size
        self.norm1, self.norm2 = nn.LayerNorm(c, eps=config.layer_norm_eps), nn.LayerNorm(c, eps=config.layer_norm_eps)
        self.attn = TinyInternAttention(config)
        self.mlp = nn.Sequential(nn.Linear(c, config.intermediate_size), nn.GELU(), nn.Linear(config.intermediate_size, c))
        self.ls1, self.ls2 = nn.Parameter(torch.ones(c)), nn.Parameter(torch.ones(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x)) * self.ls1
        return x + self.mlp(self.norm2(x)) * self.ls2


class TinyInternEncoder(nn.Module):
    def __init__(self, config: TinyInternVisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(TinyInternLayer(config) for _ in range(config.num_hidden_layers))


class TinyInternVisionModel(nn.Module):
    def __init__(self, config: TinyInternVisionConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = TinyVisionEmbeddings(config)
        self.encoder = TinyInternEncoder(config)

    def forward(self, pixel_values, output_hidden_states=False, return_dict=True):
        x = self.embeddings(pixel_values)
        states = [x]
        for layer in self.encoder.layers:
            x = layer(x)
            states.append(x)
        return BaseModelOutput(last_hidden_state=x, hidden_states=tuple(states) if output_hidden_states else None)


class TinyInternVLChatModel(PreTrainedModel):
    config_class = TinyInternVLChatConfig
    base_model_prefix = "tiny_internvl_chat"
    main_input_name = "pixel_values"
    _no_split_modules = ["TinyInternLayer", "Qwen2DecoderLayer"]

    def __init__(self, config: TinyInternVLChatConfig) -> None:
        super().__init__(config)
        image_size = config.force_image_size or config.vision_config.image_size
        patch_size = config.vision_config.patch_size
        self.patch_size, self.select_layer, self.template = patch_size, config.select_layer, config.template
        self.num_image_token = int((image_size // patch_size) ** 2 * (config.downsample_ratio ** 2))
        self.downsample_ratio, self.ps_version = config.downsample_ratio, config.ps_version
        self.vision_model = TinyInternVisionModel(config.vision_config)
        self.language_model = transformers.Qwen2ForCausalLM(config.llm_config)
        vit, llm = config.vision_config.hidden_size, config.llm_config.hidden_size
        width = vit * int(1 / self.downsample_ratio) ** 2
        self.mlp1 = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, llm), nn.GELU(), nn.Linear(llm, llm))
        self.img_context_token_id = None
        self.system_message = "w0"
        self.post_init()

    def _init_weights(self, module):
        pass  # tests set every weight themselves

    def pixel_shuffle(self, x, scale_factor=0.5):
        n, w, h, c = x.size()
        x = x.view(n, w, int(h * scale_factor), int(c / scale_factor)).permute(0, 2, 1, 3).contiguous()
        x = x.view(n, int(h * scale_factor), int(w * scale_factor), int(c / (scale_factor * scale_factor)))
        if self.ps_version != "v1":
            x = x.permute(0, 2, 1, 3).contiguous()
        return x

    def extract_feature(self, pixel_values):
        if self.select_layer == -1:
            vit_embeds = self.vision_model(pixel_values=pixel_values, output_hidden_states=False).last_hidden_state
        else:
            vit_embeds = self.vision_model(pixel_values=pixel_values, output_hidden_states=True).hidden_states[self.select_layer]
        vit_embeds = vit_embeds[:, 1:, :]
        h = w = int(vit_embeds.shape[1] ** 0.5)
        vit_embeds = vit_embeds.reshape(vit_embeds.shape[0], h, w, -1)
        vit_embeds = self.pixel_shuffle(vit_embeds, scale_factor=self.downsample_ratio)
        vit_embeds = vit_embeds.reshape(vit_embeds.shape[0], -1, vit_embeds.shape[-1])
        return self.mlp1(vit_embeds)

    def _embed(self, input_ids, vit_embeds):
        input_embeds = self.language_model.get_input_embeddings()(input_ids)
        b, n, c = input_embeds.shape
        flat = input_embeds.reshape(b * n, c)
        selected = input_ids.reshape(b * n) == self.img_context_token_id
        flat = flat.clone()
        flat[selected] = vit_embeds.reshape(-1, c).to(flat.dtype)
        return flat.reshape(b, n, c)

    def forward(self, pixel_values, input_ids=None, attention_mask=None, position_ids=None, image_flags=None,
                past_key_values=None, labels=None, use_cache=None, output_attentions=None, output_hidden_states=None,
                return_dict=None):
        vit_embeds = self.extract_feature(pixel_values)
        if image_flags is not None:
            vit_embeds = vit_embeds[image_flags.squeeze(-1) == 1]
        input_embeds = self._embed(input_ids, vit_embeds)
        kw = dict(inputs_embeds=input_embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=use_cache)
        if past_key_values is not None:
            kw["past_key_values"] = past_key_values
        outputs = self.language_model(**kw)
        logits = outputs.logits
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=getattr(outputs, "past_key_values", None))

    @torch.no_grad()
    def generate(self, pixel_values=None, input_ids=None, attention_mask=None, visual_features=None,
                 generation_config=None, output_hidden_states=None, return_dict=None, **generate_kwargs):
        assert self.img_context_token_id is not None
        if pixel_values is not None:
            vit_embeds = visual_features if visual_features is not None else self.extract_feature(pixel_values)
            input_embeds = self._embed(input_ids, vit_embeds)
        else:
            input_embeds = self.language_model.get_input_embeddings()(input_ids)
        return self.language_model.generate(
            inputs_embeds=input_embeds, attention_mask=attention_mask, generation_config=generation_config,
            use_cache=True, **generate_kwargs,
        )

    def _prompt(self, question):
        return f"<s> {self.system_message} {question} {SEP}"

    def chat(self, tokenizer, pixel_values, question, generation_config, history=None, return_history=False,
             num_patches_list=None, IMG_START_TOKEN=IMG_START, IMG_END_TOKEN=IMG_END, IMG_CONTEXT_TOKEN=IMG_CONTEXT,
             verbose=False):
        if history is None and pixel_values is not None and "<image>" not in question:
            question = "<image> " + question
        if num_patches_list is None:
            num_patches_list = [pixel_values.shape[0]] if pixel_values is not None else []
        assert pixel_values is None or len(pixel_values) == sum(num_patches_list)
        self.img_context_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
        query = self._prompt(question)
        for num_patches in num_patches_list:
            image_tokens = IMG_START_TOKEN + f" {IMG_CONTEXT_TOKEN}" * self.num_image_token * num_patches + f" {IMG_END_TOKEN}"
            query = query.replace("<image>", image_tokens, 1)
        inputs = tokenizer(query, return_tensors="pt")
        generation_config = dict(generation_config, eos_token_id=tokenizer.convert_tokens_to_ids(SEP))
        out = self.generate(pixel_values=pixel_values, input_ids=inputs["input_ids"].to(self.device),
                            attention_mask=inputs["attention_mask"].to(self.device), **generation_config)
        response = tokenizer.batch_decode(out, skip_special_tokens=True)[0].split(SEP)[0].strip()
        return (response, (history or []) + [(question, response)]) if return_history else response

    def batch_chat(self, tokenizer, pixel_values, questions, generation_config, num_patches_list=None, history=None,
                   return_history=False, IMG_START_TOKEN=IMG_START, IMG_END_TOKEN=IMG_END,
                   IMG_CONTEXT_TOKEN=IMG_CONTEXT, verbose=False, image_counts=None):
        if history is not None or return_history:
            raise NotImplementedError("multi-turn chat is not supported in batch_chat")
        self.img_context_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
        queries = []
        for idx, num_patches in enumerate(num_patches_list):
            question = questions[idx]
            if pixel_values is not None and "<image>" not in question:
                question = "<image> " + question
            image_tokens = IMG_START_TOKEN + f" {IMG_CONTEXT_TOKEN}" * self.num_image_token * num_patches + f" {IMG_END_TOKEN}"
            queries.append(self._prompt(question).replace("<image>", image_tokens, 1))
        tokenizer.padding_side = "left"
        inputs = tokenizer(queries, return_tensors="pt", padding=True)
        generation_config = dict(generation_config, eos_token_id=tokenizer.convert_tokens_to_ids(SEP))
        out = self.generate(pixel_values=pixel_values, input_ids=inputs["input_ids"].to(self.device),
                            attention_mask=inputs["attention_mask"].to(self.device), **generation_config)
        return [r.split(SEP)[0].strip() for r in tokenizer.batch_decode(out, skip_special_tokens=True)]


def register() -> None:
    """Make ``AutoConfig``/``AutoModel`` know ``model_type="internvl_chat"`` (this process only)."""
    try:
        transformers.AutoConfig.register("internvl_chat", TinyInternVLChatConfig)
    except ValueError:
        pass  # already registered
    try:
        transformers.AutoModel.register(TinyInternVLChatConfig, TinyInternVLChatModel)
    except ValueError:
        pass


def tiny_chat_config(image_size: int = 64, patch_size: int = 8, qk_normalization: bool = False, ps_version: str = "v2"):
    return TinyInternVLChatConfig(
        vision_config=dict(image_size=image_size, patch_size=patch_size, qk_normalization=qk_normalization),
        llm_config=dict(hidden_size=128, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                        num_key_value_heads=1, vocab_size=len(WORDS), max_position_embeddings=4096,
                        tie_word_embeddings=False, architectures=["Qwen2ForCausalLM"]),
        ps_version=ps_version, architectures=["TinyInternVLChatModel"],
    )


def tiny_chat_model(config=None, *, seed: int = 0, dtype=torch.float32):
    config = config or tiny_chat_config()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = TinyInternVLChatModel(config)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() == 1:
                    p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "weight" in name or "ls" in name else 0.0))
                else:
                    p.copy_(torch.randn_like(p) * 0.05)
    return model.to(dtype).eval()


__all__ = ["TinyInternVLChatModel", "TinyInternVLChatConfig", "register", "tiny_chat_config", "tiny_chat_model", "tiny_tokenizer"]
