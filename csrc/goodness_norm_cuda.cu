// CUDA kernels for ffablate::goodness_norm (fp32, fp16, bf16 I/O; fp32 accumulation).
//
// Work split: a sample's D elements are cut into G chunks of at most kChunk elements. A chunk is either
// K whole channels (HW <= kChunk) or 1/S of one channel (HW > kChunk), so per-channel readout sums
// never straddle blocks except through the S published sub-sums. One block holds one chunk in
// registers (16-byte vector loads when aligned, all issued before any is used), reduces it, and then
// writes its outputs from the registers, so h (and grad_out) are read from DRAM exactly once. The forward
// also stages the chunk in shared memory as fp32 when it needs per-channel readout sums.
//
// The per-sample reduction across the G blocks of a sample needs a rendezvous:
//  * single-pass (default): blocks take a ticket from a global counter (so a block only ever waits on
//    blocks that are already running or that can be scheduled: tickets are handed out in order), publish
//    their partial sums, bump the sample's arrival counter and spin until all G partials are in. Every
//    block then sums the G partials in the same fixed order, so results are bitwise deterministic (no
//    floating-point atomics). Used only when G blocks fit on the GPU at once, four times over; that bound makes
//    the wait deadlock-free, with room for kernels on other streams.
//  * two-pass fallback (G too large, or FFABLATE_CUDA_SINGLE_PASS=0): a stats launch publishes the
//    partials, an apply launch re-reads h and finishes. Same arithmetic, same results.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>

#include "ops.h"

namespace ffablate {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kChunk = 4096;  // elements per block: 16 KB of fp32 staging

enum Mode : int { kSinglePass = 0, kStatsOnly = 1, kApply = 2 };

struct Plan {
  int64_t N, D, C, HW;
  int G;       // blocks per sample
  int K;       // whole channels per block; 0 in split mode
  int S;       // blocks per channel in split mode; 1 otherwise
  int64_t Ls;  // split-mode chunk length (multiple of 8, so chunks stay 16-byte aligned)
  bool readout;
  float eps;
  float inv_d, inv_hw;
};

Plan make_plan(const Geometry& g, double eps) {
  Plan p{};
  p.N = g.N;
  p.D = g.D;
  p.readout = g.readout;
  p.C = g.readout ? g.C : 1;
  p.HW = g.readout ? g.HW : g.D;
  if (p.HW <= kChunk) {
    p.K = static_cast<int>(std::min<int64_t>(kChunk / p.HW, p.C));
    p.S = 1;
    p.G = static_cast<int>((p.C + p.K - 1) / p.K);
  } else {
    p.K = 0;
    int64_t S = (p.HW + kChunk - 1) / kChunk;
    p.Ls = ((p.HW + S - 1) / S + 7) / 8 * 8;
    p.S = static_cast<int>((p.HW + p.Ls - 1) / p.Ls);
    p.G = static_cast<int>(p.C * p.S);
  }
  p.eps = static_cast<float>(eps);
  p.inv_d = 1.0f / static_cast<float>(p.D);
  p.inv_hw = 1.0f / static_cast<float>(p.HW);
  return p;
}

// Chunk g of a sample: element offset and length within the sample, first channel and channel count.
struct Chunk {
  int64_t off, len;
  int64_t c0;
  int nch;  // channels covered (split mode: 1)
  int s;    // sub-chunk index in split mode
};

__device__ __forceinline__ Chunk chunk_of(const Plan& p, int g) {
  Chunk ch;
  if (p.K > 0) {
    ch.c0 = static_cast<int64_t>(g) * p.K;
    ch.nch = static_cast<int>(p.C - ch.c0 < p.K ? p.C - ch.c0 : p.K);
    ch.off = ch.c0 * p.HW;
    ch.len = ch.nch * p.HW;
    ch.s = 0;
  } else {
    ch.c0 = g / p.S;
    ch.s = g % p.S;
    ch.nch = 1;
    ch.off = ch.c0 * p.HW + ch.s * p.Ls;
    ch.len = p.HW - ch.s * p.Ls < p.Ls ? p.HW - ch.s * p.Ls : p.Ls;
  }
  return ch;
}

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// Stores one pack with a single 16-byte instruction when it is 16 bytes. Storing the struct itself leaves
// NVVM free to split it into per-element stores, which it does for some unrolled iterations.
template <typename T, int VEC>
__device__ __forceinline__ void store_pack(T* dst, const Pack<T, VEC>& v) {
  if constexpr (sizeof(Pack<T, VEC>) == sizeof(uint4)) {
    uint4 bits;
    memcpy(&bits, &v, sizeof(bits));
    __stwb(reinterpret_cast<uint4*>(dst), bits);
  } else {
    *reinterpret_cast<Pack<T, VEC>*>(dst) = v;
  }
}

// A chunk is at most kChunk elements, so a thread owns at most kIters vectors of it: element offsets
// (it * kThreads + threadIdx.x) * VEC. Each thread issues all its loads before using any of them (the
// loops over `it` are unrolled and the values stay in registers), which keeps kIters loads in flight per
// thread instead of one: the kernels are bound by DRAM latency times bytes in flight.
template <int VEC>
struct Iters {
  static constexpr int kIters = kChunk / (kThreads * VEC);
  static_assert(kIters * kThreads * VEC == kChunk, "kChunk must be a multiple of kThreads * VEC");
  // Calls f(it, i) for each of this thread's vectors that starts inside a chunk of len elements.
  template <typename F>
  __device__ static __forceinline__ void each(int64_t len, F&& f) {
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int64_t i = (static_cast<int64_t>(it) * kThreads + threadIdx.x) * VEC;
      if (i < len) f(it, i);
    }
  }
};

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;  // valid in lane 0
}

// Deterministic block sum of NV values; every thread gets the same result.
template <int NV>
__device__ __forceinline__ void block_sum(float (&v)[NV], float (*red)[kWarps]) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    const float w = warp_sum(v[k]);
    if (lane == 0) red[k][warp] = w;
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) s += red[k][w];
    v[k] = s;
  }
  __syncthreads();
}

__device__ __forceinline__ int64_t take_ticket(int mode, int* sync, int64_t N, int* s_bid) {
  if (mode != kSinglePass) return blockIdx.x;
  if (threadIdx.x == 0) *s_bid = atomicAdd(sync + N, 1);
  __syncthreads();
  return *s_bid;
}

// Publishes this block's partials and (single pass) waits until all G blocks of sample n did.
template <int NV>
__device__ __forceinline__ void publish_and_wait(int mode, const float (&v)[NV], float* ws, int* sync,
                                                 int64_t n, int g, int G) {
  if (threadIdx.x == 0) {
    float* dst = ws + (n * G + g) * NV;
#pragma unroll
    for (int k = 0; k < NV; ++k) dst[k] = v[k];
    if (mode == kSinglePass) {
      __threadfence();
      atomicAdd(sync + n, 1);
      volatile int* cnt = sync + n;
      while (*cnt < G) __nanosleep(64);
      __threadfence();
    }
  }
  __syncthreads();
}

// Sum of the G published partials of sample n, in a fixed order (identical in every block).
template <int NV, int NREAD>
__device__ __forceinline__ void gather_totals(const float* ws, int64_t n, int G, float (&out)[NREAD],
                                              float* bcast) {
  if (threadIdx.x < 32) {
    float acc[NREAD] = {};
    for (int j = threadIdx.x; j < G; j += 32) {
      const float* src = ws + (n * G + j) * NV;
#pragma unroll
      for (int k = 0; k < NREAD; ++k) acc[k] += __ldcg(src + k);  // L2: written by other SMs
    }
#pragma unroll
    for (int k = 0; k < NREAD; ++k) {
      acc[k] = warp_sum(acc[k]);
      if (threadIdx.x == 0) bcast[k] = acc[k];
    }
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < NREAD; ++k) out[k] = bcast[k];
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const T* __restrict__ h, T* __restrict__ out, T* __restrict__ readout,
                   float* __restrict__ sumsq, float* __restrict__ sumabs, float* ws, int* sync, Plan p,
                   int mode) {
  using It = Iters<VEC>;
  __shared__ __align__(16) float buf[kChunk];  // the chunk as fp32, for the per-channel readout sums
  __shared__ float chs[kChunk];
  __shared__ float red[3][kWarps];
  __shared__ float bcast[2];
  __shared__ int s_bid;

  const int64_t bid = take_ticket(mode, sync, p.N, &s_bid);
  const int64_t n = bid / p.G;
  const int g = static_cast<int>(bid % p.G);
  const Chunk ch = chunk_of(p, g);
  const T* x = h + n * p.D + ch.off;
  const bool per_channel = p.readout && p.K > 0 && mode != kStatsOnly;

  Pack<T, VEC> pk[It::kIters];
  It::each(ch.len, [&](int it, int64_t i) { pk[it] = *reinterpret_cast<const Pack<T, VEC>*>(x + i); });
  float v3[3] = {0.f, 0.f, 0.f};  // sumsq, sumabs, sum (split-mode channel part)
  It::each(ch.len, [&](int it, int64_t i) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float f = static_cast<float>(pk[it].v[j]);
      if (per_channel) buf[i + j] = f;
      v3[0] += f * f;
      v3[1] += fabsf(f);
      v3[2] += f;
    }
  });
  block_sum<3>(v3, red);  // also makes buf visible block-wide

  if (per_channel) {
    if (p.HW >= 32) {
      const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
      for (int k = warp; k < ch.nch; k += kWarps) {
        float s = 0.f;
        for (int64_t i = lane; i < p.HW; i += 32) s += buf[k * p.HW + i];
        s = warp_sum(s);
        if (lane == 0) chs[k] = s;
      }
    } else {
      for (int k = threadIdx.x; k < ch.nch; k += kThreads) {
        float s = 0.f;
        for (int64_t i = 0; i < p.HW; ++i) s += buf[k * p.HW + i];
        chs[k] = s;
      }
    }
  }

  if (mode != kApply) {
    publish_and_wait<3>(mode, v3, ws, sync, n, g, p.G);
    if (mode == kStatsOnly) return;
  }
  float tot[2];
  gather_totals<3, 2>(ws, n, p.G, tot, bcast);
  const float r = rsqrtf(tot[0] * p.inv_d + p.eps);
  if (g == 0 && threadIdx.x == 0) {
    sumsq[n] = tot[0];
    sumabs[n] = tot[1];
  }

  T* o = out + n * p.D + ch.off;
  It::each(ch.len, [&](int it, int64_t i) {
    Pack<T, VEC> po;
#pragma unroll
    for (int j = 0; j < VEC; ++j) po.v[j] = static_cast<T>(static_cast<float>(pk[it].v[j]) * r);
    store_pack<T, VEC>(o + i, po);
  });
  if (p.readout) {
    T* ro = readout + n * p.C;
    const float scale = r * p.inv_hw;
    if (p.K > 0) {
      for (int k = threadIdx.x; k < ch.nch; k += kThreads) ro[ch.c0 + k] = static_cast<T>(chs[k] * scale);
    } else if (ch.s == 0 && threadIdx.x == 0) {
      float s = 0.f;
      for (int j = 0; j < p.S; ++j) s += __ldcg(ws + (n * p.G + g + j) * 3 + 2);
      ro[ch.c0] = static_cast<T>(s * scale);
    }
  }
}

struct BwdPtrs {
  const float* grad_sumsq;   // (N,) or null
  const float* grad_sumabs;  // (N,) or null
  const float* sumsq;        // (N,)
};

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const T* __restrict__ h, const T* __restrict__ go, const T* __restrict__ gr,
                    BwdPtrs bp, T* __restrict__ dh, float* ws, int* sync, Plan p, int mode, bool need_dot) {
  using It = Iters<VEC>;
  __shared__ float red[1][kWarps];
  __shared__ float bcast[1];
  __shared__ int s_bid;

  const int64_t bid = take_ticket(need_dot ? mode : kApply, sync, p.N, &s_bid);
  const int64_t n = bid / p.G;
  const int g = static_cast<int>(bid % p.G);
  const Chunk ch = chunk_of(p, g);
  const T* x = h + n * p.D + ch.off;
  const T* q = go ? go + n * p.D + ch.off : nullptr;
  const T* grn = gr ? gr + n * p.C : nullptr;

  Pack<T, VEC> ph[It::kIters], pg[It::kIters];
  It::each(ch.len, [&](int it, int64_t i) {
    ph[it] = *reinterpret_cast<const Pack<T, VEC>*>(x + i);
    if (q) pg[it] = *reinterpret_cast<const Pack<T, VEC>*>(q + i);
  });
  // e = the effective output gradient: the readout is linear in out, so its gradient folds into grad_out;
  // a vector never straddles a channel (vector loads require HW % VEC == 0).
  float e[It::kIters][VEC];
  float dot[1] = {0.f};
  It::each(ch.len, [&](int it, int64_t i) {
    const float gshift = grn ? static_cast<float>(grn[ch.c0 + (p.K > 0 ? i / p.HW : 0)]) * p.inv_hw : 0.f;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      e[it][j] = (q ? static_cast<float>(pg[it].v[j]) : 0.f) + gshift;
      dot[0] += e[it][j] * static_cast<float>(ph[it].v[j]);
    }
  });
  float total_dot = 0.f;
  if (need_dot) {
    block_sum<1>(dot, red);
    if (mode != kApply) {
      publish_and_wait<1>(mode, dot, ws, sync, n, g, p.G);
      if (mode == kStatsOnly) return;
    }
    float tot[1];
    gather_totals<1, 1>(ws, n, p.G, tot, bcast);
    total_dot = tot[0];
  }

  const float r = rsqrtf(bp.sumsq[n] * p.inv_d + p.eps);
  const float gs = bp.grad_sumsq ? bp.grad_sumsq[n] : 0.f;
  const float ga = bp.grad_sumabs ? bp.grad_sumabs[n] : 0.f;
  const float coef = 2.f * gs - r * r * r * total_dot * p.inv_d;
  T* o = dh + n * p.D + ch.off;
  It::each(ch.len, [&](int it, int64_t i) {
    Pack<T, VEC> pd;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float f = static_cast<float>(ph[it].v[j]);
      const float sgn = f > 0.f ? 1.f : (f < 0.f ? -1.f : 0.f);
      pd.v[j] = static_cast<T>(r * e[it][j] + f * coef + ga * sgn);
    }
    store_pack<T, VEC>(o + i, pd);
  });
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

bool single_pass_allowed() {
  const char* env = std::getenv("FFABLATE_CUDA_SINGLE_PASS");
  return env == nullptr || env[0] != '0';
}

// Resident blocks per SM times SMs, cached per kernel and device: the occupancy query costs several
// microseconds, as much as a small launch, and its answer never changes.
template <typename Kernel>
int64_t resident_blocks(Kernel kernel) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int64_t> cache[kMaxDevices];  // zero-initialized: static storage
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  if (dev < kMaxDevices) {
    const int64_t known = cache[dev].load(std::memory_order_relaxed);
    if (known > 0) return known;
  }
  int per_sm = 0, sms = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  const int64_t blocks = static_cast<int64_t>(per_sm) * sms;
  if (dev < kMaxDevices) cache[dev].store(blocks, std::memory_order_relaxed);
  return blocks;
}

// The single-pass rendezvous is deadlock-free only if a whole sample's G blocks can be resident at once. The
// occupancy figure assumes this kernel has the GPU to itself; a kernel on another stream, or an MPS share of the
// SMs, can hold some of them, so single pass takes at most a quarter of the figure (realistic G is far below).
constexpr int64_t kResidencyMargin = 4;

template <typename Kernel>
int pick_mode(Kernel kernel, const Plan& p) {
  if (!single_pass_allowed()) return kStatsOnly;
  return static_cast<int64_t>(p.G) * kResidencyMargin <= resident_blocks(kernel) ? kSinglePass : kStatsOnly;
}

// Zeroed ticket and arrival counters: a memset node rather than a fill kernel (cheaper to launch).
at::Tensor zeroed_counters(int64_t n, const at::Tensor& like, cudaStream_t stream) {
  at::Tensor sync = at::empty({n}, like.options().dtype(at::kInt));
  C10_CUDA_CHECK(cudaMemsetAsync(sync.data_ptr<int>(), 0, n * sizeof(int), stream));
  return sync;
}

void check_cuda_dtype(const at::Tensor& h, const char* op) {
  const auto t = h.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16, op,
              ": the CUDA kernel supports float32, float16 and bfloat16, got ", t);
}

template <typename T, int VEC>
void launch_forward(const at::Tensor& h, const Plan& p, at::Tensor& sumsq, at::Tensor& sumabs,
                    at::Tensor& out, at::Tensor& readout) {
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t blocks = p.N * p.G;
  TORCH_CHECK(blocks < (int64_t{1} << 31), "goodness_norm: input too large (", blocks, " blocks)");
  auto ws = at::empty({p.N * p.G * 3}, h.options().dtype(at::kFloat));
  auto kernel = forward_kernel<T, VEC>;
  const int mode = pick_mode(kernel, p);
  at::Tensor sync;
  if (mode == kSinglePass) sync = zeroed_counters(p.N + 1, h, stream);
  int* sp = mode == kSinglePass ? sync.data_ptr<int>() : nullptr;
  T* ro = p.readout ? readout.data_ptr<T>() : nullptr;
  const T* x = reinterpret_cast<const T*>(h.const_data_ptr());
  kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(x, out.data_ptr<T>(), ro, sumsq.data_ptr<float>(),
                                          sumabs.data_ptr<float>(), ws.data_ptr<float>(), sp, p, mode);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (mode == kStatsOnly) {
    kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(x, out.data_ptr<T>(), ro, sumsq.data_ptr<float>(),
                                            sumabs.data_ptr<float>(), ws.data_ptr<float>(), sp, p, kApply);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename T>
void forward_dispatch(const at::Tensor& h, const Plan& p, at::Tensor& sumsq, at::Tensor& sumabs,
                      at::Tensor& out, at::Tensor& readout) {
  constexpr int VEC = 16 / sizeof(T);
  const bool vec = aligned16(h.const_data_ptr()) && aligned16(out.data_ptr()) && p.HW % VEC == 0;
  if (vec)
    launch_forward<T, VEC>(h, p, sumsq, sumabs, out, readout);
  else
    launch_forward<T, 1>(h, p, sumsq, sumabs, out, readout);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> goodness_norm_cuda(const at::Tensor& h_in,
                                                                                double eps) {
  const Geometry g = check_input(h_in, "goodness_norm");
  check_cuda_dtype(h_in, "goodness_norm");
  TORCH_CHECK(h_in.is_cuda(), "goodness_norm: CUDA kernel got a tensor on ", h_in.device());
  TORCH_CHECK(eps >= 0, "goodness_norm: eps must be >= 0, got ", eps);
  const c10::cuda::CUDAGuard guard(h_in.device());
  const at::Tensor h = h_in.contiguous();
  auto [sumsq, sumabs, out, readout] = alloc_forward(h, g);
  if (g.N == 0) return {sumsq, sumabs, out, readout};
  const Plan p = make_plan(g, eps);
  switch (h.scalar_type()) {
    case at::kFloat: forward_dispatch<float>(h, p, sumsq, sumabs, out, readout); break;
    case at::kHalf: forward_dispatch<at::Half>(h, p, sumsq, sumabs, out, readout); break;
    default: forward_dispatch<at::BFloat16>(h, p, sumsq, sumabs, out, readout); break;
  }
  return {sumsq, sumabs, out, readout};
}

template <typename T, int VEC>
void launch_backward(const BackwardArgs& a, const Plan& p, at::Tensor& dh) {
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t blocks = p.N * p.G;
  TORCH_CHECK(blocks < (int64_t{1} << 31), "goodness_norm_backward: input too large (", blocks, " blocks)");
  const bool need_dot = a.grad_out.has_value() || a.grad_readout.has_value();
  auto kernel = backward_kernel<T, VEC>;
  const int mode = need_dot ? pick_mode(kernel, p) : kApply;
  at::Tensor ws, sync;
  if (need_dot) ws = at::empty({p.N * p.G}, a.h.options().dtype(at::kFloat));
  if (mode == kSinglePass) sync = zeroed_counters(p.N + 1, a.h, stream);
  BwdPtrs bp{a.grad_sumsq ? a.grad_sumsq->const_data_ptr<float>() : nullptr,
             a.grad_sumabs ? a.grad_sumabs->const_data_ptr<float>() : nullptr, a.sumsq.const_data_ptr<float>()};
  const T* x = reinterpret_cast<const T*>(a.h.const_data_ptr());
  const T* go = a.grad_out ? reinterpret_cast<const T*>(a.grad_out->const_data_ptr()) : nullptr;
  const T* gr = a.grad_readout ? reinterpret_cast<const T*>(a.grad_readout->const_data_ptr()) : nullptr;
  float* wsp = need_dot ? ws.data_ptr<float>() : nullptr;
  int* sp = mode == kSinglePass ? sync.data_ptr<int>() : nullptr;
  kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(x, go, gr, bp, dh.data_ptr<T>(), wsp, sp, p, mode, need_dot);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (mode == kStatsOnly) {
    kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(x, go, gr, bp, dh.data_ptr<T>(), wsp, sp, p, kApply, need_dot);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename T>
void backward_dispatch(const BackwardArgs& a, const Plan& p, at::Tensor& dh) {
  constexpr int VEC = 16 / sizeof(T);
  bool vec = aligned16(a.h.const_data_ptr()) && aligned16(dh.data_ptr()) && p.HW % VEC == 0;
  if (a.grad_out) vec = vec && aligned16(a.grad_out->const_data_ptr());
  if (vec)
    launch_backward<T, VEC>(a, p, dh);
  else
    launch_backward<T, 1>(a, p, dh);
}

at::Tensor goodness_norm_backward_cuda_impl(const std::optional<at::Tensor>& grad_sumsq,
                                            const std::optional<at::Tensor>& grad_sumabs,
                                            const std::optional<at::Tensor>& grad_out,
                                            const std::optional<at::Tensor>& grad_readout,
                                            const at::Tensor& h, const at::Tensor& sumsq, double eps) {
  check_cuda_dtype(h, "goodness_norm_backward");
  TORCH_CHECK(h.is_cuda(), "goodness_norm_backward: CUDA kernel got h on ", h.device());
  const c10::cuda::CUDAGuard guard(h.device());
  const BackwardArgs a = check_backward(grad_sumsq, grad_sumabs, grad_out, grad_readout, h, sumsq);
  at::Tensor dh = at::empty_like(a.h, at::MemoryFormat::Contiguous);
  if (a.g.N == 0) return dh;
  const Plan p = make_plan(a.g, eps);
  switch (h.scalar_type()) {
    case at::kFloat: backward_dispatch<float>(a, p, dh); break;
    case at::kHalf: backward_dispatch<at::Half>(a, p, dh); break;
    default: backward_dispatch<at::BFloat16>(a, p, dh); break;
  }
  return dh;
}

}  // namespace

TORCH_LIBRARY_IMPL(ffablate, CUDA, m) {
  m.impl("goodness_norm", &goodness_norm_cuda);
  m.impl("goodness_norm_backward", &goodness_norm_backward_cuda_impl);
}

}  // namespace ffablate
