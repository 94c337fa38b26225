// Host-side API of the CUDA kernels: plain integers and raw pointers only, so that
// bindings.cpp (the single pybind11 boundary) compiles without CUDA or torch headers.
#pragma once
#include <cstdint>

namespace fcot {

// Element types understood by the kernels; the Python side passes these codes.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Geometry shared by the forward and backward of shuffle_merge_norm.
struct ShuffleMergeNormShape {
  int64_t tiles;        // leading dimension of x
  int64_t grid_h;       // ViT patch grid rows
  int64_t grid_w;       // ViT patch grid columns
  int64_t channels;     // C, the ViT width
  int64_t r;            // 1 / scale (pixel-shuffle factor)
  int64_t merge;        // 1, 2 (1x2 window) or 4 (2x2 window)
  int64_t stride_t;     // x strides in elements; channel stride must be 1
  int64_t stride_n;
};

// Rows of the output: tiles * (grid_h / r) * (grid_w / r) / merge; width r*r*channels.
int64_t smn_out_rows(const ShuffleMergeNormShape& s);
int64_t smn_out_width(const ShuffleMergeNormShape& s);
// Dynamic shared memory the kernels need, in bytes; checked against the device's opt-in max.
int64_t smn_fwd_smem_bytes(const ShuffleMergeNormShape& s);
int64_t smn_bwd_smem_bytes(const ShuffleMergeNormShape& s);
int64_t device_max_smem_optin(int device);
int current_device();

// out (rows, width) in dtype; mean/rstd (rows,) fp32; weight/bias (width,) fp32.
void smn_fwd(DType dtype, const ShuffleMergeNormShape& s, const void* x, const float* weight,
             const float* bias, void* out, float* mean, float* rstd, float eps, uintptr_t stream);

// dy (rows, width) contiguous in dtype; dx (tiles, grid_h*grid_w, channels) contiguous, or
// null to skip it; dweight/dbias partials (blocks, width) fp32, summed by the caller.
void smn_bwd(DType dtype, const ShuffleMergeNormShape& s, const void* x, const float* weight,
             const void* dy, const float* mean, const float* rstd, void* dx,
             float* dweight_partial, float* dbias_partial, int64_t blocks, uintptr_t stream);

// ToMe bipartite matching over a metric (batch, tokens, channels) with unit channel stride:
// set A = tokens protected, protected+2, ...; set B = protected+1, protected+3, ...
struct TomeMatchShape {
  int64_t batch;
  int64_t tokens;
  int64_t channels;
  int64_t protected_tokens;  // leading tokens outside both sets
  int64_t stride_b;          // metric strides in elements
  int64_t stride_t;
};

// score/index (batch, n_a) with n_a = ceil((tokens - protected) / 2): best cosine similarity
// (fp32) of every A token and the B-set index achieving it (lowest on ties).
void tome_match(DType dtype, const TomeMatchShape& s, const void* metric, float* score,
                int64_t* index, float eps, uintptr_t stream);

// Size-weighted merge of x (batch, tokens, channels) into (batch, tokens_out, channels).
struct TomeMergeShape {
  int64_t batch;
  int64_t tokens;
  int64_t tokens_out;
  int64_t channels;
  int64_t stride_b;  // x strides in elements (forward only; dy and dx are contiguous)
  int64_t stride_t;
};

// order (batch, tokens) and offsets (batch, tokens_out + 1) int64 list each output token's
// members; size (batch, tokens) fp32; out in dtype, out_size (batch, tokens_out) fp32.
void tome_merge_fwd(DType dtype, const TomeMergeShape& s, const void* x, const float* size,
                    const int64_t* order, const int64_t* offsets, void* out, float* out_size,
                    uintptr_t stream);

// dx (batch, tokens, channels) = size / out_size[source] * dy[source], dy contiguous.
void tome_merge_bwd(DType dtype, const TomeMergeShape& s, const void* dy, const float* size,
                    const float* out_size, const int64_t* source, void* dx, uintptr_t stream);

}  // namespace fcot
