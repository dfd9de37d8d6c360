// CUDA binding of MM learning (SPEC section 5): modality_mix (+ its deterministic backward) and
// soft_cross_entropy (+ backward).
#include "binding.h"
#include "mix.cuh"

namespace omnifuse_fast {
namespace cuda_binding {
namespace mix_impl {

namespace gk = omnifuse_fast::gpu::mix;

std::tuple<Tensor, Tensor> modality_mix_cuda(const Tensor& v_in, const Tensor& labels_in,
                                             const Tensor& src_in, int64_t num_classes,
                                             const std::optional<Tensor>& weights_in) {
  const char* op = "modality_mix";
  check_cuda(v_in, op, "v");
  check_cuda(labels_in, op, "labels");
  check_cuda(src_in, op, "src");
  check_dtype(labels_in, at::kLong, op, "labels");
  // src.size(1) == B too: the kernels bound src's values by B, the rows of v and labels
  TORCH_CHECK(v_in.dim() == 3 && src_in.dim() == 2 && src_in.size(0) == v_in.size(1) &&
                  src_in.size(1) == v_in.size(0) && labels_in.dim() == 1 &&
                  labels_in.size(0) == v_in.size(0),
              "omnifuse_fast::modality_mix (CUDA): expected v [B, M, D], labels [B], src [M, B]");
  TORCH_CHECK(v_in.size(1) <= gk::kMaxM && num_classes < (int64_t{1} << 31),
              "omnifuse_fast::modality_mix (CUDA): M must be <= 8 and C fit in 32 bits");
  const c10::cuda::CUDAGuard guard(v_in.device());
  const Tensor v = v_in.contiguous(), labels = labels_in.contiguous();
  const Tensor src = src_in.to(at::kLong).contiguous();
  const int64_t B = src.size(1), M = v.size(1), D = v.size(2);
  Tensor weights;
  if (weights_in.has_value() && weights_in->defined()) {
    check_cuda(*weights_in, op, "weights");
    weights = weights_in->to(at::kFloat).expand({B, M}).contiguous();
  }
  Tensor v_mix = at::empty({B, M, D}, v.options());
  Tensor soft = at::empty({B, num_classes}, v.options());
  DeviceFlags flags(v);
  OMNIFUSE_DISPATCH_FLOATING(v.scalar_type(), "modality_mix", [&] {
    check_launch(gk::mix_forward(in_ptr<scalar_t>(v), labels.const_data_ptr<int64_t>(),
                                 src.const_data_ptr<int64_t>(),
                                 weights.defined() ? weights.const_data_ptr<float>() : nullptr, B,
                                 static_cast<int>(M), D, static_cast<int>(num_classes),
                                 out_ptr<scalar_t>(v_mix), out_ptr<scalar_t>(soft), flags.ptr(),
                                 at::cuda::getCurrentCUDAStream()),
                 op);
  });
  flags.raise_if(op, gpu::kFlagSrc);
  flags.raise_if(op, gpu::kFlagLabels);
  if (weights.defined()) flags.raise_if(op, gpu::kFlagWeights);
  return {v_mix, soft};
}

Tensor modality_mix_backward_cuda(const Tensor& grad_in, const Tensor& src_in, int64_t batch) {
  const char* op = "modality_mix_backward";
  check_cuda(grad_in, op, "grad_v_mix");
  check_cuda(src_in, op, "src");
  TORCH_CHECK(grad_in.dim() == 3 && src_in.dim() == 2 && src_in.size(0) == grad_in.size(1) &&
                  src_in.size(1) == grad_in.size(0),
              "omnifuse_fast::modality_mix_backward (CUDA): expected grad_v_mix [B, M, D], "
              "src [M, B]");
  const c10::cuda::CUDAGuard guard(grad_in.device());
  const Tensor grad = grad_in.contiguous();
  const Tensor src = src_in.to(at::kLong).contiguous();
  const int64_t B = grad.size(0), M = grad.size(1), D = grad.size(2);
  if (!gk::backward_supported(B, static_cast<int>(M), batch)) {
    TORCH_WARN_ONCE(
        "omnifuse_fast::modality_mix_backward (CUDA): indices exceed the 32-bit "
        "sort keys; using index_add (not bitwise reproducible)");
    Tensor out = at::zeros({batch, M, D}, grad.options().dtype(acc_dtype(grad.scalar_type())));
    for (int64_t m = 0; m < M; ++m)
      out.select(1, m).index_add_(0, src[m], grad.select(1, m).to(out.scalar_type()));
    return out.to(grad.scalar_type());
  }
  Tensor out = at::empty({batch, M, D}, grad.options());
  gk::BackwardScratch sc{};
  check_launch(gk::backward_scratch(B, static_cast<int>(M), batch, &sc), op);
  Tensor scratch = at::empty({static_cast<int64_t>(sc.total > 0 ? sc.total : 1)},
                             grad.options().dtype(at::kByte));
  OMNIFUSE_DISPATCH_FLOATING(grad.scalar_type(), "modality_mix_backward", [&] {
    check_launch(gk::mix_backward(in_ptr<scalar_t>(grad), src.const_data_ptr<int64_t>(), B,
                                  static_cast<int>(M), D, batch, scratch.mutable_data_ptr(),
                                  static_cast<size_t>(scratch.numel()), out_ptr<scalar_t>(out),
                                  at::cuda::getCurrentCUDAStream()),
                 op);
  });
  return out;
}

void check_soft(const Tensor& logits, const Tensor& soft, const char* op) {
  check_cuda(logits, op, "logits");
  check_cuda(soft, op, "soft_labels");
  check_dtype(soft, logits.scalar_type(), op, "soft_labels");
  TORCH_CHECK(logits.dim() == 2 && soft.sizes() == logits.sizes(), "omnifuse_fast::", op,
              " (CUDA): logits and soft_labels must both be [B, C]");
  TORCH_CHECK(logits.size(1) < (int64_t{1} << 31), "omnifuse_fast::", op,
              " (CUDA): C must fit in 32 bits");
}

Tensor soft_cross_entropy_cuda(const Tensor& logits_in, const Tensor& soft_in) {
  const char* op = "soft_cross_entropy";
  check_soft(logits_in, soft_in, op);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const Tensor z = logits_in.contiguous(), q = soft_in.contiguous();
  Tensor out = at::empty({}, z.options());
  DeviceFlags flags(z);
  OMNIFUSE_DISPATCH_FLOATING(z.scalar_type(), "soft_cross_entropy", [&] {
    using A = gpu::acc_type<cuda_t<scalar_t>>;
    const int64_t B = z.size(0);
    const int C = static_cast<int>(z.size(1));
    const int64_t np =
        B > 0 ? gk::soft_ce_num_partials(in_ptr<scalar_t>(z), in_ptr<scalar_t>(q), B, C) : 1;
    Tensor partials = at::empty({np}, z.options().dtype(acc_dtype(z.scalar_type())));
    check_launch(gk::soft_ce_forward(in_ptr<scalar_t>(z), in_ptr<scalar_t>(q), B, C,
                                     partials.mutable_data_ptr<A>(), out_ptr<scalar_t>(out),
                                     flags.ptr(), at::cuda::getCurrentCUDAStream()),
                 op);
  });
  flags.raise_if(op, gpu::kFlagLogits);
  flags.raise_if(op, gpu::kFlagSoftLabels);
  return out;
}

std::tuple<Tensor, Tensor> soft_cross_entropy_backward_cuda(const Tensor& grad,
                                                            const Tensor& logits_in,
                                                            const Tensor& soft_in) {
  const char* op = "soft_cross_entropy_backward";
  check_soft(logits_in, soft_in, op);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const Tensor z = logits_in.contiguous(), q = soft_in.contiguous();
  const Tensor g = grad_scalar(grad, z);
  Tensor gz = at::empty_like(z), gq = at::empty_like(q);
  OMNIFUSE_DISPATCH_FLOATING(z.scalar_type(), "soft_cross_entropy_backward", [&] {
    using A = gpu::acc_type<cuda_t<scalar_t>>;
    check_launch(
        gk::soft_ce_backward(g.const_data_ptr<A>(), in_ptr<scalar_t>(z), in_ptr<scalar_t>(q),
                             z.size(0), static_cast<int>(z.size(1)), out_ptr<scalar_t>(gz),
                             out_ptr<scalar_t>(gq), at::cuda::getCurrentCUDAStream()),
        op);
  });
  return {gz, gq};
}

}  // namespace mix_impl
}  // namespace cuda_binding
}  // namespace omnifuse_fast

TORCH_LIBRARY_IMPL(omnifuse_fast, CUDA, m) {
  namespace impl = omnifuse_fast::cuda_binding::mix_impl;
  m.impl("modality_mix", &impl::modality_mix_cuda);
  m.impl("modality_mix_backward", &impl::modality_mix_backward_cuda);
  m.impl("soft_cross_entropy", &impl::soft_cross_entropy_cuda);
  m.impl("soft_cross_entropy_backward", &impl::soft_cross_entropy_backward_cuda);
}
