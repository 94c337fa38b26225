// Launchers of the ToMe merge kernels (forward and backward): geometry, grid and the caller's
// stream. Validation lives in bindings.cpp.
#include "tome_merge.cuh"

namespace fcot {
namespace {

TomeMergeGeom merge_geom(const TomeMergeShape& s) {
  TomeMergeGeom g;
  g.stride_b = s.stride_b;
  g.stride_t = s.stride_t;
  g.tokens = static_cast<int>(s.tokens);
  g.tokens_out = static_cast<int>(s.tokens_out);
  g.C = static_cast<int>(s.channels);
  return g;
}

// Enough threads to cover the row once for ViT/projector widths, at least a few warps.
int merge_threads(int64_t channels) {
  int64_t t = ((channels + 31) / 32) * 32;
  return static_cast<int>(t < kTomeMergeMinThreads ? kTomeMergeMinThreads : (t > kTomeMergeMaxThreads ? kTomeMergeMaxThreads : t));
}

template <typename T>
bool merge_vectorizable(const TomeMergeShape& s, std::initializer_list<const void*> ptrs) {
  constexpr int vec = 16 / sizeof(T);
  if (s.channels % vec || s.stride_t % vec || s.stride_b % vec) return false;
  for (const void* p : ptrs) {
    if (reinterpret_cast<uintptr_t>(p) % 16) return false;
  }
  return true;
}

}  // namespace

void tome_merge_fwd(DType dtype, const TomeMergeShape& s, const void* x, const float* size,
                    const int64_t* order, const int64_t* offsets, void* out, float* out_size,
                    uintptr_t stream) {
  const TomeMergeGeom g = merge_geom(s);
  const dim3 grid(static_cast<unsigned>(s.tokens_out), static_cast<unsigned>(s.batch));
  const auto st = reinterpret_cast<cudaStream_t>(stream);
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int kVec = 16 / sizeof(T);
    if (merge_vectorizable<T>(s, {x, out})) {
      tome_merge_kernel<T, kVec><<<grid, merge_threads(s.channels / kVec), 0, st>>>(
          static_cast<const T*>(x), size, order, offsets, static_cast<T*>(out), out_size, g);
    } else {
      tome_merge_kernel<T, 1><<<grid, merge_threads(s.channels), 0, st>>>(
          static_cast<const T*>(x), size, order, offsets, static_cast<T*>(out), out_size, g);
    }
  });
  check_cuda(cudaGetLastError(), "launching tome_merge_kernel");
}

void tome_merge_bwd(DType dtype, const TomeMergeShape& s, const void* dy, const float* size,
                    const float* out_size, const int64_t* source, void* dx, uintptr_t stream) {
  const TomeMergeGeom g = merge_geom(s);
  const dim3 grid(static_cast<unsigned>(s.tokens), static_cast<unsigned>(s.batch));
  const auto st = reinterpret_cast<cudaStream_t>(stream);
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int kVec = 16 / sizeof(T);
    // dy and dx are contiguous (batch, tokens, C): only C and the pointers decide.
    if (s.channels % kVec == 0 && reinterpret_cast<uintptr_t>(dy) % 16 == 0 && reinterpret_cast<uintptr_t>(dx) % 16 == 0) {
      tome_unmerge_kernel<T, kVec><<<grid, merge_threads(s.channels / kVec), 0, st>>>(
          static_cast<const T*>(dy), size, out_size, source, static_cast<T*>(dx), g);
    } else {
      tome_unmerge_kernel<T, 1><<<grid, merge_threads(s.channels), 0, st>>>(
          static_cast<const T*>(dy), size, out_size, source, static_cast<T*>(dx), g);
    }
  });
  check_cuda(cudaGetLastError(), "launching tome_unmerge_kernel");
}

}  // namespace fcot
