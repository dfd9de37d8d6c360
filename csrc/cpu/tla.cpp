// TLA (SPEC section 3) on CPU: combination ids, the fused distance + per-combination
// segmented reduction (eq. 15), and the masked mean CE (eq. 17) with its backward.
#include <atomic>

#include "common.h"

namespace omnifuse_fast {
namespace cpu {
namespace {

constexpr int64_t kBlock = 1024;  // samples per block: one partial (sums, counts) per block

Tensor combination_ids_cpu(const Tensor& present_in) {
  const Tensor present = present_in.contiguous();
  const int64_t B = present.size(0), M = present.size(1);
  Tensor out = at::empty({B}, present.options().dtype(at::kLong));
  const bool* p = present.const_data_ptr<bool>();
  int64_t* o = out.data_ptr<int64_t>();
  std::atomic<int64_t> empty_row{B};  // the first row with no present modality (value check)
  at::parallel_for(0, B, 4096, [&](int64_t b0, int64_t b1) {
    int64_t first = B;
    for (int64_t b = b0; b < b1; ++b) {
      int64_t id = 0;
      for (int64_t m = 0; m < M; ++m) id |= static_cast<int64_t>(p[b * M + m]) << m;
      o[b] = id;
      if (id == 0 && first == B) first = b;
    }
    int64_t cur = empty_row.load();
    while (first < cur && !empty_row.compare_exchange_weak(cur, first)) {
    }
  });
  TORCH_CHECK_VALUE(empty_row.load() == B, "present has a sample with no present modality (row ",
                    empty_row.load(),
                    "): every sample needs at least one; drop samples with nothing observed");
  return out;
}

enum class Distance { kCE, kL1, kL2 };

Distance parse_distance(c10::string_view d) {
  if (d == "ce") return Distance::kCE;
  if (d == "l1") return Distance::kL1;
  if (d == "l2") return Distance::kL2;
  TORCH_CHECK(false, "omnifuse_fast::tla_stats: distance must be ce, l1 or l2, got ", d);
}

constexpr int64_t kChunk = 256;  // rows whose statistics are finished together (vectorized)
using std::min;

// d_b for every row of [b0, b1), binned by comb into sums/counts. With r = 1 - p_y (exact)
// and p_c = q_c r for c != y: ce = lse - z_y, l1 = sum_{c != y} p_c + r = 2 r,
// l2 = sum_{c != y} p_c^2 + r^2 = (sum q_c^2 + 1) r^2.
template <Distance kDist, typename scalar_t, typename acc_t>
OMNIFUSE_CPU_CLONES void stats_rows(const scalar_t* z, const int64_t* y, const int64_t* comb,
                                    int64_t C, int64_t bins, double* sums, int64_t* counts,
                                    int64_t b0, int64_t b1, uint8_t* nonfinite) {
  ClassRows<acc_t, kChunk> rows;
  acc_t d[kChunk];
  int64_t idx[kChunk];
  for (int64_t c0 = b0; c0 < b1; c0 += kChunk) {
    const int64_t c1 = min(b1, c0 + kChunk);
    for (int64_t b = c0; b < c1; ++b) idx[b - c0] = b;
    rows.n = 0;
    rows.template add_rows<scalar_t, kDist == Distance::kL2>(z, C, idx, y + c0, c1 - c0);
    rows.finish();
#pragma omp simd
    for (int64_t i = 0; i < rows.n; ++i) {
      const acc_t r = vexp_neg(rows.lc[i]);
      if (kDist == Distance::kCE) d[i] = rows.ce[i];
      if (kDist == Distance::kL1) d[i] = acc_t(2) * r;
      if (kDist == Distance::kL2)
        d[i] = (rows.sq[i] / (rows.so[i] * rows.so[i]) + acc_t(1)) * r * r;
    }
    for (int64_t b = c0; b < c1; ++b) {
      sums[comb[b]] += static_cast<double>(d[b - c0]);
      counts[comb[b]] += 1;
    }
  }
  *nonfinite = rows.nonfinite();
}

// CE summed over the rows of [b0, b1) whose comb is lazy (only those are read); count in *n.
template <typename scalar_t, typename acc_t>
OMNIFUSE_CPU_CLONES acc_t masked_ce_rows(const scalar_t* z, const int64_t* y, const int64_t* comb,
                                         int64_t C, int64_t lazy, int64_t* n, int64_t b0,
                                         int64_t b1, uint8_t* nonfinite) {
  ClassRows<acc_t, kChunk> rows;
  int64_t idx[kChunk], ys[kChunk];
  acc_t s = 0;
  int64_t k = 0;
  for (int64_t c0 = b0; c0 < b1; c0 += kChunk) {
    const int64_t c1 = min(b1, c0 + kChunk);
    int64_t nm = 0;
    for (int64_t b = c0; b < c1; ++b) {
      if (comb[b] != lazy) continue;
      idx[nm] = b;
      ys[nm++] = y[b];
    }
    rows.n = 0;
    rows.add_rows(z, C, idx, ys, nm);
    rows.finish();
    for (int64_t i = 0; i < rows.n; ++i) s += rows.ce[i];
    k += rows.n;
  }
  *n = k;
  *nonfinite = rows.nonfinite();
  return s;
}

template <typename scalar_t, typename acc_t>
OMNIFUSE_CPU_CLONES void masked_ce_grad_rows(scalar_t* g, const scalar_t* z, const int64_t* y,
                                             const int64_t* comb, int64_t C, int64_t lazy,
                                             acc_t scale, int64_t b0, int64_t b1) {
  ClassRows<acc_t, kChunk> rows;
  int64_t idx[kChunk], ys[kChunk];
  acc_t kappa[kChunk];
  for (int64_t c0 = b0; c0 < b1; c0 += kChunk) {
    const int64_t c1 = min(b1, c0 + kChunk);
    int64_t nm = 0;
    for (int64_t b = c0; b < c1; ++b) {
      if (comb[b] == lazy) {
        idx[nm] = b;
        ys[nm++] = y[b];
      } else {
        std::fill(g + b * C, g + (b + 1) * C, scalar_t(0));
      }
    }
    rows.n = 0;
    rows.add_rows(z, C, idx, ys, nm);
    rows.finish();
#pragma omp simd
    for (int64_t i = 0; i < nm; ++i) kappa[i] = scale * vexp_neg(rows.lc[i]);  // (1 - p_y) / n
    write_class_grads(g, z, C, idx, ys, rows.mo, rows.ls, kappa, nm);
  }
}

std::tuple<Tensor, Tensor> tla_stats_cpu(const Tensor& logits_in, const Tensor& labels_in,
                                         const Tensor& comb_in, int64_t num_modalities,
                                         c10::string_view distance) {
  const Tensor logits = logits_in.contiguous();
  const Tensor labels = labels_in.contiguous();
  const Tensor comb = comb_in.to(at::kLong).contiguous();
  const int64_t B = logits.size(0), C = logits.size(1), bins = int64_t(1) << num_modalities;
  const Distance dist = parse_distance(distance);
  check_labels(labels, C);
  check_comb(comb, num_modalities);
  const int64_t nblk = num_blocks(B, kBlock);
  std::vector<uint8_t> nonfinite(nblk, 0);
  // per-block partials, reduced below in block order: deterministic for any thread count
  std::vector<double> psum(nblk * bins, 0.0);
  std::vector<int64_t> pcnt(nblk * bins, 0);
  OMNIFUSE_DISPATCH_FLOATS(logits.scalar_type(), "tla_stats", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* z = logits.const_data_ptr<scalar_t>();
    const int64_t* y = labels.const_data_ptr<int64_t>();
    const int64_t* cb = comb.const_data_ptr<int64_t>();
    for_blocks(B, kBlock, [&](int64_t blk, int64_t b0, int64_t b1) {
      double* s = psum.data() + blk * bins;
      int64_t* n = pcnt.data() + blk * bins;
      uint8_t* f = nonfinite.data() + blk;
      switch (dist) {
        case Distance::kCE:
          stats_rows<Distance::kCE, scalar_t, acc_t>(z, y, cb, C, bins, s, n, b0, b1, f);
          break;
        case Distance::kL1:
          stats_rows<Distance::kL1, scalar_t, acc_t>(z, y, cb, C, bins, s, n, b0, b1, f);
          break;
        case Distance::kL2:
          stats_rows<Distance::kL2, scalar_t, acc_t>(z, y, cb, C, bins, s, n, b0, b1, f);
          break;
      }
    });
  });
  check_finite_flags(nonfinite, logits, "logits");
  Tensor sums = at::empty({bins}, logits.options().dtype(at::kFloat));
  Tensor counts = at::empty({bins}, logits.options().dtype(at::kLong));
  float* so = sums.data_ptr<float>();
  int64_t* no = counts.data_ptr<int64_t>();
  for (int64_t c = 0; c < bins; ++c) {
    double s = 0.0;
    int64_t n = 0;
    for (int64_t blk = 0; blk < nblk; ++blk) {
      s += psum[blk * bins + c];
      n += pcnt[blk * bins + c];
    }
    so[c] = static_cast<float>(s);
    no[c] = n;
  }
  so[0] = 0.f;  // bin 0 is no combination (validated input never lands there)
  no[0] = 0;
  return {sums, counts};
}

Tensor tla_loss_cpu(const Tensor& logits_in, const Tensor& labels_in, const Tensor& comb_in,
                    int64_t lazy) {
  const Tensor logits = logits_in.contiguous();
  const Tensor labels = labels_in.contiguous();
  const Tensor comb = comb_in.to(at::kLong).contiguous();
  const int64_t B = logits.size(0), C = logits.size(1);
  check_labels(labels, C);
  // ids of up to 8 modalities (M is not an argument); only the rows with comb == lazy are read,
  // so only their logits are checked for NaN/inf (the others do not enter the loss)
  check_comb(comb, 8);
  const int64_t nblk = num_blocks(B, kBlock);
  std::vector<double> psum(nblk, 0.0);
  std::vector<int64_t> pcnt(nblk, 0);
  std::vector<uint8_t> nonfinite(nblk, 0);
  OMNIFUSE_DISPATCH_FLOATS(logits.scalar_type(), "tla_loss", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* z = logits.const_data_ptr<scalar_t>();
    const int64_t* y = labels.const_data_ptr<int64_t>();
    const int64_t* cb = comb.const_data_ptr<int64_t>();
    for_blocks(B, kBlock, [&](int64_t blk, int64_t b0, int64_t b1) {
      psum[blk] = static_cast<double>(masked_ce_rows<scalar_t, acc_t>(
          z, y, cb, C, lazy, &pcnt[blk], b0, b1, nonfinite.data() + blk));
    });
  });
  check_finite_flags(nonfinite, logits, "logits");
  double s = 0.0;
  int64_t n = 0;
  for (int64_t blk = 0; blk < nblk; ++blk) {
    s += psum[blk];
    n += pcnt[blk];
  }
  // sum / max(n, 1): a real 0 when the mask is empty
  return at::scalar_tensor(s / static_cast<double>(std::max<int64_t>(n, 1)), logits.options());
}

Tensor tla_loss_backward_cpu(const Tensor& grad, const Tensor& logits_in, const Tensor& labels_in,
                             const Tensor& comb_in, int64_t lazy) {
  const Tensor logits = logits_in.contiguous();
  const Tensor labels = labels_in.contiguous();
  const Tensor comb = comb_in.to(at::kLong).contiguous();
  const int64_t B = logits.size(0), C = logits.size(1);
  check_labels(labels, C);
  const int64_t* cb = comb.const_data_ptr<int64_t>();
  int64_t n = 0;
  for (int64_t b = 0; b < B; ++b) n += cb[b] == lazy;
  const double scale = scalar_value(grad) / static_cast<double>(std::max<int64_t>(n, 1));
  Tensor gz = empty_output_like(logits);
  OMNIFUSE_DISPATCH_FLOATS(logits.scalar_type(), "tla_loss_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* z = logits.const_data_ptr<scalar_t>();
    const int64_t* y = labels.const_data_ptr<int64_t>();
    scalar_t* g = gz.data_ptr<scalar_t>();
    at::parallel_for(0, B, 256, [&](int64_t b0, int64_t b1) {
      masked_ce_grad_rows(g, z, y, cb, C, lazy, static_cast<acc_t>(scale), b0, b1);
    });
  });
  return gz;
}

}  // namespace

TORCH_LIBRARY_IMPL(omnifuse_fast, CPU, m) {
  m.impl("combination_ids", &combination_ids_cpu);
  m.impl("tla_stats", &tla_stats_cpu);
  m.impl("tla_loss", &tla_loss_cpu);
  m.impl("tla_loss_backward", &tla_loss_backward_cpu);
}

}  // namespace cpu
}  // namespace omnifuse_fast
