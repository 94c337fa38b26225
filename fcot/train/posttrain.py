"""Stage 2 of FCoT-VL, ``fcot posttrain``: supervised fine-tuning of the compressed model on
the answer tokens.

:class:`PosttrainModule` holds the model patched by :func:`fcot.apply_fcot` (or loaded by
:func:`fcot.load_compressed` from a stage-1 output); the compressor, the projector and the LLM
(its head included) learn, the ViT stays frozen unless ``posttrain.train_vision``. With
``posttrain.lora`` the LLM's weights (head included) freeze and LoRA adapters (peft) on its
linear layers learn; checkpoints hold the model with the adapters merged (it loads with
:func:`fcot.load_compressed`) and the adapters on their own (for resume). The loss is
the cross-entropy on the answer tokens, computed through the LM head inside the module's forward
by :func:`fcot_kernels.fused_linear_distill` in its CE-only mode (``kl_weight=0``: no teacher
work at all); with ``common.fused`` chunked (the ``(N, V)`` logits never exist), otherwise its
reference (PyTorch's ``cross_entropy`` on the full logits).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

import fcot_kernels as fk
from fcot.data.records import IGNORE_INDEX, ConversationCollator
from fcot.train.config import ConfigError, RunConfig
from fcot.train.engine import compress, dtype_kwarg, head_weights, load_weights_into, loss_backend, pad_token_id, shifted
from fcot.train.trainer import FcotTrainer, Stage, TrainModule, build_trainer, run

LORA_FILE = "lora_adapters.safetensors"
"""The LoRA adapters of a checkpoint, saved next to the merged model (read on resume)."""


class PosttrainModule(TrainModule):
    """The compressed model for SFT: patched here with ``cfg``'s compressor unless it already is;
    the ViT frozen (unless ``posttrain.train_vision``), everything else trainable."""

    def __init__(self, model: nn.Module, tokenizer: Any, cfg: RunConfig) -> None:
        compress(model, tokenizer, cfg)
        super().__init__(model, tokenizer, cfg)
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

    def rows(self, input_ids, attention_mask, labels, pixel_values=None, num_tiles=None) -> dict[str, torch.Tensor]:
        """``{"hidden": (N, H), "labels": (N,)}``: the supervised rows, next-token aligned."""
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

    def loss_sums(self, **inputs: Any) -> dict[str, torch.Tensor]:
        out = self.rows(**inputs)
        out["loss_sum"] = sft_loss(out, self.parts.head, self.cfg, reduction="sum")
        out["tokens"] = torch.tensor(out["labels"].shape[0], device=out["loss_sum"].device)
        return out

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
        fresh = load_compressed(checkpoint, fused=self.cfg.common.fused, **dtype_kwarg(next(self.model.parameters()).dtype),
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


def sft_loss(out: dict[str, torch.Tensor], head: nn.Module, cfg: RunConfig, *, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of the answer rows through the LM head, averaged (``"mean"``) or summed
    (``"sum"``): :func:`fcot_kernels.fused_linear_distill`'s CE-only mode (fused backend when
    ``common.fused``, its full-logits reference otherwise)."""
    h, labels = out["hidden"], out["labels"]
    w, b = head_weights(head, h.dtype)
    with torch.autocast(h.device.type, enabled=False):  # both backends in the hidden states' dtype
        return fk.fused_linear_distill(h, None, w, b, labels=labels, kl_weight=0.0, ce_weight=1.0, reduction=reduction,
                                       backend=loss_backend(cfg))


STAGE = Stage(name="posttrain", make_module=PosttrainModule, allow_compressed=True,
              data_tokens=lambda base, out: out,  # the compressed model's layout
              make_collator=lambda module, tokenizer, base, out: ConversationCollator(pad_token_id(tokenizer)))


def build_posttrain_trainer(cfg: RunConfig, **kwargs: Any) -> FcotTrainer:
    """:func:`fcot.train.trainer.build_trainer` for a ``posttrain`` config (``common.model`` may
    be a stage-1 output)."""
    _check_stage(cfg)
    return build_trainer(cfg, **kwargs)


def run_posttrain(cfg: RunConfig, *, resume: bool = False, **kwargs: Any) -> FcotTrainer:
    """:func:`fcot.train.trainer.run` for a ``posttrain`` config."""
    _check_stage(cfg)
    return run(cfg, resume=resume, **kwargs)


def _check_stage(cfg: RunConfig) -> None:
    if cfg.stage != "posttrain":
        raise ConfigError(f"stage={cfg.stage!r}: this needs a posttrain config")


__all__ = ["PosttrainModule", "STAGE", "build_posttrain_trainer", "run_posttrain", "sft_loss"]
