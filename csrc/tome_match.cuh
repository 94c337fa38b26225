// ToMe bipartite matching: best B match of every A token by cosine similarity (kernel body).
//
// A block owns kTA tokens of set A of one tile and walks set B in kTB-token tiles. Each tile's
// a.b products accumulate over kTC-channel chunks staged in shared memory (fp32), each thread
// holding a 4x4 micro-tile; B norms are computed per tile, A norms once. The scores of a tile
// live only in registers: a half-warp reduces each A row to (max, lowest argmax) and the
// running best per row stays in registers, so the |A| x |B| matrix is never written.
//
// Scores are (a.b * (1/|a|)) * (1/|b|) with IEEE sqrt/div and explicit round-to-nearest
// multiplies, the expression of the PyTorch reference: bit-identical on exact inputs.
#pragma once
#include <climits>

#include "common.cuh"

namespace fcot {

struct TomeMatchGeom {
  int64_t stride_b, stride_t;  // metric strides (elements); channel stride is 1
  int n_a, n_b;                // sizes of sets A and B
  int protected_;              // leading tokens outside both sets
  int C;                       // metric width
};

constexpr int kTomeTA = 64;        // A tokens per block
constexpr int kTomeTB = 64;        // B tokens per tile
constexpr int kTomeTC = 32;        // channels per shared-memory chunk
constexpr int kTomeThreads = 256;  // 16 x 16 threads, 4 x 4 scores each

// 1 / max(|row|, eps) of `count` rows starting at `first`, row k at first + 2k; one warp per row.
template <typename T>
__device__ __forceinline__ void tome_inv_norms(const T* base, const TomeMatchGeom& g, int first,
                                               int start, int count, int limit, float eps,
                                               float* inv) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int i = warp; i < count; i += kTomeThreads / 32) {
    const int k = start + i;
    float sq = 0.f;
    if (k < limit) {
      const T* row = base + static_cast<int64_t>(first + 2 * k) * g.stride_t;
      for (int c = lane; c < g.C; c += 32) {
        const float v = to_f32(row[c]);
        sq += v * v;
      }
    }
    sq = warp_sum(sq);
    if (lane == 0) inv[i] = 1.f / fmaxf(sqrtf(sq), eps);
  }
}

__device__ __forceinline__ float tome_neg_inf() { return -__int_as_float(0x7f800000); }

// (value, index) of the better candidate: higher value, then lower index.
__device__ __forceinline__ void tome_better(float& m, int& mi, float v, int vi) {
  if (v > m || (v == m && vi < mi)) {
    m = v;
    mi = vi;
  }
}

template <typename T>
__global__ void __launch_bounds__(kTomeThreads)
tome_match_kernel(const T* __restrict__ metric,  // (batch, tokens, C), strided, unit channel stride
                  float* __restrict__ score,     // (batch, n_a)
                  int64_t* __restrict__ index,   // (batch, n_a), B-set indices
                  TomeMatchGeom g, float eps) {
  // Chunks stored channel-major with one float of padding: conflict-free transposing stores.
  __shared__ float as[kTomeTC][kTomeTA + 1];
  __shared__ float bs[kTomeTC][kTomeTB + 1];
  __shared__ float inv_a[kTomeTA];
  __shared__ float inv_b[kTomeTB];
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
  const int64_t batch = blockIdx.y;
  const int a0 = blockIdx.x * kTomeTA;
  const T* base = metric + batch * g.stride_b;

  tome_inv_norms(base, g, g.protected_, a0, kTomeTA, g.n_a, eps, inv_a);
  float best[4];
  int best_idx[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    best[i] = tome_neg_inf();
    best_idx[i] = 0;
  }

  for (int b0 = 0; b0 < g.n_b; b0 += kTomeTB) {
    __syncthreads();  // the previous tile's inv_b is no longer read
    tome_inv_norms(base, g, g.protected_ + 1, b0, kTomeTB, g.n_b, eps, inv_b);
    float acc[4][4] = {};
    for (int c0 = 0; c0 < g.C; c0 += kTomeTC) {
      __syncthreads();
      for (int e = threadIdx.x; e < kTomeTA * kTomeTC; e += kTomeThreads) {
        const int row = e / kTomeTC, c = e - row * kTomeTC;
        const int ka = a0 + row, kb = b0 + row, gc = c0 + c;
        as[c][row] = (ka < g.n_a && gc < g.C)
                         ? to_f32(base[static_cast<int64_t>(g.protected_ + 2 * ka) * g.stride_t + gc])
                         : 0.f;
        bs[c][row] = (kb < g.n_b && gc < g.C)
                         ? to_f32(base[static_cast<int64_t>(g.protected_ + 2 * kb + 1) * g.stride_t + gc])
                         : 0.f;
      }
      __syncthreads();
#pragma unroll 8
      for (int k = 0; k < kTomeTC; ++k) {
        float av[4], bv[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) av[i] = as[k][ty * 4 + i];
#pragma unroll
        for (int j = 0; j < 4; ++j) bv[j] = bs[k][tx + 16 * j];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
        }
      }
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float m = tome_neg_inf();
      int mi = INT_MAX;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int col = tx + 16 * j;
        if (b0 + col < g.n_b) {
          const float s = __fmul_rn(__fmul_rn(acc[i][j], inv_a[ty * 4 + i]), inv_b[col]);
          tome_better(m, mi, s, b0 + col);
        }
      }
      // The 16 threads of a row form a half-warp: xor offsets < 16 stay inside it.
#pragma unroll
      for (int off = 8; off > 0; off >>= 1) {
        const float om = __shfl_xor_sync(0xffffffffu, m, off);
        const int oi = __shfl_xor_sync(0xffffffffu, mi, off);
        tome_better(m, mi, om, oi);
      }
      // Strictly greater: an earlier tile (lower index) keeps ties.
      if (m > best[i]) {
        best[i] = m;
        best_idx[i] = mi;
      }
    }
  }
  if (tx == 0) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int ka = a0 + ty * 4 + i;
      if (ka < g.n_a) {
        score[batch * g.n_a + ka] = best[i];
        index[batch * g.n_a + ka] = best_idx[i];
      }
    }
  }
}

}  // namespace fcot
