// Launcher of the ToMe match kernel: geometry, grid and the caller's stream. Validation
// lives in bindings.cpp.
#include "tome_match.cuh"

namespace fcot {

void tome_match(DType dtype, const TomeMatchShape& s, const void* metric, float* score,
                int64_t* index, float eps, uintptr_t stream) {
  TomeMatchGeom g;
  g.stride_b = s.stride_b;
  g.stride_t = s.stride_t;
  g.protected_ = static_cast<int>(s.protected_tokens);
  g.n_a = static_cast<int>((s.tokens - s.protected_tokens + 1) / 2);
  g.n_b = static_cast<int>((s.tokens - s.protected_tokens) / 2);
  g.C = static_cast<int>(s.channels);
  if (g.n_a == 0 || g.n_b == 0) return;
  const dim3 grid((g.n_a + kTomeTA - 1) / kTomeTA, static_cast<unsigned>(s.batch));
  const auto st = reinterpret_cast<cudaStream_t>(stream);
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    tome_match_kernel<T><<<grid, kTomeThreads, 0, st>>>(static_cast<const T*>(metric), score, index, g, eps);
  });
  check_cuda(cudaGetLastError(), "launching tome_match_kernel");
}

}  // namespace fcot
