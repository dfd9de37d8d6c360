// MM learning (SPEC section 5): modality mixing by gather, proportion (soft) labels, the
// deterministic scatter backward of the mix, and the soft-label cross-entropy.
//
// Mix: v_mix[b, m, :] = v[src[m, b], m, :], a gather of D-long rows with 16-byte vector copies
// where D and the pointers allow (scalar fallback). Soft labels: one warp per sample; lane m
// reads label and weight of source m, and every lane of the warp writes its classes: the exact
// one-hot when all sources share a label, else sum_m w_m onehot(y[src[m, b]]).
// Backward of the mix (several mixed rows may read one source row): an inverse index instead
// of atomics, so the result is bitwise reproducible. Keys m * batch + src[m, b] (in (m, b)
// order) are radix-sorted with their b by CUB, which is stable: within one source row the
// readers stay in increasing b. Segment bounds come from the sorted keys, and each source row
// sums its readers in that fixed order (fp32 accumulation), writing 0 where nobody reads it.
// Soft CE: per sample (G lanes, several samples per warp for small C), one pass keeps the online
// (max, sum exp) and sum_c q_c (max - z_c), all terms >= 0, so -sum_c q_c log_softmax(z)_c is
// formed without cancellation; the backward writes both d/dz = s (p Q - q) and d/dq = s (lse - z).
// Value checks (common.cuh): the forward reports a src outside [0, B) (its row is never read:
// zeros instead) and a label outside [0, C) (labels are only compared with class ids); the
// backward maps a bad src to source 0, so no key or segment is addressed out of range.
#pragma once

#include <cub/cub.cuh>

#include "common.cuh"

namespace omnifuse_fast {
namespace gpu {
namespace mix {

constexpr int kThreads = 256;
constexpr int kMaxM = 8;

// --------------------------------------------------------------------- gather
// Stores VEC zeros of T at p (aligned like the gather's stores).
template <typename T, int VEC>
__device__ __forceinline__ void store_zeros(T* p) {
  acc_type<T> zeros[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) zeros[i] = acc_type<T>(0);
  store_vec<T, VEC>(p, zeros);
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    gather_kernel(const T* __restrict__ v, const int64_t* __restrict__ src, int64_t B, int M,
                  int64_t D, T* __restrict__ out, int* __restrict__ flags) {
  const int64_t per_row = D / VEC;
  const int64_t total = B * M * per_row;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / per_row;  // row = b * M + m of the output
    const int64_t d = (i % per_row) * VEC;
    const int64_t b = row / M;
    const int m = static_cast<int>(row % M);
    const int64_t s = src[m * B + b];
    if (s < 0 || s >= B) {  // reported, and never read: the row is zeros
      flag_bad(flags, kFlagSrc);
      store_zeros<T, VEC>(out + row * D + d);
    } else if constexpr (VEC == 1) {
      out[row * D + d] = v[(s * M + m) * D + d];
    } else {
      *reinterpret_cast<Vec<T, VEC>*>(out + row * D + d) =
          *reinterpret_cast<const Vec<T, VEC>*>(v + (s * M + m) * D + d);
    }
  }
}

// --------------------------------------------------------------------- soft labels
// weights: fp32 [B, M] or nullptr (uniform 1/M).
template <typename T, typename A = acc_type<T>>
__global__ void __launch_bounds__(kThreads)
    soft_labels_kernel(const int64_t* __restrict__ labels, const int64_t* __restrict__ src,
                       const float* __restrict__ weights, int64_t B, int M, int C,
                       T* __restrict__ out, int* __restrict__ flags) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int64_t nwarps = static_cast<int64_t>(gridDim.x) * blockDim.x / kWarp;
  for (int64_t b = warp; b < B; b += nwarps) {
    int64_t lab = -1;
    A w = A(0);
    if (lane < M) {
      const int64_t s = src[lane * B + b];
      if (s >= 0 && s < B) {
        lab = labels[s];  // only compared with class ids below: reported, never an address
        if (lab < 0 || lab >= C) flag_bad(flags, kFlagLabels);
      } else {
        flag_bad(flags, kFlagSrc);
      }
      w = weights != nullptr ? static_cast<A>(weights[b * M + lane]) : A(1) / static_cast<A>(M);
    } else if (lane == M) {  // every label is checked, also the ones no source points at
      const int64_t own = labels[b];
      if (own < 0 || own >= C) flag_bad(flags, kFlagLabels);
    }
    int64_t labs[kMaxM];
    A ws[kMaxM];
    bool same = true;
#pragma unroll
    for (int m = 0; m < kMaxM; ++m) {
      if (m < M) {
        labs[m] = __shfl_sync(kFullMask, lab, m);
        ws[m] = __shfl_sync(kFullMask, w, m);
        same = same && labs[m] == labs[0];
      }
    }
    if (weights != nullptr && lane == 0) {  // on the simplex? (only read: reported)
      A sum = A(0);
      bool neg = false;
#pragma unroll
      for (int m = 0; m < kMaxM; ++m) {
        if (m < M) {
          sum += ws[m];
          neg = neg || !(ws[m] >= A(0));  // "not >= 0": NaN is reported too
        }
      }
      if (neg || !(fabs(sum - A(1)) <= static_cast<A>(kSimplexTol))) flag_bad(flags, kFlagWeights);
    }
    T* row = out + b * static_cast<int64_t>(C);
    for (int c = lane; c < C; c += kWarp) {
      A q = A(0);
      if (same) {
        q = c == labs[0] ? A(1) : A(0);
      } else {
#pragma unroll
        for (int m = 0; m < kMaxM; ++m)
          if (m < M && labs[m] == c) q += ws[m];
      }
      row[c] = from_acc<T>(q);
    }
  }
}

// v: [B, M, D] contiguous; labels int64 [B]; src int64 [M, B]; weights fp32 [B, M] or nullptr;
// flags: common.cuh's flag tensor (src and labels are checked).
template <typename T>
cudaError_t mix_forward(const T* v, const int64_t* labels, const int64_t* src, const float* weights,
                        int64_t B, int M, int64_t D, int C, T* v_mix, T* soft_labels, int* flags,
                        cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  constexpr int V = vec16<T>();
  if (D > 0) {
    const bool vec_ok = D % V == 0 && aligned_to(v, 16) && aligned_to(v_mix, 16);
    const int64_t n = B * M * (vec_ok ? D / V : D);
    if (vec_ok)
      gather_kernel<T, V>
          <<<grid_for(n, kThreads, 4096), kThreads, 0, stream>>>(v, src, B, M, D, v_mix, flags);
    else
      gather_kernel<T, 1>
          <<<grid_for(n, kThreads, 4096), kThreads, 0, stream>>>(v, src, B, M, D, v_mix, flags);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  soft_labels_kernel<T><<<grid_for(B, kThreads / kWarp), kThreads, 0, stream>>>(
      labels, src, weights, B, M, C, soft_labels, flags);
  return cudaGetLastError();
}

// --------------------------------------------------------------------- deterministic scatter
__global__ void __launch_bounds__(kThreads)
    make_keys_kernel(const int64_t* __restrict__ src, int64_t B, int M, int64_t batch,
                     uint32_t* __restrict__ keys, uint32_t* __restrict__ vals) {
  const int64_t n = B * M;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t m = i / B;  // src is [M, B]: i = m * B + b, so keys come in (m, b) order
    const int64_t s = src[i];
    // a bad source (reported by the forward) counts as source 0: every key stays < M * batch
    keys[i] = static_cast<uint32_t>(m * batch + (s >= 0 && s < batch ? s : 0));
    vals[i] = static_cast<uint32_t>(i - m * B);
  }
}

// seg_begin/seg_end ([M * batch], zeroed): the sorted range of each (m, source) key.
__global__ void __launch_bounds__(kThreads)
    segments_kernel(const uint32_t* __restrict__ keys, int64_t n, uint32_t* __restrict__ seg_begin,
                    uint32_t* __restrict__ seg_end) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint32_t k = keys[i];
    if (i == 0 || keys[i - 1] != k) seg_begin[k] = static_cast<uint32_t>(i);
    if (i == n - 1 || keys[i + 1] != k) seg_end[k] = static_cast<uint32_t>(i + 1);
  }
}

// grad_v[s, m, :] = sum over readers b of source s (increasing b) of grad_v_mix[b, m, :].
template <typename T, int VEC, typename A = acc_type<T>>
__global__ void __launch_bounds__(kThreads)
    gather_sum_kernel(const T* __restrict__ gmix, const uint32_t* __restrict__ readers,
                      const uint32_t* __restrict__ seg_begin, const uint32_t* __restrict__ seg_end,
                      int64_t batch, int M, int64_t D, T* __restrict__ grad_v) {
  const int64_t per_row = D / VEC;
  const int64_t total = batch * M * per_row;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / per_row;  // row = s * M + m of grad_v
    const int64_t d = (i % per_row) * VEC;
    const int64_t s = row / M;
    const int m = static_cast<int>(row % M);
    const int64_t key = m * batch + s;
    A acc[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[e] = A(0);
    const uint32_t end = seg_end[key];
    for (uint32_t r = seg_begin[key]; r < end; ++r) {
      const int64_t b = readers[r];
      A x[VEC];
      load_vec<T, VEC>(gmix + (b * M + m) * D + d, x);
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[e] += x[e];
    }
    store_vec<T, VEC>(grad_v + row * D + d, acc);
  }
}

// Scratch layout of mix_backward, carved from one buffer (256-byte aligned pieces).
struct BackwardScratch {
  size_t keys_in, keys_out, vals_in, vals_out, seg_begin, seg_end, cub, total;
};

inline size_t align256(size_t x) { return (x + 255) & ~static_cast<size_t>(255); }

inline int key_bits(int64_t nkeys) {
  int bits = 1;
  while (bits < 32 && (static_cast<int64_t>(1) << bits) < nkeys) ++bits;
  return bits;
}

// Offsets of each piece; total is the byte size the binding must allocate.
inline cudaError_t backward_scratch(int64_t B, int M, int64_t batch, BackwardScratch* out) {
  const int64_t n = B * M;
  const int64_t nkeys = batch * M;
  size_t cub_bytes = 0;
  if (n > 0) {
    cudaError_t err = cub::DeviceRadixSort::SortPairs(
        nullptr, cub_bytes, static_cast<const uint32_t*>(nullptr), static_cast<uint32_t*>(nullptr),
        static_cast<const uint32_t*>(nullptr), static_cast<uint32_t*>(nullptr), static_cast<int>(n),
        0, key_bits(nkeys));
    if (err != cudaSuccess) return err;
  }
  size_t off = 0;
  const size_t nb = align256(static_cast<size_t>(n) * sizeof(uint32_t));
  const size_t kb = align256(static_cast<size_t>(nkeys) * sizeof(uint32_t));
  out->keys_in = off;
  off += nb;
  out->keys_out = off;
  off += nb;
  out->vals_in = off;
  off += nb;
  out->vals_out = off;
  off += nb;
  out->seg_begin = off;
  off += kb;
  out->seg_end = off;
  off += kb;
  out->cub = off;
  off += align256(cub_bytes);
  out->total = off;
  return cudaSuccess;
}

// Indices must fit the 32-bit sort keys.
inline bool backward_supported(int64_t B, int M, int64_t batch) {
  return batch * M < (static_cast<int64_t>(1) << 32) && B * M < (static_cast<int64_t>(1) << 31);
}

// grad_v [batch, M, D] from grad_v_mix [B, M, D] and src [M, B]; scratch: backward_scratch bytes
// (256-byte aligned base).
template <typename T>
cudaError_t mix_backward(const T* grad_v_mix, const int64_t* src, int64_t B, int M, int64_t D,
                         int64_t batch, void* scratch, size_t scratch_bytes, T* grad_v,
                         cudaStream_t stream) {
  if (batch == 0 || D == 0) return cudaSuccess;
  BackwardScratch sc{};
  cudaError_t err = backward_scratch(B, M, batch, &sc);
  if (err != cudaSuccess) return err;
  if (scratch_bytes < sc.total) return cudaErrorInvalidValue;
  char* base = static_cast<char*>(scratch);
  auto* keys_in = reinterpret_cast<uint32_t*>(base + sc.keys_in);
  auto* keys_out = reinterpret_cast<uint32_t*>(base + sc.keys_out);
  auto* vals_in = reinterpret_cast<uint32_t*>(base + sc.vals_in);
  auto* vals_out = reinterpret_cast<uint32_t*>(base + sc.vals_out);
  auto* seg_begin = reinterpret_cast<uint32_t*>(base + sc.seg_begin);
  auto* seg_end = reinterpret_cast<uint32_t*>(base + sc.seg_end);
  const int64_t n = B * M;
  const int64_t nkeys = batch * M;
  err = cudaMemsetAsync(seg_begin, 0, sizeof(uint32_t) * static_cast<size_t>(nkeys), stream);
  if (err != cudaSuccess) return err;
  err = cudaMemsetAsync(seg_end, 0, sizeof(uint32_t) * static_cast<size_t>(nkeys), stream);
  if (err != cudaSuccess) return err;
  if (n > 0) {
    make_keys_kernel<<<grid_for(n, kThreads, 4096), kThreads, 0, stream>>>(src, B, M, batch,
                                                                           keys_in, vals_in);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    size_t cub_bytes = sc.total - sc.cub;
    err =
        cub::DeviceRadixSort::SortPairs(base + sc.cub, cub_bytes, keys_in, keys_out, vals_in,
                                        vals_out, static_cast<int>(n), 0, key_bits(nkeys), stream);
    if (err != cudaSuccess) return err;
    segments_kernel<<<grid_for(n, kThreads, 4096), kThreads, 0, stream>>>(keys_out, n, seg_begin,
                                                                          seg_end);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  constexpr int V = vec16<T>();
  const bool vec_ok = D % V == 0 && aligned_to(grad_v_mix, 16) && aligned_to(grad_v, 16);
  const int64_t work = batch * M * (vec_ok ? D / V : D);
  if (vec_ok)
    gather_sum_kernel<T, V><<<grid_for(work, kThreads, 4096), kThreads, 0, stream>>>(
        grad_v_mix, vals_out, seg_begin, seg_end, batch, M, D, grad_v);
  else
    gather_sum_kernel<T, 1><<<grid_for(work, kThreads, 4096), kThreads, 0, stream>>>(
        grad_v_mix, vals_out, seg_begin, seg_end, batch, M, D, grad_v);
  return cudaGetLastError();
}

// --------------------------------------------------------------------- soft cross-entropy
// Online state of one lane: max, sum exp(z - max), Q = sum q, P = sum q (max - z) >= 0.
template <typename A>
struct SoftState {
  A mx, se, q, p;
};

template <typename A>
__device__ __forceinline__ SoftState<A> soft_merge(SoftState<A> a, SoftState<A> b) {
  const A m = fmax(a.mx, b.mx);
  if (m == neg_inf<A>()) return {m, A(0), a.q + b.q, A(0)};
  SoftState<A> r{m, A(0), a.q + b.q, A(0)};
  if (a.mx != neg_inf<A>()) {
    r.se += a.se * exp_(a.mx - m);
    r.p += a.p + a.q * (m - a.mx);
  }
  if (b.mx != neg_inf<A>()) {
    r.se += b.se * exp_(b.mx - m);
    r.p += b.p + b.q * (m - b.mx);
  }
  return r;
}

template <typename T, int VEC, typename A>
__device__ __forceinline__ SoftState<A> soft_row(const T* z, const T* q, int C, int j, int width,
                                                 bool valid, int* flags) {
  SoftState<A> st{neg_inf<A>(), A(0), A(0), A(0)};
  if (valid) {
    for (int c0 = j * VEC; c0 < C; c0 += width * VEC) {
      A x[VEC], w[VEC];
      load_vec<T, VEC>(z + c0, x);
      load_vec<T, VEC>(q + c0, w);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        check_finite(x[i], flags, kFlagLogits);
        check_finite(w[i], flags, kFlagSoftLabels);
      }
      A cm = x[0];
#pragma unroll
      for (int i = 1; i < VEC; ++i) cm = fmax(cm, x[i]);
      if (cm > st.mx) {
        if (st.mx != neg_inf<A>()) {
          st.se *= exp_(st.mx - cm);
          st.p += st.q * (cm - st.mx);
        }
        st.mx = cm;
      }
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        st.se += exp_(x[i] - st.mx);
        st.q += w[i];
        st.p += w[i] * (st.mx - x[i]);
      }
    }
  }
  for (int o = width >> 1; o > 0; o >>= 1) {
    SoftState<A> other{__shfl_xor_sync(kFullMask, st.mx, o), __shfl_xor_sync(kFullMask, st.se, o),
                       __shfl_xor_sync(kFullMask, st.q, o), __shfl_xor_sync(kFullMask, st.p, o)};
    st = soft_merge(st, other);
  }
  return st;
}

template <typename T, int VEC, bool kBackward, typename A = acc_type<T>>
__global__ void __launch_bounds__(kThreads)
    soft_ce_kernel(const T* __restrict__ z, const T* __restrict__ q, int64_t B, int C, int G,
                   const A* __restrict__ grad, A inv_b, A* __restrict__ partials,
                   T* __restrict__ grad_z, T* __restrict__ grad_q, int* __restrict__ flags) {
  __shared__ A scratch[kWarp];
  const int lane = threadIdx.x % kWarp;
  const int spw = kWarp / G;
  const int slot = lane / G, j = lane % G;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int64_t nwarps = static_cast<int64_t>(gridDim.x) * blockDim.x / kWarp;
  A s = A(0);
  if (kBackward) s = grad[0] * inv_b;
  A local = A(0);
  for (int64_t base = warp * spw; base < B; base += nwarps * spw) {
    const int64_t b = base + slot;
    const bool valid = b < B;
    const int64_t off = b * static_cast<int64_t>(C);
    const SoftState<A> st = soft_row<T, VEC, A>(z + off, q + off, C, j, G, valid, flags);
    const A lse_shift = valid ? log_(st.se) : A(0);  // lse - max
    if (!kBackward) {
      if (valid && j == 0) local += st.p + st.q * lse_shift;
    } else if (valid) {
      const A lse = st.mx + lse_shift;
      for (int c0 = j * VEC; c0 < C; c0 += G * VEC) {
        A x[VEC], w[VEC], gz[VEC], gq[VEC];
        load_vec<T, VEC>(z + off + c0, x);
        load_vec<T, VEC>(q + off + c0, w);
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          gz[i] = s * (exp_(x[i] - lse) * st.q - w[i]);
          gq[i] = s * (lse - x[i]);
        }
        store_vec<T, VEC>(grad_z + off + c0, gz);
        store_vec<T, VEC>(grad_q + off + c0, gq);
      }
    }
  }
  if (!kBackward) {
    const A t = block_sum(local, scratch);
    if (threadIdx.x == 0) partials[blockIdx.x] = t;
  }
}

struct SoftLayout {
  int vec, g, grid;
};

template <typename T>
inline SoftLayout soft_layout(const T* z, const T* q, int64_t B, int C, const T* gz, const T* gq) {
  SoftLayout l{};
  const int vec = vec16<T>();
  const bool ok = C % vec == 0 && aligned_to(z, 16) && aligned_to(q, 16) &&
                  (gz == nullptr || aligned_to(gz, 16)) && (gq == nullptr || aligned_to(gq, 16));
  l.vec = ok ? vec : 1;
  const int chunks = static_cast<int>(ceil_div(C, l.vec));
  l.g = next_pow2(chunks) < kWarp ? next_pow2(chunks) : kWarp;
  l.grid = grid_for(B, kThreads / l.g);
  return l;
}

template <typename T>
inline int64_t soft_ce_num_partials(const T* z, const T* q, int64_t B, int C) {
  return soft_layout<T>(z, q, B, C, nullptr, nullptr).grid;
}

// mean_b -sum_c q log_softmax(z) (an empty batch gives 0); partials: soft_ce_num_partials;
// flags: common.cuh's flag tensor (NaN/inf logits and soft labels are reported).
template <typename T>
cudaError_t soft_ce_forward(const T* z, const T* q, int64_t B, int C, acc_type<T>* partials,
                            T* loss, int* flags, cudaStream_t stream) {
  using A = acc_type<T>;
  int64_t n = 0;
  if (B > 0) {
    const SoftLayout l = soft_layout<T>(z, q, B, C, nullptr, nullptr);
    constexpr int V = vec16<T>();
    if (l.vec == V)
      soft_ce_kernel<T, V, false, A><<<l.grid, kThreads, 0, stream>>>(
          z, q, B, C, l.g, nullptr, A(0), partials, nullptr, nullptr, flags);
    else
      soft_ce_kernel<T, 1, false, A><<<l.grid, kThreads, 0, stream>>>(
          z, q, B, C, l.g, nullptr, A(0), partials, nullptr, nullptr, flags);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    n = l.grid;
  }
  const A scale = A(1) / static_cast<A>(B > 0 ? B : 1);
  finalize_scaled_sum_kernel<T, A><<<1, kFinalizeThreads, 0, stream>>>(partials, n, scale, loss);
  return cudaGetLastError();
}

// grad: device scalar (acc type); writes grad_z and grad_q ([B, C], T).
template <typename T>
cudaError_t soft_ce_backward(const acc_type<T>* grad, const T* z, const T* q, int64_t B, int C,
                             T* grad_z, T* grad_q, cudaStream_t stream) {
  using A = acc_type<T>;
  if (B == 0) return cudaSuccess;
  const SoftLayout l = soft_layout<T>(z, q, B, C, grad_z, grad_q);
  const A inv = A(1) / static_cast<A>(B);
  constexpr int V = vec16<T>();
  if (l.vec == V)
    soft_ce_kernel<T, V, true, A>
        <<<l.grid, kThreads, 0, stream>>>(z, q, B, C, l.g, grad, inv, nullptr, grad_z, grad_q,
                                          nullptr);
  else
    soft_ce_kernel<T, 1, true, A>
        <<<l.grid, kThreads, 0, stream>>>(z, q, B, C, l.g, grad, inv, nullptr, grad_z, grad_q,
                                          nullptr);
  return cudaGetLastError();
}

}  // namespace mix
}  // namespace gpu
}  // namespace omnifuse_fast

#define OMNIFUSE_GPU_INSTANTIATE_MIX(T)                                                           \
  template cudaError_t omnifuse_fast::gpu::mix::mix_forward<T>(                                   \
      const T*, const int64_t*, const int64_t*, const float*, int64_t, int, int64_t, int, T*, T*, \
      int*, cudaStream_t);                                                                        \
  template cudaError_t omnifuse_fast::gpu::mix::mix_backward<T>(                                  \
      const T*, const int64_t*, int64_t, int, int64_t, int64_t, void*, size_t, T*, cudaStream_t); \
  template cudaError_t omnifuse_fast::gpu::mix::soft_ce_forward<T>(                               \
      const T*, const T*, int64_t, int, omnifuse_fast::gpu::acc_type<T>*, T*, int*, cudaStream_t); \
  template cudaError_t omnifuse_fast::gpu::mix::soft_ce_backward<T>(                              \
      const omnifuse_fast::gpu::acc_type<T>*, const T*, const T*, int64_t, int, T*, T*,           \
      cudaStream_t);
