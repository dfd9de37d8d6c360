// MIMO (SPEC section 6) on CPU: one pass over every parameter tensor of both gradient lists
// for the 2x2 Gram (fp64), and one pass writing lam g0 + (1 - lam) gw.
//
// The tensors are cut into fixed-size chunks that the threads share, so one big tensor and many
// small ones parallelize alike; the Gram partials are per chunk and summed in chunk order, so
// the result does not depend on the thread count.
#include "common.h"

namespace omnifuse_fast {
namespace cpu {
namespace {

constexpr int64_t kChunk = 1 << 15;  // elements per chunk

struct Chunk {
  int64_t tensor, begin, end;
};

std::vector<Chunk> make_chunks(const std::vector<Tensor>& ts) {
  std::vector<Chunk> chunks;
  for (int64_t t = 0; t < static_cast<int64_t>(ts.size()); ++t) {
    const int64_t n = ts[t].numel();
    for (int64_t b = 0; b < n; b += kChunk) chunks.push_back({t, b, std::min(n, b + kChunk)});
  }
  return chunks;
}

std::vector<Tensor> contiguous_all(at::TensorList ts) {
  std::vector<Tensor> out;
  out.reserve(ts.size());
  for (const Tensor& t : ts) out.push_back(t.contiguous());
  return out;
}

void check_pairs(const std::vector<Tensor>& a, const std::vector<Tensor>& b, const char* op) {
  TORCH_CHECK(a.size() == b.size(), "omnifuse_fast::", op, ": g0 and gw differ in length");
  for (size_t i = 0; i < a.size(); ++i) {
    TORCH_CHECK(a[i].numel() == b[i].numel() && a[i].scalar_type() == b[i].scalar_type(),
                "omnifuse_fast::", op, ": g0[", i, "] and gw[", i, "] differ in size or dtype");
  }
}

// (a.a, a.b, b.b) over [begin, end) in fp64: products of fp32 values are exact in fp64.
template <typename scalar_t>
OMNIFUSE_CPU_CLONES void gram_chunk(const scalar_t* a, const scalar_t* b, int64_t begin,
                                    int64_t end, double* out) {
  double aa = 0.0, ab = 0.0, bb = 0.0;
#pragma omp simd reduction(+ : aa, ab, bb)
  for (int64_t i = begin; i < end; ++i) {
    const double x = static_cast<double>(a[i]), y = static_cast<double>(b[i]);
    aa += x * x;
    ab += x * y;
    bb += y * y;
  }
  out[0] = aa;
  out[1] = ab;
  out[2] = bb;
}

// Rounded like the reference: two products, then a sum, never contracted into an FMA. With
// opposed gradients the two terms nearly cancel, and only the same roundings give the same d.
// (Bandwidth-bound: the baseline build is as fast as an AVX2 clone would be.)
template <typename scalar_t>
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("fp-contract=off")))
#endif
void direction_chunk(const scalar_t* a, const scalar_t* b, scalar_t* o, int64_t begin, int64_t end,
                     double lam) {
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t l = static_cast<acc_t>(lam), lc = acc_t(1) - l;
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    o[i] = static_cast<scalar_t>(l * static_cast<acc_t>(a[i]) + lc * static_cast<acc_t>(b[i]));
  }
}

Tensor mimo_gram_cpu(at::TensorList g0_in, at::TensorList gw_in) {
  const std::vector<Tensor> g0 = contiguous_all(g0_in), gw = contiguous_all(gw_in);
  check_pairs(g0, gw, "mimo_gram");
  const std::vector<Chunk> chunks = make_chunks(g0);
  const int64_t n = static_cast<int64_t>(chunks.size());
  std::vector<double> partial(3 * n, 0.0);
  at::parallel_for(0, n, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const Chunk& ch = chunks[c];
      OMNIFUSE_DISPATCH_FLOATS(g0[ch.tensor].scalar_type(), "mimo_gram", [&] {
        gram_chunk(g0[ch.tensor].const_data_ptr<scalar_t>(),
                   gw[ch.tensor].const_data_ptr<scalar_t>(), ch.begin, ch.end, &partial[3 * c]);
      });
    }
  });
  Tensor out = at::empty({3}, g0_in[0].options().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  o[0] = o[1] = o[2] = 0.0;
  for (int64_t c = 0; c < n; ++c) {
    for (int k = 0; k < 3; ++k) o[k] += partial[3 * c + k];
  }
  return out;
}

std::vector<Tensor> mimo_direction_cpu(at::TensorList g0_in, at::TensorList gw_in,
                                       const Tensor& lam_t) {
  const std::vector<Tensor> g0 = contiguous_all(g0_in), gw = contiguous_all(gw_in);
  check_pairs(g0, gw, "mimo_direction");
  const double lam = scalar_value(lam_t);
  std::vector<Tensor> out;
  out.reserve(g0.size());
  for (size_t i = 0; i < g0.size(); ++i)
    out.push_back(empty_output(g0_in[i].sizes(), g0[i].options()));
  const std::vector<Chunk> chunks = make_chunks(g0);
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const Chunk& ch = chunks[c];
      OMNIFUSE_DISPATCH_FLOATS(g0[ch.tensor].scalar_type(), "mimo_direction", [&] {
        direction_chunk(g0[ch.tensor].const_data_ptr<scalar_t>(),
                        gw[ch.tensor].const_data_ptr<scalar_t>(),
                        out[ch.tensor].data_ptr<scalar_t>(), ch.begin, ch.end, lam);
      });
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(omnifuse_fast, CPU, m) {
  m.impl("mimo_gram", &mimo_gram_cpu);
  m.impl("mimo_direction", &mimo_direction_cpu);
}

}  // namespace cpu
}  // namespace omnifuse_fast
