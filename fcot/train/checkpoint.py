"""The run folder: the metrics JSONL, atomic checkpoints, resume, the final model and the data
summary. :class:`AtomicCheckpoints` is mixed into :class:`fcot.train.engine.FcotTrainer`.

Checkpoints: ``Trainer`` writes ``checkpoint-N`` in place, so a run killed while saving leaves
a partial folder that ``resume_from_checkpoint=True`` would pick (it takes the highest N).
:class:`AtomicCheckpoints` writes each checkpoint into ``output_dir/.staging/checkpoint-N``
(every rank writes its part there), then the main process renames it into ``output_dir`` (one
``os.replace`` of a folder: atomic on one file system) and rotates old ones. The model part of a
checkpoint is the compressed model's ``save_pretrained`` (with its ``config.fcot`` section), so
every checkpoint, and the final model in ``output_dir``, loads with :func:`fcot.load_compressed`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from fcot.train.config import ConfigError, RunConfig, check_output_dir, save_config

logger = logging.getLogger("fcot.train")

METRICS_FILE = "metrics.jsonl"
STAGING = ".staging"


def metrics_callback_class():
    from transformers import TrainerCallback

    class MetricsCallback(TrainerCallback):
        """Appends every log (loss, learning rate, grad norm, ...) to ``output_dir/metrics.jsonl``
        as one JSON line with ``step``, ``epoch`` and ``time``, flushed and fsynced. On resume, lines
        past the checkpoint's step (written before the interruption) are dropped first, so the file
        is the run's one sequence."""

        def on_train_begin(self, args, state, control, **kwargs):
            path = Path(args.output_dir) / METRICS_FILE
            if state.is_world_process_zero and path.exists():
                lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
                kept = [ln for ln in lines if json.loads(ln).get("step", 0) <= state.global_step]
                tmp = path.with_suffix(".tmp")
                tmp.write_text("".join(ln + "\n" for ln in kept), encoding="utf-8")
                os.replace(tmp, path)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            entry = {"step": state.global_step, "epoch": state.epoch, "time": time.time(), **logs}
            with open(Path(args.output_dir) / METRICS_FILE, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(entry) + "\n")
                fh.flush()
                os.fsync(fh.fileno())

    return MetricsCallback


def read_metrics(output_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The lines of a run's ``metrics.jsonl``."""
    path = Path(output_dir) / METRICS_FILE
    return [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]


class AtomicCheckpoints:
    """Mixed into a ``Trainer`` subclass (before ``Trainer``): the compressed model saved with
    ``save_pretrained`` (loadable by :func:`fcot.load_compressed`), checkpoints written atomically
    (staged then renamed), resume reloading the model through the module's ``load_compressed``."""

    def _save_checkpoint(self, model, trial):
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        try:
            from transformers.trainer_utils import rotate_checkpoints
        except ImportError:  # transformers 4.x: a Trainer method
            rotate_checkpoints = None
        run_dir = self.args.output_dir
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = os.path.join(run_dir, STAGING)
        self._fcot_staging = True
        limit, self.args.save_total_limit = self.args.save_total_limit, None  # rotation runs after the rename
        try:
            if self.args.should_save and os.path.isdir(os.path.join(staging, name)):
                shutil.rmtree(os.path.join(staging, name))  # left by a killed run
            self.accelerator.wait_for_everyone()
            super()._save_checkpoint(model, trial)
        finally:
            self._fcot_staging = False
            self.args.save_total_limit = limit
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            final = os.path.join(run_dir, name)
            if os.path.isdir(final):
                shutil.rmtree(final)
            os.replace(os.path.join(staging, name), final)
            try:
                os.rmdir(staging)  # only when empty
            except OSError:
                pass
            if limit:
                if rotate_checkpoints is not None:
                    rotate_checkpoints(output_dir=run_dir, save_total_limit=limit,
                                       best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False)
                else:
                    self._rotate_checkpoints(use_mtime=False, output_dir=run_dir)
        self.accelerator.wait_for_everyone()

    def _get_output_dir(self, trial):
        out = super()._get_output_dir(trial)
        return os.path.join(out, STAGING) if getattr(self, "_fcot_staging", False) else out

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        module = self.accelerator.unwrap_model(self.model)
        if state_dict is not None:  # FSDP / DeepSpeed: the gathered full state dict of the TrainModule
            state_dict = {k[len("model."):]: v for k, v in state_dict.items() if k.startswith("model.")}
        module.save_compressed(output_dir, state_dict=state_dict)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        image_processor = getattr(self, "fcot_image_processor", None)
        if image_processor is not None:
            image_processor.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        module = self.accelerator.unwrap_model(model if model is not None else self.model)
        module.load_compressed(resume_from_checkpoint)


def check_run(cfg: RunConfig, *, resume: bool) -> str | None:
    """Before anything loads or is written: refuse an output folder that holds another run
    (unless ``--overwrite``), and for ``resume`` find its last complete checkpoint (returned)."""
    check_output_dir(cfg, resume=resume)
    return last_checkpoint(cfg.common.output_dir) if resume else None


def start_run(cfg: RunConfig) -> None:
    """Once the model and the data are ready: clear the output folder on ``--overwrite`` and save
    the config there (main process), so a run that fails to start leaves nothing behind."""
    from accelerate import PartialState

    state = PartialState()
    out = Path(cfg.common.output_dir)
    if state.is_main_process:
        if cfg.common.overwrite and out.exists():
            shutil.rmtree(out)
        save_config(cfg, out)
    state.wait_for_everyone()


def last_checkpoint(output_dir: str) -> str:
    from transformers.trainer_utils import get_last_checkpoint

    ckpt = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
    if ckpt is None:
        raise ConfigError(f"--resume: common.output_dir={output_dir!r} holds no checkpoint-N folder to resume from")
    return ckpt


DATA_SUMMARY_FILE = "data_summary.json"


def finish_run(trainer, cfg: RunConfig) -> dict[str, Any]:
    """After training: save the final model to ``common.output_dir`` and report the skipped
    records (logged, and written to ``data_summary.json`` by the main process); returns the counts."""
    trainer.save_model(cfg.common.output_dir)
    summary = trainer.train_dataset.summary()
    (logger.warning if summary.skipped else logger.info)("data: %s", summary)
    counts = summary.as_dict()
    if trainer.args.should_save:
        path = Path(cfg.common.output_dir) / DATA_SUMMARY_FILE
        path.write_text(json.dumps(counts, indent=1, default=str), encoding="utf-8")
    return counts


__all__ = ["AtomicCheckpoints", "DATA_SUMMARY_FILE", "METRICS_FILE", "STAGING", "check_run", "finish_run",
           "last_checkpoint", "metrics_callback_class", "read_metrics", "start_run"]
