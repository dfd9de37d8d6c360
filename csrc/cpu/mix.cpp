// MM learning (SPEC section 5) on CPU: the modality mix (a row gather plus proportion labels),
// its backward as a deterministic scatter-add, and the soft-label cross-entropy.
#include <cstring>

#include "common.h"

namespace omnifuse_fast {
namespace cpu {
namespace {

std::tuple<Tensor, Tensor> modality_mix_cpu(const Tensor& v_in, const Tensor& labels_in,
                                            const Tensor& src_in, int64_t num_classes,
                                            const std::optional<Tensor>& weights_in) {
  const Tensor v = v_in.contiguous();
  const Tensor labels = labels_in.contiguous();
  const Tensor src = src_in.to(at::kLong).contiguous();
  // B mixed rows (src [M, B]) drawn from a pool of Bs samples (== B for the public op)
  const int64_t B = src.size(1), M = v.size(1), D = v.size(2), C = num_classes;
  const int64_t Bs = v.size(0);
  TORCH_CHECK(M <= 8, "omnifuse_fast::modality_mix: at most 8 modalities, got ", M);
  // value checks before any row is gathered through them (small int tensors: one pass each)
  check_labels(labels, C);
  check_range(src, 0, Bs - 1, "src", "source indices");
  // per-sample proportions [B, M] in the accumulation dtype; uniform when absent
  Tensor w;
  if (weights_in.has_value() && weights_in->defined()) {
    w = weights_in->to(acc_type(v)).expand({B, M}).contiguous();
    // value check: proportions on the simplex (_checks.simplex_weights' rule and message)
    TORCH_CHECK_VALUE(!(w < 0).any().item<bool>() &&
                          ((w.sum(-1) - 1).abs() <= 1e-3 + 1e-5).all().item<bool>(),
                      "weights must be on the simplex: >= 0 and summing to 1 over M");
  }
  Tensor v_mix = empty_output({B, M, D}, v.options());
  Tensor soft = empty_output({B, C}, v.options());
  OMNIFUSE_DISPATCH_FLOATS(v.scalar_type(), "modality_mix", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* vp = v.const_data_ptr<scalar_t>();
    const int64_t* y = labels.const_data_ptr<int64_t>();
    const int64_t* sp = src.const_data_ptr<int64_t>();
    const acc_t* wp = w.defined() ? w.const_data_ptr<acc_t>() : nullptr;
    scalar_t* out = v_mix.data_ptr<scalar_t>();
    scalar_t* q = soft.data_ptr<scalar_t>();
    const acc_t uniform = acc_t(1) / static_cast<acc_t>(M);
    at::parallel_for(0, B, 64, [&](int64_t b0, int64_t b1) {
      int64_t ys[8];
      for (int64_t b = b0; b < b1; ++b) {
        bool same = true;
        for (int64_t m = 0; m < M; ++m) {
          const int64_t s = sp[m * B + b];
          std::memcpy(out + (b * M + m) * D, vp + (s * M + m) * D, D * sizeof(scalar_t));
          ys[m] = y[s];
          same = same && ys[m] == ys[0];
        }
        scalar_t* row = q + b * C;
        std::fill(row, row + C, scalar_t(0));
        if (same) {  // every source agrees: an exact hard label
          row[ys[0]] = scalar_t(1);
          continue;
        }
        for (int64_t m = 0; m < M; ++m) {  // sum of the weights per distinct label
          bool first = true;
          for (int64_t k = 0; k < m; ++k) first = first && ys[k] != ys[m];
          if (!first) continue;
          acc_t acc = 0;
          for (int64_t k = m; k < M; ++k) {
            if (ys[k] == ys[m]) acc += wp ? wp[b * M + k] : uniform;
          }
          row[ys[m]] = static_cast<scalar_t>(acc);
        }
      }
    });
  });
  return {v_mix, soft};
}

template <typename acc_t, typename scalar_t>
OMNIFUSE_INLINE void add_row(acc_t* acc, const scalar_t* row, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) acc[i] += static_cast<acc_t>(row[i]);
}

// grad_v[i, m] = sum over b with src[m, b] = i of grad_v_mix[b, m]. A counting sort of each
// src row gives every source row its readers in ascending b; each output row is then written
// by one thread in a fixed order: no atomics, deterministic.
Tensor modality_mix_backward_cpu(const Tensor& grad_in, const Tensor& src_in, int64_t batch) {
  const Tensor grad = grad_in.contiguous();
  const Tensor src = src_in.to(at::kLong).contiguous();
  const int64_t B = grad.size(0), M = grad.size(1), D = grad.size(2), N = batch;
  check_range(src, 0, N - 1, "src", "source indices");
  std::vector<int64_t> start(M * (N + 1), 0), order(M * B);
  const int64_t* sp = src.const_data_ptr<int64_t>();
  at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      int64_t* st = start.data() + m * (N + 1);
      const int64_t* s = sp + m * B;
      for (int64_t b = 0; b < B; ++b) ++st[s[b] + 1];
      for (int64_t i = 0; i < N; ++i) st[i + 1] += st[i];
      std::vector<int64_t> pos(st, st + N);
      int64_t* ord = order.data() + m * B;
      for (int64_t b = 0; b < B; ++b) ord[pos[s[b]]++] = b;
    }
  });
  Tensor gv = empty_output({N, M, D}, grad.options());
  OMNIFUSE_DISPATCH_FLOATS(grad.scalar_type(), "modality_mix_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    scalar_t* o = gv.data_ptr<scalar_t>();
    at::parallel_for(0, N, 16, [&](int64_t i0, int64_t i1) {
      std::vector<acc_t> acc(D);
      for (int64_t i = i0; i < i1; ++i) {
        for (int64_t m = 0; m < M; ++m) {
          const int64_t* st = start.data() + m * (N + 1);
          const int64_t* ord = order.data() + m * B;
          const int64_t k0 = st[i], k1 = st[i + 1];
          scalar_t* dst = o + (i * M + m) * D;
          if (k1 == k0) {
            std::fill(dst, dst + D, scalar_t(0));
          } else if (k1 == k0 + 1) {
            std::memcpy(dst, g + (ord[k0] * M + m) * D, D * sizeof(scalar_t));
          } else {
            std::fill(acc.begin(), acc.end(), acc_t(0));
            for (int64_t k = k0; k < k1; ++k) add_row(acc.data(), g + (ord[k] * M + m) * D, D);
            for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(acc[d]);
          }
        }
      }
    });
  });
  return gv;
}

// logsumexp of rows [c0, c1) as mx + ls (max, log of the exp-sum): per row a max pass and an
// exp-sum pass (vectorized along C), then the logs vectorized across the rows. log_softmax is
// then (z - mx) - ls: never z minus the large lse, which would lose ulp(|z|) absolutely.
constexpr int64_t kChunk = 256;

template <typename scalar_t, typename acc_t>
OMNIFUSE_INLINE void rows_lse(const scalar_t* z, int64_t C, int64_t c0, int64_t c1, acc_t* mx,
                              acc_t* ls, acc_t& nf) {
  for (int64_t b = c0; b < c1; ++b) {
    const scalar_t* zr = z + b * C;
    acc_t m = neg_inf<acc_t>(), f = 0;
#pragma omp simd reduction(max : m) reduction(+ : f)
    for (int64_t c = 0; c < C; ++c) {
      const acc_t v = static_cast<acc_t>(zr[c]);
      m = m > v ? m : v;
      f += nonfinite_term(v);
    }
    nf += f;
    acc_t s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t c = 0; c < C; ++c) s += vexp_neg(static_cast<acc_t>(zr[c]) - m);
    mx[b - c0] = m;
    ls[b - c0] = s;
  }
#pragma omp simd
  for (int64_t i = 0; i < c1 - c0; ++i) ls[i] = vlog(ls[i]);
}

constexpr int64_t kBlock = 256;

// Rows [r0, r0 + nt) of z and q (C <= kSmallC) as [C][kTile] tiles in acc_t; padding rows
// read z = 0, q = 0 (finite, and they add 0 to every sum over q).
template <typename scalar_t, typename acc_t>
OMNIFUSE_INLINE void load_rows_tile(const scalar_t* z, const scalar_t* q, int64_t C, int64_t r0,
                                    int64_t nt, acc_t* t, acc_t* u) {
  for (int64_t r = 0; r < kTile; ++r) {
    const scalar_t* zr = z + (r0 + r) * C;
    const scalar_t* qr = q + (r0 + r) * C;
    for (int64_t c = 0; c < C; ++c) {
      t[c * kTile + r] = r < nt ? static_cast<acc_t>(zr[c]) : acc_t(0);
      u[c * kTile + r] = r < nt ? static_cast<acc_t>(qr[c]) : acc_t(0);
    }
  }
}

// d logits of a tile: t holds e_c = exp(z_c - max), k[r] = scale sum(q) / sum(e), so
// d/dz_c = k e_c - scale q_c; the tile's nt real rows are written out row-major.
template <typename scalar_t, typename acc_t>
OMNIFUSE_INLINE void store_tile_grad(acc_t* t, const acc_t* u, const acc_t* k, acc_t scale,
                                     int64_t C, int64_t r0, int64_t nt, scalar_t* gz) {
  for (int64_t c = 0; c < C; ++c) {
#pragma omp simd
    for (int64_t r = 0; r < kTile; ++r) {
      t[c * kTile + r] = k[r] * t[c * kTile + r] - scale * u[c * kTile + r];
    }
  }
  for (int64_t r = 0; r < nt; ++r) {
    scalar_t* gr = gz + (r0 + r) * C;
    for (int64_t c = 0; c < C; ++c) gr[c] = static_cast<scalar_t>(t[c * kTile + r]);
  }
}

// sum over rows of sum_c q_c (-log_softmax_c), term by term. flags: [0] a non-finite logit,
// [1] a non-finite soft label (value checks, raised by the caller).
template <typename scalar_t, typename acc_t>
OMNIFUSE_CPU_CLONES acc_t soft_ce_rows(const scalar_t* z, const scalar_t* q, int64_t C, int64_t b0,
                                       int64_t b1, uint8_t* flags) {
  acc_t mx[kChunk], ls[kChunk];
  acc_t acc = 0, nfz = 0, nfq = 0;
  if (C <= kSmallC) {  // short rows: kTile rows at a time, transposed, passes across rows
    acc_t t[kSmallC * kTile], u[kSmallC * kTile];
    for (int64_t r0 = b0; r0 < b1; r0 += kTile) {
      const int64_t nt = std::min(kTile, b1 - r0);
      load_rows_tile(z, q, C, r0, nt, t, u);
      acc_t m[kTile], sm[kTile], f[kTile], fq[kTile], l[kTile], row[kTile];
      for (int64_t r = 0; r < kTile; ++r) m[r] = neg_inf<acc_t>(), sm[r] = f[r] = fq[r] = 0;
      for (int64_t c = 0; c < C; ++c) {
#pragma omp simd
        for (int64_t r = 0; r < kTile; ++r) {
          const acc_t v = t[c * kTile + r];
          m[r] = m[r] > v ? m[r] : v;
          f[r] += nonfinite_term(v);
          fq[r] += nonfinite_term(u[c * kTile + r]);
        }
      }
      for (int64_t c = 0; c < C; ++c) {
#pragma omp simd
        for (int64_t r = 0; r < kTile; ++r) sm[r] += vexp_neg(t[c * kTile + r] - m[r]);
      }
#pragma omp simd
      for (int64_t r = 0; r < kTile; ++r) l[r] = vlog(sm[r]), row[r] = 0;
      for (int64_t c = 0; c < C; ++c) {
#pragma omp simd
        for (int64_t r = 0; r < kTile; ++r) {
          row[r] += u[c * kTile + r] * ((m[r] - t[c * kTile + r]) + l[r]);
        }
      }
      for (int64_t r = 0; r < nt; ++r) acc += row[r];
      for (int64_t r = 0; r < kTile; ++r) nfz += f[r], nfq += fq[r];
    }
    flags[0] = !(nfz == acc_t(0));
    flags[1] = !(nfq == acc_t(0));
    return acc;
  }
  for (int64_t c0 = b0; c0 < b1; c0 += kChunk) {
    const int64_t c1 = std::min(b1, c0 + kChunk);
    rows_lse(z, C, c0, c1, mx, ls, nfz);
    for (int64_t b = c0; b < c1; ++b) {
      const acc_t m = mx[b - c0], l = ls[b - c0];
      acc_t row = 0, f = 0;
#pragma omp simd reduction(+ : row, f)
      for (int64_t c = 0; c < C; ++c) {
        const acc_t qc = static_cast<acc_t>(q[b * C + c]);
        row += qc * ((m - static_cast<acc_t>(z[b * C + c])) + l);
        f += nonfinite_term(qc);
      }
      acc += row;
      nfq += f;
    }
  }
  flags[0] = !(nfz == acc_t(0));
  flags[1] = !(nfq == acc_t(0));
  return acc;
}

// d/dz_c = (p_c sum(q) - q_c) scale,  d/dq_c = -log_softmax_c scale.
template <typename scalar_t, typename acc_t>
OMNIFUSE_CPU_CLONES void soft_ce_grad_rows(scalar_t* gz, scalar_t* gq, const scalar_t* z,
                                           const scalar_t* q, int64_t C, acc_t scale, int64_t b0,
                                           int64_t b1) {
  acc_t mx[kChunk], ls[kChunk], nf = 0;  // checked by the forward
  for (int64_t c0 = b0; c0 < b1; c0 += kChunk) {
    const int64_t c1 = std::min(b1, c0 + kChunk);
    rows_lse(z, C, c0, c1, mx, ls, nf);
    for (int64_t b = c0; b < c1; ++b) {
      const scalar_t* zr = z + b * C;
      const scalar_t* qr = q + b * C;
      const acc_t m = mx[b - c0], l = ls[b - c0];
      acc_t sq = 0;
#pragma omp simd reduction(+ : sq)
      for (int64_t c = 0; c < C; ++c) sq += static_cast<acc_t>(qr[c]);
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const acc_t lp = (static_cast<acc_t>(zr[c]) - m) - l;  // log_softmax
        gz[b * C + c] =
            static_cast<scalar_t>(scale * (vexp_neg(lp) * sq - static_cast<acc_t>(qr[c])));
        gq[b * C + c] = static_cast<scalar_t>(-scale * lp);
      }
    }
  }
}

// d/dz_c = (p_c sum(q) - q_c) scale only: per row the max, e_c = exp(z_c - max) kept in a row
// buffer (one exp per logit, no log), then p_c = e_c / sum(e).
template <typename scalar_t, typename acc_t>
OMNIFUSE_CPU_CLONES void soft_ce_logit_grad_rows(scalar_t* gz, const scalar_t* z,
                                                 const scalar_t* q, int64_t C, acc_t* e,
                                                 acc_t scale, int64_t b0, int64_t b1) {
  if (C <= kSmallC) {  // short rows: transposed tiles, as the forward
    acc_t t[kSmallC * kTile], u[kSmallC * kTile];
    for (int64_t r0 = b0; r0 < b1; r0 += kTile) {
      const int64_t nt = std::min(kTile, b1 - r0);
      load_rows_tile(z, q, C, r0, nt, t, u);
      acc_t m[kTile], sm[kTile], sq[kTile], k[kTile];
      for (int64_t r = 0; r < kTile; ++r) m[r] = neg_inf<acc_t>(), sm[r] = sq[r] = 0;
      for (int64_t c = 0; c < C; ++c) {
#pragma omp simd
        for (int64_t r = 0; r < kTile; ++r) {
          const acc_t v = t[c * kTile + r];
          m[r] = m[r] > v ? m[r] : v;
          sq[r] += u[c * kTile + r];
        }
      }
      for (int64_t c = 0; c < C; ++c) {
#pragma omp simd
        for (int64_t r = 0; r < kTile; ++r) {
          const acc_t ev = vexp_neg(t[c * kTile + r] - m[r]);
          t[c * kTile + r] = ev;
          sm[r] += ev;
        }
      }
#pragma omp simd
      for (int64_t r = 0; r < kTile; ++r) k[r] = scale * sq[r] / sm[r];
      store_tile_grad(t, u, k, scale, C, r0, nt, gz);
    }
    return;
  }
  for (int64_t b = b0; b < b1; ++b) {
    const scalar_t* zr = z + b * C;
    const scalar_t* qr = q + b * C;
    acc_t m = neg_inf<acc_t>();
#pragma omp simd reduction(max : m)
    for (int64_t c = 0; c < C; ++c) {
      const acc_t v = static_cast<acc_t>(zr[c]);
      m = m > v ? m : v;
    }
    acc_t s = 0, sq = 0;
#pragma omp simd reduction(+ : s, sq)
    for (int64_t c = 0; c < C; ++c) {
      e[c] = vexp_neg(static_cast<acc_t>(zr[c]) - m);
      s += e[c];
      sq += static_cast<acc_t>(qr[c]);
    }
    const acc_t k = scale * sq / s;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      gz[b * C + c] = static_cast<scalar_t>(k * e[c] - scale * static_cast<acc_t>(qr[c]));
    }
  }
}

// Loss and d logits in one read of the rows (Liger-style; the backward only scales the
// gradient by the upstream one): per row the max (and the finiteness terms), then
// e_c = exp(z_c - max) kept in the tile, sum(e), sum(q) and sum q_c (max - z_c) (every term
// >= 0: no cancellation at large |z|), then the loss row sum q_c (max - z_c) + log(sum e) sum(q)
// and d/dz_c = scale (e_c / sum(e) sum(q) - q_c). One exp per logit, one log per row. Returns
// the rows' loss sum; flags as soft_ce_rows.
template <typename scalar_t, typename acc_t>
OMNIFUSE_CPU_CLONES acc_t soft_ce_rows_grad(scalar_t* gz, const scalar_t* z, const scalar_t* q,
                                            int64_t C, acc_t* e, acc_t scale, int64_t b0,
                                            int64_t b1, uint8_t* flags) {
  acc_t acc = 0, nfz = 0, nfq = 0;
  if (C <= kSmallC) {  // short rows: transposed tiles, passes across rows
    acc_t t[kSmallC * kTile], u[kSmallC * kTile];
    for (int64_t r0 = b0; r0 < b1; r0 += kTile) {
      const int64_t nt = std::min(kTile, b1 - r0);
      load_rows_tile(z, q, C, r0, nt, t, u);
      acc_t m[kTile], f[kTile], fq[kTile], sm[kTile], sq[kTile], dq[kTile], k[kTile];
      for (int64_t r = 0; r < kTile; ++r) {
        m[r] = neg_inf<acc_t>(), f[r] = fq[r] = sm[r] = sq[r] = dq[r] = 0;
      }
      for (int64_t c = 0; c < C; ++c) {
#pragma omp simd
        for (int64_t r = 0; r < kTile; ++r) {
          const acc_t v = t[c * kTile + r];
          m[r] = m[r] > v ? m[r] : v;
          f[r] += nonfinite_term(v);
        }
      }
      for (int64_t c = 0; c < C; ++c) {
#pragma omp simd
        for (int64_t r = 0; r < kTile; ++r) {
          const acc_t v = t[c * kTile + r], qc = u[c * kTile + r];
          const acc_t ev = vexp_neg(v - m[r]);
          t[c * kTile + r] = ev;
          sm[r] += ev;
          sq[r] += qc;
          dq[r] += qc * (m[r] - v);
          fq[r] += nonfinite_term(qc);
        }
      }
      acc_t row[kTile];
#pragma omp simd
      for (int64_t r = 0; r < kTile; ++r) {
        row[r] = dq[r] + vlog(sm[r]) * sq[r];
        k[r] = scale * sq[r] / sm[r];
      }
      store_tile_grad(t, u, k, scale, C, r0, nt, gz);
      for (int64_t r = 0; r < nt; ++r) acc += row[r];
      for (int64_t r = 0; r < kTile; ++r) nfz += f[r], nfq += fq[r];
    }
  } else {
    for (int64_t b = b0; b < b1; ++b) {
      const scalar_t* zr = z + b * C;
      const scalar_t* qr = q + b * C;
      acc_t m = neg_inf<acc_t>(), f = 0;
#pragma omp simd reduction(max : m) reduction(+ : f)
      for (int64_t c = 0; c < C; ++c) {
        const acc_t v = static_cast<acc_t>(zr[c]);
        m = m > v ? m : v;
        f += nonfinite_term(v);
      }
      acc_t s = 0, sq = 0, dq = 0, fq = 0;
#pragma omp simd reduction(+ : s, sq, dq, fq)
      for (int64_t c = 0; c < C; ++c) {
        const acc_t v = static_cast<acc_t>(zr[c]), qc = static_cast<acc_t>(qr[c]);
        e[c] = vexp_neg(v - m);
        s += e[c];
        sq += qc;
        dq += qc * (m - v);
        fq += nonfinite_term(qc);
      }
      const acc_t k = scale * sq / s;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        gz[b * C + c] = static_cast<scalar_t>(k * e[c] - scale * static_cast<acc_t>(qr[c]));
      }
      acc += dq + vlog(s) * sq;
      nfz += f;
      nfq += fq;
    }
  }
  flags[0] = !(nfz == acc_t(0));
  flags[1] = !(nfq == acc_t(0));
  return acc;
}

// The soft CE forwards' epilogue: raise for a block that flagged a non-finite logit or soft
// label, then the mean of the blocks' loss sums, added in block order (deterministic); an
// empty batch is a real 0.
Tensor soft_ce_mean(const std::vector<double>& partial, const std::vector<uint8_t>& flags,
                    const Tensor& logits, const Tensor& soft) {
  const size_t nblk = partial.size();
  std::vector<uint8_t> bad_z(nblk), bad_q(nblk);
  for (size_t i = 0; i < nblk; ++i) bad_z[i] = flags[2 * i], bad_q[i] = flags[2 * i + 1];
  check_finite_flags(bad_z, logits, "logits");
  check_finite_flags(bad_q, soft, "soft_labels");
  double total = 0.0;
  for (double p : partial) total += p;
  const int64_t B = logits.size(0);
  return at::scalar_tensor(total / static_cast<double>(std::max<int64_t>(B, 1)), logits.options());
}

// The training forward: (loss, d loss / d logits) for an upstream gradient of 1, from one
// read of logits and soft labels; the autograd formula scales the second by the upstream one.
std::tuple<Tensor, Tensor> soft_cross_entropy_grad_cpu(const Tensor& logits_in,
                                                       const Tensor& soft_in) {
  const Tensor logits = logits_in.contiguous();
  const Tensor soft = soft_in.contiguous();
  const int64_t B = logits.size(0), C = logits.size(1);
  const double scale = 1.0 / static_cast<double>(std::max<int64_t>(B, 1));
  const int64_t nblk = num_blocks(B, kBlock);
  std::vector<double> partial(nblk, 0.0);
  std::vector<uint8_t> flags(2 * nblk, 0);
  Tensor gz = empty_output_like(logits);
  OMNIFUSE_DISPATCH_FLOATS(logits.scalar_type(), "soft_cross_entropy_grad", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* z = logits.const_data_ptr<scalar_t>();
    const scalar_t* q = soft.const_data_ptr<scalar_t>();
    scalar_t* oz = gz.data_ptr<scalar_t>();
    for_blocks(B, kBlock, [&](int64_t blk, int64_t b0, int64_t b1) {
      std::vector<acc_t> e(C > kSmallC ? C : 0);
      partial[blk] = static_cast<double>(soft_ce_rows_grad<scalar_t, acc_t>(
          oz, z, q, C, e.data(), static_cast<acc_t>(scale), b0, b1, flags.data() + 2 * blk));
    });
  });
  return {soft_ce_mean(partial, flags, logits, soft), gz};
}

Tensor soft_cross_entropy_backward_logits_cpu(const Tensor& grad, const Tensor& logits_in,
                                              const Tensor& soft_in) {
  const Tensor logits = logits_in.contiguous();
  const Tensor soft = soft_in.contiguous();
  const int64_t B = logits.size(0), C = logits.size(1);
  const double scale = scalar_value(grad) / static_cast<double>(std::max<int64_t>(B, 1));
  Tensor gz = empty_output_like(logits);
  OMNIFUSE_DISPATCH_FLOATS(logits.scalar_type(), "soft_cross_entropy_backward_logits", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* z = logits.const_data_ptr<scalar_t>();
    const scalar_t* q = soft.const_data_ptr<scalar_t>();
    scalar_t* oz = gz.data_ptr<scalar_t>();
    for_blocks(B, kBlock, [&](int64_t, int64_t b0, int64_t b1) {
      std::vector<acc_t> e(C);
      soft_ce_logit_grad_rows(oz, z, q, C, e.data(), static_cast<acc_t>(scale), b0, b1);
    });
  });
  return gz;
}

Tensor soft_cross_entropy_cpu(const Tensor& logits_in, const Tensor& soft_in) {
  const Tensor logits = logits_in.contiguous();
  const Tensor soft = soft_in.contiguous();
  const int64_t B = logits.size(0), C = logits.size(1);
  const int64_t nblk = num_blocks(B, kBlock);
  std::vector<double> partial(nblk, 0.0);
  std::vector<uint8_t> flags(2 * nblk, 0);
  OMNIFUSE_DISPATCH_FLOATS(logits.scalar_type(), "soft_cross_entropy", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* z = logits.const_data_ptr<scalar_t>();
    const scalar_t* q = soft.const_data_ptr<scalar_t>();
    for_blocks(B, kBlock, [&](int64_t blk, int64_t b0, int64_t b1) {
      partial[blk] = static_cast<double>(
          soft_ce_rows<scalar_t, acc_t>(z, q, C, b0, b1, flags.data() + 2 * blk));
    });
  });
  return soft_ce_mean(partial, flags, logits, soft);
}

std::tuple<Tensor, Tensor> soft_cross_entropy_backward_cpu(const Tensor& grad,
                                                           const Tensor& logits_in,
                                                           const Tensor& soft_in) {
  const Tensor logits = logits_in.contiguous();
  const Tensor soft = soft_in.contiguous();
  const int64_t B = logits.size(0), C = logits.size(1);
  const double scale = scalar_value(grad) / static_cast<double>(std::max<int64_t>(B, 1));
  Tensor gz = empty_output_like(logits);
  Tensor gq = empty_output_like(soft);
  OMNIFUSE_DISPATCH_FLOATS(logits.scalar_type(), "soft_cross_entropy_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* z = logits.const_data_ptr<scalar_t>();
    const scalar_t* q = soft.const_data_ptr<scalar_t>();
    scalar_t* oz = gz.data_ptr<scalar_t>();
    scalar_t* oq = gq.data_ptr<scalar_t>();
    at::parallel_for(0, B, 64, [&](int64_t b0, int64_t b1) {
      soft_ce_grad_rows(oz, oq, z, q, C, static_cast<acc_t>(scale), b0, b1);
    });
  });
  return {gz, gq};
}

}  // namespace

TORCH_LIBRARY_IMPL(omnifuse_fast, CPU, m) {
  m.impl("modality_mix", &modality_mix_cpu);
  m.impl("modality_mix_backward", &modality_mix_backward_cpu);
  m.impl("soft_cross_entropy", &soft_cross_entropy_cpu);
  m.impl("soft_cross_entropy_backward", &soft_cross_entropy_backward_cpu);
  m.impl("soft_cross_entropy_backward_logits", &soft_cross_entropy_backward_logits_cpu);
  m.impl("soft_cross_entropy_grad", &soft_cross_entropy_grad_cpu);
}

}  // namespace cpu
}  // namespace omnifuse_fast
