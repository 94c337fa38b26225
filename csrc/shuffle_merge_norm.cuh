// Fused pixel shuffle + token merge + LayerNorm (kernel bodies).
//
// Output row `row` of tile t is the merged token at (i3, j3) of the merged grid. Its width
// W = r*r*C is made of r*r segments of C channels; segment k = di*r + dj comes from ViT patch
// (i*r + di, j*r + dj) for each member (i, j) of the merge window on the shuffled grid (the
// layout transformers' InternVLModel.pixel_shuffle produces). Windows tile the grid, so every
// input row belongs to exactly one output row: backward scatters without atomics.
//
// Each thread owns the same VEC-wide channel slots (ITEMS of them) for every row, so the row and
// the dweight/dbias accumulators live in registers and only the reductions synchronise.
#pragma once
#include "common.cuh"

namespace fcot {

// Launch configuration (the launchers and tests/compile_triton_sm90.py read these): whole warps,
// kSmnMinThreads to kSmnMaxThreads threads per block, each owning 1, 2, 4, ... kSmnMaxItems vectors of the row;
// kSmnMinBlocks16 blocks per SM for 16-bit inputs (<= 64 registers), kSmnMinBlocks32 for fp32.
constexpr int kSmnMaxThreads = 512;
constexpr int kSmnMinThreads = 64;
constexpr int kSmnMaxItems = 32;
constexpr int kSmnMinBlocks16 = 2;
constexpr int kSmnMinBlocks32 = 1;

struct SmnGeom {
  int64_t stride_t, stride_n;  // x strides (elements)
  int64_t rows, tokens_out;    // output rows in all (< 2^31, bindings.cpp), per tile
  int grid_w, grid_hw;         // patch grid width, tokens per input tile
  int out_w;                   // merged grid width
  int C, r, mh, mw;            // channels, shuffle factor, merge window (rows, cols)
  int width;                   // r*r*C
  // Divisors fixed per launch, as multiply-shift (no divide instructions in the kernels), and
  // the two reciprocals, rounded on the host as `1.f / x` rounds on the device: read from the
  // constant bank, they take no register (the 16-bit backward is at its 64-register bound).
  FastDiv div_tokens_out, div_out_w, div_C, div_r;
  float inv_merge, inv_width;      // 1 / (mh*mw), 1 / width
};

// The source offset of an element splits into a row part (tile, merged-window origin), a window
// member part and a vector part (segment k = di*r + dj, channel c), all linear in the strides:
//   t*st + ((i3*mh + mi)*r + di) * grid_w + (j3*mw + mj)*r + dj) * sn + c.
// Row part, once per row: two multiply-shift divisions, no divide. Kept as two ints (tile, patch
// index of the window origin) so that x's and dx's row offsets cost no extra 64-bit registers.
struct SmnRowPos {
  int t, origin;
};

__device__ __forceinline__ SmnRowPos smn_row_pos(const SmnGeom& g, int64_t row) {
  const int rr = static_cast<int>(row);
  const int t = fast_div(g.div_tokens_out, rr);
  const int o = rr - t * static_cast<int>(g.tokens_out);
  const int i3 = fast_div(g.div_out_w, o), j3 = o - i3 * g.out_w;
  return {t, i3 * g.mh * g.r * g.grid_w + j3 * g.mw * g.r};
}

__device__ __forceinline__ int64_t smn_row_offset(SmnRowPos p, int64_t st, int64_t sn) {
  return p.t * st + p.origin * sn;
}

// Window member (mi, mj): a multiply-add.
__device__ __forceinline__ int64_t smn_member_offset(const SmnGeom& g, int mi, int mj, int64_t sn) {
  return static_cast<int64_t>((mi * g.grid_w + mj) * g.r) * sn;
}

// Vector part of flat channel cf of the output row (the same for every row).
__device__ __forceinline__ int64_t smn_vec_offset(const SmnGeom& g, int cf, int64_t sn) {
  const int k = fast_div(g.div_C, cf), c = cf - k * g.C;
  const int di = fast_div(g.div_r, k), dj = k - di * g.r;
  return static_cast<int64_t>(di * g.grid_w + dj) * sn + c;
}

// Forward: like the backward, thread t owns the vectors v = t + i * blockDim.x (i < ITEMS) of
// every row, so the merged row stays in registers between the mean, the two-pass variance and
// the normalisation: no shared-memory row cache (whose per-element accesses at a VEC-float
// stride were 8-way bank conflicts), only the reduction scratch.
template <typename T, int VEC, int ITEMS>
__global__ void __launch_bounds__(kSmnMaxThreads, sizeof(T) == 2 ? kSmnMinBlocks16 : kSmnMinBlocks32) smn_fwd_kernel(const T* __restrict__ x,         // (tiles, grid_hw, C), strided
                                                      const float* __restrict__ weight,  // (W,)
                                                      const float* __restrict__ bias,    // (W,)
                                                      T* __restrict__ out,               // (rows, W)
                                                      float* __restrict__ mean_out,      // (rows,)
                                                      float* __restrict__ rstd_out,      // (rows,)
                                                      SmnGeom g, float eps) {
  __shared__ float scratch[2][32];
  const int nvec = g.width / VEC;
  const float inv_merge = g.inv_merge, inv_width = g.inv_width;

  for (int64_t row = blockIdx.x; row < g.rows; row += gridDim.x) {
    const int64_t row_off = smn_row_offset(smn_row_pos(g, row), g.stride_t, g.stride_n);
    float acc[ITEMS][VEC];
    float lmax = 0.f;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[i][e] = 0.f;
      const int v = threadIdx.x + i * blockDim.x;
      if (v >= nvec) continue;
      const T* src = x + row_off + smn_vec_offset(g, v * VEC, g.stride_n);
      for (int mi = 0; mi < g.mh; ++mi) {
        for (int mj = 0; mj < g.mw; ++mj) {
          float vals[VEC];
          load_f32<T, VEC>(src + smn_member_offset(g, mi, mj, g.stride_n), vals);
          // Members pre-scaled by 1/merge (a power of two: exact, same rounding as scaling the
          // sum) so that finite members of any magnitude cannot overflow the sum.
#pragma unroll
          for (int e = 0; e < VEC; ++e) acc[i][e] += vals[e] * inv_merge;
        }
      }
#pragma unroll
      for (int e = 0; e < VEC; ++e) lmax = fmaxf(lmax, fabsf(acc[i][e]));
    }
    // Statistics of the row divided by s = ln_row_scale(max|row|) (exact): identical bits for
    // rows below 2, and no overflow of (x - mean)**2 for rows of any finite magnitude.
    // NaN/inf in the row reach its sums, so the whole row comes out NaN (the reference's policy).
    const float s = ln_row_scale(block_max(lmax, scratch[0]));
    // 1/s exactly: s = 2^e with e in [0, 126], so 1/s = 2^-e is the exponent field mirrored
    // (no division, no slow-path call per row).
    const float inv_s = __int_as_float(0x7f000000 - __float_as_int(s));
    float local = 0.f;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      if (threadIdx.x + i * blockDim.x >= nvec) continue;
#pragma unroll
      for (int e = 0; e < VEC; ++e) local += acc[i][e] * inv_s;
    }
    const float mean_u = block_sum(local, scratch[1]) * inv_width;
    // Two-pass variance from the registers: robust when |mean| >> std.
    local = 0.f;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      if (threadIdx.x + i * blockDim.x >= nvec) continue;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float d = acc[i][e] * inv_s - mean_u;
        local += d * d;
      }
    }
    const float rstd_u = rsqrtf(block_sum(local, scratch[0]) * inv_width + (eps * inv_s) * inv_s);
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int v = threadIdx.x + i * blockDim.x;
      if (v >= nvec) continue;
      const int cf = v * VEC;
      float w[VEC], b[VEC], y[VEC];
      load_f32<float, VEC>(weight + cf, w);
      load_f32<float, VEC>(bias + cf, b);
#pragma unroll
      for (int e = 0; e < VEC; ++e) y[e] = (acc[i][e] * inv_s - mean_u) * rstd_u * w[e] + b[e];
      store_f32<T, VEC>(out + row * g.width + cf, y);
    }
    if (threadIdx.x == 0) {
      mean_out[row] = mean_u * s;
      rstd_out[row] = rstd_u * inv_s;
    }
  }
}

// Backward: thread t owns the vectors v = t + i * blockDim.x, i < ITEMS, of every row (the
// launcher picks ITEMS * blockDim.x >= W / VEC), so x-hat and the dweight/dbias accumulators
// are register arrays indexed by compile-time constants: no shared memory but the reduction
// scratch, no bank conflicts, 16-byte global accesses only. Launch bounds: 512 threads, and two
// blocks per SM for 16-bit inputs (<= 64 registers; the launcher's grid is 2 blocks per SM), one
// for fp32 (whose 4-wide vectors need 2 per thread at W = 4096).
template <typename T, int VEC, int ITEMS>
__global__ void __launch_bounds__(kSmnMaxThreads, sizeof(T) == 2 ? kSmnMinBlocks16 : kSmnMinBlocks32) smn_bwd_kernel(const T* __restrict__ x,           // (tiles, grid_hw, C), strided
                               const float* __restrict__ weight,  // (W,)
                               const T* __restrict__ dy,          // (rows, W)
                               const float* __restrict__ mean,    // (rows,)
                               const float* __restrict__ rstd,    // (rows,)
                               T* __restrict__ dx,                // (tiles, grid_hw, C) or null
                               float* __restrict__ dw_partial,    // (gridDim.x, W)
                               float* __restrict__ db_partial,    // (gridDim.x, W)
                               SmnGeom g) {
  __shared__ float scratch[2][32];  // two reduction buffers: the row's two sums back to back
  const int nvec = g.width / VEC;
  const float inv_merge = g.inv_merge, inv_width = g.inv_width;
  const int64_t dx_st = static_cast<int64_t>(g.grid_hw) * g.C;
  float xhat[ITEMS][VEC], dw_acc[ITEMS][VEC], db_acc[ITEMS][VEC];
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
#pragma unroll
    for (int e = 0; e < VEC; ++e) dw_acc[i][e] = db_acc[i][e] = 0.f;
  }

  for (int64_t row = blockIdx.x; row < g.rows; row += gridDim.x) {
    const float mu = mean[row], rs = rstd[row];
    const SmnRowPos pos = smn_row_pos(g, row);
    float s_g = 0.f, s_gx = 0.f;  // sum(dy*w), sum(dy*w*xhat)
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int v = threadIdx.x + i * blockDim.x;
      if (v >= nvec) continue;
      const int cf = v * VEC;
      const T* src = x + smn_row_offset(pos, g.stride_t, g.stride_n) + smn_vec_offset(g, cf, g.stride_n);
      float acc[VEC] = {};
      for (int mi = 0; mi < g.mh; ++mi) {
        for (int mj = 0; mj < g.mw; ++mj) {
          float vals[VEC];
          load_f32<T, VEC>(src + smn_member_offset(g, mi, mj, g.stride_n), vals);
#pragma unroll
          for (int e = 0; e < VEC; ++e) acc[e] += vals[e] * inv_merge;  // as the forward
        }
      }
      float d[VEC], w[VEC];
      load_f32<T, VEC>(dy + row * g.width + cf, d);
      load_f32<float, VEC>(weight + cf, w);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float xh = (acc[e] - mu) * rs;
        const float gw = d[e] * w[e];
        xhat[i][e] = xh;
        s_g += gw;
        s_gx += gw * xh;
        dw_acc[i][e] += d[e] * xh;
        db_acc[i][e] += d[e];
      }
    }
    if (dx == nullptr) continue;  // uniform across the block: no reduction is skipped unevenly
    s_g = block_sum(s_g, scratch[0]) * inv_width;
    s_gx = block_sum(s_gx, scratch[1]) * inv_width;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int v = threadIdx.x + i * blockDim.x;
      if (v >= nvec) continue;
      const int cf = v * VEC;
      T* dst = dx + smn_row_offset(pos, dx_st, g.C) + smn_vec_offset(g, cf, g.C);
      float d[VEC], w[VEC], dz[VEC];
      load_f32<T, VEC>(dy + row * g.width + cf, d);  // second read of the row hits L1/L2
      load_f32<float, VEC>(weight + cf, w);
#pragma unroll
      for (int e = 0; e < VEC; ++e) dz[e] = rs * (d[e] * w[e] - s_g - xhat[i][e] * s_gx) * inv_merge;
      for (int mi = 0; mi < g.mh; ++mi) {
        for (int mj = 0; mj < g.mw; ++mj) {
          store_f32<T, VEC>(dst + smn_member_offset(g, mi, mj, g.C), dz);
        }
      }
    }
  }
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int v = threadIdx.x + i * blockDim.x;
    if (v >= nvec) continue;
    const int64_t off = blockIdx.x * static_cast<int64_t>(g.width) + v * VEC;
    store_f32_plain<VEC>(dw_partial + off, dw_acc[i]);
    store_f32_plain<VEC>(db_partial + off, db_acc[i]);
  }
}

}  // namespace fcot
