// shuffle_merge_norm forward, float, scalar fallback for misaligned inputs: the 6 vectors-per-thread instances.
#define FCOT_SMN_DEFINE_LAUNCH
#include "shuffle_merge_norm_launch.cuh"

namespace fcot {
FCOT_SMN_INSTANTIATE_FWD(float, 1)
}  // namespace fcot
