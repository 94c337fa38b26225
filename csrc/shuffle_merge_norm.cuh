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

struct SmnGeom {
  int64_t stride_t, stride_n;  // x strides (elements)
  int64_t rows, tokens_out;    // output rows in all, per tile
  int grid_w, grid_hw;         // patch grid width, tokens per input tile
  int out_w;                   // merged grid width
  int C, r, mh, mw;            // channels, shuffle factor, merge window (rows, cols)
  int width;                   // r*r*C
};

// Offset (elements) of channel c of segment k, window member (mi, mj), of output row `row`,
// in a (tiles, grid_hw, C) tensor with the given strides.
__device__ __forceinline__ int64_t smn_src_offset(const SmnGeom& g, int64_t row, int k, int c,
                                                  int mi, int mj, int64_t st, int64_t sn) {
  const int64_t t = row / g.tokens_out;
  const int o = static_cast<int>(row - t * g.tokens_out);
  const int i3 = o / g.out_w, j3 = o - (o / g.out_w) * g.out_w;
  const int di = k / g.r, dj = k - (k / g.r) * g.r;
  const int i = (i3 * g.mh + mi) * g.r + di;
  const int j = (j3 * g.mw + mj) * g.r + dj;
  return t * st + static_cast<int64_t>(i * g.grid_w + j) * sn + c;
}

// Forward: like the backward, thread t owns the vectors v = t + i * blockDim.x (i < ITEMS) of
// every row, so the merged row stays in registers between the mean, the two-pass variance and
// the normalisation: no shared-memory row cache (whose per-element accesses at a VEC-float
// stride were 8-way bank conflicts), only the reduction scratch.
template <typename T, int VEC, int ITEMS>
__global__ void __launch_bounds__(512, sizeof(T) == 2 ? 2 : 1) smn_fwd_kernel(const T* __restrict__ x,         // (tiles, grid_hw, C), strided
                                                      const float* __restrict__ weight,  // (W,)
                                                      const float* __restrict__ bias,    // (W,)
                                                      T* __restrict__ out,               // (rows, W)
                                                      float* __restrict__ mean_out,      // (rows,)
                                                      float* __restrict__ rstd_out,      // (rows,)
                                                      SmnGeom g, float eps) {
  __shared__ float scratch[2][32];
  const int nvec = g.width / VEC;
  const float inv_merge = 1.f / static_cast<float>(g.mh * g.mw);
  const float inv_width = 1.f / static_cast<float>(g.width);

  for (int64_t row = blockIdx.x; row < g.rows; row += gridDim.x) {
    float acc[ITEMS][VEC];
    float lmax = 0.f;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[i][e] = 0.f;
      const int v = threadIdx.x + i * blockDim.x;
      if (v >= nvec) continue;
      const int cf = v * VEC, k = cf / g.C, c = cf - k * g.C;
      for (int mi = 0; mi < g.mh; ++mi) {
        for (int mj = 0; mj < g.mw; ++mj) {
          float vals[VEC];
          load_f32<T, VEC>(x + smn_src_offset(g, row, k, c, mi, mj, g.stride_t, g.stride_n), vals);
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
    const float inv_s = 1.f / s;
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
__global__ void __launch_bounds__(512, sizeof(T) == 2 ? 2 : 1) smn_bwd_kernel(const T* __restrict__ x,           // (tiles, grid_hw, C), strided
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
  const float inv_merge = 1.f / static_cast<float>(g.mh * g.mw);
  const float inv_width = 1.f / static_cast<float>(g.width);
  const int64_t dx_st = static_cast<int64_t>(g.grid_hw) * g.C;
  float xhat[ITEMS][VEC], dw_acc[ITEMS][VEC], db_acc[ITEMS][VEC];
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
#pragma unroll
    for (int e = 0; e < VEC; ++e) dw_acc[i][e] = db_acc[i][e] = 0.f;
  }

  for (int64_t row = blockIdx.x; row < g.rows; row += gridDim.x) {
    const float mu = mean[row], rs = rstd[row];
    float s_g = 0.f, s_gx = 0.f;  // sum(dy*w), sum(dy*w*xhat)
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int v = threadIdx.x + i * blockDim.x;
      if (v >= nvec) continue;
      const int cf = v * VEC, k = cf / g.C, c = cf - k * g.C;
      float acc[VEC] = {};
      for (int mi = 0; mi < g.mh; ++mi) {
        for (int mj = 0; mj < g.mw; ++mj) {
          float vals[VEC];
          load_f32<T, VEC>(x + smn_src_offset(g, row, k, c, mi, mj, g.stride_t, g.stride_n), vals);
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
      const int cf = v * VEC, k = cf / g.C, c = cf - k * g.C;
      float d[VEC], w[VEC], dz[VEC];
      load_f32<T, VEC>(dy + row * g.width + cf, d);  // second read of the row hits L1/L2
      load_f32<float, VEC>(weight + cf, w);
#pragma unroll
      for (int e = 0; e < VEC; ++e) dz[e] = rs * (d[e] * w[e] - s_g - xhat[i][e] * s_gx) * inv_merge;
      for (int mi = 0; mi < g.mh; ++mi) {
        for (int mj = 0; mj < g.mw; ++mj) {
          store_f32<T, VEC>(dx + smn_src_offset(g, row, k, c, mi, mj, dx_st, g.C), dz);
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
