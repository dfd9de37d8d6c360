// CUDA binding of the CRA cascade (SPEC section 1): cra_forward and cra_backward.
//
// The fused kernels (cra.cuh) take fp32/bf16/fp16 with F, H multiples of 16, F <= 1024,
// H <= 256; anything else runs an ATen composite (fp32 accumulation, fp64 for fp64) after a
// warning that says why, on every call. The public cra_forward decides before calling this op
// (omnifuse_fast/ops/_cuda_cra.py sends such inputs to the reference and records the fallback),
// so the composite serves direct torch.ops calls; a warning here on that path is a bug that the
// GPU tests catch. Weight gradients are batched GEMMs over the fp32 workspaces
// the fused backward writes (cuBLAS, deterministic).
#include "binding.h"
#include "cra.cuh"

namespace omnifuse_fast {
namespace cuda_binding {
namespace cra_impl {

namespace gk = omnifuse_fast::gpu::cra;

Tensor act_aten(const Tensor& a, int act) {
  switch (act) {
    case gk::kRelu:
      return at::relu(a);
    case gk::kGelu:
      return at::gelu(a);
    case gk::kSilu:
      return at::silu(a);
    default:
      return at::tanh(a);
  }
}

Tensor act_grad_aten(const Tensor& a, int act) {
  switch (act) {
    case gk::kRelu:
      return (a > 0).to(a.scalar_type());
    case gk::kGelu: {
      const Tensor cdf = 0.5 * (1.0 + at::erf(a * M_SQRT1_2));
      const Tensor pdf = at::exp(-0.5 * a * a) * (0.5 * M_2_SQRTPI * M_SQRT1_2);
      return cdf + a * pdf;
    }
    case gk::kSilu: {
      const Tensor s = at::sigmoid(a);
      return s * (1.0 + a * (1.0 - s));
    }
    default: {
      const Tensor t = at::tanh(a);
      return 1.0 - t * t;
    }
  }
}

void check_inputs(const Tensor& x, const Tensor& w1, const Tensor& b1, const Tensor& w2,
                  const Tensor& b2, const char* op) {
  const Tensor* ts[] = {&x, &w1, &b1, &w2, &b2};
  const char* names[] = {"x", "w1", "b1", "w2", "b2"};
  for (int i = 0; i < 5; ++i) {
    check_cuda(*ts[i], op, names[i]);
    check_dtype(*ts[i], x.scalar_type(), op, names[i]);
  }
  TORCH_CHECK(x.dim() == 2 && w1.dim() == 3 && w2.dim() == 3 && b1.dim() == 2 && b2.dim() == 2,
              "omnifuse_fast::", op, " (CUDA): expected x [B, F], w1 [K, H, F], b1 [K, H], ",
              "w2 [K, F, H], b2 [K, F]");
  const int64_t F = x.size(1), K = w1.size(0), H = w1.size(1);
  TORCH_CHECK(w1.size(2) == F && b1.size(0) == K && b1.size(1) == H && w2.size(0) == K &&
                  w2.size(1) == F && w2.size(2) == H && b2.size(0) == K && b2.size(1) == F,
              "omnifuse_fast::", op,
              " (CUDA): weight shapes do not match x [B, F] and w1 [K, H, F]");
}

// The reference chain in ATen ops, in the accumulation dtype; saves s_{k-1} and a_k if asked.
std::tuple<Tensor, Tensor> composite_forward(const Tensor& x, const Tensor& w1, const Tensor& b1,
                                             const Tensor& w2, const Tensor& b2, int act,
                                             std::vector<Tensor>* s_in, std::vector<Tensor>* pre) {
  const auto acc = acc_dtype(x.scalar_type());
  Tensor s = x.to(acc);
  const Tensor W1 = w1.to(acc), B1 = b1.to(acc), W2 = w2.to(acc), B2 = b2.to(acc);
  std::vector<Tensor> lat;
  for (int64_t k = 0; k < w1.size(0); ++k) {
    if (s_in != nullptr) s_in->push_back(s);
    const Tensor a = at::addmm(B1[k], s, W1[k].t());
    if (pre != nullptr) pre->push_back(a);
    const Tensor c = act_aten(a, act);
    s = s + at::addmm(B2[k], c, W2[k].t());
    lat.push_back(c);
  }
  return {s.to(x.scalar_type()), at::cat(lat, 1).to(x.scalar_type())};
}

std::tuple<Tensor, Tensor> cra_forward_cuda(const Tensor& x_in, const Tensor& w1_in,
                                            const Tensor& b1_in, const Tensor& w2_in,
                                            const Tensor& b2_in, c10::string_view activation) {
  check_inputs(x_in, w1_in, b1_in, w2_in, b2_in, "cra_forward");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const std::string act_name(activation);
  const int act = gk::act_from_name(act_name.c_str());
  const Tensor x = x_in.contiguous(), w1 = w1_in.contiguous(), b1 = b1_in.contiguous(),
               w2 = w2_in.contiguous(), b2 = b2_in.contiguous();
  const int64_t B = x.size(0), F = x.size(1), K = w1.size(0), H = w1.size(1);
  Tensor out = at::empty_like(x);
  Tensor lat = at::empty({B, K * H}, x.options());
  const char* reason = "the fused CRA kernel takes fp32, bf16 and fp16 only";
  const bool fused_dtype = dispatch_fused(x.scalar_type(), [&](auto* tag) {
    using scalar_t = std::remove_pointer_t<decltype(tag)>;
    const cudaError_t err = gk::forward(
        in_ptr<scalar_t>(x), in_ptr<scalar_t>(w1), in_ptr<scalar_t>(b1), in_ptr<scalar_t>(w2),
        in_ptr<scalar_t>(b2), out_ptr<scalar_t>(out), out_ptr<scalar_t>(lat),
        static_cast<float*>(nullptr), static_cast<float*>(nullptr), B, static_cast<int>(F),
        static_cast<int>(H), static_cast<int>(K), act, at::cuda::getCurrentCUDAStream(), &reason);
    check_launch(err, "cra_forward");
  });
  if (reason == nullptr) return {out, lat};
  if (fused_dtype)
    TORCH_WARN("omnifuse_fast::cra_forward (CUDA): using the ATen composite: ", reason);
  return composite_forward(x, w1, b1, w2, b2, act, nullptr, nullptr);
}

using Grads = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;

// Weight gradients from the per-autoencoder fp32 tensors (each [K, B, *]):
// s = s_{k-1}, a = a_k, g = dL/ds_k, da = dL/da_k.
std::tuple<Tensor, Tensor, Tensor, Tensor> weight_grads(const Tensor& s, const Tensor& a,
                                                        const Tensor& g, const Tensor& da,
                                                        int act) {
  const Tensor c = act_aten(a, act);
  Tensor dw1 = at::bmm(da.transpose(1, 2), s);  // [K, H, F]
  Tensor db1 = da.sum(1);                       // [K, H]
  Tensor dw2 = at::bmm(g.transpose(1, 2), c);   // [K, F, H]
  Tensor db2 = g.sum(1);                        // [K, F]
  return {dw1, db1, dw2, db2};
}

Grads composite_backward(const Tensor& grad_out, const Tensor& grad_lat, const Tensor& x,
                         const Tensor& w1, const Tensor& b1, const Tensor& w2, const Tensor& b2,
                         int act) {
  const auto acc = acc_dtype(x.scalar_type());
  std::vector<Tensor> s_in, pre;
  composite_forward(x, w1, b1, w2, b2, act, &s_in, &pre);
  const Tensor W1 = w1.to(acc), W2 = w2.to(acc);
  const int64_t K = w1.size(0), H = w1.size(1);
  const Tensor gl = grad_lat.to(acc);
  Tensor g = grad_out.to(acc);
  std::vector<Tensor> gs(K), das(K);
  for (int64_t k = K - 1; k >= 0; --k) {
    gs[k] = g;
    const Tensor dc = at::mm(g, W2[k]) + gl.narrow(1, k * H, H);
    das[k] = dc * act_grad_aten(pre[k], act);
    g = g + at::mm(das[k], W1[k]);
  }
  auto [dw1, db1, dw2, db2] =
      weight_grads(at::stack(s_in), at::stack(pre), at::stack(gs), at::stack(das), act);
  const auto dt = x.scalar_type();
  return {g.to(dt), dw1.to(dt), db1.to(dt), dw2.to(dt), db2.to(dt)};
}

Grads cra_backward_cuda(const Tensor& grad_out_in, const Tensor& grad_lat_in, const Tensor& x_in,
                        const Tensor& w1_in, const Tensor& b1_in, const Tensor& w2_in,
                        const Tensor& b2_in, c10::string_view activation) {
  check_inputs(x_in, w1_in, b1_in, w2_in, b2_in, "cra_backward");
  check_cuda(grad_out_in, "cra_backward", "grad_out");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const std::string act_name(activation);
  const int act = gk::act_from_name(act_name.c_str());
  const Tensor x = x_in.contiguous(), w1 = w1_in.contiguous(), b1 = b1_in.contiguous(),
               w2 = w2_in.contiguous(), b2 = b2_in.contiguous();
  const int64_t B = x.size(0), F = x.size(1), K = w1.size(0), H = w1.size(1);
  const Tensor grad_out = grad_out_in.to(x.scalar_type()).contiguous();
  const Tensor grad_lat = grad_lat_in.defined() ? grad_lat_in.to(x.scalar_type()).contiguous()
                                                : at::zeros({B, K * H}, x.options());
  TORCH_CHECK(grad_out.sizes() == x.sizes() && grad_lat.size(0) == B && grad_lat.size(1) == K * H,
              "omnifuse_fast::cra_backward (CUDA): grad_out must be [B, F], grad_latents [B, K*H]");

  const auto f32 = x.options().dtype(at::kFloat);
  const char* reason = "the fused CRA kernel takes fp32, bf16 and fp16 only";
  Tensor dx, s, a, g, da;
  const bool fused_dtype = dispatch_fused(x.scalar_type(), [&](auto* tag) {
    using scalar_t = std::remove_pointer_t<decltype(tag)>;
    const void* ptrs[] = {x.const_data_ptr(), w1.const_data_ptr(), w2.const_data_ptr(),
                          grad_out.const_data_ptr()};
    reason = gk::unsupported<cuda_t<scalar_t>>(B, static_cast<int>(F), static_cast<int>(H),
                                               static_cast<int>(K), ptrs, 4);
    if (reason != nullptr) return;  // before allocating the workspaces
    s = at::empty({K, B, F}, f32);
    a = at::empty({K, B, H}, f32);
    g = at::empty({K, B, F}, f32);
    da = at::empty({K, B, H}, f32);
    dx = at::empty_like(x);
    const auto stream = at::cuda::getCurrentCUDAStream();
    cudaError_t err = gk::forward(
        in_ptr<scalar_t>(x), in_ptr<scalar_t>(w1), in_ptr<scalar_t>(b1), in_ptr<scalar_t>(w2),
        in_ptr<scalar_t>(b2), static_cast<cuda_t<scalar_t>*>(nullptr),
        static_cast<cuda_t<scalar_t>*>(nullptr), s.mutable_data_ptr<float>(),
        a.mutable_data_ptr<float>(), B, static_cast<int>(F), static_cast<int>(H),
        static_cast<int>(K), act, stream, &reason);
    check_launch(err, "cra_backward (recompute)");
    if (reason != nullptr) return;
    err = gk::backward_dx(in_ptr<scalar_t>(grad_out), in_ptr<scalar_t>(grad_lat),
                          in_ptr<scalar_t>(w1), in_ptr<scalar_t>(w2), a.const_data_ptr<float>(),
                          out_ptr<scalar_t>(dx), g.mutable_data_ptr<float>(),
                          da.mutable_data_ptr<float>(), B, static_cast<int>(F), static_cast<int>(H),
                          static_cast<int>(K), act, stream, &reason);
    check_launch(err, "cra_backward");
  });
  if (reason != nullptr) {
    if (fused_dtype)
      TORCH_WARN("omnifuse_fast::cra_backward (CUDA): using the ATen composite: ", reason);
    return composite_backward(grad_out, grad_lat, x, w1, b1, w2, b2, act);
  }
  auto [dw1, db1, dw2, db2] = weight_grads(s, a, g, da, act);
  const auto dt = x.scalar_type();
  return {dx, dw1.to(dt), db1.to(dt), dw2.to(dt), db2.to(dt)};
}

}  // namespace cra_impl
}  // namespace cuda_binding
}  // namespace omnifuse_fast

TORCH_LIBRARY_IMPL(omnifuse_fast, CUDA, m) {
  m.impl("cra_forward", &omnifuse_fast::cuda_binding::cra_impl::cra_forward_cuda);
  m.impl("cra_backward", &omnifuse_fast::cuda_binding::cra_impl::cra_backward_cuda);
}
