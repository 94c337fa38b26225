// The single pybind11 boundary of fcot_kernels._C. All argument validation for the CUDA
// kernels happens here, with messages that print the offending values; the kernels assume it.
// Everything crosses as integers (device pointers, sizes, strides, the CUDA stream handle), so
// the module links neither libtorch nor Python-side CUDA bindings.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

#include "fcot_kernels.h"

namespace py = pybind11;

namespace {

template <typename... Args>
[[noreturn]] void fail(Args&&... parts) {
  std::ostringstream os;
  os << "fcot_kernels._C: ";
  (os << ... << parts);
  throw std::invalid_argument(os.str());
}

fcot::DType to_dtype(int code) {
  if (code < 0 || code > 2) fail("dtype code ", code, " is not 0 (fp32), 1 (fp16) or 2 (bf16)");
  return static_cast<fcot::DType>(code);
}

void require_ptr(uintptr_t p, const char* name) {
  if (p == 0) fail(name, " is a null pointer");
}

fcot::ShuffleMergeNormShape smn_shape(int64_t tiles, int64_t grid_h, int64_t grid_w,
                                      int64_t channels, int64_t r, int64_t merge,
                                      int64_t stride_t, int64_t stride_n) {
  if (tiles < 1 || grid_h < 1 || grid_w < 1 || channels < 1 || r < 1) {
    fail("sizes must be positive, got tiles=", tiles, " grid=(", grid_h, ", ", grid_w,
         ") channels=", channels, " r=", r);
  }
  if (channels > (int64_t{1} << 24) || r > 64 || grid_h > (int64_t{1} << 16) || grid_w > (int64_t{1} << 16)) {
    fail("channels=", channels, " r=", r, " grid=(", grid_h, ", ", grid_w,
         ") exceed the kernel's limits (C <= 2^24, r <= 64, grid sides <= 65536)");
  }
  if (grid_h % r || grid_w % r) {
    fail("grid (", grid_h, ", ", grid_w, ") is not divisible by the shuffle factor r=", r);
  }
  if (merge != 1 && merge != 2 && merge != 4) fail("merge=", merge, " is not 1, 2 or 4");
  const int64_t mh = merge == 4 ? 2 : 1, mw = merge == 1 ? 1 : 2;
  if ((grid_h / r) % mh || (grid_w / r) % mw) {
    fail("shuffled grid (", grid_h / r, ", ", grid_w / r, ") is not divisible by the merge window (",
         mh, ", ", mw, ")");
  }
  if (stride_t < 0 || stride_n < 0) fail("negative strides (", stride_t, ", ", stride_n, ")");
  const int64_t width = r * r * channels;
  if (width > (int64_t{1} << 24) || grid_h * grid_w > (int64_t{1} << 24)) {
    fail("width r*r*C=", width, " or grid ", grid_h, "x", grid_w, " exceeds the kernel's int32 indexing");
  }
  // Output rows and their offsets within a tile are divided with 32-bit multiply-shift division.
  if (tiles > ((int64_t{1} << 31) - 1) / (grid_h * grid_w)) {
    fail("tiles=", tiles, " x grid ", grid_h, "x", grid_w, " tokens exceed the kernel's 2^31 - 1 row limit");
  }
  return {tiles, grid_h, grid_w, channels, r, merge, stride_t, stride_n};
}

void check_smem(int64_t need, const char* op, const fcot::ShuffleMergeNormShape& s) {
  const int64_t have = fcot::device_max_smem_optin(fcot::current_device());
  if (need > have) {
    fail(op, " needs ", need, " bytes of shared memory for a row of width r*r*C=",
         fcot::smn_out_width(s), " but the device allows ", have, "; use the Triton backend");
  }
}

void shuffle_merge_norm_fwd(int dtype, int64_t tiles, int64_t grid_h, int64_t grid_w,
                            int64_t channels, int64_t r, int64_t merge, int64_t stride_t,
                            int64_t stride_n, uintptr_t x, uintptr_t weight, uintptr_t bias,
                            uintptr_t out, uintptr_t mean, uintptr_t rstd, double eps,
                            uintptr_t stream) {
  const auto dt = to_dtype(dtype);
  const auto s = smn_shape(tiles, grid_h, grid_w, channels, r, merge, stride_t, stride_n);
  require_ptr(x, "x");
  require_ptr(weight, "weight");
  require_ptr(bias, "bias");
  require_ptr(out, "out");
  require_ptr(mean, "mean");
  require_ptr(rstd, "rstd");
  if (!(static_cast<float>(eps) > 0.f)) fail("eps=", eps, " must be > 0 in fp32");
  check_smem(fcot::smn_fwd_smem_bytes(s), "shuffle_merge_norm_fwd", s);
  py::gil_scoped_release release;
  fcot::smn_fwd(dt, s, reinterpret_cast<const void*>(x), reinterpret_cast<const float*>(weight),
                reinterpret_cast<const float*>(bias), reinterpret_cast<void*>(out),
                reinterpret_cast<float*>(mean), reinterpret_cast<float*>(rstd),
                static_cast<float>(eps), stream);
}

void shuffle_merge_norm_bwd(int dtype, int64_t tiles, int64_t grid_h, int64_t grid_w,
                            int64_t channels, int64_t r, int64_t merge, int64_t stride_t,
                            int64_t stride_n, uintptr_t x, uintptr_t weight, uintptr_t dy,
                            uintptr_t mean, uintptr_t rstd, uintptr_t dx, uintptr_t dweight_partial,
                            uintptr_t dbias_partial, int64_t blocks, uintptr_t stream) {
  const auto dt = to_dtype(dtype);
  const auto s = smn_shape(tiles, grid_h, grid_w, channels, r, merge, stride_t, stride_n);
  require_ptr(x, "x");
  require_ptr(weight, "weight");
  require_ptr(dy, "dy");
  require_ptr(mean, "mean");
  require_ptr(rstd, "rstd");
  require_ptr(dweight_partial, "dweight_partial");
  require_ptr(dbias_partial, "dbias_partial");
  if (blocks < 1 || blocks > (int64_t{1} << 20)) fail("blocks=", blocks, " must be in [1, 2^20]");
  check_smem(fcot::smn_bwd_smem_bytes(s), "shuffle_merge_norm_bwd", s);
  py::gil_scoped_release release;
  fcot::smn_bwd(dt, s, reinterpret_cast<const void*>(x), reinterpret_cast<const float*>(weight),
                reinterpret_cast<const void*>(dy), reinterpret_cast<const float*>(mean),
                reinterpret_cast<const float*>(rstd), reinterpret_cast<void*>(dx),
                reinterpret_cast<float*>(dweight_partial), reinterpret_cast<float*>(dbias_partial),
                blocks, stream);
}

// Sizes and strides of the ToMe ops; the kernels index tokens and channels with int32.
void tome_check_sizes(const char* op, int64_t batch, int64_t tokens, int64_t channels,
                      int64_t stride_b, int64_t stride_t) {
  if (batch < 1 || tokens < 1 || channels < 1) {
    fail(op, ": sizes must be positive, got batch=", batch, " tokens=", tokens, " channels=", channels);
  }
  if (batch > 65535) fail(op, ": batch=", batch, " exceeds the grid's y limit 65535");
  if (tokens > (int64_t{1} << 30) || channels > (int64_t{1} << 30)) {
    fail(op, ": tokens=", tokens, " or channels=", channels, " exceeds the kernel's int32 indexing");
  }
  if (stride_b < 0 || stride_t < 0) fail(op, ": negative strides (", stride_b, ", ", stride_t, ")");
}

void tome_match(int dtype, int64_t batch, int64_t tokens, int64_t channels, int64_t protected_tokens,
                int64_t stride_b, int64_t stride_t, uintptr_t metric, uintptr_t score,
                uintptr_t index, double eps, uintptr_t stream) {
  const auto dt = to_dtype(dtype);
  tome_check_sizes("tome_match", batch, tokens, channels, stride_b, stride_t);
  if (protected_tokens < 0 || tokens - protected_tokens < 2) {
    fail("tome_match: protected=", protected_tokens, " must be in [0, tokens - 2] (tokens=", tokens,
         ") so that sets A and B are not empty");
  }
  require_ptr(metric, "metric");
  require_ptr(score, "score");
  require_ptr(index, "index");
  if (!(static_cast<float>(eps) > 0.f)) fail("tome_match: eps=", eps, " must be > 0 in fp32");
  py::gil_scoped_release release;
  fcot::tome_match(dt, {batch, tokens, channels, protected_tokens, stride_b, stride_t},
                   reinterpret_cast<const void*>(metric), reinterpret_cast<float*>(score),
                   reinterpret_cast<int64_t*>(index), static_cast<float>(eps), stream);
}

fcot::TomeMergeShape tome_merge_shape(const char* op, int64_t batch, int64_t tokens,
                                      int64_t tokens_out, int64_t channels, int64_t stride_b,
                                      int64_t stride_t) {
  tome_check_sizes(op, batch, tokens, channels, stride_b, stride_t);
  if (tokens_out < 1 || tokens_out > tokens) {
    fail(op, ": tokens_out=", tokens_out, " must be in [1, tokens=", tokens, "]");
  }
  return {batch, tokens, tokens_out, channels, stride_b, stride_t};
}

void tome_merge_fwd(int dtype, int64_t batch, int64_t tokens, int64_t tokens_out, int64_t channels,
                    int64_t stride_b, int64_t stride_t, uintptr_t x, uintptr_t size,
                    uintptr_t order, uintptr_t offsets, uintptr_t out, uintptr_t out_size,
                    uintptr_t stream) {
  const auto dt = to_dtype(dtype);
  const auto s = tome_merge_shape("tome_merge_fwd", batch, tokens, tokens_out, channels, stride_b, stride_t);
  require_ptr(x, "x");
  require_ptr(size, "size");
  require_ptr(order, "order");
  require_ptr(offsets, "offsets");
  require_ptr(out, "out");
  require_ptr(out_size, "out_size");
  py::gil_scoped_release release;
  fcot::tome_merge_fwd(dt, s, reinterpret_cast<const void*>(x), reinterpret_cast<const float*>(size),
                       reinterpret_cast<const int64_t*>(order), reinterpret_cast<const int64_t*>(offsets),
                       reinterpret_cast<void*>(out), reinterpret_cast<float*>(out_size), stream);
}

void tome_merge_bwd(int dtype, int64_t batch, int64_t tokens, int64_t tokens_out, int64_t channels,
                    uintptr_t dy, uintptr_t size, uintptr_t out_size, uintptr_t source, uintptr_t dx,
                    uintptr_t stream) {
  const auto dt = to_dtype(dtype);
  const auto s = tome_merge_shape("tome_merge_bwd", batch, tokens, tokens_out, channels,
                                  tokens_out * channels, channels);
  require_ptr(dy, "dy");
  require_ptr(size, "size");
  require_ptr(out_size, "out_size");
  require_ptr(source, "source");
  require_ptr(dx, "dx");
  py::gil_scoped_release release;
  fcot::tome_merge_bwd(dt, s, reinterpret_cast<const void*>(dy), reinterpret_cast<const float*>(size),
                       reinterpret_cast<const float*>(out_size), reinterpret_cast<const int64_t*>(source),
                       reinterpret_cast<void*>(dx), stream);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fcot-vl CUDA C++ kernels (raw pointers + sizes + stream; no libtorch)";
  m.def("shuffle_merge_norm_fwd", &shuffle_merge_norm_fwd,
        "Pixel shuffle + merge + LayerNorm forward. out (rows, r*r*C); mean/rstd (rows,) fp32.",
        py::arg("dtype"), py::arg("tiles"), py::arg("grid_h"), py::arg("grid_w"),
        py::arg("channels"), py::arg("r"), py::arg("merge"), py::arg("stride_t"),
        py::arg("stride_n"), py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("out"),
        py::arg("mean"), py::arg("rstd"), py::arg("eps"), py::arg("stream"));
  m.def("shuffle_merge_norm_bwd", &shuffle_merge_norm_bwd,
        "Backward: dx (contiguous, 0 to skip) and per-block fp32 partials of dweight/dbias.",
        py::arg("dtype"), py::arg("tiles"), py::arg("grid_h"), py::arg("grid_w"),
        py::arg("channels"), py::arg("r"), py::arg("merge"), py::arg("stride_t"),
        py::arg("stride_n"), py::arg("x"), py::arg("weight"), py::arg("dy"), py::arg("mean"),
        py::arg("rstd"), py::arg("dx"), py::arg("dweight_partial"), py::arg("dbias_partial"),
        py::arg("blocks"), py::arg("stream"));
  m.def("tome_match", &tome_match,
        "ToMe match: best B match per A token. score (batch, n_a) fp32, index (batch, n_a) int64.",
        py::arg("dtype"), py::arg("batch"), py::arg("tokens"), py::arg("channels"),
        py::arg("protected_tokens"), py::arg("stride_b"), py::arg("stride_t"), py::arg("metric"),
        py::arg("score"), py::arg("index"), py::arg("eps"), py::arg("stream"));
  m.def("tome_merge_fwd", &tome_merge_fwd,
        "ToMe size-weighted merge: out (batch, tokens_out, C), out_size (batch, tokens_out) fp32.",
        py::arg("dtype"), py::arg("batch"), py::arg("tokens"), py::arg("tokens_out"),
        py::arg("channels"), py::arg("stride_b"), py::arg("stride_t"), py::arg("x"), py::arg("size"),
        py::arg("order"), py::arg("offsets"), py::arg("out"), py::arg("out_size"), py::arg("stream"));
  m.def("tome_merge_bwd", &tome_merge_bwd,
        "ToMe merge backward: dx (batch, tokens, C) = size / out_size[source] * dy[source].",
        py::arg("dtype"), py::arg("batch"), py::arg("tokens"), py::arg("tokens_out"),
        py::arg("channels"), py::arg("dy"), py::arg("size"), py::arg("out_size"), py::arg("source"),
        py::arg("dx"), py::arg("stream"));
  m.attr("CUDA_ARCHS") = FCOT_CUDA_ARCHS;
}
