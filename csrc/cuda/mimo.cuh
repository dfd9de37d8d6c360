// MIMO (SPEC section 6): the 2x2 Gram of two gradient lists in one fused pass, and the
// min-norm direction d = lam g0 + (1 - lam) gw in a second fused pass, over every parameter
// tensor at once (multi-tensor apply, as apex/PyTorch's _foreach kernels do).
//
// The host cuts every tensor into chunks of kChunk elements and packs (tensor, chunk) pairs,
// with the tensors' pointers, into a table passed by value as a kernel argument (under the
// 4 KB parameter limit); one block per chunk, as many launches as the tables need. Chunks use
// 16-byte vector loads when their base is aligned (scalar tail otherwise).
// Gram: each block accumulates <g0,g0>, <g0,gw>, <gw,gw> in fp64 and writes its partials to
// its own slot (global chunk index); one block then sums the slots in a fixed order, so the
// Gram, and lam, do not depend on scheduling. Direction: coefficients lam and 1 - lam in fp32
// (as the reference forms them), applied in the accumulation type (fp32, fp64 for fp64).
#pragma once

#include "common.cuh"

namespace omnifuse_fast {
namespace gpu {
namespace mimo {

constexpr int kThreads = 512;
constexpr int64_t kChunk = 65536;  // elements per block
constexpr int kMaxTensors = 36;
constexpr int kMaxBlocks = 320;

template <typename T>
struct Table {
  const T* a[kMaxTensors];
  const T* b[kMaxTensors];
  T* out[kMaxTensors];
  int64_t n[kMaxTensors];
  unsigned char block_tensor[kMaxBlocks];
  int block_chunk[kMaxBlocks];
};
static_assert(sizeof(Table<double>) < 4000, "kernel parameter block must stay under 4 KB");

inline int64_t num_chunks(int64_t n) { return ceil_div(n, kChunk); }

// ---------------------------------------------------------------------- kernels
template <typename T>
__global__ void __launch_bounds__(kThreads)
    gram_kernel(Table<T> tab, int64_t first_slot, double* __restrict__ partials) {
  __shared__ double scratch[kWarp];
  const int t = tab.block_tensor[blockIdx.x];
  const int64_t start = static_cast<int64_t>(tab.block_chunk[blockIdx.x]) * kChunk;
  const int64_t len = min(kChunk, tab.n[t] - start);
  const T* a = tab.a[t] + start;
  const T* b = tab.b[t] + start;
  double aa = 0.0, ab = 0.0, bb = 0.0;
  constexpr int V = vec16<T>();
  int64_t head = 0;  // elements handled by vector loads
  if (aligned_to(a, 16) && aligned_to(b, 16)) {
    head = len / V * V;
    for (int64_t i = static_cast<int64_t>(threadIdx.x) * V; i < head;
         i += static_cast<int64_t>(blockDim.x) * V) {
      acc_type<T> x[V], y[V];
      load_vec<T, V>(a + i, x);
      load_vec<T, V>(b + i, y);
#pragma unroll
      for (int e = 0; e < V; ++e) {  // products of fp32 values are exact in fp64
        const double xd = x[e], yd = y[e];
        aa = fma(xd, xd, aa);
        ab = fma(xd, yd, ab);
        bb = fma(yd, yd, bb);
      }
    }
  }
  for (int64_t i = head + threadIdx.x; i < len; i += blockDim.x) {
    const double x = to_acc<acc_type<T>>(a[i]);
    const double y = to_acc<acc_type<T>>(b[i]);
    aa = fma(x, x, aa);
    ab = fma(x, y, ab);
    bb = fma(y, y, bb);
  }
  aa = block_sum(aa, scratch);
  ab = block_sum(ab, scratch);
  bb = block_sum(bb, scratch);
  if (threadIdx.x == 0) {
    double* p = partials + 3 * (first_slot + blockIdx.x);
    p[0] = aa;
    p[1] = ab;
    p[2] = bb;
  }
}

// gram fp64 [3] = (<g0,g0>, <g0,gw>, <gw,gw>), the schema's packed symmetric 2x2 Gram.
__global__ void gram_finalize_kernel(const double* __restrict__ partials, int64_t nslots,
                                     double* __restrict__ gram) {
  __shared__ double scratch[kWarp];
  double s[3];
  for (int k = 0; k < 3; ++k) {
    double v = 0.0;
    for (int64_t i = threadIdx.x; i < nslots; i += blockDim.x) v += partials[3 * i + k];
    s[k] = block_sum(v, scratch);
  }
  if (threadIdx.x == 0) {
    gram[0] = s[0];
    gram[1] = s[1];
    gram[2] = s[2];
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    direction_kernel(Table<T> tab, const float* __restrict__ lam) {
  using A = acc_type<T>;
  const float l = lam[0];
  const A c0 = static_cast<A>(l);
  const A c1 = static_cast<A>(1.0f - l);  // formed in fp32, like the reference's 1.0 - lam
  const int t = tab.block_tensor[blockIdx.x];
  const int64_t start = static_cast<int64_t>(tab.block_chunk[blockIdx.x]) * kChunk;
  const int64_t len = min(kChunk, tab.n[t] - start);
  const T* a = tab.a[t] + start;
  const T* b = tab.b[t] + start;
  T* out = tab.out[t] + start;
  constexpr int V = vec16<T>();
  int64_t head = 0;
  if (aligned_to(a, 16) && aligned_to(b, 16) && aligned_to(out, 16)) {
    head = len / V * V;
    for (int64_t i = static_cast<int64_t>(threadIdx.x) * V; i < head;
         i += static_cast<int64_t>(blockDim.x) * V) {
      A x[V], y[V];
      load_vec<T, V>(a + i, x);
      load_vec<T, V>(b + i, y);
#pragma unroll
      for (int e = 0; e < V; ++e) x[e] = c0 * x[e] + c1 * y[e];
      store_vec<T, V>(out + i, x);
    }
  }
  for (int64_t i = head + threadIdx.x; i < len; i += blockDim.x)
    out[i] = from_acc<T>(c0 * to_acc<A>(a[i]) + c1 * to_acc<A>(b[i]));
}

// ---------------------------------------------------------------------- host side
// Packs the non-empty tensors' chunks into tables and calls launch(table, blocks, first slot)
// for each full table; slots number the chunks in order (the Gram's partial index).
template <typename T, typename Launch>
inline cudaError_t for_tables(const T* const* a, const T* const* b, T* const* out, const int64_t* n,
                              int count, int64_t first_slot, Launch launch) {
  Table<T> tab{};
  int nt = 0, nb = 0;
  int64_t slot = first_slot;
  for (int i = 0; i < count; ++i) {
    if (n[i] == 0) continue;
    tab.a[nt] = a[i];
    tab.b[nt] = b[i];
    tab.out[nt] = out != nullptr ? out[i] : nullptr;
    tab.n[nt] = n[i];
    const int64_t chunks = num_chunks(n[i]);
    for (int64_t c = 0; c < chunks; ++c) {
      tab.block_tensor[nb] = static_cast<unsigned char>(nt);
      tab.block_chunk[nb] = static_cast<int>(c);
      ++nb;
      const bool last = c == chunks - 1;
      if (nb == kMaxBlocks || (nt == kMaxTensors - 1 && last)) {
        cudaError_t err = launch(tab, nb, slot);
        if (err != cudaSuccess) return err;
        slot += nb;
        nb = 0;
        if (last) {
          nt = -1;  // the next tensor starts a fresh table
        } else {    // this tensor goes on in the next table, as its entry 0
          tab.a[0] = tab.a[nt];
          tab.b[0] = tab.b[nt];
          tab.out[0] = tab.out[nt];
          tab.n[0] = tab.n[nt];
          nt = 0;
        }
      }
    }
    ++nt;
  }
  if (nb > 0) return launch(tab, nb, slot);
  return cudaSuccess;
}

// Partial slots of a list: the binding sums this over every dtype group.
inline int64_t gram_num_slots(const int64_t* n, int count) {
  int64_t s = 0;
  for (int i = 0; i < count; ++i) s += num_chunks(n[i]);
  return s;
}

// Writes 3 fp64 partials per chunk into partials[3 * first_slot ...].
template <typename T>
cudaError_t gram_partials(const T* const* g0, const T* const* gw, const int64_t* n, int count,
                          int64_t first_slot, double* partials, cudaStream_t stream) {
  return for_tables<T>(g0, gw, nullptr, n, count, first_slot,
                       [&](const Table<T>& tab, int blocks, int64_t slot) {
                         gram_kernel<T><<<blocks, kThreads, 0, stream>>>(tab, slot, partials);
                         return cudaGetLastError();
                       });
}

// gram fp64 [3] from all nslots partials.
inline cudaError_t gram_finalize(const double* partials, int64_t nslots, double* gram,
                                 cudaStream_t stream) {
  gram_finalize_kernel<<<1, kFinalizeThreads, 0, stream>>>(partials, nslots, gram);
  return cudaGetLastError();
}

// out[i] = lam g0[i] + (1 - lam) gw[i]; lam: a device fp32 scalar.
template <typename T>
cudaError_t direction(const T* const* g0, const T* const* gw, T* const* out, const int64_t* n,
                      int count, const float* lam, cudaStream_t stream) {
  return for_tables<T>(g0, gw, out, n, count, 0, [&](const Table<T>& tab, int blocks, int64_t) {
    direction_kernel<T><<<blocks, kThreads, 0, stream>>>(tab, lam);
    return cudaGetLastError();
  });
}

}  // namespace mimo
}  // namespace gpu
}  // namespace omnifuse_fast

#define OMNIFUSE_GPU_INSTANTIATE_MIMO(T)                                                        \
  template cudaError_t omnifuse_fast::gpu::mimo::gram_partials<T>(                              \
      const T* const*, const T* const*, const int64_t*, int, int64_t, double*, cudaStream_t);   \
  template cudaError_t omnifuse_fast::gpu::mimo::direction<T>(const T* const*, const T* const*, \
                                                              T* const*, const int64_t*, int,   \
                                                              const float*, cudaStream_t);
