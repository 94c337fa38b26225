"""Stage 2 of FCoT-VL, ``fcot posttrain``: supervised fine-tuning of the compressed model on
the answer tokens.

:class:`PosttrainModule` holds the model patched by :func:`fcot.apply_fcot` (or loaded by
:func:`fcot.load_compressed` from a stage-1 output); the compressor, the projector and the LLM
(its head included) learn, the ViT stays frozen unless ``posttrain.train_vision``. With
``posttrain.lora`` the LLM's weights (head included) freeze and LoRA adapters (peft) on its
linear layers learn; checkpoints hold the model with the adapters merged (it loads with
:func:`fcot.load_compressed`) and the adapters on their own (for resume). The loss is
the cross-entropy on the answer tokens, computed through the LM head: with ``common.fused`` by
:func:`fcot_kernels.fused_linear_distill` with ``kl_weight=0, ce_weight=1`` (chunked, the
``(N, V)`` logits never exist; the op has no CE-only mode, so its teacher side is a width-1 zero
input whose matmul costs ``N * V`` multiply-adds), otherwise by PyTorch's ``cross_entropy`` on
the full logits (the reference).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import fcot_kernels as fk
from fcot.data.records import IGNORE_INDEX, ConversationCollator
from fcot.train.config import ConfigError, RunConfig
from fcot.train.engine import (FcotTrainer, TrainModule, build_dataset, compress, head_weights,
                               load_base, load_weights_into, log_data_summary, loss_backend, metrics_callback_class,
                               pad_token_id, check_run, start_run, shifted, training_arguments, visual_tokens_per_tile)

logger = logging.getLogger("fcot.train")

LORA_FILE = "lora_adapters.safetensors"
"""The LoRA adapters of a checkpoint, saved next to the merged model (read on resume)."""


class PosttrainModule(TrainModule):
    """The compressed model for SFT: patched here with ``cfg``'s compressor unless it already is;
    the ViT frozen (unless ``posttrain.train_vision``), everything else trainable."""

    def __init__(self, model: nn.Module, tokenizer: Any, cfg: RunConfig) -> None:
        compress(model, tokenizer, cfg)
        super().__init__(model, tokenizer)
        self.cfg = cfg
        for p in self.parameters():
            p.requires_grad_(True)
        if not cfg.posttrain.train_vision:
            for p in self.parts.vision.parameters():
                p.requires_grad_(False)
        if cfg.posttrain.lora:
            self._add_lora()
        if cfg.posttrain.gradient_checkpointing:
            self.gradient_checkpointing()

    def _add_lora(self) -> None:
        """LoRA adapters (peft) on the LLM's linear layers (``posttrain.lora_target_modules``);
        the LLM's own weights and its head freeze, the adapters, compressor and projector learn."""
        from peft import LoraConfig, inject_adapter_in_model

        pt = self.cfg.posttrain
        targets = pt.lora_target_modules
        targets = "all-linear" if targets == ["all-linear"] else targets
        for p in [*self.parts.decoder.parameters(), *self.parts.head.parameters()]:
            p.requires_grad_(False)
        try:
            with torch.random.fork_rng(devices=[]):  # the adapters' init depends on common.seed only
                torch.manual_seed(self.cfg.common.seed)
                inject_adapter_in_model(LoraConfig(r=pt.lora_r, lora_alpha=pt.lora_alpha, lora_dropout=pt.lora_dropout,
                                                   target_modules=targets), self.parts.decoder)
        except ValueError as e:
            raise ConfigError(f"posttrain.lora_target_modules={pt.lora_target_modules!r}: {e}") from None
        for name, p in self.parts.decoder.named_parameters():
            p.requires_grad_("lora_" in name)

    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's state dict with every LoRA adapter merged into its layer's weight, under
        the names the model has without adapters (what ``save_pretrained`` and
        :func:`fcot.load_compressed` expect)."""
        from peft.tuners.lora import LoraLayer

        deltas = {}
        for name, module in self.model.named_modules():
            if isinstance(module, LoraLayer):
                delta = sum(module.get_delta_weight(a) for a in module.active_adapters)
                deltas[f"{name}.base_layer.weight"] = delta
        out = {}
        for key, value in self.model.state_dict().items():
            if ".lora_" in key:
                continue
            if key in deltas:
                value = (value.float() + deltas[key].float()).to(value.dtype)
            out[key.replace(".base_layer.", ".")] = value.detach()
        return out

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().contiguous() for k, v in self.model.state_dict().items() if ".lora_" in k}

    def forward(self, input_ids, attention_mask, labels, pixel_values=None, num_tiles=None):
        """Returns ``{"hidden": (N, H), "labels": (N,)}``: the supervised rows, next-token aligned."""
        parts = self.parts
        if pixel_values is not None:
            if self.cfg.posttrain.train_vision:
                tokens = self._vit_with_grad(pixel_values)
            else:
                tokens = parts.vit(pixel_values)
            feats = parts.student_features(tokens)
        else:
            feats = None
        hidden, labels = shifted(parts.hidden(parts.embed(input_ids, feats), attention_mask), labels)
        keep = labels != IGNORE_INDEX
        return {"hidden": hidden[keep], "labels": labels[keep]}

    def _vit_with_grad(self, pixel_values):
        parts = self.parts
        dtype = next(parts.vision.parameters()).dtype
        out = parts.vision(pixel_values=pixel_values.to(dtype), output_hidden_states=parts.layer != -1, return_dict=True)
        feats = out.last_hidden_state if parts.layer == -1 else out.hidden_states[parts.layer]
        return feats[:, 1:] if parts.drop_cls else feats

    def save_compressed(self, output_dir: str, state_dict: dict | None = None) -> None:
        """``save_pretrained`` of the compressed model; with LoRA, the adapters merged into the
        weights (so it loads with :func:`fcot.load_compressed`) and also saved on their own in
        ``lora_adapters.safetensors`` (what resume reads)."""
        if not self.cfg.posttrain.lora:
            self.model.save_pretrained(output_dir, state_dict=state_dict, safe_serialization=True)
            return
        if state_dict is not None:
            raise ConfigError("posttrain.lora=true with FSDP/DeepSpeed saving is not supported; use DDP or full training")
        from safetensors.torch import save_file

        self.model.save_pretrained(output_dir, state_dict=self.merged_state_dict(), safe_serialization=True)
        save_file(self.adapter_state_dict(), os.path.join(output_dir, LORA_FILE))

    def load_compressed(self, checkpoint: str) -> None:
        """Resume: the checkpoint's weights into this model. With LoRA the LLM's frozen base
        weights stay those of the base model (the checkpoint holds them merged), the adapters
        come from ``lora_adapters.safetensors`` and the other trainable weights from the model."""
        if not self.cfg.posttrain.lora:
            load_weights_into(self.model, checkpoint, self.cfg)
            return
        from safetensors.torch import load_file

        from fcot import load_compressed

        adapters = load_file(os.path.join(checkpoint, LORA_FILE))
        fresh = load_compressed(checkpoint, fused=self.cfg.common.fused, dtype=next(self.model.parameters()).dtype,
                                **({"trust_remote_code": True} if self.cfg.common.trust_remote_code else {}))
        saved = fresh.state_dict()
        own = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, p in own.items():
                if not p.requires_grad:
                    continue
                src = adapters.get(name) if ".lora_" in name else saved.get(name)
                if src is None:
                    raise ConfigError(f"checkpoint {checkpoint} lacks {name!r}")
                p.copy_(src)


def sft_loss(out: dict[str, torch.Tensor], head: nn.Module, cfg: RunConfig) -> torch.Tensor:
    """Mean cross-entropy of the answer rows through the LM head (fused or reference, see the module docstring)."""
    h, labels = out["hidden"], out["labels"]
    with torch.autocast(h.device.type, enabled=False):  # both backends in the hidden states' dtype
        return _sft_loss(h, labels, head, cfg)


def _sft_loss(h: torch.Tensor, labels: torch.Tensor, head: nn.Module, cfg: RunConfig) -> torch.Tensor:
    w, b = head_weights(head, h.dtype)
    backend = loss_backend(cfg)
    if backend == "reference":
        if h.shape[0] == 0:
            return (h.sum() + w.sum()) * 0.0
        return F.cross_entropy(F.linear(h, w, b).float(), labels)
    zero_h = h.new_zeros(h.shape[0], 1)
    zero_w = w.new_zeros(w.shape[0], 1)
    return fk.fused_linear_distill(h, zero_h, w, b, teacher_weight=zero_w, labels=labels, kl_weight=0.0, ce_weight=1.0,
                                   backend=backend)


class PosttrainTrainer(FcotTrainer):
    """``Trainer`` whose ``compute_loss`` runs :class:`PosttrainModule` and :func:`sft_loss`."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = model(**inputs)
        head = self.accelerator.unwrap_model(model).parts.head
        loss = sft_loss(out, head, self.fcot_cfg)
        return (loss, out) if return_outputs else loss


def build_posttrain_trainer(cfg: RunConfig, *, model: nn.Module | None = None, tokenizer: Any = None,
                            image_processor: Any = None, callbacks: list | None = None) -> PosttrainTrainer:
    """A ready :class:`PosttrainTrainer` for ``cfg`` (``model`` etc. as in
    :func:`fcot.train.distill.build_distill_trainer`; ``common.model`` may be a stage-1 output)."""
    if cfg.stage != "posttrain":
        raise ConfigError(f"stage={cfg.stage!r}: build_posttrain_trainer needs a posttrain config")
    if model is None:
        model, tokenizer, image_processor = load_base(cfg, allow_compressed=True)
    elif tokenizer is None:
        raise ValueError("tokenizer=None: pass the model's tokenizer with model")
    module = PosttrainModule(model, tokenizer, cfg)
    _, out = visual_tokens_per_tile(module.model)
    dataset = build_dataset(cfg, module.model, tokenizer, image_processor, tokens_per_tile=out,
                            skip_log_dir=cfg.common.output_dir)
    args = training_arguments(cfg, logging_steps=1, save_strategy="steps", save_steps=500)
    trainer = PosttrainTrainer(model=module, args=args, train_dataset=dataset,
                               data_collator=ConversationCollator(pad_token_id(tokenizer)), processing_class=tokenizer,
                               callbacks=[metrics_callback_class()(), *(callbacks or [])])
    trainer.fcot_cfg = cfg
    trainer.fcot_image_processor = image_processor
    return trainer


def run_posttrain(cfg: RunConfig, *, resume: bool = False, **build_kwargs: Any) -> PosttrainTrainer:
    """Stage 2 end to end (see :func:`fcot.train.distill.run_distill`)."""
    checkpoint = check_run(cfg, resume=resume)
    trainer = build_posttrain_trainer(cfg, **build_kwargs)
    start_run(cfg)
    trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model(cfg.common.output_dir)
    trainer.fcot_data_summary = log_data_summary(trainer.train_dataset)
    return trainer


__all__ = ["PosttrainModule", "PosttrainTrainer", "build_posttrain_trainer", "run_posttrain", "sft_loss"]
