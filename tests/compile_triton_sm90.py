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

    python tests/compile_triton_sm90.py [--jobs N] [--filter SUBSTRING]
    PYTHONPATH=.venv/triton-gpu python tests/compile_triton_sm90.py --no-cuda   # the GPU machine's Triton 3.6

The compiler decides what the rules see (Triton 3.6 could not prove the gathered GEMM operand
16-byte aligned where 3.9 could), so CI runs it under both (``make triton-gpu``); each Triton's
table has its own section in docs/kernels.md, and ``ALLOW_ONLY_UNDER`` scopes an entry to the
versions that need it.

Exit status 1 if any kernel fails to compile, needs more shared memory than an H100 SM offers
(227 KiB), or breaks a performance rule without a reason in ``ALLOW`` (see "performance rules"
below: spills, 2-byte global accesses, synchronously fed or ``mma.sync`` tensor-core loops,
occupancy below the launcher's assumption); also the CUDA C++ kernels of ``csrc/`` are read from
their sm_90 SASS (``--no-cuda`` skips them), at launch configurations parsed from csrc/'s own
sources (``csrc_launch_config``: constants, ``__launch_bounds__``, thread-count clamps). ``--write-docs`` writes the table into
docs/kernels.md, ``--check-docs`` fails when the committed table differs.

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
  M <= 64); fp16 and fp32 (DOT_F32) at 13 tiles, merge 4; the conv forward once more with an x
  the launcher cannot prove 16-byte aligned (``U_ALIGN = 1``, the unhinted path).
* fused_linear_distill (V = 92553, ``_meta``'s BLOCK_V = 4096, chunk from ``default_chunk``):
  each divergence x each label state (none; labels; + cross-entropy; + CE at T != 1) with the
  gradient and MEAN; the heaviest state without the gradient and with MEAN = False; int32
  labels; fp16 and fp32.
* tome_merge: the row scaling + norms pass, match (bf16/fp16 native tl.dot, fp32 IEEE), merge
  and unmerge, each in bf16, fp16 and fp32, 1024 tokens, C = 1024.
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
import shutil
import subprocess
import sys
import tempfile
import time
import types
import warnings
from dataclasses import dataclass, field

os.environ.pop("TRITON_INTERPRET", None)  # the launchers' helpers must take their GPU branches
# Run as a script, sys.path[0] is tests/, whose fcot_kernels/ (the tests' package) would shadow
# the repository's: put this checkout's root first so the kernels checked are the ones beside it.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [os.path.dirname(_HERE)] + [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

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
    assumed_blocks: int = 1  # programs per SM the launcher's grid is sized for (persistent grids)

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
    consts, opts = _split(SMN._ln_meta(geom, backward=True))
    f32 = torch.float32
    p = dict.fromkeys(("x_ptr", "mw_ptr", "mb_ptr", "w_ptr", "dh_ptr"), dtype)
    # Gradients not asked for get the fp32 dgamma buffer as a dummy, as in merge_ln_backward.
    p.update(mean_ptr=f32, rstd_ptr=f32, dx_ptr=dtype if dx else f32, dw_ptr=f32, db_ptr=f32, dmw_ptr=f32, dmb_ptr=f32)
    flags = f"dx={int(dx)} dmw={int(dmw)} dmb={int(dmb)}"
    # merge_ln_backward's split of the rows on an H100 (_num_programs: its programs per SM).
    per_sm = SMN.bwd_programs_per_sm(geom)
    programs = max(1, min(geom.rows, per_sm * H100_SMS))
    ints = dict(_ln_ints(geom), rows=geom.rows, rows_per_program=triton.cdiv(geom.rows, programs),
                grid_hw=geom.grid_h * geom.grid_w)
    prefetch = " prefetch" if SMN.bwd_prefetch(geom, mode == SMN.MODE_DWCONV) else ""
    return Job(op, SMN._merge_ln_bwd_kernel, f"{label} {flags}{prefetch} {SHORT[dtype]}", p,
               dict(MODE=mode, HAS_MB=has_mb, COMPUTE_DX=dx, COMPUTE_DMW=dmw, COMPUTE_DMB=dmb,
                    PREFETCH=SMN.bwd_prefetch(geom, mode == SMN.MODE_DWCONV), **consts), opts,
               ints=ints, assumed_blocks=per_sm)


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
          sc=(0, 0), gather=None, scatter=False, bias=False, act=CP.ACT_NONE, act_grad=False, pre=False,
          aligned=True) -> Job:
    """The arguments ``compress_project.gemm`` passes on a GPU; ``sa``/``sb``/``sc`` are the
    strides of A, B and C (unused, 0, for a gathered or scattered operand); ``aligned=False``:
    x at an address that is not a 16-byte multiple (the launcher's unhinted fallback)."""
    consts, opts = _split(CP._gemm_config(M, N, K, CUDA, dtype))
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
                  HAS_BIAS=bias, ACT=act, ACT_GRAD=act_grad, STORE_PRE=pre, DOT_F32=dtype == torch.float32,
                  SEG_BLOCKS=geom is not None and geom.channels % consts["BLOCK_K"] == 0
                  and geom.channels % consts["BLOCK_N"] == 0)
    # The launcher's alignment check (compress_project._u_align) on x / dx as they are at the target.
    u = types.SimpleNamespace(element_size=lambda: dtype.itemsize, data_ptr=lambda: 0 if aligned else 2)
    consts["U_ALIGN"] = (CP._u_align(u if gather or scatter else None, us, geom) if consts["SEG_BLOCKS"] else 1)
    p = dict.fromkeys(("a_ptr", "b_ptr", "c_ptr", "bias_ptr", "aux_ptr", "pre_ptr"), dtype)
    blocks = f"{consts['BLOCK_M']}x{consts['BLOCK_N']}x{consts['BLOCK_K']}"
    return Job("compress_project", CP._gemm_kernel, f"{label} M={M} N={N} K={K} {blocks} {SHORT[dtype]}", p, consts, opts,
               ints=ints, assumed_blocks=CP.gemm_blocks_per_sm(dtype, act != CP.ACT_NONE))


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
            if dtype == torch.bfloat16 and tiles == TILES and merge == 2:
                # x at an odd address (a view): no alignment hints, the correct unhinted path.
                jobs.append(_gemm(f"conv fwd unaligned-x {lab}", rows, w, k, dtype, g, sb=(1, k), sc=(w, 1),
                                  gather="a", bias=True, aligned=False))
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


def _fld(dtype, div: str, labels, ce: bool, ce_lse: bool, mean: bool, grad: bool, kl: bool = True) -> Job:
    consts, opts = _split(FLD._meta(VOCAB, CUDA))
    consts.update(DIV=FLD.DIV_CODES[div], HAS_KL=kl, HAS_LABELS=labels is not None, HAS_CE=ce, CE_LSE=ce_lse,
                  MEAN=mean, COMPUTE_GRAD=grad)
    p = dict(zs_ptr=dtype, zt_ptr=dtype, labels_ptr=labels if labels is not None else torch.float32,
             count_ptr=torch.int64, loss_ptr=torch.float32)
    scalars = dict.fromkeys(("inv_t", "kl_scale", "ce_scale", "beta", "log_beta", "log_1mbeta"), "fp32")
    lab = "labels=" + ("none" if labels is None else str(labels).replace("torch.", ""))
    label = f"{div if kl else 'ce-only'} {lab} ce={int(ce)} ce_lse={int(ce_lse)} mean={int(mean)} grad={int(grad)} V={VOCAB} {SHORT[dtype]}"
    chunk = FLD.default_chunk(FLD_TOKENS, VOCAB)
    vp = FLD.padded_width(VOCAB)  # the launcher's padded row stride of the chunk logits buffers
    ints = dict(R=chunk, V=VOCAB, VP=FLD.padded_width(VOCAB, 16), stride_s=vp, stride_t=vp, ignore_index=-100)
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
    # Cross-entropy only (kl_weight=0, stage 2): the launcher's one specialisation (DIV=0, CE at
    # its own T = 1 log-sum-exp), with and without the gradient, in each dtype.
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        jobs.append(_fld(dtype, "forward_kl", torch.int64, True, True, True, True, kl=False))
    jobs.append(_fld(torch.bfloat16, "forward_kl", torch.int64, True, True, True, False, kl=False))
    return jobs


# ----------------------------------------------------------------------------- tome_merge


def tome_jobs() -> list[Job]:
    jobs = []
    f32, i64 = torch.float32, torch.int64
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        t = types.SimpleNamespace(device=CUDA, dtype=dtype)  # what the helpers read of a tensor
        consts, opts = _split(TOME._match_meta(t))
        lab = f"tokens={TOME_TOKENS} C={TOME_C} {SHORT[dtype]}"
        rc, ro = _split(TOME._rows_meta(t))
        jobs.append(Job("tome_merge", TOME._tome_rows_kernel, lab, dict(m_ptr=dtype, ms_ptr=dtype, inv_ptr=f32),
                        dict(SCALE=dtype != torch.float16, **rc), ro, {"eps": "fp32"},
                        dict(stride_mb=TOME_TOKENS * TOME_C, stride_mt=TOME_C, stride_mc=1, tokens=TOME_TOKENS,
                             C=TOME_C)))
        blocks = f"{consts['BLOCK_A']}x{consts['BLOCK_B']}x{consts['BLOCK_C']}"
        jobs.append(Job("tome_merge", TOME._tome_match_kernel, f"native_dot={int(consts['NATIVE_DOT'])} {blocks} {lab}",
                        dict(m_ptr=dtype, inv_ptr=f32, score_ptr=f32, index_ptr=i64), consts, opts, {},
                        dict(tokens=TOME_TOKENS, protected=0, n_a=TOME_TOKENS // 2, n_b=TOME_TOKENS // 2, C=TOME_C)))
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


# ----------------------------------------------------------------------------- performance rules
#
# Each compiled kernel is read for what predicts its speed on an H100 (nothing here runs it):
# spills (ptxas), the widths of its global accesses and tensor-core instructions (PTX), where
# its tensor-core operands come from (TTGIR), and how many of its blocks fit an SM (registers
# and shared memory against the SM's budget). A rule a kernel cannot pass yet is named in ALLOW
# with the reason; the reason is printed in the table's "why" column.

SM_REGS, SM_SMEM, SM_WARPS, SM_BLOCKS = 65536, 228 * 1024, 64, 32  # per H100 SM
BLOCK_SMEM_RESERVED = 1024  # the driver reserves 1 KiB of shared memory per block
RULES = ("spill", "scalar", "sync-operand", "mma.sync", "occupancy")

# (substring of the configuration name, rule) -> why the kernel cannot pass the rule yet.
ALLOW: dict[tuple[str, str], str] = {
    # merge + LayerNorm backward at the InternViT-6B width (C = 3200, W = 12800) and the dwconv
    # merge-4 backward with every gradient: one program keeps the whole row tile plus its
    # dgamma/dbeta(/dmerge_bias) accumulators in registers; at 16 warps (the most a block has)
    # that is more than 128 registers per thread. The ways out cost bytes: a segment-major
    # two-sweep order re-reads x and dy from HBM (2x the traffic of a memory-bound kernel), and
    # accumulators in per-program global rows add 16 B of L2 traffic per element; the spills
    # stay in L1-resident local memory. Which is faster is for a GPU to measure.
    ("_merge_ln_bwd_kernel [avg C=3200", "spill"): "W=12800 row tile + accumulators > 128 regs at 16 warps; the no-spill layouts cost HBM/L2 bytes (see ALLOW)",
    ("_merge_ln_bwd_kernel [conv LN width=12800", "spill"): "W=12800 row tile + accumulators > 128 regs at 16 warps; the no-spill layouts cost HBM/L2 bytes (see ALLOW)",
    ("_merge_ln_bwd_kernel [dwconv mb=1 C=3200", "spill"): "W=12800 row tile + accumulators > 128 regs at 16 warps; the no-spill layouts cost HBM/L2 bytes (see ALLOW)",
    ("_merge_ln_bwd_kernel [dwconv mb=1 C=1024 merge=4 dx=1 dmw=1 dmb=1", "spill"):
        "4 members x (x, dmerge_weight) re-reads + 3 accumulators: 128 B over 128 regs; merge 2 (the target) passes",
    ("_fld_kernel [forward_kl labels=int64 ce=1 ce_lse=1 mean=1 grad=0", "spill"):
        "ptxas keeps 80 regs (3 blocks/SM) and spills 12 B of scalars once per row, not per element",
    ("_fld_kernel [reverse_kl labels=int64 ce=1 ce_lse=1 mean=1 grad=0", "spill"):
        "ptxas keeps 80 regs (3 blocks/SM) and spills 12 B of scalars once per row, not per element",
    # An x the launcher cannot prove 16-byte aligned (compress_project._u_align) takes the
    # unhinted path: correct for any address and strides; Triton 3.6 then gathers 2 bytes at a
    # time (3.9 still proves the alignment it can; ALLOW_ONLY_UNDER scopes these to 3.6-3.8).
    ("_gemm_kernel [conv fwd unaligned-x", "scalar"): "x not 16-byte aligned (an offset view): the unhinted correctness path",
    ("_gemm_kernel [conv fwd unaligned-x", "sync-operand"): "x not 16-byte aligned (an offset view): the unhinted correctness path",
    ("_gemm_kernel [conv fwd unaligned-x", "occupancy"): "x not 16-byte aligned (an offset view): the unhinted correctness path",
    # fp32 attention is the tests' exact path, not a speed target: IEEE fp32 dots run on CUDA
    # cores (no tensor-core fp32); its dK/dV, with two BLOCK_N x D fp32 accumulators next to the
    # FMA dots' operands, spills at every tile tried (16-32 x 16-32, 4-8 warps).
    ("merged_attention _bwd_dkdv_kernel [d=128 varlen=0 fp32]", "spill"): "fp32 (IEEE) is a correctness path, not a speed target",
    # The CUDA ToMe match is the cross-check of the Triton one (wgmma + cp.async, which `auto`
    # runs by default: fcot_kernels/dispatch_table.json); it stays a CUDA-core kernel.
    ("cuda tome_match_kernel", "scalar"): "cross-check backend; auto runs the Triton match (wgmma) unless measured slower",
    ("cuda tome_match_kernel", "sync-operand"): "cross-check backend; auto runs the Triton match (wgmma) unless measured slower",
    ("cuda tome_match_kernel", "mma.sync"): "CUDA-core fp32 FMA; auto runs the Triton match (wgmma) unless measured slower",
}

# Entries needed only under some Tritons (version prefixes): the stale-entry check (an ALLOW entry
# that matches no broken rule fails a full run) skips them under the other versions, since CI runs
# the gate under both the GPU machine's Triton (3.6) and the newest.
ALLOW_ONLY_UNDER: dict[tuple[str, str], tuple[str, ...]] = {
    ("_gemm_kernel [conv fwd unaligned-x", "scalar"): ("3.6", "3.7", "3.8"),
    ("_gemm_kernel [conv fwd unaligned-x", "sync-operand"): ("3.6", "3.7", "3.8"),
    ("_gemm_kernel [conv fwd unaligned-x", "occupancy"): ("3.6", "3.7", "3.8"),
}


def _allow_applies(key: tuple[str, str]) -> bool:
    versions = ALLOW_ONLY_UNDER.get(key)
    return versions is None or triton.__version__.startswith(versions)


_GLOBAL = re.compile(r"\b(ld|st)\.global((?:\.[A-Za-z0-9_:]+)*)")
_WIDTH = {"b8": 1, "u8": 1, "s8": 1, "b16": 2, "u16": 2, "s16": 2, "f16": 2, "bf16": 2, "b32": 4, "u32": 4,
          "s32": 4, "f32": 4, "b64": 8, "u64": 8, "s64": 8, "f64": 8}


def _ptx_accesses(ptx: str) -> list[tuple[str, int]]:
    """(ld|st, bytes) of every global load/store instruction in the PTX (static count)."""
    out = []
    for kind, mods in _GLOBAL.findall(ptx):
        parts = mods.strip(".").split(".")
        vec = next((int(p[1:]) for p in parts if re.fullmatch(r"v[248]", p)), 1)
        size = next((_WIDTH[p] for p in reversed(parts) if p in _WIDTH), 0)
        out.append((kind, vec * size))
    return out


_SSA = re.compile(r"^\s*(%[\w.]+)(?::\d+)?\s*=\s*([\w.]+)\s*(.*)$")
_PASS_THROUGH = ("ttg.local_alloc", "ttg.convert_layout", "tt.fp_to_fp", "arith.truncf", "arith.extf", "tt.trans",
                 "ttg.memdesc_trans", "ttg.local_load", "ttg.memdesc_reinterpret")


def _dot_operands(ttgir: str) -> list[tuple[str, int, list[str]]]:
    """(dot op, M, [source of each of the two operands]) for every dot in the TTGIR: an operand's
    source is "async" (a shared-memory buffer filled by cp.async/TMA), "load" (a plain tl.load
    inside the dot's own loop: the MMA waits on it every iteration), "hoisted" (loaded once,
    before the loop, like attention's Q) or "regs" (computed in registers, like attention's P)."""
    defs, loop_of = {}, {}
    loops: list[tuple[int, int]] = []  # (indent, line number) of the enclosing scf.for ops
    for no, line in enumerate(ttgir.splitlines()):
        indent = len(line) - len(line.lstrip())
        while loops and indent <= loops[-1][0] and line.lstrip().startswith("}"):
            loops.pop()
        m = _SSA.match(line)
        if m:
            defs[m.group(1)] = (m.group(2), m.group(3))
            loop_of[m.group(1)] = loops[-1][1] if loops else -1
        if re.search(r"=\s*scf\.for\b", line):
            loops.append((indent, no))

    def source(name: str, loop: int, depth: int = 0) -> str:
        name = name.split("#")[0]
        if name not in defs or depth > 8:
            return "async" if name.startswith("%arg") else "regs"  # loop-carried buffer
        op, rest = defs[name]
        if op == "tt.load":
            return "load" if loop_of[name] == loop and loop != -1 else "hoisted"
        if op in ("ttg.async_copy_global_to_local", "ttng.async_tma_copy_global_to_local", "tt.descriptor_load",
                  "ttg.memdesc_index", "ttg.memdesc_subview", "ttg.memdesc_subslice"):
            return "async"
        if op in _PASS_THROUGH:
            args = re.findall(r"%[\w.#]+", rest)
            return source(args[0], loop, depth + 1) if args else "regs"
        return "regs"

    dots = []
    for name, (op, rest) in defs.items():
        if op in ("tt.dot", "ttng.warp_group_dot"):
            args = re.findall(r"%[\w.#]+", rest)[:2]
            shape = re.search(r"->\s*tensor<(\d+)x(\d+)x", rest)
            dots.append((op, int(shape.group(1)) if shape else 0, [source(a, loop_of[name]) for a in args]))
    return dots


def _blocks_per_sm(regs: int, warps: int, smem: int) -> int:
    """Resident blocks per H100 SM: registers (allocated per warp in units of 256), shared memory
    (plus the 1 KiB per-block reserve), warps and the 32-block cap."""
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = (SM_REGS // per_warp) // warps
    by_smem = SM_SMEM // (smem + BLOCK_SMEM_RESERVED)
    return max(0, min(by_regs, by_smem, SM_WARPS // warps, SM_BLOCKS))


def _analyse(name: str, dtype_bytes: int, assumed: int, ptx: str, ttgir: str, res: dict) -> dict:
    acc = _ptx_accesses(ptx)
    mma = sorted({"wgmma" if "wgmma.mma_async" in ptx else "", "mma.sync" if re.search(r"\bmma\.sync", ptx) else ""} - {""})
    dots = _dot_operands(ttgir) if ttgir else []
    res.update(
        vec=max((b for _, b in acc), default=0),
        narrow=sum(1 for _, b in acc if 0 < b <= 2) if dtype_bytes == 2 else 0,
        mma="+".join(mma) or ("fma" if dots else "-"),
        # The narrowest wgmma tile (m64nNk16): a 16/32-wide N issues 4-8x the instructions per FLOP.
        wgmma_n=min((int(n) for n in re.findall(r"wgmma\.mma_async\.sync\.aligned\.m64n(\d+)k", ptx)), default=0),
        async_copies=len(re.findall(r"\bcp\.async\.(?:ca|cg|bulk)", ptx)),
        sync_operands=sum(src.count("load") for _, _, src in dots),
        mma_sync_dots=sum(1 for op, _, _ in dots if op == "tt.dot") if dtype_bytes == 2 else 0,
        blocks=_blocks_per_sm(res["regs"], res["warps"], res["shared"]),
        assumed=assumed,
    )
    broken = {
        "spill": res["spill_st"] > 0 or res["spill_ld"] > 0,
        "scalar": res["narrow"] > 0,
        "sync-operand": res["sync_operands"] > 0,
        "mma.sync": res["mma_sync_dots"] > 0,
        "occupancy": res["blocks"] < assumed,
    }
    res["broken"] = [r for r in RULES if broken[r]]
    res["why"] = {r: reason for (pat, r), reason in ALLOW.items() if pat in name and broken.get(r)}
    return res


JOBS: list[Job] = []


def _dtype_bytes(job: Job) -> int:
    data = [d for n, d in job.ptrs.items() if d in SHORT]
    return min(d.itemsize for d in data) if data else 4


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
        _analyse(job.name, _dtype_bytes(job), job.assumed_blocks, compiled.asm["ptx"], compiled.asm.get("ttgir", ""), res)
    except Exception as err:  # report every kernel, then fail
        msg = str(err).strip().splitlines()
        res = dict(error=f"{type(err).__name__}: " + " | ".join(ln.strip() for ln in msg[-12:] if ln.strip()))
    res["seconds"] = time.perf_counter() - start
    return index, job.name, res


# ----------------------------------------------------------------------------- CUDA C++ (nvcc SASS)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
TARGET_W = 4096  # shuffle_merge_norm's target: C = 1024, r = 2 -> W = 4096 (bf16: 512 vectors of 8)


class CsrcParseError(RuntimeError):
    """A launch constant the gate needs is not where (or how) csrc/ used to write it."""


def _csrc_sources() -> list[tuple[str, str]]:
    """(file name, text) of csrc/'s headers first (*.cuh, *.h), then its .cu files: constants
    and launch bounds are read wherever they live, so moving them between files (as the split
    of shuffle_merge_norm.cu into small TUs did) needs no change here."""
    import glob

    files = sorted(glob.glob(os.path.join(CSRC, "*.cuh"))) + sorted(glob.glob(os.path.join(CSRC, "*.h")))
    files += sorted(glob.glob(os.path.join(CSRC, "*.cu")))
    out = []
    for path in files:
        with open(path) as fh:
            out.append((os.path.basename(path), re.sub(r"//[^\n]*", "", fh.read())))  # comments dropped
    return out


def _c_expr(expr: str, consts: dict, elem: int) -> int:
    """Value of a small C integer expression from a launch bound or helper: integer literals,
    the constants of csrc/, ``sizeof(T)`` (= elem) and one ``cond ? a : b``."""
    expr = expr.strip()
    m = re.fullmatch(r"(.+?)\?(.+?):(.+)", expr)
    if m:
        return _c_expr(m.group(2), consts, elem) if _c_expr(m.group(1), consts, elem) else _c_expr(m.group(3), consts, elem)
    py = re.sub(r"sizeof\s*\(\s*T\s*\)", str(elem), expr)
    for name in sorted(set(re.findall(r"\b[A-Za-z_]\w*\b", py)), key=len, reverse=True):
        if name not in consts:
            raise CsrcParseError(f"csrc/: {name!r} in {expr!r} is not an integer constexpr of csrc/")
        py = re.sub(rf"\b{name}\b", str(consts[name]), py)
    if not re.fullmatch(r"[\d\s()+\-*/<>=!&|]+", py):
        raise CsrcParseError(f"csrc/: cannot evaluate {expr!r}")
    return int(eval(py.replace("/", "//").replace("&&", " and ").replace("||", " or ")))  # noqa: S307 (digits and operators only)


def csrc_launch_config() -> dict:
    """The CUDA launch configuration of csrc/, parsed from its sources (not a hand-kept copy):

    * ``constexpr int kName = N;`` constants (any file; headers first);
    * each kernel's ``__launch_bounds__(threads[, min blocks])``, evaluated per element size;
    * the thread-count helpers' clamps: shuffle_merge_norm's row threads (``t < MIN ? MIN : t``)
      and the ToMe merge's (``t < LO ? LO : (t > HI ? HI : t)``).

    Raises CsrcParseError naming what is missing, so a refactor that moves or renames one fails
    the gate loudly instead of checking the kernels at a stale configuration."""
    sources = _csrc_sources()
    text = "\n".join(t for _, t in sources)
    consts = {k: int(v) for k, v in re.findall(r"constexpr\s+(?:int|int64_t|unsigned)\s+(k\w+)\s*=\s*(\d+)\s*;", text)}

    def const(*names: str) -> int:
        for n in names:
            if n in consts:
                return consts[n]
        raise CsrcParseError(f"csrc/: none of the constants {names} is defined (constexpr int kName = N;)")

    def bounds(kernel: str, elem: int) -> tuple[int, int]:
        m = re.search(rf"__launch_bounds__\s*\(((?:[^()]|\([^()]*\))*)\)\s*{kernel}\s*\(", text)
        if not m:
            raise CsrcParseError(f"csrc/: no __launch_bounds__(...) {kernel}( found")
        parts = [p for p in re.split(r",(?![^()]*\))", m.group(1))]
        threads = _c_expr(parts[0], consts, elem)
        return threads, (_c_expr(parts[1], consts, elem) if len(parts) > 1 else 1)

    def helper(name: str) -> str:
        m = re.search(rf"\b{name}\s*\([^)]*\)\s*\{{(.*?)\n\}}", text, re.S)
        if not m:
            raise CsrcParseError(f"csrc/: helper {name}(...) not found")
        return m.group(1)

    def value(token: str) -> int:
        return consts[token] if token in consts else _c_expr(token, consts, 2)

    # The clamps, as literals or named constants: `t < MIN ? MIN : t`, `t < LO ? LO : (t > HI ? HI : t)`.
    row = helper(r"(?:smn_)?row_threads")
    m_row = re.search(r"t\s*<\s*(\w+)\s*\?\s*(\w+)\s*:\s*t", row)
    merge = helper("merge_threads")
    m_merge = re.search(r"t\s*<\s*(\w+)\s*\?\s*(\w+)\s*:\s*\(\s*t\s*>\s*(\w+)\s*\?\s*(\w+)\s*:\s*t\s*\)", merge)
    if not m_row or not m_merge:
        raise CsrcParseError("csrc/: the row_threads / merge_threads clamps are not in the form this parser reads")
    return dict(
        smn_max_threads=const("kSmnMaxThreads", "kMaxThreads"),
        smn_max_items=const("kSmnMaxItems", "kMaxItems"),
        smn_min_threads=value(m_row.group(2)),
        smn_fwd_bounds={e: bounds("smn_fwd_kernel", e) for e in (2, 4)},
        smn_bwd_bounds={e: bounds("smn_bwd_kernel", e) for e in (2, 4)},
        tome_match_threads=bounds("tome_match_kernel", 2)[0],
        merge_threads=(value(m_merge.group(2)), value(m_merge.group(4))),
    )


def _cuda_launch(name: str, mangled: str, cfg: dict) -> tuple[int, int, int, str] | None:
    """(threads per block, dynamic shared bytes, blocks per SM the launcher assumes, label) at the
    target shapes, computed as the csrc launchers compute them from ``cfg`` (csrc_launch_config);
    None for instantiations the target never launches (the scalar fallbacks, taken only for
    misaligned inputs, and the row-width instances of other widths)."""
    vec = re.search(r"Li(\d+)E", mangled)
    vec = int(vec.group(1)) if vec else 0
    elem = 2 if ("bfloat16" in name or "__half" in name) else 4
    if name.startswith("void fcot::smn_"):
        if vec == 1:
            return None
        nvec = TARGET_W // vec
        items = int(re.search(r"Li\d+ELi(\d+)E", mangled).group(1))
        # csrc row_items: the fewest vectors per thread that cover the row within the launch bound.
        want = 1
        while want < cfg["smn_max_items"] and -(-nvec // want) > cfg["smn_max_threads"]:
            want *= 2
        if items != want:
            return None  # an instantiation for other widths
        threads = max(cfg["smn_min_threads"], -(-(-(-nvec // items)) // 32) * 32)
        # The launch bound's minimum blocks per SM: what the backward grid (cuda/shuffle_merge_norm.py)
        # is sized for; the forward's grid is one block per row, so it assumes nothing.
        per_sm = cfg["smn_bwd_bounds"][elem][1] if "smn_bwd" in name else 1
        return threads, 0, per_sm, f"W={TARGET_W} items={items}"
    if "tome_match" in name:
        return cfg["tome_match_threads"], 0, 1, "tokens=1024 C=1024"
    if "tome_merge" in name or "tome_unmerge" in name:
        if vec == 1:
            return None  # <T, 1>: the unaligned fallback
        lo, hi = cfg["merge_threads"]
        return min(hi, max(lo, -(-(1024 // vec) // 32) * 32)), 0, 1, "C=1024"
    return 0, 0, 1, ""


def _sm90_cubins(tmp: str, jobs: int) -> tuple[list[str], str]:
    """sm_90 cubins of csrc/: from the built extension when it holds them, else compiled with nvcc."""
    import glob

    cuobjdump = os.path.join(BIN, "cuobjdump")
    for so in glob.glob(os.path.join(ROOT, "fcot_kernels", "_C*.so")):
        listed = subprocess.run([cuobjdump, "-lelf", so], capture_output=True, text=True).stdout
        names = re.findall(r"ELF file\s+\d+:\s+(\S+\.sm_90a?\.cubin)", listed)
        if names:
            subprocess.run([cuobjdump, "-xelf", "all", so], cwd=tmp, capture_output=True, check=True)
            return [os.path.join(tmp, n) for n in names if os.path.exists(os.path.join(tmp, n))], f"{os.path.basename(so)}"
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    if not os.path.exists(nvcc):
        return [], "no built extension with sm_90 code and no nvcc"
    from concurrent.futures import ThreadPoolExecutor

    def build(cu: str) -> str:
        # The flags CMakeLists.txt gives the extension's CUDA sources.
        dst = os.path.join(tmp, os.path.basename(cu).replace(".cu", ".sm_90.cubin"))
        subprocess.run([nvcc, "-cubin", "-O3", "-std=c++17", "-arch=sm_90", "--expt-relaxed-constexpr", "-lineinfo",
                        "-Xptxas=-O3", "-o", dst, cu], check=True, capture_output=True)
        return dst

    # One TU per core (csrc/ is split into small TUs so that this parallelises).
    with ThreadPoolExecutor(max(1, jobs)) as pool:
        out = list(pool.map(build, sorted(glob.glob(os.path.join(CSRC, "*.cu")))))
    return out, "nvcc -cubin -arch=sm_90"


_SASS_GLOBAL = re.compile(r"\b(LDG|STG)((?:\.[A-Z0-9_]+)*)")


def cuda_results(jobs: int = 1) -> tuple[list[tuple[str, dict]], str]:
    """One (name, result) per CUDA kernel instantiation of csrc/, read from its sm_90 SASS."""
    cuobjdump = os.path.join(BIN, "cuobjdump")
    results = []
    try:
        cfg = csrc_launch_config()
    except CsrcParseError as err:
        return [("csrc launch configuration", dict(error=str(err)))], "csrc/ sources"
    with tempfile.TemporaryDirectory() as tmp:
        try:
            cubins, source = _sm90_cubins(tmp, jobs)
        except subprocess.CalledProcessError as err:
            return [("csrc", dict(error=f"nvcc failed: {err.stderr.decode()[-400:] if err.stderr else err}"))], "nvcc"
        for cubin in cubins:
            usage = subprocess.run([cuobjdump, "-res-usage", cubin], capture_output=True, text=True).stdout
            sass = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True).stdout
            bodies = dict(re.findall(r"Function : (\S+)\n(.*?)(?=\n\s*\.{5,}|\n\s*Function : |\Z)", sass, re.S))
            for mangled, reg, stack, shared, local in re.findall(
                    r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage):
                name = subprocess.run(["c++filt", mangled], capture_output=True, text=True).stdout.strip() or mangled
                launch = _cuda_launch(name, mangled, cfg)
                if launch is None:
                    continue
                threads, dyn, assumed, label = launch
                body = bodies.get(mangled, "")
                acc = []
                for kind, mods in _SASS_GLOBAL.findall(body):
                    m = mods.split(".")
                    size = 16 if "128" in m else 8 if "64" in m else 2 if ("U16" in m or "S16" in m) else 1 if ("U8" in m or "S8" in m) else 4
                    acc.append(size)
                spills = len(re.findall(r"\b(?:LDL|STL)\b", body))
                half = "bfloat16" in name or "__half" in name
                warps = max(1, threads // 32)
                short = re.sub(r"^void fcot::", "", name.split("(")[0])
                res = dict(shared=int(shared) + dyn, regs=int(reg), stack=int(stack), spill_st=spills, spill_ld=0,
                           warps=warps, stages=0, seconds=0.0)
                res.update(vec=max(acc, default=0), narrow=sum(1 for b in acc if b <= 2) if half else 0,
                           mma="hmma" if "HMMA" in body else ("wgmma" if "HGMMA" in body else ("fma" if "tome_match" in name else "-")),
                           async_copies=len(re.findall(r"\b(?:LDGSTS|UTMALDG)\b", body)), sync_operands=0,
                           mma_sync_dots=0, blocks=_blocks_per_sm(int(reg), warps, int(shared) + dyn), assumed=assumed)
                if "tome_match" in name and res["async_copies"] == 0:
                    res["sync_operands"] = 2  # the match's two operands go through plain loads
                if "tome_match" in name and res["mma"] == "fma":
                    res["mma_sync_dots"] = 1  # a GEMM-like loop on CUDA cores: counted against the MMA rule
                full = f"cuda {short} [{label}]"
                broken = {"spill": spills > 0 or int(local) > 0, "scalar": res["narrow"] > 0,
                          "sync-operand": res["sync_operands"] > 0, "mma.sync": res["mma_sync_dots"] > 0,
                          "occupancy": res["blocks"] < assumed}
                res["broken"] = [r for r in RULES if broken[r]]
                res["why"] = {r: reason for (pat, r), reason in ALLOW.items() if pat in full and broken[r]}
                results.append((full, res))
    return results, source


# ----------------------------------------------------------------------------- table + docs

DOCS = os.path.join(ROOT, "docs", "kernels.md")
BEGIN = "<!-- BEGIN GENERATED: tests/compile_triton_sm90.py --write-docs; do not edit by hand -->"
END = "<!-- END GENERATED: tests/compile_triton_sm90.py -->"


def _row(name: str, res: dict) -> str:
    unexplained = [r for r in res["broken"] if r not in res["why"]]
    verdict = "FAIL " + ",".join(unexplained) if unexplained else ("allowed" if res["broken"] else "ok")
    why = "; ".join(f"{r}: {w}" for r, w in res["why"].items())
    spill = f"{res['spill_st']}/{res['spill_ld']}" if res["spill_st"] or res["spill_ld"] else "0"
    return (f"| {name} | {res['regs']} | {spill} | {res['shared'] / 1024:.1f} | {res['blocks']} (>= {res['assumed']}) "
            f"| {res['vec']} B{' + ' + str(res['narrow']) + ' x 2 B' if res['narrow'] else ''} | {res['mma']}"
            f"{' (n >= ' + str(res['wgmma_n']) + ')' if res.get('wgmma_n') else ''} "
            f"| {res['async_copies']}{' (' + str(res['sync_operands']) + ' sync operands)' if res['sync_operands'] else ''} "
            f"| {verdict} | {why} |")


def table(results: list[tuple[str, dict]]) -> str:
    head = ("| kernel [configuration] | registers | spills (B st/ld) | shared KiB | blocks/SM (launcher assumes) "
            "| widest global access (+ 2-byte accesses) | MMA | async copies | verdict | why |\n"
            "|---|---|---|---|---|---|---|---|---|---|")
    return "\n".join([head] + [_row(n, r) for n, r in results if "error" not in r])


GPU_TRITON = "3.6"  # the GPU machine's Triton (../shared/GPU.md): its table has its own section


def _markers() -> tuple[str, str]:
    """The generated section for this Triton: the GPU machine's has its own, any other the default."""
    if triton.__version__.startswith(GPU_TRITON + "."):
        return (f"<!-- BEGIN GENERATED: tests/compile_triton_sm90.py --write-docs under Triton {GPU_TRITON}; do not edit by hand -->",
                f"<!-- END GENERATED: tests/compile_triton_sm90.py under Triton {GPU_TRITON} -->")
    return BEGIN, END


def write_docs(text: str, check: bool) -> bool:
    """Replace the generated section of docs/kernels.md (or, with check, report whether it is current)."""
    begin, end = _markers()
    with open(DOCS) as fh:
        doc = fh.read()
    if begin not in doc or end not in doc:
        raise SystemExit(f"{DOCS}: the markers {begin!r} / {end!r} are missing")
    head, rest = doc.split(begin, 1)
    _, tail = rest.split(end, 1)
    new = f"{head}{begin}\n{text}\n{end}{tail}"
    if check:
        return new == doc
    with open(DOCS, "w") as fh:
        fh.write(new)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="parallel compiles")
    parser.add_argument("--filter", default="", help="only configurations whose name contains this")
    parser.add_argument("--list", action="store_true", help="list the configurations, compile nothing")
    parser.add_argument("--no-cuda", action="store_true", help="skip the CUDA C++ kernels (nvcc SASS)")
    parser.add_argument("--write-docs", action="store_true", help="write the table into docs/kernels.md")
    parser.add_argument("--check-docs", action="store_true",
                        help="fail when docs/kernels.md's generated table differs from this run's")
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
    named = [(name, res) for _, name, res in results]
    source = "skipped (--no-cuda)"
    if not args.no_cuda:
        cuda, source = cuda_results(args.jobs)
        named += cuda
    failed = ruled = 0
    for name, res in named:
        if "error" in res:
            failed += 1
            print(f"FAIL  {name}: compile error: {res['error']}")
            continue
        line = (f"shared {res['shared'] / 1024:6.1f} KiB  regs {res['regs']:3d}  stack {res['stack']:5d}  "
                f"spill {res['spill_st']}/{res['spill_ld']} B  w{res['warps']} s{res['stages']}  "
                f"blocks/SM {res['blocks']}>={res['assumed']}  vec {res['vec']}B narrow {res['narrow']}  "
                f"mma {res['mma']} async {res['async_copies']} wgmma-n {res.get('wgmma_n', 0)}  {res['seconds']:4.1f}s  {name}")
        unexplained = [r for r in res["broken"] if r not in res["why"]]
        if res["shared"] > H100_SMEM:
            failed += 1
            print(f"FAIL  {line}  EXCEEDS the H100's {H100_SMEM // 1024} KiB of shared memory")
        elif unexplained:
            ruled += 1
            print(f"FAIL  {line}  breaks: {', '.join(unexplained)}")
        elif res["broken"]:
            print(f"ALLOW {line}  {'; '.join(f'{r}: {w}' for r, w in res['why'].items())}")
        else:
            print(f"ok    {line}")
    # A partial run (--filter, --no-cuda) cannot tell a stale ALLOW entry from an unchecked kernel.
    full_run = not args.filter and not args.no_cuda
    unused = [k for k in ALLOW if _allow_applies(k)
              and not any(k[0] in n and k[1] in r.get("broken", ()) for n, r in named)] if full_run else []
    text = (f"{len(named)} kernels/configurations (Triton {triton.__version__}, sm_90; CUDA C++ from {source}): "
            f"{failed} failed to compile or fit, {ruled} break a performance rule without a reason in ALLOW.\n\n"
            + table(named))
    print("\n" + text)
    if args.write_docs and not args.filter:
        write_docs(text, check=False)
    toolchain = f"(Triton {triton.__version__}, sm_90; CUDA C++ from {source})"
    with open(DOCS) as fh:
        same_toolchain = toolchain in fh.read()
    if args.check_docs and not same_toolchain:
        print(f"docs/kernels.md's table was generated with another toolchain than {toolchain}: not compared")
    stale = args.check_docs and same_toolchain and not args.filter and not write_docs(text, check=True)
    if stale:
        print(f"docs/kernels.md's generated table is stale: run `python tests/compile_triton_sm90.py --write-docs`")
    if unused:
        print(f"ALLOW entries that match no broken rule (remove them): {unused}")
    print(f"{len(named)} configurations checked in {time.perf_counter() - start:.0f} s: {failed} failed, "
          f"{ruled} break a performance rule")
    return 1 if failed or ruled or stale or unused else 0


if __name__ == "__main__":
    sys.exit(main())
