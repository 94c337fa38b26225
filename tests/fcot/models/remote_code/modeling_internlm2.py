"""InternLM2ForCausalLM (stand-in). Like OpenGVLab's copy of InternLM2's code, its classes
derive from ``PreTrainedModel`` alone: on transformers versions whose ``PreTrainedModel`` no
longer includes ``GenerationMixin`` (5.x) it has no ``generate``. The decoder is transformers'
Llama (InternLM2 is Llama-shaped); the attribute names the wrappers read are InternLM2's
(``model.tok_embeddings``, ``output``)."""

import torch
from torch import nn
from transformers import LlamaConfig, LlamaModel, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_internlm2 import InternLM2Config


class InternLM2PreTrainedModel(PreTrainedModel):
    config_class = InternLM2Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LlamaDecoderLayer"]
    _supports_cache_class = True

    def _init_weights(self, module):
        pass


def _llama(config):
    return LlamaConfig(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                       intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
                       num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
                       max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.rms_norm_eps,
                       rope_theta=config.rope_theta, pad_token_id=config.pad_token_id)


class InternLM2Model(InternLM2PreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.inner = LlamaModel(_llama(config))
        self.post_init()

    @property
    def tok_embeddings(self):
        return self.inner.embed_tokens

    def get_input_embeddings(self):
        return self.tok_embeddings

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, inputs_embeds=None,
                use_cache=None, output_attentions=None, output_hidden_states=None, return_dict=None, **kwargs):
        if inputs_embeds is None:
            inputs_embeds = self.tok_embeddings(input_ids)
        return self.inner(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                          past_key_values=past_key_values, use_cache=use_cache, **kwargs)


class InternLM2ForCausalLM(InternLM2PreTrainedModel):
    _tied_weights_keys = []

    def __init__(self, config):
        super().__init__(config)
        self.model = InternLM2Model(config)
        self.vocab_size = config.vocab_size
        self.output = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.tok_embeddings

    def get_output_embeddings(self):
        return self.output

    def get_decoder(self):
        return self.model

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, inputs_embeds=None,
                labels=None, use_cache=None, output_attentions=None, output_hidden_states=None, return_dict=None, **kwargs):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache)
        logits = self.output(out.last_hidden_state).float()
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values)

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None, inputs_embeds=None,
                                      **kwargs):
        past = 0
        if past_key_values is not None:
            past = past_key_values.get_seq_length() if hasattr(past_key_values, "get_seq_length") else past_key_values[0][0].shape[2]
        if past and input_ids is not None and input_ids.shape[1] > 0:
            input_ids = input_ids[:, -1:] if input_ids.shape[1] <= past else input_ids[:, past:]
        position_ids = None
        if attention_mask is not None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        if inputs_embeds is not None and not past:
            inputs = {"inputs_embeds": inputs_embeds}
            length = inputs_embeds.shape[1]
        else:
            inputs = {"input_ids": input_ids}
            length = input_ids.shape[1]
        if position_ids is not None:
            position_ids = position_ids[:, -length:]
        inputs.update(position_ids=position_ids, past_key_values=past_key_values, use_cache=kwargs.get("use_cache", True),
                      attention_mask=attention_mask)
        return inputs
