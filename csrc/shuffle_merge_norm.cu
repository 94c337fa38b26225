// Launchers for shuffle_merge_norm: pick the vector width, the vectors per thread, block size
// and grid, and launch on the caller's stream. Validation lives in bindings.cpp. The kernel
// instances are compiled by the smn_{fwd,bwd}_<dtype>_<vec>.cu files (shuffle_merge_norm_launch.cuh).
#include "shuffle_merge_norm_launch.cuh"

namespace fcot {
namespace {

SmnGeom make_geom(const ShuffleMergeNormShape& s) {
  SmnGeom g;
  g.stride_t = s.stride_t;
  g.stride_n = s.stride_n;
  g.rows = smn_out_rows(s);
  g.grid_w = static_cast<int>(s.grid_w);
  g.grid_hw = static_cast<int>(s.grid_h * s.grid_w);
  g.C = static_cast<int>(s.channels);
  g.r = static_cast<int>(s.r);
  g.mh = s.merge == 4 ? 2 : 1;
  g.mw = s.merge == 1 ? 1 : 2;
  g.out_w = static_cast<int>(s.grid_w / s.r / g.mw);
  g.tokens_out = g.rows / s.tiles;
  g.width = static_cast<int>(smn_out_width(s));
  g.div_tokens_out = make_fast_div(g.tokens_out);
  g.div_out_w = make_fast_div(g.out_w);
  g.div_C = make_fast_div(g.C);
  g.div_r = make_fast_div(g.r);
  g.inv_merge = 1.f / static_cast<float>(g.mh * g.mw);
  g.inv_width = 1.f / static_cast<float>(g.width);
  return g;
}

// 16-byte accesses need the channel count and every row start (x strides, base pointers)
// to be multiples of the vector; otherwise fall back to scalar accesses.
template <typename T>
bool can_vectorize(const ShuffleMergeNormShape& s, std::initializer_list<const void*> ptrs) {
  constexpr int vec = 16 / sizeof(T);
  if (s.channels % vec || s.stride_n % vec || s.stride_t % vec) return false;
  for (const void* p : ptrs) {
    if (p != nullptr && reinterpret_cast<uintptr_t>(p) % 16) return false;
  }
  return true;
}

}  // namespace

int64_t smn_out_rows(const ShuffleMergeNormShape& s) {
  return s.tiles * (s.grid_h / s.r) * (s.grid_w / s.r) / s.merge;
}
int64_t smn_out_width(const ShuffleMergeNormShape& s) { return s.r * s.r * s.channels; }
int64_t smn_fwd_smem_bytes(const ShuffleMergeNormShape& s) {
  (void)s;  // the forward keeps its row in registers: only the static reduction scratch
  return 0;
}
int64_t smn_bwd_smem_bytes(const ShuffleMergeNormShape& s) {
  (void)s;  // the backward keeps its row state in registers: only the static reduction scratch
  return 0;
}

int current_device() {
  int dev = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  return dev;
}

int64_t device_max_smem_optin(int device) {
  int v = 0;
  check_cuda(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
             "cudaDeviceGetAttribute(MaxSharedMemoryPerBlockOptin)");
  return v;
}

namespace {

// Vectors per thread (forward and backward): the fewest (1, 2, 4, ... kSmnMaxItems) that cover
// the row with at most kSmnMaxThreads threads (the kernels' launch bound). The target (W = 4096
// bf16) is 1 vector of 8 per thread, 512 threads; the 6B width 4; only the unaligned scalar path
// goes higher.
int row_items(int nvec) {
  int items = 1;
  while (items < kSmnMaxItems && (nvec + items - 1) / items > kSmnMaxThreads) items *= 2;
  return items;
}

void check_items(int nvec, int items, int width, const char* op) {
  if ((nvec + items - 1) / items > kSmnMaxThreads) {
    throw std::invalid_argument(std::string("fcot_kernels._C: ") + op + ": row width r*r*C=" + std::to_string(width) +
                                " needs more than " + std::to_string(kSmnMaxThreads) + " threads x " +
                                std::to_string(kSmnMaxItems) + " vectors; use the Triton backend");
  }
}

}  // namespace

void smn_fwd(DType dtype, const ShuffleMergeNormShape& s, const void* x, const float* weight,
             const float* bias, void* out, float* mean, float* rstd, float eps, uintptr_t stream) {
  const SmnGeom g = make_geom(s);
  if (g.rows == 0) return;
  const auto st = reinterpret_cast<cudaStream_t>(stream);
  // One block per row while rows are few; the grid-stride loop keeps any row count correct.
  const unsigned blocks = static_cast<unsigned>(g.rows < (1 << 20) ? g.rows : (1 << 20));
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int kVec = 16 / sizeof(T);
    const bool vec = can_vectorize<T>(s, {x, out});
    const int nvec = vec ? g.width / kVec : g.width;
    const int items = row_items(nvec);
    check_items(nvec, items, g.width, "shuffle_merge_norm_fwd");
    const SmnFwdArgs a{x, weight, bias, out, mean, rstd, eps};
    if (vec) {
      smn_fwd_launch<T, kVec>(items, g, blocks, st, a);
    } else {
      smn_fwd_launch<T, 1>(items, g, blocks, st, a);
    }
  });
  check_cuda(cudaGetLastError(), "launching smn_fwd_kernel");
}

void smn_bwd(DType dtype, const ShuffleMergeNormShape& s, const void* x, const float* weight,
             const void* dy, const float* mean, const float* rstd, void* dx,
             float* dweight_partial, float* dbias_partial, int64_t blocks, uintptr_t stream) {
  const SmnGeom g = make_geom(s);
  const auto st = reinterpret_cast<cudaStream_t>(stream);
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int kVec = 16 / sizeof(T);
    const bool vec = can_vectorize<T>(s, {x, dy, dx});
    const int nvec = vec ? g.width / kVec : g.width;
    const int items = row_items(nvec);
    check_items(nvec, items, g.width, "shuffle_merge_norm_bwd");
    const SmnBwdArgs a{x, weight, dy, mean, rstd, dx, dweight_partial, dbias_partial};
    if (vec) {
      smn_bwd_launch<T, kVec>(items, g, static_cast<unsigned>(blocks), st, a);
    } else {
      smn_bwd_launch<T, 1>(items, g, static_cast<unsigned>(blocks), st, a);
    }
  });
  check_cuda(cudaGetLastError(), "launching smn_bwd_kernel");
}

}  // namespace fcot
