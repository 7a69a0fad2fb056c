// CUDA kernels for ffablate::goodness_norm (fp32, fp16, bf16 I/O; fp32 accumulation).
//
// Work split: a sample's D elements are cut into G chunks of at most kChunkBytes (16 KB: 4096 fp32 or 8192
// fp16/bf16 elements). A chunk is either K whole channels (HW <= chunk) or 1/S of one channel (HW > chunk),
// so per-channel readout sums never straddle blocks except through the S published sub-sums. One block
// copies its chunk into shared memory (cp.async on the 16-byte path: the bytes are in flight without
// holding registers, so many blocks fit on an SM), reduces it, and writes its outputs from shared memory,
// so h (and grad_out) are read from DRAM exactly once.
//
// The per-sample reduction across the G blocks of a sample needs a rendezvous; FFABLATE_CUDA_SCHEDULE picks it:
//  * solo (G = 1): the block's own sum is the total; no counters, no workspace.
//  * ticket (single pass): blocks take a ticket from a global counter (so a block only ever waits on
//    blocks that are already running or that can be scheduled: tickets are handed out in order), publish
//    their partial sums, bump the sample's arrival counter and spin until all G partials are in. Every
//    block then sums the G partials in the same fixed order, so results are bitwise deterministic (no
//    floating-point atomics). Used only when G blocks fit on the GPU at once, four times over; that bound makes
//    the wait deadlock-free, with room for kernels on other streams.
//  * flagged (default since session 14: 1.01-1.09x ticket's speed on the multi-block H200 shapes): the ticket
//    path's launch and order, but each block publishes its partials as flagged 8-byte words (below) and reads its
//    siblings' words as they fill: no fence, arrival counter or second read. Same sum order, same bits.
//  * lagged (session 15, not yet run on a GPU): one launch of two blocks per chunk. A stats block copies its chunk,
//    publishes its partials as flagged words and exits; about 2 x lag tickets later an apply block copies it again
//    (from L2, when the bytes moved in between fit there), reads the published totals and writes. An apply block
//    waits only on stats blocks with earlier tickets, which are running or done and never wait, so it is
//    deadlock-free at any residency, and no tile sits idle while its siblings load. Same sum order, same bits.
//  * two-pass (G too large, or FFABLATE_CUDA_SCHEDULE=two-pass): a stats launch publishes the partials, an
//    apply launch re-reads h and finishes. Same arithmetic, same results.
//  * cluster (session 18, not yet run on a GPU; sm_90 and later, else flagged): a sample is cut into at most 16
//    chunks as large as FFABLATE_CUDA_CLUSTER_KB of shared memory allows (default 104 KB, two blocks per SM), and its
//    blocks form one thread-block cluster, which the hardware starts and keeps together: they load at once, and a
//    chunk that long evens out how long each load takes, so the wait at the cluster barrier should be short. The
//    partials travel through distributed shared memory. Other chunks mean another summation order: its own bits.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_pipeline.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <tuple>
#include <type_traits>

#include "ops.h"

namespace ffablate {
namespace {

// Threads per block, build knobs only for A/B timing on a GPU (NVCC_APPEND_FLAGS=-DFFABLATE_CUDA_THREADS=128 for
// both kernels, -DFFABLATE_CUDA_FORWARD_THREADS=128 for the forward alone): fewer threads per block let more
// blocks, and so more tiles, share an SM. On the H200 (session 14) 128 sped the forward and slowed the backward.
#ifndef FFABLATE_CUDA_THREADS
#define FFABLATE_CUDA_THREADS 256
#endif
#ifndef FFABLATE_CUDA_FORWARD_THREADS
#define FFABLATE_CUDA_FORWARD_THREADS FFABLATE_CUDA_THREADS
#endif
constexpr int kForwardThreads = FFABLATE_CUDA_FORWARD_THREADS;
constexpr int kBackwardThreads = FFABLATE_CUDA_THREADS;
static_assert(kForwardThreads == 128 || kForwardThreads == 256, "FFABLATE_CUDA_FORWARD_THREADS must be 128 or 256");
static_assert(kBackwardThreads == 128 || kBackwardThreads == 256, "FFABLATE_CUDA_THREADS must be 128 or 256");
constexpr int kChunkBytes = 16384;  // one chunk's shared-memory tile
// Whole channels per chunk (their readout sums live in the forward's shared memory). At 128 threads 256 (1 KB)
// leaves room for 10 forward blocks per SM; only maps of fewer than 16 pixels (32 in fp16/bf16) have more channels
// per tile. Each kernel plans its chunks with its own thread count's bound.
template <int NT>
constexpr int kMaxK = NT == 256 ? 1024 : 256;

template <typename T>
constexpr int chunk_elems() {
  return kChunkBytes / static_cast<int>(sizeof(T));
}

enum Mode : int { kSinglePass = 0, kStatsOnly = 1, kApply = 2, kSolo = 3 };

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

Plan make_plan(const Geometry& g, double eps, int chunk, int max_k) {
  Plan p{};
  p.N = g.N;
  p.D = g.D;
  p.readout = g.readout;
  p.C = g.readout ? g.C : 1;
  p.HW = g.readout ? g.HW : g.D;
  if (p.HW <= chunk) {
    p.K = static_cast<int>(std::min<int64_t>({chunk / p.HW, p.C, max_k}));
    p.S = 1;
    p.G = static_cast<int>((p.C + p.K - 1) / p.K);
  } else {
    p.K = 0;
    int64_t S = (p.HW + chunk - 1) / chunk;
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
  int64_t off;  // within the sample
  int len;      // at most one tile
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
    ch.len = static_cast<int>(ch.nch * p.HW);
    ch.s = 0;
  } else {
    ch.c0 = g / p.S;
    ch.s = g % p.S;
    ch.nch = 1;
    ch.off = ch.c0 * p.HW + ch.s * p.Ls;
    ch.len = static_cast<int>(p.HW - ch.s * p.Ls < p.Ls ? p.HW - ch.s * p.Ls : p.Ls);
  }
  return ch;
}

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* src) {
  return *reinterpret_cast<const Pack<T, VEC>*>(src);
}

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

// A chunk fills at most one shared tile, so each of a block's NT threads owns at most kIters vectors of it: element
// offsets (it * NT + threadIdx.x) * VEC.
template <typename T, int VEC, int NT>
struct Iters {
  static constexpr int kChunk = chunk_elems<T>();
  static constexpr int kIters = kChunk / (NT * VEC);
  static_assert(kIters * NT * VEC == kChunk, "the tile must be a multiple of NT * VEC elements");
  // Calls f(it, i) for each of this thread's vectors that starts inside a chunk of len elements.
  template <typename F>
  __device__ static __forceinline__ void each(int len, F&& f) {
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int i = (it * NT + static_cast<int>(threadIdx.x)) * VEC;
      if (i < len) f(it, i);
    }
  }
};

// The cluster schedule's tiles are as long as a launch makes them, so its threads loop: thread t owns the vectors
// at element offsets (it * NT + t) * VEC below len.
template <typename T, int VEC, int NT>
struct Strided {
  template <typename F>
  __device__ static __forceinline__ void each(int len, F&& f) {
    int it = 0;
    for (int i = static_cast<int>(threadIdx.x) * VEC; i < len; i += NT * VEC) f(it++, i);
  }
};

// cp.async moves 4, 8 or 16 bytes straight from global to shared memory: the bytes are in flight without
// holding registers. A 2-byte element (fp16/bf16 scalar path) goes through registers instead.
template <typename T, int VEC>
constexpr bool kAsyncCopy = sizeof(T) * VEC == 4 || sizeof(T) * VEC == 8 || sizeof(T) * VEC == 16;

// Launch bounds: with the chunk in shared memory a 16-byte-path block needs few registers, so ask ptxas for
// enough blocks per SM to keep many chunks in flight: 6 forward blocks (40 registers; 8 would need 32, which
// spills; sm_80's allocator spills at 40, so 5 there) and 6 backward ones (the two 16 KB tiles allow no more).
// The scalar fallbacks unroll per element and get the budget of 4 forward and 3 backward blocks (2 for the
// 2-byte backward, which stages through registers). ptxas spills nothing under these bounds on sm_80 and sm_90
// (tests/test_cuda_machine_code.py checks every build).
// The figures are for 256 threads. At 128 the vector forward asks for 10 blocks (48 registers; 11 or 12 blocks
// leave 40, at which the flagged forward spills) and 9 on sm_80 (as many as its 164 KB of shared memory hold); the
// backward's two tiles allow no more blocks, and the scalar fallbacks keep their bounds (twice the blocks spill the
// 2-byte backward).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
constexpr int kVectorForwardBlocksPerSM = kForwardThreads == 256 ? 5 : 9;
#else
constexpr int kVectorForwardBlocksPerSM = kForwardThreads == 256 ? 6 : 10;
#endif
template <typename T, int VEC>
constexpr int kForwardBlocksPerSM = VEC > 1 ? kVectorForwardBlocksPerSM : 4;
template <typename T, int VEC>
constexpr int kBackwardBlocksPerSM = VEC > 1 ? 6 : (kAsyncCopy<T, VEC> ? 3 : 2);

// Issues this thread's cp.async copies of a chunk (len elements from a, and from b when given) into the shared
// tiles at the same offsets, without committing or waiting: the caller groups them (__pipeline_commit).
template <typename T, int VEC, int NT, typename It = Iters<T, VEC, NT>>
__device__ __forceinline__ void copy_async(T* tile_a, const T* __restrict__ a, T* tile_b, const T* __restrict__ b,
                                           int len) {
  static_assert(kAsyncCopy<T, VEC>, "cp.async moves 4, 8 or 16 bytes");
  constexpr size_t kBytes = sizeof(T) * VEC;
  It::each(len, [&](int, int i) {
    __pipeline_memcpy_async(tile_a + i, a + i, kBytes);
    if (b) __pipeline_memcpy_async(tile_b + i, b + i, kBytes);
  });
}

// Copies this thread's vectors of a chunk into the shared tiles (as copy_async) and waits for them, all loads
// issued before any is waited for. Each thread reads back only the vectors it copied until the next
// __syncthreads, so no barrier is needed here.
template <typename T, int VEC, int NT, typename It = Iters<T, VEC, NT>>
__device__ __forceinline__ void stage(T* tile_a, const T* __restrict__ a, T* tile_b, const T* __restrict__ b,
                                      int len) {
  if constexpr (kAsyncCopy<T, VEC>) {
    copy_async<T, VEC, NT, It>(tile_a, a, tile_b, b, len);
    __pipeline_commit();
    __pipeline_wait_prior(0);
  } else {  // loads in batches of kBatch vectors, all issued before the batch is stored
    constexpr int kBatch = It::kIters < 16 ? It::kIters : 16;
#pragma unroll
    for (int it0 = 0; it0 < It::kIters; it0 += kBatch) {
      T va[kBatch], vb[kBatch];
#pragma unroll
      for (int k = 0; k < kBatch; ++k) {
        const int i = ((it0 + k) * NT + static_cast<int>(threadIdx.x)) * VEC;
        if (i < len) {
          va[k] = a[i];
          if (b) vb[k] = b[i];
        }
      }
#pragma unroll
      for (int k = 0; k < kBatch; ++k) {
        const int i = ((it0 + k) * NT + static_cast<int>(threadIdx.x)) * VEC;
        if (i < len) {
          tile_a[i] = va[k];
          if (b) tile_b[i] = vb[k];
        }
      }
    }
  }
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;  // valid in lane 0
}

// Deterministic block sum of NV values over a block of NT / 32 warps; every thread gets the same result.
template <int NV, int NT>
__device__ __forceinline__ void block_sum(float (&v)[NV], float (*red)[NT / 32]) {
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
    for (int w = 0; w < NT / 32; ++w) s += red[k][w];
    v[k] = s;
  }
  __syncthreads();
}

// The chunk this block works on: the next ticket in single-pass launches (ticket non-null), else its index.
__device__ __forceinline__ int64_t take_ticket(int* ticket, int* s_bid) {
  if (ticket == nullptr) return blockIdx.x;
  if (threadIdx.x == 0) *s_bid = atomicAdd(ticket, 1);
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

// Sum of the G partials of sample n, in a fixed order (identical in every block, and in both rendezvous):
// lane j adds chunks j, j + 32, ... as read(j, k) returns them, then the warp adds its lanes.
template <int NREAD, typename Read>
__device__ __forceinline__ void sum_partials(int G, Read&& read, float (&out)[NREAD], float* bcast) {
  if (threadIdx.x < 32) {
    float acc[NREAD] = {};
    for (int j = threadIdx.x; j < G; j += 32) {
#pragma unroll
      for (int k = 0; k < NREAD; ++k) acc[k] += read(j, k);
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

// The rendezvous of the ticket and two-pass launches; the launch's mode says which part this block plays.
struct TicketRendezvous {
  int mode;
  float* ws;  // (N, G, NV) partials
  int* sync;  // arrival counters, then the ticket counter

  // Calls f(part, chunk) for ticket (or block index) t: this launch plays one part, and t is the chunk.
  template <typename F>
  __device__ __forceinline__ void visit(int64_t t, F&& f) const {
    f(*this, t);
  }
  __device__ __forceinline__ bool stats_only() const { return mode == kStatsOnly; }
  // Whether this block needs its own partials. An apply block of the two-pass fallback does not, but skipping them
  // on the mode, known only at run time, made the 128-thread forward spill.
  __device__ __forceinline__ bool publishes() const { return true; }

  // The sample's totals of the first NREAD of this block's NV partials. False when this launch only publishes
  // (the stats launch of two pass): the block is then done.
  template <int NV, int NREAD>
  __device__ __forceinline__ bool totals(const float (&v)[NV], const Plan& p, int64_t n, int g,
                                         float (&tot)[NREAD], float* bcast) const {
    if (mode == kSolo) {
#pragma unroll
      for (int k = 0; k < NREAD; ++k) tot[k] = v[k];
      return true;
    }
    if (mode != kApply) {
      publish_and_wait<NV>(mode, v, ws, sync, n, g, p.G);
      if (mode == kStatsOnly) return false;
    }
    const float* src = ws + n * p.G * NV;
    sum_partials<NREAD>(p.G, [&](int j, int k) { return __ldcg(src + j * NV + k); }, tot, bcast);  // L2: other SMs wrote them
    return true;
  }

  // Partial k of chunk j of sample n (NV per chunk), valid once totals() returned true.
  template <int NV>
  __device__ __forceinline__ float partial(const Plan& p, int64_t n, int j, int k) const {
    return __ldcg(ws + (n * p.G + j) * NV + k);
  }
};

// A published partial is one 8-byte word: the float's bits below a flag of 1 (the slots are zeroed before the
// launch). One relaxed 8-byte store publishes it and one 8-byte load sees the flag and the value together, so the
// publisher needs no fence and no counter, and the reader no second load.
__device__ __forceinline__ void publish_slot(unsigned long long* slot, float v) {
  const unsigned long long word = (1ull << 32) | __float_as_uint(v);
  asm volatile("st.relaxed.gpu.global.u64 [%0], %1;" ::"l"(__cvta_generic_to_global(slot)), "l"(word) : "memory");
}

__device__ __forceinline__ float await_slot(const unsigned long long* slot) {
  for (;;) {
    unsigned long long word;
    asm volatile("ld.relaxed.gpu.global.u64 %0, [%1];" : "=l"(word) : "l"(__cvta_generic_to_global(slot)) : "memory");
    if (word >> 32) return __uint_as_float(static_cast<unsigned>(word));
    __nanosleep(32);
  }
}

// Chunk g of sample n publishes its NV partials (thread 0; every thread holds them after block_sum).
template <int NV>
__device__ __forceinline__ void publish_slots(unsigned long long* slots, const float (&v)[NV], const Plan& p,
                                              int64_t n, int g) {
  if (threadIdx.x == 0) {
    unsigned long long* mine = slots + (n * p.G + g) * NV;
#pragma unroll
    for (int k = 0; k < NV; ++k) publish_slot(mine + k, v[k]);
  }
}

// The sample's totals of the first NREAD partials of each of its G chunks, summed in sum_partials' fixed order.
template <int NV, int NREAD>
__device__ __forceinline__ void await_totals(const unsigned long long* slots, const Plan& p, int64_t n,
                                             float (&tot)[NREAD], float* bcast) {
  const unsigned long long* src = slots + n * p.G * NV;
  sum_partials<NREAD>(p.G, [&](int j, int k) { return await_slot(src + j * NV + k); }, tot, bcast);
}

// The rendezvous of the flagged launches (G >= 2): each block publishes into its chunk's slots and reads its
// siblings' slots as they fill. Deadlock-free for the ticket path's reason: tickets in launch order, under the
// single-pass residency bound.
struct SlotRendezvous {
  unsigned long long* slots;  // (N, G, NV), zeroed

  template <typename F>
  __device__ __forceinline__ void visit(int64_t t, F&& f) const {
    f(*this, t);
  }
  __device__ __forceinline__ bool stats_only() const { return false; }
  __device__ __forceinline__ bool publishes() const { return true; }

  template <int NV, int NREAD>
  __device__ __forceinline__ bool totals(const float (&v)[NV], const Plan& p, int64_t n, int g,
                                         float (&tot)[NREAD], float* bcast) const {
    publish_slots<NV>(slots, v, p, n, g);
    await_totals<NV, NREAD>(slots, p, n, tot, bcast);
    return true;
  }

  template <int NV>
  __device__ __forceinline__ float partial(const Plan& p, int64_t n, int j, int k) const {
    return await_slot(slots + (n * p.G + j) * NV + k);
  }
};

// The two parts of a lagged launch (below), each its own type so that each block runs code specialized for its
// part (one kernel holding the part in a flag kept the forward above its 40 registers): a stats block publishes its
// chunk's partials and is done; an apply block reads the sample's published partials and writes.
template <bool kApply>
struct LaggedPart {
  unsigned long long* slots;  // (N, G, NV), zeroed

  __device__ __forceinline__ bool stats_only() const { return !kApply; }
  __device__ __forceinline__ bool publishes() const { return !kApply; }

  template <int NV, int NREAD>
  __device__ __forceinline__ bool totals(const float (&v)[NV], const Plan& p, int64_t n, int g,
                                         float (&tot)[NREAD], float* bcast) const {
    if constexpr (!kApply) {
      publish_slots<NV>(slots, v, p, n, g);
      return false;
    } else {
      await_totals<NV, NREAD>(slots, p, n, tot, bcast);
      return true;
    }
  }

  template <int NV>
  __device__ __forceinline__ float partial(const Plan& p, int64_t n, int j, int k) const {
    return await_slot(slots + (n * p.G + j) * NV + k);
  }
};

// The rendezvous of the lagged launches (G >= 2; the header says why it cannot deadlock). The launch has two blocks
// per chunk: tickets [0, lag) are stats blocks, then stats and apply blocks take turns, and the last lag tickets
// are apply blocks. With lag >= G, an apply block's sample has all its stats blocks at earlier tickets.
struct LaggedRendezvous {
  unsigned long long* slots;  // (N, G, NV), zeroed
  int64_t chunks;             // N G
  int64_t lag;                // in [G, N G]

  // Calls f(part, chunk) for ticket t.
  template <typename F>
  __device__ __forceinline__ void visit(int64_t t, F&& f) const {
    const bool paired = t >= lag && t < 2 * chunks - lag;  // else t < lag (stats) or in the last lag (apply)
    if (paired ? ((t - lag) & 1) != 0 : t >= lag)
      f(LaggedPart<true>{slots}, paired ? (t - lag) >> 1 : t - chunks);
    else
      f(LaggedPart<false>{slots}, paired ? lag + ((t - lag) >> 1) : t);
  }
};

// The cluster schedule (sm_90 and later; the host launches it nowhere else): a sample's G blocks are one
// thread-block cluster, which the hardware starts together and keeps resident together, so the wait cannot
// deadlock and needs no tickets, counters or workspace. Each block leaves its partials in its own shared memory;
// one cluster barrier (release on arrival, acquire on wait) makes them visible, and the siblings read them
// through distributed shared memory in sum_partials' fixed order. A block must not exit while a sibling may still
// read its partials, so the kernels end with a second barrier (cluster_exit).
__device__ __forceinline__ void cluster_sync() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  __cluster_barrier_arrive();
  __cluster_barrier_wait();
#else
  __trap();
#endif
}

// The exit barrier orders no memory (a relaxed arrival): it is safe because every read of a sibling's partials was
// consumed before it (summed and written out), so none is still in flight. A remote read whose value is not used
// before it, or any remote store, would need the releasing arrival again. That one compiles to a GPU-wide fence,
// which here would wait for the block's output stores to land, holding its SM slot meanwhile.
__device__ __forceinline__ void cluster_exit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  __cluster_barrier_arrive_relaxed();
  __cluster_barrier_wait();
#else
  __trap();
#endif
}

// This block's published partials (3 in the forward, 1 in the backward), in its shared memory.
__device__ __forceinline__ float* cluster_partials() {
  __shared__ float partials[3];
  return partials;
}

// Partial k of the block of cluster rank j.
__device__ __forceinline__ float cluster_partial(int j, int k) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  return static_cast<const float*>(__cluster_map_shared_rank(cluster_partials(), static_cast<unsigned>(j)))[k];
#else
  __trap();
  return 0.f;
#endif
}

struct ClusterRendezvous {
  __device__ __forceinline__ bool stats_only() const { return false; }
  __device__ __forceinline__ bool publishes() const { return true; }

  template <int NV, int NREAD>
  __device__ __forceinline__ bool totals(const float (&v)[NV], const Plan& p, int64_t, int, float (&tot)[NREAD],
                                         float* bcast) const {
    static_assert(NV <= 3, "cluster_partials holds 3 partials");
    if (threadIdx.x == 0) {
#pragma unroll
      for (int k = 0; k < NV; ++k) cluster_partials()[k] = v[k];
    }
    cluster_sync();
    sum_partials<NREAD>(p.G, [](int j, int k) { return cluster_partial(j, k); }, tot, bcast);
    return true;
  }

  // The chunk index j within the sample is the block's rank in the cluster.
  template <int NV>
  __device__ __forceinline__ float partial(const Plan&, int64_t, int j, int k) const {
    return cluster_partial(j, k);
  }
};

// The forward of one chunk staged in `tile` (each thread's own vectors complete; the first barrier below makes
// the whole tile visible): reduce, meet the sample's other chunks, write out, readout and the statistics.
template <typename T, int VEC, typename Rendezvous, int NT = kForwardThreads, typename It = Iters<T, VEC, NT>>
__device__ __forceinline__ void forward_chunk(const T* tile, const Rendezvous& rv, const Plan& p, int64_t n, int g,
                                              const Chunk& ch, T* __restrict__ out, T* __restrict__ readout,
                                              float* __restrict__ sumsq, float* __restrict__ sumabs, float* chs,
                                              float (*red)[NT / 32], float* bcast) {
  float v3[3] = {0.f, 0.f, 0.f};  // sumsq, sumabs, sum (split-mode channel part)
  if (rv.publishes()) {
    It::each(ch.len, [&](int, int i) {
      const Pack<T, VEC> pk = load_pack<T, VEC>(tile + i);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float f = static_cast<float>(pk.v[j]);
        v3[0] += f * f;
        v3[1] += fabsf(f);
        v3[2] += f;
      }
    });
    block_sum<3, NT>(v3, red);  // its barrier also makes the whole tile visible block-wide
  } else {
    __syncthreads();  // an apply block reads the published partials only; the tile must still be visible
  }

  if (p.readout && p.K > 0 && !rv.stats_only()) {  // whole channels: HW <= one tile
    const int hw = static_cast<int>(p.HW);
    if (hw >= 32) {
      const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
      for (int k = warp; k < ch.nch; k += NT / 32) {
        float s = 0.f;
        for (int i = lane; i < hw; i += 32) s += static_cast<float>(tile[k * hw + i]);
        s = warp_sum(s);
        if (lane == 0) chs[k] = s;
      }
    } else {
      for (int k = threadIdx.x; k < ch.nch; k += NT) {
        float s = 0.f;
        for (int i = 0; i < hw; ++i) s += static_cast<float>(tile[k * hw + i]);
        chs[k] = s;
      }
    }
    __syncthreads();
  }

  float tot[2];
  if (!rv.template totals<3, 2>(v3, p, n, g, tot, bcast)) return;
  const float r = rsqrtf(tot[0] * p.inv_d + p.eps);
  if (g == 0 && threadIdx.x == 0) {
    sumsq[n] = tot[0];
    sumabs[n] = tot[1];
  }

  T* o = out + n * p.D + ch.off;
  It::each(ch.len, [&](int, int i) {
    const Pack<T, VEC> pk = load_pack<T, VEC>(tile + i);
    Pack<T, VEC> po;
#pragma unroll
    for (int j = 0; j < VEC; ++j) po.v[j] = static_cast<T>(static_cast<float>(pk.v[j]) * r);
    store_pack<T, VEC>(o + i, po);
  });
  if (p.readout) {
    T* ro = readout + n * p.C;
    const float scale = r * p.inv_hw;
    if (p.K > 0) {
      for (int k = threadIdx.x; k < ch.nch; k += NT) ro[ch.c0 + k] = static_cast<T>(chs[k] * scale);
    } else if (ch.s == 0 && threadIdx.x == 0) {  // split mode: never solo (G >= S >= 2)
      float s = 0.f;
      for (int j = 0; j < p.S; ++j) s += rv.template partial<3>(p, n, g + j, 2);
      ro[ch.c0] = static_cast<T>(s * scale);
    }
  }
}

// One chunk per block (lagged: one of a chunk's two parts). Rendezvous is TicketRendezvous (any mode),
// SlotRendezvous (flagged, single pass) or LaggedRendezvous.
template <typename T, int VEC, typename Rendezvous>
__global__ void __launch_bounds__(kForwardThreads, kForwardBlocksPerSM<T, VEC>)
    forward_kernel(const T* __restrict__ h, T* __restrict__ out, T* __restrict__ readout,
                   float* __restrict__ sumsq, float* __restrict__ sumabs, Rendezvous rv, int* ticket, Plan p) {
  __shared__ __align__(16) unsigned char tile_bytes[kChunkBytes];
  __shared__ float chs[kMaxK<kForwardThreads>];  // per-channel sums of h (whole-channel chunks)
  __shared__ float red[3][kForwardThreads / 32];
  __shared__ float bcast[2];
  __shared__ int s_bid;
  T* tile = reinterpret_cast<T*>(tile_bytes);

  rv.visit(take_ticket(ticket, &s_bid), [&](const auto& part, int64_t bid) {
    const int64_t n = bid / p.G;
    const int g = static_cast<int>(bid % p.G);
    const Chunk ch = chunk_of(p, g);
    stage<T, VEC, kForwardThreads>(tile, h + n * p.D + ch.off, nullptr, nullptr, ch.len);
    forward_chunk<T, VEC>(tile, part, p, n, g, ch, out, readout, sumsq, sumabs, chs, red, bcast);
  });
}

struct BwdPtrs {
  const float* grad_sumsq;   // (N,) or null
  const float* grad_sumabs;  // (N,) or null
  const float* sumsq;        // (N,)
};

// The backward of one chunk staged in th (h) and tg (grad_out; null when there is none).
template <typename T, int VEC, typename Rendezvous, int NT = kBackwardThreads, typename It = Iters<T, VEC, NT>>
__device__ __forceinline__ void backward_chunk(const T* th, const T* tg, const Rendezvous& rv, const Plan& p,
                                               int64_t n, int g, const Chunk& ch, const T* __restrict__ gr,
                                               const BwdPtrs& bp, T* __restrict__ dh,
                                               bool need_dot, float (*red)[NT / 32], float* bcast) {
  const T* grn = gr ? gr + n * p.C : nullptr;
  // e = the effective output gradient: the readout is linear in out, so its gradient folds into grad_out.
  // A vector never straddles a channel (vector paths require HW % VEC == 0), and in whole-channel chunks
  // HW <= chunk, so the channel index fits in 32 bits.
  auto effective = [&](int i) {
    const float shift =
        grn ? static_cast<float>(grn[ch.c0 + (p.K > 0 ? i / static_cast<int>(p.HW) : 0)]) * p.inv_hw : 0.f;
    Pack<float, VEC> e;
    const Pack<T, VEC> pg = tg ? load_pack<T, VEC>(tg + i) : Pack<T, VEC>{};
#pragma unroll
    for (int j = 0; j < VEC; ++j) e.v[j] = (tg ? static_cast<float>(pg.v[j]) : 0.f) + shift;
    return e;
  };
  float total_dot = 0.f;
  if (need_dot) {
    float dot[1] = {0.f};
    if (rv.publishes()) {  // an apply block reads the published partials only
      It::each(ch.len, [&](int, int i) {
        const Pack<T, VEC> ph = load_pack<T, VEC>(th + i);
        const Pack<float, VEC> e = effective(i);
#pragma unroll
        for (int j = 0; j < VEC; ++j) dot[0] += e.v[j] * static_cast<float>(ph.v[j]);
      });
      block_sum<1, NT>(dot, red);
    }
    float tot[1];
    if (!rv.template totals<1, 1>(dot, p, n, g, tot, bcast)) return;
    total_dot = tot[0];
  }
  // A lagged stats block is done (its launch always has need_dot; this lets the compiler drop its dead output code).
  if constexpr (std::is_same_v<Rendezvous, LaggedPart<false>>) return;

  const float r = rsqrtf(bp.sumsq[n] * p.inv_d + p.eps);
  const float gs = bp.grad_sumsq ? bp.grad_sumsq[n] : 0.f;
  const float ga = bp.grad_sumabs ? bp.grad_sumabs[n] : 0.f;
  // Only the terms of gradients that exist: with goodness gradients alone, r (inf for an all-zero sample at
  // eps = 0) and h * 0 (NaN where h is inf) must not reach dh, as they do not in the reference's autograd.
  // Rounded as written (no contraction into an FMA): where need_dot was a literal (session 6's pipelined kernel)
  // ptxas fused what it did not fuse here, which broke "every schedule gives the same bits".
  const float coef = __fsub_rn(2.f * gs, need_dot ? __fmul_rn(r * r * r * total_dot, p.inv_d) : 0.f);
  const bool scale_h = need_dot || bp.grad_sumsq != nullptr;
  T* o = dh + n * p.D + ch.off;
  It::each(ch.len, [&](int, int i) {
    const Pack<T, VEC> ph = load_pack<T, VEC>(th + i);
    const Pack<float, VEC> e = effective(i);
    Pack<T, VEC> pd;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float f = static_cast<float>(ph.v[j]);
      const float sgn = f > 0.f ? 1.f : (f < 0.f ? -1.f : 0.f);
      float d = need_dot ? __fmul_rn(r, e.v[j]) : 0.f;
      if (scale_h) d = __fmaf_rn(f, coef, d);
      pd.v[j] = static_cast<T>(__fmaf_rn(ga, sgn, d));
    }
    store_pack<T, VEC>(o + i, pd);
  });
}

template <typename T, int VEC, typename Rendezvous>
__global__ void __launch_bounds__(kBackwardThreads, kBackwardBlocksPerSM<T, VEC>)
    backward_kernel(const T* __restrict__ h, const T* __restrict__ go, const T* __restrict__ gr,
                    BwdPtrs bp, T* __restrict__ dh, Rendezvous rv, int* ticket, Plan p, bool need_dot) {
  __shared__ __align__(16) unsigned char tile_h_bytes[kChunkBytes];
  __shared__ __align__(16) unsigned char tile_g_bytes[kChunkBytes];
  __shared__ float red[1][kBackwardThreads / 32];
  __shared__ float bcast[1];
  __shared__ int s_bid;
  T* th = reinterpret_cast<T*>(tile_h_bytes);
  T* tg = reinterpret_cast<T*>(tile_g_bytes);

  rv.visit(take_ticket(ticket, &s_bid), [&](const auto& part, int64_t bid) {
    const int64_t n = bid / p.G;
    const int g = static_cast<int>(bid % p.G);
    const Chunk ch = chunk_of(p, g);
    stage<T, VEC, kBackwardThreads>(th, h + n * p.D + ch.off, tg, go ? go + n * p.D + ch.off : nullptr, ch.len);
    backward_chunk<T, VEC>(th, go ? tg : nullptr, part, p, n, g, ch, gr, bp, dh, need_dot, red, bcast);
  });
}

// The cluster schedule's kernels: one chunk per block, blocks [n G, n G + G) one cluster (sample n), chunks as
// large as the launch's shared memory allows (kClusterChsBytes of per-channel sums, then the tile; the backward's
// two tiles each tile_elems long). kClusterThreads threads, two blocks per SM at the default 104 KB budget.
constexpr int kClusterThreads = 512;
constexpr int kClusterMaxK = 1024;  // whole channels per chunk: their readout sums
constexpr int kClusterChsBytes = kClusterMaxK * 4;

template <typename T, int VEC>
__global__ void __launch_bounds__(kClusterThreads, 2)
    forward_cluster_kernel(const T* __restrict__ h, T* __restrict__ out, T* __restrict__ readout,
                           float* __restrict__ sumsq, float* __restrict__ sumabs, Plan p) {
  extern __shared__ __align__(16) unsigned char cluster_smem[];
  __shared__ float red[3][kClusterThreads / 32];
  __shared__ float bcast[2];
  using It = Strided<T, VEC, kClusterThreads>;
  float* chs = reinterpret_cast<float*>(cluster_smem);
  T* tile = reinterpret_cast<T*>(cluster_smem + kClusterChsBytes);
  const int64_t n = blockIdx.x / p.G;
  const int g = static_cast<int>(blockIdx.x % p.G);
  const Chunk ch = chunk_of(p, g);
  stage<T, VEC, kClusterThreads, It>(tile, h + n * p.D + ch.off, nullptr, nullptr, ch.len);
  forward_chunk<T, VEC, ClusterRendezvous, kClusterThreads, It>(tile, ClusterRendezvous{}, p, n, g, ch, out, readout,
                                                                 sumsq, sumabs, chs, red, bcast);
  cluster_exit();
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kClusterThreads, 2)
    backward_cluster_kernel(const T* __restrict__ h, const T* __restrict__ go, const T* __restrict__ gr, BwdPtrs bp,
                            T* __restrict__ dh, Plan p, int tile_elems) {
  extern __shared__ __align__(16) unsigned char cluster_smem[];
  __shared__ float red[1][kClusterThreads / 32];
  __shared__ float bcast[1];
  using It = Strided<T, VEC, kClusterThreads>;
  T* th = reinterpret_cast<T*>(cluster_smem);
  T* tg = th + tile_elems;
  const int64_t n = blockIdx.x / p.G;
  const int g = static_cast<int>(blockIdx.x % p.G);
  const Chunk ch = chunk_of(p, g);
  stage<T, VEC, kClusterThreads, It>(th, h + n * p.D + ch.off, tg, go ? go + n * p.D + ch.off : nullptr, ch.len);
  backward_chunk<T, VEC, ClusterRendezvous, kClusterThreads, It>(th, go ? tg : nullptr, ClusterRendezvous{}, p, n, g,
                                                                  ch, gr, bp, dh, true, red, bcast);
  cluster_exit();
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// FFABLATE_CUDA_SCHEDULE: how the chunks of a multi-block sample meet (docs/kernels.md). Read at every launch, so
// one process can A/B them.
enum class Schedule { kTicket, kFlagged, kLagged, kTwoPass, kCluster };

// FFABLATE_CUDA_LAG: how far the lagged schedule's stats blocks run ahead of their apply blocks, in GPU-fulls of
// resident blocks (default 0.5). Long enough that a chunk's stats block has finished when its apply block starts;
// short enough that the bytes moved in between (about lag x (tile read + tile written) per block) leave the
// chunk in L2. Read at every launch, like the schedule, so one process can A/B lags.
double lag_from_env() {
  const char* env = std::getenv("FFABLATE_CUDA_LAG");
  if (env == nullptr || *env == '\0') return 0.5;
  char* end = nullptr;
  const double lag = std::strtod(env, &end);
  TORCH_CHECK(*end == '\0' && std::isfinite(lag) && lag > 0,
              "FFABLATE_CUDA_LAG must be a positive number (GPU-fulls of blocks), got '", env, "'");
  return lag;
}

// FFABLATE_CUDA_CLUSTER_KB: the shared memory a block of the cluster schedule stages its chunk in (the backward's
// two tiles together), in KB (default 104: the most that leaves two blocks per SM on an H100/H200, with the
// forward's 4 KB of channel sums; 192 leaves one). Larger chunks mean fewer blocks per sample. Read at every
// launch, like the schedule.
int64_t cluster_budget_from_env() {
  const char* env = std::getenv("FFABLATE_CUDA_CLUSTER_KB");
  if (env == nullptr || *env == '\0') return 104 * 1024;
  char* end = nullptr;
  const long kb = std::strtol(env, &end, 10);
  TORCH_CHECK(*end == '\0' && kb >= 16 && kb <= 220,
              "FFABLATE_CUDA_CLUSTER_KB must be a whole number of KB from 16 to 220, got '", env, "'");
  return static_cast<int64_t>(kb) * 1024;
}

Schedule schedule_from_env() {
  const char* env = std::getenv("FFABLATE_CUDA_SCHEDULE");
  if (env == nullptr || *env == '\0' || std::strcmp(env, "flagged") == 0) return Schedule::kFlagged;
  if (std::strcmp(env, "ticket") == 0) return Schedule::kTicket;
  if (std::strcmp(env, "lagged") == 0) {
    lag_from_env();  // a bad lag is an error whether or not this launch needs one
    return Schedule::kLagged;
  }
  if (std::strcmp(env, "two-pass") == 0) return Schedule::kTwoPass;
  if (std::strcmp(env, "cluster") == 0) {
    cluster_budget_from_env();  // a bad budget is an error whether or not this launch needs one
    return Schedule::kCluster;
  }
  TORCH_CHECK(false, "FFABLATE_CUDA_SCHEDULE must be ticket, flagged, lagged, two-pass or cluster (or unset), got '",
              env, "'");
}

// The lag in blocks: at least G, so that every stats block of an apply block's sample has an earlier ticket.
int64_t lag_blocks(const Plan& p, int64_t resident) {
  const double want = std::ceil(lag_from_env() * static_cast<double>(resident));  // clamped before the cast
  return want >= static_cast<double>(p.N * p.G) ? p.N * p.G : std::max<int64_t>(p.G, static_cast<int64_t>(want));
}

// A per-device answer (>= 0) that never changes, computed once per device: the occupancy query costs several
// microseconds, as much as a small launch. The cache holds answer + 1, so its zero-initialized entries mean unknown.
constexpr int kMaxDevices = 64;
using DeviceCache = std::atomic<int64_t>[kMaxDevices];

template <typename Compute>
int64_t per_device_cached(DeviceCache& cache, Compute&& compute) {
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  if (dev >= kMaxDevices) return compute(dev);
  const int64_t known = cache[dev].load(std::memory_order_relaxed);
  if (known > 0) return known - 1;
  const int64_t answer = compute(dev);
  cache[dev].store(answer + 1, std::memory_order_relaxed);
  return answer;
}

// Resident blocks per SM times SMs, per kernel instantiation and device. The first call on a device also asks
// for the largest shared-memory carveout, which the tiles need to reach their blocks per SM.
template <auto kernel, int NT>
int64_t resident_blocks() {
  static DeviceCache cache;  // static storage: zero-initialized
  return per_device_cached(cache, [](int dev) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                        cudaSharedmemCarveoutMaxShared));
    int per_sm = 0, sms = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, NT, 0));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    return static_cast<int64_t>(per_sm) * sms;
  });
}

// The single-pass rendezvous is deadlock-free only if a whole sample's G blocks can be resident at once. The
// occupancy figure assumes this kernel has the GPU to itself; a kernel on another stream, or an MPS share of the
// SMs, can hold some of them, so single pass takes at most a quarter of the figure (realistic G is far below).
constexpr int64_t kResidencyMargin = 4;

template <auto kernel, int NT>
int pick_mode(const Plan& p, Schedule schedule) {
  const int64_t resident = resident_blocks<kernel, NT>();  // also sets the carveout, which solo launches need too
  if (p.G == 1) return kSolo;
  if (schedule == Schedule::kTwoPass) return kStatsOnly;  // (the scalar paths take ticket's mode for lagged)
  return static_cast<int64_t>(p.G) * kResidencyMargin <= resident ? kSinglePass : kStatsOnly;
}

// n zeroed words (ticket and arrival counters, or the flagged schedule's slots and ticket): a memset node rather than a
// fill kernel (cheaper to launch).
at::Tensor zeroed(int64_t n, at::ScalarType dtype, const at::Tensor& like, cudaStream_t stream) {
  at::Tensor t = at::empty({n}, like.options().dtype(dtype));
  C10_CUDA_CHECK(cudaMemsetAsync(t.data_ptr(), 0, t.nbytes(), stream));
  return t;
}

// The flagged and lagged launches' workspace: `words` zeroed slots, then the ticket counter in one more word.
struct SlotWorkspace {
  at::Tensor memory;  // held until the launch is queued; the caching allocator orders its reuse on the stream
  unsigned long long* slots;
  int* ticket;

  SlotWorkspace(int64_t words, const at::Tensor& like, cudaStream_t stream)
      : memory(zeroed(words + 1, at::kLong, like, stream)),
        slots(reinterpret_cast<unsigned long long*>(memory.data_ptr<int64_t>())),
        ticket(reinterpret_cast<int*>(slots + words)) {}
};

// A lagged launch has a stats and an apply block per chunk.
dim3 lagged_grid(int64_t chunks) {
  TORCH_CHECK(2 * chunks < (int64_t{1} << 31), "goodness_norm: input too large for the lagged schedule (",
              2 * chunks, " blocks); use FFABLATE_CUDA_SCHEDULE=flagged");
  return dim3(static_cast<unsigned>(2 * chunks));
}

// The cluster schedule's plan: the fewest chunks of whole channels (or of one channel, when a channel alone
// exceeds the tile) whose `tiles` tiles per block fit `budget` bytes. G is 0 when that takes more blocks than a
// cluster may hold (16, non-portable, on an H100/H200); the launch then takes the flagged schedule.
constexpr int kMaxCluster = 16;

Plan cluster_plan(const Geometry& g, double eps, int64_t elem_bytes, int tiles, int64_t budget) {
  const int64_t tile_elems = budget / (tiles * elem_bytes) / 8 * 8;  // split chunks stay 16-byte aligned
  const int64_t C = g.readout ? g.C : 1, HW = g.readout ? g.HW : g.D;
  int64_t chunk = tile_elems;
  if (HW <= tile_elems) {  // balance the channels: the fewest chunks, then as few channels in each as that allows
    const int64_t per = std::min<int64_t>({tile_elems / HW, C, kClusterMaxK});
    const int64_t chunks = (C + per - 1) / per;
    chunk = (C + chunks - 1) / chunks * HW;
  }
  Plan p = make_plan(g, eps, static_cast<int>(chunk), kClusterMaxK);
  if (p.G > kMaxCluster) p.G = 0;
  return p;
}

// The longest chunk of a plan, in elements.
int64_t longest_chunk(const Plan& p) { return p.K > 0 ? p.K * p.HW : p.Ls; }

// A launch of `blocks` blocks of kClusterThreads in clusters of G (cfg points into attr, so it is not copied).
struct ClusterLaunch {
  cudaLaunchAttribute attr{};
  cudaLaunchConfig_t cfg{};

  ClusterLaunch(int64_t blocks, int G, size_t smem, cudaStream_t stream) {
    TORCH_CHECK(blocks < (int64_t{1} << 31), "goodness_norm: input too large (", blocks, " blocks)");
    attr.id = cudaLaunchAttributeClusterDimension;
    attr.val.clusterDim.x = static_cast<unsigned>(G);
    attr.val.clusterDim.y = attr.val.clusterDim.z = 1;
    cfg.gridDim = dim3(static_cast<unsigned>(blocks));
    cfg.blockDim = dim3(kClusterThreads);
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    cfg.attrs = &attr;
    cfg.numAttrs = 1;
  }
  ClusterLaunch(const ClusterLaunch&) = delete;
  ClusterLaunch& operator=(const ClusterLaunch&) = delete;
};

// Whether clusters of G blocks of `kernel` with `smem` bytes of dynamic shared memory each can run on the current
// device: sm_90 machine code (a build from older PTX has __trap() for the cluster intrinsics, and the driver would
// JIT it for an H100 all the same), and at least one such cluster fits (cudaOccupancyMaxActiveClusters). The first
// query for a kernel on a device raises its dynamic shared-memory limit to the device's, asks for the largest
// shared-memory carveout (as resident_blocks does: two 104 KB blocks per SM need it) and allows non-portable
// cluster sizes (above 8). Answers are cached: the queries cost microseconds, as much as a small launch. A refused
// query means no; its error is cleared, so the next launch's check does not report it.
bool cluster_fits(const void* kernel, size_t smem, int G) {
  static std::mutex mu;
  static std::map<std::tuple<int, const void*, size_t, int>, bool> known;
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  const std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_tuple(dev, kernel, smem, G);
  if (const auto it = known.find(key); it != known.end()) return it->second;
  auto ok = [](cudaError_t e) {
    if (e != cudaSuccess) (void)cudaGetLastError();
    return e == cudaSuccess;
  };
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  cudaFuncAttributes attrs{};
  const ClusterLaunch one(G, G, smem, nullptr);
  int clusters = 0;
  const bool fits =
      ok(cudaFuncGetAttributes(&attrs, kernel)) && attrs.binaryVersion >= 90 && attrs.ptxVersion >= 90 &&
      smem + attrs.sharedSizeBytes <= static_cast<size_t>(optin) &&
      ok(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              optin - static_cast<int>(attrs.sharedSizeBytes))) &&
      ok(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                              cudaSharedmemCarveoutMaxShared)) &&
      (G <= 8 || ok(cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1))) &&
      ok(cudaOccupancyMaxActiveClusters(&clusters, kernel, &one.cfg)) && clusters > 0;
  known.emplace(key, fits);
  return fits;
}

// Launches `kernel` over the plan's N G blocks in clusters of G.
template <typename... Params, typename... Args>
void launch_clusters(void (*kernel)(Params...), const Plan& p, size_t smem, Args&&... args) {
  const ClusterLaunch launch(p.N * p.G, p.G, smem, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_CHECK(cudaLaunchKernelEx(&launch.cfg, kernel, std::forward<Args>(args)...));
}

// The forward under the cluster schedule; false (nothing launched) where clusters cannot take this shape.
template <typename T, int VEC>
bool forward_clusters(const at::Tensor& h, const Geometry& g, double eps, at::Tensor& sumsq, at::Tensor& sumabs,
                      at::Tensor& out, at::Tensor& readout) {
  const Plan p = cluster_plan(g, eps, sizeof(T), 1, cluster_budget_from_env());
  constexpr auto kernel = forward_cluster_kernel<T, VEC>;
  const size_t smem = kClusterChsBytes + longest_chunk(p) * sizeof(T);
  if (p.G == 0 || !cluster_fits(reinterpret_cast<const void*>(kernel), smem, p.G)) return false;
  launch_clusters(kernel, p, smem, reinterpret_cast<const T*>(h.const_data_ptr()),
                  out.data_ptr<T>(), p.readout ? readout.data_ptr<T>() : nullptr, sumsq.data_ptr<float>(),
                  sumabs.data_ptr<float>(), p);
  return true;
}

void check_cuda_dtype(const at::Tensor& h, const char* op) {
  const auto t = h.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16, op,
              ": the CUDA kernel supports float32, float16 and bfloat16, got ", t);
}

template <typename T, int VEC>
void launch_forward(Schedule schedule, const at::Tensor& h, const Plan& p, at::Tensor& sumsq, at::Tensor& sumabs,
                    at::Tensor& out, at::Tensor& readout) {
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t blocks = p.N * p.G;
  TORCH_CHECK(blocks < (int64_t{1} << 31), "goodness_norm: input too large (", blocks, " blocks)");
  const dim3 grid(static_cast<unsigned>(blocks));
  T* ro = p.readout ? readout.data_ptr<T>() : nullptr;
  const T* x = reinterpret_cast<const T*>(h.const_data_ptr());
  if constexpr (VEC > 1) {
    if (schedule == Schedule::kLagged && p.G > 1) {
      constexpr auto kernel = forward_kernel<T, VEC, LaggedRendezvous>;
      const int64_t lag = lag_blocks(p, resident_blocks<kernel, kForwardThreads>());
      const SlotWorkspace slots(p.N * p.G * 3, h, stream);  // 3 partials per chunk
      kernel<<<lagged_grid(blocks), kForwardThreads, 0, stream>>>(
          x, out.data_ptr<T>(), ro, sumsq.data_ptr<float>(), sumabs.data_ptr<float>(),
          LaggedRendezvous{slots.slots, blocks, lag}, slots.ticket, p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    constexpr auto kernel = forward_kernel<T, VEC, SlotRendezvous>;
    if (schedule == Schedule::kFlagged && pick_mode<kernel, kForwardThreads>(p, schedule) == kSinglePass) {
      const SlotWorkspace slots(p.N * p.G * 3, h, stream);  // 3 partials per chunk
      kernel<<<grid, kForwardThreads, 0, stream>>>(x, out.data_ptr<T>(), ro, sumsq.data_ptr<float>(),
                                                   sumabs.data_ptr<float>(), SlotRendezvous{slots.slots},
                                                   slots.ticket, p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
  }
  constexpr auto kernel = forward_kernel<T, VEC, TicketRendezvous>;
  const int mode = pick_mode<kernel, kForwardThreads>(p, schedule);
  at::Tensor ws, sync;
  if (mode != kSolo) ws = at::empty({p.N * p.G * 3}, h.options().dtype(at::kFloat));
  if (mode == kSinglePass) sync = zeroed(p.N + 1, at::kInt, h, stream);
  float* wsp = mode != kSolo ? ws.data_ptr<float>() : nullptr;
  int* sp = mode == kSinglePass ? sync.data_ptr<int>() : nullptr;
  int* ticket = mode == kSinglePass ? sp + p.N : nullptr;
  kernel<<<grid, kForwardThreads, 0, stream>>>(x, out.data_ptr<T>(), ro, sumsq.data_ptr<float>(),
                                               sumabs.data_ptr<float>(), TicketRendezvous{mode, wsp, sp}, ticket, p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (mode == kStatsOnly) {
    kernel<<<grid, kForwardThreads, 0, stream>>>(x, out.data_ptr<T>(), ro, sumsq.data_ptr<float>(),
                                                 sumabs.data_ptr<float>(), TicketRendezvous{kApply, wsp, sp}, nullptr,
                                                 p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename T>
void forward_dispatch(const at::Tensor& h, const Geometry& g, double eps, at::Tensor& sumsq,
                      at::Tensor& sumabs, at::Tensor& out, at::Tensor& readout) {
  constexpr int VEC = 16 / sizeof(T);
  const Plan p = make_plan(g, eps, chunk_elems<T>(), kMaxK<kForwardThreads>);
  const bool vec = aligned16(h.const_data_ptr()) && aligned16(out.data_ptr()) && p.HW % VEC == 0;
  Schedule schedule = schedule_from_env();
  if (schedule == Schedule::kCluster) {
    if (vec && p.G > 1 && forward_clusters<T, VEC>(h, g, eps, sumsq, sumabs, out, readout)) return;
    schedule = Schedule::kFlagged;  // where clusters cannot take the shape
  }
  if (vec)
    launch_forward<T, VEC>(schedule, h, p, sumsq, sumabs, out, readout);
  else
    launch_forward<T, 1>(schedule, h, p, sumsq, sumabs, out, readout);
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
  switch (h.scalar_type()) {
    case at::kFloat: forward_dispatch<float>(h, g, eps, sumsq, sumabs, out, readout); break;
    case at::kHalf: forward_dispatch<at::Half>(h, g, eps, sumsq, sumabs, out, readout); break;
    default: forward_dispatch<at::BFloat16>(h, g, eps, sumsq, sumabs, out, readout); break;
  }
  return {sumsq, sumabs, out, readout};
}

BwdPtrs bwd_ptrs(const BackwardArgs& a) {
  return {a.grad_sumsq ? a.grad_sumsq->const_data_ptr<float>() : nullptr,
          a.grad_sumabs ? a.grad_sumabs->const_data_ptr<float>() : nullptr, a.sumsq.const_data_ptr<float>()};
}

template <typename T, int VEC>
void launch_backward(Schedule schedule, const BackwardArgs& a, const Plan& p, at::Tensor& dh) {
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t blocks = p.N * p.G;
  TORCH_CHECK(blocks < (int64_t{1} << 31), "goodness_norm_backward: input too large (", blocks, " blocks)");
  const dim3 grid(static_cast<unsigned>(blocks));
  const bool need_dot = a.grad_out.has_value() || a.grad_readout.has_value();
  const BwdPtrs bp = bwd_ptrs(a);
  const T* x = reinterpret_cast<const T*>(a.h.const_data_ptr());
  const T* go = a.grad_out ? reinterpret_cast<const T*>(a.grad_out->const_data_ptr()) : nullptr;
  const T* gr = a.grad_readout ? reinterpret_cast<const T*>(a.grad_readout->const_data_ptr()) : nullptr;
  if constexpr (VEC > 1) {
    if (need_dot && schedule == Schedule::kLagged && p.G > 1) {
      constexpr auto kernel = backward_kernel<T, VEC, LaggedRendezvous>;
      const int64_t lag = lag_blocks(p, resident_blocks<kernel, kBackwardThreads>());
      const SlotWorkspace slots(p.N * p.G, a.h, stream);
      kernel<<<lagged_grid(blocks), kBackwardThreads, 0, stream>>>(
          x, go, gr, bp, dh.data_ptr<T>(), LaggedRendezvous{slots.slots, blocks, lag}, slots.ticket, p,
          true);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    constexpr auto kernel = backward_kernel<T, VEC, SlotRendezvous>;
    if (need_dot && schedule == Schedule::kFlagged &&
        pick_mode<kernel, kBackwardThreads>(p, schedule) == kSinglePass) {
      const SlotWorkspace slots(p.N * p.G, a.h, stream);
      kernel<<<grid, kBackwardThreads, 0, stream>>>(x, go, gr, bp, dh.data_ptr<T>(), SlotRendezvous{slots.slots},
                                                    slots.ticket, p, true);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
  }
  constexpr auto kernel = backward_kernel<T, VEC, TicketRendezvous>;
  const int picked = pick_mode<kernel, kBackwardThreads>(p, schedule);
  const int mode = need_dot ? picked : kApply;  // without a dot product there is nothing to rendezvous on
  at::Tensor ws, sync;
  if (mode == kSinglePass || mode == kStatsOnly) ws = at::empty({p.N * p.G}, a.h.options().dtype(at::kFloat));
  if (mode == kSinglePass) sync = zeroed(p.N + 1, at::kInt, a.h, stream);
  float* wsp = ws.defined() ? ws.data_ptr<float>() : nullptr;
  int* sp = mode == kSinglePass ? sync.data_ptr<int>() : nullptr;
  int* ticket = mode == kSinglePass ? sp + p.N : nullptr;
  kernel<<<grid, kBackwardThreads, 0, stream>>>(x, go, gr, bp, dh.data_ptr<T>(), TicketRendezvous{mode, wsp, sp},
                                                ticket, p, need_dot);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (mode == kStatsOnly) {
    kernel<<<grid, kBackwardThreads, 0, stream>>>(x, go, gr, bp, dh.data_ptr<T>(), TicketRendezvous{kApply, wsp, sp},
                                                  nullptr, p, need_dot);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// The backward under the cluster schedule (a launch with a dot product to meet on); false (nothing launched) where
// clusters cannot take this shape.
template <typename T, int VEC>
bool backward_clusters(const BackwardArgs& a, double eps, at::Tensor& dh) {
  const Plan p = cluster_plan(a.g, eps, sizeof(T), 2, cluster_budget_from_env());
  constexpr auto kernel = backward_cluster_kernel<T, VEC>;
  const int64_t tile_elems = longest_chunk(p);
  const size_t smem = 2 * tile_elems * sizeof(T);
  if (p.G == 0 || !cluster_fits(reinterpret_cast<const void*>(kernel), smem, p.G)) return false;
  launch_clusters(kernel, p, smem, reinterpret_cast<const T*>(a.h.const_data_ptr()),
                  a.grad_out ? reinterpret_cast<const T*>(a.grad_out->const_data_ptr()) : nullptr,
                  a.grad_readout ? reinterpret_cast<const T*>(a.grad_readout->const_data_ptr()) : nullptr,
                  bwd_ptrs(a), dh.data_ptr<T>(), p, static_cast<int>(tile_elems));
  return true;
}

template <typename T>
void backward_dispatch(const BackwardArgs& a, double eps, at::Tensor& dh) {
  constexpr int VEC = 16 / sizeof(T);
  const Plan p = make_plan(a.g, eps, chunk_elems<T>(), kMaxK<kBackwardThreads>);
  bool vec = aligned16(a.h.const_data_ptr()) && aligned16(dh.data_ptr()) && p.HW % VEC == 0;
  if (a.grad_out) vec = vec && aligned16(a.grad_out->const_data_ptr());
  const bool need_dot = a.grad_out.has_value() || a.grad_readout.has_value();
  Schedule schedule = schedule_from_env();
  if (schedule == Schedule::kCluster) {
    if (vec && need_dot && p.G > 1 && backward_clusters<T, VEC>(a, eps, dh)) return;
    schedule = Schedule::kFlagged;  // where clusters cannot take the shape
  }
  if (vec)
    launch_backward<T, VEC>(schedule, a, p, dh);
  else
    launch_backward<T, 1>(schedule, a, p, dh);
}

at::Tensor goodness_norm_backward_cuda_impl(const std::optional<at::Tensor>& grad_sumsq,
                                            const std::optional<at::Tensor>& grad_sumabs,
                                            const std::optional<at::Tensor>& grad_out,
                                            const std::optional<at::Tensor>& grad_readout,
                                            const at::Tensor& h, const at::Tensor& sumsq, double eps) {
  check_cuda_dtype(h, "goodness_norm_backward");
  TORCH_CHECK(h.is_cuda(), "goodness_norm_backward: CUDA kernel got h on ", h.device());
  TORCH_CHECK(eps >= 0, "goodness_norm_backward: eps must be >= 0, got ", eps);
  const c10::cuda::CUDAGuard guard(h.device());
  const BackwardArgs a = check_backward(grad_sumsq, grad_sumabs, grad_out, grad_readout, h, sumsq);
  at::Tensor dh = at::empty_like(a.h, at::MemoryFormat::Contiguous);
  if (a.g.N == 0) return dh;
  switch (h.scalar_type()) {
    case at::kFloat: backward_dispatch<float>(a, eps, dh); break;
    case at::kHalf: backward_dispatch<at::Half>(a, eps, dh); break;
    default: backward_dispatch<at::BFloat16>(a, eps, dh); break;
  }
  return dh;
}

}  // namespace

TORCH_LIBRARY_IMPL(ffablate, CUDA, m) {
  m.impl("goodness_norm", &goodness_norm_cuda);
  m.impl("goodness_norm_backward", &goodness_norm_backward_cuda_impl);
}

}  // namespace ffablate
