"""Run configuration for ``fcot distill`` and ``fcot posttrain``: dataclasses, YAML, CLI overrides.

A config file has one section per dataclass, plus ``training`` for what Hugging Face's
``TrainingArguments`` already covers (learning rate, batch size, steps, logging, saving,
DeepSpeed/FSDP, ...), passed through unchanged::

    common:   {model: OpenGVLab/InternVL2-2B, compressor: conv, ratio: 0.5, output_dir: runs/s1}
    data:     {jsonl: data/synth/data.jsonl, max_tiles: 6}
    distill:  {temperature: 1.0, kl_weight: 1.0, ce_weight: 0.1, divergence: forward_kl}
    training: {learning_rate: 1.0e-4, per_device_train_batch_size: 2, max_steps: 200}

Each section is a dataclass whose fields carry their help text in ``metadata["help"]`` (what
``--help`` prints). Command-line overrides win over the file: ``--set data.max_tiles=4`` (the
text is read as the option's declared type by ``HfArgumentParser`` over the section's dataclass,
or over ``TrainingArguments`` for ``training.*``, as TRL's ``TrlParser`` reads its CLI:
``--set training.save_strategy=no`` is the string "no", not YAML's False) and the per-option flags every subcommand has (``--compressor``, ``--ratio``,
``--fused/--no-fused``, ``--backend``, ``--output-dir``, ``--overwrite``, ``--seed``). Every
field is checked when the config is built (type, range, choices, files that must exist), with
an error naming the option to change, so a bad config fails before any model is loaded or any
file is written. ``training`` options that fcot's trainers would ignore or fail on later are
refused there too, naming the ``section.key`` to use instead (:data:`TRAINING_REFUSED`).
Compressor and backend names come from their registries (:data:`fcot.compress.COMPRESSORS`,
:data:`fcot_kernels.dispatch.CHOICES`), so a newly registered compressor trains from the CLI.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import os
import re
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
TEMPLATES = ("chatml", "phi3")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class ConfigError(ValueError):
    """A config value that cannot be used; the message names the option (``section.key``) to change."""


def compressor_names() -> list[str]:
    """The registered compressors (:data:`fcot.compress.COMPRESSORS`; ``none`` keeps every token)."""
    from fcot.compress import COMPRESSORS

    return sorted(COMPRESSORS)


def family_names() -> list[str]:
    """``auto`` and the registered model families (:data:`fcot.models.FAMILIES`)."""
    from fcot.models import FAMILIES

    return ["auto", *sorted(FAMILIES)]


def backend_names() -> list[str]:
    """The kernel backends :mod:`fcot_kernels.dispatch` accepts (``auto`` and the registered ones)."""
    from fcot_kernels.dispatch import CHOICES

    return list(CHOICES)


class CliText(str):
    """A value typed on the command line (``--set``): read as the option's declared type, never
    guessed by YAML (which reads ``no`` as False and ``1e-4`` as a string)."""


_NULLS = ("null", "none", "~", "")


def _argparse_error(message: str) -> typing.NoReturn:
    raise ConfigError(message)


@functools.lru_cache(maxsize=None)
def _cli_parser(cls: type):
    """``HfArgumentParser`` over ``cls``'s fields (a config section, or ``TrainingArguments``):
    it reads command-line text as each field's declared type, as TRL's ``TrlParser`` does; its
    errors become :class:`ConfigError`."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(cls)
    parser.error = _argparse_error
    return parser


def _expected(tp: Any) -> str:
    args = [a for a in typing.get_args(tp) if a is not type(None)] if typing.get_origin(tp) in (Union, types.UnionType) \
        else [tp]
    words = {int: "an integer", float: "a number", bool: "true or false"}
    return " or ".join(words.get(a, _type_name(a)) for a in args)


def read_cli_values(section: str, cls: type, texts: dict[str, str]) -> dict[str, Any]:
    """``--set`` texts of ``section`` (a dataclass ``cls``) read as their fields' declared types by
    ``HfArgumentParser``: ``training.save_strategy=no`` stays the string "no" (YAML would read
    False), ``1e-4`` is a float, ``null`` unsets an optional field, lists take YAML or commas."""
    import yaml

    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for key, text in texts.items():
        tp = hints[key]
        where = f"{section}.{key}={text!r}"
        optional = typing.get_origin(tp) in (Union, types.UnionType) and type(None) in typing.get_args(tp)
        if optional and text.strip().lower() in _NULLS:
            out[key] = None
            continue
        if "dict" in str(tp):  # structured options (fsdp_config, lr_scheduler_kwargs, ...): YAML
            try:
                out[key] = yaml.safe_load(text)
            except yaml.YAMLError as e:
                raise ConfigError(f"{where}: not valid YAML: {e}") from None
            continue
        items = [text]
        if typing.get_origin(tp) is list or "list[" in str(tp):
            try:
                loaded = yaml.safe_load(text)
            except yaml.YAMLError:
                loaded = None
            items = [str(v) for v in loaded] if isinstance(loaded, list) else [v.strip() for v in text.split(",")]
        try:
            namespace, _ = _cli_parser(cls).parse_known_args([f"--{key}", *items])
        except ConfigError as e:
            raise ConfigError(f"{where}: expected {_expected(tp)} ({e})") from None
        out[key] = getattr(namespace, key)
    return out


def option(default: Any = dataclasses.MISSING, *, help: str, default_factory: Any = dataclasses.MISSING) -> Any:
    """A config field whose help text lives in its metadata (``HfArgumentParser`` and ``--help`` read it)."""
    return field(default=default, default_factory=default_factory, metadata={"help": help})


def field_docs(cls: type) -> dict[str, str]:
    """Each field's help text (its ``metadata["help"]``), by name."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(section: str, name: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp`` (int, float, bool, str, list[str], X | None)."""
    where = f"{section}.{name}={value!r}"
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(section, name, value, arg)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: expected {' or '.join(_type_name(a) for a in args)}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # one path where a list is allowed
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list of {_type_name(item)}")
        return [_coerce(section, name, v, item) for v in value]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer")
        return value
    if tp is float:
        if isinstance(value, str):
            try:  # PyYAML reads 1e-4 (no dot) as a string
                return float(value)
            except ValueError:
                raise ConfigError(f"{where}: expected a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string")
        return value
    if tp is Any or tp is dict or origin is dict:
        return value
    raise TypeError(f"fcot config: unsupported annotation {tp!r} for {section}.{name}")


class _Section:
    """Base of the config sections: type-checks every field, then the section's own checks."""

    SECTION = ""

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(self.SECTION, f.name, getattr(self, f.name), hints[f.name]))
        self.validate()

    def validate(self) -> None:
        pass

    def _fail(self, name: str, expected: str) -> typing.NoReturn:
        raise ConfigError(f"{self.SECTION}.{name}={getattr(self, name)!r}: {expected}")


@dataclass
class CommonConfig(_Section):
    """Options every training subcommand shares."""

    SECTION = "common"
    model: str = option("", help=(
        "Base InternVL model: a local folder or a Hugging Face hub id (transformers-native or OpenGVLab "
        "remote code)."))
    compressor: str = option("conv", help=(
        "Visual-token compressor, a name in the ``fcot.compress`` registry (none, avg, dwconv, conv, "
        "tome, prune, and any registered later)."))
    ratio: float | None = option(None, help=(
        "Fraction of visual tokens removed: 0.5 keeps 128 of 256 per tile, 0.75 keeps 64; unset: 0.5 (0 "
        "for compressor none, the one encoding of no compression)."))
    fused: bool = option(True, help=(
        "Use fcot's fused kernels (compressed projector, distillation loss); false runs the reference "
        "ops."))
    backend: str | None = option(None, help=(
        "Kernel backend (``fcot_kernels.dispatch``): auto, reference, triton or cuda; unset uses "
        "FCOT_BACKEND or auto."))
    output_dir: str = option("runs/fcot", help=(
        "Run folder: config, metrics JSONL, checkpoints, report."))
    overwrite: bool = option(False, help=(
        "Replace an output_dir that already holds a different run (otherwise that is an error)."))
    seed: int = option(0, help=(
        "Seed for initialisation, data order and dropout (also TrainingArguments.seed)."))
    trust_remote_code: bool = option(False, help=(
        "Run the model folder's own Python code (needed for OpenGVLab's remote-code InternVL "
        "checkpoints)."))

    def validate(self) -> None:
        if not self.model:
            self._fail("model", "set the base model (--model or common.model): a local folder or a hub id")
        # A path that cannot be a hub id ("/...", "./...", "a/b/c") must be a folder here.
        looks_local = not _HUB_ID.match(self.model) or os.path.exists(self.model)
        if looks_local and not Path(self.model).expanduser().is_dir():
            self._fail("model", "no such folder (a local model path must exist; a hub id looks like org/name)")
        names = compressor_names()
        if self.compressor not in names:
            self._fail("compressor", f"expected one of {names} (the fcot.compress registry)")
        self._check_ratio()
        backends = backend_names()
        if self.backend is not None and self.backend not in backends:
            self._fail("backend", f"expected one of {backends} or unset")
        if not self.output_dir:
            self._fail("output_dir", "expected a folder path")

    def _check_ratio(self) -> None:
        """The one place ``common.ratio`` is checked: in [0, 1), one the compressor supports; unset
        becomes 0.5 (0 for ``none``, whose only ratio is 0: no compression has one encoding)."""
        from fcot.compress import COMPRESSORS

        supported = COMPRESSORS[self.compressor].ratios
        if self.ratio is None:
            self.ratio = 0.5 if supported is None or 0.5 in supported else float(supported[0])
        if not 0 <= self.ratio < 1:
            self._fail("ratio", "expected the fraction of visual tokens removed, in [0, 1) (0.5 or 0.75)")
        if supported is not None and self.ratio not in supported:
            if self.compressor == "none":
                self._fail("ratio", "compressor 'none' keeps every token (ratio 0): unset common.ratio or choose a "
                                    "compressor")
            self._fail("ratio", f"compressor {self.compressor!r} supports ratios {list(supported)}")

    @property
    def tokens_per_tile(self) -> int:
        """Visual tokens per 448px tile after compression: ``256 - round(256 * ratio)`` (fcot.compress.target_count)."""
        return max(1, 256 - round(256 * self.ratio))


@dataclass
class DataConfig(_Section):
    """The training data (InternVL conversation JSONL, see ``fcot.data.records``)."""

    SECTION = "data"
    jsonl: list[str] = option(default_factory=list, help=(
        "JSONL file(s) of conversation records, read in order."))
    image_root: str | None = option(None, help=(
        "Folder that relative image paths are resolved against; unset: each JSONL file's folder."))
    family: str = option("auto", help=(
        "Model family whose tiling the data uses: auto (the model's own) or a registered family's "
        "model_type (fcot.models: internvl, internvl_chat, ...)."))
    max_tiles: int = option(12, help=(
        "Most 448px tiles per image, thumbnail excluded (InternVL trains with 12)."))
    max_length: int | None = option(None, help=(
        "Records longer than this many tokens are skipped and counted; unset keeps all."))
    template: str = option("chatml", help=(
        "Chat format: chatml (InternVL2-1B/2B/8B/26B, 2.5, 3) or phi3 (InternVL2-4B)."))
    system_message: str | None = option(None, help=(
        "System message for records without a system turn; unset: none."))
    num_workers: int = option(0, help=(
        "DataLoader worker processes (also TrainingArguments.dataloader_num_workers)."))

    def validate(self) -> None:
        if not self.jsonl:
            self._fail("jsonl", "expected at least one JSONL file (fcot data synth writes one)")
        for path in self.jsonl:
            if not Path(path).is_file():
                raise ConfigError(f"data.jsonl: {path!r} does not exist")
        if self.image_root is not None and not Path(self.image_root).is_dir():
            self._fail("image_root", "no such folder")
        families = family_names()
        if self.family not in families:
            self._fail("family", f"expected one of {families}")
        if not 1 <= self.max_tiles <= 40:
            self._fail("max_tiles", "expected 1 to 40 (InternVL: 12 in training, up to 40 at test time)")
        if self.max_length is not None and self.max_length < 1:
            self._fail("max_length", "expected a positive token count or unset")
        if self.template not in TEMPLATES:
            self._fail("template", f"expected one of {list(TEMPLATES)}")
        if self.num_workers < 0:
            self._fail("num_workers", "expected 0 or more")


@dataclass
class DistillConfig(_Section):
    """Stage 1, re-alignment by self-distillation: the loss."""

    SECTION = "distill"
    temperature: float = option(1.0, help=(
        "Softmax temperature T of teacher and student logits; the divergence is scaled by T**2."))
    kl_weight: float = option(1.0, help=(
        "Weight of the teacher-student divergence on the answer tokens."))
    ce_weight: float = option(0.0, help=(
        "Weight of the student's cross-entropy on the answer labels (temperature 1)."))
    divergence: str = option("forward_kl", help=(
        "forward_kl (KL(teacher || student), the paper's), reverse_kl or jsd."))
    beta: float = option(0.5, help=(
        "JSD mixture weight of the teacher, in (0, 1); only used with divergence jsd."))
    gradient_checkpointing: bool = option(False, help=(
        "Recompute the student's LLM activations in backward to save memory."))

    def validate(self) -> None:
        if self.temperature <= 0:
            self._fail("temperature", "expected > 0")
        for name in ("kl_weight", "ce_weight"):
            if getattr(self, name) < 0:
                self._fail(name, "expected >= 0")
        if self.kl_weight == 0 and self.ce_weight == 0:
            self._fail("kl_weight", "kl_weight and ce_weight are both 0, so there is no loss: set one > 0")
        if self.divergence not in DIVERGENCES:
            self._fail("divergence", f"expected one of {list(DIVERGENCES)}")
        if not 0 < self.beta < 1:
            self._fail("beta", "expected a weight in (0, 1) (JSD is 0 at both ends)")
        if self.divergence != "jsd" and self.beta != 0.5:
            warnings.warn(f"distill.beta={self.beta} has no effect with distill.divergence={self.divergence!r} "
                          "(only jsd uses it)", stacklevel=4)


@dataclass
class PosttrainConfig(_Section):
    """Stage 2, post-training: which weights learn."""

    SECTION = "posttrain"
    lora: bool = option(False, help=(
        "Train the LLM through LoRA adapters (peft) instead of all its weights; saved merged into the "
        "weights."))
    lora_r: int = option(16, help=(
        "LoRA rank."))
    lora_alpha: int = option(32, help=(
        "LoRA scaling numerator (scale = lora_alpha / lora_r)."))
    lora_dropout: float = option(0.05, help=(
        "Dropout on the LoRA branch."))
    lora_target_modules: list[str] = option(default_factory=lambda: ["all-linear"], help=(
        "LLM modules that get adapters (peft names; all-linear: every Linear but the LM head)."))
    train_vision: bool = option(False, help=(
        "Also train the ViT (FCoT-VL keeps it frozen)."))
    gradient_checkpointing: bool = option(False, help=(
        "Recompute the LLM's activations in backward to save memory."))

    def validate(self) -> None:
        if self.lora_r < 1:
            self._fail("lora_r", "expected a rank >= 1")
        if self.lora_alpha < 1:
            self._fail("lora_alpha", "expected >= 1")
        if not 0 <= self.lora_dropout < 1:
            self._fail("lora_dropout", "expected a probability in [0, 1)")
        if not self.lora_target_modules:
            self._fail("lora_target_modules", "expected at least one module name (or all-linear)")
        if not self.lora:
            defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                        for f in dataclasses.fields(self) if f.name.startswith("lora_")}
            changed = sorted(k for k, v in defaults.items() if getattr(self, k) != v)
            if changed:
                warnings.warn(f"posttrain.{', posttrain.'.join(changed)} have no effect with posttrain.lora=false",
                              stacklevel=4)


# TrainingArguments fields that fcot sets from `common`, so they have one source.
_FROM_COMMON = {"output_dir": "common.output_dir", "seed": "common.seed", "overwrite_output_dir": "common.overwrite",
                "dataloader_num_workers": "data.num_workers"}


_NO_EVAL = "fcot's trainers have no evaluation set; score a saved model with `fcot eval`"
TRAINING_REFUSED: dict[str, str] = {
    "gradient_checkpointing": "set distill.gradient_checkpointing or posttrain.gradient_checkpointing instead "
                              "(fcot checkpoints the LLM of its own training module)",
    "gradient_checkpointing_kwargs": "set distill.gradient_checkpointing or posttrain.gradient_checkpointing instead "
                                     "(fcot checkpoints without re-entrant autograd)",
    "label_smoothing_factor": "fcot's losses (distill.*, the SFT cross-entropy) have no label smoothing; remove it",
    "remove_unused_columns": "fcot keeps its collated columns (it must be false); remove it",
    "load_best_model_at_end": _NO_EVAL,
    "metric_for_best_model": _NO_EVAL,
    "greater_is_better": _NO_EVAL,
    "do_eval": _NO_EVAL,
    "eval_strategy": _NO_EVAL,
    "eval_steps": _NO_EVAL,
    "eval_on_start": _NO_EVAL,
    "per_device_eval_batch_size": _NO_EVAL,
    "prediction_loss_only": _NO_EVAL,
    "label_names": "fcot's training modules read their own label columns; remove it",
    "do_train": "Trainer itself ignores it (scripts read it); remove it",
    "do_predict": "Trainer itself ignores it (scripts read it); remove it",
    "resume_from_checkpoint": "Trainer itself ignores it; resume with `fcot distill/posttrain --resume`",
    "use_liger_kernel": "it patches Hugging Face LLM classes, not fcot's training module; fcot's fused loss is "
                        "common.fused",
    "neftune_noise_alpha": "fcot's training module has no NEFTune embedding hook; remove it",
    "save_safetensors": "fcot checkpoints are always safetensors (load_compressed reads them); remove it",
}
"""``training`` options that fcot's trainers would ignore or fail on after the run started:
refused when the config is built, with what to use instead."""


def _check_training(training: dict[str, Any]) -> dict[str, Any]:
    """Check the ``training`` keys against ``TrainingArguments`` and :data:`TRAINING_REFUSED`; read
    ``--set`` text as each option's declared type and numeric strings of float options."""
    if not isinstance(training, dict):
        raise ConfigError(f"training={training!r}: expected a mapping of TrainingArguments options")
    from transformers import TrainingArguments

    fields = {f.name: f for f in dataclasses.fields(TrainingArguments)}
    out = {}
    for key, value in training.items():
        if key in _FROM_COMMON:
            raise ConfigError(f"training.{key}: set {_FROM_COMMON[key]} instead (fcot passes it to TrainingArguments)")
        if isinstance(value, CliText) and key in fields:
            value = read_cli_values("training", TrainingArguments, {key: str(value)})[key]
        if key in TRAINING_REFUSED:  # before the field check: some are gone from newer transformers
            shown = str(value) if isinstance(value, CliText) else value
            raise ConfigError(f"training.{key}={shown!r}: not supported by fcot's trainers: {TRAINING_REFUSED[key]}")
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=3)
            raise ConfigError(f"training.{key}: not a transformers TrainingArguments option"
                              + (f" (did you mean {close}?)" if close else ""))
        if isinstance(value, str) and isinstance(fields[key].default, float) and not isinstance(fields[key].default, bool):
            try:  # PyYAML reads 1e-4 (no dot) as a string
                value = float(value)
            except ValueError:
                raise ConfigError(f"training.{key}={value!r}: expected a number") from None
        out[key] = value
    return out


@dataclass
class RunConfig:
    """A whole run: ``common``, ``data``, the stage's section and ``training`` (TrainingArguments)."""

    stage: str
    common: CommonConfig
    data: DataConfig
    distill: DistillConfig | None = None
    posttrain: PosttrainConfig | None = None
    training: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ConfigError(f"stage={self.stage!r}: expected one of {list(STAGES)}")
        if getattr(self, self.stage) is None:
            setattr(self, self.stage, STAGES[self.stage]())
        other = "posttrain" if self.stage == "distill" else "distill"
        if getattr(self, other) is not None:
            raise ConfigError(f"section {other!r} given to `fcot {self.stage}`: remove it or run `fcot {other}`")
        self.training = _check_training(self.training)

    def to_dict(self) -> dict[str, Any]:
        out = {"common": dataclasses.asdict(self.common), "data": dataclasses.asdict(self.data),
               self.stage: dataclasses.asdict(getattr(self, self.stage)), "training": dict(self.training)}
        return out

    def training_arguments(self, **extra):
        """``transformers.TrainingArguments`` from ``training`` plus the options fcot owns."""
        from transformers import TrainingArguments

        return TrainingArguments(output_dir=self.common.output_dir, seed=self.common.seed,
                                 dataloader_num_workers=self.data.num_workers, **self.training, **extra)


STAGES: dict[str, type[_Section]] = {"distill": DistillConfig, "posttrain": PosttrainConfig}
_SECTIONS: dict[str, type[_Section]] = {"common": CommonConfig, "data": DataConfig, **STAGES}


def _section(name: str, cls: type[_Section], values: Any) -> _Section:
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"section {name!r}: expected a mapping of options, got {type(values).__name__}")
    known = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=3)
            raise ConfigError(f"{name}.{key}: unknown option" + (f" (did you mean {close}?)" if close else "")
                              + f"; {name} options are {known}")
    texts = {k: str(v) for k, v in values.items() if isinstance(v, CliText)}
    return cls(**{**values, **read_cli_values(name, cls, texts)})


def build_config(stage: str, raw: dict[str, Any]) -> RunConfig:
    """Build and check a :class:`RunConfig` from a mapping of sections (what the YAML holds)."""
    if stage not in STAGES:
        raise ConfigError(f"stage={stage!r}: expected one of {list(STAGES)}")
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping of sections, got {type(raw).__name__}")
    allowed = ["common", "data", stage, "training"]
    for key in raw:
        if key not in allowed:
            hint = f": `fcot {key}` reads it, not `fcot {stage}`" if key in STAGES else ""
            raise ConfigError(f"config section {key!r} is unknown{hint}; sections are {allowed}")
    sections = {name: _section(name, _SECTIONS[name], raw.get(name)) for name in ("common", "data", stage)}
    return RunConfig(stage=stage, training=dict(raw.get("training") or {}), **sections)


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one ``section.key=value`` to the raw mapping, in place. The value stays text
    (:class:`CliText`) until the option's declared type reads it."""
    key, sep, text = assignment.partition("=")
    section, dot, name = key.strip().partition(".")
    if not sep or not dot or not section or not name:
        raise ConfigError(f"--set {assignment!r}: expected section.key=value, e.g. --set data.max_tiles=6")
    value = CliText(text.strip())
    target = raw.setdefault(section, {})
    if not isinstance(target, dict):
        raise ConfigError(f"--set {assignment!r}: section {section!r} is not a mapping in the config file")
    target[name] = value


def load_config(stage: str, path: str | os.PathLike | None = None, overrides: typing.Sequence[str] = (),
                flags: dict[str, Any] | None = None) -> RunConfig:
    """Read a YAML config (optional), apply ``--set`` overrides, then per-option flags, and check it all.

    ``flags`` maps ``section.key`` to a value (None: not given on the command line).
    """
    import yaml

    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"--config {str(p)!r}: no such file")
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"--config {str(p)!r}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"--config {str(p)!r}: expected a mapping of sections at the top level")
    for assignment in overrides:
        apply_override(raw, assignment)
    for key, value in (flags or {}).items():
        if value is not None:
            section, _, name = key.partition(".")
            raw.setdefault(section, {})[name] = value
    return build_config(stage, raw)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags every training subcommand has: --config, --set, and the common per-option flags."""
    parser.add_argument("--config", help="YAML config file (sections common, data, <stage>, training)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one option, the value read as the option's type (repeatable), e.g. "
                             "--set data.max_tiles=6 --set training.save_strategy=no")
    docs = field_docs(CommonConfig)
    parser.add_argument("--model", help=docs["model"])
    parser.add_argument("--compressor", choices=compressor_names(), help=docs["compressor"])
    parser.add_argument("--ratio", type=float, help=docs["ratio"])
    parser.add_argument("--fused", action=argparse.BooleanOptionalAction, default=None, help=docs["fused"])
    parser.add_argument("--backend", choices=backend_names(), help=docs["backend"])
    parser.add_argument("--output-dir", help=docs["output_dir"])
    parser.add_argument("--overwrite", action="store_true", default=None, help=docs["overwrite"])
    parser.add_argument("--seed", type=int, help=docs["seed"])


def config_from_args(stage: str, args: argparse.Namespace) -> RunConfig:
    """The run config of a subcommand: its --config file, then --set, then the per-option flags."""
    flags = {f"common.{name}": getattr(args, name) for name in
             ("model", "compressor", "ratio", "fused", "backend", "output_dir", "overwrite", "seed")}
    return load_config(stage, args.config, args.set, flags)


CONFIG_FILE = "fcot_config.yaml"


def save_config(cfg: RunConfig, folder: str | os.PathLike) -> Path:
    """Write the run's config (``stage`` + sections) to ``folder/fcot_config.yaml``, atomically."""
    import yaml

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path, tmp = folder / CONFIG_FILE, folder / f".{CONFIG_FILE}.tmp-{os.getpid()}"
    tmp.write_text(yaml.safe_dump({"stage": cfg.stage, **cfg.to_dict()}, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)
    return path


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_output_dir(cfg: RunConfig, *, resume: bool = False) -> None:
    """Refuse an ``output_dir`` that already holds a run, unless ``common.overwrite`` or a resume of that same run.

    Resuming needs the folder's saved config to equal this one (``common.overwrite`` aside);
    the error lists the options that differ.
    """
    import yaml

    out = Path(cfg.common.output_dir)
    if not out.exists() or not any(out.iterdir()):
        return
    if cfg.common.overwrite:
        if resume:
            raise ConfigError("common.overwrite=True with resume: overwrite starts over, resume continues; choose one")
        return
    if not resume:
        raise ConfigError(f"common.output_dir={str(out)!r} already holds a run: pass --overwrite to replace it, "
                          "resume it, or choose another output_dir")
    saved_path = out / CONFIG_FILE
    if not saved_path.is_file():
        raise ConfigError(f"common.output_dir={str(out)!r} holds files but no {CONFIG_FILE}: it is not an fcot run "
                          "to resume; choose another output_dir or pass --overwrite")
    saved = yaml.safe_load(saved_path.read_text(encoding="utf-8")) or {}
    now = {"stage": cfg.stage, **cfg.to_dict()}
    a, b = _flatten(saved), _flatten(now)
    differ = sorted(k for k in set(a) | set(b) if k != "common.overwrite" and a.get(k) != b.get(k))
    if differ:
        details = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in differ[:5])
        raise ConfigError(f"cannot resume the run in {str(out)!r}: its config differs in {details}"
                          + (f" (and {len(differ) - 5} more)" if len(differ) > 5 else ""))
