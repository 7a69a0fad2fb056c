// CUDA kernels for ffablate::max_pool2x2 (fp32, fp64, fp16, bf16): ReLU + 2x2 max pool with a one-byte argmax.
//
// On the GPU the unfused ops keep two tensors for the backward: the ReLU's output, which the pool also saves as its
// input (2, 4 or 8 bytes per input element), and the pool's int64 indices (2 bytes per input element). This op keeps
// one byte per output, a quarter of a byte per input element, and runs one kernel each way instead of two forward
// and two backward. The byte is the CPU kernel's (csrc/max_pool.cpp): bits 0-1 the winning candidate, bit 2 (ReLU
// only) that the ReLU zeroed the gradient.
//
// Values and gradients are bitwise those of ATen's CUDA relu_ (clamp_min: a value below zero becomes +0, any other
// keeps its bits, -0 and NaN payloads included), max_pool2d_with_indices for NCHW input (a candidate wins if greater
// than the running maximum or NaN, scanned row by row; the winner's bits are stored as they are) and their backward
// (the gradient added to zero in the op math type, then threshold_backward's `result <= 0` test). torch 2.11's CUDA
// relu turned -0 into +0 (pytorch/pytorch#181533, fixed since); the CPU kernel and this one keep -0, as torch's CPU
// relu always did. Channels-last input does not come here (ops.max_pool2x2): ATen's NHWC backward copies the
// gradient instead of adding it to zero, and returns a channels-last output.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "ops.h"

namespace ffablate {
namespace {

constexpr uint8_t kDead = 4;  // argmax bit: the ReLU output at the winner is <= 0, so no gradient flows
constexpr int kPoolThreads = 256;

template <typename T>
using Acc = at::opmath_type<T>;

// One thread per output: its 2x2 window of x, the maximum and the byte.
template <typename T, bool RELU>
__global__ void __launch_bounds__(kPoolThreads)
    pool_forward_kernel(const T* __restrict__ x, T* __restrict__ out, uint8_t* __restrict__ arg, int64_t outputs,
                        int64_t H, int64_t W, int64_t OH, int64_t OW) {
  using A = Acc<T>;
  for (int64_t o = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; o < outputs;
       o += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t ow = o % OW, rest = o / OW;
    const int64_t oh = rest % OH, plane = rest / OH;
    const T* r0 = x + (plane * H + 2 * oh) * W + 2 * ow;
    const T cand[4] = {r0[0], r0[1], r0[W], r0[W + 1]};
    // Compared in the op math type, stored as the winner's own bits: a round trip through float would turn an
    // fp16/bf16 NaN's payload into the canonical NaN, which ATen does not.
    T best = T(0);
    A m = A(0);
    uint8_t k = 0;
#pragma unroll
    for (uint8_t c = 0; c < 4; ++c) {
      T bits = cand[c];
      A v = static_cast<A>(bits);
      if (RELU && v < A(0)) {  // relu: below zero becomes +0; -0 and NaN keep their bits
        bits = T(0);
        v = A(0);
      }
      if (c == 0 || v > m || isnan(v)) {
        best = bits;
        m = v;
        k = c;
      }
    }
    out[o] = best;
    arg[o] = RELU && m <= A(0) ? k | kDead : k;
  }
}

// One thread per input element: the output gradient where its window's byte points at it, zero elsewhere (the odd
// last row and column included). Bits 1 and 0 pick the cell, masked, so that any byte stays inside its window.
template <typename T>
__global__ void __launch_bounds__(kPoolThreads)
    pool_backward_kernel(const T* __restrict__ go, const uint8_t* __restrict__ arg, T* __restrict__ gi,
                         int64_t inputs, int64_t H, int64_t W, int64_t OH, int64_t OW) {
  using A = Acc<T>;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < inputs;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t w = i % W, rest = i / W;
    const int64_t h = rest % H, plane = rest / H;
    T v = T(0);
    if (h < 2 * OH && w < 2 * OW) {
      const int64_t o = (plane * OH + h / 2) * OW + w / 2;
      const uint8_t a = arg[o];
      if (!(a & kDead) && ((a >> 1) & 1) == (h & 1) && (a & 1) == (w & 1)) {
        v = static_cast<T>(A(0) + static_cast<A>(go[o]));
      }
    }
    gi[i] = v;
  }
}

// Enough blocks to fill the GPU several times over; the kernels' loops stride over the rest.
unsigned grid_for(int64_t items) {
  const int64_t blocks = (items + kPoolThreads - 1) / kPoolThreads;
  return static_cast<unsigned>(std::min<int64_t>(blocks, int64_t{1} << 20));
}

void check_cuda_pool_dtype(const at::Tensor& t, const char* op) {
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16, op,
              ": the CUDA kernel supports float32, float64, float16 and bfloat16, got ", s);
}

std::tuple<at::Tensor, at::Tensor> max_pool2x2_cuda(const at::Tensor& x_in, bool relu) {
  const char* op = "max_pool2x2";
  check_pool_input(x_in, op);
  TORCH_CHECK(x_in.is_cuda(), op, ": CUDA kernel got a tensor on ", x_in.device());
  check_cuda_pool_dtype(x_in, op);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  at::Tensor out = at::empty({N, C, H / 2, W / 2}, x.options());
  at::Tensor arg = at::empty({N, C, H / 2, W / 2}, x.options().dtype(at::kByte));
  const int64_t outputs = out.numel();
  if (outputs == 0) return {out, arg};
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "max_pool2x2_cuda", [&] {
    auto kernel = relu ? pool_forward_kernel<scalar_t, true> : pool_forward_kernel<scalar_t, false>;
    kernel<<<grid_for(outputs), kPoolThreads, 0, stream>>>(x.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                                                            arg.data_ptr<uint8_t>(), outputs, H, W, H / 2, W / 2);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, arg};
}

at::Tensor max_pool2x2_backward_cuda(const at::Tensor& grad_out_in, const at::Tensor& arg_in, int64_t height,
                                     int64_t width) {
  const char* op = "max_pool2x2_backward";
  TORCH_CHECK(grad_out_in.is_cuda() && arg_in.device() == grad_out_in.device(), op,
              ": CUDA kernel got tensors on ", grad_out_in.device(), " and ", arg_in.device());
  check_cuda_pool_dtype(grad_out_in, op);
  check_pool_backward(grad_out_in, arg_in, height, width, op);
  const int64_t N = grad_out_in.size(0), C = grad_out_in.size(1);
  const c10::cuda::CUDAGuard guard(grad_out_in.device());
  const at::Tensor go = grad_out_in.contiguous(), arg = arg_in.contiguous();
  at::Tensor gi = at::empty({N, C, height, width}, go.options());
  const int64_t inputs = gi.numel();
  if (inputs == 0) return gi;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, go.scalar_type(), "max_pool2x2_backward_cuda", [&] {
    pool_backward_kernel<scalar_t><<<grid_for(inputs), kPoolThreads, 0, stream>>>(
        go.const_data_ptr<scalar_t>(), arg.const_data_ptr<uint8_t>(), gi.data_ptr<scalar_t>(), inputs, height,
        width, height / 2, width / 2);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return gi;
}

}  // namespace

TORCH_LIBRARY_IMPL(ffablate, CUDA, m) {
  m.impl("max_pool2x2", &max_pool2x2_cuda);
  m.impl("max_pool2x2_backward", &max_pool2x2_backward_cuda);
}

}  // namespace ffablate
