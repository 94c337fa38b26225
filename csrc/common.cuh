// Small device helpers shared by the kernels: packed vector access, fp32 conversion,
// block reductions and the dtype switch.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "fcot_kernels.h"

namespace fcot {

template <typename T> __device__ __forceinline__ float to_f32(T v);
template <> __device__ __forceinline__ float to_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f32<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// VEC elements moved as one aligned access (16 bytes when VEC * sizeof(T) == 16).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// A struct copy of Pack<bf16, 8> is lowered to 2-byte accesses; going through uint4 gives
// the single 128-bit LDG/STG the layout allows.
template <typename T, int VEC>
__device__ __forceinline__ void load_f32(const T* p, float (&out)[VEC]) {
  Pack<T, VEC> pk;
  if constexpr (sizeof(pk) == 16) {
    *reinterpret_cast<uint4*>(&pk) = *reinterpret_cast<const uint4*>(p);
  } else {
    pk = *reinterpret_cast<const Pack<T, VEC>*>(p);
  }
#pragma unroll
  for (int i = 0; i < VEC; ++i) out[i] = to_f32(pk.v[i]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_f32(T* p, const float (&in)[VEC]) {
  Pack<T, VEC> pk;
#pragma unroll
  for (int i = 0; i < VEC; ++i) pk.v[i] = from_f32<T>(in[i]);
  if constexpr (sizeof(pk) == 16) {
    // Streaming store: outputs here are far larger than L2 and are not re-read by this kernel.
    __stcs(reinterpret_cast<uint4*>(p), *reinterpret_cast<const uint4*>(&pk));
  } else {
    *reinterpret_cast<Pack<T, VEC>*>(p) = pk;
  }
}

// fp32 row slice store, 16 bytes at a time when VEC allows (p 16-byte aligned then).
template <int VEC>
__device__ __forceinline__ void store_f32_plain(float* p, const float (&in)[VEC]) {
  if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int j = 0; j < VEC / 4; ++j) {
      reinterpret_cast<float4*>(p)[j] = make_float4(in[4 * j], in[4 * j + 1], in[4 * j + 2], in[4 * j + 3]);
    }
  } else {
#pragma unroll
    for (int e = 0; e < VEC; ++e) p[e] = in[e];
  }
}

struct SumOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};
// Max without NaN propagation: not needed by the callers (a NaN row poisons its sums anyway).
struct MaxOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

template <typename Op>
__device__ __forceinline__ float warp_reduce(float v, Op op) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) { return warp_reduce(v, SumOp{}); }

// Reduction over the block; every thread gets the result. scratch holds >= 32 floats and may be
// reused right after the call returns. The identity 0 serves both ops (block_max is used on
// magnitudes, which are >= 0).
template <typename Op>
__device__ __forceinline__ float block_reduce(float v, float* scratch, Op op) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int warps = (blockDim.x + 31) >> 5;
  v = warp_reduce(v, op);
  __syncthreads();  // scratch may still be read by a previous reduction
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < warps ? scratch[lane] : 0.f;
  return warp_reduce(v, op);
}

__device__ __forceinline__ float block_sum(float v, float* scratch) { return block_reduce(v, scratch, SumOp{}); }
__device__ __forceinline__ float block_max(float v, float* scratch) { return block_reduce(v, scratch, MaxOp{}); }

// 2**floor(log2(a)) clamped to [1, 2**126]: the exact scale that keeps the LayerNorm statistics
// of a row with max magnitude `a` from overflowing (rows below 2 are left as they are).
__device__ __forceinline__ float ln_row_scale(float a) {
  const int bits = __float_as_int(a) & 0x7f800000;
  return __int_as_float(min(max(bits, 0x3f800000), 0x7e800000));
}

// Division by a divisor fixed at launch without the ~20-instruction integer divide sequence
// (32-bit) or the division subroutine (64-bit): q = (umulhi(n, mul) + n) >> shift, with mul and
// shift computed once on the host (Granlund & Montgomery's round-up method). Exact for every
// 0 <= n < 2^31 and 1 <= d < 2^31 (tests/csrc/test_fast_div.py checks it against `/`); callers
// keep dividends below 2^31 (bindings.cpp checks the sizes).
struct FastDiv {
  uint32_t d = 1, mul = 0, shift = 0;
};

inline FastDiv make_fast_div(int64_t d) {
  if (d < 1 || d >= (int64_t{1} << 31)) {
    throw std::invalid_argument("fcot_kernels._C: divisor " + std::to_string(d) + " outside [1, 2^31)");
  }
  FastDiv f;
  f.d = static_cast<uint32_t>(d);
  while ((uint64_t{1} << f.shift) < f.d) ++f.shift;
  f.mul = static_cast<uint32_t>(((uint64_t{1} << 32) * ((uint64_t{1} << f.shift) - f.d)) / f.d + 1);
  return f;
}

// n / f.d for 0 <= n < 2^31: one IMAD.HI, one add, one shift on the device (the host version,
// the same arithmetic, is what tests/csrc/test_fast_div.py checks against `/`).
__host__ __device__ __forceinline__ int fast_div(const FastDiv& f, int n) {
  const uint32_t u = static_cast<uint32_t>(n);
#ifdef __CUDA_ARCH__
  const uint32_t hi = __umulhi(u, f.mul);
#else
  const uint32_t hi = static_cast<uint32_t>((static_cast<uint64_t>(u) * f.mul) >> 32);
#endif
  return static_cast<int>((hi + u) >> f.shift);
}

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("fcot_kernels._C: ") + what + ": " + cudaGetErrorString(err));
  }
}

// Calls f(T{}) with T the C++ element type of dtype.
template <typename F>
void dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: f(float{}); break;
    case DType::kFloat16: f(__half{}); break;
    case DType::kBFloat16: f(__nv_bfloat16{}); break;
    default: throw std::invalid_argument("fcot_kernels._C: unknown dtype code");
  }
}

}  // namespace fcot
