// Shared declarations for the ffablate::goodness_norm op family.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace ffablate {

// Geometry of one call: samples are rows of D elements, split into C channels of HW elements
// (2-D input: C = 1, HW = D, no readout).
struct Geometry {
  int64_t N = 0;
  int64_t C = 1;
  int64_t HW = 0;
  int64_t D = 0;
  bool readout = false;  // 4-D input: write the (N, C) per-channel mean of out
};

// Statistics are fp32 for half inputs: accumulation happens in fp32 and callers compare goodness in fp32.
inline at::ScalarType stat_dtype(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

// Checks shape/dtype rules common to both devices; throws c10::Error (RuntimeError in Python).
Geometry check_input(const at::Tensor& h, const char* op);

// Validates the backward's optional grads against h and returns contiguous copies in the dtypes the
// kernels read (grad_out/grad_readout: h's dtype; grad_sumsq/grad_sumabs/sumsq: stat dtype).
struct BackwardArgs {
  Geometry g;
  at::Tensor h, sumsq;
  std::optional<at::Tensor> grad_sumsq, grad_sumabs, grad_out, grad_readout;
};
BackwardArgs check_backward(const std::optional<at::Tensor>& grad_sumsq,
                            const std::optional<at::Tensor>& grad_sumabs,
                            const std::optional<at::Tensor>& grad_out,
                            const std::optional<at::Tensor>& grad_readout, const at::Tensor& h,
                            const at::Tensor& sumsq);

// Allocates (sumsq, sumabs, out, readout) with the documented shapes and dtypes.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> alloc_forward(const at::Tensor& h,
                                                                           const Geometry& g);

// ffablate::max_pool2x2's shape rules, the same on both devices (each kernel checks device and dtype itself):
// x is 4-D with H, W >= 2; grad_out is 4-D with the pooled shape of (height, width), argmax uint8 of its shape.
void check_pool_input(const at::Tensor& x, const char* op);
void check_pool_backward(const at::Tensor& grad_out, const at::Tensor& argmax, int64_t height, int64_t width,
                         const char* op);

}  // namespace ffablate
