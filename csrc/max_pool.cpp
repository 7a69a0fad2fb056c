// ffablate::max_pool2x2: 2x2, stride-2 max pooling on the CPU, optionally fused with the ReLU before it, with a
// one-byte argmax.
//
// Every downsampling block is conv -> ReLU -> pool. ATen's CPU kernel for contiguous NCHW input with indices spent
// about 10 ns per output on this project's VM, a quarter of a default FF step, and the ReLU's backward another
// full pass over the conv output. This reads x once and writes the maxima plus a byte per output: bits 0-1 say
// which of the four candidates won, bit 2 (ReLU only) that the ReLU zeroed the gradient. The backward writes
// grad_input in one pass from that byte. Values and gradients are bitwise those of
// max_pool2d_with_indices(relu_(x)) and their autograd backward: the same scan order, ATen's tie and NaN rule, the
// gradient added to zero, and threshold_backward's `result <= 0` test. So switching kernels moves no result.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include "ops.h"

#include <array>
#include <cmath>
#include <cstring>
#include <type_traits>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace ffablate {
namespace {

constexpr uint8_t kDead = 4;  // argmax bit: the ReLU output at the winner is <= 0, so no gradient flows

void check_pool_dtype(const at::Tensor& t, const char* op) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op,
              ": the CPU kernel supports float32 and float64, got ", t.scalar_type());
}

// torch.relu: x < 0 ? 0 : x (NaN and -0 pass through unchanged).
template <typename T>
inline T relu(T v) {
  return v < T(0) ? T(0) : v;
}

// ATen's rule, in its scan order (row by row): a candidate wins if it is greater than the running maximum
// or NaN, so ties keep the first and a NaN propagates.
template <typename T>
inline void take(T v, uint8_t k, T& m, uint8_t& arg) {
  const bool wins = (v > m) | (v != v);
  m = wins ? v : m;
  arg = wins ? k : arg;
}

// One output row: o[ow] and a[ow] from input rows r0, r1 (columns 2*ow, 2*ow + 1), for ow in [from, OW).
template <typename T, bool RELU>
void forward_scalar(const T* r0, const T* r1, T* o, uint8_t* a, int64_t from, int64_t OW) {
  auto in = [](T v) { return RELU ? relu(v) : v; };
  for (int64_t ow = from; ow < OW; ++ow) {
    T m = in(r0[2 * ow]);
    uint8_t k = 0;
    take(in(r0[2 * ow + 1]), 1, m, k);
    take(in(r1[2 * ow]), 2, m, k);
    take(in(r1[2 * ow + 1]), 3, m, k);
    o[ow] = m;
    a[ow] = RELU && m <= T(0) ? k | kDead : k;
  }
}

// Columns [2 * from, W) of rows r0, r1 of grad_input (the odd last column included): zeros, then each output's
// gradient at its argmax. ATen adds the gradient to a zeroed grad_input; 0 + g keeps g's bits except that -0
// becomes +0, so this adds too.
template <typename T>
void backward_scalar(const T* g, const uint8_t* a, T* r0, T* r1, int64_t from, int64_t OW, int64_t W) {
  std::fill(r0 + 2 * from, r0 + W, T(0));
  std::fill(r1 + 2 * from, r1 + W, T(0));
  for (int64_t ow = from; ow < OW; ++ow) {
    if (!(a[ow] & kDead)) (a[ow] & 2 ? r1 : r0)[2 * ow + (a[ow] & 1)] = T(0) + g[ow];
  }
}

#if defined(__SSE2__)
inline __m128 blend(__m128 mask, __m128 a, __m128 b) { return _mm_or_ps(_mm_and_ps(mask, a), _mm_andnot_ps(mask, b)); }

// Four outputs from input columns [0, 8) of rows r0 and r1: the even and odd columns of each row are the four
// window candidates.
template <bool RELU>
inline void forward4(const float* r0, const float* r1, float* o, uint8_t* a) {
  const __m128 x0 = _mm_loadu_ps(r0), x1 = _mm_loadu_ps(r0 + 4);
  const __m128 y0 = _mm_loadu_ps(r1), y1 = _mm_loadu_ps(r1 + 4);
  __m128 cand[4] = {_mm_shuffle_ps(x0, x1, _MM_SHUFFLE(2, 0, 2, 0)), _mm_shuffle_ps(x0, x1, _MM_SHUFFLE(3, 1, 3, 1)),
                    _mm_shuffle_ps(y0, y1, _MM_SHUFFLE(2, 0, 2, 0)), _mm_shuffle_ps(y0, y1, _MM_SHUFFLE(3, 1, 3, 1))};
  const __m128 zero = _mm_setzero_ps();
  if (RELU) {
    for (auto& c : cand) c = _mm_andnot_ps(_mm_cmplt_ps(c, zero), c);
  }
  __m128 m = cand[0];
  __m128i k = _mm_setzero_si128();
  for (int c = 1; c < 4; ++c) {
    const __m128 wins = _mm_or_ps(_mm_cmpgt_ps(cand[c], m), _mm_cmpunord_ps(cand[c], cand[c]));
    m = blend(wins, cand[c], m);
    k = _mm_castps_si128(blend(wins, _mm_castsi128_ps(_mm_set1_epi32(c)), _mm_castsi128_ps(k)));
  }
  if (RELU) k = _mm_or_si128(k, _mm_and_si128(_mm_castps_si128(_mm_cmple_ps(m, zero)), _mm_set1_epi32(kDead)));
  _mm_storeu_ps(o, m);
  const __m128i k16 = _mm_packs_epi32(k, k);
  const int32_t k8 = _mm_cvtsi128_si32(_mm_packus_epi16(k16, k16));
  std::memcpy(a, &k8, 4);
}

inline void backward4(const float* g, const uint8_t* a, float* r0, float* r1) {
  const __m128 v = _mm_add_ps(_mm_setzero_ps(), _mm_loadu_ps(g));
  int32_t k8;
  std::memcpy(&k8, a, 4);
  const __m128i zero = _mm_setzero_si128();
  const __m128i k = _mm_unpacklo_epi16(_mm_unpacklo_epi8(_mm_cvtsi32_si128(k8), zero), zero);
  __m128 c[4];  // a dead winner (k >= kDead) matches no candidate: its window gets zeros
  for (int j = 0; j < 4; ++j) c[j] = _mm_and_ps(_mm_castsi128_ps(_mm_cmpeq_epi32(k, _mm_set1_epi32(j))), v);
  _mm_storeu_ps(r0, _mm_unpacklo_ps(c[0], c[1]));
  _mm_storeu_ps(r0 + 4, _mm_unpackhi_ps(c[0], c[1]));
  _mm_storeu_ps(r1, _mm_unpacklo_ps(c[2], c[3]));
  _mm_storeu_ps(r1 + 4, _mm_unpackhi_ps(c[2], c[3]));
}

// The last OW % 4 outputs go through the same vector code on copies padded to four (the pad's results are
// dropped), instead of a scalar loop that costs several times more per element.
template <bool RELU>
void forward_row_sse(const float* r0, const float* r1, float* o, uint8_t* a, int64_t OW) {
  int64_t ow = 0;
  for (; ow + 4 <= OW; ow += 4) forward4<RELU>(r0 + 2 * ow, r1 + 2 * ow, o + ow, a + ow);
  if (const int64_t rest = OW - ow) {
    float x[8] = {}, y[8] = {}, m[4];
    uint8_t k[4];
    std::memcpy(x, r0 + 2 * ow, 2 * rest * sizeof(float));
    std::memcpy(y, r1 + 2 * ow, 2 * rest * sizeof(float));
    forward4<RELU>(x, y, m, k);
    std::memcpy(o + ow, m, rest * sizeof(float));
    std::memcpy(a + ow, k, rest);
  }
}

void backward_row_sse(const float* g, const uint8_t* a, float* r0, float* r1, int64_t OW, int64_t W) {
  int64_t ow = 0;
  for (; ow + 4 <= OW; ow += 4) backward4(g + ow, a + ow, r0 + 2 * ow, r1 + 2 * ow);
  backward_scalar(g, a, r0, r1, ow, OW, W);
}
#endif

// float rows take the SSE2 path; double (tests and gradcheck) the scalar one.
template <typename T, bool RELU>
void forward_row(const T* r0, const T* r1, T* o, uint8_t* a, int64_t OW) {
#if defined(__SSE2__)
  if constexpr (std::is_same_v<T, float>) return forward_row_sse<RELU>(r0, r1, o, a, OW);
#endif
  forward_scalar<T, RELU>(r0, r1, o, a, 0, OW);
}

template <typename T>
void backward_row(const T* g, const uint8_t* a, T* r0, T* r1, int64_t OW, int64_t W) {
#if defined(__SSE2__)
  if constexpr (std::is_same_v<T, float>) return backward_row_sse(g, a, r0, r1, OW, W);
#endif
  backward_scalar(g, a, r0, r1, 0, OW, W);
}

// Planes (one channel of one sample) are independent; a grain of ~32K input elements per task.
int64_t plane_grain(int64_t H, int64_t W) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(H * W, 1)); }

template <typename T, bool RELU>
void forward_cpu(const T* x, T* out, uint8_t* arg, int64_t planes, int64_t H, int64_t W) {
  const int64_t OH = H / 2, OW = W / 2;
  at::parallel_for(0, planes, plane_grain(H, W), [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      for (int64_t oh = 0; oh < OH; ++oh) {
        const T* r0 = x + (p * H + 2 * oh) * W;
        const int64_t o = (p * OH + oh) * OW;
        forward_row<T, RELU>(r0, r0 + W, out + o, arg + o, OW);
      }
    }
  });
}

template <typename T>
void backward_cpu(const T* go, const uint8_t* arg, T* gi, int64_t planes, int64_t H, int64_t W) {
  const int64_t OH = H / 2, OW = W / 2;
  at::parallel_for(0, planes, plane_grain(H, W), [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      T* plane = gi + p * H * W;
      if (OW < 4) {  // narrow planes: one fill and a scatter beat per-row calls (7x7 input: 2x faster)
        std::fill(plane, plane + H * W, T(0));
        const T* g = go + p * OH * OW;
        const uint8_t* a = arg + p * OH * OW;
        for (int64_t i = 0; i < OH * OW; ++i) {
          if (a[i] & kDead) continue;
          const int64_t oh = i / OW, ow = i % OW;
          // Bit 1 picks the row and bit 0 the column, as in the row kernels; masked, so that a byte the forward
          // never writes (the raw op can be handed any) stays inside its window.
          plane[(2 * oh + ((a[i] >> 1) & 1)) * W + 2 * ow + (a[i] & 1)] = T(0) + g[i];
        }
        continue;
      }
      for (int64_t oh = 0; oh < OH; ++oh) {
        T* r0 = plane + 2 * oh * W;
        T* r1 = r0 + W;
        const int64_t o = (p * OH + oh) * OW;
        backward_row<T>(go + o, arg + o, r0, r1, OW, W);
      }
      if (H % 2) std::fill(plane + (H - 1) * W, plane + H * W, T(0));
    }
  });
}

std::tuple<at::Tensor, at::Tensor> max_pool2x2_cpu(const at::Tensor& x_in, bool relu) {
  const char* op = "max_pool2x2";
  check_pool_input(x_in, op);
  TORCH_CHECK(x_in.device().is_cpu(), op, ": CPU kernel got a tensor on ", x_in.device());
  check_pool_dtype(x_in, op);
  const at::Tensor x = x_in.contiguous();
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  at::Tensor out = at::empty({N, C, H / 2, W / 2}, x.options());
  at::Tensor arg = at::empty({N, C, H / 2, W / 2}, x.options().dtype(at::kByte));
  if (out.numel() == 0) return {out, arg};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "max_pool2x2", [&] {
    auto kernel = relu ? forward_cpu<scalar_t, true> : forward_cpu<scalar_t, false>;
    kernel(x.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), arg.data_ptr<uint8_t>(), N * C, H, W);
  });
  return {out, arg};
}

at::Tensor max_pool2x2_backward_cpu(const at::Tensor& grad_out_in, const at::Tensor& arg_in, int64_t height,
                                    int64_t width) {
  const char* op = "max_pool2x2_backward";
  TORCH_CHECK(grad_out_in.device().is_cpu() && arg_in.device().is_cpu(), op, ": CPU kernel got tensors on ",
              grad_out_in.device(), " and ", arg_in.device());
  check_pool_dtype(grad_out_in, op);
  check_pool_backward(grad_out_in, arg_in, height, width, op);
  const int64_t N = grad_out_in.size(0), C = grad_out_in.size(1);
  const at::Tensor go = grad_out_in.contiguous(), arg = arg_in.contiguous();
  at::Tensor gi = at::empty({N, C, height, width}, go.options());
  if (gi.numel() == 0) return gi;
  AT_DISPATCH_FLOATING_TYPES(go.scalar_type(), "max_pool2x2_backward", [&] {
    backward_cpu<scalar_t>(go.const_data_ptr<scalar_t>(), arg.const_data_ptr<uint8_t>(), gi.data_ptr<scalar_t>(),
                           N * C, height, width);
  });
  return gi;
}

}  // namespace

void check_pool_input(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.defined(), op, ": x is undefined");
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D (N, C, H, W), got ", x.dim(), "-D with shape ", x.sizes());
  TORCH_CHECK(x.size(2) >= 2 && x.size(3) >= 2, op, ": H and W must be at least 2 for a 2x2 window, got ",
              x.sizes());
}

void check_pool_backward(const at::Tensor& grad_out, const at::Tensor& argmax, int64_t height, int64_t width,
                         const char* op) {
  TORCH_CHECK(grad_out.dim() == 4, op, ": grad_out must be 4-D, got ", grad_out.dim(), "-D");
  TORCH_CHECK(argmax.scalar_type() == at::kByte, op, ": argmax must be uint8, got ", argmax.scalar_type());
  TORCH_CHECK(height >= 2 && width >= 2, op, ": height and width must be at least 2, got ", height, " and ",
              width);
  const std::array<int64_t, 4> pooled{grad_out.size(0), grad_out.size(1), height / 2, width / 2};
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef(pooled), op, ": grad_out has shape ", grad_out.sizes(),
              " but pooling a ", height, "x", width, " input gives ", at::IntArrayRef(pooled));
  TORCH_CHECK(argmax.sizes() == grad_out.sizes(), op, ": argmax has shape ", argmax.sizes(), ", grad_out ",
              grad_out.sizes());
}

TORCH_LIBRARY_FRAGMENT(ffablate, m) {
  m.def("max_pool2x2(Tensor x, bool relu=False) -> (Tensor out, Tensor argmax)");
  m.def("max_pool2x2_backward(Tensor grad_out, Tensor argmax, int height, int width) -> Tensor");
}

TORCH_LIBRARY_IMPL(ffablate, CPU, m) {
  m.impl("max_pool2x2", &max_pool2x2_cpu);
  m.impl("max_pool2x2_backward", &max_pool2x2_backward_cpu);
}

}  // namespace ffablate
