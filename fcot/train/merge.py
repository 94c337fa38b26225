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
folder next to the output and renamed into place, so a killed merge leaves no half-written model;
the hidden ``.OUT.tmp-PID`` folders of merges that died (their pid is gone from this host) are
removed by the next merge into ``OUT``. The merge holds a lock on ``OUT`` while it runs
(:class:`fcot.train.checkpoint.FolderLock`), so two merges into one folder cannot interleave.
A result that is not finite where every input is (NaN in an input, or an overflow) is an error
before anything is written to ``OUT``; a full disk removes the partial write and says so.
Memory: one output shard plus one tensor per input checkpoint at a time.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from fcot.train.checkpoint import FolderLock, damaged_file_error, pid_alive, raise_if_disk_full

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
        with open_safetensors(path) as f:
            metadata[path.name] = f.metadata()
            for key in f.keys():
                if key in layout:
                    raise MergeError(f"checkpoint {str(folder)!r}: tensor {key!r} is in both {layout[key].file} and {path.name}")
                s = f.get_slice(key)
                layout[key] = TensorInfo(path.name, tuple(s.get_shape()), s.get_dtype())
    return layout, metadata


def open_safetensors(path: str | os.PathLike):
    """``safe_open(path)``; a file that is not a whole safetensors file (truncated, empty, another
    format) is a :class:`fcot.train.checkpoint.DamagedFileError` naming it (safetensors checks
    that the header covers the file)."""
    try:
        return safe_open(path, framework="pt")
    except (SafetensorError, OSError) as e:
        raise damaged_file_error(path, e) from None


def check_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    """One non-negative finite weight per checkpoint with a positive sum, normalised to sum to 1."""
    if weights is None:
        return [1.0 / n] * n
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise MergeError(f"weights={weights}: {len(weights)} weights for {n} checkpoints; give one per checkpoint")
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise MergeError(f"weights={weights}: every weight must be finite and >= 0")
    top = max(weights)
    if top <= 0:
        raise MergeError(f"weights={weights}: the weights sum to 0.0; at least one must be positive")
    # Scale by the largest first: the sum of huge weights (1e308 + 1e308) would overflow to inf.
    scaled = [w / top for w in weights]
    total = math.fsum(scaled)
    normalised = [w / total for w in scaled]
    if not all(math.isfinite(w) for w in normalised) or not any(normalised):
        raise MergeError(f"weights={weights}: they do not normalise to finite weights with a positive sum")
    return normalised


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
    out = acc.to(first.dtype)
    bad = ~torch.isfinite(out)
    if bad.any():
        # Allowed only where every checkpoint holds the same infinity (a -inf mask buffer, say).
        if not all(torch.equal(t[bad], first[bad]) for t in tensors):
            culprits = [str(c) for t, c in zip(tensors, checkpoints) if not torch.isfinite(t).all()]
            why = f"non-finite values in {culprits}" if culprits else f"overflow of {first.dtype}"
            raise MergeError(f"key {key!r}: the weighted average has {int(bad.sum())} non-finite element(s) ({why}); "
                             "nothing was written. Check those checkpoints or leave them out")
    return out


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
    with FolderLock(out, f"out={str(out)!r}"):
        return _merge_locked(out, ckpts, w, overwrite=overwrite)


def _clean_stale_temporaries(out: Path) -> None:
    """Remove ``.OUT.tmp-PID`` / ``.OUT.old-PID`` folders of merges whose process is gone (a kill)."""
    pattern = re.compile(re.escape(f".{out.name}.") + r"(tmp|old)-(\d+)")
    for path in out.parent.glob(f".{out.name}.*-*"):
        m = pattern.fullmatch(path.name)
        if not m or int(m.group(2)) == os.getpid():
            continue
        if pid_alive(int(m.group(2))):
            logger.warning("fcot merge: leaving %s: its process %s still runs", path, m.group(2))
            continue
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        logger.warning("fcot merge: removed %s, left by a merge that was killed (pid %s)", path, m.group(2))


def _merge_locked(out: Path, ckpts: list[Path], w: list[float], *, overwrite: bool) -> Path:
    if out.exists() and not overwrite:
        raise FileExistsError(f"out={str(out)!r} already exists: pass --overwrite (overwrite=True) to replace it")
    _clean_stale_temporaries(out)
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
                        handles[k, name] = open_safetensors(c / name)
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
    except OSError as e:
        needed = sum((ckpts[0] / f).stat().st_size for f in shards)
        raise_if_disk_full(e, out.parent, f"writing the merge {out.name}", needed=needed)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
