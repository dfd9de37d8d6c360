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
  Tensor gs = grad_out.to(acc, false, /*copy=*/true).contiguous();
  const Tensor glat = grad_latents.to(acc).contiguous();
  const Tensor none = at::empty({0}, opts);
  Tensor gw1 = need_w1 ? at::empty({K, H, F}, opts) : none;
  Tensor gb1 = need_b1 ? at::empty({K, H}, opts) : none;
  Tensor gw2 = need_w2 ? at::empty({K, F, H}, opts) : none;
  Tensor gb2 = need_b2 ? at::empty({K, F}, opts) : none;
  // below the top layer gc is needed anyway (it carries gs down); at layer 0 only for these
  const bool need_encoder0 = need_x || need_w1 || need_b1;
  Tensor gc = at::empty({grad_out.size(0), H}, opts);
  for (int64_t k = K - 1; k >= 0; --k) {
    if (need_b2) column_sums(gs, gb2[k]);
    if (need_w2) weight_grad(gs, st.post[k], gw2[k]);  // [F, H]
    if (k == 0 && !need_encoder0) break;  // only decoder gradients were asked for
    at::mm_out(gc, gs, W2[k]);  // [B, H]
    activation_backward(gc, glat, k * H, needs_pre(a) ? st.pre[k] : Tensor(), st.post[k], a);
    if (need_b1) column_sums(gc, gb1[k]);
    if (need_w1) weight_grad(gc, st.states[k], gw1[k]);  // [H, F]
    if (k > 0 || need_x) gs.addmm_(gc, W1[k]);
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
