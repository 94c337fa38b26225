"""Backend dispatch: the process-wide choice, auto selection, and no silent fallback."""

from __future__ import annotations

import logging

import pytest
import torch

import fcot_kernels as fk
from fcot_kernels import dispatch
from fcot_kernels.reference import shuffle_merge_norm_ref

from ..conftest import ON_GPU


def _args():
    x = torch.randn(1, 16, 4)
    return x, dict(grid=(4, 4), weight=torch.randn(16), bias=torch.randn(16))


def test_backends_reports_every_backend_with_a_reason():
    status = fk.backends()
    assert list(status) == ["reference", "triton", "cuda"]
    assert status["reference"].available
    for s in status.values():
        assert isinstance(s.reason, str) and s.reason
    if not ON_GPU:
        assert not status["cuda"].available
        assert "CUDA device" in status["cuda"].reason or "not built" in status["cuda"].reason


def test_default_is_auto_and_env_sets_the_process_choice(monkeypatch):
    monkeypatch.delenv("FCOT_BACKEND", raising=False)
    assert fk.current_backend() == "auto"
    monkeypatch.setenv("FCOT_BACKEND", "reference")
    assert fk.current_backend() == "reference"
    monkeypatch.setenv("FCOT_BACKEND", "fast")
    with pytest.raises(ValueError, match="FCOT_BACKEND='fast' is not a backend"):
        fk.current_backend()


def test_use_backend_nests_and_restores(monkeypatch):
    monkeypatch.delenv("FCOT_BACKEND", raising=False)
    with fk.use_backend("reference"):
        assert fk.current_backend() == "reference"
        with fk.use_backend("triton"):
            assert fk.current_backend() == "triton"
        assert fk.current_backend() == "reference"
    assert fk.current_backend() == "auto"
    with pytest.raises(ValueError, match="use_backend"):
        with fk.use_backend("tpu"):
            pass


def test_auto_picks_reference_for_cpu_tensors():
    x, kw = _args()
    assert dispatch.resolve("op", "auto", x, has_cuda=True) == "reference"
    # And the result is exactly the reference's.
    torch.testing.assert_close(fk.shuffle_merge_norm(x, backend="auto", **kw), shuffle_merge_norm_ref(x, **kw), rtol=0, atol=0)


def test_explicit_cuda_on_cpu_tensors_raises_with_the_reason():
    x, kw = _args()
    with pytest.raises(fk.BackendUnavailableError, match="backend='cuda'"):
        fk.shuffle_merge_norm(x, backend="cuda", **kw)
    with pytest.raises(fk.BackendUnavailableError, match="no CUDA C.. kernel"):
        dispatch.resolve("some_op", "cuda", x, has_cuda=False)


def test_explicit_triton_on_cpu_without_interpreter_raises(monkeypatch):
    x, _ = _args()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(fk.BackendUnavailableError, match="TRITON_INTERPRET=1"):
        dispatch.resolve("op", "triton", x, has_cuda=True)


def test_process_choice_applies_when_backend_is_none(monkeypatch):
    x, kw = _args()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with fk.use_backend("triton"):
        if not ON_GPU:
            with pytest.raises(fk.BackendUnavailableError):
                fk.shuffle_merge_norm(x, **kw)
        # An explicit argument wins over the process-wide choice.
        fk.shuffle_merge_norm(x, backend="reference", **kw)


def test_the_chosen_backend_is_logged_once(caplog, monkeypatch):
    x, _ = _args()
    monkeypatch.setattr(dispatch, "_logged", set())
    with caplog.at_level(logging.DEBUG, logger="fcot_kernels"):
        for _ in range(3):
            dispatch.resolve("logged_op", "reference", x, has_cuda=True)
    lines = [r.getMessage() for r in caplog.records if "logged_op" in r.getMessage()]
    assert lines == ["logged_op runs on backend 'reference' (device cpu)"]


def test_inputs_the_cuda_kernel_cannot_take_raise_for_cuda_and_skip_it_for_auto():
    x = torch.randn(1, 16, 4)
    with pytest.raises(fk.BackendUnavailableError, match="cannot run these inputs: too wide"):
        dispatch.resolve("op", "cuda", x, has_cuda=True, cuda_unfit="too wide")
    assert dispatch.resolve("op", "auto", x, has_cuda=True, cuda_unfit="too wide") == "reference"
    x = torch.randn(1, 16, 4096)  # width 16384 > the CUDA kernel's shared-memory bound
    with pytest.raises(fk.BackendUnavailableError, match="row width C/scale..2=16384"):
        fk.shuffle_merge_norm(x, grid=(4, 4), weight=torch.ones(16384), bias=torch.zeros(16384), backend="cuda")


# ----------------------------------------------------------------------------- measured dispatch (issue 13)


def test_default_order_prefers_the_tensor_core_tome_match():
    """Where nothing is measured, auto prefers the Triton ToMe match (wgmma) over the CUDA one
    (fp32 FMA), and the CUDA kernel for the other ops."""
    from fcot_kernels.dispatch import preferred_order

    assert preferred_order("tome_match", "NVIDIA H100", {}) == ("triton", "cuda")
    assert preferred_order("shuffle_merge_norm", "NVIDIA H100", {}) == ("cuda", "triton")


def test_measured_table_orders_backends_by_time_and_is_read_back():
    from fcot_kernels.dispatch import measured_table, preferred_order

    env = {"device_name": "NVIDIA H100"}
    rows = [
        dict(op="shuffle_merge_norm", shape="a", mode="fwd", provider="cuda", median_ms=2.0, env=env),
        dict(op="shuffle_merge_norm", shape="a", mode="fwd", provider="triton", median_ms=1.5, env=env),
        dict(op="shuffle_merge_norm", shape="b", mode="fwd", provider="cuda", median_ms=1.0, env=env),  # triton lacks b
        dict(op="shuffle_merge_norm", shape="a", mode="fwd", provider="eager", median_ms=0.1, env=env),  # not a backend
        dict(op="tome_merge", shape="a", mode="fwd", provider="cuda", median_ms=1.0, env=env),
        dict(op="tome_merge", shape="a", mode="fwd", provider="triton", median_ms=3.0, env=env),
        dict(op="merged_attention", shape="a", mode="fwd", provider="triton", median_ms=1.0, env=env),  # one backend
    ]
    table = measured_table(rows, {})
    assert preferred_order("shuffle_merge_norm", "NVIDIA H100", table) == ("triton", "cuda")
    assert table["measured"]["shuffle_merge_norm"]["NVIDIA H100"]["cases"] == ["a/fwd"]
    assert preferred_order("tome_match", "NVIDIA H100", table) == ("cuda", "triton")
    assert preferred_order("tome_merge", "NVIDIA H100", table) == ("cuda", "triton")
    assert "merged_attention" not in table["measured"]
    # Another device keeps the default order.
    assert preferred_order("tome_match", "NVIDIA A100", table) == ("triton", "cuda")


def test_committed_dispatch_table_is_well_formed():
    from fcot_kernels.dispatch import BACKENDS, _load_table

    table = _load_table()
    for op, devices in table.get("measured", {}).items():
        for device, entry in devices.items():
            assert set(entry["order"]) <= set(BACKENDS[1:]), (op, device, entry)
