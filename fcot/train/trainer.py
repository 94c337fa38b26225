"""The one trainer both stages use: :class:`TrainModule` (what ``Trainer`` wraps, its forward
returning the loss) and :class:`FcotTrainer` (``Trainer`` with one ``compute_loss`` and a
``stage``), plus :func:`build_trainer` / :func:`run` that put a stage together.

The loss, LM head included, is computed inside :meth:`TrainModule.forward`, so whatever wraps the
module (DDP, FSDP full-shard, ZeRO-3) gathers the head's weights for that forward as for any
other layer (TRL's trainers do the same by redirecting their loss through the wrapped forward).

Gradient accumulation: the module declares ``accepts_loss_kwargs``, so ``Trainer`` counts the
answer tokens of the whole accumulated batch (``num_items_in_batch``, over every rank when
``training.average_tokens_across_devices``) and the forward divides the summed loss by it. Four
micro-batches of 4 then give the gradient of one batch of 16, not a mean of per-micro-batch means.

Frozen parts stay in eval mode: ``Trainer`` calls ``model.train()`` every step, and
:meth:`TrainModule.train` puts back into eval every submodule none of whose parameters learns
(the ViT, the teacher's projector, the frozen LLM of stage 1), so dropout and drop path apply
only where something learns.

A stage is a module ``fcot.train.<stage>`` exporting ``STAGE`` (a :class:`Stage`): how to build
its :class:`TrainModule`, which visual token count its data uses, and its collator.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from fcot.train.checkpoint import AtomicCheckpoints, check_run, finish_run, metrics_callback_class, start_run
from fcot.train.config import ConfigError, RunConfig
from fcot.train.engine import ModelParts, build_dataset, load_base, training_arguments, visual_tokens_per_tile

logger = logging.getLogger("fcot.train")


class TrainModule(nn.Module):
    """What ``Trainer`` trains: the patched model (``.model``), its parts (``.parts``) and, per
    stage, more frozen modules. Subclasses implement :meth:`loss_sums`; :meth:`forward` divides
    the summed loss by the accumulated batch's token count."""

    accepts_loss_kwargs = True
    """``Trainer`` then counts the answer tokens of the accumulated batch and passes ``num_items_in_batch``."""
    loss_type = "ForCausalLM"
    """... counted over ``labels[..., 1:]``: the next-token targets this module's loss is taken on."""

    def __init__(self, model: nn.Module, tokenizer: Any, cfg: RunConfig) -> None:
        super().__init__()
        self.model = model
        self.parts = ModelParts(model, tokenizer)
        self.cfg = cfg
        # accelerate's FSDP auto-wrap policy reads the root module's _no_split_modules (the ViT's
        # and the LLM's blocks): give it the wrapped model's, so each block is its own FSDP unit.
        self._no_split_modules = list(getattr(model, "_no_split_modules", None) or [])
        self.log_parts = False
        """Set by :class:`FcotTrainer` on the steps it logs: the forward then also returns the
        loss's parts (per-stage metrics such as KL, CE, agreement), computed without a graph."""

    @property
    def config(self):  # Trainer reads model.config in a few places
        return self.model.config

    def loss_sums(self, **inputs: Any) -> dict[str, torch.Tensor]:
        """``{"loss_sum": summed loss over the answer tokens, "tokens": their count, ...}``."""
        raise NotImplementedError

    def forward(self, num_items_in_batch: torch.Tensor | int | None = None, **inputs: Any) -> dict[str, torch.Tensor]:
        """The stage's loss, LM head included, normalised by ``num_items_in_batch`` (the answer
        tokens of the whole accumulated batch) or, without it, by this batch's own count."""
        out = self.loss_sums(**inputs)
        denom = out["tokens"] if num_items_in_batch is None else num_items_in_batch
        denom = torch.as_tensor(denom, device=out["loss_sum"].device).clamp(min=1).to(out["loss_sum"].dtype)
        out["loss"] = out["loss_sum"] / denom
        return out

    def frozen_modules(self) -> list[nn.Module]:
        """The largest submodules none of whose parameters requires grad."""
        found: list[nn.Module] = []

        def visit(module: nn.Module) -> None:
            params = list(module.parameters())
            if params and not any(p.requires_grad for p in params):
                found.append(module)
                return
            for child in module.children():
                visit(child)

        for child in self.children():
            visit(child)
        return found

    def train(self, mode: bool = True) -> TrainModule:
        super().train(mode)
        if mode:
            for module in self.frozen_modules():
                module.eval()
        return self

    def gradient_checkpointing(self) -> None:
        decoder = self.parts.decoder
        if not getattr(decoder, "supports_gradient_checkpointing", False):
            raise ConfigError(f"gradient_checkpointing: the LLM {type(decoder).__name__} does not support it; turn it off")
        # transformers >= 5 renamed it activation_checkpointing_enable (the old name warns)
        if hasattr(decoder, "activation_checkpointing_enable"):
            decoder.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            decoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def save_compressed(self, output_dir: str, state_dict: dict | None = None) -> None:
        self.model.save_pretrained(output_dir, state_dict=state_dict, safe_serialization=True)

    def load_compressed(self, checkpoint: str) -> None:
        from fcot.train.engine import load_weights_into

        load_weights_into(self.model, checkpoint, self.cfg)


def _trainer_base():
    from transformers import Trainer

    return Trainer


PART_PREFIX = "sum_"
"""Keys of a forward's output that hold summed metrics (``sum_kl``...), with ``sum_tokens`` their count."""


class FcotTrainer(AtomicCheckpoints, _trainer_base()):
    """``Trainer`` for both stages: one ``compute_loss`` (run the wrapped module, whose forward
    returns the loss), fcot's run folder (:class:`fcot.train.checkpoint.AtomicCheckpoints`), and
    the loss's parts logged next to the loss (``kl``, ``ce``, ``agreement`` in stage 1)."""

    def __init__(self, *args: Any, stage: str, fcot_cfg: RunConfig, image_processor: Any = None,
                 sharded: bool = False, **kwargs: Any) -> None:
        self.stage = stage
        self.fcot_cfg = fcot_cfg
        self.fcot_image_processor = image_processor
        self.fcot_sharded = sharded
        self._part_sums: dict[str, torch.Tensor] = {}
        super().__init__(*args, **kwargs)

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        if self.fcot_sharded:  # FSDP2 applied by fcot on a CPU (fcot.train.distributed)
            from fcot.train.distributed import mark_accelerator_fsdp2

            mark_accelerator_fsdp2(self.accelerator)
            self.is_fsdp_enabled = True

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if not self.fcot_sharded:
            return super().save_model(output_dir, _internal_call)
        from fcot.train.distributed import full_state_dict

        state_dict = full_state_dict(self.model)  # every rank takes part; rank 0 holds the tensors
        self._save(output_dir if output_dir is not None else self.args.output_dir, state_dict=state_dict)

    def _logs_next_step(self) -> bool:
        args, step = self.args, self.state.global_step + 1
        if str(getattr(args.logging_strategy, "value", args.logging_strategy)) != "steps":
            return True
        every = int(self.state.logging_steps or args.logging_steps or 1)
        return (args.logging_first_step and step == 1) or step % max(every, 1) == 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        module = self.accelerator.unwrap_model(model)
        module.log_parts = module.training and self._logs_next_step()
        out = model(**inputs, num_items_in_batch=num_items_in_batch)
        loss = out["loss"]
        if num_items_in_batch is not None and self.args.average_tokens_across_devices \
                and self.accelerator.num_processes > 1:
            # num_items_in_batch counts every rank's tokens and DDP/FSDP average the ranks' gradients.
            loss = loss * self.accelerator.num_processes
        for key, value in out.items():
            if key.startswith(PART_PREFIX):
                value = value.detach().float().reshape(())
                self._part_sums[key] = self._part_sums.get(key, 0) + value
        return (loss, out) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self._part_sums and "loss" in logs:
            names = sorted(self._part_sums)
            sums = torch.stack([self._part_sums[k] for k in names]).to(self.args.device)
            if self.accelerator.num_processes > 1:
                sums = self.accelerator.reduce(sums, reduction="sum")
            values = dict(zip(names, sums.tolist()))
            tokens = max(values.pop(f"{PART_PREFIX}tokens", 0.0), 1.0)
            logs.update({k[len(PART_PREFIX):]: v / tokens for k, v in values.items()})
            self._part_sums = {}
        super().log(logs, *args, **kwargs)


@dataclass(frozen=True)
class Stage:
    """What makes a stage: its module, whether it starts from a compressed model, the visual
    tokens per tile its data is laid out with, and its collator."""

    name: str
    make_module: Callable[[nn.Module, Any, RunConfig], TrainModule]
    allow_compressed: bool
    data_tokens: Callable[[int, int], int]
    """``(uncompressed, compressed)`` visual tokens per tile -> the count the data set lays out."""
    make_collator: Callable[[TrainModule, Any, int, int], Any]
    """``(module, tokenizer, uncompressed, compressed)`` -> the data collator."""


def get_stage(name: str) -> Stage:
    try:
        return importlib.import_module(f"fcot.train.{name}").STAGE
    except (ImportError, AttributeError):
        raise ConfigError(f"stage={name!r}: no module fcot.train.{name} exporting STAGE") from None


def build_trainer(cfg: RunConfig, *, model: nn.Module | None = None, tokenizer: Any = None,
                  image_processor: Any = None, callbacks: list | None = None) -> FcotTrainer:
    """A ready :class:`FcotTrainer` for ``cfg.stage``. ``model``/``tokenizer``/``image_processor``
    (all three, or none) replace loading ``common.model``. Does not touch the output folder:
    :func:`run` checks it first."""
    from fcot.train.distributed import check_cpu_fsdp, cpu_fsdp, shard_module, without_fsdp

    stage = get_stage(cfg.stage)
    sharded = cpu_fsdp(cfg)
    if sharded:
        check_cpu_fsdp(cfg)
    if model is None:
        model, tokenizer, image_processor = load_base(cfg, allow_compressed=stage.allow_compressed)
    elif tokenizer is None:
        raise ValueError("tokenizer=None: pass the model's tokenizer with model")
    module = stage.make_module(model, tokenizer, cfg)
    base, out = visual_tokens_per_tile(module.model)
    dataset = build_dataset(cfg, module.model, tokenizer, image_processor, tokens_per_tile=stage.data_tokens(base, out),
                            skip_log_dir=cfg.common.output_dir)
    if sharded:  # accelerate would fall back to DDP on a CPU: fcot applies FSDP2 itself
        args = training_arguments(dataclasses.replace(cfg, training=without_fsdp(cfg.training)), logging_steps=1,
                                  save_strategy="steps", save_steps=500)
        shard_module(module)
    else:
        args = training_arguments(cfg, logging_steps=1, save_strategy="steps", save_steps=500)
    trainer = FcotTrainer(model=module, args=args, train_dataset=dataset, sharded=sharded,
                          data_collator=stage.make_collator(module, tokenizer, base, out), processing_class=tokenizer,
                          callbacks=[metrics_callback_class()(), *(callbacks or [])], stage=cfg.stage, fcot_cfg=cfg,
                          image_processor=image_processor)
    logger.info("%s: %d visual tokens per tile uncompressed, %d compressed; training %s", cfg.stage, base, out,
                [n for n, p in module.named_parameters() if p.requires_grad][:8])
    return trainer


def run(cfg: RunConfig, *, resume: bool = False, **build_kwargs: Any) -> FcotTrainer:
    """A stage end to end: check the output folder, build, train, save the compressed model to
    ``common.output_dir`` (loadable by :func:`fcot.load_compressed`). ``resume`` continues from
    the folder's last checkpoint."""
    checkpoint = check_run(cfg, resume=resume)
    trainer = build_trainer(cfg, **build_kwargs)
    start_run(cfg)
    trainer.train(resume_from_checkpoint=checkpoint)
    trainer.fcot_data_summary = finish_run(trainer, cfg)
    release_wrappers(trainer)
    return trainer


def release_wrappers(trainer: FcotTrainer) -> None:
    """Drop the DDP wrapper (and accelerate's references to prepared objects) once training is
    done, while the process group is still up: a DDP reducer destroyed after
    ``destroy_process_group`` (at interpreter exit) can abort the process ('terminate called
    without an active exception'). ``trainer.model`` (the unwrapped module) stays usable."""
    import gc

    trainer.model_wrapped = trainer.model
    trainer.accelerator.free_memory()
    gc.collect()


__all__ = ["FcotTrainer", "Stage", "TrainModule", "build_trainer", "get_stage", "run"]
