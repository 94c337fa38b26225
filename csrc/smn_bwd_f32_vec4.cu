// shuffle_merge_norm backward, float, 16-byte vectors: the 6 vectors-per-thread instances.
#define FCOT_SMN_DEFINE_LAUNCH
#include "shuffle_merge_norm_launch.cuh"

namespace fcot {
FCOT_SMN_INSTANTIATE_BWD(float, 4)
}  // namespace fcot
