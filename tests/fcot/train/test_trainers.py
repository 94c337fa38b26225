"""fcot distill / fcot posttrain on the tiny InternVL (both families): loss goes down, stage 1
touches only V_c and A_s, resume reproduces the loss sequence, fused == reference, bad input
fails before training, the saved model loads with fcot.load_compressed, torchrun (2 ranks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

import fcot  # noqa: E402
from fcot.train.config import ConfigError, build_config  # noqa: E402
from fcot.train.distill import build_distill_trainer, distill_loss, run_distill  # noqa: E402
from fcot.train.engine import read_metrics  # noqa: E402
from fcot.train.posttrain import run_posttrain  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]


def _cfg(stage, data, out, *, training=None, section=None, **common):
    training = {"max_steps": 4, "per_device_train_batch_size": 2, "learning_rate": 5e-3, "use_cpu": True,
                "disable_tqdm": True, "save_strategy": "no", "lr_scheduler_type": "constant", **(training or {})}
    return build_config(stage, {"common": {"model": "tiny", "output_dir": str(out), **common},
                                "data": {"jsonl": [data], "max_tiles": 1}, stage: section or {}, "training": training})


def _losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_distill_lowers_the_loss_and_trains_only_vc_and_as(data, tmp_path):
    cfg = _cfg("distill", data, tmp_path / "run", training={"max_steps": 6, "per_device_train_batch_size": 4})
    trainer = build_distill_trainer(cfg)
    module = trainer.model
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    trainer.train()
    losses = _losses(trainer)
    # apply_fcot starts the student next to the teacher (a small first loss); Adam's first step
    # moves every trainable weight by about the learning rate whatever its gradient, which lifts
    # the loss off that start. From there distillation must bring it down, step after step.
    assert len(losses) == 6 and losses[-1] < losses[1] * 0.8, losses
    assert all(b < a for a, b in zip(losses[1:], losses[2:])), losses
    changed = {n for n, p in module.model.named_parameters() if not torch.equal(p, before[n])}
    proj = module.parts.projector_attr
    assert changed and all(f"{proj}." in n for n in changed), changed
    assert any(".compressor." in n for n in changed) and any("linear_1" in n for n in changed)
    # ViT and LLM (and the teacher projector) bit-identical
    for n, p in module.model.named_parameters():
        if f"{proj}." not in n:
            assert torch.equal(p, before[n]), n
    assert not any(p.requires_grad for p in module.teacher_projector.parameters())


def test_posttrain_lowers_the_loss_and_loads_with_load_compressed(data, tmp_path):
    cfg = _cfg("posttrain", data, tmp_path / "pt", training={"max_steps": 5, "per_device_train_batch_size": 4})
    trainer = run_posttrain(cfg)
    losses = _losses(trainer)
    assert losses[-1] < losses[0], losses
    vit = trainer.model.parts.vision
    assert not any(p.requires_grad for p in vit.parameters())
    loaded = fcot.load_compressed(tmp_path / "pt")
    for (n, a), (_, b) in zip(trainer.model.model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n
    assert read_metrics(tmp_path / "pt")[0]["step"] == 1
    summary = json.loads((tmp_path / "pt" / "data_summary.json").read_text())
    assert summary["usable"] == 4 and trainer.fcot_data_summary == summary


def test_resume_reproduces_the_loss_sequence(data, tmp_path):
    training = {"max_steps": 4, "save_strategy": "steps", "save_steps": 2, "per_device_train_batch_size": 2}
    full = run_distill(_cfg("distill", data, tmp_path / "full", training=training))
    ref = _losses(full)
    # "Kill" after step 2: a run that stops at 2 steps with the same schedule (max_steps stays 4).

    class Stop(__import__("transformers").TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 2:
                control.should_training_stop = True

    cfg = _cfg("distill", data, tmp_path / "part", training=training)
    from fcot.train.engine import start_run

    start_run(cfg)
    part = build_distill_trainer(cfg, callbacks=[Stop()])
    part.train()
    assert os.path.isdir(tmp_path / "part" / "checkpoint-2") and not os.path.exists(tmp_path / "part" / ".staging")
    # a half-written staging folder from the kill is ignored
    (tmp_path / "part" / ".staging" / "checkpoint-3").mkdir(parents=True)
    resumed = run_distill(cfg, resume=True)
    steps = [(m["step"], m["loss"]) for m in read_metrics(tmp_path / "part") if "loss" in m]
    assert [s for s, _ in steps] == [1, 2, 3, 4]
    torch.testing.assert_close(torch.tensor([l for _, l in steps]), torch.tensor(ref), rtol=1e-5, atol=1e-7)
    assert resumed.state.global_step == 4


def test_fused_and_reference_losses_agree(data, tmp_path):
    """backend='triton' (the interpreter on a CPU; 'auto' would pick the reference there) against fused=False."""
    from fcot.train.posttrain import build_posttrain_trainer, sft_loss

    section = {"ce_weight": 0.5, "temperature": 2.0}
    cfgs = [_cfg("distill", data, tmp_path / "r1", backend="triton", section=section),
            _cfg("distill", data, tmp_path / "r0", fused=False, section=section)]
    trainers = [build_distill_trainer(c) for c in cfgs]
    batch = trainers[0].data_collator([trainers[0].train_dataset[i] for i in range(2)])
    losses, grads = [], []
    for tr, c in zip(trainers, cfgs):
        out = tr.model(**batch)
        loss = distill_loss(out, tr.model.parts.head, c)
        loss.backward()
        losses.append(loss.detach())
        grads.append(tr.model.parts.student_projector.linear_1.weight.grad.clone())
    assert losses[0] > 0 and grads[0].abs().max() > 0
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-3, atol=1e-6)
    # stage 2: fused CE (fused_linear_distill with kl_weight=0) == PyTorch's cross_entropy
    pcfgs = [_cfg("posttrain", data, tmp_path / "p1", backend="triton"), _cfg("posttrain", data, tmp_path / "p0", fused=False)]
    ptrainers = [build_posttrain_trainer(c) for c in pcfgs]
    pbatch = ptrainers[0].data_collator([ptrainers[0].train_dataset[i] for i in range(2)])
    sft, head_grads = [], []
    for tr, c in zip(ptrainers, pcfgs):
        loss = sft_loss(tr.model(**pbatch), tr.model.parts.head, c)
        loss.backward()
        sft.append(loss.detach())
        head_grads.append(tr.model.parts.head.weight.grad.clone())
    assert sft[0] > 1.0
    torch.testing.assert_close(sft[0], sft[1], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(head_grads[0], head_grads[1], rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd"])
def test_divergence_options_train(data, tmp_path, divergence):
    trainer = build_distill_trainer(_cfg("distill", data, tmp_path / "d", training={"max_steps": 2},
                                         section={"divergence": divergence}))
    trainer.train()
    assert all(l > 0 for l in _losses(trainer))


def test_remote_code_family_trains_one_distill_step(data, tmp_path):
    from fcot.models.tiny import tiny_image_processor, tiny_tokenizer
    from tests.fcot.tiny_internvl_chat import TinyInternVLChatConfig, tiny_chat_model

    tok = tiny_tokenizer()
    config = TinyInternVLChatConfig(
        vision_config=dict(image_size=64, patch_size=8),
        llm_config=dict(hidden_size=128, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                        num_key_value_heads=1, vocab_size=len(tok), max_position_embeddings=4096, tie_word_embeddings=False),
        architectures=["TinyInternVLChatModel"])
    model = tiny_chat_model(config)
    trainer = build_distill_trainer(_cfg("distill", data, tmp_path / "chat", training={"max_steps": 1}), model=model,
                                    tokenizer=tok, image_processor=tiny_image_processor())
    before = model.vision_model.embeddings.patch_embedding.weight.clone()
    merge_before = model.mlp1.compressor.merge_weight.detach().clone()
    trainer.train()
    assert trainer.state.global_step == 1 and _losses(trainer)[0] > 0
    assert torch.equal(before, model.vision_model.embeddings.patch_embedding.weight)
    assert trainer.model.parts.projector_attr == "mlp1" and not torch.equal(merge_before, model.mlp1.compressor.merge_weight)


def test_bad_input_fails_before_training(data, tmp_path):
    with pytest.raises(ConfigError, match="data.jsonl"):
        _cfg("distill", str(tmp_path / "missing.jsonl"), tmp_path / "o")
    with pytest.raises(ConfigError, match="common.compressor"):
        _cfg("distill", data, tmp_path / "o", compressor="bogus")
    with pytest.raises(ConfigError, match="common.ratio"):  # conv cannot take 0.3
        build_distill_trainer(_cfg("distill", data, tmp_path / "o", ratio=0.3))
    out = tmp_path / "other"
    out.mkdir()
    (out / "weights.bin").write_text("someone else's run")
    with pytest.raises(ConfigError, match="already holds a run"):
        run_distill(_cfg("distill", data, out))
    with pytest.raises(ConfigError, match="not an fcot run"):
        run_distill(_cfg("distill", data, out), resume=True)
    assert (out / "weights.bin").read_text() == "someone else's run"
    # a data set without a usable record fails before anything is written
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "nope.png", "conversations": [{"from": "human", "value": "<image>\\nQ"}, '
                   '{"from": "gpt", "value": "A"}]}\n')
    from fcot.data.records import NoUsableRecordsError

    with pytest.raises(NoUsableRecordsError, match="missing_image"):
        run_distill(_cfg("distill", str(bad), tmp_path / "never"))
    assert not (tmp_path / "never").exists()


def test_cli_distill_merge_posttrain(data, tmp_path, capsys):
    from fcot.cli import main

    runs = []
    for seed in (0, 1):
        out = tmp_path / f"s{seed}"
        assert main(["distill", "--model", "tiny", "--output-dir", str(out), "--seed", str(seed), "--compressor", "avg",
                     "--no-fused", "--set", f"data.jsonl={data}", "--set", "data.max_tiles=1",
                     *[f"--set=training.{kv}" for kv in ("max_steps=1", "use_cpu=true", "disable_tqdm=true",
                                                         "per_device_train_batch_size=2")]]) == 0
        runs.append(str(out))
    assert json.loads((tmp_path / "s0" / "config.json").read_text())["fcot"]["compressor"] == "avg"
    assert main(["merge", str(tmp_path / "m"), *runs]) == 0
    merged = fcot.load_compressed(tmp_path / "m")
    assert fcot.is_patched(merged)
    common = ["--set", f"data.jsonl={data}", "--set", "data.max_tiles=1",
              *[f"--set=training.{kv}" for kv in ("max_steps=1", "use_cpu=true", "disable_tqdm=true")]]
    # stage 2 from the merged stage-1 model (a folder: load_compressed, its tokenizer and image processor)
    assert main(["posttrain", "--model", str(tmp_path / "m"), "--compressor", "avg", "--no-fused",
                 "--output-dir", str(tmp_path / "p"), *common]) == 0
    assert fcot.is_patched(fcot.load_compressed(tmp_path / "p"))
    # a compressed folder with other options than asked, and distill from a compressed model: exit 2, one line
    for argv, msg in ((["posttrain", "--model", str(tmp_path / "m"), "--compressor", "conv"], "compressed with"),
                      (["distill", "--model", str(tmp_path / "m"), "--compressor", "avg"], "already compressed"),
                      (["distill", "--model", "tiny", "--ratio", "0.3"], "common.ratio"),
                      # accepted and then fatal (or ignored) once: now refused before anything is written
                      (["distill", "--model", "tiny", "--set", "training.gradient_checkpointing=true"],
                       "distill.gradient_checkpointing"),
                      (["posttrain", "--model", "tiny", "--set", "training.label_smoothing_factor=0.1"],
                       "training.label_smoothing_factor")):
        with pytest.raises(SystemExit) as exc:
            main([*argv, "--output-dir", str(tmp_path / "bad"), *common])
        assert exc.value.code == 2
        assert not (tmp_path / "bad").exists()
    err = capsys.readouterr().err
    assert "compressed with compressor='avg'" in err and "already compressed" in err and "common.ratio" in err
    assert "set distill.gradient_checkpointing or posttrain.gradient_checkpointing instead" in err
    assert "training.label_smoothing_factor=0.1: not supported" in err


@pytest.mark.slow
def test_torchrun_two_ranks_hold_equal_weights(data, tmp_path):
    out = tmp_path / "ddp"
    script = tmp_path / "check.py"
    script.write_text(
        "import sys, torch, torch.distributed as dist\n"
        "from fcot.train.config import build_config\nfrom fcot.train.distill import run_distill\n"
        f"cfg = build_config('distill', {{'common': {{'model': 'tiny', 'output_dir': {str(out)!r}}},"
        f" 'data': {{'jsonl': [{data!r}], 'max_tiles': 1}},"
        " 'training': {'max_steps': 2, 'per_device_train_batch_size': 1, 'learning_rate': 1e-2, 'use_cpu': True,"
        " 'disable_tqdm': True, 'ddp_backend': 'gloo', 'save_strategy': 'no'}})\n"
        "tr = run_distill(cfg)\n"
        "flat = torch.cat([p.detach().flatten() for p in tr.model.parameters() if p.requires_grad])\n"
        "gathered = [torch.empty_like(flat) for _ in range(2)]\n"
        "dist.all_gather(gathered, flat)\n"
        "assert torch.equal(gathered[0], gathered[1]), 'ranks differ'\n"
        f"open({str(tmp_path)!r} + f'/rank{{dist.get_rank()}}.txt', 'w').write(str(tr.state.global_step))\n"
        "from fcot.train.engine import finish_distributed\nfinish_distributed()\n")
    import socket

    with socket.socket() as sock:  # a free port (torchrun's --master_port=0 is not supported by every rendezvous)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                           f"--master_port={port}",
                           str(script)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # One file per rank (the ranks' stdout interleaves): both got past the equality check at step 2.
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)] == ["2", "2"]
    assert fcot.is_patched(fcot.load_compressed(out))


def test_posttrain_lora_merges_into_a_loadable_model_and_resumes(data, tmp_path):
    section = {"lora": True, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0}
    training = {"max_steps": 4, "save_strategy": "steps", "save_steps": 2, "per_device_train_batch_size": 2,
                "learning_rate": 1e-2}
    full = run_posttrain(_cfg("posttrain", data, tmp_path / "full", training=training, section=section))
    module = full.model
    assert all(("lora_" in n) == p.requires_grad for n, p in module.parts.decoder.named_parameters())
    assert not any(p.requires_grad for p in module.parts.head.parameters())
    # the merged, saved model computes what the adapted model computes
    loaded = fcot.load_compressed(tmp_path / "full")
    batch = full.data_collator([full.train_dataset[0]])
    module.eval()
    with torch.no_grad():
        want = module(**batch)["hidden"]
        from fcot.train.posttrain import PosttrainModule

        plain = PosttrainModule(loaded, full.processing_class, _cfg("posttrain", data, tmp_path / "x"))
        got = plain(**batch)["hidden"]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # resume from checkpoint-2 gives the same losses
    ckpt_run = tmp_path / "part"

    class Stop(__import__("transformers").TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 2:
                control.should_training_stop = True

    from fcot.train.engine import start_run
    from fcot.train.posttrain import build_posttrain_trainer

    cfg = _cfg("posttrain", data, ckpt_run, training=training, section=section)
    start_run(cfg)
    build_posttrain_trainer(cfg, callbacks=[Stop()]).train()
    run_posttrain(cfg, resume=True)
    got = [m["loss"] for m in read_metrics(ckpt_run) if "loss" in m]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(_losses(full)), rtol=1e-5, atol=1e-7)


def test_options_that_change_nothing_warn(data, tmp_path):
    with pytest.warns(UserWarning, match="distill.beta=0.3 has no effect"):
        _cfg("distill", data, tmp_path / "w", section={"beta": 0.3})
    with pytest.warns(UserWarning, match="posttrain.lora_r have no effect"):
        _cfg("posttrain", data, tmp_path / "w", section={"lora_r": 8})


def test_bf16_autocast_step_runs_and_fused_equals_reference(data, tmp_path):
    """What Trainer's bf16 does on a GPU, here with CPU autocast: the fused projector runs outside
    autocast in its fp32 weights, the loss in the hidden states' dtype on both backends.

    The two losses see different bf16 roundings (the fused kernel accumulates in fp32, the
    reference rounds its logits to bf16), and CPU bf16 autocast itself rounds differently from one
    CPU to another: the tolerance is bf16's, not one machine's. bf16 keeps 8 significant bits (unit
    roundoff 2**-8 = 3.9e-3); the loss goes through a few bf16 roundings (hidden states, logits,
    log-softmax), so the two agree to a few units: rtol 1e-2 (the observed gap is 1e-4 to 2e-4).
    The model's weights come from the run's seed, so FCOT_TEST_SEED varies them."""
    seed = int(torch.randint(0, 2**31 - 1, ()))
    cfgs = [_cfg("distill", data, tmp_path / "a1", backend="triton", seed=seed),
            _cfg("distill", data, tmp_path / "a0", fused=False, seed=seed)]
    losses = []
    for c in cfgs:
        tr = build_distill_trainer(c)
        batch = tr.data_collator([tr.train_dataset[0]])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = distill_loss(tr.model(**batch), tr.model.parts.head, c)
        loss.backward()
        assert tr.model.parts.student_projector.compressor.merge_weight.grad.abs().max() > 0
        losses.append(loss.detach().float())
    assert losses[1] > 0
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-2, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients(data, tmp_path):
    grads = []
    for gc in (False, True):
        c = _cfg("distill", data, tmp_path / f"g{gc}", section={"gradient_checkpointing": gc})
        tr = build_distill_trainer(c)
        tr.model.train()
        dec = tr.model.parts.decoder
        assert getattr(dec, "is_activation_checkpointing", None) is gc or dec.is_gradient_checkpointing is gc
        batch = tr.data_collator([tr.train_dataset[i] for i in range(2)])
        distill_loss(tr.model(**batch), tr.model.parts.head, c).backward()
        grads.append(tr.model.parts.student_projector.linear_1.weight.grad)
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)
