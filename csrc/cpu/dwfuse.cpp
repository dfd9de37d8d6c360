// DWFuse (SPEC section 2) on CPU: one pass per sample over its M x C logits computes the
// exact log-space complement log(1 - p), the weights (sum over the OTHER modalities, never
// total minus own), the weighted CE, and in the backward ops its gradient.
//
// Multiclass, per sample b and modality m (beta' = beta / (M - 1)):
//   lc_m = log(1 - p_m) = lseo_m - lse_m,  ce_m = lse_m - z_{m,y}  (common.h: ClassRows),
//   w_m = exp(beta' sum_{n != m} lc_n),    L = (1/B) sum_b sum_m w_m ce_m.
//   dL/dz_{m,c} = w_m (p_c - [c = y]) + A_m (dlc_m/dz_{m,c}),  A_m = beta' sum_{k != m} w_k ce_k
//   (A_m = 0 when the weights are detached), dlc_m/dz_c = q_c [c != y] - p_c with
//   q_c = exp(z_c - lseo_m). With r = 1 - p_y = exp(lc), p_c = q_c r (c != y) this collapses
//   to kappa q_c for c != y and -kappa for c = y, kappa = w_m r_m + A_m p_{m,y}.
//   The weights' backward is the same with w_m -> 0 and A_m = beta' sum_{k != m} g_k w_k.
// Multilabel, per label l with s = 1 - 2y and t = s z: lc = logsigmoid(t), ce = softplus(t),
//   d ce/dz = s sigmoid(t) = s exp(lc), d lc/dz = s sigmoid(-t) = s exp(-ce); averaged over C.
#include "common.h"

namespace omnifuse_fast {
namespace cpu {
namespace {

constexpr int64_t kBlock = 32;  // samples per block (and per partial sum of the loss)
constexpr int64_t kMaxM = 8;

// out[m * L + l] = sum over n != m of a[n * L + l]: summed explicitly, never total minus own
// (exact when magnitudes differ a lot). L = 1 for per-sample values, C for per-label ones.
template <typename acc_t>
OMNIFUSE_INLINE void sum_others(const acc_t* a, int64_t M, int64_t L, acc_t* out) {
  for (int64_t m = 0; m < M; ++m) {
    acc_t* o = out + m * L;
    for (int64_t l = 0; l < L; ++l) o[l] = 0;
    for (int64_t n = 0; n < M; ++n) {
      if (n == m) continue;
      const acc_t* an = a + n * L;
#pragma omp simd
      for (int64_t l = 0; l < L; ++l) o[l] += an[l];
    }
  }
}

// ---- multiclass: a block of samples, M rows each ------------------------------------------

template <typename acc_t>
struct ClassBlock {
  static constexpr int64_t N = kBlock * kMaxM;
  ClassRows<acc_t, N> rows;
  acc_t* ebuf = nullptr;  // when set (C <= kSmallC): the stats pass keeps its exps here
  acc_t w[N], t0[N], t1[N];
  int64_t row[N], ys[N];  // row index into the [B * M, C] logits, and its label
  bool nonfinite = false;  // a logit of the block is NaN or inf
};

// lc, ce and w of every row (b, m) of samples [b0, b1); row i = (b - b0) M + m.
template <typename scalar_t, typename acc_t>
OMNIFUSE_INLINE void class_block(const scalar_t* z, const int64_t* y, int64_t M, int64_t C,
                                 acc_t bm, int64_t b0, int64_t b1, ClassBlock<acc_t>& s) {
  const int64_t n = (b1 - b0) * M;
  for (int64_t i = 0; i < n; ++i) {
    s.row[i] = b0 * M + i;
    s.ys[i] = y[b0 + i / M];
  }
  s.rows.n = 0;
  s.rows.add_rows(z, C, s.row, s.ys, n, s.ebuf);
  s.nonfinite = s.rows.nonfinite();
  s.rows.finish();
  for (int64_t i = 0; i < n; i += M) sum_others(s.rows.lc + i, M, 1, s.w + i);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) s.w[i] = vexp_neg(bm * s.w[i]);
}

template <typename scalar_t, typename acc_t>
OMNIFUSE_CPU_CLONES acc_t class_loss_rows(const scalar_t* z, const int64_t* y, int64_t M, int64_t C,
                                          acc_t bm, int64_t b0, int64_t b1, uint8_t* nonfinite) {
  ClassBlock<acc_t> s;
  class_block(z, y, M, C, bm, b0, b1, s);
  acc_t acc = 0;
  for (int64_t i = 0; i < s.rows.n; ++i) acc += s.w[i] * s.rows.ce[i];
  *nonfinite = s.nonfinite;
  return acc;
}

// Writes every row's gradient given kappa (in s.t0).
// (From the exps the stats pass kept, when it kept them: one exp per logit, not two.)
template <typename scalar_t, typename acc_t>
OMNIFUSE_INLINE void write_block_grads(scalar_t* g, const scalar_t* z, int64_t C,
                                       const ClassBlock<acc_t>& s) {
  if (s.ebuf) {
    write_class_grads_e(g, s.ebuf, C, s.row, s.ys, s.rows.so, s.t0, s.rows.n);
  } else {
    write_class_grads(g, z, C, s.row, s.ys, s.rows.mo, s.rows.ls, s.t0, s.rows.n);
  }
}


template <typename scalar_t, typename acc_t>
OMNIFUSE_CPU_CLONES void class_loss_grad_rows(scalar_t* g, const scalar_t* z, const int64_t* y,
                                              int64_t M, int64_t C, acc_t bm, acc_t scale,
                                              bool detach, int64_t b0, int64_t b1) {
  ClassBlock<acc_t> s;
  std::vector<acc_t> exps;
  if (C <= kSmallC) {
    exps.resize((ClassBlock<acc_t>::N / kTile + 1) * kTile * C);
    s.ebuf = exps.data();
  }
  class_block(z, y, M, C, bm, b0, b1, s);
  const int64_t n = s.rows.n;
  if (detach) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i)
      s.t0[i] = scale * s.w[i] * vexp_neg(s.rows.lc[i]);  // w (1 - p_y)
  } else {
    // kappa = w (1 - p_y) + A p_y with A = beta' sum_{k != m} w_k ce_k
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) s.t1[i] = s.w[i] * s.rows.ce[i];
    for (int64_t i = 0; i < n; i += M) sum_others(s.t1 + i, M, 1, s.t0 + i);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const acc_t py = vexp_neg(-s.rows.ce[i]);
      s.t0[i] = scale * (s.w[i] * vexp_neg(s.rows.lc[i]) + bm * s.t0[i] * py);
    }
  }
  write_block_grads(g, z, C, s);
}

template <typename scalar_t, typename acc_t>
OMNIFUSE_CPU_CLONES void class_weight_rows(scalar_t* out, const scalar_t* z, const int64_t* y,
                                           int64_t M, int64_t C, acc_t bm, int64_t b0, int64_t b1,
                                           uint8_t* nonfinite) {
  ClassBlock<acc_t> s;
  class_block(z, y, M, C, bm, b0, b1, s);
  for (int64_t i = 0; i < s.rows.n; ++i) out[b0 * M + i] = static_cast<scalar_t>(s.w[i]);
  *nonfinite = s.nonfinite;
}

// d/dz of sum_k g_k w_k: kappa = A p_y with A = beta' sum_{k != m} g_k w_k.
template <typename scalar_t, typename acc_t>
OMNIFUSE_CPU_CLONES void class_weight_grad_rows(scalar_t* g, const acc_t* gw, const scalar_t* z,
                                                const int64_t* y, int64_t M, int64_t C, acc_t bm,
                                                int64_t b0, int64_t b1) {
  ClassBlock<acc_t> s;
  std::vector<acc_t> exps;
  if (C <= kSmallC) {
    exps.resize((ClassBlock<acc_t>::N / kTile + 1) * kTile * C);
    s.ebuf = exps.data();
  }
  class_block(z, y, M, C, bm, b0, b1, s);
  const int64_t n = s.rows.n;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) s.t1[i] = gw[b0 * M + i] * s.w[i];
  for (int64_t i = 0; i < n; i += M) sum_others(s.t1 + i, M, 1, s.t0 + i);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) s.t0[i] = bm * s.t0[i] * vexp_neg(-s.rows.ce[i]);
  write_block_grads(g, z, C, s);
}

// ---- multilabel: per sample [M, C]; buf holds 5 M C accumulators ----------------------------

// lc = logsigmoid(t) and ce = softplus(t) with t = s z share a = log(1 + exp(-|t|)).
// Value checks ride along (flags, see common.h): nf sums nonfinite_term of every logit, nl
// counts labels other than 0 and 1.
template <typename scalar_t, typename acc_t>
OMNIFUSE_INLINE void label_sample(const scalar_t* z, const scalar_t* y, int64_t M, int64_t C,
                                  acc_t bm, acc_t* lc, acc_t* ce, acc_t* w, acc_t& nf, acc_t& nl) {
  acc_t bad = 0;
#pragma omp simd reduction(+ : bad)
  for (int64_t l = 0; l < C; ++l) {
    const acc_t v = static_cast<acc_t>(y[l]);
    bad += (v == acc_t(0) || v == acc_t(1)) ? acc_t(0) : acc_t(1);
  }
  nl += bad;
  for (int64_t m = 0; m < M; ++m) {
    acc_t f = 0;
#pragma omp simd reduction(+ : f)
    for (int64_t l = 0; l < C; ++l) {
      f += nonfinite_term(static_cast<acc_t>(z[m * C + l]));
    }
    nf += f;
#pragma omp simd
    for (int64_t l = 0; l < C; ++l) {
      const acc_t t = label_sign<acc_t>(y[l]) * static_cast<acc_t>(z[m * C + l]);
      const acc_t a = log1pexp_neg(t < acc_t(0) ? t : -t);
      lc[m * C + l] = (t < acc_t(0) ? t : acc_t(0)) - a;
      ce[m * C + l] = (t > acc_t(0) ? t : acc_t(0)) + a;
    }
  }
  sum_others(lc, M, C, w);
#pragma omp simd
  for (int64_t i = 0; i < M * C; ++i) w[i] = vexp_neg(bm * w[i]);
}

template <typename scalar_t, typename acc_t>
OMNIFUSE_CPU_CLONES acc_t label_loss_rows(const scalar_t* z, const scalar_t* y, int64_t M,
                                          int64_t C, acc_t bm, acc_t* buf, int64_t b0, int64_t b1,
                                          uint8_t* flags) {
  acc_t *lc = buf, *ce = lc + M * C, *w = ce + M * C;
  acc_t acc = 0, nf = 0, nl = 0;
  for (int64_t b = b0; b < b1; ++b) {
    label_sample(z + b * M * C, y + b * C, M, C, bm, lc, ce, w, nf, nl);
    acc_t row = 0;
#pragma omp simd reduction(+ : row)
    for (int64_t i = 0; i < M * C; ++i) row += w[i] * ce[i];
    acc += row / static_cast<acc_t>(C);
  }
  flags[0] = !(nf == acc_t(0));
  flags[1] = nl != acc_t(0);
  return acc;
}

// d/dz = s (w sigmoid(t) + A sigmoid(-t)), sigmoid(t) = exp(lc), sigmoid(-t) = exp(-ce).
template <typename scalar_t, typename acc_t>
OMNIFUSE_CPU_CLONES void label_loss_grad_rows(scalar_t* g, const scalar_t* z, const scalar_t* y,
                                              int64_t M, int64_t C, acc_t bm, acc_t scale,
                                              bool detach, acc_t* buf, int64_t b0, int64_t b1) {
  acc_t *lc = buf, *ce = lc + M * C, *w = ce + M * C, *wce = w + M * C, *a = wce + M * C;
  acc_t nf = 0, nl = 0;  // checked by the forward
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t o = b * M * C;
    label_sample(z + o, y + b * C, M, C, bm, lc, ce, w, nf, nl);
    if (detach) {
      for (int64_t i = 0; i < M * C; ++i) a[i] = 0;
    } else {
#pragma omp simd
      for (int64_t i = 0; i < M * C; ++i) wce[i] = w[i] * ce[i];
      sum_others(wce, M, C, a);
    }
    for (int64_t m = 0; m < M; ++m) {
#pragma omp simd
      for (int64_t l = 0; l < C; ++l) {
        const int64_t i = m * C + l;
        const acc_t d = w[i] * vexp_neg(lc[i]) + bm * a[i] * vexp_neg(-ce[i]);
        g[o + i] = static_cast<scalar_t>(scale * label_sign<acc_t>(y[b * C + l]) * d);
      }
    }
  }
}

template <typename scalar_t, typename acc_t>
OMNIFUSE_CPU_CLONES void label_weight_rows(scalar_t* out, const scalar_t* z, const scalar_t* y,
                                           int64_t M, int64_t C, acc_t bm, acc_t* buf, int64_t b0,
                                           int64_t b1, uint8_t* flags) {
  acc_t *lc = buf, *ce = lc + M * C, *w = ce + M * C;
  acc_t nf = 0, nl = 0;
  for (int64_t b = b0; b < b1; ++b) {
    label_sample(z + b * M * C, y + b * C, M, C, bm, lc, ce, w, nf, nl);
    for (int64_t i = 0; i < M * C; ++i) out[b * M * C + i] = static_cast<scalar_t>(w[i]);
  }
  flags[0] = !(nf == acc_t(0));
  flags[1] = nl != acc_t(0);
}

// d/dz of sum g w: s A sigmoid(-t) with A = beta' sum_{k != m} g_k w_k per label.
template <typename scalar_t, typename acc_t>
OMNIFUSE_CPU_CLONES void label_weight_grad_rows(scalar_t* g, const acc_t* gw, const scalar_t* z,
                                                const scalar_t* y, int64_t M, int64_t C, acc_t bm,
                                                acc_t* buf, int64_t b0, int64_t b1) {
  acc_t *lc = buf, *ce = lc + M * C, *w = ce + M * C, *gww = w + M * C, *a = gww + M * C;
  acc_t nf = 0, nl = 0;  // checked by the forward
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t o = b * M * C;
    label_sample(z + o, y + b * C, M, C, bm, lc, ce, w, nf, nl);
#pragma omp simd
    for (int64_t i = 0; i < M * C; ++i) gww[i] = gw[o + i] * w[i];
    sum_others(gww, M, C, a);
    for (int64_t m = 0; m < M; ++m) {
#pragma omp simd
      for (int64_t l = 0; l < C; ++l) {
        const int64_t i = m * C + l;
        g[o + i] =
            static_cast<scalar_t>(label_sign<acc_t>(y[b * C + l]) * bm * a[i] * vexp_neg(-ce[i]));
      }
    }
  }
}

// ---- ops ----------------------------------------------------------------------------------

template <typename acc_t>
inline acc_t beta_per_other(double beta, int64_t M) {
  return static_cast<acc_t>(beta / static_cast<double>(M - 1));
}

bool is_multilabel(const Tensor& labels) { return labels.dim() == 2; }

// Per block: [2 blk] a non-finite logit, [2 blk + 1] a multilabel label other than 0/1. Raised
// after the kernel like the Python checks: labels first, then the logits.
void raise_flags(const std::vector<uint8_t>& flags, const Tensor& logits) {
  bool logit = false, label = false;
  for (size_t i = 0; i < flags.size(); i += 2) {
    logit = logit || flags[i];
    label = label || flags[i + 1];
  }
  TORCH_CHECK_VALUE(!label,
                    "labels (multilabel) must hold only 0 and 1: threshold soft targets, e.g. "
                    "(labels > 0.5).float()");
  TORCH_CHECK_VALUE(!logit, "modality_logits must be finite; it holds NaN or inf (",
                    describe(logits), ")");
}

Tensor dwfuse_weights_cpu(const Tensor& logits_in, const Tensor& labels_in, double beta) {
  const Tensor logits = logits_in.contiguous();
  const Tensor labels = labels_in.contiguous();
  const int64_t B = logits.size(0), M = logits.size(1), C = logits.size(2);
  const bool ml = is_multilabel(labels);
  if (!ml) check_labels(labels, C);
  std::vector<uint8_t> flags(2 * num_blocks(B, kBlock), 0);
  Tensor out =
      ml ? empty_output({B, M, C}, logits.options()) : empty_output({B, M}, logits.options());
  OMNIFUSE_DISPATCH_FLOATS(logits.scalar_type(), "dwfuse_weights", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t bm = beta_per_other<acc_t>(beta, M);
    const scalar_t* z = logits.const_data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    for_blocks(B, kBlock, [&](int64_t blk, int64_t b0, int64_t b1) {
      uint8_t* f = flags.data() + 2 * blk;
      if (ml) {
        std::vector<acc_t> buf(5 * M * C);
        label_weight_rows(o, z, labels.const_data_ptr<scalar_t>(), M, C, bm, buf.data(), b0, b1,
                          f);
      } else {
        class_weight_rows(o, z, labels.const_data_ptr<int64_t>(), M, C, bm, b0, b1, f);
      }
    });
  });
  raise_flags(flags, logits);
  return out;
}

Tensor dwfuse_weights_backward_cpu(const Tensor& grad_in, const Tensor& logits_in,
                                   const Tensor& labels_in, double beta) {
  const Tensor logits = logits_in.contiguous();
  const Tensor labels = labels_in.contiguous();
  const int64_t B = logits.size(0), M = logits.size(1), C = logits.size(2);
  const bool ml = is_multilabel(labels);
  if (!ml) check_labels(labels, C);
  const Tensor grad = grad_in.to(acc_type(logits)).contiguous();  // exact upcast
  Tensor gz = empty_output_like(logits);
  OMNIFUSE_DISPATCH_FLOATS(logits.scalar_type(), "dwfuse_weights_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t bm = beta_per_other<acc_t>(beta, M);
    const scalar_t* z = logits.const_data_ptr<scalar_t>();
    const acc_t* gw = grad.const_data_ptr<acc_t>();
    scalar_t* g = gz.data_ptr<scalar_t>();
    for_blocks(B, kBlock, [&](int64_t, int64_t b0, int64_t b1) {
      if (ml) {
        std::vector<acc_t> buf(5 * M * C);
        label_weight_grad_rows(g, gw, z, labels.const_data_ptr<scalar_t>(), M, C, bm, buf.data(),
                               b0, b1);
      } else {
        class_weight_grad_rows(g, gw, z, labels.const_data_ptr<int64_t>(), M, C, bm, b0, b1);
      }
    });
  });
  return gz;
}

Tensor dwfuse_loss_cpu(const Tensor& logits_in, const Tensor& labels_in, double beta,
                       bool detach_weight) {
  (void)detach_weight;  // the value does not depend on it
  const Tensor logits = logits_in.contiguous();
  const Tensor labels = labels_in.contiguous();
  const int64_t B = logits.size(0), M = logits.size(1), C = logits.size(2);
  const bool ml = is_multilabel(labels);
  if (!ml) check_labels(labels, C);
  std::vector<double> partial(num_blocks(B, kBlock), 0.0);
  std::vector<uint8_t> flags(2 * num_blocks(B, kBlock), 0);
  OMNIFUSE_DISPATCH_FLOATS(logits.scalar_type(), "dwfuse_loss", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t bm = beta_per_other<acc_t>(beta, M);
    const scalar_t* z = logits.const_data_ptr<scalar_t>();
    for_blocks(B, kBlock, [&](int64_t blk, int64_t b0, int64_t b1) {
      acc_t acc;
      uint8_t* f = flags.data() + 2 * blk;
      if (ml) {
        std::vector<acc_t> buf(5 * M * C);
        acc = label_loss_rows(z, labels.const_data_ptr<scalar_t>(), M, C, bm, buf.data(), b0, b1,
                              f);
      } else {
        acc = class_loss_rows(z, labels.const_data_ptr<int64_t>(), M, C, bm, b0, b1, f);
      }
      partial[blk] = static_cast<double>(acc);
    });
  });
  raise_flags(flags, logits);
  double total = 0.0;
  for (double p : partial) total += p;  // blocks in order: deterministic
  return at::scalar_tensor(total / static_cast<double>(B), logits.options());
}

Tensor dwfuse_loss_backward_cpu(const Tensor& grad, const Tensor& logits_in,
                                const Tensor& labels_in, double beta, bool detach_weight) {
  const Tensor logits = logits_in.contiguous();
  const Tensor labels = labels_in.contiguous();
  const int64_t B = logits.size(0), M = logits.size(1), C = logits.size(2);
  const bool ml = is_multilabel(labels);
  if (!ml) check_labels(labels, C);
  // multilabel losses average over the C labels too
  const double scale = scalar_value(grad) / static_cast<double>(B) / (ml ? C : 1);
  Tensor gz = empty_output_like(logits);
  OMNIFUSE_DISPATCH_FLOATS(logits.scalar_type(), "dwfuse_loss_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t bm = beta_per_other<acc_t>(beta, M);
    const acc_t sc = static_cast<acc_t>(scale);
    const scalar_t* z = logits.const_data_ptr<scalar_t>();
    scalar_t* g = gz.data_ptr<scalar_t>();
    for_blocks(B, kBlock, [&](int64_t, int64_t b0, int64_t b1) {
      if (ml) {
        std::vector<acc_t> buf(5 * M * C);
        label_loss_grad_rows(g, z, labels.const_data_ptr<scalar_t>(), M, C, bm, sc, detach_weight,
                             buf.data(), b0, b1);
      } else {
        class_loss_grad_rows(g, z, labels.const_data_ptr<int64_t>(), M, C, bm, sc, detach_weight,
                             b0, b1);
      }
    });
  });
  return gz;
}

}  // namespace

TORCH_LIBRARY_IMPL(omnifuse_fast, CPU, m) {
  m.impl("dwfuse_weights", &dwfuse_weights_cpu);
  m.impl("dwfuse_weights_backward", &dwfuse_weights_backward_cpu);
  m.impl("dwfuse_loss", &dwfuse_loss_cpu);
  m.impl("dwfuse_loss_backward", &dwfuse_loss_backward_cpu);
}

}  // namespace cpu
}  // namespace omnifuse_fast
