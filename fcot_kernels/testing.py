"""Helpers for checking kernels against their references (used by the test suite and CI).

The tolerance rule: fp32 kernels must match the fp32 reference tightly; for fp16/bf16 the
kernel's error against the fp32 reference must be at most ``factor`` (default 2) times the
error of plain PyTorch computing the same thing in the same low precision, plus a small floor.
"""

from __future__ import annotations

import torch

from ._alloc import poison_outputs
from .dispatch import backends

__all__ = [
    "LAYOUTS",
    "TOLERANCES",
    "as_layout",
    "assert_close",
    "assert_match_contract",
    "assert_matches_reference",
    "runnable_backends",
    "poison_outputs",
]

TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float32: {"atol": 1e-4, "rtol": 1e-4},
    torch.float16: {"atol": 2e-2, "rtol": 2e-2},
    torch.bfloat16: {"atol": 8e-2, "rtol": 4e-2},
}
"""Absolute/relative tolerance per dtype for a kernel output compared with the reference."""


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, dtype: torch.dtype | None = None, name: str = "output", scale: float = 1.0) -> None:
    """``torch.testing.assert_close`` with the tolerance of ``dtype`` (default ``actual.dtype``),
    multiplied by ``scale``; also fails on any NaN left in ``actual`` (a poisoned, unwritten output)."""
    tol = TOLERANCES[dtype or actual.dtype]
    if torch.isnan(actual).any() and not torch.isnan(expected).any():
        raise AssertionError(f"{name}: NaN in the kernel output (an element was never written?)")
    torch.testing.assert_close(
        actual.float(), expected.float(), atol=tol["atol"] * scale, rtol=tol["rtol"] * scale, msg=lambda m: f"{name}: {m}"
    )


def assert_matches_reference(
    actual: torch.Tensor,
    exact: torch.Tensor,
    eager: torch.Tensor | None = None,
    *,
    name: str = "output",
    factor: float = 2.0,
) -> None:
    """Compare a kernel result with the fp32 reference ``exact``.

    For fp32 ``actual`` this is :func:`assert_close`. For fp16/bf16, ``eager`` is the same
    computation done by plain PyTorch in that dtype; the kernel's max error must be at most
    ``factor`` times eager's max error (plus a floor of one ulp of the output's scale).
    """
    if torch.isnan(actual).any():
        raise AssertionError(f"{name}: NaN in the kernel output (an element was never written?)")
    if actual.dtype == torch.float32 or eager is None:
        assert_close(actual, exact, dtype=actual.dtype, name=name)
        return
    err = (actual.float() - exact.float()).abs().max().item()
    eager_err = (eager.float() - exact.float()).abs().max().item()
    ulp = torch.finfo(actual.dtype).eps * max(exact.float().abs().max().item(), 1e-6)
    if err > factor * eager_err + ulp:
        raise AssertionError(
            f"{name}: max error {err:.3e} vs the fp32 reference exceeds {factor}x eager "
            f"{actual.dtype} error {eager_err:.3e} (+ ulp {ulp:.3e})"
        )


def runnable_backends(device: torch.device | str, *, has_cuda: bool = True) -> list[str]:
    """The kernel backends (not the reference) that can run on ``device`` in this process."""
    device = torch.device(device)
    status = backends()
    names = []
    if status["triton"].available:
        names.append("triton")
    if has_cuda and status["cuda"].available and device.type == "cuda":
        names.append("cuda")
    return names


def assert_match_contract(score: torch.Tensor, index: torch.Tensor, metric: torch.Tensor, protected: int) -> dict:
    """A backend's ``tome_match`` result against the reference under the contract of
    :func:`fcot_kernels.reference.tome_merge.score_tolerance` (scores within the summation-order
    tolerance, near-argmax picks, exact picks where the best candidate is clear). Returns how
    many A rows were clear and how many were near-ties, so a test can show both were exercised."""
    from .reference.tome_merge import inverse_norm_ref, score_tolerance

    tol = score_tolerance(metric.shape[-1])
    m = metric[:, protected:].float()
    a, b = m[:, 0::2], m[:, 1::2]
    full = (a @ b.transpose(1, 2)).double() * inverse_norm_ref(a)[:, :, None].double() * inverse_norm_ref(b)[:, None, :].double()
    best, ref_index = full.max(dim=-1)
    diff = (score.double() - best).abs()
    assert diff.max() <= tol, f"score differs from the reference by {diff.max().item():.3g} > tolerance {tol:.3g}"
    picked = full.gather(-1, index.long()[..., None])[..., 0]
    shortfall = best - picked
    assert shortfall.max() <= 2 * tol, (
        f"a chosen B token scores {shortfall.max().item():.3g} below the row's best (> 2 x tolerance {tol:.3g})"
    )
    second = full.scatter(-1, ref_index[..., None], float("-inf")).max(dim=-1).values if full.shape[-1] > 1 else best - 1
    clear = (best - second) > 2 * tol
    wrong = clear & (index.long() != ref_index)
    assert not wrong.any(), f"{int(wrong.sum())} A row(s) with a clear best B token chose another"
    return {"clear": int(clear.sum()), "near_ties": int((~clear).sum())}


LAYOUTS = ("contiguous", "strided", "offset", "transposed", "expanded")
"""Memory layouts every tensor argument of every op must accept (see :func:`as_layout`)."""


def as_layout(t: torch.Tensor, layout: str, *, requires_grad: bool = False) -> torch.Tensor:
    """A tensor with ``t``'s shape in the given memory layout, as a leaf (``requires_grad``):

    * ``"contiguous"``: a contiguous copy;
    * ``"strided"``: every element two slots apart (a step-2 slice of a wider buffer whose
      other slots hold NaN, or -7 for integers, so a kernel that ignores the stride reads them);
    * ``"offset"``: contiguous at a storage offset of 3 elements;
    * ``"transposed"``: the last two dimensions stored column-major (1-D: same as contiguous);
    * ``"expanded"``: ``t[:1]`` broadcast along dim 0 with stride 0 (its VALUES differ from
      ``t``: every slice along dim 0 equals the first; compare backends on the returned tensor).
    """
    t = t.detach()
    if layout == "contiguous":
        out = t.clone()
    elif layout == "strided":
        fill = float("nan") if t.is_floating_point() else -7
        buf = torch.full((*t.shape[:-1], 2 * t.shape[-1]) if t.dim() else (2,), fill, dtype=t.dtype, device=t.device)
        if t.dim():
            buf[..., ::2] = t
            out = buf[..., ::2]
        else:
            buf[0] = t
            out = buf[0]
    elif layout == "offset":
        flat = torch.empty(t.numel() + 3, dtype=t.dtype, device=t.device)
        flat[3:] = t.reshape(-1)
        out = flat[3:].view(t.shape)
    elif layout == "transposed":
        out = t.transpose(-1, -2).contiguous().transpose(-1, -2) if t.dim() >= 2 else t.clone()
    elif layout == "expanded":
        out = t[:1].clone().expand(t.shape) if t.dim() else t.clone()
    else:
        raise ValueError(f"layout={layout!r} is not one of {LAYOUTS}")
    return out.requires_grad_(requires_grad) if requires_grad else out
