// Shared helpers of the CPU kernels: deterministic blocked parallelism and the numerics
// (exact log-space softmax row statistics) that several op families reuse.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

// Hot row loops are compiled three times, for x86-64-v4 (AVX-512: a 16-row tile of fp32 is one
// register), x86-64-v3 (AVX2, FMA, F16C) and the baseline, and
// picked at load time (GCC function multiversioning), so one binary is portable and uses AVX2
// where it exists. Apply to functions that own a whole block of rows (one ifunc call each);
// everything they call is OMNIFUSE_INLINE so that it is compiled for the clone's target.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define OMNIFUSE_CPU_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define OMNIFUSE_CPU_CLONES
#endif

// Row helpers are force-inlined into the cloned block functions, so that they get the clone's
// instruction set (an out-of-line helper would be compiled once, for the baseline).
#if defined(__GNUC__)
#define OMNIFUSE_INLINE inline __attribute__((always_inline))
#else
#define OMNIFUSE_INLINE inline
#endif

namespace omnifuse_fast {
namespace cpu {

using at::Tensor;

#define OMNIFUSE_DISPATCH_FLOATS(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

// Allocates a kernel's output. A large one is first advised to use transparent huge pages
// (before anything writes it): the first touch of a fresh 100 MB buffer otherwise takes one page
// fault per 4 KB, which dominates a bandwidth-bound kernel. PyTorch's THP_MEM_ALLOC_ENABLE=1
// does the same for every allocation; errors (another allocator, no THP) are ignored.
inline Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  Tensor t = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  const uintptr_t bytes = t.nbytes();
  if (bytes >= 8 * kHuge) {
    const uintptr_t p = reinterpret_cast<uintptr_t>(t.data_ptr());
    const uintptr_t lo = (p + kHuge - 1) & ~(kHuge - 1), hi = (p + bytes) & ~(kHuge - 1);
    if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
  }
#endif
  return t;
}

inline Tensor empty_output_like(const Tensor& t) {
  return empty_output(t.sizes(), t.options().memory_format(at::MemoryFormat::Contiguous));
}

// Runs f(block, begin, end) over fixed-size blocks of [0, n), in parallel. Blocks (not threads)
// own the partial sums of a reduction, so results do not depend on the thread count.
template <typename F>
inline void for_blocks(int64_t n, int64_t block, const F& f) {
  const int64_t nblocks = (n + block - 1) / block;
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t i = b0; i < b1; ++i) f(i, i * block, std::min(n, (i + 1) * block));
  });
}

inline int64_t num_blocks(int64_t n, int64_t block) { return (n + block - 1) / block; }

// The accumulation dtype of a floating tensor: fp64 stays fp64, everything else runs in fp32.
inline at::ScalarType acc_type(const Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Value of a 0-dim (or one-element) tensor, e.g. the incoming gradient of a scalar loss.
inline double scalar_value(const Tensor& t) { return t.item<double>(); }

// ---- value checks (SPEC section 7) ------------------------------------------------------------
// The CPU kernels check the values they read (label, comb and src ranges; finite logits) and
// raise the same ValueError as the Python checks of omnifuse_fast/_checks.py, naming the public
// argument. Index ranges are checked before any kernel reads through them (never out of
// bounds); finiteness is accumulated inside the kernels' own passes and raised after them.
// These checks run whatever set_value_checks says: they cost a few percent of an op, and the
// index checks are what keeps a bad label from reading or writing out of bounds. (Never thrown
// inside the cloned row functions: an exception must not unwind through a target_clones
// function; they return flags instead.)

// Like Python's _checks._describe: "shape (4, 3, 5), dtype torch.float32, device cpu".
inline std::string describe(const Tensor& t) {
  std::string shape = "(";
  for (int64_t i = 0; i < t.dim(); ++i) {
    shape += std::to_string(t.size(i));
    if (i + 1 < t.dim() || t.dim() == 1) shape += t.dim() == 1 ? "," : ", ";
  }
  shape += ")";
  const char* dtype = "unknown";
  switch (t.scalar_type()) {
    case at::kFloat: dtype = "torch.float32"; break;
    case at::kDouble: dtype = "torch.float64"; break;
    case at::kHalf: dtype = "torch.float16"; break;
    case at::kBFloat16: dtype = "torch.bfloat16"; break;
    case at::kLong: dtype = "torch.int64"; break;
    case at::kInt: dtype = "torch.int32"; break;
    case at::kBool: dtype = "torch.bool"; break;
    default: break;
  }
  return "shape " + shape + ", dtype " + dtype + ", device " + t.device().str();
}

// (min, max) of p[0, n) (vectorizable: no early exit).
template <typename T>
OMNIFUSE_CPU_CLONES void minmax_rows(const T* p, int64_t n, int64_t* out) {
  T lo = std::numeric_limits<T>::max(), hi = std::numeric_limits<T>::lowest();
#pragma omp simd reduction(min : lo) reduction(max : hi)
  for (int64_t i = 0; i < n; ++i) {
    lo = p[i] < lo ? p[i] : lo;
    hi = p[i] > hi ? p[i] : hi;
  }
  out[0] = static_cast<int64_t>(lo);
  out[1] = static_cast<int64_t>(hi);
}

// Raises ValueError "<name> <what> must be in [lo, hi], got min X, max Y" (the Python check's
// message) unless every value of the integer tensor idx is in [lo, hi]. One parallel pass over
// the (small) index tensor, before any kernel indexes with it.
inline void check_range(const Tensor& idx_in, int64_t lo, int64_t hi, const char* name,
                        const char* what, const std::string& hint = "") {
  const Tensor idx = idx_in.contiguous();
  const int64_t n = idx.numel();
  if (n == 0) return;
  constexpr int64_t kRange = 1 << 14;
  const int64_t nblk = (n + kRange - 1) / kRange;
  std::vector<int64_t> mm(2 * nblk);
  at::parallel_for(0, nblk, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t s = b * kRange, len = std::min(n, s + kRange) - s;
      if (idx.scalar_type() == at::kInt) {
        minmax_rows(idx.const_data_ptr<int32_t>() + s, len, mm.data() + 2 * b);
      } else {
        minmax_rows(idx.const_data_ptr<int64_t>() + s, len, mm.data() + 2 * b);
      }
    }
  });
  int64_t tmin = mm[0], tmax = mm[1];
  for (int64_t b = 1; b < nblk; ++b) {
    tmin = std::min(tmin, mm[2 * b]);
    tmax = std::max(tmax, mm[2 * b + 1]);
  }
  TORCH_CHECK_VALUE(tmin >= lo && tmax <= hi, name, " ", what, " must be in [", lo, ", ", hi,
                    "], got min ", tmin, ", max ", tmax, hint.empty() ? "" : ": ", hint);
}

// Class labels: int64 in [0, C) (hint: _checks.label_hint).
inline void check_labels(const Tensor& labels, int64_t C, const char* name = "labels") {
  check_range(labels, 0, C - 1, name, "class indices",
              "the logits have C = " + std::to_string(C) + " classes (their last dim)");
}

// Combination ids of M modalities: [1, 2**M - 1] (hint: _checks.comb_hint).
inline void check_comb(const Tensor& comb, int64_t M) {
  check_range(comb, 1, (int64_t(1) << M) - 1, "comb", "combination ids",
              "ids of " + std::to_string(M) +
                  " modalities come from combination_ids(present) (0 means none present)");
}

// Raises the Python check's ValueError for a non-finite tensor when any flag is set.
inline void check_finite_flags(const std::vector<uint8_t>& bad, const Tensor& t,
                               const char* name) {
  bool any = false;
  for (uint8_t b : bad) any = any || b;
  TORCH_CHECK_VALUE(!any, name, " must be finite; it holds NaN or inf (", describe(t), ")");
}

// 0 for finite x, NaN for +-inf and NaN: summed over a pass, a non-zero (NaN) total flags a
// non-finite value with one subtract and one add per element (vectorizes; needs no
// -ffinite-math-only, which the build does not use).
template <typename T>
OMNIFUSE_INLINE T nonfinite_term(T x) {
  return x - x;
}

template <typename T>
inline T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

OMNIFUSE_INLINE int32_t float_bits(float f) {
  int32_t i;
  std::memcpy(&i, &f, sizeof(i));
  return i;
}
OMNIFUSE_INLINE float bits_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof(f));
  return f;
}

// exp for x <= 0 that the compiler can vectorize (no libm call in the loop; needs
// -fno-trapping-math for the selects to if-convert). Every exp of the kernels has a
// non-positive argument (z - max, log-probabilities, weights' exponents), or one in a lane that
// is discarded. float: Cephes' expf polynomial on r = x - n ln2, scaled by 2^n added to the
// exponent bits; relative error below 1e-7; positive x is clamped to 0, x below -87 to -87
// (~1e-38 rather than a flush to 0). Finite x only (inputs are validated finite; NaN gives an
// unspecified value). double: std::exp.
OMNIFUSE_INLINE float vexp_neg(float x) {
  constexpr float kMagic = 12582912.f;  // 1.5 * 2^23
  float xc = x > 0.f ? 0.f : x;
  xc = xc < -87.f ? -87.f : xc;
  const float t = xc * 1.44269504088896341f + kMagic;
  const float n = t - kMagic;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.f;
  // y * 2^n: add n to y's exponent field (n in [-126, 0], so it stays a normal float)
  const uint32_t shift =
      (static_cast<uint32_t>(float_bits(t)) - static_cast<uint32_t>(float_bits(kMagic))) << 23;
  return bits_float(static_cast<int32_t>(static_cast<uint32_t>(float_bits(y)) + shift));
}
OMNIFUSE_INLINE double vexp_neg(double x) { return std::exp(x); }

// log for positive, normal, finite float x (every call site guarantees it): Cephes' logf
// polynomial on the mantissa, exponent from the bits (relative error below 1e-7). double:
// std::log.
OMNIFUSE_INLINE float vlog(float x) {
  const int32_t bits = float_bits(x);
  int32_t e = ((bits >> 23) & 0xff) - 126;  // x = m 2^e with m in [0.5, 1)
  float m = bits_float((bits & 0x007fffff) | 0x3f000000);
  const bool small = m < 0.707106781186547524f;  // keep m - 1 in [sqrt(1/2) - 1, sqrt(2) - 1)
  e = small ? e - 1 : e;
  m = small ? m + m - 1.f : m - 1.f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  const float fe = static_cast<float>(e);
  y += fe * -2.12194440e-4f;
  y += -0.5f * z;
  return m + y + fe * 0.693359375f;
}
OMNIFUSE_INLINE double vlog(double x) { return std::log(x); }

// log(1 + exp(d)) for d <= 0, accurate for tiny exp(d) too: with u = exp(d) and w = 1 + u
// rounded, log1p(u) = log(w) - ((w - 1) - u) / w corrects the rounding of w.
OMNIFUSE_INLINE float log1pexp_neg(float d) {
  const float u = vexp_neg(d);
  const float w = 1.f + u;
  return vlog(w) - ((w - 1.f) - u) / w;
}
OMNIFUSE_INLINE double log1pexp_neg(double d) { return std::log1p(std::exp(d)); }

// softplus(x) = log(1 + exp(x)), stable for any x.
template <typename T>
OMNIFUSE_INLINE T softplus(T x) {
  const T ax = x < T(0) ? -x : x;
  return (x > T(0) ? x : T(0)) + log1pexp_neg(-ax);
}

// Multilabel sign s = 1 - 2y of a 0/1 label: t = s z is the logit of the wrong value.
template <typename acc_t, typename scalar_t>
OMNIFUSE_INLINE acc_t label_sign(scalar_t y) {
  return static_cast<acc_t>(y) > acc_t(0.5) ? acc_t(-1) : acc_t(1);
}

// ---- softmax rows with a true class -----------------------------------------------------------
// Statistics of a row z[0..C) with true class y, exact in log space for every p in [0, 1]:
//   lseo = logsumexp_{c != y} z_c = mo + ls  (mo = max_{c != y} z_c, ls = log sum e^{z_c - mo}),
//   lse = logsumexp_c z_c = logaddexp(lseo, z_y).
// Never formed by subtracting the large lse from z (that loses ulp(|z|) absolutely, 1e-3 at
// |z| ~ 1e4): with d = lseo - z_y = (mo - z_y) + ls and L = log(1 + exp(-|d|)),
//   log(1 - p_y) = lseo - lse = min(d, 0) - L,  CE = lse - z_y = max(d, 0) + L,
//   p_c = q_c (1 - p_y) for c != y with q_c = exp((z_c - mo) - ls).
// Stage 1 (ClassRows::add_rows) computes per row the max mo over c != y and the sum so of
// exp(z_c - mo) over c != y (and of its squares): long rows vectorized along C, short rows
// (C ~ 25) across a tile of rows. Stage 2 (ClassRows::finish) runs the per-row log/exp
// vectorized across the block: scalar libm calls would otherwise dominate short rows.

template <typename scalar_t, typename acc_t, bool kSumSq = false>
OMNIFUSE_INLINE void class_row_sums(const scalar_t* z, int64_t C, int64_t y, acc_t& mo_out,
                                    acc_t& so_out, acc_t& sq_out, acc_t& nf_out) {
  acc_t mo = neg_inf<acc_t>(), nf = 0;
#pragma omp simd reduction(max : mo) reduction(+ : nf)
  for (int64_t c = 0; c < C; ++c) {
    const acc_t x = static_cast<acc_t>(z[c]);
    const acc_t v = c == y ? neg_inf<acc_t>() : x;
    mo = mo > v ? mo : v;
    nf += nonfinite_term(x);
  }
  nf_out += nf;
  acc_t so = 0, sq = 0;
#pragma omp simd reduction(+ : so, sq)
  for (int64_t c = 0; c < C; ++c) {
    const acc_t e = c == y ? acc_t(0) : vexp_neg(static_cast<acc_t>(z[c]) - mo);
    so += e;
    if (kSumSq) sq += e * e;
  }
  mo_out = mo;
  so_out = so;  // >= 1: the max term contributes exp(0)
  sq_out = sq;
}

// Rows of at most kSmallC classes are processed kTile rows at a time, transposed into a
// [C][kTile] tile (converted to acc_t once): every pass then runs across rows, with no
// horizontal reductions or loop remainders per row. Padding rows (beyond the count) read 0.
constexpr int64_t kSmallC = 64;
constexpr int64_t kTile = 16;

// Labels in a tile have the width of acc_t, so that comparing them with the class index gives
// a mask with the float lanes' layout (no 64-bit compares and repacking for fp32).
template <typename acc_t>
using tile_label_t = std::conditional_t<sizeof(acc_t) == 4, int32_t, int64_t>;

template <typename scalar_t, typename acc_t>
OMNIFUSE_INLINE void load_tile(const scalar_t* z, int64_t C, const int64_t* row, const int64_t* ys,
                               int64_t nt, acc_t* t, tile_label_t<acc_t>* yt) {
  for (int64_t r = 0; r < kTile; ++r) {
    if (r < nt) {
      const scalar_t* zr = z + row[r] * C;
      for (int64_t c = 0; c < C; ++c) t[c * kTile + r] = static_cast<acc_t>(zr[c]);
      yt[r] = static_cast<tile_label_t<acc_t>>(ys[r]);
    } else {
      for (int64_t c = 0; c < C; ++c) t[c * kTile + r] = acc_t(0);
      yt[r] = 0;
    }
  }
}

// Structure-of-arrays statistics of up to N rows.
template <typename acc_t, int64_t N>
struct ClassRows {
  int64_t n = 0;
  acc_t nf = 0;                      // sum of nonfinite_term over every value read (n = 0 keeps it)
  acc_t mo[N], so[N], sq[N], zy[N];  // stage 1
  acc_t ls[N], lc[N], ce[N];         // stage 2: log so, log(1 - p_y), CE

  // Whether a row read so far held NaN or inf.
  OMNIFUSE_INLINE bool nonfinite() const { return !(nf == acc_t(0)); }

  template <typename scalar_t, bool kSumSq = false>
  OMNIFUSE_INLINE void add(const scalar_t* z, int64_t C, int64_t y) {
    class_row_sums<scalar_t, acc_t, kSumSq>(z, C, y, mo[n], so[n], sq[n], nf);
    zy[n] = static_cast<acc_t>(z[y]);
    ++n;
  }

  // Adds rows z + row[i] * C with labels ys[i], i < count (n + count <= N). Short rows are
  // transposed a tile at a time so that the max and exp-sum passes run across rows.
  // ebuf (optional, short rows only): receives exp(z_c - mo) of every row, tile by tile in the
  // transposed [C][kTile] layout (tile k at ebuf + k C kTile; 0 in the y lane), so that a
  // gradient can be written from it without a second exp per element (write_class_grads_e).
  template <typename scalar_t, bool kSumSq = false>
  OMNIFUSE_INLINE void add_rows(const scalar_t* z, int64_t C, const int64_t* row, const int64_t* ys,
                                int64_t count, acc_t* ebuf = nullptr) {
    if (C > kSmallC) {
      for (int64_t i = 0; i < count; ++i) add<scalar_t, kSumSq>(z + row[i] * C, C, ys[i]);
      return;
    }
    acc_t t[kSmallC * kTile];
    tile_label_t<acc_t> yt[kTile];
    for (int64_t i0 = 0; i0 < count; i0 += kTile) {
      const int64_t nt = std::min(kTile, count - i0);
      load_tile(z, C, row + i0, ys + i0, nt, t, yt);
      acc_t m[kTile], s[kTile], q[kTile], f[kTile];
      for (int64_t r = 0; r < kTile; ++r) m[r] = neg_inf<acc_t>(), f[r] = 0;
      for (tile_label_t<acc_t> c = 0; c < C; ++c) {
#pragma omp simd
        for (int64_t r = 0; r < kTile; ++r) {
          const acc_t x = t[c * kTile + r];
          const acc_t v = c == yt[r] ? neg_inf<acc_t>() : x;
          m[r] = m[r] > v ? m[r] : v;
          f[r] += nonfinite_term(x);
        }
      }
      for (int64_t r = 0; r < kTile; ++r) nf += f[r];
      for (int64_t r = 0; r < kTile; ++r) s[r] = q[r] = 0;
      acc_t* et = ebuf ? ebuf + (i0 / kTile) * C * kTile : nullptr;
      for (tile_label_t<acc_t> c = 0; c < C; ++c) {
#pragma omp simd
        for (int64_t r = 0; r < kTile; ++r) {
          const acc_t e = c == yt[r] ? acc_t(0) : vexp_neg(t[c * kTile + r] - m[r]);
          s[r] += e;
          if (kSumSq) q[r] += e * e;
          if (et) et[c * kTile + r] = e;
        }
      }
      for (int64_t r = 0; r < nt; ++r) {
        mo[n + r] = m[r];
        so[n + r] = s[r];
        sq[n + r] = q[r];
        zy[n + r] = t[yt[r] * kTile + r];
      }
      n += nt;
    }
  }

  OMNIFUSE_INLINE void finish() {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const acc_t l = vlog(so[i]);
      const acc_t d = (mo[i] - zy[i]) + l;  // lseo - z_y
      const acc_t big = log1pexp_neg(d < acc_t(0) ? d : -d);
      ls[i] = l;
      lc[i] = (d < acc_t(0) ? d : acc_t(0)) - big;
      ce[i] = (d > acc_t(0) ? d : acc_t(0)) + big;
    }
  }
};

// Writes the gradient of a row whose loss depends on z only through the softmax of the true
// class, with d/dz_c = kappa * q_c (c != y) and -kappa (c = y), q_c = exp((z_c - mo) - ls).
// Cross-entropy times w gives kappa = w * (1 - p_y); the complement log(1 - p_y) times a gives
// kappa = a * p_y (d log(1 - p_y) / dz_c = q_c p_y for c != y, -p_y for c = y).
template <typename scalar_t, typename acc_t>
OMNIFUSE_INLINE void write_class_grad(scalar_t* g, const scalar_t* z, int64_t C, int64_t y,
                                      acc_t mo, acc_t ls, acc_t kappa) {
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    const acc_t e = vexp_neg((static_cast<acc_t>(z[c]) - mo) - ls);  // <= 0 but in the y lane
    g[c] = static_cast<scalar_t>(c == y ? -kappa : kappa * e);
  }
}

// write_class_grad for rows z + row[i] * C (labels ys[i], mo[i], ls[i], kappa[i]), i < count;
// short rows go through a transposed tile like ClassRows::add_rows.
template <typename scalar_t, typename acc_t>
OMNIFUSE_INLINE void write_class_grads(scalar_t* g, const scalar_t* z, int64_t C,
                                       const int64_t* row, const int64_t* ys, const acc_t* mo,
                                       const acc_t* ls, const acc_t* kappa, int64_t count) {
  if (C > kSmallC) {
    for (int64_t i = 0; i < count; ++i) {
      write_class_grad(g + row[i] * C, z + row[i] * C, C, ys[i], mo[i], ls[i], kappa[i]);
    }
    return;
  }
  acc_t t[kSmallC * kTile];
  tile_label_t<acc_t> yt[kTile];
  for (int64_t i0 = 0; i0 < count; i0 += kTile) {
    const int64_t nt = std::min(kTile, count - i0);
    load_tile(z, C, row + i0, ys + i0, nt, t, yt);
    acc_t m[kTile], l[kTile], k[kTile];
    for (int64_t r = 0; r < kTile; ++r) {
      m[r] = r < nt ? mo[i0 + r] : acc_t(0);
      l[r] = r < nt ? ls[i0 + r] : acc_t(0);
      k[r] = r < nt ? kappa[i0 + r] : acc_t(0);
    }
    for (tile_label_t<acc_t> c = 0; c < C; ++c) {
#pragma omp simd
      for (int64_t r = 0; r < kTile; ++r) {
        const acc_t e = vexp_neg((t[c * kTile + r] - m[r]) - l[r]);  // <= 0 but in the y lane
        t[c * kTile + r] = c == yt[r] ? -k[r] : k[r] * e;
      }
    }
    for (int64_t r = 0; r < nt; ++r) {
      scalar_t* gr = g + row[i0 + r] * C;
      for (int64_t c = 0; c < C; ++c) gr[c] = static_cast<scalar_t>(t[c * kTile + r]);
    }
  }
}

// write_class_grads from the exps that add_rows stored in ebuf (C <= kSmallC, rows added from
// index 0 in the same order): d/dz_c = kappa q_c = (kappa / so) e_c for c != y, -kappa for y.
template <typename scalar_t, typename acc_t>
OMNIFUSE_INLINE void write_class_grads_e(scalar_t* g, const acc_t* ebuf, int64_t C,
                                         const int64_t* row, const int64_t* ys, const acc_t* so,
                                         const acc_t* kappa, int64_t count) {
  acc_t t[kSmallC * kTile];
  for (int64_t i0 = 0; i0 < count; i0 += kTile) {
    const int64_t nt = std::min(kTile, count - i0);
    const acc_t* et = ebuf + (i0 / kTile) * C * kTile;
    acc_t k[kTile], ks[kTile];
    tile_label_t<acc_t> yt[kTile];
    for (int64_t r = 0; r < kTile; ++r) {
      k[r] = r < nt ? kappa[i0 + r] : acc_t(0);
      ks[r] = r < nt ? kappa[i0 + r] / so[i0 + r] : acc_t(0);
      yt[r] = r < nt ? static_cast<tile_label_t<acc_t>>(ys[i0 + r]) : 0;
    }
    for (tile_label_t<acc_t> c = 0; c < C; ++c) {
#pragma omp simd
      for (int64_t r = 0; r < kTile; ++r) {
        t[c * kTile + r] = c == yt[r] ? -k[r] : ks[r] * et[c * kTile + r];
      }
    }
    for (int64_t r = 0; r < nt; ++r) {
      scalar_t* gr = g + row[i0 + r] * C;
      for (int64_t c = 0; c < C; ++c) gr[c] = static_cast<scalar_t>(t[c * kTile + r]);
    }
  }
}

}  // namespace cpu
}  // namespace omnifuse_fast
