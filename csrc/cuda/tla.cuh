// TLA (SPEC section 3) and combination ids: per-combination distance sums and counts of one
// batch, and the masked cross-entropy of the lazy combination with its backward.
//
// Samples are handled by groups of G lanes (G = C's vector count rounded up to a power of two,
// at most 32), several samples per warp when C is small; one pass per row gives the exact
// statistics (common.cuh: class_row), from which every distance follows without a second read:
//   ce = softplus(-d),  l1 = 2 (1 - p_y) = 2 sigmoid(-d),  l2 = (1 - p_y)^2 (1 + sum_{c!=y} q_c^2)
// with d = z_y - logsumexp_{c != y} z and q_c = exp(z_c - logsumexp_{c != y} z).
//
// Statistics: a shared-memory histogram of 2^M <= 256 bins per block (bin 0 unused). Counts are
// warp-aggregated with __match_any_sync (one shared atomic per distinct combination in a warp);
// sums too when a warp holds few distinct combinations (a butterfly sum per combination),
// otherwise one shared atomic per sample (many distinct keys: little contention). Each block
// then adds each non-empty bin once to the global fp32 sums and int64 counts. The sums are
// fp32 atomics, so their last bits may depend on scheduling; counts are exact.
// Loss: per-block partial (sum of CE over the mask, mask count), reduced by one block in a fixed
// order: loss = sum / max(count, 1), a real 0 when the mask is empty. Backward counts the mask
// the same way, and every block reads the same total.
// Value checks (common.cuh): a label outside [0, C) or a comb outside [1, 2^M) (the stats' bins;
// [1, 256) for the loss, which does not know M) is reported in flags and its sample left out:
// no logit row, shared bin or global bin is ever addressed with it. NaN/inf logits of the rows
// read (every row for the stats, the lazy combination's for the loss) are reported too.
#pragma once

#include "common.cuh"

namespace omnifuse_fast {
namespace gpu {
namespace tla {

constexpr int kThreads = 256;
constexpr int kMaxBins = 256;
constexpr int kAggregateMax = 4;  // distinct combinations per warp still summed by butterflies

enum Distance : int { kCE = 0, kL1 = 1, kL2 = 2 };

// --------------------------------------------------------------------- combination ids
// comb[b] = sum_m present[b, m] << m, one thread per sample (present: bool [B, M] as bytes).
// A sample with no present modality (id 0) is reported in flags (kFlagPresent).
__global__ void __launch_bounds__(kThreads)
    combination_ids_kernel(const uint8_t* __restrict__ present, int64_t B, int M,
                           int64_t* __restrict__ comb, int* __restrict__ flags) {
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; b < B;
       b += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t id = 0;
    for (int m = 0; m < M; ++m) id |= static_cast<int64_t>(present[b * M + m] != 0) << m;
    if (id == 0) flag_bad(flags, kFlagPresent);
    comb[b] = id;
  }
}

inline cudaError_t combination_ids(const uint8_t* present, int64_t B, int M, int64_t* comb,
                                   int* flags, cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  combination_ids_kernel<<<grid_for(B, kThreads), kThreads, 0, stream>>>(present, B, M, comb,
                                                                          flags);
  return cudaGetLastError();
}

// --------------------------------------------------------------------- per-sample layout
struct Layout {
  int vec;   // elements per load
  int g;     // lanes per sample
  int grid;  // blocks
};

template <typename T>
inline Layout layout(const T* logits, int64_t B, int C, const void* out, int max_blocks) {
  Layout l{};
  const int vec = vec16<T>();
  const bool ok = C % vec == 0 && aligned_to(logits, 16) && (out == nullptr || aligned_to(out, 16));
  l.vec = ok ? vec : 1;
  const int chunks = static_cast<int>(ceil_div(C, l.vec));
  l.g = next_pow2(chunks) < kWarp ? next_pow2(chunks) : kWarp;
  l.grid = grid_for(B, kThreads / l.g, max_blocks);
  return l;
}

// Distance of one sample from its row statistics.
template <int kDist, typename A>
__device__ __forceinline__ A distance(const ClassRow<A>& r) {
  const A d = r.zy - r.lseo;
  if (kDist == kCE) return softplus(-d);
  const A q = sigmoid(-d);  // 1 - p_y, exact
  if (kDist == kL1) return A(2) * q;
  return q * q * (A(1) + r.sq);
}

// --------------------------------------------------------------------- statistics
template <typename T, int VEC, int kDist, typename A = acc_type<T>>
__global__ void __launch_bounds__(kThreads)
    stats_kernel(const T* __restrict__ z, const int64_t* __restrict__ labels,
                 const int64_t* __restrict__ comb, int64_t B, int C, int G, int bins,
                 float* __restrict__ sums, unsigned long long* __restrict__ counts,
                 int* __restrict__ flags) {
  __shared__ float s_sum[kMaxBins];
  __shared__ unsigned s_cnt[kMaxBins];
  for (int i = threadIdx.x; i < bins; i += blockDim.x) {
    s_sum[i] = 0.f;
    s_cnt[i] = 0u;
  }
  __syncthreads();

  const int lane = threadIdx.x % kWarp;
  const int spw = kWarp / G;
  const int slot = lane / G, j = lane % G;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int64_t nwarps = static_cast<int64_t>(gridDim.x) * blockDim.x / kWarp;
  for (int64_t base = warp * spw; base < B; base += nwarps * spw) {  // uniform per warp
    const int64_t b = base + slot;
    int y = 0;
    int64_t id = 0;
    bool valid = b < B;
    if (valid) {  // a sample with a bad label or comb is reported and left out
      y = checked_label(labels[b], C, flags);
      id = comb[b];
      if (id < 1 || id >= bins) flag_bad(flags, kFlagComb);
      valid = y >= 0 && id >= 1 && id < bins;
    }
    const ClassRow<A> r =
        class_row<T, VEC, kDist == kL2>(z + b * static_cast<int64_t>(C), C, y, j, G, valid, flags);
    const bool leader = valid && j == 0;
    const float dist = leader ? static_cast<float>(distance<kDist>(r)) : 0.f;
    // lanes that hold no sample get keys of their own (>= bins): they never match a real one
    const int key = leader ? static_cast<int>(id) : bins + lane;
    const unsigned peers = __match_any_sync(kFullMask, key);
    const bool is_lead = leader && (__ffs(peers) - 1) == lane;
    const unsigned leads = __ballot_sync(kFullMask, is_lead);
    if (is_lead) atomicAdd(&s_cnt[key], static_cast<unsigned>(__popc(peers)));
    if (__popc(leads) <= kAggregateMax) {
      for (unsigned todo = leads; todo != 0u; todo &= todo - 1u) {  // uniform per warp
        const int l = __ffs(todo) - 1;
        const unsigned grp = __shfl_sync(kFullMask, peers, l);
        const float v = group_sum(((grp >> lane) & 1u) ? dist : 0.f, kWarp);
        if (lane == l) atomicAdd(&s_sum[key], v);
      }
    } else if (leader) {
      atomicAdd(&s_sum[key], dist);
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < bins; i += blockDim.x) {
    if (s_cnt[i] != 0u) {  // one global atomic per non-empty bin per block
      atomicAdd(&sums[i], s_sum[i]);
      atomicAdd(&counts[i], static_cast<unsigned long long>(s_cnt[i]));
    }
  }
}

// sums (fp32 [2^M]) and counts (int64 [2^M], passed as unsigned long long) must be zeroed by
// the caller (the kernel adds to them).
// flags: common.cuh's flag tensor (labels and comb are checked).
template <typename T>
cudaError_t stats(const T* logits, const int64_t* labels, const int64_t* comb, int64_t B, int C,
                  int num_modalities, int distance_kind, float* sums, unsigned long long* counts,
                  int* flags, cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  const int bins = 1 << num_modalities;
  // a few blocks per SM's worth: each block pays one flush of <= 256 bins
  const Layout l = layout(logits, B, C, nullptr, 512);
  constexpr int V = vec16<T>();
#define OMNIFUSE_TLA_STATS(VV, DD) \
  stats_kernel<T, VV, DD>          \
      <<<l.grid, kThreads, 0, stream>>>(logits, labels, comb, B, C, l.g, bins, sums, counts, flags)
  if (l.vec == V) {
    if (distance_kind == kCE)
      OMNIFUSE_TLA_STATS(V, kCE);
    else if (distance_kind == kL1)
      OMNIFUSE_TLA_STATS(V, kL1);
    else
      OMNIFUSE_TLA_STATS(V, kL2);
  } else {
    if (distance_kind == kCE)
      OMNIFUSE_TLA_STATS(1, kCE);
    else if (distance_kind == kL1)
      OMNIFUSE_TLA_STATS(1, kL1);
    else
      OMNIFUSE_TLA_STATS(1, kL2);
  }
#undef OMNIFUSE_TLA_STATS
  return cudaGetLastError();
}

// --------------------------------------------------------------------- masked loss
// partials[block] = sum of CE over the block's masked samples, partials[grid + block] = count.
template <typename T, int VEC, typename A = acc_type<T>>
__global__ void __launch_bounds__(kThreads)
    loss_kernel(const T* __restrict__ z, const int64_t* __restrict__ labels,
                const int64_t* __restrict__ comb, int64_t B, int C, int G, int64_t lazy,
                A* __restrict__ partials, int* __restrict__ flags) {
  __shared__ A scratch[kWarp];
  const int lane = threadIdx.x % kWarp;
  const int spw = kWarp / G;
  const int slot = lane / G, j = lane % G;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int64_t nwarps = static_cast<int64_t>(gridDim.x) * blockDim.x / kWarp;
  A sum = A(0), cnt = A(0);
  for (int64_t base = warp * spw; base < B; base += nwarps * spw) {
    const int64_t b = base + slot;
    bool in_mask = false;
    int y = 0;
    if (b < B) {  // every label and comb is checked, also outside the mask
      const int64_t id = comb[b];
      if (id < 1 || id >= kMaxBins) flag_bad(flags, kFlagComb);
      y = checked_label(labels[b], C, flags);
      in_mask = id == lazy && y >= 0;
    }
    // unmasked samples read nothing (class_row skips the loads) but join the shuffles
    const ClassRow<A> r =
        class_row<T, VEC, false>(z + b * static_cast<int64_t>(C), C, y, j, G, in_mask, flags);
    if (in_mask && j == 0) {
      sum += softplus(r.lseo - r.zy);
      cnt += A(1);
    }
  }
  const A s = block_sum(sum, scratch);
  const A c = block_sum(cnt, scratch);
  if (threadIdx.x == 0) {
    partials[blockIdx.x] = s;
    partials[gridDim.x + blockIdx.x] = c;
  }
}

template <typename T, typename A>
__global__ void loss_finalize_kernel(const A* __restrict__ partials, int64_t n,
                                     T* __restrict__ out) {
  __shared__ A scratch[kWarp];
  const A s = sum_partials(partials, n, scratch);
  const A c = sum_partials(partials + n, n, scratch);
  if (threadIdx.x == 0) out[0] = from_acc<T>(s / (c > A(1) ? c : A(1)));
}

template <typename T>
inline int loss_grid(const T* logits, int64_t B, int C) {
  return layout(logits, B, C, nullptr, 2048).grid;
}

// Partials (accumulation-type elements) tla::loss_forward needs as scratch.
template <typename T>
inline int64_t loss_num_partials(const T* logits, int64_t B, int C) {
  return 2 * static_cast<int64_t>(loss_grid(logits, B, C));
}

template <typename T>
cudaError_t loss_forward(const T* logits, const int64_t* labels, const int64_t* comb, int64_t B,
                         int C, int64_t lazy, acc_type<T>* partials, T* loss, int* flags,
                         cudaStream_t stream) {
  using A = acc_type<T>;
  int64_t n = 0;
  if (B > 0) {
    const Layout l = layout(logits, B, C, nullptr, 2048);
    constexpr int V = vec16<T>();
    if (l.vec == V)
      loss_kernel<T, V>
          <<<l.grid, kThreads, 0, stream>>>(logits, labels, comb, B, C, l.g, lazy, partials, flags);
    else
      loss_kernel<T, 1>
          <<<l.grid, kThreads, 0, stream>>>(logits, labels, comb, B, C, l.g, lazy, partials, flags);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    n = l.grid;
  }
  loss_finalize_kernel<T, A><<<1, kFinalizeThreads, 0, stream>>>(partials, n, loss);
  return cudaGetLastError();
}

// --------------------------------------------------------------------- masked loss backward
__global__ void __launch_bounds__(kThreads)
    count_kernel(const int64_t* __restrict__ comb, int64_t B, int64_t lazy,
                 unsigned long long* __restrict__ partials) {
  __shared__ unsigned long long scratch[kWarp];
  unsigned long long cnt = 0;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; b < B;
       b += static_cast<int64_t>(gridDim.x) * blockDim.x)
    cnt += comb[b] == lazy ? 1ull : 0ull;
  const unsigned long long total = block_sum(cnt, scratch);
  if (threadIdx.x == 0) partials[blockIdx.x] = total;
}

constexpr int kCountGrid = 256;  // blocks of the count pass (each grad block re-reads them)

// grad_logits = grad / max(N, 1) * (softmax - onehot) on the masked rows, 0 elsewhere.
template <typename T, int VEC, typename A = acc_type<T>>
__global__ void __launch_bounds__(kThreads)
    loss_backward_kernel(const A* __restrict__ grad, const T* __restrict__ z,
                         const int64_t* __restrict__ labels, const int64_t* __restrict__ comb,
                         int64_t B, int C, int G, int64_t lazy,
                         const unsigned long long* __restrict__ count_partials, int ncount,
                         T* __restrict__ out) {
  __shared__ unsigned long long scratch[kWarp];
  __shared__ A s_scale;
  const unsigned long long n = sum_partials(count_partials, ncount, scratch);
  if (threadIdx.x == 0) s_scale = grad[0] / static_cast<A>(n > 0ull ? n : 1ull);
  __syncthreads();
  const A scale = s_scale;

  const int lane = threadIdx.x % kWarp;
  const int spw = kWarp / G;
  const int slot = lane / G, j = lane % G;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int64_t nwarps = static_cast<int64_t>(gridDim.x) * blockDim.x / kWarp;
  for (int64_t base = warp * spw; base < B; base += nwarps * spw) {
    const int64_t b = base + slot;
    const bool valid = b < B;
    const int y = valid && comb[b] == lazy ? checked_label(labels[b], C, nullptr) : -1;
    const bool in_mask = y >= 0;  // a bad label (reported by the forward) is left out
    const T* row = z + b * static_cast<int64_t>(C);
    const ClassRow<A> r = class_row<T, VEC, false>(row, C, y, j, G, in_mask, nullptr);
    if (!valid) continue;
    T* grow = out + b * static_cast<int64_t>(C);
    // c != y: scale * p_c = kappa * exp(z_c - lseo); c = y: scale * (p_y - 1) = -kappa
    const A kappa = in_mask ? scale * sigmoid(r.lseo - r.zy) : A(0);
    for (int c0 = j * VEC; c0 < C; c0 += G * VEC) {
      A x[VEC];
      if (in_mask) {
        load_vec<T, VEC>(row + c0, x);
#pragma unroll
        for (int i = 0; i < VEC; ++i) x[i] = (c0 + i == y) ? -kappa : kappa * exp_(x[i] - r.lseo);
      } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) x[i] = A(0);
      }
      store_vec<T, VEC>(grow + c0, x);
    }
  }
}

// count_partials: kCountGrid unsigned long long of scratch; grad: device scalar (acc type).
template <typename T>
cudaError_t loss_backward(const acc_type<T>* grad, const T* logits, const int64_t* labels,
                          const int64_t* comb, int64_t B, int C, int64_t lazy,
                          unsigned long long* count_partials, T* grad_logits, cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  count_kernel<<<kCountGrid, kThreads, 0, stream>>>(comb, B, lazy, count_partials);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const Layout l = layout(logits, B, C, grad_logits, 2048);
  constexpr int V = vec16<T>();
  if (l.vec == V)
    loss_backward_kernel<T, V><<<l.grid, kThreads, 0, stream>>>(
        grad, logits, labels, comb, B, C, l.g, lazy, count_partials, kCountGrid, grad_logits);
  else
    loss_backward_kernel<T, 1><<<l.grid, kThreads, 0, stream>>>(
        grad, logits, labels, comb, B, C, l.g, lazy, count_partials, kCountGrid, grad_logits);
  return cudaGetLastError();
}

}  // namespace tla
}  // namespace gpu
}  // namespace omnifuse_fast

#define OMNIFUSE_GPU_INSTANTIATE_TLA(T)                                                            \
  template cudaError_t omnifuse_fast::gpu::tla::stats<T>(const T*, const int64_t*, const int64_t*, \
                                                         int64_t, int, int, int, float*,           \
                                                         unsigned long long*, int*, cudaStream_t); \
  template cudaError_t omnifuse_fast::gpu::tla::loss_forward<T>(                                   \
      const T*, const int64_t*, const int64_t*, int64_t, int, int64_t,                             \
      omnifuse_fast::gpu::acc_type<T>*, T*, int*, cudaStream_t);                                   \
  template cudaError_t omnifuse_fast::gpu::tla::loss_backward<T>(                                  \
      const omnifuse_fast::gpu::acc_type<T>*, const T*, const int64_t*, const int64_t*, int64_t,   \
      int, int64_t, unsigned long long*, T*, cudaStream_t);
