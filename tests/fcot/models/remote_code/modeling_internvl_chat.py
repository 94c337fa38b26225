"""InternVLChatModel (stand-in): ``vision_model`` + pixel shuffle + ``mlp1`` + ``language_model``,
with ``forward``/``generate``/``chat``/``batch_chat`` building and embedding prompts the way
OpenGVLab's code does."""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaForCausalLM, PreTrainedModel, Qwen2ForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_internvl_chat import InternVLChatConfig
from .conversation import get_conv_template
from .modeling_intern_vit import InternVisionModel
from .modeling_internlm2 import InternLM2ForCausalLM

IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN = "<img>", "</img>", "<IMG_CONTEXT>"


class InternVLChatModel(PreTrainedModel):
    config_class = InternVLChatConfig
    main_input_name = "pixel_values"
    base_model_prefix = "language_model"
    _no_split_modules = ["InternVisionEncoderLayer", "LlamaDecoderLayer", "Qwen2DecoderLayer"]

    def __init__(self, config, vision_model=None, language_model=None, use_flash_attn=False):
        super().__init__(config)
        image_size = config.force_image_size or config.vision_config.image_size
        patch_size = config.vision_config.patch_size
        self.patch_size, self.select_layer, self.template = patch_size, config.select_layer, config.template
        self.num_image_token = int((image_size // patch_size) ** 2 * (config.downsample_ratio ** 2))
        self.downsample_ratio, self.ps_version = config.downsample_ratio, config.ps_version
        self.vision_model = vision_model or InternVisionModel(config.vision_config)
        arch = config.llm_config.architectures[0]
        if language_model is not None:
            self.language_model = language_model
        elif arch == "InternLM2ForCausalLM":
            self.language_model = InternLM2ForCausalLM(config.llm_config)
        elif arch == "Qwen2ForCausalLM":
            self.language_model = Qwen2ForCausalLM(config.llm_config)
        else:
            self.language_model = LlamaForCausalLM(config.llm_config)
        vit, llm = config.vision_config.hidden_size, config.llm_config.hidden_size
        width = vit * int(1 / self.downsample_ratio) ** 2
        self.mlp1 = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, llm), nn.GELU(), nn.Linear(llm, llm))
        self.img_context_token_id = None
        self.conv_template = get_conv_template(self.template)
        self.system_message = self.conv_template.system_message
        # OpenGVLab's code does not call post_init; transformers 5.x needs it to load the model
        # (all_tied_weights_keys): the stand-in has that fix, so it loads on 4.51 and 5.x.
        self.post_init()

    def _init_weights(self, module):
        pass

    def pixel_shuffle(self, x, scale_factor=0.5):
        n, w, h, c = x.size()
        x = x.view(n, w, int(h * scale_factor), int(c / scale_factor)).permute(0, 2, 1, 3).contiguous()
        x = x.view(n, int(h * scale_factor), int(w * scale_factor), int(c / (scale_factor * scale_factor)))
        if self.ps_version != "v1":
            x = x.permute(0, 2, 1, 3).contiguous()
        return x

    def extract_feature(self, pixel_values):
        if self.select_layer == -1:
            vit_embeds = self.vision_model(pixel_values=pixel_values, output_hidden_states=False, return_dict=True).last_hidden_state
        else:
            vit_embeds = self.vision_model(pixel_values=pixel_values, output_hidden_states=True,
                                           return_dict=True).hidden_states[self.select_layer]
        vit_embeds = vit_embeds[:, 1:, :]
        h = w = int(vit_embeds.shape[1] ** 0.5)
        vit_embeds = vit_embeds.reshape(vit_embeds.shape[0], h, w, -1)
        vit_embeds = self.pixel_shuffle(vit_embeds, scale_factor=self.downsample_ratio)
        vit_embeds = vit_embeds.reshape(vit_embeds.shape[0], -1, vit_embeds.shape[-1])
        return self.mlp1(vit_embeds)

    def _scatter(self, input_ids, vit_embeds):
        input_embeds = self.language_model.get_input_embeddings()(input_ids)
        b, n, c = input_embeds.shape
        input_embeds = input_embeds.reshape(b * n, c)
        selected = input_ids.reshape(b * n) == self.img_context_token_id
        input_embeds[selected] = vit_embeds.reshape(-1, c).to(input_embeds.dtype)  # fails on a count mismatch, as the real one
        return input_embeds.reshape(b, n, c)

    def forward(self, pixel_values, input_ids=None, attention_mask=None, position_ids=None, image_flags=None,
                past_key_values=None, labels=None, use_cache=None, output_attentions=None, output_hidden_states=None,
                return_dict=None):
        image_flags = image_flags.squeeze(-1)
        vit_embeds = self.extract_feature(pixel_values)
        vit_embeds = vit_embeds[image_flags == 1]
        input_embeds = self._scatter(input_ids, vit_embeds)
        outputs = self.language_model(inputs_embeds=input_embeds, attention_mask=attention_mask, position_ids=position_ids,
                                      past_key_values=past_key_values, use_cache=use_cache)
        logits = outputs.logits
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1))
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=outputs.past_key_values)

    @torch.no_grad()
    def generate(self, pixel_values=None, input_ids=None, attention_mask=None, visual_features=None,
                 generation_config=None, output_hidden_states=None, **generate_kwargs):
        assert self.img_context_token_id is not None
        if pixel_values is not None:
            vit_embeds = visual_features if visual_features is not None else self.extract_feature(pixel_values)
            input_embeds = self._scatter(input_ids, vit_embeds)
        else:
            input_embeds = self.language_model.get_input_embeddings()(input_ids)
        return self.language_model.generate(inputs_embeds=input_embeds, attention_mask=attention_mask,
                                            generation_config=generation_config, output_hidden_states=output_hidden_states,
                                            use_cache=True, **generate_kwargs)

    def _query(self, question, num_patches_list):
        template = get_conv_template(self.template)
        template.system_message = self.system_message
        template.append_message(template.roles[0], question)
        template.append_message(template.roles[1], None)
        query = template.get_prompt()
        for num_patches in num_patches_list:
            image_tokens = IMG_START_TOKEN + IMG_CONTEXT_TOKEN * self.num_image_token * num_patches + IMG_END_TOKEN
            query = query.replace("<image>", image_tokens, 1)
        return query, template.sep.strip()

    def chat(self, tokenizer, pixel_values, question, generation_config, history=None, return_history=False,
             num_patches_list=None, IMG_START_TOKEN=IMG_START_TOKEN, IMG_END_TOKEN=IMG_END_TOKEN,
             IMG_CONTEXT_TOKEN=IMG_CONTEXT_TOKEN, verbose=False):
        if history is None and pixel_values is not None and "<image>" not in question:
            question = "<image>\n" + question
        if num_patches_list is None:
            num_patches_list = [pixel_values.shape[0]] if pixel_values is not None else []
        self.img_context_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
        query, sep = self._query(question, num_patches_list)
        inputs = tokenizer(query, return_tensors="pt")
        generation_config = dict(generation_config, eos_token_id=tokenizer.convert_tokens_to_ids(sep))
        out = self.generate(pixel_values=pixel_values, input_ids=inputs["input_ids"].to(self.device),
                            attention_mask=inputs["attention_mask"].to(self.device), **generation_config)
        response = tokenizer.batch_decode(out, skip_special_tokens=True)[0].split(sep)[0].strip()
        return (response, (history or []) + [(question, response)]) if return_history else response

    def batch_chat(self, tokenizer, pixel_values, questions, generation_config, num_patches_list=None, history=None,
                   return_history=False, IMG_START_TOKEN=IMG_START_TOKEN, IMG_END_TOKEN=IMG_END_TOKEN,
                   IMG_CONTEXT_TOKEN=IMG_CONTEXT_TOKEN, verbose=False, image_counts=None):
        self.img_context_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
        queries = []
        for idx, num_patches in enumerate(num_patches_list):
            question = questions[idx]
            if pixel_values is not None and "<image>" not in question:
                question = "<image>\n" + question
            query, sep = self._query(question, [num_patches])
            queries.append(query)
        tokenizer.padding_side = "left"
        inputs = tokenizer(queries, return_tensors="pt", padding=True)
        generation_config = dict(generation_config, eos_token_id=tokenizer.convert_tokens_to_ids(sep))
        out = self.generate(pixel_values=pixel_values, input_ids=inputs["input_ids"].to(self.device),
                            attention_mask=inputs["attention_mask"].to(self.device), **generation_config)
        return [r.split(sep)[0].strip() for r in tokenizer.batch_decode(out, skip_special_tokens=True)]
