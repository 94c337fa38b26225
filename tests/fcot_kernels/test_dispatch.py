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
