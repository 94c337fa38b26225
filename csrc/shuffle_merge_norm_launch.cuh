// Launch templates of shuffle_merge_norm: one (direction, dtype, vector width) picks its
// vectors-per-thread instance (1, 2, 4, ... kSmnMaxItems) at run time. The definitions are
// compiled only by the small smn_*.cu files (FCOT_SMN_INSTANTIATE_FWD/_BWD, 6 kernel instances each) so
// that ninja builds them in parallel; shuffle_merge_norm.cu sees the declarations alone.
#pragma once
#include "shuffle_merge_norm.cuh"

namespace fcot {

struct SmnFwdArgs {
  const void* x;
  const float* weight;
  const float* bias;
  void* out;
  float* mean;
  float* rstd;
  float eps;
};

struct SmnBwdArgs {
  const void* x;
  const float* weight;
  const void* dy;
  const float* mean;
  const float* rstd;
  void* dx;
  float* dweight_partial;
  float* dbias_partial;
};

// Threads per block for `nvec` vectors at `items` per thread: whole warps, at least kSmnMinThreads.
inline int smn_row_threads(int nvec, int items) {
  const int t = ((nvec + items - 1) / items + 31) / 32 * 32;
  return t < kSmnMinThreads ? kSmnMinThreads : t;
}

template <typename T, int VEC>
void smn_fwd_launch(int items, const SmnGeom& g, unsigned blocks, cudaStream_t st, const SmnFwdArgs& a);
template <typename T, int VEC>
void smn_bwd_launch(int items, const SmnGeom& g, unsigned blocks, cudaStream_t st, const SmnBwdArgs& a);

#ifdef FCOT_SMN_DEFINE_LAUNCH
template <typename T, int VEC, int ITEMS>
void smn_fwd_launch_items(const SmnGeom& g, unsigned blocks, cudaStream_t st, const SmnFwdArgs& a) {
  smn_fwd_kernel<T, VEC, ITEMS><<<blocks, smn_row_threads(g.width / VEC, ITEMS), 0, st>>>(
      static_cast<const T*>(a.x), a.weight, a.bias, static_cast<T*>(a.out), a.mean, a.rstd, g, a.eps);
}

template <typename T, int VEC, int ITEMS>
void smn_bwd_launch_items(const SmnGeom& g, unsigned blocks, cudaStream_t st, const SmnBwdArgs& a) {
  smn_bwd_kernel<T, VEC, ITEMS><<<blocks, smn_row_threads(g.width / VEC, ITEMS), 0, st>>>(
      static_cast<const T*>(a.x), a.weight, static_cast<const T*>(a.dy), a.mean, a.rstd, static_cast<T*>(a.dx),
      a.dweight_partial, a.dbias_partial, g);
}

// kSmnMaxItems is 32: the cases below are every power of two up to it.
#define FCOT_SMN_ITEMS_SWITCH(LAUNCH, WHAT)                                              \
  switch (items) {                                                                     \
    case 1: LAUNCH<T, VEC, 1>(g, blocks, st, a); break;                                \
    case 2: LAUNCH<T, VEC, 2>(g, blocks, st, a); break;                                \
    case 4: LAUNCH<T, VEC, 4>(g, blocks, st, a); break;                                \
    case 8: LAUNCH<T, VEC, 8>(g, blocks, st, a); break;                                \
    case 16: LAUNCH<T, VEC, 16>(g, blocks, st, a); break;                              \
    case 32: LAUNCH<T, VEC, 32>(g, blocks, st, a); break;                              \
    default: throw std::invalid_argument("fcot_kernels._C: " WHAT ": unsupported items per thread"); \
  }
static_assert(kSmnMaxItems == 32, "FCOT_SMN_ITEMS_SWITCH lists the items up to 32");

template <typename T, int VEC>
void smn_fwd_launch(int items, const SmnGeom& g, unsigned blocks, cudaStream_t st, const SmnFwdArgs& a) {
  FCOT_SMN_ITEMS_SWITCH(smn_fwd_launch_items, "smn_fwd")
}

template <typename T, int VEC>
void smn_bwd_launch(int items, const SmnGeom& g, unsigned blocks, cudaStream_t st, const SmnBwdArgs& a) {
  FCOT_SMN_ITEMS_SWITCH(smn_bwd_launch_items, "smn_bwd")
}

// One translation unit per (direction, dtype, vector width): 6 kernel instances each.
#define FCOT_SMN_INSTANTIATE_FWD(T, VEC) \
  template void smn_fwd_launch<T, VEC>(int, const SmnGeom&, unsigned, cudaStream_t, const SmnFwdArgs&);
#define FCOT_SMN_INSTANTIATE_BWD(T, VEC) \
  template void smn_bwd_launch<T, VEC>(int, const SmnGeom&, unsigned, cudaStream_t, const SmnBwdArgs&);
#endif  // FCOT_SMN_DEFINE_LAUNCH

}  // namespace fcot
