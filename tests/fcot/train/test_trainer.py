"""fcot.train.trainer: the loss inside the module's forward, gradient accumulation normalised by the
tokens of the whole accumulated batch, frozen parts kept in eval mode (dropout / drop path on),
and stage 1's loss parts (KL, CE, agreement) in metrics.jsonl."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from tests.fcot.train.conftest import synth_jsonl  # noqa: E402
from fcot.models.tiny import build_tiny  # noqa: E402
from fcot.train.checkpoint import read_metrics  # noqa: E402
from fcot.train.config import build_config  # noqa: E402
from fcot.train.distill import distill_loss  # noqa: E402
from fcot.train.posttrain import sft_loss  # noqa: E402
from fcot.train.trainer import build_trainer, run  # noqa: E402


@pytest.fixture(scope="module")
def data16(tmp_path_factory) -> str:
    """16 records whose answers differ in length, so per-micro-batch token means differ from the
    batch's: a mean of means cannot pass for the batch mean."""
    return synth_jsonl(tmp_path_factory, n=16, seed=1, size=128, font_size=18)


def _cfg(stage, data, out, *, training=None, section=None, **common):
    training = {"max_steps": 1, "per_device_train_batch_size": 4, "learning_rate": 1e-3, "use_cpu": True,
                "disable_tqdm": True, "save_strategy": "no", "lr_scheduler_type": "constant", "max_grad_norm": 0.0,
                **(training or {})}
    return build_config(stage, {"common": {"model": "tiny", "output_dir": str(out), **common},
                                "data": {"jsonl": [data], "max_tiles": 1}, stage: section or {}, "training": training})


class _GradsBeforeStep(__import__("transformers").TrainerCallback):
    """The trainable parameters' gradients just before the (only) optimizer step."""

    def __init__(self):
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _first_step_grads(cfg, *, mean_of_means=False):
    grabber = _GradsBeforeStep()
    trainer = build_trainer(cfg, callbacks=[grabber])
    if mean_of_means:  # what the trainers did before: each micro-batch normalised by its own tokens
        trainer.model_accepts_loss_kwargs = False
    trainer.train()
    return grabber.grads


@pytest.mark.parametrize("stage", ["distill", "posttrain"])
def test_four_micro_batches_of_4_give_the_gradient_of_one_batch_of_16(data16, tmp_path, stage):
    one = _first_step_grads(_cfg(stage, data16, tmp_path / "b16", training={"per_device_train_batch_size": 16}))
    acc = _first_step_grads(_cfg(stage, data16, tmp_path / "b4x4", training={"gradient_accumulation_steps": 4}))
    old = _first_step_grads(_cfg(stage, data16, tmp_path / "old", training={"gradient_accumulation_steps": 4}),
                            mean_of_means=True)
    assert one and one.keys() == acc.keys()
    for name in one:
        scale = one[name].abs().max().item()
        torch.testing.assert_close(acc[name], one[name], rtol=1e-4, atol=1e-5 * scale, msg=lambda m, n=name: f"{n}: {m}")
    # The check can fail: the per-micro-batch normalisation gives another gradient on these data.
    worst = max(((old[n] - one[n]).abs().max() / one[n].abs().max().clamp(min=1e-12)).item() for n in one)
    assert worst > 1e-2, worst


class DropPath(nn.Module):
    """Stochastic depth on a residual branch, as InternViT applies it (``drop_path_rate``): in
    training each sample's branch is dropped with probability ``p`` (kept ones scaled by
    ``1 / (1 - p)``); in eval mode it is the identity."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        keep = (torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), device=x.device) >= self.p).to(x.dtype)
        return x * keep / (1 - self.p)


def _with_drop_path(seed: int = 0):
    """The tiny model with drop path 0.1 on every ViT layer's MLP branch and dropout 0.1 in the
    ViT and the LLM's attention."""
    bundle = build_tiny(seed=seed)
    model = bundle.model
    for layer in model.model.vision_tower.encoder.layer:
        layer.mlp = nn.Sequential(layer.mlp, DropPath(0.1))
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.1
    model.model.language_model.config.attention_dropout = 0.1
    for layer in model.model.language_model.layers:
        layer.self_attn.attention_dropout = 0.1
    return bundle


@pytest.mark.parametrize("stage", ["distill", "posttrain"])
def test_frozen_parts_stay_in_eval_mode_with_drop_path_on(data16, tmp_path, stage):
    """Trainer calls model.train(): the frozen ViT (and in stage 1 the frozen LLM, head and
    teacher projector) stay in eval mode, so drop path and dropout do not touch them. In stage 1
    nothing that runs is trainable-with-dropout, so two forwards in train mode agree exactly;
    plain nn.Module.train would make them differ (the check can fail)."""
    model, tok, proc = _with_drop_path()
    trainer = build_trainer(_cfg(stage, data16, tmp_path / "dp"), model=model, tokenizer=tok, image_processor=proc)
    module = trainer.model
    module.train()
    parts = module.parts
    assert not parts.vision.training and not any(m.training for m in parts.vision.modules())
    assert any(isinstance(m, DropPath) for m in parts.vision.modules())
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    if stage == "distill":
        assert not parts.decoder.training and not module.teacher_projector.training and not parts.head.training
        assert parts.student_projector.training
        a, b = module(**batch)["loss"], module(**batch)["loss"]
        assert torch.equal(a, b)
        nn.Module.train(module, True)  # everything in train mode: drop path and dropout act
        c, d = module(**batch)["loss"], module(**batch)["loss"]
        assert not torch.equal(c, d)
    else:
        assert parts.decoder.training  # the LLM learns in stage 2: its dropout applies
        tokens = parts.vit(batch["pixel_values"])
        torch.testing.assert_close(parts.vit(batch["pixel_values"]), tokens, rtol=0, atol=0)
    trainer.train()  # and a training step runs with them
    assert trainer.state.global_step == 1


def test_the_loss_lm_head_included_is_computed_in_the_module_forward(data16, tmp_path):
    """The wrapped module's forward returns the loss (what FSDP / ZeRO-3 need: the head's weights
    are used inside the wrapped forward), equal to the loss of the paired rows."""
    for stage, loss_fn in (("distill", distill_loss), ("posttrain", sft_loss)):
        cfg = _cfg(stage, data16, tmp_path / stage, section={"ce_weight": 0.5} if stage == "distill" else None)
        trainer = build_trainer(cfg)
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
        out = trainer.model(**batch)
        want = loss_fn(trainer.model.rows(**batch), trainer.model.parts.head, cfg)
        torch.testing.assert_close(out["loss"], want, rtol=1e-6, atol=1e-7)
        out["loss"].backward()
        assert trainer.model.parts.student_projector.linear_1.weight.grad.abs().max() > 0


def test_stage1_logs_kl_ce_and_agreement_next_to_the_loss(data16, tmp_path):
    """metrics.jsonl holds kl, ce and agreement on every logged step, and they add up to the
    logged loss: loss = kl_weight * T**2 * kl + ce_weight * ce (one micro-batch per step)."""
    section = {"kl_weight": 0.7, "ce_weight": 0.3, "temperature": 2.0}
    cfg = _cfg("distill", data16, tmp_path / "m", section=section, training={"max_steps": 3})
    run(cfg)
    rows = [m for m in read_metrics(tmp_path / "m") if "loss" in m]
    assert [m["step"] for m in rows] == [1, 2, 3]
    for m in rows:
        assert m["kl"] >= 0 and m["ce"] > 0 and 0 <= m["agreement"] <= 1, m
        torch.testing.assert_close(torch.tensor(m["loss"]), torch.tensor(0.7 * 4.0 * m["kl"] + 0.3 * m["ce"]),
                                   rtol=1e-3, atol=1e-6)
