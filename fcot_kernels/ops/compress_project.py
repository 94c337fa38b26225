"""``compress_project``: pixel shuffle + token merge + LayerNorm + Linear + GELU + Linear, the
whole InternVL projector path from ViT patch tokens to LLM-width embeddings, fused.

The forward and backward are ``torch.library`` custom ops (``fcot::cproj_fwd``,
``fcot::cproj_bwd``) that orchestrate the Triton launchers of
:mod:`fcot_kernels.triton.compress_project` (see ``docs/kernels.md`` for the design, bytes and
FLOPs), so that torch.compile treats them as opaque nodes with known output shapes. Gradients
are computed only for inputs that require them: a frozen weight costs no GEMM, and when nothing
below a GEMM needs a gradient that GEMM is skipped.
"""

from __future__ import annotations

import importlib
from typing import Optional

import torch

from .._validation import FLOAT_DTYPES, ShuffleGeometry, check_choice, check_eps, check_tensor, shuffle_geometry
from ..dispatch import resolve
from ..reference.compress_project import ACTS, MODES, compress_project_ref

# The tensors that can receive a gradient, in the order of cproj_fwd's first nine arguments
# and of cproj_bwd's outputs.
GRAD_INPUTS = ("x", "ln_weight", "ln_bias", "w1", "b1", "w2", "b2", "merge_weight", "merge_bias")


def _impl(backend: str):
    return importlib.import_module(f"fcot_kernels.{backend}.compress_project")


def _geom(x: torch.Tensor, grid_h: int, grid_w: int, r: int, merge: int) -> ShuffleGeometry:
    return ShuffleGeometry(x.shape[0], grid_h, grid_w, x.shape[2], r, merge)


def _sum_rows(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.sum(0, dtype=torch.float32).to(dtype)


@torch.library.custom_op("fcot::cproj_fwd", mutates_args=())
def _cproj_fwd(
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    merge_weight: Optional[torch.Tensor],
    merge_bias: Optional[torch.Tensor],
    grid_h: int,
    grid_w: int,
    r: int,
    merge: int,
    mode: str,
    eps: float,
    act: str,
    backend: str,
    training: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out, h, u, a, z, mean, rstd)``: the output and what the backward needs. ``u`` (the
    pre-activation) is kept only when ``training`` and ``z`` (the conv output) only for conv;
    otherwise they are empty, so inference holds no extra ``(rows, hidden)`` tensor."""
    impl = _impl(backend)
    geom = _geom(x, grid_h, grid_w, r, merge)
    if mode == "conv":
        z = impl.conv_forward(x, merge_weight, merge_bias, geom)
        ident = impl.identity_geometry(geom.rows, geom.width)
        h, mean, rstd = impl.merge_ln_forward(z.view(geom.rows, 1, geom.width), None, None, ln_weight, ln_bias, ident, eps)
    else:
        z = x.new_empty(0)
        h, mean, rstd = impl.merge_ln_forward(x, merge_weight, merge_bias, ln_weight, ln_bias, geom, eps)
    a, u = impl.linear_act(h, w1, b1, act, save_pre=training)
    out = torch.addmm(b2, a, w2.t())  # nothing to fuse: cuBLAS with its bias epilogue
    u = u if u is not None else x.new_empty(0)
    return out.view(geom.tiles, geom.tokens_out, w2.shape[0]), h, u, a, z, mean, rstd


@_cproj_fwd.register_fake
def _(x, ln_weight, ln_bias, w1, b1, w2, b2, merge_weight, merge_bias, grid_h, grid_w, r, merge, mode, eps, act, backend, training):
    geom = _geom(x, grid_h, grid_w, r, merge)
    hidden = w1.shape[0]
    out = x.new_empty((geom.tiles, geom.tokens_out, w2.shape[0]))
    h = x.new_empty((geom.rows, geom.width))
    u = x.new_empty((geom.rows, hidden) if training else (0,))
    z = x.new_empty((geom.rows, geom.width) if mode == "conv" else (0,))
    mean = x.new_empty((geom.rows,), dtype=torch.float32)
    return out, h, u, x.new_empty((geom.rows, hidden)), z, mean, torch.empty_like(mean)


@torch.library.custom_op("fcot::cproj_bwd", mutates_args=())
def _cproj_bwd(
    dout: torch.Tensor,
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    merge_weight: Optional[torch.Tensor],
    merge_bias: Optional[torch.Tensor],
    h: torch.Tensor,
    u: torch.Tensor,
    a: torch.Tensor,
    z: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    grid_h: int,
    grid_w: int,
    r: int,
    merge: int,
    mode: str,
    act: str,
    backend: str,
    need: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of the nine tensor inputs (order of ``GRAD_INPUTS``), each in its input's
    dtype; one not asked for in ``need`` is an empty tensor and costs nothing."""
    impl = _impl(backend)
    geom = _geom(x, grid_h, grid_w, r, merge)
    need_x, need_lnw, need_lnb, need_w1, need_b1, need_w2, need_b2, need_mw, need_mb = need
    dout = dout.reshape(geom.rows, w2.shape[0]).contiguous()
    grads = dict.fromkeys(GRAD_INPUTS)
    if need_w2:
        grads["w2"] = torch.mm(dout.t(), a)
    if need_b2:
        grads["b2"] = _sum_rows(dout, w2.dtype)
    below_merge = need_x or need_mw or need_mb
    below_ln = below_merge or need_lnw or need_lnb
    if below_ln or need_w1 or need_b1:
        du = impl.linear_act_grad(dout, w2, u, act)
        if need_w1:
            grads["w1"] = torch.mm(du.t(), h)
        if need_b1:
            grads["b1"] = _sum_rows(du, w1.dtype)
        if below_ln:
            dh = torch.mm(du, w1)
            if mode == "conv":
                ident = impl.identity_geometry(geom.rows, geom.width)
                dz, dlnw, dlnb, _, _ = impl.merge_ln_backward(
                    dh, z.view(geom.rows, 1, geom.width), None, None, ln_weight, mean, rstd, ident,
                    compute_dx=below_merge, compute_dmw=False, compute_dmb=False,
                )
                if below_merge:
                    dz = dz.view(geom.rows, geom.width)
                    grads["x"], dmw = impl.conv_backward(dz, x, merge_weight, geom, compute_dx=need_x, compute_dmw=need_mw)
                    dmb = _sum_rows(dz, merge_bias.dtype) if need_mb else None
            else:
                grads["x"], dlnw, dlnb, dmw, dmb = impl.merge_ln_backward(
                    dh, x, merge_weight, merge_bias, ln_weight, mean, rstd, geom,
                    compute_dx=need_x, compute_dmw=need_mw, compute_dmb=need_mb,
                )
            # The LayerNorm and dwconv kernels reduce into fp32; hand back the parameter dtype.
            if need_lnw:
                grads["ln_weight"] = dlnw.to(ln_weight.dtype)
            if need_lnb:
                grads["ln_bias"] = dlnb.to(ln_weight.dtype)
            if need_mw:
                grads["merge_weight"] = dmw.to(merge_weight.dtype)
            if need_mb:
                grads["merge_bias"] = dmb.to(merge_bias.dtype)
    # A custom op returns tensors only: an empty one stands for "no gradient".
    return tuple(g if g is not None else x.new_empty(0) for g in grads.values())


@_cproj_bwd.register_fake
def _(dout, x, ln_weight, w1, w2, merge_weight, merge_bias, h, u, a, z, mean, rstd, grid_h, grid_w, r, merge, mode, act, backend, need):
    # b1 and b2 are not inputs of the backward: their gradients take w1's and w2's row counts.
    like = (x, ln_weight, ln_weight, w1, w1[:, 0], w2, w2[:, 0], merge_weight, merge_bias)
    return tuple(t.new_empty(t.shape) if wanted else x.new_empty(0) for wanted, t in zip(need, like))


def _setup_context(ctx, inputs, output) -> None:
    x, ln_weight, _lnb, w1, _b1, w2, _b2, merge_weight, merge_bias, grid_h, grid_w, r, merge, mode, _eps, act, backend, _ = inputs
    _, h, u, a, z, mean, rstd = output
    ctx.mark_non_differentiable(h, u, a, z, mean, rstd)
    ctx.save_for_backward(x, ln_weight, w1, w2, merge_weight, merge_bias, h, u, a, z, mean, rstd)
    ctx.args = (grid_h, grid_w, r, merge, mode, act, backend)


def _backward(ctx, dout, *_grads_of_saved):
    need = [bool(n) for n in ctx.needs_input_grad[:9]]
    grads = _cproj_bwd(dout, *ctx.saved_tensors, *ctx.args, need)
    return (*(g if n else None for g, n in zip(grads, need)), *(None,) * 9)


_cproj_fwd.register_autograd(_backward, setup_context=_setup_context)


def _check_weights(
    x: torch.Tensor,
    geom: ShuffleGeometry,
    mode: str,
    ln_weight,
    ln_bias,
    w1,
    b1,
    w2,
    b2,
    merge_weight,
    merge_bias,
) -> None:
    width = geom.width

    def check(name: str, t: object, shape: tuple[int, ...], what: str) -> None:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape {shape} ({what}), got {type(t).__name__}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} ({what}), got {tuple(t.shape)}")
        if t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but x has dtype {x.dtype}; cast the weights to x's dtype")
        check_tensor(name, t, device=x.device, dtypes=None)

    check("ln_weight", ln_weight, (width,), f"the token width after pixel shuffle, C/scale**2 = {width}")
    check("ln_bias", ln_bias, (width,), f"the token width after pixel shuffle, C/scale**2 = {width}")
    if not isinstance(w1, torch.Tensor) or w1.dim() != 2:
        raise ValueError(f"w1 must be a 2-D tensor of shape (hidden, {width}), got {getattr(w1, 'shape', type(w1).__name__)}")
    hidden = w1.shape[0]
    check("w1", w1, (hidden, width), f"(hidden, C/scale**2) with C/scale**2 = {width}")
    check("b1", b1, (hidden,), "w1.shape[0]")
    if not isinstance(w2, torch.Tensor) or w2.dim() != 2:
        raise ValueError(f"w2 must be a 2-D tensor of shape (out, {hidden}), got {getattr(w2, 'shape', type(w2).__name__)}")
    check("w2", w2, (w2.shape[0], hidden), f"(out, w1.shape[0]) with w1.shape[0] = {hidden}")
    check("b2", b2, (w2.shape[0],), "w2.shape[0]")
    if mode == "avg":
        for name, t in (("merge_weight", merge_weight), ("merge_bias", merge_bias)):
            if t is not None:
                raise ValueError(f"mode='avg' has no parameters, but {name} was given; pass mode='dwconv' or 'conv' to learn the merge")
        return
    expect = (geom.merge, width) if mode == "dwconv" else (width, geom.merge * width)
    if merge_weight is None:
        raise ValueError(f"mode={mode!r} needs merge_weight of shape {expect} (merge={geom.merge}, width {width})")
    what = "(merge, C/scale**2)" if mode == "dwconv" else "(C/scale**2, merge*C/scale**2): the window's tokens concatenated"
    check("merge_weight", merge_weight, expect, what)
    if merge_bias is not None:
        check("merge_bias", merge_bias, (width,), "C/scale**2")


def compress_project(
    x: torch.Tensor,
    *,
    grid: tuple[int, int],
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    scale: float = 0.5,
    merge: int = 1,
    mode: str = "avg",
    merge_weight: torch.Tensor | None = None,
    merge_bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    act: str = "gelu",
    backend: str | None = None,
) -> torch.Tensor:
    """Compress and project visual tokens: pixel shuffle -> merge -> LayerNorm -> Linear ->
    GELU -> Linear, i.e. the InternVL projector (``layer_norm``, ``linear_1``, ``act``,
    ``linear_2``) applied to merged tokens.

    Args:
        x: ``(tiles, grid_h*grid_w, C)`` ViT patch tokens without the CLS token, row-major over
            the patch grid; fp32, fp16 or bf16; any strides.
        grid: ``(grid_h, grid_w)``, e.g. ``(32, 32)`` for 448px tiles with 14px patches.
        ln_weight, ln_bias: ``(W,)`` LayerNorm affine parameters, ``W = C / scale**2``.
        w1, b1: ``(hidden, W)``, ``(hidden,)``: the first Linear.
        w2, b2: ``(out, hidden)``, ``(out,)``: the second Linear.
        scale: pixel-shuffle scale ``1/r`` (0.5 in InternVL), laid out as transformers'
            ``InternVLModel.pixel_shuffle``.
        merge: tokens merged on the shuffled grid: 1, 2 (1x2 windows along the last grid axis)
            or 4 (2x2 windows); window members in row-major order.
        mode: ``"avg"`` (mean of the window, no parameters), ``"dwconv"`` (per-channel weighted
            sum, ``merge_weight (merge, W)``) or ``"conv"`` (a Linear over the concatenated
            window, ``merge_weight (W, merge*W)``; a Conv2d with kernel = stride = window).
            :func:`fcot_kernels.reference.avg_merge_weight` gives the weights that equal avg.
        merge_weight, merge_bias: the learnable merge's parameters (``merge_bias (W,)``
            optional); must be None for ``"avg"``.
        eps: LayerNorm epsilon, in ``[1e-20, 1]``. Statistics are fp32 and do not overflow for
            finite rows of any magnitude; a row holding NaN/inf comes out all NaN.
        act: ``"gelu"`` (exact erf, transformers' ``"gelu"``) or ``"gelu_tanh"``.
        backend: ``None`` (process default), ``"auto"``, ``"reference"`` or ``"triton"``
            (this op has no CUDA C++ kernel); see :mod:`fcot_kernels.dispatch`.

    Every weight must have x's dtype and device.

    Returns:
        ``(tiles, grid_h*grid_w*scale**2/merge, out)`` in ``x.dtype``.

    What is fused (Triton backend): the pixel-shuffle gather and the merge never materialise a
    shuffled tensor: avg/dwconv merge with the LayerNorm in one pass over x; the conv merge is
    a GEMM whose A operand is gathered from x in its prologue. The first Linear's epilogue adds
    the bias and applies GELU; the backward recomputes GELU' in the epilogue of ``dy @ w2``
    and writes dx straight to the ViT-token layout. Accumulation is fp32 throughout.
    """
    geom = shuffle_geometry(x, grid, scale, merge)
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    check_choice("mode", mode, MODES)
    check_choice("act", act, tuple(ACTS))
    _check_weights(x, geom, mode, ln_weight, ln_bias, w1, b1, w2, b2, merge_weight, merge_bias)
    eps = check_eps(eps)
    name = resolve("compress_project", backend, x, has_cuda=False)
    if name == "reference":
        return compress_project_ref(
            x, grid=grid, ln_weight=ln_weight, ln_bias=ln_bias, w1=w1, b1=b1, w2=w2, b2=b2, scale=scale,
            merge=merge, mode=mode, merge_weight=merge_weight, merge_bias=merge_bias, eps=eps, act=act,
        )
    tensors = (x, ln_weight, ln_bias, w1, b1, w2, b2, merge_weight, merge_bias)
    # Keep the pre-activation for the backward only when autograd will call it.
    training = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    out, *_ = _cproj_fwd(*tensors, geom.grid_h, geom.grid_w, geom.r, geom.merge, mode, eps, act, name, training)
    return out
