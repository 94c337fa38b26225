"""fcot.train.config: dataclasses, YAML + overrides, and errors that name the option to change."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import yaml

from fcot.train.config import (CommonConfig, ConfigError, DataConfig, DistillConfig, PosttrainConfig, add_config_arguments,
                               build_config, check_output_dir, config_from_args, field_docs, load_config, save_config)

pytest.importorskip("transformers")


@pytest.fixture
def files(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"conversations": []}\n')
    (tmp_path / "model").mkdir()
    return tmp_path


def _raw(files, **sections):
    raw = {"common": {"model": str(files / "model"), "output_dir": str(files / "run")},
           "data": {"jsonl": str(files / "d.jsonl")}}
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return raw


def test_every_field_has_a_docstring():
    for cls in (CommonConfig, DataConfig, DistillConfig, PosttrainConfig):
        docs = field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not missing, f"{cls.__name__} fields without a docstring: {missing}"


def test_yaml_then_set_then_flags(files):
    path = files / "run.yaml"
    path.write_text(yaml.safe_dump(_raw(files, distill={"temperature": 2, "divergence": "jsd"},
                                        training={"learning_rate": "1e-4", "max_steps": 5})))
    cfg = load_config("distill", path, ["data.max_tiles=4", "distill.kl_weight=0.5", "common.ratio=0.25"],
                      {"common.ratio": 0.75, "common.fused": False, "common.seed": None})
    assert cfg.data.max_tiles == 4 and cfg.data.jsonl == [str(files / "d.jsonl")]
    assert cfg.distill.temperature == 2.0 and isinstance(cfg.distill.temperature, float)
    assert cfg.distill.divergence == "jsd" and cfg.distill.kl_weight == 0.5
    assert cfg.common.ratio == 0.75 and cfg.common.tokens_per_tile == 64 and cfg.common.fused is False
    assert cfg.common.seed == 0 and cfg.posttrain is None
    args = cfg.training_arguments(report_to=[])
    assert args.output_dir == str(files / "run") and args.learning_rate == 1e-4 and args.max_steps == 5


def test_cli_flags(files):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    args = parser.parse_args(["--model", str(files / "model"), "--no-fused", "--compressor", "tome", "--ratio", "0.5",
                              "--set", f"data.jsonl={files / 'd.jsonl'}", "--set", "posttrain.lora=true",
                              "--output-dir", str(files / "out"), "--overwrite", "--backend", "reference"])
    cfg = config_from_args("posttrain", args)
    assert (cfg.common.compressor, cfg.common.fused, cfg.common.backend, cfg.common.overwrite) == ("tome", False, "reference", True)
    assert cfg.posttrain.lora is True and cfg.common.tokens_per_tile == 128


@pytest.mark.parametrize("section, values, match", [
    ("common", {"compressor": "pool"}, r"common.compressor='pool': expected one of \['avg', 'conv'"),
    ("common", {"ratio": 1.0}, r"common.ratio=1.0: expected the fraction of visual tokens removed"),
    ("common", {"compressor": "none", "ratio": 0.5}, r"common.ratio=0.5: compressor 'none' keeps every token"),
    ("common", {"compressor": "conv", "ratio": 0.3}, r"common.ratio=0.3: compressor 'conv' supports ratios \[0.5, 0.75\]"),
    ("common", {"backend": "metal"}, r"common.backend='metal'"),
    ("common", {"fused": "yes"}, r"common.fused='yes': expected true or false"),
    ("common", {"seed": 1.5}, r"common.seed=1.5: expected an integer"),
    ("common", {"model": "./no/such/model"}, r"common.model='./no/such/model': no such folder"),
    ("common", {"model": ""}, r"common.model='': set the base model"),
    ("data", {"jsonl": "missing.jsonl"}, r"data.jsonl: 'missing.jsonl' does not exist"),
    ("data", {"jsonl": []}, r"data.jsonl=\[\]: expected at least one JSONL file"),
    ("data", {"image_root": "/no/such/dir"}, r"data.image_root='/no/such/dir': no such folder"),
    ("data", {"max_tiles": 0}, r"data.max_tiles=0: expected 1 to 40"),
    ("data", {"template": "llama3"}, r"data.template='llama3'"),
    ("data", {"max_tile": 3}, r"data.max_tile: unknown option \(did you mean \['max_tiles'"),
    ("distill", {"temperature": 0}, r"distill.temperature=0.0: expected > 0"),
    ("distill", {"kl_weight": 0, "ce_weight": 0}, r"distill.kl_weight=0.0: .*no loss"),
    ("distill", {"divergence": "kl"}, r"distill.divergence='kl': expected one of \['forward_kl'"),
    ("distill", {"beta": 1.0}, r"distill.beta=1.0: expected a weight in \(0, 1\)"),
    ("distill", {"temperature": "warm"}, r"distill.temperature='warm': expected a number"),
    ("training", {"learning_rat": 1e-4}, r"training.learning_rat: not a transformers TrainingArguments option \(did you mean \['learning_rate'"),
    ("training", {"output_dir": "x"}, r"training.output_dir: set common.output_dir instead"),
])
def test_bad_values_name_the_option(files, section, values, match):
    raw = _raw(files)
    if section == "common" and "model" in values:
        raw["common"]["model"] = values["model"]
    else:
        raw.setdefault(section, {}).update(values)
    with pytest.raises(ConfigError, match=match):
        build_config("distill", raw)


def test_bad_structure(files):
    with pytest.raises(ConfigError, match=r"config section 'posttrain' is unknown: `fcot posttrain` reads it"):
        build_config("distill", _raw(files, posttrain={"lora": True}))
    with pytest.raises(ConfigError, match=r"config section 'optim' is unknown"):
        build_config("distill", {**_raw(files), "optim": {}})
    with pytest.raises(ConfigError, match=r"--set 'max_tiles=3': expected section.key=value"):
        load_config("distill", None, ["max_tiles=3"])
    with pytest.raises(ConfigError, match=r"--config '.*nope.yaml': no such file"):
        load_config("distill", files / "nope.yaml")
    (files / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        load_config("distill", files / "list.yaml")
    with pytest.raises(ConfigError, match=r"posttrain.lora_r=0: expected a rank >= 1"):
        build_config("posttrain", _raw(files, posttrain={"lora_r": 0}))


def test_output_dir_policy(files):
    cfg = build_config("distill", _raw(files))
    check_output_dir(cfg)  # absent: fine
    save_config(cfg, cfg.common.output_dir)
    with pytest.raises(ConfigError, match=r"already holds a run: pass --overwrite"):
        check_output_dir(cfg)
    check_output_dir(cfg, resume=True)  # same config: resumable
    changed = build_config("distill", _raw(files, distill={"temperature": 3.0}))
    with pytest.raises(ConfigError, match=r"cannot resume .*distill.temperature: 1.0 -> 3.0"):
        check_output_dir(changed, resume=True)
    overwrite = build_config("distill", _raw(files, common={"overwrite": True}))
    check_output_dir(overwrite)
    with pytest.raises(ConfigError, match="choose one"):
        check_output_dir(overwrite, resume=True)
    foreign = build_config("distill", _raw(files, common={"output_dir": str(files)}))
    with pytest.raises(ConfigError, match="no fcot_config.yaml: it is not an fcot run"):
        check_output_dir(foreign, resume=True)


def test_set_reads_the_declared_type_not_yaml(files):
    """--set text goes through the option's type: 'no' stays the string for save_strategy (YAML
    would read False), 1e-4 is a float, booleans and lists parse, bad text names the option."""
    base = [f"common.model={files / 'model'}", f"common.output_dir={files / 'run'}", f"data.jsonl={files / 'd.jsonl'}"]
    cfg = load_config("distill", None, [*base, "training.save_strategy=no",
                                        "training.learning_rate=1e-4", "training.bf16=false", "common.fused=no",
                                        "training.max_steps=3", "common.backend=null", "distill.temperature=2"])
    assert cfg.training["save_strategy"] == "no" and cfg.training["learning_rate"] == 1e-4
    assert cfg.training["bf16"] is False and cfg.training["max_steps"] == 3
    assert cfg.common.fused is False and cfg.common.backend is None and cfg.distill.temperature == 2.0
    assert cfg.data.jsonl == [str(files / "d.jsonl")]
    args = cfg.training_arguments(report_to=[])
    assert str(args.save_strategy.value) == "no"
    with pytest.raises(ConfigError, match=r"training.max_steps='three': expected an integer"):
        load_config("distill", None, [*base, "training.max_steps=three"])
    with pytest.raises(ConfigError, match=r"common.seed='x': expected an integer"):
        load_config("distill", None, [*base, "common.seed=x"])


@pytest.mark.parametrize("key, value, match", [
    ("gradient_checkpointing", True, r"training.gradient_checkpointing=True: .*set distill.gradient_checkpointing"),
    ("label_smoothing_factor", 0.1, r"training.label_smoothing_factor=0.1: .*no label smoothing"),
    ("load_best_model_at_end", True, r"training.load_best_model_at_end=True: .*fcot eval"),
    ("eval_strategy", "steps", r"training.eval_strategy='steps': .*no evaluation set"),
    ("remove_unused_columns", True, r"training.remove_unused_columns=True: .*must be false"),
    ("save_safetensors", False, r"training.save_safetensors=False: .*always safetensors"),
])
def test_training_options_fcot_would_ignore_are_refused_up_front(files, key, value, match):
    """Refused when the config is built: before a model loads or a file is written."""
    with pytest.raises(ConfigError, match=match):
        build_config("distill", _raw(files, training={key: value}))


def test_ratio_has_one_encoding_of_no_compression(files):
    none = build_config("distill", _raw(files, common={"compressor": "none"}))
    assert none.common.ratio == 0.0 and none.common.tokens_per_tile == 256
    assert build_config("distill", _raw(files, common={"compressor": "none", "ratio": 0})).common.ratio == 0.0
    assert build_config("distill", _raw(files)).common.ratio == 0.5


def test_compressor_names_come_from_the_registry(files):
    """A compressor registered after fcot was imported is accepted by the config and the CLI."""
    from fcot.compress import COMPRESSORS, Compressor, register_compressor

    try:
        @register_compressor("test-cfg-registry")
        class _Mine(Compressor):
            ratios = (0.75,)

        cfg = build_config("distill", _raw(files, common={"compressor": "test-cfg-registry"}))
        assert cfg.common.ratio == 0.75  # unset: the compressor's own ratio when it lacks 0.5
        parser = argparse.ArgumentParser()
        add_config_arguments(parser)
        assert parser.parse_args(["--compressor", "test-cfg-registry"]).compressor == "test-cfg-registry"
    finally:
        COMPRESSORS.pop("test-cfg-registry", None)
