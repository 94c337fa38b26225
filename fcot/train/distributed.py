"""Distributed concerns of fcot's trainers: FSDP on a CPU.

On GPUs, ``training.fsdp`` / ``training.fsdp_config`` go to ``TrainingArguments`` as for any
``Trainer`` and accelerate shards the module. On CPUs accelerate does not: it enables FSDP only
for GPU setups and falls back to DDP, silently training an unsharded model. torch's FSDP2
(``fully_shard``) does run on CPUs with gloo, so fcot applies it itself there, the way
accelerate's FSDP2 path does with a transformer-layer wrap policy: every layer the model lists
in ``_no_split_modules`` (the ViT's and the LLM's blocks) becomes its own unit, then the
:class:`~fcot.train.trainer.TrainModule` as the root unit (embeddings, projectors, norms, LM
head). The trainer then tells accelerate the module is FSDP2-sharded, so it neither wraps it in
DDP nor shards it again, and saves the model as a full state dict gathered on rank 0
(:func:`full_state_dict`), which loads with :func:`fcot.load_compressed`. CI exercises the
sharded path this way (tests/fcot/train/test_distributed.py).

Because the loss, LM head included, is computed in the module's forward, the sharded head is
gathered for that forward like every other layer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fcot.train.config import ConfigError, RunConfig

FSDP_KEYS = ("fsdp", "fsdp_config")


def cpu_fsdp(cfg: RunConfig) -> bool:
    """Whether ``cfg`` asks for FSDP on a machine without CUDA (fcot shards the module itself)."""
    return bool(cfg.training.get("fsdp")) and not torch.cuda.is_available()


def check_cpu_fsdp(cfg: RunConfig) -> None:
    """Refuse what fcot's CPU FSDP does not do, naming the option: it needs a distributed launch
    (torchrun) and full sharding."""
    import torch.distributed as dist

    fsdp = cfg.training.get("fsdp")
    words = fsdp.split() if isinstance(fsdp, str) else list(fsdp or [])
    unsupported = [w for w in words if w not in ("full_shard", "auto_wrap")]
    if unsupported:
        raise ConfigError(f"training.fsdp={fsdp!r}: on a CPU fcot shards with FSDP2 full_shard only (got {unsupported}); "
                          "set training.fsdp=full_shard")
    config = cfg.training.get("fsdp_config") or {}
    if isinstance(config, dict) and int(config.get("fsdp_version", config.get("version", 2))) != 2:
        raise ConfigError("training.fsdp_config.fsdp_version: on a CPU only FSDP2 runs (FSDP1 needs an accelerator); "
                          "set it to 2 or drop it")
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else \
        int(__import__("os").environ.get("WORLD_SIZE", "1"))
    if world < 2:
        raise ConfigError("training.fsdp: FSDP shards over processes; launch with torchrun --nproc_per_node=N (N >= 2) "
                          "or remove training.fsdp")


def without_fsdp(training: dict[str, Any]) -> dict[str, Any]:
    """``training`` without the FSDP keys (fcot shards the module itself on a CPU)."""
    return {k: v for k, v in training.items() if k not in FSDP_KEYS}


def shard_module(module: nn.Module) -> nn.Module:
    """FSDP2 ``fully_shard`` on every ``_no_split_modules`` layer of ``module.model``, then on
    ``module`` (the root). Needs an initialised process group (gloo on a CPU). In place; returns
    ``module``."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not (dist.is_available() and dist.is_initialized()):
        raise ConfigError("training.fsdp: no torch.distributed process group; launch with torchrun")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    names = set(getattr(module, "_no_split_modules", None) or [])
    layers = [m for m in module.model.modules() if type(m).__name__ in names]
    if not layers:
        raise ConfigError(f"training.fsdp: {type(module.model).__name__} lists no _no_split_modules layers to shard")
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(module, mesh=mesh)
    module.fcot_sharded = True
    return module


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The sharded module's full state dict, gathered on rank 0 into CPU tensors (empty on the
    other ranks). A collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def mark_accelerator_fsdp2(accelerator: Any) -> None:
    """Tell accelerate that the model it will prepare is already FSDP2-sharded: distributed type
    FSDP (no DDP wrapper; ``prepare`` returns an FSDP2 module as it is) with an FSDP2 plugin that
    gathers full state dicts for saving."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    state.fsdp_plugin = FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type="FULL_STATE_DICT",
                                                       reshard_after_forward=True)
    state.distributed_type = DistributedType.FSDP


__all__ = ["FSDP_KEYS", "check_cpu_fsdp", "cpu_fsdp", "full_state_dict", "mark_accelerator_fsdp2", "shard_module",
           "without_fsdp"]
