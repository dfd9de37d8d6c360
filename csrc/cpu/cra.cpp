// CRA cascade (SPEC section 1) on CPU: s_0 = x, s_k = s_{k-1} + W2_k act(W1_k s_{k-1} + b1_k) +
// b2_k.
//
// The matmuls are ATen GEMMs (MKL): the encoder bias rides in at::addmm, and the residual and
// decoder bias are written first (s_k = s_{k-1} + b2_k) so that the decoder GEMM accumulates
// onto them (beta = 1). Around the GEMMs one fused loop per layer applies the activation and
// writes the latent in the output dtype. The running sum stays in fp32 (fp64 for fp64 input)
// whatever the input dtype.
//
// Training runs cra_forward_stash, which also returns what the backward needs (the layer inputs
// s_{k-1}, the activations and, for gelu/silu, the pre-activations), and cra_backward_stash,
// which walks the chain back with four GEMMs per layer and computes only the gradients asked
// for (output_mask = needs_input_grad of x, w1, b1, w2, b2). cra_backward (the recomputing
// schema shared with CUDA) recomputes the stash and runs the same backward.
#include "common.h"

#include <atomic>
#include <thread>

namespace omnifuse_fast {
namespace cpu {
namespace {

enum class Act { kReLU, kGELU, kSiLU, kTanh };

Act parse_activation(c10::string_view a) {
  if (a == "relu") return Act::kReLU;
  if (a == "gelu") return Act::kGELU;
  if (a == "silu") return Act::kSiLU;
  if (a == "tanh") return Act::kTanh;
  TORCH_CHECK(false, "omnifuse_fast::cra: activation must be relu, gelu, silu or tanh, got ", a);
}

// relu and tanh get their derivative from the activation's value; gelu and silu need the input.
bool needs_pre(Act a) { return a == Act::kGELU || a == Act::kSiLU; }

template <typename T>
OMNIFUSE_INLINE T act_fn(Act a, T x) {
  switch (a) {
    case Act::kReLU:
      return x > T(0) ? x : T(0);
    case Act::kGELU:  // exact (erf) GELU, like F.gelu's default
      return T(0.5) * x * (T(1) + std::erf(x * T(M_SQRT1_2)));
    case Act::kSiLU:
      return x / (T(1) + std::exp(-x));
    default:
      return std::tanh(x);
  }
}

// d act / d pre, given the activation's value y = act(x) (x is read for gelu and silu only).
template <typename T>
OMNIFUSE_INLINE T act_grad(Act a, T x, T y) {
  switch (a) {
    case Act::kReLU:
      return y > T(0) ? T(1) : T(0);
    case Act::kGELU: {
      const T cdf = T(0.5) * (T(1) + std::erf(x * T(M_SQRT1_2)));
      const T pdf = std::exp(T(-0.5) * x * x) * T(0.3989422804014327);  // 1 / sqrt(2 pi)
      return cdf + x * pdf;
    }
    case Act::kSiLU: {
      const T sig = T(1) / (T(1) + std::exp(-x));
      return sig * (T(1) + x * (T(1) - sig));
    }
    default:
      return T(1) - y * y;
  }
}

constexpr int64_t kRows = 64;  // rows per parallel block of the elementwise loops

// Rows [b0, b1): post = act(pre) (acc dtype) and lat[:, col:col+H] = post (output dtype).
// ReLU has its own loop so that it vectorizes; the others call libm per element.
template <typename acc_t, typename out_t>
OMNIFUSE_CPU_CLONES void activate_rows(const acc_t* pre, acc_t* post, out_t* lat, int64_t ld,
                                       int64_t H, Act a, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    const acc_t* p = pre + b * H;
    acc_t* q = post + b * H;
    out_t* l = lat + b * ld;
    if (a == Act::kReLU) {
#pragma omp simd
      for (int64_t h = 0; h < H; ++h) {
        const acc_t y = p[h] > acc_t(0) ? p[h] : acc_t(0);
        q[h] = y;
        l[h] = static_cast<out_t>(y);
      }
    } else {
      for (int64_t h = 0; h < H; ++h) {
        const acc_t y = act_fn(a, p[h]);
        q[h] = y;
        l[h] = static_cast<out_t>(y);
      }
    }
  }
}

void activate(const Tensor& pre, Act a, Tensor& post, Tensor& lat, int64_t col) {
  const int64_t B = pre.size(0), H = pre.size(1), ld = lat.size(1);
  AT_DISPATCH_FLOATING_TYPES(pre.scalar_type(), "cra_act", [&] {
    using acc_t = scalar_t;
    const acc_t* p = pre.const_data_ptr<acc_t>();
    acc_t* q = post.data_ptr<acc_t>();
    OMNIFUSE_DISPATCH_FLOATS(lat.scalar_type(), "cra_lat", [&] {
      scalar_t* l = lat.data_ptr<scalar_t>() + col;
      at::parallel_for(0, B, kRows, [&](int64_t b0, int64_t b1) {
        activate_rows<acc_t, scalar_t>(p, q, l, ld, H, a, b0, b1);
      });
    });
  });
}

// Rows [b0, b1): g = (g + glat[:, col:col+H]) * act'(pre), all acc dtype (glat may be null).
template <typename T>
OMNIFUSE_CPU_CLONES void activation_backward_rows(T* g, const T* glat, int64_t ld, const T* pre,
                                                  const T* post, int64_t H, Act a, int64_t b0,
                                                  int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    T* gr = g + b * H;
    const T* y = post + b * H;
    const T* gl = glat == nullptr ? nullptr : glat + b * ld;
    if (a == Act::kReLU) {
#pragma omp simd
      for (int64_t h = 0; h < H; ++h) {
        const T v = gl == nullptr ? gr[h] : gr[h] + gl[h];
        gr[h] = y[h] > T(0) ? v : T(0);
      }
    } else {
      const T* x = pre == nullptr ? y : pre + b * H;
      for (int64_t h = 0; h < H; ++h) {
        const T v = gl == nullptr ? gr[h] : gr[h] + gl[h];
        gr[h] = v * act_grad(a, x[h], y[h]);
      }
    }
  }
}

void activation_backward(Tensor& g, const Tensor& glat, int64_t col, const Tensor& pre,
                         const Tensor& post, Act a) {
  const int64_t B = g.size(0), H = g.size(1), ld = glat.size(1);
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "cra_act_backward", [&] {
    scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* gl = glat.const_data_ptr<scalar_t>() + col;
    const scalar_t* x = pre.defined() ? pre.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* y = post.const_data_ptr<scalar_t>();
    at::parallel_for(0, B, kRows, [&](int64_t b0, int64_t b1) {
      activation_backward_rows<scalar_t>(gp, gl, ld, x, y, H, a, b0, b1);
    });
  });
}

// Rows [r0, r1) of t [n, C] summed into acc[C] (acc zeroed by the caller).
template <typename T>
OMNIFUSE_CPU_CLONES void sum_rows(const T* t, int64_t C, int64_t r0, int64_t r1, T* acc) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* row = t + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) acc[c] += row[c];
  }
}

// out [C] = sum over rows of t [n, C]: fixed blocks of rows, partial sums added in block order,
// so the result does not depend on the thread count (and the pass vectorizes along C).
void column_sums(const Tensor& t, Tensor out) {
  const int64_t n = t.size(0), C = t.size(1);
  constexpr int64_t kBlock = 256;
  const int64_t nb = num_blocks(n, kBlock);
  Tensor partial = at::zeros({std::max<int64_t>(nb, 1), C}, t.options());
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "cra_column_sums", [&] {
    const scalar_t* p = t.const_data_ptr<scalar_t>();
    scalar_t* part = partial.data_ptr<scalar_t>();
    for_blocks(n, kBlock, [&](int64_t blk, int64_t r0, int64_t r1) {
      sum_rows<scalar_t>(p, C, r0, r1, part + blk * C);
    });
  });
  at::sum_out(out, partial, {0});  // a few rows: sequential, fixed order
}

// out [M, N] = a^T b for a [n, M], b [n, N] (a weight gradient, reduced over the batch). MKL
// alone splits a long reduction between its threads, so its result would depend on the thread
// count: here the batch is cut into blocks whose size depends on n only, each block is one GEMM
// run inside the parallel region (MKL then uses one thread), and the block results are added in
// block order.
void weight_grad(const Tensor& a, const Tensor& b, Tensor out) {
  const int64_t n = a.size(0);
  const int64_t block = std::max<int64_t>(1024, (n + 7) / 8);  // at most 8 partial results
  const int64_t nb = num_blocks(n, block);
  if (nb <= 1) {
    at::mm_out(out, a.t(), b);
    return;
  }
  Tensor part = at::empty({nb - 1, out.size(0), out.size(1)}, out.options());
  at::parallel_for(0, nb, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t r0 = i * block, rows = std::min(n, r0 + block) - r0;
      Tensor dst = i == 0 ? out : part[i - 1];
      at::mm_out(dst, a.narrow(0, r0, rows).t(), b.narrow(0, r0, rows));
    }
  });
  for (int64_t i = 0; i + 1 < nb; ++i) out.add_(part[i]);
}

struct Weights {
  Tensor w1, b1, w2, b2;  // acc dtype, contiguous (no copy for fp32/fp64 contiguous input)
};

Weights upcast(const Tensor& w1, const Tensor& b1, const Tensor& w2, const Tensor& b2,
               at::ScalarType acc) {
  return {w1.to(acc).contiguous(), b1.to(acc).contiguous(), w2.to(acc).contiguous(),
          b2.to(acc).contiguous()};
}

// What the backward needs from the forward (acc dtype): states[k] = s_{k-1} [K, B, F],
// post[k] = act(a_k) [K, B, H], pre[k] = a_k [K, B, H] (gelu/silu; else an empty [0]).
struct Stash {
  Tensor states, post, pre;
};

// The forward chain; fills *stash when given.
std::tuple<Tensor, Tensor> forward_impl(const Tensor& x, const Tensor& w1, const Tensor& b1,
                                        const Tensor& w2, const Tensor& b2, Act a,
                                        Stash* stash) {
  at::NoGradGuard no_grad;  // the autograd formula is registered separately
  const at::ScalarType acc = acc_type(x);
  const int64_t B = x.size(0), F = x.size(1), K = w1.size(0), H = w1.size(1);
  const Weights w = upcast(w1, b1, w2, b2, acc);
  const auto opts = x.options().dtype(acc);
  Tensor lat = at::empty({B, K * H}, x.options());
  Tensor s;  // s_{k-1}: stash->states[k], or one running buffer updated in place
  if (stash != nullptr) {
    stash->states = at::empty({K, B, F}, opts);
    stash->post = at::empty({K, B, H}, opts);
    stash->pre = needs_pre(a) ? at::empty({K, B, H}, opts) : at::empty({0}, opts);
    stash->states[0].copy_(x);
  } else {
    s = x.to(acc, /*non_blocking=*/false, /*copy=*/true).contiguous();
  }
  Tensor pre_buf = at::empty({B, H}, opts), post_buf;
  if (stash == nullptr) post_buf = at::empty({B, H}, opts);
  Tensor s_last;
  for (int64_t k = 0; k < K; ++k) {
    const Tensor s_in = stash != nullptr ? stash->states[k] : s;
    Tensor pre = stash != nullptr && needs_pre(a) ? stash->pre[k] : pre_buf;
    Tensor post = stash != nullptr ? stash->post[k] : post_buf;
    at::addmm_out(pre, w.b1[k], s_in, w.w1[k].t());  // a_k = b1 + s W1^T
    activate(pre, a, post, lat, k * H);
    // s_k = (s_{k-1} + b2) + c W2^T: the GEMM accumulates onto the residual and bias
    Tensor s_out;
    if (stash == nullptr) {
      s_out = s.add_(w.b2[k]);
    } else {
      s_out = k + 1 < K ? stash->states[k + 1] : at::empty({B, F}, opts);
      at::add_out(s_out, s_in, w.b2[k]);
    }
    s_out.addmm_(post, w.w2[k].t());
    s_last = s_out;
  }
  return {s_last.to(x.scalar_type()), lat};
}

std::tuple<Tensor, Tensor> cra_forward_cpu(const Tensor& x, const Tensor& w1, const Tensor& b1,
                                           const Tensor& w2, const Tensor& b2,
                                           c10::string_view activation) {
  return forward_impl(x, w1, b1, w2, b2, parse_activation(activation), nullptr);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> cra_forward_stash_cpu(
    const Tensor& x, const Tensor& w1, const Tensor& b1, const Tensor& w2, const Tensor& b2,
    c10::string_view activation) {
  Stash st;
  auto [out, lat] = forward_impl(x, w1, b1, w2, b2, parse_activation(activation), &st);
  return {out, lat, st.states, st.post, st.pre};
}

using Grads = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;

// The weight and bias gradients being filled (empty [0] where not asked for).
struct WeightGrads {
  Tensor gw1, gb1, gw2, gb2;
};

// Layer k's decoder gradients from gs = dL/ds_k (db2_k, dW2_k), or its encoder gradients from
// gc = dL/da_k (db1_k, dW1_k), as mask asks.
void layer_weight_grads(const Tensor& gs, const Tensor& gc, const Stash& st, int64_t k,
                        std::array<bool, 5> mask, const WeightGrads& wg, bool decoder) {
  if (decoder) {
    if (mask[4]) column_sums(gs, wg.gb2[k]);
    if (mask[3]) weight_grad(gs, st.post[k], wg.gw2[k]);  // [F, H]
  } else {
    if (mask[2]) column_sums(gc, wg.gb1[k]);
    if (mask[1]) weight_grad(gc, st.states[k], wg.gw1[k]);  // [H, F]
  }
}

// Small GEMMs leave the second core idle: MKL runs a 64 x 192 x 64 GEMM in the same ~11 us on
// one thread or two (benchmarks/NOTES.md). Between these many multiply-adds per GEMM
// (B * F * H), the backward overlaps its two independent halves on two threads instead; below,
// waking a second thread costs more than it saves.
constexpr int64_t kOverlapMinMacs = int64_t(1) << 15, kOverlapMaxMacs = int64_t(1) << 21;

bool overlap_weight_grads(int64_t B, int64_t F, int64_t H) {
  const int64_t macs = B * F * H;
  return at::get_num_threads() >= 2 && !at::in_parallel_region() && macs >= kOverlapMinMacs &&
         macs <= kOverlapMaxMacs;
}

// The backward walk on two threads. One walks the chain (gc_k = (gs W2_k + dL/dc_k) act'(a_k),
// then dL/ds_{k-1} = gs + gc_k W1_k); the other follows one layer behind it with the weight and
// bias gradients, which read only that layer's gs and gc. Each layer's gs and gc get their own
// buffer, so the chain never overwrites what the other thread still reads. Every GEMM is the
// same call as in the sequential walk, on one thread either way (MKL does not thread inside a
// parallel region), so the results are the same bits. With one thread at::parallel_for runs the
// chain, then the rest: the chain never waits, so that order cannot deadlock. Returns dL/dx.
Tensor backward_overlapped(const Tensor& grad_top, const Tensor& glat, const Tensor& W1,
                           const Tensor& W2, const Stash& st, Act a, std::array<bool, 5> mask,
                           const WeightGrads& wg) {
  const int64_t K = W1.size(0), H = W1.size(1), B = grad_top.size(0), F = grad_top.size(1);
  const auto opts = st.states.options();  // the acc dtype
  const bool need_x = mask[0], need_encoder0 = mask[0] || mask[1] || mask[2];
  Tensor G = at::empty({K + 1, B, F}, opts);  // G[k] = dL/ds_k (s_K is the output)
  Tensor C = at::empty({K, B, H}, opts);      // C[k] = dL/da_k
  G[K].copy_(grad_top);
  // the lowest layer whose G (g_ready) and C (c_ready) the chain has written; K: none yet
  std::atomic<int64_t> g_ready{K}, c_ready{K};
  std::atomic<bool> chain_failed{false};
  const auto wait_for = [&](const std::atomic<int64_t>& ready, int64_t k) {
    while (ready.load(std::memory_order_acquire) > k) {
      if (chain_failed.load(std::memory_order_acquire)) return false;
      std::this_thread::yield();
    }
    return true;
  };
  at::parallel_for(0, 2, 1, [&](int64_t role0, int64_t role1) {
    for (int64_t role = role0; role < role1; ++role) {
      if (role == 0) {
        try {
          for (int64_t k = K - 1; k >= 0; --k) {
            if (k == 0 && !need_encoder0) break;
            Tensor gc = C[k];
            at::mm_out(gc, G[k + 1], W2[k]);
            activation_backward(gc, glat, k * H, needs_pre(a) ? st.pre[k] : Tensor(),
                                st.post[k], a);
            c_ready.store(k, std::memory_order_release);
            if (k > 0 || need_x) {
              Tensor gk = G[k];
              at::addmm_out(gk, G[k + 1], gc, W1[k]);
            }
            g_ready.store(k, std::memory_order_release);
          }
        } catch (...) {  // the other thread must not wait for a layer that never comes
          chain_failed.store(true, std::memory_order_release);
          throw;
        }
        continue;
      }
      for (int64_t k = K - 1; k >= 0; --k) {
        if (!wait_for(g_ready, k + 1)) return;
        layer_weight_grads(G[k + 1], Tensor(), st, k, mask, wg, /*decoder=*/true);
        if (k == 0 && !need_encoder0) break;
        if (!wait_for(c_ready, k)) return;
        layer_weight_grads(Tensor(), C[k], st, k, mask, wg, /*decoder=*/false);
      }
    }
  });
  return G[0];
}

// The backward from a stash. mask = which of (x, w1, b1, w2, b2) need a gradient; the others
// come back as empty [0] tensors. Per layer, from the top (gs = dL/ds_k):
//   db2_k = sum_b gs,  dW2_k = gs^T c_k,  gc = (gs W2_k + dL/dc_k) * act'(a_k),
//   db1_k = sum_b gc,  dW1_k = gc^T s_{k-1},  gs += gc W1_k (through the residual).
Grads backward_impl(const Tensor& grad_out, const Tensor& grad_latents, const Tensor& w1,
                    const Tensor& w2, const Stash& st, Act a, std::array<bool, 5> mask) {
  at::NoGradGuard no_grad;
  const at::ScalarType acc = st.states.scalar_type();
  const int64_t K = w1.size(0), H = w1.size(1), F = w1.size(2);
  const auto opts = st.states.options();
  const auto [need_x, need_w1, need_b1, need_w2, need_b2] = mask;
  const Tensor W1 = w1.to(acc).contiguous(), W2 = w2.to(acc).contiguous();
  Tensor gs;  // dL/ds_k, walking down from the output's gradient
  const Tensor glat = grad_latents.to(acc).contiguous();
  const Tensor none = at::empty({0}, opts);
  Tensor gw1 = need_w1 ? at::empty({K, H, F}, opts) : none;
  Tensor gb1 = need_b1 ? at::empty({K, H}, opts) : none;
  Tensor gw2 = need_w2 ? at::empty({K, F, H}, opts) : none;
  Tensor gb2 = need_b2 ? at::empty({K, F}, opts) : none;
  // below the top layer gc is needed anyway (it carries gs down); at layer 0 only for these
  const bool need_encoder0 = need_x || need_w1 || need_b1;
  const WeightGrads wg{gw1, gb1, gw2, gb2};
  if (overlap_weight_grads(grad_out.size(0), F, H)) {
    gs = backward_overlapped(grad_out, glat, W1, W2, st, a, mask, wg);
  } else {
    gs = grad_out.to(acc, false, /*copy=*/true).contiguous();
    Tensor gc = at::empty({grad_out.size(0), H}, opts);
    for (int64_t k = K - 1; k >= 0; --k) {
      layer_weight_grads(gs, gc, st, k, mask, wg, /*decoder=*/true);
      if (k == 0 && !need_encoder0) break;  // only decoder gradients were asked for
      at::mm_out(gc, gs, W2[k]);  // [B, H]
      activation_backward(gc, glat, k * H, needs_pre(a) ? st.pre[k] : Tensor(), st.post[k], a);
      layer_weight_grads(gs, gc, st, k, mask, wg, /*decoder=*/false);
      if (k > 0 || need_x) gs.addmm_(gc, W1[k]);
    }
  }
  const auto cast = [&](const Tensor& g, const Tensor& like) {
    return g.numel() == 0 ? at::empty({0}, like.options()) : g.to(like.scalar_type());
  };
  return {need_x ? gs.to(grad_out.scalar_type()) : at::empty({0}, grad_out.options()),
          cast(gw1, w1), cast(gb1, w1), cast(gw2, w2), cast(gb2, w2)};
}

Grads cra_backward_stash_cpu(const Tensor& grad_out, const Tensor& grad_latents, const Tensor& w1,
                             const Tensor& w2, const Tensor& states, const Tensor& post,
                             const Tensor& pre, c10::string_view activation,
                             std::array<bool, 5> output_mask) {
  const Act a = parse_activation(activation);
  TORCH_CHECK(states.dim() == 3 && post.dim() == 3 && states.size(0) == w1.size(0),
              "omnifuse_fast::cra_backward_stash: states [K, B, F] and post [K, B, H] must come "
              "from cra_forward_stash");
  const Stash st{states.contiguous(), post.contiguous(), pre.contiguous()};
  return backward_impl(grad_out, grad_latents, w1, w2, st, a, output_mask);
}

// The recomputing backward (the schema shared with CUDA): rebuild the stash from x, then walk
// back as above, every gradient.
Grads cra_backward_cpu(const Tensor& grad_out, const Tensor& grad_latents, const Tensor& x,
                       const Tensor& w1, const Tensor& b1, const Tensor& w2, const Tensor& b2,
                       c10::string_view activation) {
  const Act a = parse_activation(activation);
  Stash st;
  forward_impl(x, w1, b1, w2, b2, a, &st);
  return backward_impl(grad_out, grad_latents, w1, w2, st, a, {true, true, true, true, true});
}

}  // namespace

TORCH_LIBRARY_IMPL(omnifuse_fast, CPU, m) {
  m.impl("cra_forward", &cra_forward_cpu);
  m.impl("cra_backward", &cra_backward_cpu);
  m.impl("cra_forward_stash", &cra_forward_stash_cpu);
  m.impl("cra_backward_stash", &cra_backward_stash_cpu);
}

}  // namespace cpu
}  // namespace omnifuse_fast
