"""Compile every Triton kernel of fcot_kernels for sm_90 (H100) on a machine without a GPU.

The tests run the kernels under the Triton interpreter, which never compiles them, so a kernel
that would not build for a real GPU (tl.dot dtype mismatches, unsupported ops, int32/int64
mixing in loops, constexpr misuse) or would not fit in an SM's shared memory passes CI and
breaks on the first GPU run. This script compiles them with Triton's own compiler
(``ASTSource`` + ``GPUTarget("cuda", 90, 32)``, the ptxas bundled with Triton) at the constexpr
configurations the launchers use at the real model shapes, and prints one line per
kernel/configuration with its shared memory, registers, stack and spill bytes.

Run as a script (``tests/test_triton_sm90_compile.py`` calls it in a subprocess, because the
interpreter that the tests use replaces ``triton.jit``)::

    PYTHONPATH=$PWD python tests/compile_triton_sm90.py [--jobs N] [--filter SUBSTRING]

Exit status 1 if any kernel fails to compile or needs more shared memory than an H100 SM
offers (227 KiB); spills are printed as warnings and do not fail.

The constexprs (block sizes, num_warps, num_stages) come from the launchers' own helpers
(``shuffle_merge_norm._ln_meta``, ``compress_project._gemm_config``, ``fused_linear_distill._meta``
/ ``default_chunk``, ``tome_merge._match_meta`` / ``_block_c``, ``merged_attention._config`` /
``_block_d`` / ``_precision``), evaluated as on a CUDA device, so the check follows the code.
The runtime arguments are specialised as the JIT does (Triton's own ``native_specialize_impl``):
pointers 16-byte aligned, integers at the real shape's sizes and strides for contiguous tensors
(1 becomes a constexpr, multiples of 16 get divisibility hints), so the GEMM's pipelining and
vectorisation, and hence its shared memory, match a real launch. Spill bytes are ptxas -v's.

Coverage (shapes: InternVL2-8B = InternViT-300M, C = 1024, 32 x 32 patches per 448 px tile,
13 tiles, pixel shuffle r = 2, LLM width 4096, vocabulary 92553; InternViT-6B, C = 3200). Not
every constexpr combination is compiled: the run must stay near a minute on 2 CPU cores, and the
widest merge + LayerNorm backward tiles take ~10 s each (they spill). The rule: every shape the
targets use in bf16 with the heaviest flags, and the flag combinations and other dtypes at the
cheapest shape whose code paths are the same.

* merge + LayerNorm (``shuffle_merge_norm`` and ``compress_project``): forward and backward at
  C = 1024 and 3200, merge 1/2/4, bf16: avg (shuffle_merge_norm; backward with and without dx),
  dwconv (merge 2/4, with/without merge bias; backward with every gradient) and the conv path's
  plain LayerNorm (identity geometry, width 4096 and 12800). At C = 1024, merge 2: every
  dx/dmerge_weight/dmerge_bias/merge-bias combination of the dwconv backward, and fp16 / fp32.
* compress_project GEMM: conv forward (A gathered, with/without merge bias), conv dx (C
  scattered), conv dmerge_weight (B gathered) at merge 1/2/4; linear + GELU/tanh-GELU with and
  without storing the pre-activation; the GELU-derivative epilogue. bf16 at 13 tiles
  (``_gemm_config``'s 128 x 128 blocks); at one tile with merge 4 (its 64 x 64 blocks where
  M <= 64); fp16 and fp32 (DOT_F32) at 13 tiles, merge 4.
* fused_linear_distill (V = 92553, ``_meta``'s BLOCK_V = 4096, chunk from ``default_chunk``):
  each divergence x each label state (none; labels; + cross-entropy; + CE at T != 1) with the
  gradient and MEAN; the heaviest state without the gradient and with MEAN = False; int32
  labels; fp16 and fp32.
* tome_merge: match (bf16/fp16 native tl.dot, fp32 IEEE), merge and unmerge, each in bf16,
  fp16 and fp32, 1024 tokens, C = 1024.
* merged_attention: forward, delta, dK/dV, dQ and importance at head dims 64/96/128 (bf16,
  batched, causal, with bias), d = 128 varlen (no bias, not causal), fp16 and fp32 at d = 128.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
import types
import warnings
from dataclasses import dataclass, field

os.environ.pop("TRITON_INTERPRET", None)  # the launchers' helpers must take their GPU branches

import torch  # noqa: E402
import triton  # noqa: E402
from triton._C.libtriton import native_specialize_impl  # noqa: E402
from triton.backends.compiler import BaseBackend, GPUTarget  # noqa: E402
from triton.runtime.jit import MockTensor  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fcot_kernels._attention import AttnGeometry  # noqa: E402
from fcot_kernels._validation import ShuffleGeometry  # noqa: E402
from fcot_kernels.triton import compress_project as CP  # noqa: E402
from fcot_kernels.triton import fused_linear_distill as FLD  # noqa: E402
from fcot_kernels.triton import merged_attention as MA  # noqa: E402
from fcot_kernels.triton import shuffle_merge_norm as SMN  # noqa: E402
from fcot_kernels.triton import tome_merge as TOME  # noqa: E402

warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
triton.knobs.nvidia.dump_ptxas_log = True  # spill bytes come from ptxas -v, printed at compile time

TARGET = GPUTarget("cuda", 90, 32)  # H100: compute capability 9.0, 32-thread warps
H100_SMEM = 227 * 1024  # the most shared memory one block may use on an H100 SM
H100_SMS = 132
CUDA = torch.device("cuda")  # only its .type is read: no GPU needed
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
PTR = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.int32: "*i32", torch.int64: "*i64"}
DEFAULT_INT = 4096  # integer arguments not given per job: a size or stride that is a multiple of 16
SHORT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}

# Model shapes.
TILES, GRID, R = 13, 32, 2  # InternVL2: 12 tiles + thumbnail, 448 px / 14 px patches, scale 0.5
VIT_C = (1024, 3200)  # InternViT-300M (InternVL2-1B..8B), InternViT-6B (26B+)
LLM = 4096  # InternVL2-8B LLM width (mlp1: width -> 4096 -> 4096)
VOCAB = 92553  # InternLM2.5 vocabulary
FLD_TOKENS = 8192  # tokens per distillation batch (the launcher's chunk: default_chunk)
TOME_TOKENS, TOME_C = 1024, 1024
TOME_R = 256  # tokens merged away


@dataclass
class Job:
    op: str
    kernel: object  # triton JITFunction
    label: str
    ptrs: dict  # pointer argument -> torch dtype
    consts: dict
    options: dict
    scalars: dict = field(default_factory=dict)  # float scalars: name -> triton type
    ints: dict = field(default_factory=dict)  # integer arguments at the real shape (default DEFAULT_INT)

    @property
    def name(self) -> str:
        return f"{self.op} {self.kernel.__name__} [{self.label}]"


def _split(meta: dict) -> tuple[dict, dict]:
    """Launcher meta (constexprs + launch options) -> (constexprs, compile options)."""
    consts = dict(meta)
    opts = {k: consts.pop(k) for k in ("num_warps", "num_stages") if k in consts}
    return consts, opts


def _signature(job: Job) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attributes) as the JIT specialises a launch with these arguments:
    pointers 16-byte aligned (torch allocations are), an integer equal to 1 becomes a constexpr,
    one divisible by 16 gets a divisibility hint, i64 when it does not fit in i32."""
    sig, consts, attrs = {}, dict(job.consts), {}
    for i, name in enumerate(job.kernel.arg_names):
        if name in job.consts:
            sig[name] = "constexpr"
            continue
        if name in job.ptrs:
            arg = MockTensor(job.ptrs[name])  # data_ptr() 0: aligned
        elif name.endswith("_ptr"):
            raise KeyError(f"{job.name}: no dtype for pointer {name}")
        elif name in job.scalars:
            sig[name] = job.scalars[name]
            continue
        else:
            arg = job.ints.get(name, DEFAULT_INT)
        ty, attr = native_specialize_impl(BaseBackend, arg, False, True, True)
        sig[name] = ty
        if ty == "constexpr":
            consts[name] = attr
        elif attr:
            attrs[(i,)] = BaseBackend.parse_attr(attr)
    unknown = (set(job.consts) | set(job.ints) | set(job.scalars) | set(job.ptrs)) - set(job.kernel.arg_names)
    if unknown:
        raise KeyError(f"{job.name}: {sorted(unknown)} are not arguments of the kernel")
    return sig, consts, attrs


# ----------------------------------------------------------------------------- merge + LayerNorm


def _geom(channels: int, merge: int, tiles: int = TILES) -> ShuffleGeometry:
    return ShuffleGeometry(tiles, GRID, GRID, channels, R, merge)


def _ln_ints(geom: ShuffleGeometry) -> dict:
    """Integer arguments of the merge + LayerNorm kernels for a contiguous x (tiles, grid_h*grid_w, C)."""
    hw = geom.grid_h * geom.grid_w
    return dict(stride_xt=hw * geom.channels, stride_xn=geom.channels, stride_xc=1, tokens_out=geom.tokens_out,
                out_w=geom.out_grid[1], grid_w=geom.grid_w, C=geom.channels)


def _ln_fwd(op: str, label: str, geom: ShuffleGeometry, dtype, mode: int, has_mb: bool) -> Job:
    consts, opts = _split(SMN._ln_meta(geom))
    p = dict.fromkeys(("x_ptr", "mw_ptr", "mb_ptr", "w_ptr", "b_ptr", "h_ptr"), dtype)
    p.update(mean_ptr=torch.float32, rstd_ptr=torch.float32)
    return Job(op, SMN._merge_ln_fwd_kernel, f"{label} {SHORT[dtype]}", p,
               dict(MODE=mode, HAS_MB=has_mb, **consts), opts, {"eps": "fp32"}, _ln_ints(geom))


def _ln_bwd(op: str, label: str, geom: ShuffleGeometry, dtype, mode: int, has_mb: bool,
            dx: bool, dmw: bool, dmb: bool) -> Job:
    consts, opts = _split(SMN._ln_meta(geom))
    f32 = torch.float32
    p = dict.fromkeys(("x_ptr", "mw_ptr", "mb_ptr", "w_ptr", "dh_ptr"), dtype)
    # Gradients not asked for get the fp32 dgamma buffer as a dummy, as in merge_ln_backward.
    p.update(mean_ptr=f32, rstd_ptr=f32, dx_ptr=dtype if dx else f32, dw_ptr=f32, db_ptr=f32, dmw_ptr=f32, dmb_ptr=f32)
    flags = f"dx={int(dx)} dmw={int(dmw)} dmb={int(dmb)}"
    # merge_ln_backward's split of the rows on an H100 (_num_programs: 2 programs per SM).
    programs = max(1, min(geom.rows, 2 * H100_SMS))
    ints = dict(_ln_ints(geom), rows=geom.rows, rows_per_program=triton.cdiv(geom.rows, programs),
                grid_hw=geom.grid_h * geom.grid_w)
    return Job(op, SMN._merge_ln_bwd_kernel, f"{label} {flags} {SHORT[dtype]}", p,
               dict(MODE=mode, HAS_MB=has_mb, COMPUTE_DX=dx, COMPUTE_DMW=dmw, COMPUTE_DMB=dmb, **consts), opts,
               ints=ints)


def merge_ln_jobs() -> list[Job]:
    avg, dw = SMN.MODE_AVG, SMN.MODE_DWCONV
    jobs = []
    # Flag combinations and the other dtypes at the cheapest dwconv shape (the code paths are the
    # same at every shape; the widest tiles take ~10 s each to compile, as they spill).
    cheap = (VIT_C[0], 2)
    for (c, merge), dtype in itertools.product(itertools.product(VIT_C, (1, 2, 4)), (torch.bfloat16, torch.float16, torch.float32)):
        if dtype != torch.bfloat16 and (c, merge) != cheap:
            continue
        g = _geom(c, merge)
        lab = f"C={c} merge={merge}"
        # shuffle_merge_norm: avg merge, no merge bias; backward with and without dx.
        jobs.append(_ln_fwd("shuffle_merge_norm", f"avg {lab}", g, dtype, avg, False))
        for dx in (True, False):
            jobs.append(_ln_bwd("shuffle_merge_norm", f"avg {lab}", g, dtype, avg, False, dx, False, False))
        # compress_project mode="dwconv": learnable per-channel merge, optional merge bias.
        if merge > 1:
            for has_mb in (True, False):
                jobs.append(_ln_fwd("compress_project", f"dwconv mb={int(has_mb)} {lab}", g, dtype, dw, has_mb))
            flag_sets = [(dx_, dmw, dmb, mb) for dx_, dmw, dmb, mb in itertools.product((True, False), repeat=4)
                         if mb or not dmb]  # need_mb implies a merge bias
            if (c, merge) != cheap or dtype != torch.bfloat16:
                flag_sets = [(True, True, True, True)]
            for dx_, dmw, dmb, mb in flag_sets:
                jobs.append(_ln_bwd("compress_project", f"dwconv mb={int(mb)} {lab}", g, dtype, dw, mb, dx_, dmw, dmb))
        # compress_project mode="conv": LayerNorm of the conv output (identity geometry, R = 1).
        if merge == 1:
            ident = SMN.identity_geometry(TILES * g.tokens_out, g.width)
            lab_i = f"conv LN width={g.width}"
            jobs.append(_ln_fwd("compress_project", lab_i, ident, dtype, avg, False))
            for dx in (True, False):
                jobs.append(_ln_bwd("compress_project", lab_i, ident, dtype, avg, False, dx, False, False))
    return jobs


# ----------------------------------------------------------------------------- compress_project GEMM


def _gemm(label: str, M: int, N: int, K: int, dtype, geom: ShuffleGeometry | None = None, *, sa=(0, 0), sb=(0, 0),
          sc=(0, 0), gather=None, scatter=False, bias=False, act=CP.ACT_NONE, act_grad=False, pre=False) -> Job:
    """The arguments ``compress_project.gemm`` passes on a GPU; ``sa``/``sb``/``sc`` are the
    strides of A, B and C (unused, 0, for a gathered or scattered operand)."""
    consts, opts = _split(CP._gemm_config(M, N, K, CUDA))
    if geom is not None:
        hw = geom.grid_h * geom.grid_w
        g = (geom.tokens_out, geom.out_grid[1], geom.grid_w, geom.channels, geom.width)
        us = (hw * geom.channels, geom.channels, 1) if gather or scatter else (0, 0, 0)
    else:
        g, us = (1, 1, 1, 1, 1), (0, 0, 0)
    ints = dict(zip(("M", "N", "K", "stride_am", "stride_ak", "stride_bk", "stride_bn", "stride_cm", "stride_cn",
                     "tokens_out", "out_w", "grid_w", "C", "W", "stride_ut", "stride_un", "stride_uc"),
                    (M, N, K, *sa, *sb, *sc, *g, *us)))
    r, (mh, mw) = (geom.r, geom.window) if geom is not None else (1, (1, 1))
    consts.update(R=r, MH=mh, MW=mw, A_GATHER=gather == "a", B_GATHER=gather == "b", C_SCATTER=scatter,
                  HAS_BIAS=bias, ACT=act, ACT_GRAD=act_grad, STORE_PRE=pre, DOT_F32=dtype == torch.float32)
    p = dict.fromkeys(("a_ptr", "b_ptr", "c_ptr", "bias_ptr", "aux_ptr", "pre_ptr"), dtype)
    blocks = f"{consts['BLOCK_M']}x{consts['BLOCK_N']}x{consts['BLOCK_K']}"
    return Job("compress_project", CP._gemm_kernel, f"{label} M={M} N={N} K={K} {blocks} {SHORT[dtype]}", p, consts, opts,
               ints=ints)


def gemm_jobs() -> list[Job]:
    jobs = []
    c = VIT_C[0]  # InternVL2-8B
    for dtype, tiles, merges in ((torch.bfloat16, TILES, (1, 2, 4)), (torch.bfloat16, 1, (4,)),
                                 (torch.float16, TILES, (4,)), (torch.float32, TILES, (4,))):
        for merge in merges:
            g = _geom(c, merge, tiles)
            rows, w, k = g.rows, g.width, g.merge * g.width
            lab = f"merge={merge}"
            # conv_forward: z = U @ merge_weight.T + merge_bias (A gathered from x).
            for bias in (True, False) if dtype == torch.bfloat16 and tiles == TILES else (True,):
                # B = merge_weight.t(), merge_weight (W, merge*W) contiguous.
                jobs.append(_gemm(f"conv fwd bias={int(bias)} {lab}", rows, w, k, dtype, g, sb=(1, k), sc=(w, 1),
                                  gather="a", bias=bias))
            # conv_backward: dx = dz @ merge_weight scattered; dmerge_weight = dz.T @ U (B gathered).
            jobs.append(_gemm(f"conv dx {lab}", rows, k, w, dtype, g, sa=(w, 1), sb=(k, 1), scatter=True))
            jobs.append(_gemm(f"conv dmw {lab}", w, k, rows, dtype, g, sa=(1, w), sc=(k, 1), gather="b"))
        rows = _geom(c, merges[-1], tiles).rows
        for act, pre in itertools.product(CP.ACT_CODES, (True, False)):
            if (dtype != torch.bfloat16 or tiles != TILES) and (act, pre) != ("gelu", True):
                continue
            # linear_act: a = act(h @ w1.T + b1), the pre-activation stored when training.
            width = _geom(c, 1).width  # B = w1.t(), w1 (LLM, width) contiguous
            jobs.append(_gemm(f"linear {act} pre={int(pre)}", rows, LLM, width, dtype, sa=(width, 1), sb=(1, width),
                              sc=(LLM, 1), bias=True, act=CP.ACT_CODES[act], pre=pre))
        for act in CP.ACT_CODES:
            if (dtype != torch.bfloat16 or tiles != TILES) and act != "gelu":
                continue
            # linear_act_grad: du = (dy @ w2) * act'(u).
            jobs.append(_gemm(f"linear grad {act}", rows, LLM, LLM, dtype, sa=(LLM, 1), sb=(LLM, 1), sc=(LLM, 1),
                              act=CP.ACT_CODES[act], act_grad=True))
    return jobs


# ----------------------------------------------------------------------------- fused_linear_distill


def _fld(dtype, div: str, labels, ce: bool, ce_lse: bool, mean: bool, grad: bool) -> Job:
    consts, opts = _split(FLD._meta(VOCAB, CUDA))
    consts.update(DIV=FLD.DIV_CODES[div], HAS_LABELS=labels is not None, HAS_CE=ce, CE_LSE=ce_lse,
                  MEAN=mean, COMPUTE_GRAD=grad)
    p = dict(zs_ptr=dtype, zt_ptr=dtype, labels_ptr=labels if labels is not None else torch.float32,
             count_ptr=torch.int64, loss_ptr=torch.float32)
    scalars = dict.fromkeys(("inv_t", "kl_scale", "ce_scale", "beta", "log_beta", "log_1mbeta"), "fp32")
    lab = "labels=" + ("none" if labels is None else str(labels).replace("torch.", ""))
    label = f"{div} {lab} ce={int(ce)} ce_lse={int(ce_lse)} mean={int(mean)} grad={int(grad)} V={VOCAB} {SHORT[dtype]}"
    chunk = FLD.default_chunk(FLD_TOKENS, VOCAB)
    ints = dict(R=chunk, V=VOCAB, stride_s=VOCAB, stride_t=VOCAB, ignore_index=-100)
    return Job("fused_linear_distill", FLD._fld_kernel, label, p, consts, opts, scalars, ints)


def fld_jobs() -> list[Job]:
    # (labels, HAS_CE, CE_LSE): CE needs labels (checked by the op); CE_LSE is CE at T != 1.
    label_states = [(None, False, False), (torch.int64, False, False), (torch.int64, True, False), (torch.int64, True, True)]
    jobs = []
    for div in FLD.DIV_CODES:
        # Every label state with the gradient; without it (the no-grad forward) and with
        # MEAN = False (reduction "sum") the heaviest state only: each drops code, adds none.
        for labels, ce, ce_lse in label_states:
            jobs.append(_fld(torch.bfloat16, div, labels, ce, ce_lse, True, True))
        jobs.append(_fld(torch.bfloat16, div, torch.int64, True, True, True, False))
        jobs.append(_fld(torch.bfloat16, div, torch.int64, True, True, False, True))
        for dtype in (torch.float16, torch.float32):
            jobs.append(_fld(dtype, div, torch.int64, True, True, True, True))
    jobs.append(_fld(torch.bfloat16, "forward_kl", torch.int32, True, True, True, True))
    return jobs


# ----------------------------------------------------------------------------- tome_merge


def tome_jobs() -> list[Job]:
    jobs = []
    f32, i64 = torch.float32, torch.int64
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        t = types.SimpleNamespace(device=CUDA, dtype=dtype)  # what the helpers read of a tensor
        consts, opts = _split(TOME._match_meta(t))
        lab = f"tokens={TOME_TOKENS} C={TOME_C} {SHORT[dtype]}"
        jobs.append(Job("tome_merge", TOME._tome_match_kernel, f"native_dot={int(consts['NATIVE_DOT'])} {lab}",
                        dict(m_ptr=dtype, score_ptr=f32, index_ptr=i64), consts, opts, {"eps": "fp32"},
                        dict(stride_mb=TOME_TOKENS * TOME_C, stride_mt=TOME_C, stride_mc=1, protected=0,
                             n_a=TOME_TOKENS // 2, n_b=TOME_TOKENS // 2, C=TOME_C)))
        block_c = TOME._block_c(t, TOME_C)
        opts = dict(num_warps=4 if block_c >= 512 else 1)  # as merge() / unmerge() launch it
        sizes = dict(tokens=TOME_TOKENS, tokens_out=TOME_TOKENS - TOME_R, C=TOME_C)
        jobs.append(Job("tome_merge", TOME._tome_merge_kernel, lab,
                        dict(x_ptr=dtype, size_ptr=f32, order_ptr=i64, offsets_ptr=i64, out_ptr=dtype, out_size_ptr=f32),
                        dict(BLOCK_C=block_c), opts,
                        ints=dict(stride_xb=TOME_TOKENS * TOME_C, stride_xt=TOME_C, stride_xc=1, **sizes)))
        jobs.append(Job("tome_merge", TOME._tome_unmerge_kernel, lab,
                        dict(dy_ptr=dtype, size_ptr=f32, out_size_ptr=f32, source_ptr=i64, dx_ptr=dtype),
                        dict(BLOCK_C=block_c), opts, ints=sizes))
    return jobs


# ----------------------------------------------------------------------------- merged_attention


def _used(kernel, args: dict) -> dict:
    return {k: v for k, v in args.items() if k in kernel.arg_names}


def _attention_ints(geom: AttnGeometry) -> dict:
    """Sizes and strides of contiguous (B, L, H, D) or packed (total, H, D) q/k/v/out/dO/dK."""
    ints = dict(seqlen_q=geom.seqlen_q, seqlen_k=geom.seqlen_k, total_q=geom.total_q, total_k=geom.total_k,
                heads_q=geom.heads_q, heads_kv=geom.heads_kv, group=geom.group, head_dim=geom.head_dim, n_rows=16,
                stride_bias_b=0 if geom.varlen else geom.seqlen_k)
    for t, heads, seq in (("q", geom.heads_q, geom.seqlen_q), ("o", geom.heads_q, geom.seqlen_q),
                          ("do", geom.heads_q, geom.seqlen_q), ("k", geom.heads_kv, geom.seqlen_k),
                          ("v", geom.heads_kv, geom.seqlen_k), ("dk", geom.heads_kv, geom.seqlen_k)):
        token = heads * geom.head_dim
        ints[f"stride_{t}b"] = 0 if geom.varlen else seq * token
        ints[f"stride_{t}{'n' if t in ('k', 'v', 'dk') else 'm'}"] = token
        ints[f"stride_{t}h"] = geom.head_dim
    return ints


def attention_jobs() -> list[Job]:
    jobs = []
    # (dtype, head dim, varlen): batched runs are causal with a key bias, varlen ones neither.
    variants = [(torch.bfloat16, d, False) for d in (64, 96, 128)]
    variants += [(torch.bfloat16, 128, True), (torch.float16, 128, False), (torch.float32, 128, False)]
    data = ("q_ptr", "k_ptr", "v_ptr", "out_ptr", "do_ptr", "dq_ptr", "dk_ptr", "dv_ptr")
    f32 = ("bias_ptr", "lse_ptr", "delta_ptr", "dbias_ptr", "imp_ptr")
    for dtype, head_dim, varlen in variants:
        geom = AttnGeometry(1, 32, 8, head_dim, 8192, 8192, varlen, 8192, 8192)
        ptrs = {**dict.fromkeys(data, dtype), **dict.fromkeys(f32, torch.float32),
                **dict.fromkeys(("cu_q_ptr", "cu_k_ptr", "rows_ptr"), torch.int32)}
        scalars = dict.fromkeys(("qk_scale", "scale", "inv_count"), "fp32")
        block_d = MA._block_d(head_dim)
        flags = dict(HAS_BIAS=not varlen, CAUSAL=not varlen, VARLEN=varlen,
                     PRECISION=MA._precision(torch.empty(0, dtype=dtype)), BLOCK_D=block_d)
        lab = f"d={head_dim} varlen={int(varlen)} {SHORT[dtype]}"
        ints = _attention_ints(geom)
        for kernel, kind, extra in ((MA._fwd_kernel, "fwd", {}), (MA._bwd_dkdv_kernel, "dkdv", {"BIAS_GRAD": not varlen}),
                                    (MA._bwd_dq_kernel, "dq", {}), (MA._importance_kernel, "importance", {"BLOCK_R": 16})):
            consts, opts = _split(MA._config(kind, geom, dtype))
            jobs.append(Job("merged_attention", kernel, lab, _used(kernel, ptrs), {**flags, **extra, **consts}, opts,
                            _used(kernel, scalars), _used(kernel, ints)))
        # merged_attention.backward launches the delta kernel with BLOCK_M = 64 on a GPU.
        jobs.append(Job("merged_attention", MA._bwd_delta_kernel, lab, _used(MA._bwd_delta_kernel, ptrs),
                        dict(BLOCK_M=64, BLOCK_D=block_d), {}, ints=_used(MA._bwd_delta_kernel, ints)))
    return jobs


def all_jobs() -> list[Job]:
    return merge_ln_jobs() + gemm_jobs() + fld_jobs() + tome_jobs() + attention_jobs()


# ----------------------------------------------------------------------------- compile + report


def _usage(cubin: bytes) -> tuple[int, int]:
    """(registers, stack bytes) per thread from the cubin, via Triton's bundled cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(cubin)
        fh.flush()
        out = subprocess.run([os.path.join(BIN, "cuobjdump"), "-res-usage", fh.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else (-1, -1)


def _spills(ptx: str) -> tuple[int, int]:
    """(spill store, spill load) bytes, from ptxas -v with the flags Triton uses (only run when
    the kernel has a stack frame: without one nothing can spill)."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as fh:
            fh.write(ptx)
        cmd = [get_ptxas(TARGET.arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2", "--gpu-name=sm_90a", src,
               "-o", os.path.join(d, "k.o")]
        log = subprocess.run(cmd, capture_output=True, text=True).stderr
    return _parse_spills(log) or (-1, -1)


def _parse_spills(log: str) -> tuple[int, int] | None:
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return (int(m.group(1)), int(m.group(2))) if m else None


JOBS: list[Job] = []


def _compile(index: int) -> tuple[int, str, dict]:
    job = JOBS[index]
    start = time.perf_counter()
    try:
        sig, consts, attrs = _signature(job)
        src = ASTSource(job.kernel, sig, constexprs=consts, attrs=attrs)
        log = io.StringIO()
        with contextlib.redirect_stdout(log):  # Triton prints ptxas -v's log (on a cache miss)
            compiled = triton.compile(src, target=TARGET, options=job.options)
        regs, stack = _usage(compiled.asm["cubin"])
        spill = _parse_spills(log.getvalue()) if stack > 0 else (0, 0)
        if spill is None:  # compiled earlier: cached, no log; run ptxas on the PTX again
            spill = _spills(compiled.asm["ptx"])
        res = dict(shared=compiled.metadata.shared, regs=regs, stack=stack, spill_st=spill[0], spill_ld=spill[1],
                   warps=compiled.metadata.num_warps, stages=compiled.metadata.num_stages)
    except Exception as err:  # report every kernel, then fail
        msg = str(err).strip().splitlines()
        res = dict(error=f"{type(err).__name__}: " + " | ".join(ln.strip() for ln in msg[-12:] if ln.strip()))
    res["seconds"] = time.perf_counter() - start
    return index, job.name, res


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="parallel compiles")
    parser.add_argument("--filter", default="", help="only configurations whose name contains this")
    parser.add_argument("--list", action="store_true", help="list the configurations, compile nothing")
    args = parser.parse_args(argv)
    JOBS.extend(j for j in all_jobs() if args.filter in j.name)
    if args.list:
        print("\n".join(j.name for j in JOBS))
        return 0
    start = time.perf_counter()
    if args.jobs > 1:
        with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
            results = sorted(pool.imap_unordered(_compile, range(len(JOBS))))
    else:
        results = [_compile(i) for i in range(len(JOBS))]
    failed = spilled = 0
    for _, name, res in results:
        if "error" in res:
            failed += 1
            print(f"FAIL  {name}: compile error: {res['error']}")
            continue
        line = (f"shared {res['shared'] / 1024:6.1f} KiB  regs {res['regs']:3d}  stack {res['stack']:5d}  "
                f"spill {res['spill_st']}/{res['spill_ld']} B  w{res['warps']} s{res['stages']}  {res['seconds']:4.1f}s  {name}")
        if res["shared"] > H100_SMEM:
            failed += 1
            print(f"FAIL  {line}  EXCEEDS the H100's {H100_SMEM // 1024} KiB of shared memory")
        elif res["spill_st"] or res["spill_ld"]:
            spilled += 1
            print(f"WARN  {line}  (register spills)")
        else:
            print(f"ok    {line}")
    print(f"{len(results)} configurations compiled for sm_90 in {time.perf_counter() - start:.0f} s: "
          f"{failed} failed, {spilled} spill (warning only)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
