"""``fcot merge``: weighted average of several checkpoints (safetensors in, safetensors out).

FCoT-VL's post-training ends by averaging several fine-tuned checkpoints of the same model.
:func:`merge_checkpoints` checks first that every checkpoint holds the same tensor names with
the same shapes and dtypes, naming the first mismatch, then averages tensor by tensor in fp32
(fp64 for fp64 tensors) and writes each back in its own dtype. Integer and bool tensors (step
counters, index buffers) are not averaged: they must be equal in every checkpoint and are
copied.

The output keeps the first checkpoint's layout: the same shard files with the same tensors in
each (and its ``model.safetensors.index.json``), and its other files (``config.json``, tokenizer
and processor files, remote code). Trainer state (optimizer, scheduler, RNG, ``trainer_state.json``)
is not copied: it belongs to one run, not to the average. Everything is written to a temporary
folder next to the output and renamed into place, so a killed merge leaves no half-written model.
Memory: one output shard plus one tensor per input checkpoint at a time.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

logger = logging.getLogger("fcot.train")

INDEX = "model.safetensors.index.json"
# Files of a Trainer checkpoint that describe one training run, not the weights.
TRAINER_STATE = ("optimizer.pt", "optimizer.bin", "scheduler.pt", "scaler.pt", "trainer_state.json", "training_args.bin")


class MergeError(ValueError):
    """The checkpoints cannot be merged: the message names the key, the checkpoint and what differs."""


@dataclass(frozen=True)
class TensorInfo:
    file: str  # shard file name inside the checkpoint
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype name ("BF16", "F32", ...)


def read_layout(checkpoint: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, dict[str, str] | None]]:
    """Every tensor of a checkpoint folder: ``{name: TensorInfo}``, and each shard's metadata.

    Reads the headers only. All ``*.safetensors`` files at the top of the folder are weights.
    """
    folder = Path(checkpoint)
    if not folder.is_dir():
        raise MergeError(f"checkpoint {str(folder)!r} is not a folder")
    files = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
    if not files:
        other = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
        hint = f" (it has {other}: save with safe_serialization=True)" if other else ""
        raise MergeError(f"checkpoint {str(folder)!r} has no *.safetensors file{hint}")
    layout: dict[str, TensorInfo] = {}
    metadata: dict[str, dict[str, str] | None] = {}
    for path in files:
        with safe_open(path, framework="pt") as f:
            metadata[path.name] = f.metadata()
            for key in f.keys():
                if key in layout:
                    raise MergeError(f"checkpoint {str(folder)!r}: tensor {key!r} is in both {layout[key].file} and {path.name}")
                s = f.get_slice(key)
                layout[key] = TensorInfo(path.name, tuple(s.get_shape()), s.get_dtype())
    return layout, metadata


def check_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    """One non-negative finite weight per checkpoint with a positive sum, normalised to sum to 1."""
    if weights is None:
        return [1.0 / n] * n
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise MergeError(f"weights={weights}: {len(weights)} weights for {n} checkpoints; give one per checkpoint")
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise MergeError(f"weights={weights}: every weight must be finite and >= 0")
    total = sum(weights)
    if total <= 0:
        raise MergeError(f"weights={weights}: the weights sum to {total}; at least one must be positive")
    return [w / total for w in weights]


def check_compatible(checkpoints: Sequence[Path], layouts: Sequence[dict[str, TensorInfo]]) -> None:
    """Raise :class:`MergeError` naming the first key, checkpoint, shape or dtype that differs from checkpoint 0."""
    ref, ref_layout = checkpoints[0], layouts[0]
    for ckpt, layout in zip(checkpoints[1:], layouts[1:]):
        missing = sorted(set(ref_layout) - set(layout))
        extra = sorted(set(layout) - set(ref_layout))
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing {len(missing)} key(s) of {str(ref)!r}, e.g. {missing[:3]}")
            if extra:
                parts.append(f"has {len(extra)} key(s) {str(ref)!r} lacks, e.g. {extra[:3]}")
            raise MergeError(f"checkpoint {str(ckpt)!r} " + "; ".join(parts))
        for key, info in ref_layout.items():
            other = layout[key]
            if other.shape != info.shape:
                raise MergeError(f"key {key!r}: shape {list(other.shape)} in {str(ckpt)!r} but {list(info.shape)} in {str(ref)!r}")
            if other.dtype != info.dtype:
                raise MergeError(f"key {key!r}: dtype {other.dtype} in {str(ckpt)!r} but {info.dtype} in {str(ref)!r}")


def _average(key: str, tensors: list[torch.Tensor], weights: list[float], checkpoints: Sequence[Path]) -> torch.Tensor:
    first = tensors[0]
    if not first.is_floating_point():
        for t, ckpt in zip(tensors[1:], checkpoints[1:]):
            if not torch.equal(t, first):
                raise MergeError(f"key {key!r}: {first.dtype} tensors cannot be averaged and differ between "
                                 f"{str(checkpoints[0])!r} and {str(ckpt)!r}")
        return first
    acc_dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    acc = torch.zeros(first.shape, dtype=acc_dtype)
    for t, w in zip(tensors, weights):
        if w:
            acc.add_(t.to(acc_dtype), alpha=w)
    return acc.to(first.dtype)


def merge_checkpoints(out: str | os.PathLike, checkpoints: Sequence[str | os.PathLike],
                      weights: Sequence[float] | None = None, *, overwrite: bool = False) -> Path:
    """Write the weighted average of ``checkpoints`` to the folder ``out``; return its path.

    Args:
        out: the new checkpoint folder; refused if it exists, unless ``overwrite``.
        checkpoints: two or more folders of safetensors weights of the same model.
        weights: one non-negative weight per checkpoint (normalised to sum to 1); None: equal.
        overwrite: replace an existing ``out`` (only after the new one is complete).
    """
    ckpts = [Path(c) for c in checkpoints]
    if len(ckpts) < 2:
        raise MergeError(f"checkpoints={[str(c) for c in ckpts]}: merging needs at least 2 checkpoints")
    w = check_weights(weights, len(ckpts))
    out = Path(out)
    if any(out.resolve() == c.resolve() for c in ckpts):
        raise MergeError(f"out={str(out)!r} is one of the input checkpoints: write the merge to a new folder")
    if out.exists() and not overwrite:
        raise FileExistsError(f"out={str(out)!r} already exists: pass --overwrite (overwrite=True) to replace it")
    for c in ckpts:
        if (c / "adapter_config.json").is_file():
            # Averaging LoRA factors is not averaging the adapted weights: (B1 A1 + B2 A2) / 2 != (B1 + B2)(A1 + A2) / 4.
            raise MergeError(f"checkpoint {str(c)!r} is a LoRA adapter: averaging its A and B factors does not average "
                             "the adapted weights; merge each adapter into its model first (peft merge_and_unload, "
                             "then save_pretrained) and merge those")
    read = [read_layout(c) for c in ckpts]
    layouts = [r[0] for r in read]
    check_compatible(ckpts, layouts)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        shards: dict[str, list[str]] = {}
        for key, info in layouts[0].items():
            shards.setdefault(info.file, []).append(key)
        for shard, keys in sorted(shards.items()):
            merged: dict[str, torch.Tensor] = {}
            handles: dict[tuple[int, str], object] = {}  # (checkpoint, its shard) -> open file; layouts may differ
            for key in keys:
                tensors = []
                for k, (c, layout) in enumerate(zip(ckpts, layouts)):
                    name = layout[key].file
                    if (k, name) not in handles:
                        handles[k, name] = safe_open(c / name, framework="pt")
                    tensors.append(handles[k, name].get_tensor(key))
                merged[key] = _average(key, tensors, w, ckpts)
            save_file(merged, tmp / shard, metadata=read[0][1][shard] or {"format": "pt"})
            logger.info("merged %s (%d tensors)", shard, len(keys))
        for path in sorted(ckpts[0].iterdir()):
            if path.suffix == ".safetensors" or path.name in TRAINER_STATE or path.name.startswith("rng_state"):
                continue
            if path.is_file():
                shutil.copy2(path, tmp / path.name)
            else:
                logger.warning("fcot merge: not copying the folder %s (only files next to the weights are copied)", path)
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
