// Shared device helpers of the CUDA kernels: element types, vector loads, warp reductions,
// the exact log-space softmax statistics, and deterministic block reductions.
//
// Plain CUDA only (no torch headers), so that nvcc can compile-check every kernel anywhere.
// Written for the flags torch's cpp_extension passes to nvcc (__CUDA_NO_HALF_CONVERSIONS__
// and friends): half/bfloat16 values are converted with the explicit intrinsics only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace omnifuse_fast {
namespace gpu {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// ---------------------------------------------------------------------------------------------
// Element types: every input dtype accumulates in fp32, fp64 in fp64 (never below the input).
template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};
template <typename T>
using acc_type = typename AccOf<T>::type;

template <typename A, typename T>
__device__ __forceinline__ A to_acc(T v) {
  return static_cast<A>(v);
}
template <>
__device__ __forceinline__ float to_acc<float, __half>(__half v) {
  return __half2float(v);
}
template <>
__device__ __forceinline__ float to_acc<float, __nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T, typename A>
__device__ __forceinline__ T from_acc(A v) {
  return static_cast<T>(v);
}
template <>
__device__ __forceinline__ __half from_acc<__half, float>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16, float>(float v) {
  return __float2bfloat16_rn(v);
}

// N elements of T moved as one aligned access (N * sizeof(T) of 4, 8 or 16 bytes).
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// Loads N consecutive elements (p aligned to N * sizeof(T)) and upcasts them.
template <typename T, int N, typename A>
__device__ __forceinline__ void load_vec(const T* p, A (&out)[N]) {
  if constexpr (N == 1) {
    out[0] = to_acc<A>(p[0]);
  } else {
    const Vec<T, N> v = *reinterpret_cast<const Vec<T, N>*>(p);
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = to_acc<A>(v.v[i]);
  }
}

// Rounds N values to T and stores them as one aligned access.
template <typename T, int N, typename A>
__device__ __forceinline__ void store_vec(T* p, const A (&in)[N]) {
  if constexpr (N == 1) {
    p[0] = from_acc<T>(in[0]);
  } else {
    Vec<T, N> v;
#pragma unroll
    for (int i = 0; i < N; ++i) v.v[i] = from_acc<T>(in[i]);
    *reinterpret_cast<Vec<T, N>*>(p) = v;
  }
}

// Elements per 16-byte access.
template <typename T>
constexpr int vec16() {
  return 16 / static_cast<int>(sizeof(T));
}

__host__ __device__ inline bool aligned_to(const void* p, int bytes) {
  return (reinterpret_cast<std::uintptr_t>(p) % static_cast<std::uintptr_t>(bytes)) == 0;
}

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int next_pow2(int v) {
  int p = 1;
  while (p < v) p <<= 1;
  return p;
}

// ---------------------------------------------------------------------------------------------
// Device value checks (omnifuse_fast/_device_checks.py has the same slots): the bindings pass
// an int32 flag tensor, all 1; a kernel that meets a bad index never dereferences it and stores
// 0 in the index's slot (every writer stores the same 0: races are harmless). The binding then
// asserts each slot with at::_assert_async: no host synchronization.
enum FlagSlot : int {
  kFlagLabels = 0,      // labels outside [0, C)
  kFlagComb = 1,        // comb outside [1, 2^M)
  kFlagSrc = 2,         // src outside [0, B)
  kFlagMultilabel = 3,  // multilabel labels other than 0 and 1
  kFlagLogits = 4,      // NaN or inf logits
  kFlagSoftLabels = 5,  // NaN or inf soft labels
  kFlagPresent = 6,     // a sample with no present modality
  kFlagWeights = 7,     // mixing weights off the simplex
  kFlagGrads = 8,       // NaN or inf MIMO gradients (checked on their Gram, in Python)
  kFlagX = 9,           // NaN or inf CRA input (a device-side pass in Python, ops/cra.py)
  kNumFlagSlots = 10,
};

// |sum_m w[b, m] - 1| above this is off the simplex (_device_checks.SIMPLEX_TOL).
constexpr float kSimplexTol = 1e-3f + 1e-5f;

// flags may be nullptr (a backward pass: the forward already checked the same indices).
__device__ __forceinline__ void flag_bad(int* flags, int slot) {
  if (flags != nullptr) flags[slot] = 0;
}

// An int64 label read as a class id: -1 (matches no class, never dereferenced) when outside
// [0, C), reported in flags.
__device__ __forceinline__ int checked_label(int64_t y, int C, int* flags) {
  if (y >= 0 && y < C) return static_cast<int>(y);
  flag_bad(flags, kFlagLabels);
  return -1;
}

// Reports a NaN or +-inf value in `slot` (one compare per element: free next to the load).
template <typename A>
__device__ __forceinline__ void check_finite(A x, int* flags, int slot) {
  if (flags != nullptr && !(fabs(x) < static_cast<A>(INFINITY))) flags[slot] = 0;
}

// ---------------------------------------------------------------------------------------------
// Math in the accumulation type.
__device__ __forceinline__ float exp_(float x) { return expf(x); }
__device__ __forceinline__ double exp_(double x) { return exp(x); }
__device__ __forceinline__ float log_(float x) { return logf(x); }
__device__ __forceinline__ double log_(double x) { return log(x); }
__device__ __forceinline__ float log1p_(float x) { return log1pf(x); }
__device__ __forceinline__ double log1p_(double x) { return log1p(x); }

template <typename A>
__device__ __forceinline__ A neg_inf() {
  return -static_cast<A>(INFINITY);
}

// softplus(x) = log(1 + exp(x)), stable and accurate for every x (log1p keeps tiny results).
template <typename A>
__device__ __forceinline__ A softplus(A x) {
  return fmax(x, A(0)) + log1p_(exp_(-fabs(x)));
}

// sigmoid(x) without overflow.
template <typename A>
__device__ __forceinline__ A sigmoid(A x) {
  if (x >= A(0)) return A(1) / (A(1) + exp_(-x));
  const A e = exp_(x);
  return e / (A(1) + e);
}

// ---------------------------------------------------------------------------------------------
// Warp reductions over aligned groups of `width` lanes (a power of two <= 32). Every lane of
// the warp must call them; each lane ends with its group's result. A butterfly combines the
// same partials in every lane (a + b == b + a), so all lanes of a group hold identical bits.
template <typename A>
__device__ __forceinline__ A group_sum(A v, int width) {
  for (int o = width >> 1; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

template <typename A>
__device__ __forceinline__ A group_max(A v, int width) {
  for (int o = width >> 1; o > 0; o >>= 1) v = fmax(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

// A running (max, sum of exp(x - max)) pair, merged exactly; -inf max means empty.
template <typename A>
struct ExpSum {
  A mx;
  A s;
};

template <typename A>
__device__ __forceinline__ ExpSum<A> merge(ExpSum<A> a, ExpSum<A> b) {
  const A m = fmax(a.mx, b.mx);
  if (m == neg_inf<A>()) return {m, A(0)};
  const A sa = a.mx == neg_inf<A>() ? A(0) : a.s * exp_(a.mx - m);
  const A sb = b.mx == neg_inf<A>() ? A(0) : b.s * exp_(b.mx - m);
  return {m, sa + sb};
}

template <typename A>
__device__ __forceinline__ ExpSum<A> group_merge(ExpSum<A> v, int width) {
  for (int o = width >> 1; o > 0; o >>= 1) {
    ExpSum<A> other{__shfl_xor_sync(kFullMask, v.mx, o), __shfl_xor_sync(kFullMask, v.s, o)};
    v = merge(v, other);
  }
  return v;
}

// ---------------------------------------------------------------------------------------------
// Softmax statistics of one class row z[0..C) with true class y, split over the `width` lanes
// of a group (lane j reads elements j*VEC + i*width*VEC .. + VEC). The true class is left out
// of (mo, so) so that log(1 - p_y) stays exact for every p_y in [0, 1]:
//   lseo = logsumexp_{c != y} z_c = mo + log(so)   (so >= 1: the max term is exp(0))
//   d    = z_y - lseo,  CE = lse - z_y = softplus(-d),  log(1 - p_y) = -softplus(d)
//   p_y  = sigmoid(d),  p_c = exp(z_c - lseo) * (1 - p_y) for c != y.
// With kSumSq, sq = sum_{c != y} exp(z_c - mo)^2 (for the squared distance of TLA).
// A y outside [0, C) (a bad label, already reported) is never read: z_y is then 0.
// flags (or nullptr): where a NaN or inf logit of the row is reported (kFlagLogits).
template <typename A>
struct ClassRow {
  A lseo;  // logsumexp over c != y
  A zy;    // z_y
  A sq;    // sum_{c != y} exp(z_c - lseo)^2 (only with kSumSq)
};

template <typename T, int VEC, bool kSumSq, typename A = acc_type<T>>
__device__ __forceinline__ ClassRow<A> class_row(const T* z, int C, int y, int j, int width,
                                                 bool valid, int* flags) {
  A mo = neg_inf<A>(), so = A(0), sq = A(0);
  if (valid) {
    for (int c0 = j * VEC; c0 < C; c0 += width * VEC) {
      A x[VEC];
      load_vec<T, VEC>(z + c0, x);
      A cm = neg_inf<A>();
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        check_finite(x[i], flags, kFlagLogits);
        if (c0 + i != y) cm = fmax(cm, x[i]);
      }
      if (cm > mo) {  // rescale once per vector, not per element
        const A r = exp_(mo - cm);
        so *= r;
        if (kSumSq) sq *= r * r;
        mo = cm;
      }
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        if (c0 + i != y) {
          const A e = exp_(x[i] - mo);
          so += e;
          if (kSumSq) sq += e * e;
        }
      }
    }
  }
  // merge the group's partials: (mo, so) as an ExpSum, sq rescaled by the squared factor
  for (int o = width >> 1; o > 0; o >>= 1) {
    const A mo2 = __shfl_xor_sync(kFullMask, mo, o);
    const A so2 = __shfl_xor_sync(kFullMask, so, o);
    A sq2 = A(0);
    if (kSumSq) sq2 = __shfl_xor_sync(kFullMask, sq, o);
    const A m = fmax(mo, mo2);
    if (m != neg_inf<A>()) {
      const A ra = mo == neg_inf<A>() ? A(0) : exp_(mo - m);
      const A rb = mo2 == neg_inf<A>() ? A(0) : exp_(mo2 - m);
      so = so * ra + so2 * rb;
      if (kSumSq) sq = sq * ra * ra + sq2 * rb * rb;
    }
    mo = m;
  }
  ClassRow<A> r;
  r.zy = (valid && y >= 0 && y < C) ? to_acc<A>(z[y]) : A(0);
  r.lseo = valid ? mo + log_(so) : A(0);
  r.sq = (valid && kSumSq) ? sq / (so * so) : A(0);
  return r;
}

// ---------------------------------------------------------------------------------------------
// Deterministic block reduction: every thread passes its value; thread 0 gets the block total.
// The combination order is fixed by the thread layout, never by scheduling.
template <typename A>
__device__ __forceinline__ A block_sum(A v, A* scratch /* >= 32 entries */) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int nwarps = (blockDim.x + kWarp - 1) / kWarp;
  v = group_sum(v, kWarp);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  A total = A(0);
  if (warp == 0) {
    total = lane < nwarps ? scratch[lane] : A(0);
    total = group_sum(total, kWarp);
  }
  return total;
}

// Sums partials[0..n) in a fixed order with one block of kFinalizeThreads threads.
constexpr int kFinalizeThreads = 256;

template <typename A>
__device__ __forceinline__ A sum_partials(const A* partials, int64_t n, A* scratch) {
  A v = A(0);
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) v += partials[i];
  return block_sum(v, scratch);
}

// Writes scale * sum(partials) to out[0] (one block of kFinalizeThreads threads).
template <typename T, typename A>
__global__ void finalize_scaled_sum_kernel(const A* __restrict__ partials, int64_t n, A scale,
                                           T* __restrict__ out) {
  __shared__ A scratch[kWarp];
  const A total = sum_partials(partials, n, scratch);
  if (threadIdx.x == 0) out[0] = from_acc<T>(total * scale);
}

// Grid size for grid-stride kernels: depends on the problem size only (never on the device), so
// that per-block partial sums, and hence every reduced result, are reproducible across GPUs.
inline int grid_for(int64_t work_items, int items_per_block, int max_blocks = 2048) {
  int64_t g = ceil_div(work_items, items_per_block);
  if (g < 1) g = 1;
  if (g > max_blocks) g = max_blocks;
  return static_cast<int>(g);
}

}  // namespace gpu
}  // namespace omnifuse_fast
