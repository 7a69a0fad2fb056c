// ffablate::goodness_norm: op schema, input validation and the CPU kernels.
//
// Forward, per sample n with D elements (C channels of HW):
//   sumsq[n] = sum h^2, sumabs[n] = sum |h|, r = rsqrt(sumsq/D + eps),
//   out = h * r, readout[n, c] = r * mean_hw h[n, c]  (4-D only).
// Backward, with g = grad_out + grad_readout[c] / HW (the readout is a linear function of out):
//   dot = sum g * h
//   dh  = r * g + h * (2 * grad_sumsq - r^3 * dot / D) + grad_sumabs * sign(h)
// so each direction needs one reduction per sample and one elementwise sweep. On the CPU a sample is
// small enough (<= a few MB) that the second sweep re-reads it from cache.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "ops.h"

namespace ffablate {

Geometry check_input(const at::Tensor& h, const char* op) {
  TORCH_CHECK(h.defined(), op, ": h is undefined");
  TORCH_CHECK(h.dim() == 2 || h.dim() == 4, op, ": h must be 2-D (N, D) or 4-D (N, C, H, W), got ",
              h.dim(), "-D with shape ", h.sizes());
  TORCH_CHECK(at::isFloatingType(h.scalar_type()), op, ": h must be a floating-point tensor, got ",
              h.scalar_type());
  Geometry g;
  g.N = h.size(0);
  g.D = h.numel() / std::max<int64_t>(g.N, 1);
  if (h.dim() == 4) {
    g.C = h.size(1);
    g.HW = h.size(2) * h.size(3);
    g.readout = true;
  } else {
    g.C = 1;
    g.HW = h.size(1);
  }
  if (g.N == 0) g.D = 1;  // nothing is computed; keeps divisions well-defined
  TORCH_CHECK(g.N == 0 || g.D > 0, op, ": each sample must have at least one element, got shape ",
              h.sizes());
  return g;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> alloc_forward(const at::Tensor& h,
                                                                           const Geometry& g) {
  auto st = h.options().dtype(stat_dtype(h.scalar_type()));
  return {at::empty({g.N}, st), at::empty({g.N}, st), at::empty_like(h, at::MemoryFormat::Contiguous),
          at::empty({g.N, g.readout ? g.C : 0}, h.options())};
}

namespace {

std::optional<at::Tensor> check_grad(const std::optional<at::Tensor>& t, const char* name,
                                     at::IntArrayRef shape, const at::Tensor& h, at::ScalarType dtype) {
  if (!t.has_value() || !t->defined()) return std::nullopt;
  TORCH_CHECK(t->device() == h.device(), "goodness_norm_backward: ", name, " is on ", t->device(),
              " but h is on ", h.device());
  TORCH_CHECK(at::isFloatingType(t->scalar_type()), "goodness_norm_backward: ", name,
              " must be floating point, got ", t->scalar_type());
  TORCH_CHECK(t->sizes() == shape, "goodness_norm_backward: ", name, " has shape ", t->sizes(),
              ", expected ", shape);
  return t->to(dtype).contiguous();
}

}  // namespace

BackwardArgs check_backward(const std::optional<at::Tensor>& grad_sumsq,
                            const std::optional<at::Tensor>& grad_sumabs,
                            const std::optional<at::Tensor>& grad_out,
                            const std::optional<at::Tensor>& grad_readout, const at::Tensor& h,
                            const at::Tensor& sumsq) {
  BackwardArgs a;
  a.g = check_input(h, "goodness_norm_backward");
  const auto st = stat_dtype(h.scalar_type());
  const std::vector<int64_t> n_shape{a.g.N};
  TORCH_CHECK(sumsq.defined(), "goodness_norm_backward: sumsq is undefined");
  a.sumsq = *check_grad(sumsq, "sumsq", n_shape, h, st);
  a.grad_sumsq = check_grad(grad_sumsq, "grad_sumsq", n_shape, h, st);
  a.grad_sumabs = check_grad(grad_sumabs, "grad_sumabs", n_shape, h, st);
  a.grad_out = check_grad(grad_out, "grad_out", h.sizes(), h, h.scalar_type());
  const std::vector<int64_t> r_shape{a.g.N, a.g.readout ? a.g.C : 0};
  a.grad_readout = check_grad(grad_readout, "grad_readout", r_shape, h, h.scalar_type());
  if (!a.g.readout) a.grad_readout = std::nullopt;  // (N, 0): nothing flows back
  a.h = h.contiguous();
  return a;
}

namespace {

// Explicit SIMD through GCC/Clang vector extensions: 16-byte vectors map 1:1 onto SSE2 on the x86-64
// baseline (no -march: the binary must run anywhere) and onto NEON on ARM. 32-byte vectors were 2x
// slower here: without AVX, GCC lowers them poorly. No -ffast-math is needed since every reduction
// keeps its own fixed lanes.
template <typename T>
struct Simd;
template <>
struct Simd<float> {
  typedef float V __attribute__((vector_size(16)));
  typedef int32_t I __attribute__((vector_size(16)));
  static constexpr int W = 4;
};
template <>
struct Simd<double> {
  typedef double V __attribute__((vector_size(16)));
  typedef int64_t I __attribute__((vector_size(16)));
  static constexpr int W = 2;
};

template <typename T>
using V = typename Simd<T>::V;
template <typename T>
using I = typename Simd<T>::I;

template <typename T>
inline V<T> load(const T* p) {
  V<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T>
inline void store(T* p, V<T> v) {
  std::memcpy(p, &v, sizeof(v));
}
// Streaming (non-temporal) stores for outputs too large to stay in cache: they skip the read-for-ownership
// a normal store pays, so writing out/dh costs one memory transfer instead of two.
template <typename T>
inline void store_nt(T* p, V<T> v) {
#if defined(__SSE2__)
  if constexpr (std::is_same_v<T, float>)
    _mm_stream_ps(p, reinterpret_cast<__m128>(v));
  else
    _mm_stream_pd(p, reinterpret_cast<__m128d>(v));
#else
  store(p, v);
#endif
}
inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}
constexpr int64_t kStreamBytes = 16 << 20;  // about half this machine class's L3
// Reductions sum a row in blocks of this many elements, each in short vector lanes, and add the block sums in
// double: a lane that ran over a whole 2^21-element row drifted by 6e-5 (relative) in fp32.
constexpr int64_t kBlock = 4096;

template <typename T>
inline V<T> splat(T x) {
  V<T> v;  // not `V<T>{} + x`: 0.0 + -0.0 is +0.0, which would lose the sign-bit mask
  for (int l = 0; l < Simd<T>::W; ++l) v[l] = x;
  return v;
}
template <typename T>
inline I<T> sign_bits() {
  return (I<T>)splat<T>(T(-0.0));
}
template <typename T>
inline V<T> vabs(V<T> v) {
  return (V<T>)((I<T>)v & ~sign_bits<T>());
}
// sign(v) with sign(0) = sign(NaN) = 0, matching torch.abs's gradient (and the scalar sgn below).
template <typename T>
inline V<T> vsign(V<T> v) {
  const I<T> one = (I<T>)splat<T>(T(1));
  const I<T> nonzero = (I<T>)(v > splat<T>(T(0))) | (I<T>)(v < splat<T>(T(0)));  // false for 0 and NaN
  return (V<T>)((one | ((I<T>)v & sign_bits<T>())) & nonzero);
}
template <typename T>
inline T hsum(V<T> v) {
  T s = 0;
  for (int l = 0; l < Simd<T>::W; ++l) s += v[l];
  return s;
}
template <typename T>
inline T sgn(T v) {
  return T(v > T(0)) - T(v < T(0));
}

// Streaming needs 16-byte aligned vectors at every sample/channel start and only pays off when the
// output would not fit in cache anyway.
template <typename T>
bool use_streaming(const T* out, const Geometry& g) {
  const bool aligned = reinterpret_cast<uintptr_t>(out) % 32 == 0 && g.HW % Simd<T>::W == 0 &&
                       g.D % Simd<T>::W == 0;
  const char* env = std::getenv("FFABLATE_CPU_STREAM");  // "0" disables, for A/B timing
  if (env != nullptr && env[0] == '0') return false;
  return aligned && g.N * g.D * int64_t(sizeof(T)) >= kStreamBytes;
}

// Pass 2 of a sample reads it from cache and streams its output out; the next sample's reads from memory would
// start only when its pass 1 misses. Prefetching the next sample's lines during pass 2 overlaps the two:
// 0.80-0.89x the forward+backward time on the bench shapes (scripts/cpu-kernel-ab.py, docs/kernels.md). The
// forward's lines are fetched into every cache level; the backward's, h and grad_out together, twice the
// bytes, into the outer levels only (measured faster there).
bool use_prefetch() {
  const char* env = std::getenv("FFABLATE_CPU_PREFETCH");  // "0" disables, for A/B timing
  return env == nullptr || env[0] != '0';
}
constexpr int64_t kLineBytes = 64;

// out[i..i+W) = x[i..i+W) * r, streamed or stored.
template <typename T>
inline void scale_vector(const T* x, T* out, int64_t i, V<T> rv, bool nt) {
  if (nt)
    store_nt(out + i, load(x + i) * rv);
  else
    store(out + i, load(x + i) * rv);
}

// ``next``: the sample this thread sweeps next (nullptr: none, or no prefetching).
template <typename T, bool READOUT>
void forward_sample(const T* x, T* out, T* readout, T* sumsq, T* sumabs, const Geometry& g, double eps,
                    bool nt, const T* next) {
  constexpr int W = Simd<T>::W;
  // Without a readout the channel split is irrelevant: reduce the sample as one long row.
  const int64_t C = READOUT ? g.C : 1;
  const int64_t HW = READOUT ? g.HW : g.D;
  double sq = 0, ab = 0;
  for (int64_t c = 0; c < C; ++c) {
    double sum = 0;
    for (int64_t b = 0; b < HW; b += kBlock) {
      const T* p = x + c * HW + b;
      const int64_t len = std::min(kBlock, HW - b);
      V<T> s0{}, s1{}, q0{}, q1{}, a0{}, a1{};  // two chains each to hide add latency
      int64_t i = 0;
      for (; i + 2 * W <= len; i += 2 * W) {
        const V<T> u = load(p + i), v = load(p + i + W);
        if constexpr (READOUT) s0 += u, s1 += v;
        q0 += u * u, q1 += v * v;
        a0 += vabs<T>(u), a1 += vabs<T>(v);
      }
      T s = 0, q = 0, a = 0;
      for (; i < len; ++i) {
        const T v = p[i];
        if constexpr (READOUT) s += v;
        q += v * v;
        a += std::abs(v);
      }
      if constexpr (READOUT) sum += hsum<T>(s0 + s1) + s;
      sq += hsum<T>(q0 + q1) + q;
      ab += hsum<T>(a0 + a1) + a;
    }
    if constexpr (READOUT) readout[c] = static_cast<T>(sum);
  }
  *sumsq = static_cast<T>(sq);
  *sumabs = static_cast<T>(ab);
  const T r = T(1) / std::sqrt(*sumsq / T(g.D) + T(eps));
  const V<T> rv = splat<T>(r);
  // Whole lines first when prefetching (the next sample's line at the same offset; a fixed count of vectors
  // per line, which the compiler unrolls), then the rest.
  constexpr int64_t L = kLineBytes / sizeof(T);
  int64_t i = 0;
  if (next != nullptr) {
    for (; i + L <= g.D; i += L) {
      __builtin_prefetch(next + i, 0, 3);
      for (int64_t j = i; j < i + L; j += W) scale_vector(x, out, j, rv, nt);
    }
  }
  for (; i + W <= g.D; i += W) scale_vector(x, out, i, rv, nt);
  for (; i < g.D; ++i) out[i] = x[i] * r;
  if constexpr (READOUT) {
    const T rc = r / T(g.HW);
    for (int64_t c = 0; c < g.C; ++c) readout[c] *= rc;
  }
}

template <typename T>
void forward_cpu(const at::Tensor& h, const Geometry& g, double eps, at::Tensor& sumsq, at::Tensor& sumabs,
                 at::Tensor& out, at::Tensor& readout) {
  const T* x = h.const_data_ptr<T>();
  T* o = out.mutable_data_ptr<T>();
  T* ro = g.readout ? readout.mutable_data_ptr<T>() : nullptr;
  T* sq = sumsq.mutable_data_ptr<T>();
  T* sa = sumabs.mutable_data_ptr<T>();
  const int64_t grain = std::max<int64_t>(1, 32768 / g.D);
  const bool nt = use_streaming<T>(o, g), pf = use_prefetch();
  at::parallel_for(0, g.N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const T* next = pf && n + 1 < end ? x + (n + 1) * g.D : nullptr;
      if (g.readout)
        forward_sample<T, true>(x + n * g.D, o + n * g.D, ro + n * g.C, sq + n, sa + n, g, eps, nt, next);
      else
        forward_sample<T, false>(x + n * g.D, o + n * g.D, nullptr, sq + n, sa + n, g, eps, nt, next);
    }
    if (nt) stream_fence();
  });
}

template <typename T, bool GO, bool GR, bool GA>
void backward_sample(const T* x, const T* go, const T* gr, const T* gs, T ga, T sumsq, T* dh, const Geometry& g,
                     double eps, bool nt, const T* next_x, const T* next_go) {
  constexpr int W = Simd<T>::W;
  const int64_t C = GR ? g.C : 1;
  const int64_t HW = GR ? g.HW : g.D;
  const T r = T(1) / std::sqrt(sumsq / T(g.D) + T(eps));
  const T inv_hw = T(1) / T(g.HW);
  double dot = 0;
  if constexpr (GO || GR) {
    for (int64_t c = 0; c < C; ++c) {
      double sum = 0, d_c = 0;
      for (int64_t b = 0; b < HW; b += kBlock) {
        const T* p = x + c * HW + b;
        const T* q = GO ? go + c * HW + b : nullptr;
        const int64_t len = std::min(kBlock, HW - b);
        V<T> s0{}, s1{}, d0{}, d1{};
        int64_t i = 0;
        for (; i + 2 * W <= len; i += 2 * W) {
          const V<T> u = load(p + i), v = load(p + i + W);
          if constexpr (GR) s0 += u, s1 += v;
          if constexpr (GO) d0 += u * load(q + i), d1 += v * load(q + i + W);
        }
        T s = 0, d = 0;
        for (; i < len; ++i) {
          if constexpr (GR) s += p[i];
          if constexpr (GO) d += q[i] * p[i];
        }
        if constexpr (GR) sum += hsum<T>(s0 + s1) + s;
        if constexpr (GO) d_c += hsum<T>(d0 + d1) + d;
      }
      dot += d_c;
      if constexpr (GR) dot += static_cast<double>(gr[c] * inv_hw) * sum;
    }
  }
  // Only the terms of gradients that exist: with goodness gradients alone, r (inf for an all-zero sample at
  // eps = 0) and h * 0 (NaN where h is inf) must not reach dh, as they do not in the reference's autograd.
  T coef = gs ? T(2) * *gs : T(0);
  if constexpr (GO || GR) coef -= r * r * r * static_cast<T>(dot) / T(g.D);
  const bool scale_h = gs != nullptr || GO || GR;
  const V<T> coefv = splat<T>(coef), rv = splat<T>(r), gav = splat<T>(ga);
  for (int64_t c = 0; c < C; ++c) {
    const T* p = x + c * HW;
    T* o = dh + c * HW;
    const T* q = GO ? go + c * HW : nullptr;
    const T shift = GR ? r * gr[c] * inv_hw : T(0);
    const V<T> shiftv = splat<T>(shift);
    // Line by line when prefetching (the next sample's line at the same offset), in one run otherwise. Not
    // the forward's fixed count per line: unrolled around vsign, GCC 12 fails (an internal compiler error).
    const int64_t step = next_x != nullptr ? kLineBytes / int64_t(sizeof(T)) : HW;
    int64_t i = 0;
    for (int64_t line = 0; line < HW; line += step) {
      if (next_x != nullptr) {
        __builtin_prefetch(next_x + c * HW + line, 0, 1);
        if (GO && next_go != nullptr) __builtin_prefetch(next_go + c * HW + line, 0, 1);
      }
      const int64_t stop = std::min(line + step, HW);
      for (; i + W <= stop; i += W) {
        const V<T> v = load(p + i);
        V<T> res = shiftv;
        if (scale_h) res += v * coefv;
        if constexpr (GO) res += rv * load(q + i);
        if constexpr (GA) res += gav * vsign<T>(v);
        if (nt)
          store_nt(o + i, res);
        else
          store(o + i, res);
      }
    }
    for (; i < HW; ++i) {
      const T v = p[i];
      T res = shift;
      if (scale_h) res += v * coef;
      if constexpr (GO) res += r * q[i];
      if constexpr (GA) res += ga * sgn(v);
      o[i] = res;
    }
  }
}

template <typename T, bool GO, bool GR, bool GA>
void backward_cpu_impl(const BackwardArgs& a, double eps, at::Tensor& dh) {
  const Geometry& g = a.g;
  const T* x = a.h.const_data_ptr<T>();
  const T* go = GO ? a.grad_out->const_data_ptr<T>() : nullptr;
  const T* gr = GR ? a.grad_readout->const_data_ptr<T>() : nullptr;
  const T* gs = a.grad_sumsq ? a.grad_sumsq->const_data_ptr<T>() : nullptr;
  const T* ga = GA ? a.grad_sumabs->const_data_ptr<T>() : nullptr;
  const T* sq = a.sumsq.const_data_ptr<T>();
  T* o = dh.mutable_data_ptr<T>();
  const int64_t grain = std::max<int64_t>(1, 32768 / g.D);
  const bool nt = use_streaming<T>(o, g), pf = use_prefetch();
  at::parallel_for(0, g.N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const bool ahead = pf && n + 1 < end;
      backward_sample<T, GO, GR, GA>(x + n * g.D, GO ? go + n * g.D : nullptr, GR ? gr + n * g.C : nullptr,
                                     gs ? gs + n : nullptr, GA ? ga[n] : T(0), sq[n], o + n * g.D, g, eps, nt,
                                     ahead ? x + (n + 1) * g.D : nullptr,
                                     GO && ahead ? go + (n + 1) * g.D : nullptr);
    }
    if (nt) stream_fence();
  });
}

template <typename T>
void backward_cpu(const BackwardArgs& a, double eps, at::Tensor& dh) {
  const int key = (a.grad_out ? 4 : 0) | (a.grad_readout ? 2 : 0) | (a.grad_sumabs ? 1 : 0);
  switch (key) {
    case 0: return backward_cpu_impl<T, false, false, false>(a, eps, dh);
    case 1: return backward_cpu_impl<T, false, false, true>(a, eps, dh);
    case 2: return backward_cpu_impl<T, false, true, false>(a, eps, dh);
    case 3: return backward_cpu_impl<T, false, true, true>(a, eps, dh);
    case 4: return backward_cpu_impl<T, true, false, false>(a, eps, dh);
    case 5: return backward_cpu_impl<T, true, false, true>(a, eps, dh);
    case 6: return backward_cpu_impl<T, true, true, false>(a, eps, dh);
    default: return backward_cpu_impl<T, true, true, true>(a, eps, dh);
  }
}

void check_cpu_dtype(const at::Tensor& h, const char* op) {
  TORCH_CHECK(h.scalar_type() == at::kFloat || h.scalar_type() == at::kDouble, op,
              ": the CPU kernel supports float32 and float64, got ", h.scalar_type(),
              " (ffablate.ops.goodness_norm falls back to the reference for other dtypes)");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> goodness_norm_cpu(const at::Tensor& h_in,
                                                                               double eps) {
  const Geometry g = check_input(h_in, "goodness_norm");
  check_cpu_dtype(h_in, "goodness_norm");
  TORCH_CHECK(h_in.device().is_cpu(), "goodness_norm: CPU kernel got a tensor on ", h_in.device());
  TORCH_CHECK(eps >= 0, "goodness_norm: eps must be >= 0, got ", eps);
  const at::Tensor h = h_in.contiguous();
  auto [sumsq, sumabs, out, readout] = alloc_forward(h, g);
  if (g.N == 0) return {sumsq, sumabs, out, readout};
  if (h.scalar_type() == at::kFloat)
    forward_cpu<float>(h, g, eps, sumsq, sumabs, out, readout);
  else
    forward_cpu<double>(h, g, eps, sumsq, sumabs, out, readout);
  return {sumsq, sumabs, out, readout};
}

at::Tensor goodness_norm_backward_cpu(const std::optional<at::Tensor>& grad_sumsq,
                                      const std::optional<at::Tensor>& grad_sumabs,
                                      const std::optional<at::Tensor>& grad_out,
                                      const std::optional<at::Tensor>& grad_readout, const at::Tensor& h,
                                      const at::Tensor& sumsq, double eps) {
  check_cpu_dtype(h, "goodness_norm_backward");
  TORCH_CHECK(h.device().is_cpu(), "goodness_norm_backward: CPU kernel got h on ", h.device());
  TORCH_CHECK(eps >= 0, "goodness_norm_backward: eps must be >= 0, got ", eps);
  const BackwardArgs a = check_backward(grad_sumsq, grad_sumabs, grad_out, grad_readout, h, sumsq);
  at::Tensor dh = at::empty_like(a.h, at::MemoryFormat::Contiguous);
  if (a.g.N == 0) return dh;
  if (h.scalar_type() == at::kFloat)
    backward_cpu<float>(a, eps, dh);
  else
    backward_cpu<double>(a, eps, dh);
  return dh;
}

}  // namespace

TORCH_LIBRARY(ffablate, m) {
  m.def("goodness_norm(Tensor h, float eps) -> (Tensor sumsq, Tensor sumabs, Tensor out, Tensor readout)");
  m.def(
      "goodness_norm_backward(Tensor? grad_sumsq, Tensor? grad_sumabs, Tensor? grad_out, "
      "Tensor? grad_readout, Tensor h, Tensor sumsq, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(ffablate, CPU, m) {
  m.impl("goodness_norm", &goodness_norm_cpu);
  m.impl("goodness_norm_backward", &goodness_norm_backward_cpu);
}

}  // namespace ffablate

// Importing ffablate._C runs the static registrations above; the module itself only reports the build.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
#ifdef WITH_CUDA
  m.attr("WITH_CUDA") = true;
#else
  m.attr("WITH_CUDA") = false;
#endif
}
