"""CompressProjector: drop-in for the transformers projector, state-dict round trips (transformers
and OpenGVLab mlp1), from_projector, the avg initialiser, backends, extra_repr."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fcot_kernels as fk
from fcot.modules import CompressProjector, convert_projector_state_dict, to_mlp1_state_dict
from fcot_kernels.testing import runnable_backends

from ..conftest import DEVICE

transformers = pytest.importorskip("transformers")
from transformers.models.internvl.modeling_internvl import InternVLModel, InternVLMultiModalProjector  # noqa: E402

BACKENDS = ["reference", *runnable_backends(DEVICE, has_cuda=False)]


def hf_projector(vit=12, llm=40, act="gelu"):
    cfg = transformers.InternVLConfig(
        vision_config=dict(hidden_size=vit, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2),
        text_config=dict(model_type="qwen2", hidden_size=llm, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1),
        downsample_ratio=0.5,
        projector_hidden_act={"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}[act],
    )
    proj = InternVLMultiModalProjector(cfg).to(DEVICE)
    with torch.no_grad():
        proj.layer_norm.weight.normal_(1, 0.2)
        proj.layer_norm.bias.normal_(0, 0.2)
    return proj


def mlp1_from(proj):
    """An OpenGVLab-style mlp1 holding the same weights."""
    width, llm = proj.linear_1.in_features, proj.linear_2.out_features
    mlp1 = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, llm), nn.GELU(), nn.Linear(llm, llm)).to(DEVICE)
    mlp1.load_state_dict(to_mlp1_state_dict(proj.state_dict()))
    return mlp1


def shuffled(feats):
    y = InternVLModel.pixel_shuffle(None, feats, scale_factor=0.5)
    return y.reshape(y.shape[0], -1, y.shape[-1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ["gelu", "gelu_tanh"])
def test_drop_in_for_transformers_projector(backend, act):
    proj = hf_projector(act=act)
    feats = torch.randn(3, 8, 8, 12, device=DEVICE)
    with torch.no_grad():
        expected = proj(shuffled(feats))
        # scale=1.0: takes the projector's own (already shuffled) input, same call shape.
        drop_in = CompressProjector.from_projector(proj, scale=1.0, backend=backend)
        torch.testing.assert_close(drop_in(shuffled(feats)), expected, atol=1e-5, rtol=1e-5)
        # scale=0.5: the fused path straight from the ViT tokens.
        fused = CompressProjector.from_projector(proj, backend=backend)
        torch.testing.assert_close(fused(feats.reshape(3, 64, 12)), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fused(feats), expected, atol=1e-5, rtol=1e-5)  # (tiles, H, W, C) input


def test_transformers_state_dict_round_trip():
    proj = hf_projector()
    student = CompressProjector(12, 40, merge=2, mode="conv").to(DEVICE)
    student.load_projector_state_dict(proj.state_dict())
    for k, v in proj.state_dict().items():
        assert torch.equal(student.state_dict()[k], v), k
    # And back: the exported dict loads strictly into a fresh transformers projector.
    fresh = hf_projector()
    fresh.load_state_dict(student.projector_state_dict())
    for k, v in proj.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    # merge=1 avg has exactly the transformers keys: load_state_dict works directly.
    plain = CompressProjector(12, 40).to(DEVICE)
    plain.load_state_dict(proj.state_dict())
    assert set(plain.state_dict()) == set(proj.state_dict())


def test_mlp1_state_dict_round_trip():
    proj = hf_projector()
    mlp1 = mlp1_from(proj)
    assert set(mlp1.state_dict()) == {"0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias"}
    student = CompressProjector(12, 40, merge=4, mode="dwconv").to(DEVICE)
    student.load_projector_state_dict({f"mlp1.{k}": v for k, v in mlp1.state_dict().items()})  # checkpoint prefix
    feats = torch.randn(2, 8, 8, 12, device=DEVICE)
    with torch.no_grad():
        ref = CompressProjector.from_projector(proj, merge=4, mode="dwconv")(feats)
        torch.testing.assert_close(student(feats), ref)
        from_mlp1 = CompressProjector.from_projector(mlp1, scale=1.0)
        torch.testing.assert_close(from_mlp1(shuffled(feats)), proj(shuffled(feats)), atol=1e-5, rtol=1e-5)
    exported = student.projector_state_dict("mlp1")
    fresh = mlp1_from(hf_projector())
    fresh.load_state_dict(exported)
    for k, v in mlp1.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


def test_state_dict_bad_keys():
    proj = hf_projector()
    sd = proj.state_dict()
    with pytest.raises(KeyError, match="lacks"):
        convert_projector_state_dict({k: v for k, v in sd.items() if k != "linear_2.bias"})
    with pytest.raises(KeyError, match="unexpected projector key 'linear_3.weight'"):
        convert_projector_state_dict({**sd, "linear_3.weight": sd["linear_2.weight"]})
    prefixed = convert_projector_state_dict({f"model.multi_modal_projector.{k}": v for k, v in sd.items()})
    assert set(prefixed) == set(sd)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["dwconv", "conv"])
@pytest.mark.parametrize("merge", [2, 4])
def test_student_starts_at_avg_and_trains(backend, mode, merge):
    proj = hf_projector()
    feats = torch.randn(3, 8, 8, 12, device=DEVICE)
    avg = CompressProjector.from_projector(proj, merge=merge, backend=backend)
    student = CompressProjector.from_projector(proj, merge=merge, mode=mode, backend=backend)
    with torch.no_grad():
        torch.testing.assert_close(student(feats), avg(feats), atol=1e-6, rtol=1e-6)
    # Stage 1 of FCoT-VL: only the compressor learns; its gradients flow and match the reference.
    for name, p in student.named_parameters():
        p.requires_grad_(name.startswith("merge_"))
    out = student(feats)
    grads = torch.autograd.grad(out.square().mean(), [student.merge_weight, student.merge_bias])
    student.backend = "reference"
    ref = torch.autograd.grad(student(feats).square().mean(), [student.merge_weight, student.merge_bias])
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)
    assert all(g.abs().sum() > 0 for g in grads)


def test_bf16_module_matches_reference():
    proj = hf_projector().to(torch.bfloat16)
    student = CompressProjector.from_projector(proj, merge=2, mode="conv", backend=BACKENDS[-1])
    assert student.merge_weight.dtype == torch.bfloat16
    feats = torch.randn(1, 8, 8, 12, device=DEVICE, dtype=torch.bfloat16)
    with torch.no_grad():
        got = student(feats).float()
        student.backend = "reference"
        ref = student(feats).float()
    torch.testing.assert_close(got, ref, atol=8e-2, rtol=4e-2)


def test_module_errors_and_repr():
    with pytest.raises(ValueError, match="mode='pool' is not supported"):
        CompressProjector(12, 40, mode="pool")
    with pytest.raises(ValueError, match="act='relu' is not supported"):
        CompressProjector(12, 40, act="relu")
    with pytest.raises(ValueError, match="merge=3 is not supported"):
        CompressProjector(12, 40, merge=3)
    with pytest.warns(UserWarning, match="merge_bias has no effect"):
        CompressProjector(12, 40, merge_bias=False)
    with pytest.raises(TypeError, match="from_projector needs"):
        CompressProjector.from_projector(nn.Linear(4, 4))
    relu_mlp = nn.Sequential(nn.LayerNorm(48), nn.Linear(48, 40), nn.ReLU(), nn.Linear(40, 40))
    with pytest.raises(ValueError, match="unsupported projector activation ReLU"):
        CompressProjector.from_projector(relu_mlp)
    m = CompressProjector(12, 40, merge=2, mode="conv", merge_bias=False, backend="reference")
    assert m.merge_bias is None and m.merge_weight.shape == (48, 96)
    text = repr(m)
    assert "merge=2" in text and "mode='conv'" in text and "backend='reference'" in text and "in_features=12" in text
    with pytest.raises(ValueError, match="not a square grid"):
        m(torch.randn(1, 12, 12))
    out = m(torch.randn(2, 32, 12), grid=(4, 8))
    assert out.shape == (2, 4, 40)
    with pytest.raises(fk.BackendUnavailableError):
        CompressProjector(12, 40, backend="cuda")(torch.randn(1, 16, 12))
