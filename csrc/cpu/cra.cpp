// CRA cascade (SPEC section 1) on CPU: s_0 = x, s_k = s_{k-1} + W2_k act(W1_k s_{k-1} + b1_k) +
// b2_k.
//
// The GEMMs go to at::addmm (MKL/oneDNN); around them one fused loop per layer applies the
// activation and writes the latent in the output dtype, and the residual is accumulated in
// place (addmm's beta = 1). The running sum s stays in fp32 (fp64 for fp64 input) whatever the
// input dtype. The backward recomputes the chain from x (the schema passes x and the weights,
// not saved states) and walks it back.
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

template <typename T>
inline T act_fn(Act a, T x) {
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

// d act / d pre at pre = x, given the activation's value y = act(x).
template <typename T>
inline T act_grad(Act a, T x, T y) {
  switch (a) {
    case Act::kReLU:
      return x > T(0) ? T(1) : T(0);
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

// pre [B, H] (acc dtype) -> act(pre) in place; also writes it into lat[:, col:col+H] (out dtype).
void activate(Tensor& pre, Act a, Tensor& lat, int64_t col) {
  const int64_t B = pre.size(0), H = pre.size(1), ld = lat.size(1);
  AT_DISPATCH_FLOATING_TYPES(pre.scalar_type(), "cra_act", [&] {
    using acc_t = scalar_t;
    acc_t* p = pre.data_ptr<acc_t>();
    OMNIFUSE_DISPATCH_FLOATS(lat.scalar_type(), "cra_lat", [&] {
      scalar_t* l = lat.data_ptr<scalar_t>();
      at::parallel_for(0, B, 64, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          for (int64_t h = 0; h < H; ++h) {
            const acc_t y = act_fn(a, p[b * H + h]);
            p[b * H + h] = y;
            l[b * ld + col + h] = static_cast<scalar_t>(y);
          }
        }
      });
    });
  });
}

// gc [B, H] <- (gc + glat[:, col:col+H]) * act'(pre), all acc dtype.
void activation_backward(Tensor& gc, const Tensor& glat, int64_t col, const Tensor& pre,
                         const Tensor& post, Act a) {
  const int64_t B = gc.size(0), H = gc.size(1), ld = glat.size(1);
  AT_DISPATCH_FLOATING_TYPES(gc.scalar_type(), "cra_act_backward", [&] {
    scalar_t* g = gc.data_ptr<scalar_t>();
    const scalar_t* gl = glat.const_data_ptr<scalar_t>();
    const scalar_t* x = pre.const_data_ptr<scalar_t>();
    const scalar_t* y = post.const_data_ptr<scalar_t>();
    at::parallel_for(0, B, 64, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        for (int64_t h = 0; h < H; ++h) {
          const int64_t i = b * H + h;
          g[i] = (g[i] + gl[b * ld + col + h]) * act_grad(a, x[i], y[i]);
        }
      }
    });
  });
}

struct Weights {
  Tensor w1, b1, w2, b2;  // acc dtype, contiguous
};

Weights upcast(const Tensor& w1, const Tensor& b1, const Tensor& w2, const Tensor& b2,
               at::ScalarType acc) {
  return {w1.to(acc).contiguous(), b1.to(acc).contiguous(), w2.to(acc).contiguous(),
          b2.to(acc).contiguous()};
}

std::tuple<Tensor, Tensor> cra_forward_cpu(const Tensor& x, const Tensor& w1, const Tensor& b1,
                                           const Tensor& w2, const Tensor& b2,
                                           c10::string_view activation) {
  at::NoGradGuard no_grad;  // the autograd formula is registered separately
  const Act a = parse_activation(activation);
  const at::ScalarType acc = acc_type(x);
  const int64_t B = x.size(0), K = w1.size(0), H = w1.size(1);
  const Weights w = upcast(w1, b1, w2, b2, acc);
  Tensor s = x.to(acc, /*non_blocking=*/false, /*copy=*/true).contiguous();  // running sum
  Tensor lat = at::empty({B, K * H}, x.options());
  Tensor c = at::empty({B, H}, s.options());
  for (int64_t k = 0; k < K; ++k) {
    at::addmm_out(c, w.b1[k], s, w.w1[k].t());  // b1 + s W1^T
    activate(c, a, lat, k * H);
    s.addmm_(c, w.w2[k].t());  // residual: s += c W2^T
    s.add_(w.b2[k]);
  }
  return {s.to(x.scalar_type()), lat};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> cra_backward_cpu(
    const Tensor& grad_out, const Tensor& grad_latents, const Tensor& x, const Tensor& w1,
    const Tensor& b1, const Tensor& w2, const Tensor& b2, c10::string_view activation) {
  at::NoGradGuard no_grad;
  const Act a = parse_activation(activation);
  const at::ScalarType acc = acc_type(x);
  const int64_t K = w1.size(0), H = w1.size(1), F = w1.size(2);
  const Weights w = upcast(w1, b1, w2, b2, acc);
  // recompute: the input s_{k-1}, pre-activation and latent of every layer
  std::vector<Tensor> states(K), pres(K), posts(K);
  Tensor s = x.to(acc).contiguous();
  for (int64_t k = 0; k < K; ++k) {
    states[k] = s;
    pres[k] = at::addmm(w.b1[k], s, w.w1[k].t());
    posts[k] = at::empty_like(pres[k]);
    AT_DISPATCH_FLOATING_TYPES(acc, "cra_recompute", [&] {
      const scalar_t* p = pres[k].const_data_ptr<scalar_t>();
      scalar_t* q = posts[k].data_ptr<scalar_t>();
      at::parallel_for(0, pres[k].numel(), 4096, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) q[i] = act_fn(a, p[i]);
      });
    });
    if (k + 1 < K) {
      s = at::addmm(s, posts[k], w.w2[k].t());  // out of place: states[k] is kept
      s.add_(w.b2[k]);
    }
  }
  Tensor gs = grad_out.to(acc, false, /*copy=*/true).contiguous();
  const Tensor glat = grad_latents.to(acc).contiguous();
  Tensor gw1 = at::empty({K, H, F}, gs.options()), gb1 = at::empty({K, H}, gs.options());
  Tensor gw2 = at::empty({K, F, H}, gs.options()), gb2 = at::empty({K, F}, gs.options());
  for (int64_t k = K - 1; k >= 0; --k) {
    Tensor gb2k = gb2[k], gw2k = gw2[k], gb1k = gb1[k], gw1k = gw1[k];
    at::sum_out(gb2k, gs, {0});
    at::mm_out(gw2k, gs.t(), posts[k]);  // [F, H]
    Tensor gc = at::mm(gs, w.w2[k]);     // [B, H]
    activation_backward(gc, glat, k * H, pres[k], posts[k], a);
    at::sum_out(gb1k, gc, {0});
    at::mm_out(gw1k, gc.t(), states[k]);  // [H, F]
    gs.addmm_(gc, w.w1[k]);               // through the residual and the encoder
  }
  return {gs.to(x.scalar_type()), gw1.to(w1.scalar_type()), gb1.to(b1.scalar_type()),
          gw2.to(w2.scalar_type()), gb2.to(b2.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(omnifuse_fast, CPU, m) {
  m.impl("cra_forward", &cra_forward_cpu);
  m.impl("cra_backward", &cra_backward_cpu);
}

}  // namespace cpu
}  // namespace omnifuse_fast
