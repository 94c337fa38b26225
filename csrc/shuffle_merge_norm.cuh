// Fused pixel shuffle + token merge + LayerNorm (kernel bodies).
//
// Output row `row` of tile t is the merged token at (i3, j3) of the merged grid. Its width
// W = r*r*C is made of r*r segments of C channels; segment k = di*r + dj comes from ViT patch
// (i*r + di, j*r + dj) for each member (i, j) of the merge window on the shuffled grid (the
// layout transformers' InternVLModel.pixel_shuffle produces). Windows tile the grid, so every
// input row belongs to exactly one output row: backward scatters without atomics.
//
// Each thread owns the same VEC-wide channel slots for every row, so the shared-memory row
// cache and the dweight/dbias accumulators need no synchronisation beyond the reductions.
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

template <typename T, int VEC>
__global__ void smn_fwd_kernel(const T* __restrict__ x,         // (tiles, grid_hw, C), strided
                               const float* __restrict__ weight,  // (W,)
                               const float* __restrict__ bias,    // (W,)
                               T* __restrict__ out,               // (rows, W)
                               float* __restrict__ mean_out,      // (rows,)
                               float* __restrict__ rstd_out,      // (rows,)
                               SmnGeom g, float eps) {
  extern __shared__ float smem[];  // [W] merged row in fp32, then [32] reduction scratch
  float* row_cache = smem;
  float* scratch = smem + g.width;
  const int nvec = g.width / VEC;
  const float inv_merge = 1.f / static_cast<float>(g.mh * g.mw);
  const float inv_width = 1.f / static_cast<float>(g.width);

  for (int64_t row = blockIdx.x; row < g.rows; row += gridDim.x) {
    float lmax = 0.f;
    for (int v = threadIdx.x; v < nvec; v += blockDim.x) {
      const int cf = v * VEC, k = cf / g.C, c = cf - k * g.C;
      float acc[VEC] = {};
      for (int mi = 0; mi < g.mh; ++mi) {
        for (int mj = 0; mj < g.mw; ++mj) {
          float vals[VEC];
          load_f32<T, VEC>(x + smn_src_offset(g, row, k, c, mi, mj, g.stride_t, g.stride_n), vals);
          // Members pre-scaled by 1/merge (a power of two: exact, same rounding as scaling the
          // sum) so that finite members of any magnitude cannot overflow the sum.
#pragma unroll
          for (int e = 0; e < VEC; ++e) acc[e] += vals[e] * inv_merge;
        }
      }
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        row_cache[cf + e] = acc[e];
        lmax = fmaxf(lmax, fabsf(acc[e]));
      }
    }
    // Statistics of the row divided by s = ln_row_scale(max|row|) (exact): identical bits for
    // rows below 2, and no overflow of (x - mean)**2 for rows of any finite magnitude.
    // NaN/inf in the row reach its sums, so the whole row comes out NaN (the reference's policy).
    const float s = ln_row_scale(block_max(lmax, scratch));
    const float inv_s = 1.f / s;
    float local = 0.f;
    for (int v = threadIdx.x; v < nvec; v += blockDim.x) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) local += row_cache[v * VEC + e] * inv_s;
    }
    const float mean_u = block_sum(local, scratch) * inv_width;
    // Two-pass variance from the cached row: robust when |mean| >> std.
    local = 0.f;
    for (int v = threadIdx.x; v < nvec; v += blockDim.x) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float d = row_cache[v * VEC + e] * inv_s - mean_u;
        local += d * d;
      }
    }
    const float rstd_u = rsqrtf(block_sum(local, scratch) * inv_width + (eps * inv_s) * inv_s);
    for (int v = threadIdx.x; v < nvec; v += blockDim.x) {
      const int cf = v * VEC;
      float y[VEC];
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        y[e] = (row_cache[cf + e] * inv_s - mean_u) * rstd_u * weight[cf + e] + bias[cf + e];
      }
      store_f32<T, VEC>(out + row * g.width + cf, y);
    }
    if (threadIdx.x == 0) {
      mean_out[row] = mean_u * s;
      rstd_out[row] = rstd_u * inv_s;
    }
  }
}

template <typename T, int VEC>
__global__ void smn_bwd_kernel(const T* __restrict__ x,           // (tiles, grid_hw, C), strided
                               const float* __restrict__ weight,  // (W,)
                               const T* __restrict__ dy,          // (rows, W)
                               const float* __restrict__ mean,    // (rows,)
                               const float* __restrict__ rstd,    // (rows,)
                               T* __restrict__ dx,                // (tiles, grid_hw, C) or null
                               float* __restrict__ dw_partial,    // (gridDim.x, W)
                               float* __restrict__ db_partial,    // (gridDim.x, W)
                               SmnGeom g) {
  extern __shared__ float smem[];  // [W] xhat, [W] dweight acc, [W] dbias acc, [32] scratch
  float* xhat = smem;
  float* dw_acc = smem + g.width;
  float* db_acc = smem + 2 * g.width;
  float* scratch = smem + 3 * g.width;
  const int nvec = g.width / VEC;
  const float inv_merge = 1.f / static_cast<float>(g.mh * g.mw);
  const float inv_width = 1.f / static_cast<float>(g.width);
  const int64_t dx_st = static_cast<int64_t>(g.grid_hw) * g.C;

  for (int i = threadIdx.x; i < g.width; i += blockDim.x) dw_acc[i] = db_acc[i] = 0.f;
  // Zeroing and the final write use element-strided slots, the row loop vector-strided ones.
  __syncthreads();

  for (int64_t row = blockIdx.x; row < g.rows; row += gridDim.x) {
    const float mu = mean[row], rs = rstd[row];
    float s_g = 0.f, s_gx = 0.f;  // sum(dy*w), sum(dy*w*xhat)
    for (int v = threadIdx.x; v < nvec; v += blockDim.x) {
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
      float d[VEC];
      load_f32<T, VEC>(dy + row * g.width + cf, d);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float xh = (acc[e] - mu) * rs;
        const float gw = d[e] * weight[cf + e];
        xhat[cf + e] = xh;
        s_g += gw;
        s_gx += gw * xh;
        dw_acc[cf + e] += d[e] * xh;
        db_acc[cf + e] += d[e];
      }
    }
    if (dx == nullptr) continue;  // uniform across the block: no reduction is skipped unevenly
    s_g = block_sum(s_g, scratch) * inv_width;
    s_gx = block_sum(s_gx, scratch) * inv_width;
    for (int v = threadIdx.x; v < nvec; v += blockDim.x) {
      const int cf = v * VEC, k = cf / g.C, c = cf - k * g.C;
      float d[VEC];
      load_f32<T, VEC>(dy + row * g.width + cf, d);  // second read of the row hits L1/L2
      float dz[VEC];
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        dz[e] = rs * (d[e] * weight[cf + e] - s_g - xhat[cf + e] * s_gx) * inv_merge;
      }
      for (int mi = 0; mi < g.mh; ++mi) {
        for (int mj = 0; mj < g.mw; ++mj) {
          store_f32<T, VEC>(dx + smn_src_offset(g, row, k, c, mi, mj, dx_st, g.C), dz);
        }
      }
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < g.width; i += blockDim.x) {
    dw_partial[blockIdx.x * static_cast<int64_t>(g.width) + i] = dw_acc[i];
    db_partial[blockIdx.x * static_cast<int64_t>(g.width) + i] = db_acc[i];
  }
}

}  // namespace fcot
