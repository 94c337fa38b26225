// ToMe size-weighted merge and its backward (kernel bodies).
//
// Forward: one block per output token; its members (input tokens, in original order) are
// listed CSR-style by `order`/`offsets`, built by the caller. Threads stride over channels
// and sum size-weighted members in fp32 in a fixed order: deterministic, no atomics.
// Backward: one block per input token, dx_i = size_i / merged_size_o * dy_o (a gather).
#pragma once
#include "common.cuh"

namespace fcot {

// Launch configuration (tome_merge.cu, tests/compile_triton_sm90.py): one block per output
// (forward) or input (backward) token, threads = the row's vectors rounded up to whole warps,
// clamped to [kTomeMergeMinThreads, kTomeMergeMaxThreads].
constexpr int kTomeMergeMinThreads = 128;
constexpr int kTomeMergeMaxThreads = 512;

struct TomeMergeGeom {
  int64_t stride_b, stride_t;  // x strides (elements); channel stride is 1
  int tokens, tokens_out, C;
};

// VEC channels per thread step: 16-byte accesses (VEC = 16 / sizeof(T)) when C, the strides
// and the pointers allow, else 1.
template <typename T, int VEC>
__global__ void tome_merge_kernel(const T* __restrict__ x,              // (batch, tokens, C), strided
                                  const float* __restrict__ size,       // (batch, tokens)
                                  const int64_t* __restrict__ order,    // (batch, tokens)
                                  const int64_t* __restrict__ offsets,  // (batch, tokens_out + 1)
                                  T* __restrict__ out,                  // (batch, tokens_out, C)
                                  float* __restrict__ out_size,         // (batch, tokens_out)
                                  TomeMergeGeom g) {
  const int64_t o = blockIdx.x, batch = blockIdx.y;
  const int64_t start = offsets[batch * (g.tokens_out + 1) + o];
  const int64_t end = offsets[batch * (g.tokens_out + 1) + o + 1];
  const int64_t* members = order + batch * g.tokens;
  const float* sizes = size + batch * g.tokens;
  const T* xb = x + batch * g.stride_b;
  float total = 0.f;
  for (int64_t k = start; k < end; ++k) total += sizes[members[k]];
  const float inv_total = 1.f / total;
  T* dst = out + (batch * g.tokens_out + o) * g.C;
  for (int c = threadIdx.x * VEC; c < g.C; c += blockDim.x * VEC) {
    float acc[VEC] = {};
    for (int64_t k = start; k < end; ++k) {
      const int64_t i = members[k];
      const float w = sizes[i];
      float vals[VEC];
      load_f32<T, VEC>(xb + i * g.stride_t + c, vals);
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[e] += w * vals[e];
    }
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[e] *= inv_total;
    store_f32<T, VEC>(dst + c, acc);
  }
  if (threadIdx.x == 0) out_size[batch * g.tokens_out + o] = total;
}

template <typename T, int VEC>
__global__ void tome_unmerge_kernel(const T* __restrict__ dy,             // (batch, tokens_out, C)
                                    const float* __restrict__ size,       // (batch, tokens)
                                    const float* __restrict__ out_size,   // (batch, tokens_out)
                                    const int64_t* __restrict__ source,   // (batch, tokens)
                                    T* __restrict__ dx,                   // (batch, tokens, C)
                                    TomeMergeGeom g) {
  const int64_t i = blockIdx.x, batch = blockIdx.y;
  const int64_t o = source[batch * g.tokens + i];
  const float w = size[batch * g.tokens + i] / out_size[batch * g.tokens_out + o];
  const T* src = dy + (batch * g.tokens_out + o) * g.C;
  T* dst = dx + (batch * g.tokens + i) * g.C;
  for (int c = threadIdx.x * VEC; c < g.C; c += blockDim.x * VEC) {
    float vals[VEC];
    load_f32<T, VEC>(src + c, vals);
#pragma unroll
    for (int e = 0; e < VEC; ++e) vals[e] *= w;
    store_f32<T, VEC>(dst + c, vals);
  }
}

}  // namespace fcot
